"""Plain factory functions for test data; each goes through the services."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from datetime import UTC, datetime
from decimal import Decimal

from keys.models import ApiKey, Team
from keys.services import QuotaSpec, issue_key, upsert_team
from relay.models import ModelRoute, Provider
from relay.services import upsert_model, upsert_price, upsert_provider
from tests.support.gateway import PROVIDER_KEY_ENV
from usage.models import Price

_names = itertools.count(1)


def make_team(name: str | None = None) -> Team:
    return upsert_team(name=name or f"team-{next(_names)}")


def make_key(
    *,
    name: str | None = None,
    team: Team | None = None,
    models: Sequence[str] = (),
    expires_at: datetime | None = None,
    quotas: Sequence[QuotaSpec] = (),
    **extra: object,
) -> tuple[ApiKey, str]:
    issued = issue_key(
        name=name or f"key-{next(_names)}",
        team=team,
        models=models,
        expires_at=expires_at,
        quotas=quotas,
        **extra,  # type: ignore[arg-type]
    )
    return issued.key, issued.secret


def make_provider(
    base_url: str, *, name: str = "fake", timeout_s: float = 5.0
) -> Provider:
    provider, _ = upsert_provider(
        name=name, base_url=base_url, api_key_env=PROVIDER_KEY_ENV, timeout_s=timeout_s
    )
    return provider


def make_route(
    name: str,
    *,
    provider: str = "fake",
    upstream_model: str = "",
    fallbacks: Sequence[str] = (),
    max_output_tokens: int | None = None,
) -> ModelRoute:
    route, _ = upsert_model(
        name=name,
        provider=provider,
        upstream_model=upstream_model,
        fallbacks=fallbacks,
        max_output_tokens=max_output_tokens,
    )
    return route


def make_price(
    model: str,
    *,
    input: str = "0.15",
    output: str = "0.60",
    cached_input: str | None = "0.075",
    effective_from: datetime | None = None,
) -> Price:
    price, _ = upsert_price(
        model=model,
        input=Decimal(input),
        output=Decimal(output),
        cached_input=Decimal(cached_input) if cached_input is not None else None,
        effective_from=effective_from or datetime(2024, 1, 1, tzinfo=UTC),
    )
    return price
