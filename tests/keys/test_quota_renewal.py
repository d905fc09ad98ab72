"""Reservations held past their TTL: renewed while the request that holds them runs,
expired once nothing renews them (the request vanished, or its process died).

Both backends. Tests named "in the background" run on the real clock with the
limiter's renewal task, TTLs of a few hundred milliseconds; the others call
`renew(now)` themselves on a controlled clock.
"""

from __future__ import annotations

import asyncio
import gc
import threading
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest
from django.utils import timezone

from keys import reservation_renewal
from keys.limiter import Limiter
from keys.quotas import Demand, QuotaRefused, Reservation, counters_for
from keys.selectors import KeyInfo
from tests.support.redis_server import LimiterBackend, limiter_backend

# The limiter calls the (stubbed) ledger through database_sync_to_async, whose thread
# may hold a connection an earlier test left: database access must be allowed.
pytestmark = pytest.mark.django_db

T0 = datetime(2026, 5, 12, 9, 30, tzinfo=UTC)
ONE = Demand(requests=1)


@pytest.fixture(params=["local", "redis"])
async def renewing(
    request: pytest.FixtureRequest, settings, monkeypatch
) -> AsyncIterator[LimiterBackend]:
    backend = limiter_backend(
        request.param, request, settings, monkeypatch, renew_in_background=True
    )
    yield backend
    await backend.close()


async def reserve(
    limiter: Limiter,
    key: KeyInfo,
    ttl_ms: int,
    now: datetime | None = None,
    demand: Demand = ONE,
) -> Reservation:
    now = now or timezone.now()
    return await limiter.reserve(counters_for(key, now), demand, now, ttl_ms)


async def test_a_held_reservation_keeps_its_room_in_the_background_past_its_ttl(
    renewing,
):
    key = renewing.key([("requests", "total", 1)])
    held = await reserve(renewing.limiter, key, ttl_ms=200)

    await asyncio.sleep(0.5)  # two and a half TTLs

    with pytest.raises(QuotaRefused):
        await reserve(renewing.limiter, key, ttl_ms=200)
    await renewing.limiter.settle(held, ONE, timezone.now())
    assert renewing.limiter.held_count() == 0
    assert await renewing.limiter.peek(counters_for(key, T0), timezone.now()) == [
        (True, 1, 0)
    ]


async def test_a_reservation_its_request_dropped_unsettled_expires_in_the_background(
    renewing,
):
    """A handler that lost its reservation without settling (it crashed past its
    `finally`) must not keep the room for as long as the process lives."""
    key = renewing.key([("requests", "total", 1)])
    await reserve(renewing.limiter, key, ttl_ms=200)  # the result is dropped
    gc.collect()

    await asyncio.sleep(0.4)

    later = await reserve(renewing.limiter, key, ttl_ms=200)
    assert later.states[0].used == 1
    assert renewing.limiter.held_count() == 1


async def test_the_reservations_of_a_dead_process_expire_once_renewals_stop(renewing):
    """The holder runs in a thread with its own event loop, as another web process
    would (on Redis with its own Limiter; in-process it shares this one's memory).
    It holds its reservation for 1.5 s with a 0.6 s TTL, then dies unsettled."""
    key = renewing.key([("requests", "total", 1)])
    holder = Limiter() if renewing.name == "redis" else renewing.limiter
    reserved = threading.Event()

    def process() -> None:
        async def run() -> None:
            held = await reserve(holder, key, ttl_ms=600)
            reserved.set()
            await asyncio.sleep(1.5)
            assert not held.settled
            if holder is not renewing.limiter:
                await holder.aclose()  # killed: its renewals stop

        asyncio.run(run())

    thread = threading.Thread(target=process)
    thread.start()
    await asyncio.to_thread(reserved.wait, 5)
    await asyncio.to_thread(thread.join, 10)

    with pytest.raises(QuotaRefused):  # renewed until it died: still held
        await reserve(renewing.limiter, key, ttl_ms=600)
    await asyncio.sleep(0.7)  # one TTL after the last renewal, at most
    after = await reserve(renewing.limiter, key, ttl_ms=600)
    assert after.states[0].used == 1


@pytest.mark.parametrize("renewing", ["local"], indirect=True)
async def test_another_event_loop_in_the_process_does_not_stop_this_ones_renewals(
    renewing,
):
    """Say a thread runs async code with async_to_sync and reserves meanwhile."""
    mine, other = (renewing.key([("requests", "total", 1)]) for _ in range(2))
    held = await reserve(renewing.limiter, mine, ttl_ms=200)

    async def elsewhere() -> None:
        theirs = await reserve(renewing.limiter, other, ttl_ms=200)
        await asyncio.sleep(0.5)
        await renewing.limiter.settle(theirs, ONE, timezone.now())

    await asyncio.to_thread(asyncio.run, elsewhere())

    with pytest.raises(QuotaRefused):
        await reserve(renewing.limiter, mine, ttl_ms=200)
    assert not held.settled


async def test_renewing_holds_the_room_for_a_ttl_from_the_renewal(backend):
    key = backend.key([("cost_usd", "month", "2.00")])
    full = Demand(cost_micros=2_000_000)
    held = await reserve(backend.limiter, key, ttl_ms=5_000, now=T0, demand=full)

    await backend.limiter.renew(T0 + timedelta(seconds=4))

    with pytest.raises(QuotaRefused):
        await reserve(
            backend.limiter, key, 5_000, T0 + timedelta(milliseconds=8_999), full
        )
    after = await reserve(backend.limiter, key, 5_000, T0 + timedelta(seconds=9), full)
    assert after.states[0].used == 2_000_000
    assert not held.settled


async def test_renewing_does_not_revive_a_reservation_that_has_expired(backend):
    """Expired but not purged yet: its room may already be promised elsewhere."""
    key = backend.key([("tokens", "day", 100)])
    await backend.limiter.reserve(counters_for(key, T0), Demand(tokens=100), T0, 1_000)
    later = T0 + timedelta(seconds=2)

    await backend.limiter.renew(later)

    admitted = await reserve(backend.limiter, key, 1_000, later, Demand(tokens=100))
    assert admitted.states[0].used == 100


async def test_a_settled_reservation_is_no_longer_renewed(backend):
    key = backend.key([("tokens", "day", 100)])
    held = await reserve(backend.limiter, key, 1_000, T0, Demand(tokens=80))
    await backend.limiter.settle(held, Demand(tokens=30), T0)

    await backend.limiter.renew(T0 + timedelta(milliseconds=500))

    assert backend.limiter.held_count() == 0
    peeked = await backend.limiter.peek(counters_for(key, T0), T0)
    assert peeked == [(True, 30, 0)]


@pytest.mark.parametrize("backend", ["redis"], indirect=True)
async def test_renewing_every_held_reservation_is_one_call_to_redis(
    backend, monkeypatch
):
    key = backend.key([("requests", "minute", 1_000), ("tokens", "day", 10**6)])
    held = [await reserve(backend.limiter, key, 60_000, T0) for _ in range(50)]
    calls: list[str] = []
    call = backend.limiter._call

    async def counted(script: str, keys: list[str], args: list) -> object:
        calls.append(script)
        return await call(script, keys, args)

    monkeypatch.setattr(backend.limiter, "_call", counted)

    await backend.limiter.renew(T0 + timedelta(seconds=30))

    assert calls == ["gw_renew"]
    assert len(held) == backend.limiter.held_count() == 50


@pytest.mark.parametrize("backend", ["redis"], indirect=True)
async def test_thousands_in_flight_are_renewed_in_several_short_calls(
    backend, monkeypatch
):
    """A script blocks Redis while it runs: renewals go RENEW_CHUNK at a time."""
    monkeypatch.setattr(reservation_renewal, "RENEW_CHUNK", 20)
    key = backend.key([("requests", "total", 50)])
    held = [await reserve(backend.limiter, key, 1_000, T0) for _ in range(50)]
    calls: list[str] = []
    call = backend.limiter._call

    async def counted(script: str, keys: list[str], args: list) -> object:
        calls.append(script)
        return await call(script, keys, args)

    monkeypatch.setattr(backend.limiter, "_call", counted)

    await backend.limiter.renew(T0 + timedelta(milliseconds=900))

    assert calls == ["gw_renew"] * 3
    with pytest.raises(QuotaRefused):  # every one of the 50 is still held
        await reserve(backend.limiter, key, 1_000, T0 + timedelta(milliseconds=1_500))
    assert len(held) == 50
