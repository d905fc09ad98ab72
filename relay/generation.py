"""The configuration generation: a counter that moves whenever keys, quotas, models,
providers or prices change.

Writers call `bump_config_generation()` inside their transaction; it takes effect on
commit. Each web process polls `read_config_generation()` off the request path and
drops its snapshots when the value moves. With Redis configured the counter is
mirrored there, so polling costs a Redis GET instead of a query; the database row
stays the source of truth and is read whenever Redis cannot answer.
"""

from __future__ import annotations

import logging
import secrets

from django.conf import settings
from django.db import transaction
from django.db.models import F

from gateway_project.redis_keys import redis_key
from relay.models import ConfigGeneration

logger = logging.getLogger(__name__)


def generation_key() -> str:
    return redis_key("config-generation")


def bump_config_generation() -> None:
    transaction.on_commit(_bump_now)


def _bump_now() -> None:
    updated = ConfigGeneration.objects.filter(pk=1).update(value=F("value") + 1)
    if not updated:
        ConfigGeneration.objects.get_or_create(pk=1, defaults={"value": _first_value()})
    value = ConfigGeneration.objects.get(pk=1).value
    _mirror_to_redis(value)


def _first_value() -> int:
    """A random start, not 1: processes reload only when the value *differs* from
    theirs, so a row recreated after a restore or a flush of the table must not count
    up through values they may still hold (with other contents behind them)."""
    return secrets.randbelow(2**52) + 1


def _mirror_to_redis(value: int) -> None:
    client = _redis()
    if client is None:
        return
    try:
        client.set(generation_key(), value)
    except Exception:  # Redis down: pollers fall back to the database row.
        logger.warning("config generation not mirrored to redis", exc_info=True)


def read_config_generation() -> int:
    client = _redis()
    if client is not None:
        try:
            value = client.get(generation_key())
        except Exception:
            value = None
        if value is not None:
            return int(value)
    row = ConfigGeneration.objects.filter(pk=1).values_list("value", flat=True).first()
    value = row or 0
    if client is not None:
        _mirror_to_redis(value)
    return value


def _redis():  # type: ignore[no-untyped-def]
    if not settings.REDIS_URL:
        return None
    from django_redis import get_redis_connection

    return get_redis_connection("default")
