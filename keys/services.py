"""Every state change of keys, teams and quotas. Admin, REST and the commands call
these; none of them writes a key row itself.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal

from django.contrib.auth.models import AbstractBaseUser
from django.core.exceptions import ValidationError
from django.db import transaction
from django.utils import timezone

from keys.models import ApiKey, Quota, Team
from keys.secrets import hash_secret, make_secret
from relay.generation import bump_config_generation

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class IssuedKey:
    key: ApiKey
    secret: str

    def __repr__(self) -> str:
        return f"IssuedKey(key={self.key!r}, secret='…')"


@dataclass(frozen=True)
class QuotaSpec:
    metric: str
    period: str
    limit: Decimal


def quota_specs(
    *,
    rpm: int | None = None,
    tpm: int | None = None,
    budget_usd: Decimal | None = None,
    budget_period: str = "month",
) -> list[QuotaSpec]:
    """The quotas that `--rpm`, `--tpm` and `--budget-usd` stand for."""
    specs = []
    if rpm is not None:
        specs.append(
            QuotaSpec(Quota.Metric.REQUESTS, Quota.Period.MINUTE, Decimal(rpm))
        )
    if tpm is not None:
        specs.append(QuotaSpec(Quota.Metric.TOKENS, Quota.Period.MINUTE, Decimal(tpm)))
    if budget_usd is not None:
        if budget_period not in {"day", "month", "total"}:
            raise ValidationError("budget period must be day, month or total")
        specs.append(
            QuotaSpec(Quota.Metric.COST_USD, budget_period, Decimal(budget_usd))
        )
    return specs


@transaction.atomic
def issue_key(
    *,
    name: str,
    owner: AbstractBaseUser | None = None,
    team: Team | None = None,
    models: Sequence[str] = (),
    ip_allowlist: Sequence[str] = (),
    expires_at: datetime | None = None,
    quotas: Iterable[QuotaSpec] = (),
    log_bodies: bool = False,
    allow_unpriced: bool = False,
    by: AbstractBaseUser | None = None,
) -> IssuedKey:
    """Create a key and return it with its secret; the secret is never stored or shown again."""
    name = name.strip()
    if not name:
        raise ValidationError("a key needs a name")
    secret = make_secret()
    key = ApiKey.objects.create(
        name=name,
        owner=owner,
        team=team,
        prefix=secret.prefix,
        secret_hash=hash_secret(secret.value),
        allowed_models=list(models),
        ip_allowlist=list(ip_allowlist),
        expires_at=expires_at,
        log_bodies=log_bodies,
        allow_unpriced=allow_unpriced,
        created_by=by,
    )
    _replace_quotas(key=key, quotas=quotas)
    bump_config_generation()
    logger.info("key issued", extra={"key_id": key.pk, "key_prefix": key.prefix})
    return IssuedKey(key=key, secret=secret.value)


@transaction.atomic
def revoke_key(*, key: ApiKey, by: AbstractBaseUser | None = None) -> None:
    if key.revoked_at is not None:
        return
    key.revoked_at, key.revoked_by = timezone.now(), by
    key.save(update_fields=["revoked_at", "revoked_by", "updated_at"])
    # Every worker drops its snapshots when the generation moves: refused within 1 s.
    bump_config_generation()
    logger.info("key revoked", extra={"key_id": key.pk, "key_prefix": key.prefix})


@transaction.atomic
def rotate_key(
    *, key: ApiKey, grace_seconds: int = 0, by: AbstractBaseUser | None = None
) -> IssuedKey:
    """Give the key a new secret; the old one keeps working for `grace_seconds`."""
    if key.revoked_at is not None:
        raise ValidationError("a revoked key cannot be rotated")
    if grace_seconds < 0:
        raise ValidationError("grace_seconds must not be negative")
    secret = make_secret()
    if grace_seconds:
        key.previous_prefix, key.previous_secret_hash = key.prefix, key.secret_hash
        key.previous_valid_until = timezone.now() + timedelta(seconds=grace_seconds)
    else:
        key.previous_prefix, key.previous_secret_hash = "", ""
        key.previous_valid_until = None
    key.prefix, key.secret_hash = secret.prefix, hash_secret(secret.value)
    key.save(
        update_fields=[
            "prefix",
            "secret_hash",
            "previous_prefix",
            "previous_secret_hash",
            "previous_valid_until",
            "updated_at",
        ]
    )
    bump_config_generation()
    logger.info("key rotated", extra={"key_id": key.pk, "key_prefix": key.prefix})
    return IssuedKey(key=key, secret=secret.value)


@transaction.atomic
def set_key_limits(
    *,
    key: ApiKey,
    quotas: Iterable[QuotaSpec] | None = None,
    **fields: object,
) -> ApiKey:
    """Change a key's editable fields and, when given, replace its quotas."""
    editable = {
        "name",
        "owner",
        "team",
        "allowed_models",
        "ip_allowlist",
        "expires_at",
        "log_bodies",
        "allow_unpriced",
    }
    unknown = set(fields) - editable
    if unknown:
        raise ValidationError(f"not editable: {', '.join(sorted(unknown))}")
    for name, value in fields.items():
        setattr(key, name, value)
    key.save(update_fields=[*fields, "updated_at"])
    if quotas is not None:
        _replace_quotas(key=key, quotas=quotas)
    bump_config_generation()
    return key


@transaction.atomic
def upsert_team(*, name: str) -> Team:
    team, _ = Team.objects.get_or_create(name=name.strip())
    return team


@transaction.atomic
def config_changed() -> None:
    """For writes that bypass the services above (admin inlines): refresh snapshots."""
    bump_config_generation()


def _replace_quotas(*, key: ApiKey, quotas: Iterable[QuotaSpec]) -> None:
    specs = list(quotas)
    for spec in specs:
        if not spec.limit.is_finite() or spec.limit < 0:
            raise ValidationError("a quota limit must be a number, not negative")
    wanted = {(spec.metric, spec.period) for spec in specs}
    stale = [q.pk for q in key.quotas.all() if (q.metric, q.period) not in wanted]
    Quota.objects.filter(pk__in=stale).delete()
    for spec in specs:
        Quota.objects.update_or_create(
            key=key,
            metric=spec.metric,
            period=spec.period,
            defaults={"limit": spec.limit},
        )
