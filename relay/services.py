"""Writes of providers, models and prices, shared by admin and `loadconfig`.

Each upsert is idempotent by name: applying the same values twice changes nothing
(not even `updated_at`), so `loadconfig` can run on every deploy.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from decimal import Decimal
from typing import Any

from django.core.exceptions import ValidationError
from django.db import models, transaction

from relay.generation import bump_config_generation
from relay.models import ModelRoute, Provider
from relay.provider_keys import decrypt_provider_key, encrypt_provider_key
from usage.models import Price


def _upsert(
    model: type[models.Model], lookup: dict[str, Any], values: dict[str, Any]
) -> tuple[Any, bool]:
    """Create or update one row; True when anything changed."""
    row = model.objects.filter(**lookup).first()
    if row is None:
        row = model(**lookup, **values)
        row.full_clean()
        row.save()
        return row, True
    changed = [name for name, value in values.items() if getattr(row, name) != value]
    if changed:
        for name in changed:
            setattr(row, name, values[name])
        row.full_clean()
        row.save()
    return row, bool(changed)


@transaction.atomic
def upsert_provider(
    *,
    name: str,
    base_url: str,
    api_key_env: str = "",
    api_key: str | None = None,
    timeout_s: float = 60.0,
) -> tuple[Provider, bool]:
    """`api_key` (plain text) is stored encrypted; `api_key_env` names a variable instead."""
    values: dict[str, Any] = {
        "base_url": base_url,
        "api_key_env": api_key_env,
        "timeout_s": float(timeout_s),
    }
    provider, changed = _upsert(Provider, {"name": name}, values)
    if api_key is not None:
        current = (
            decrypt_provider_key(provider.api_key_encrypted)
            if provider.api_key_encrypted
            else ""
        )
        if current != api_key:
            provider.api_key_encrypted = (
                encrypt_provider_key(api_key) if api_key else ""
            )
            provider.save(update_fields=["api_key_encrypted", "updated_at"])
            changed = True
    if changed:
        bump_config_generation()
    return provider, changed


@transaction.atomic
def upsert_model(
    *,
    name: str,
    provider: str,
    upstream_model: str = "",
    fallbacks: Sequence[str] = (),
    max_output_tokens: int | None = None,
    is_active: bool = True,
) -> tuple[ModelRoute, bool]:
    try:
        provider_row = Provider.objects.get(name=provider)
    except Provider.DoesNotExist:
        raise ValidationError(
            f"model {name!r}: no provider named {provider!r}"
        ) from None
    values = {
        "provider": provider_row,
        "upstream_model": upstream_model,
        "fallbacks": list(fallbacks),
        "max_output_tokens": max_output_tokens,
        "is_active": is_active,
    }
    route, changed = _upsert(ModelRoute, {"name": name}, values)
    if changed:
        bump_config_generation()
    return route, changed


@transaction.atomic
def upsert_price(
    *,
    model: str,
    input: Decimal,
    output: Decimal,
    cached_input: Decimal | None,
    effective_from: datetime,
) -> tuple[Price, bool]:
    values = {"input": input, "output": output, "cached_input": cached_input}
    price, changed = _upsert(
        Price, {"model": model, "effective_from": effective_from}, values
    )
    if changed:
        bump_config_generation()
    return price, changed
