"""Quota enforcement: reserve a request's worst case before forwarding, settle to the
actual after, atomically across every process.

Each quota of a key or of its team is a *counter*: a hash of time buckets.
- `minute` and `hour` slide: 1-second and 1-minute buckets, summed over the window.
- `day` and `month` are calendar periods in GATEWAY_BILLING_TZ: one bucket in a
  counter named after the period, so a new period starts from zero.
- `total` is one bucket that never expires.

Amounts are integers: requests, tokens, and cost in micro-USD rounded up, so the
counters never under-count what the ledger (exact to 1e-10 USD) will say.

A reservation is also recorded as pending, with an expiry. While its request runs,
the process that made it renews the expiry (one batched call per event loop, every
half TTL), so a stream may outlive the TTL; a request that is never settled because
its process was killed stops being renewed, and its reservation is removed on expiry
by the next check on that counter. Settling replaces the reserved amount with the
actual one.

Backends: Redis (one Lua script, one round trip for all counters of a request) when
REDIS_URL is set, else an in-process limiter with the same semantics. A counter that
Redis has lost (flush, restart, idle expiry) is rebuilt from the usage ledger
(`keys.quota_ledger`) before it is used again; while the ledger cannot be read,
budgets are refused and rates limited per process, as when Redis is down.
"""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import ROUND_CEILING, Decimal
from typing import Any
from zoneinfo import ZoneInfo

from django.conf import settings

from gateway_project.redis_keys import redis_key
from keys.selectors import KeyInfo, QuotaInfo

MICROS = Decimal(1_000_000)
BUCKET_MS = {"minute": 1_000, "hour": 60_000}
WINDOW_MS = {"minute": 60_000, "hour": 3_600_000}
RATE_PERIODS = frozenset(BUCKET_MS)


@dataclass(frozen=True, slots=True)
class Demand:
    """What one request may use (reserve) or did use (settle)."""

    requests: int = 1
    tokens: int = 0
    cost_micros: int | None = 0  # None: unpriced, cost quotas do not apply.

    def amount(self, metric: str) -> int:
        if metric == "requests":
            return self.requests
        if metric == "tokens":
            return self.tokens
        return self.cost_micros or 0


def epoch_ms(moment: datetime) -> int:
    """Milliseconds since the epoch: the clock counters and reservations use."""
    return int(moment.timestamp() * 1000)


def cost_micros(cost: Decimal) -> int:
    """Micro-USD, rounded up: a counter may refuse a micro-dollar early, never late."""
    return int((cost * MICROS).to_integral_value(rounding=ROUND_CEILING))


@dataclass(frozen=True, slots=True)
class Counter:
    """One quota, as the limiter stores it."""

    # Storage key, e.g. "gw:<namespace>:q:k:12:tokens:minute" or "...:month:2026-11".
    name: str
    quota: QuotaInfo
    owner_id: int
    window_ms: int  # 0: the whole counter counts (calendar period or total).
    bucket_ms: int
    period_start: datetime | None
    period_end: datetime | None  # Calendar periods: when the counter resets.

    @property
    def is_rate(self) -> bool:
        return self.quota.period in RATE_PERIODS

    @property
    def limit(self) -> int:
        if self.quota.metric == "cost_usd":
            return int((self.quota.limit * MICROS).to_integral_value())
        return int(self.quota.limit)

    def bucket(self, now_ms: int) -> int:
        return now_ms - now_ms % self.bucket_ms if self.window_ms else 0

    def ttl_s(self, now: datetime) -> int:
        if self.window_ms:
            return self.window_ms // 1000 + 60
        if self.period_end is not None:
            return int((self.period_end - now).total_seconds()) + 86_400
        return 0  # total: kept until the quota is removed.


def counters_for(
    key: KeyInfo, now: datetime, *, skip_cost: bool = False
) -> list[Counter]:
    zone = ZoneInfo(settings.GATEWAY_BILLING_TZ)
    local = now.astimezone(zone)
    counters = []
    for quota in key.quotas:
        if skip_cost and quota.metric == "cost_usd":
            continue
        owner = key.id if quota.scope == "key" else key.team_id
        if owner is None:
            continue
        name = redis_key("q", quota.scope[0], str(owner), quota.metric, quota.period)
        start = end = None
        if quota.period == "day":
            start = datetime(local.year, local.month, local.day, tzinfo=zone)
            end = datetime.combine(start.date() + timedelta(days=1), start.timetz())
            name += f":{start:%Y-%m-%d}"
        elif quota.period == "month":
            start = datetime(local.year, local.month, 1, tzinfo=zone)
            end = datetime(
                local.year + local.month // 12, local.month % 12 + 1, 1, tzinfo=zone
            )
            name += f":{start:%Y-%m}"
        counters.append(
            Counter(
                name=name,
                quota=quota,
                owner_id=owner,
                window_ms=WINDOW_MS.get(quota.period, 0),
                bucket_ms=BUCKET_MS.get(quota.period, 1),
                period_start=start,
                period_end=end,
            )
        )
    return counters


@dataclass(frozen=True, slots=True)
class CounterState:
    """A counter after a check: its use (reservation included), and when room frees."""

    counter: Counter
    used: int
    reset_s: float


@dataclass
class Reservation:
    id: str
    counters: list[Counter]
    amounts: list[int]
    buckets: list[int]
    states: list[CounterState] = field(default_factory=list)
    settled: bool = False
    # The in-process limiter that holds it, when Redis did not (embedded or fallback).
    local: Any = None
    # How long it holds its room unless renewed (reservation_ttl_ms).
    ttl_ms: int = 0

    @property
    def carries_budget(self) -> bool:
        """Whether a cost quota checks it: such a request is never admitted blind."""
        return any(c.quota.metric == "cost_usd" for c in self.counters)


class QuotaRefused(Exception):
    """A counter has no room for the request."""

    def __init__(self, state: CounterState, states: list[CounterState]) -> None:
        super().__init__(f"{state.counter.quota.metric} quota reached")
        self.state = state
        self.states = states


class QuotaUnavailable(Exception):
    """The shared limiter cannot be reached and the request carries money."""


def reservation_ttl_ms(timeout_s: float) -> int:
    """How long an unsettled reservation holds its room without being renewed: the
    longest a whole answer can take (provider timeout, retries, disconnect grace) and
    a margin. Its process renews it every half of that while the request runs."""
    grace = settings.GATEWAY_DISCONNECT_GRACE_S
    return int(
        (timeout_s * (settings.GATEWAY_UPSTREAM_RETRIES + 1) + grace + 60) * 1000
    )


def new_reservation(
    counters: list[Counter], demand: Demand, now_ms: int, ttl_ms: int
) -> Reservation:
    return Reservation(
        id=uuid.uuid4().hex,
        counters=counters,
        amounts=[demand.amount(c.quota.metric) for c in counters],
        buckets=[c.bucket(now_ms) for c in counters],
        ttl_ms=ttl_ms,
    )


def reset_seconds(
    counter: Counter, oldest_bucket_ms: int | None, now: datetime
) -> float:
    """Seconds until the counter has more room: its oldest bucket leaving the
    window, or its calendar period ending."""
    if counter.window_ms:
        if oldest_bucket_ms is None:
            return 0.0
        now_ms = epoch_ms(now)
        return max(
            0.0,
            (oldest_bucket_ms + counter.window_ms + counter.bucket_ms - now_ms) / 1000,
        )
    if counter.period_end is not None:
        return max(0.0, (counter.period_end - now).total_seconds())
    return math.inf
