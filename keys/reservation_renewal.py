"""Reservations in flight, renewed by the process that holds them.

The limiter keeps the reservations it issued and has not settled, per event loop
and weakly: a request that vanished without settling stops holding its room. One
background task per loop renews all of them every half of the shortest TTL among
them, in one call to Redis (per RENEW_CHUNK). A killed process renews nothing, so
its reservations expire on their own.
"""

from __future__ import annotations

import asyncio
import logging
import math
import weakref
from datetime import datetime

from django.utils import timezone

from keys.limiter_scripts import ScriptCall, renew_call
from keys.quotas import Reservation, epoch_ms
from usage import metrics

logger = logging.getLogger(__name__)

# Reservations renewed per script call. A script blocks Redis while it runs (about
# 5 µs per reservation of two counters), so thousands in flight are renewed in
# several calls of a few milliseconds, not one long stall of every other process.
RENEW_CHUNK = 500


class _Held:
    """The reservations one event loop's requests hold, and the task renewing them.

    Weak references: a reservation whose request dropped it without settling (a
    handler that crashed past its `finally`) is no longer renewed and expires.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.reservations: weakref.WeakValueDictionary[str, Reservation] = (
            weakref.WeakValueDictionary()
        )
        self.renewer: asyncio.Task[None] | None = None
        self.wake = asyncio.Event()
        self.next_renewal = math.inf  # Loop time the renewer wakes at.

    def period_s(self) -> float | None:
        """Half the shortest TTL held: each is renewed before half its TTL passes."""
        ttls = [r.ttl_ms for r in list(self.reservations.values())]
        return min(ttls) / 2000 if ttls else None


class ReservationRenewal:
    """The reservations held, per event loop, and their renewal.

    `in_background` off is for tests on a controlled clock, which call `renew()`
    themselves.
    """

    def __init__(self, call: ScriptCall, *, in_background: bool) -> None:
        self._call = call
        self._in_background = in_background
        # Per event loop: a process has one, but a second one (async_to_sync in a
        # thread) must not stop the first's renewals.
        self._held: dict[asyncio.AbstractEventLoop, _Held] = {}

    def hold(self, reservation: Reservation) -> None:
        """Renew `reservation` until it is released (or dropped)."""
        held = self._held_here()
        held.reservations[reservation.id] = reservation
        if not self._in_background:
            return
        if held.renewer is None or held.renewer.done():
            held.renewer = held.loop.create_task(self._renew_while_held(held))
        elif held.loop.time() + reservation.ttl_ms / 2000 < held.next_renewal:
            held.wake.set()  # Due before the renewer wakes: let it wake sooner.

    def release(self, reservation: Reservation) -> None:
        for held in list(self._held.values()):  # Other loops run in other threads.
            held.reservations.pop(reservation.id, None)

    def count(self) -> int:
        return sum(len(held.reservations) for held in list(self._held.values()))

    def stop(self) -> None:
        """Stop renewing, and forget what is held."""
        held, self._held = self._held, {}
        for renewals in held.values():
            if renewals.renewer is not None:
                renewals.renewer.cancel()

    async def renew(self, now: datetime) -> None:
        """Extend every reservation this event loop holds to `now` plus its TTL: one
        call to Redis for all of them (per RENEW_CHUNK). Expired ones stay expired."""
        held = self._held.get(asyncio.get_running_loop())
        if held is None:
            return
        on_redis = []
        for reservation in list(held.reservations.values()):
            if reservation.settled:
                continue
            if reservation.local is not None:
                expire_at = epoch_ms(now) + reservation.ttl_ms
                reservation.local.renew_now(reservation, expire_at, now)
            else:
                on_redis.append(reservation)
        for start in range(0, len(on_redis), RENEW_CHUNK):
            keys, args = renew_call(on_redis[start : start + RENEW_CHUNK], now)
            await self._call("gw_renew", keys, args)

    def _held_here(self) -> _Held:
        loop = asyncio.get_running_loop()
        held = self._held.get(loop)
        if held is None:
            # What a closed loop held died with it, as a killed process's
            # reservations do, and expires on its own.
            for closed in [other for other in list(self._held) if other.is_closed()]:
                del self._held[closed]
            held = self._held[loop] = _Held(loop)
        return held

    async def _renew_while_held(self, held: _Held) -> None:
        """Renew everything held each half of the shortest TTL held; end when
        nothing is held (the next reservation starts a new task)."""
        while (period_s := held.period_s()) is not None:
            held.next_renewal = held.loop.time() + period_s
            held.wake.clear()
            if await _woken_before(held.wake, held.next_renewal):
                continue  # A shorter TTL arrived: sleep for its period instead.
            try:
                await self.renew(timezone.now())
            except Exception:
                # Those reservations may expire; their settlements still count.
                metrics.QUOTA_BACKEND_ERRORS.inc()
                logger.warning("quota reservations could not be renewed", exc_info=True)
        held.next_renewal = math.inf


async def _woken_before(wake: asyncio.Event, when: float) -> bool:
    """Whether `wake` is set before the loop time `when`."""
    try:
        async with asyncio.timeout_at(when):
            await wake.wait()
    except TimeoutError:
        return False
    return True
