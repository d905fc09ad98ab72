"""The limiter's reservations: reserve the worst case, settle to the actual, expire
when never settled; atomic when many callers share a counter.

Each test runs on both backends (in-process, and Redis with its Lua script) with a
controlled clock. The usage ledger is an empty stub here.
"""

from __future__ import annotations

import asyncio
import threading
from datetime import UTC, datetime, timedelta

import pytest
import redis

from keys.limiter import Limiter
from keys.quotas import Demand, QuotaRefused, Reservation, counters_for
from keys.selectors import KeyInfo
from tests.support.redis_server import LimiterBackend, limiter_backend

# The limiter calls the (stubbed) ledger through database_sync_to_async, whose thread
# may hold a connection an earlier test left: database access must be allowed.
pytestmark = pytest.mark.django_db

T0 = datetime(2026, 5, 12, 9, 30, tzinfo=UTC)
LONG_TTL_MS = 3_600_000


async def reserve(
    backend: LimiterBackend,
    key: KeyInfo,
    demand: Demand,
    now: datetime,
    ttl_ms: int = LONG_TTL_MS,
) -> Reservation:
    return await backend.limiter.reserve(counters_for(key, now), demand, now, ttl_ms)


async def peek(
    backend: LimiterBackend, key: KeyInfo, now: datetime
) -> list[tuple[bool, int, int]]:
    return await backend.limiter.peek(counters_for(key, now), now)


async def test_settling_replaces_the_reserved_worst_case_with_the_actual_use(backend):
    key = backend.key([("tokens", "total", 1000)])
    reservation = await reserve(backend, key, Demand(tokens=400), T0)
    while_running = await peek(backend, key, T0)

    await backend.limiter.settle(reservation, Demand(tokens=150), T0)

    assert while_running == [(True, 400, 1)]
    assert await peek(backend, key, T0) == [(True, 150, 0)]
    assert reservation.states[0].used == 400


async def test_settling_twice_counts_the_request_once(backend):
    key = backend.key([("tokens", "total", 1000)])
    reservation = await reserve(backend, key, Demand(tokens=400), T0)

    await backend.limiter.settle(reservation, Demand(tokens=150), T0)
    await backend.limiter.settle(reservation, Demand(tokens=150), T0)

    assert await peek(backend, key, T0) == [(True, 150, 0)]


async def test_an_unsettled_reservation_frees_its_room_when_it_expires(backend):
    key = backend.key([("cost_usd", "month", "2.00")])
    await reserve(backend, key, Demand(cost_micros=2_000_000), T0, ttl_ms=5_000)

    before_expiry = T0 + timedelta(milliseconds=4_999)
    with pytest.raises(QuotaRefused):
        await reserve(backend, key, Demand(cost_micros=1), before_expiry)
    after = await reserve(
        backend, key, Demand(cost_micros=2_000_000), T0 + timedelta(seconds=5)
    )

    assert after.states[0].used == 2_000_000  # the new reservation alone
    assert await peek(backend, key, T0 + timedelta(seconds=5)) == [(True, 2_000_000, 1)]


async def test_a_burst_of_abandoned_reservations_leaves_none_outstanding(backend):
    key = backend.key([("tokens", "minute", 10_000), ("requests", "total", 1_000)])
    reservations = [
        await reserve(backend, key, Demand(tokens=100), T0, ttl_ms=2_000)
        for _ in range(40)
    ]
    for reservation in reservations[::2]:  # half finish, half are abandoned
        await backend.limiter.settle(reservation, Demand(tokens=10), T0)
    while_held = await peek(backend, key, T0)

    later = T0 + timedelta(seconds=2)
    with pytest.raises(QuotaRefused):  # any check purges what has expired
        await reserve(backend, key, Demand(tokens=20_000), later)

    assert while_held == [(True, 20 * 10 + 20 * 100, 20), (True, 40, 20)]
    assert await peek(backend, key, later) == [(True, 20 * 10, 0), (True, 20, 0)]


async def test_a_settlement_after_expiry_still_counts_what_was_spent(backend):
    key = backend.key([("tokens", "day", 1_000)])
    slow = await reserve(backend, key, Demand(tokens=500), T0, ttl_ms=1_000)
    later = T0 + timedelta(seconds=30)
    await reserve(backend, key, Demand(tokens=100), later)  # purges `slow`

    await backend.limiter.settle(slow, Demand(tokens=300), later)

    assert await peek(backend, key, later) == [(True, 100 + 300, 1)]


async def test_a_settlement_after_its_window_has_passed_changes_nothing(backend):
    key = backend.key([("tokens", "minute", 1_000)])
    reservation = await reserve(backend, key, Demand(tokens=5), T0)
    later = T0 + timedelta(minutes=2)

    await backend.limiter.settle(reservation, Demand(tokens=900), later)

    assert (await peek(backend, key, later))[0][1] == 0
    assert (await reserve(backend, key, Demand(tokens=1_000), later)).states[
        0
    ].used == 1_000


async def test_a_refused_request_reserves_nothing_on_any_of_its_counters(backend):
    key = backend.key([("requests", "minute", 10), ("tokens", "total", 100)])
    await reserve(backend, key, Demand(tokens=60), T0)

    with pytest.raises(QuotaRefused) as refused:
        await reserve(backend, key, Demand(tokens=41), T0)

    assert refused.value.state.counter.quota.metric == "tokens"
    assert [s.used for s in refused.value.states] == [1, 60]
    assert await peek(backend, key, T0) == [(True, 1, 1), (True, 60, 1)]


async def test_a_request_that_fits_exactly_is_admitted(backend):
    key = backend.key([("tokens", "total", 100)])
    await reserve(backend, key, Demand(tokens=60), T0)

    last = await reserve(backend, key, Demand(tokens=40), T0)

    assert last.states[0].used == 100


async def test_an_amount_of_zero_passes_a_counter_that_is_full(backend):
    key = backend.key([("cost_usd", "month", "0")])

    admitted = await reserve(backend, key, Demand(cost_micros=0), T0)

    assert admitted.states[0].used == 0
    with pytest.raises(QuotaRefused):
        await reserve(backend, key, Demand(cost_micros=1), T0)


@pytest.mark.parametrize("backend", ["local"], indirect=True)
async def test_the_in_process_limiter_keeps_no_trace_of_settled_reservations(backend):
    """Expiries are kept in a heap that settled reservations leave stale entries in;
    it is compacted, so memory follows the reservations in flight, not the traffic."""
    key = backend.key([("tokens", "day", 10**9)])
    await reserve(backend, key, Demand(tokens=1), T0)  # in flight throughout
    for _ in range(1_000):
        done = await reserve(backend, key, Demand(tokens=5), T0)
        await backend.limiter.settle(done, Demand(tokens=2), T0)

    [counter] = counters_for(key, T0)
    state = backend.limiter.local._counters[counter.name]
    assert len(state.pending) == 1
    assert len(state.expiries) <= 2 * 1 + 8
    assert await peek(backend, key, T0) == [(True, 1 + 2_000, 1)]


@pytest.mark.parametrize(
    "backend",
    [
        "local",
        "redis",
    ],
    indirect=True,
)
async def test_an_expired_reservation_of_nothing_leaves_its_counter_usable(backend):
    """A reservation may carry 0 on a counter: a request with an empty prompt and
    max_tokens 0 on a tokens quota, an embedding of "" on a budget."""
    key = backend.key([("cost_usd", "month", "1.00")])
    await reserve(backend, key, Demand(cost_micros=0), T0, ttl_ms=1_000)

    later = await reserve(
        backend, key, Demand(cost_micros=5), T0 + timedelta(seconds=2)
    )

    assert later.states[0].used == 5


async def test_concurrent_reservations_on_one_counter_admit_exactly_its_limit(backend):
    key = backend.key([("requests", "minute", 10)])

    async def one() -> bool:
        try:
            await reserve(backend, key, Demand(requests=1), T0)
        except QuotaRefused:
            return False
        return True

    results = await asyncio.gather(*(one() for _ in range(100)))

    assert results.count(True) == 10
    assert await peek(backend, key, T0) == [(True, 10, 10)]


def test_limiters_in_parallel_threads_sharing_redis_admit_exactly_the_limit(
    request, settings, monkeypatch
):
    """Four Limiter instances, each with its own event loop and connection, as
    four web processes would have, race for one counter."""
    owner = limiter_backend("redis", request, settings, monkeypatch)
    key = owner.key([("cost_usd", "month", "0.000025")])  # 25 micro-USD
    admitted: list[int] = []
    start = threading.Barrier(4)

    def process() -> None:
        limiter = Limiter()

        async def run() -> None:
            counters = counters_for(key, T0)
            start.wait()
            for _ in range(30):
                try:
                    await limiter.reserve(counters, Demand(cost_micros=1), T0, 60_000)
                except QuotaRefused:
                    continue
                admitted.append(1)
            await limiter.aclose()

        asyncio.run(run())

    threads = [threading.Thread(target=process) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    asyncio.run(owner.close())

    assert len(admitted) == 25


@pytest.mark.parametrize("backend", ["redis"], indirect=True)
async def test_one_broken_counter_does_not_fail_other_keys_checks_made_at_the_same_time(
    backend,
):
    healthy = backend.key([("cost_usd", "month", "1.00")])
    broken = backend.key([("cost_usd", "month", "1.00")])
    with redis.Redis.from_url(backend.redis_url) as client:
        client.set(counters_for(broken, T0)[0].name, "not a hash")  # corrupted
    await reserve(backend, healthy, Demand(cost_micros=1), T0)  # the counter exists

    results = await asyncio.gather(
        reserve(backend, healthy, Demand(cost_micros=5), T0),
        reserve(backend, broken, Demand(cost_micros=5), T0),
        return_exceptions=True,
    )
    held = await peek(backend, healthy, T0)

    assert isinstance(results[0], Reservation)
    assert held == [(True, 6, 2)]
