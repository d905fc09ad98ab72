"""The gateway's own Prometheus metrics, beside django-prometheus's."""

from __future__ import annotations

import functools
from decimal import Decimal
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

REQUESTS = Counter(
    "gateway_requests_total", "Relay requests by model and status", ["model", "status"]
)
TOKENS = Counter("gateway_tokens_total", "Tokens relayed", ["model", "kind"])
COST = Counter("gateway_cost_usd_total", "Cost of relayed requests in USD", ["model"])
UPSTREAM_LATENCY = Histogram(
    "gateway_upstream_latency_seconds",
    "Time until the upstream's response headers",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
TTFT = Histogram(
    "gateway_time_to_first_token_seconds",
    "Time until the first byte of the answer reached the client",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
RATE_LIMITED = Counter(
    "gateway_rate_limit_refusals_total", "Requests refused by a quota", ["code"]
)
QUOTA_REBUILDS = Counter(
    "gateway_quota_counter_rebuilds_total",
    "Quota counters rebuilt from the usage ledger (limiter restarted or flushed)",
)
QUOTA_BACKEND_ERRORS = Counter(
    "gateway_quota_backend_errors_total",
    "Quota checks, settlements or renewals that could not reach Redis or the usage ledger",
)
AUTH_FAILURES = Counter("gateway_auth_failures_total", "Requests refused for their key")
OPEN_STREAMS = Gauge("gateway_open_streams", "Streams being relayed right now")


@functools.cache
def _requests(model: str, status: str) -> Any:
    # labels() validates and locks on every call; the children are few and stable.
    return REQUESTS.labels(model=model, status=status)


@functools.cache
def _tokens(model: str, kind: str) -> Any:
    return TOKENS.labels(model=model, kind=kind)


@functools.cache
def _cost(model: str) -> Any:
    return COST.labels(model=model)


def observe_request(
    *,
    model: str,
    status: int,
    prompt_tokens: int,
    completion_tokens: int,
    cost: Decimal | None,
    upstream_s: float | None,
    ttft_ms: int | None,
) -> None:
    model = model or "-"
    _requests(model, str(status)).inc()
    if prompt_tokens:
        _tokens(model, "prompt").inc(prompt_tokens)
    if completion_tokens:
        _tokens(model, "completion").inc(completion_tokens)
    if cost:
        # A float only for the metric's sake; money itself stays Decimal in the rows.
        _cost(model).inc(float(cost))
    if upstream_s is not None:
        UPSTREAM_LATENCY.observe(upstream_s)
    if ttft_ms is not None:
        TTFT.observe(ttft_ms / 1000)
    if status == 401:
        AUTH_FAILURES.inc()
    elif status == 429:
        RATE_LIMITED.labels(code="429").inc()
