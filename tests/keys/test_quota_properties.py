"""The limiter's arithmetic against a reference model (hypothesis).

Random sequences of reserve / settle / renew / advance-the-clock run on the limiter
(both backends) and on `Reference`: a plain list of (time, amounts, expiry,
settled?) events, from which a counter's use is recomputed from scratch each time:

- an event counts on a counter while its bucket is in the counter's window (sliding
  periods) or it belongs to the counter's calendar period (same counter name);
- a settled event counts its actual amounts; an unsettled one its reserved amounts
  until it expires, then nothing;
- renewing (what the limiter's background task does while requests run) moves the
  expiry of every unsettled, unexpired event to now + its TTL; an expired one stays
  expired;
- a request is admitted iff every counter has room for its (non-zero) amount, and
  then it is reserved on all of them, else on none.

Expiries, settlements and renewals in any order exercise the in-process limiter's
heap of expiries (stale entries, compaction) against the same model as Redis.

The limiter must take the same decisions, report the same use, and list the same
reservations as pending.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from django.test import override_settings
from hypothesis import HealthCheck, example, given, note
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from keys.quotas import Counter, Demand, QuotaRefused, Reservation, counters_for
from keys.selectors import KeyInfo
from tests.support.redis_server import LimiterBackend

# The limiter calls the (stubbed) ledger through database_sync_to_async, whose thread
# may hold a connection an earlier test left: database access must be allowed.
pytestmark = pytest.mark.django_db

QUOTAS = [
    ("requests", "minute"),
    ("requests", "total"),
    ("tokens", "minute"),
    ("tokens", "hour"),
    ("tokens", "day"),
    ("cost_usd", "day"),
    ("cost_usd", "month"),
]
STARTS = [
    datetime(2026, 5, 12, 9, 30, tzinfo=UTC),
    datetime(2026, 5, 12, 9, 30, 59, 750_000, tzinfo=UTC),  # inside a second
    datetime(2026, 1, 31, 23, 59, 30, tzinfo=UTC),  # a day and a month end soon
    datetime(2026, 11, 1, 5, 59, tzinfo=UTC),  # New York's 25-hour day
]
STEPS_MS = [0, 1, 499, 999, 1_000, 30_000, 59_999, 60_000, 61_000, 3_600_000]


@dataclass(frozen=True)
class Reserve:
    requests: int
    tokens: int
    cost_micros: int
    ttl_ms: int

    @property
    def demand(self) -> Demand:
        return Demand(self.requests, self.tokens, self.cost_micros)


@dataclass(frozen=True)
class Settle:
    which: int  # index into the admitted reservations, modulo their number
    requests: int
    tokens: int
    cost_micros: int

    @property
    def demand(self) -> Demand:
        return Demand(self.requests, self.tokens, self.cost_micros)


@dataclass(frozen=True)
class Advance:
    ms: int


@dataclass(frozen=True)
class Renew:
    pass


@dataclass
class Event:
    names: list[str]
    buckets: list[int]
    reserved: list[int]
    expire_at_ms: int
    ttl_ms: int
    actual: list[int] | None = None


@dataclass
class Reference:
    events: list[Event] = field(default_factory=list)

    def used(self, counters: list[Counter], now_ms: int) -> list[int]:
        return [self._used(i, c, now_ms) for i, c in enumerate(counters)]

    def _used(self, i: int, counter: Counter, now_ms: int) -> int:
        total = 0
        for event in self.events:
            if event.names[i] != counter.name:
                continue
            if counter.window_ms and (
                event.buckets[i] + counter.bucket_ms <= now_ms - counter.window_ms
            ):
                continue
            if event.actual is not None:
                total += event.actual[i]
            elif event.expire_at_ms > now_ms:
                total += event.reserved[i]
        return total

    def renew(self, now_ms: int) -> None:
        for event in self.events:
            if event.actual is None and event.expire_at_ms > now_ms:
                event.expire_at_ms = max(event.expire_at_ms, now_ms + event.ttl_ms)

    def pending(self, counters: list[Counter], now_ms: int) -> list[int]:
        return [
            sum(
                1
                for e in self.events
                if e.names[i] == c.name and e.actual is None and e.expire_at_ms > now_ms
            )
            for i, c in enumerate(counters)
        ]


def ms(now: datetime) -> int:
    return int(now.timestamp() * 1000)


quota_sets = st.lists(
    st.tuples(st.sampled_from(QUOTAS), st.integers(0, 30)),
    min_size=1,
    max_size=3,
    unique_by=lambda q: q[0],
)


Operation = Reserve | Settle | Renew | Advance


def operations(least: int) -> st.SearchStrategy[list[Operation]]:
    """Reserve / settle / renew / advance sequences; amounts reserved are at least
    `least`."""
    return st.lists(
        st.one_of(
            st.builds(
                Reserve,
                requests=st.integers(least, 2),
                tokens=st.integers(least, 12),
                cost_micros=st.integers(least, 12),
                ttl_ms=st.sampled_from([500, 1_000, 5_000, 60_000, 600_000]),
            ),
            st.builds(
                Settle,
                which=st.integers(0, 50),
                requests=st.integers(0, 1),
                tokens=st.integers(0, 15),
                cost_micros=st.integers(0, 15),
            ),
            st.just(Renew()),
            st.builds(
                Advance,
                ms=st.one_of(st.sampled_from(STEPS_MS), st.integers(0, 90_000)),
            ),
        ),
        max_size=40,
    )


def make_key(
    backend: LimiterBackend, quotas: list[tuple[tuple[str, str], int]]
) -> KeyInfo:
    return backend.key(
        (
            metric,
            period,
            Decimal(limit).scaleb(-6) if metric == "cost_usd" else limit,
        )
        for (metric, period), limit in quotas
    )


PROPERTY_SETTINGS = hypothesis_settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


# A reservation renewed past its first expiry, then expiring one TTL after that.
RENEWED = [
    Reserve(1, 6, 1, 500),
    Advance(400),
    Renew(),
    Advance(400),
    Reserve(1, 5, 1, 500),  # refused: the first still holds 6 of 10
    Advance(200),
    Reserve(1, 5, 1, 500),  # admitted: the first expired at 900 ms
]
# Settlements leave stale heap entries until the heap is compacted; the first
# reservation outlives the compaction and must still expire on time.
CHURN = [
    Reserve(1, 1, 1, 60_000),
    *(
        op
        for i in range(1, 13)
        for op in (Reserve(1, 1, 1, 60_000), Settle(i, 1, 0, 0))
    ),
    Advance(60_000),
    Reserve(1, 1, 1, 500),
]


@PROPERTY_SETTINGS
@given(
    quotas=quota_sets,
    start=st.sampled_from(STARTS),
    zone=st.sampled_from(["UTC", "America/New_York"]),
    ops=operations(least=1),
)
@example(quotas=[(("tokens", "day"), 10)], start=STARTS[0], zone="UTC", ops=RENEWED)
@example(quotas=[(("tokens", "day"), 30)], start=STARTS[0], zone="UTC", ops=CHURN)
async def test_the_limiter_agrees_with_a_reference_model_of_its_counters(
    backend, quotas, start, zone, ops
):
    await check_against_reference(backend, quotas, start, zone, ops)


@pytest.mark.parametrize(
    "backend",
    [
        "local",
        "redis",
    ],
    indirect=True,
)
@PROPERTY_SETTINGS
@given(
    quotas=quota_sets,
    start=st.sampled_from(STARTS),
    zone=st.sampled_from(["UTC", "America/New_York"]),
    ops=operations(least=0),
)
@example(
    quotas=[(("cost_usd", "month"), 10)],
    start=STARTS[0],
    zone="UTC",
    ops=[Reserve(1, 0, 0, 500), Advance(1_000), Reserve(1, 0, 5, 500)],
)
async def test_reservations_of_nothing_agree_with_the_reference_model_too(
    backend, quotas, start, zone, ops
):
    await check_against_reference(backend, quotas, start, zone, ops)


async def check_against_reference(
    backend: LimiterBackend,
    quotas: list[tuple[tuple[str, str], int]],
    start: datetime,
    zone: str,
    ops: list[Operation],
) -> None:
    key = make_key(backend, quotas)
    limiter, reference = backend.limiter, Reference()
    admitted: list[tuple[Reservation, Event]] = []
    now = start
    with override_settings(GATEWAY_BILLING_TZ=zone):
        for op in ops:
            note(f"{now.isoformat()} {op}")
            if isinstance(op, Advance):
                now += timedelta(milliseconds=op.ms)
            elif isinstance(op, Renew):
                await limiter.renew(now)
                reference.renew(ms(now))
            elif isinstance(op, Settle):
                if admitted:
                    reservation, event = admitted[op.which % len(admitted)]
                    await limiter.settle(reservation, op.demand, now)
                    if event.actual is None:
                        event.actual = [
                            op.demand.amount(c.quota.metric)
                            for c in reservation.counters
                        ]
            else:
                admitted += await reserve_and_compare(limiter, reference, key, op, now)


async def reserve_and_compare(
    limiter: Any, reference: Reference, key: KeyInfo, op: Reserve, now: datetime
) -> list[tuple[Reservation, Event]]:
    counters = counters_for(key, now)
    amounts = [op.demand.amount(c.quota.metric) for c in counters]
    used = reference.used(counters, ms(now))
    fits = all(
        a == 0 or u + a <= c.limit
        for a, u, c in zip(amounts, used, counters, strict=True)
    )
    made: list[tuple[Reservation, Event]] = []

    try:
        reservation = await limiter.reserve(counters, op.demand, now, op.ttl_ms)
    except QuotaRefused as refused:
        assert not fits, f"refused with room: used {used}, amounts {amounts}"
        assert [s.used for s in refused.states] == used
    else:
        assert fits, f"admitted without room: used {used}, amounts {amounts}"
        assert [s.used for s in reservation.states] == [
            u + a for u, a in zip(used, amounts, strict=True)
        ]
        event = Event(
            names=[c.name for c in counters],
            buckets=[c.bucket(ms(now)) for c in counters],
            reserved=amounts,
            expire_at_ms=ms(now) + op.ttl_ms,
            ttl_ms=op.ttl_ms,
        )
        reference.events.append(event)
        made.append((reservation, event))

    peeked = await limiter.peek(counters, now)
    assert [p[1] for p in peeked] == reference.used(counters, ms(now))
    assert [p[2] for p in peeked] == reference.pending(counters, ms(now))
    return made
