"""The relay's side of quotas: what a request may cost, reserving it, settling it,
and the `x-ratelimit-*` headers (OpenAI's names) that tell apps where they stand."""

from __future__ import annotations

import math
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.utils import timezone

from keys.limiter import limiter
from keys.quotas import (
    CounterState,
    Demand,
    QuotaRefused,
    QuotaUnavailable,
    Reservation,
    cost_micros,
    counters_for,
    reservation_ttl_ms,
)
from keys.selectors import KeyInfo
from relay import errors
from relay.catalog import Candidate, Catalog
from relay.metering import Call
from relay.tokens import count_prompt_tokens
from usage import metrics
from usage.pricing import cost_usd, price_at

OUTPUT_LIMIT_FIELDS = ("max_completion_tokens", "max_tokens", "max_output_tokens")


def max_output_tokens(
    request: dict[str, Any], candidates: list[Candidate], endpoint: str
) -> int:
    """The most the answer may use: the request's own limit, else the model's, else
    the gateway's default, for each answer it may generate. Embeddings produce none."""
    if endpoint == "embeddings":
        return 0
    return _per_output(request, candidates) * _outputs(request)


def _per_output(request: dict[str, Any], candidates: list[Candidate]) -> int:
    for name in OUTPUT_LIMIT_FIELDS:
        value = request.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
    limits = [
        c.route.max_output_tokens for c in candidates if c.route.max_output_tokens
    ]
    return max(limits) if limits else settings.GATEWAY_DEFAULT_MAX_OUTPUT_TOKENS


def _outputs(request: dict[str, Any]) -> int:
    """How many answers one request may generate, each up to the output limit:
    chat's `n`, completions' `best_of`, and one per prompt of a prompt list."""
    counts = [
        value
        for value in (request.get("n"), request.get("best_of"))
        if isinstance(value, int) and not isinstance(value, bool) and value > 1
    ]
    prompt = request.get("prompt")
    # A list of ints is one tokenised prompt; a list of strings (or lists) is many.
    many = isinstance(prompt, list) and not all(isinstance(p, int) for p in prompt)
    prompts = len(prompt) if many else 1  # type: ignore[arg-type]
    return max(counts, default=1) * max(prompts, 1)


async def admit(
    key: KeyInfo,
    catalog: Catalog,
    request: dict[str, Any],
    candidates: list[Candidate],
    *,
    endpoint: str,
) -> Reservation | None:
    """Reserve the request's worst case on every quota of the key and its team.

    Raises the relay's 429 (rate or budget), 403 `model_not_priced` or 503.
    """
    if not key.quotas:
        return None
    now = timezone.now()
    metrics_of = {q.metric for q in key.quotas}
    prompt = count_prompt_tokens(request) if metrics_of - {"requests"} else 0
    output = max_output_tokens(request, candidates, endpoint)
    cost: Decimal | None = Decimal(0)
    if "cost_usd" in metrics_of:
        prices = [price_at(catalog.prices_for(c), now) for c in candidates]
        if any(p is None for p in prices):
            if not key.allow_unpriced:
                raise errors.ModelNotPriced(
                    f"The model '{request['model']}' has no price, and this key has a "
                    "cost budget.",
                    param="model",
                )
            cost = None  # Admitted unpriced: the row is flagged, budgets skip it.
        elif all(p.is_free for p in prices):  # type: ignore[union-attr]
            cost = None  # Free models are exempt from cost budgets.
        else:
            # Fallbacks may be dearer than the first choice: reserve the dearest.
            cost = max(
                cost_usd(p, prompt_tokens=prompt, completion_tokens=output)  # type: ignore[arg-type]
                for p in prices
            )
    counters = counters_for(key, now, skip_cost=cost is None)
    demand = Demand(
        requests=1,
        tokens=prompt + output,
        cost_micros=cost_micros(cost) if cost is not None else None,
    )
    timeout = max(c.provider.timeout_s for c in candidates)
    try:
        return await limiter().reserve(
            counters, demand, now, reservation_ttl_ms(timeout)
        )
    except QuotaRefused as refused:
        raise _refusal(refused) from None
    except QuotaUnavailable:
        raise errors.QuotaUnavailable(
            "Budgets cannot be checked right now; try again shortly.",
            headers={"retry-after": "1"},
        ) from None


async def settle(reservation: Reservation, call: Call, cost: Decimal | None) -> None:
    actual = Demand(
        requests=1,
        tokens=call.prompt_tokens + call.completion_tokens,
        cost_micros=cost_micros(cost) if cost is not None else 0,
    )
    await limiter().settle(reservation, actual, timezone.now())


def _refusal(refused: QuotaRefused) -> errors.RelayError:
    state = refused.state
    quota = state.counter.quota
    retry_after = (
        max(1, math.ceil(state.reset_s)) if math.isfinite(state.reset_s) else None
    )
    headers = dict(rate_limit_headers(refused.states))
    headers_text = {k.decode(): v.decode() for k, v in headers.items()}
    if retry_after is not None:
        headers_text["retry-after"] = str(retry_after)
    owner = "team" if quota.scope == "team" else "key"
    if quota.metric == "cost_usd":
        metrics.RATE_LIMITED.labels(code="insufficient_quota").inc()
        return errors.InsufficientQuota(
            f"The {owner}'s budget of {quota.limit:f} USD per {quota.period} is used up.",
            headers=headers_text,
        )
    metrics.RATE_LIMITED.labels(code="rate_limit_exceeded").inc()
    return errors.RateLimitExceeded(
        f"Rate limit reached for {quota.metric} per {quota.period} on this {owner}: "
        f"limit {state.counter.limit}, used {state.used}.",
        headers=headers_text,
    )


def rate_limit_headers(states: list[CounterState]) -> list[tuple[bytes, bytes]]:
    """OpenAI's x-ratelimit-* headers, from the tightest requests and tokens quotas."""
    headers: list[tuple[bytes, bytes]] = []
    for metric in ("requests", "tokens"):
        relevant = [s for s in states if s.counter.quota.metric == metric]
        if not relevant:
            continue
        tightest = min(relevant, key=lambda s: s.counter.limit - s.used)
        remaining = max(tightest.counter.limit - tightest.used, 0)
        headers += [
            (
                f"x-ratelimit-limit-{metric}".encode(),
                str(tightest.counter.limit).encode(),
            ),
            (f"x-ratelimit-remaining-{metric}".encode(), str(remaining).encode()),
            (
                f"x-ratelimit-reset-{metric}".encode(),
                duration(tightest.reset_s).encode(),
            ),
        ]
    return headers


def duration(seconds: float) -> str:
    """OpenAI's duration format: 20ms, 1s, 6m0s, 1h2m3s."""
    if not math.isfinite(seconds):
        return "0s"
    if seconds < 1:
        return f"{max(int(seconds * 1000), 0)}ms"
    whole = math.ceil(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"
