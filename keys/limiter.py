"""The limiter: reserve and settle quota counters, on Redis or in this process.

`limiter()` is the process's one `Limiter`. Both backends run the same algorithm
(`keys.quotas`): purge expired reservations, sum each counter's window, refuse if
any counter lacks room, else reserve on all of them. With Redis this is one Lua
script (`keys.limiter_scripts`), so it is atomic across processes and costs one
round trip whatever the number of quotas, shared by the requests of one event-loop
iteration (`keys.redis_batches`). Without Redis it is `keys.local_limiter`.
Reservations in flight are renewed by the process that holds them
(`keys.reservation_renewal`).

Redis unreachable: requests carrying a cost budget are refused with 503 (money is
never admitted blind); request and token rates fall back to the in-process limiter
with a share of each limit (`GATEWAY_QUOTA_FALLBACK_SHARE`, the number of web
processes). A counter that must be rebuilt while the usage ledger (the database)
cannot be read is handled the same way (`keys.ledger_rebuild`). Both are counted
in metrics.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime
from typing import Any

from django.conf import settings

from keys.ledger_rebuild import LedgerRebuild, LedgerUnavailable
from keys.limiter_scripts import (
    FAILED,
    MISSING,
    RESERVED,
    connect,
    init_arg,
    peek_args,
    reserve_args,
    settle_args,
)
from keys.local_limiter import LocalLimiter
from keys.quotas import (
    Counter,
    CounterState,
    Demand,
    QuotaRefused,
    QuotaUnavailable,
    Reservation,
    epoch_ms,
    new_reservation,
    reset_seconds,
)
from keys.redis_batches import RedisBatches
from keys.reservation_renewal import ReservationRenewal
from usage import metrics

logger = logging.getLogger(__name__)


class Limiter:
    """Reserve and settle, on Redis when configured, else in this process.

    With Redis, every reservation made in one event-loop iteration goes to Redis in
    one script call (and likewise settlements): one round trip per request at most.
    Renewals are off that path: one call per half TTL for all reservations held.
    """

    def __init__(self, *, renew_in_background: bool = True) -> None:
        self.local = LocalLimiter()
        # Used when Redis is down: rates get a per-process share of their limits.
        self.fallback = LocalLimiter()
        self._clients: dict[asyncio.AbstractEventLoop, Any] = {}
        # Set when a call to Redis fails; the next call that succeeds drops the
        # fallback's counters (see _redis_answered).
        self._redis_failed = False
        self._ledger = LedgerRebuild()

        # Looked up on every call, not bound now: tests wrap `_call` on the
        # instance to see what reaches Redis.
        async def call(script: str, keys: list[str], args: list[Any]) -> Any:
            return await self._call(script, keys, args)

        self._batches = RedisBatches(call)
        # Off for tests on a controlled clock, which call renew() themselves.
        self._renewal = ReservationRenewal(call, in_background=renew_in_background)

    def _redis(self) -> Any:
        loop = asyncio.get_running_loop()
        client = self._clients.get(loop)
        if client is None:
            client = connect(settings.REDIS_URL, settings.GATEWAY_QUOTA_REDIS_TIMEOUT_S)
            self._clients = {loop: client}
            self._batches.forget()
        return client

    async def _call(self, script: str, keys: list[str], args: list[Any]) -> Any:
        client = self._redis()
        try:
            async with asyncio.timeout(settings.GATEWAY_QUOTA_REDIS_TIMEOUT_S):
                reply = await getattr(client, script)(keys=keys, args=args)
        except Exception:
            self._redis_failed = True
            raise
        if self._redis_failed:
            self._redis_answered()
        return reply

    def _redis_answered(self) -> None:
        """Redis answers again after failing: forget what the fallback counted.

        Requests admitted through Redis since are not in those counters, so a later
        outage reusing them would under-count (an hour's window by up to an hour of
        traffic). It rebuilds them from the ledger instead. A fresh instance, not a
        cleared one: a reservation being made on the old one meanwhile finds its
        counters there, and those held on it settle there.
        """
        self._redis_failed = False
        self.fallback = LocalLimiter()

    def _enqueue(
        self, script: str, keys: list[str], args: list[Any], width: int, now: datetime
    ) -> asyncio.Future[list[Any]]:
        self._redis()  # A new event loop's client forgets the old loop's batches.
        return self._batches.add(script, keys, args, width, epoch_ms(now))

    async def reserve(
        self, counters: list[Counter], demand: Demand, now: datetime, ttl_ms: int
    ) -> Reservation:
        """Reserve `demand` on every counter, or on none (QuotaRefused); the
        reservation holds its room for `ttl_ms`, renewed until it is settled."""
        reservation = new_reservation(counters, demand, epoch_ms(now), ttl_ms)
        if not counters:
            return reservation
        if not settings.REDIS_URL:
            await self._reserve_local(self.local, reservation, now, share=1)
        else:
            try:
                await self._reserve_redis(reservation, now)
            except QuotaRefused:
                raise
            except Exception as exc:
                await self._reserve_without_redis(reservation, now, exc)
        self._renewal.hold(reservation)
        return reservation

    async def _reserve_redis(self, reservation: Reservation, now: datetime) -> None:
        counters = reservation.counters
        n = len(counters)
        inits = ["-"] * n
        for _ in range(2):
            args = reserve_args(reservation, now, inits)
            keys = [c.name for c in counters]
            result = await self._enqueue("gw_reserve", keys, args, 2 + 2 * n, now)
            if result[0] == MISSING:  # Counters Redis does not have: rebuild them.
                lost = [
                    c
                    for c, flag in zip(counters, result[2 : 2 + n], strict=True)
                    if flag
                ]
                spent = await self._ledger.spent(lost, now)
                metrics.QUOTA_REBUILDS.inc(len(lost))
                for counter, amounts in zip(lost, spent, strict=True):
                    inits[counters.index(counter)] = init_arg(amounts)
                continue
            if result[0] == FAILED:
                raise RuntimeError(
                    "the quota script failed on one of this key's counters"
                )
            used, oldest = result[2 : 2 + n], result[2 + n : 2 + 2 * n]
            self._outcome(
                reservation,
                result[0] == RESERVED,
                int(result[1]) - 1,
                used,
                oldest,
                now,
            )
            return
        raise RuntimeError("quota counters could not be rebuilt")

    async def _reserve_local(
        self,
        limiter: LocalLimiter,
        reservation: Reservation,
        now: datetime,
        *,
        share: int,
    ) -> None:
        lost = limiter.missing(
            reservation.counters, retry_provisional=self._ledger.may_answer()
        )
        if lost:
            await self._ledger.rebuild_local(limiter, reservation, lost, now)
        limits = [max(c.limit // share, 0) for c in reservation.counters]
        expire_at = epoch_ms(now) + reservation.ttl_ms
        admitted, refused, used, oldest = limiter.reserve_now(
            reservation, expire_at, now, limits
        )
        reservation.local = limiter
        self._outcome(reservation, admitted, refused, used, oldest, now)

    async def _reserve_without_redis(
        self, reservation: Reservation, now: datetime, exc: Exception
    ) -> None:
        metrics.QUOTA_BACKEND_ERRORS.inc()
        # The ledger's failure was logged once when it failed; Redis errors are not.
        ledger = isinstance(exc, LedgerUnavailable)
        store = "usage ledger" if ledger else "quota backend"
        if reservation.carries_budget:
            logger.error(
                "%s unreachable: budgets refused",
                store,
                exc_info=None if ledger else exc,
            )
            raise QuotaUnavailable(f"the {store} cannot be reached") from exc
        logger.warning(
            "%s unreachable: rates limited per process",
            store,
            exc_info=None if ledger else exc,
        )
        share = max(settings.GATEWAY_QUOTA_FALLBACK_SHARE, 1)
        await self._reserve_local(self.fallback, reservation, now, share=share)

    def _outcome(
        self,
        reservation: Reservation,
        admitted: bool,
        refused: int,
        used: list[Any],
        oldest: list[Any],
        now: datetime,
    ) -> None:
        states = []
        for i, counter in enumerate(reservation.counters):
            first = None if oldest[i] is None or int(oldest[i]) < 0 else int(oldest[i])
            states.append(
                CounterState(counter, int(used[i]), reset_seconds(counter, first, now))
            )
        reservation.states = states
        if not admitted:
            reservation.settled = True  # Nothing was reserved.
            raise QuotaRefused(states[refused], states)

    async def settle(
        self, reservation: Reservation, actual: Demand, now: datetime
    ) -> None:
        if reservation.settled or not reservation.counters:
            return
        reservation.settled = True
        self._renewal.release(reservation)
        if reservation.local is not None:
            reservation.local.settle_now(reservation, actual, now)
            return
        args = settle_args(reservation, actual)
        try:
            keys = [c.name for c in reservation.counters]
            await self._enqueue("gw_settle", keys, args, 0, now)
        except Exception:
            # The reservation expires on its own; the ledger rebuilds what is lost.
            metrics.QUOTA_BACKEND_ERRORS.inc()
            logger.warning("quota settlement failed", exc_info=True)

    async def renew(self, now: datetime) -> None:
        """Extend every reservation this event loop holds to `now` plus its TTL: one
        call to Redis for all of them (per RENEW_CHUNK). Expired ones stay expired."""
        await self._renewal.renew(now)

    def held_count(self) -> int:
        """Reservations this process holds and renews (metrics, benchmarks)."""
        return self._renewal.count()

    async def aclose(self) -> None:
        """Stop renewing and close this process's Redis connections."""
        self._renewal.stop()
        for client in self._clients.values():
            await client.aclose()
        self._clients = {}

    async def peek(
        self, counters: list[Counter], now: datetime
    ) -> list[tuple[bool, int, int]]:
        """(known, used, pending reservations) per counter, changing nothing."""
        if not settings.REDIS_URL:
            return self.local.peek(counters, now)
        names = [c.name for c in counters]
        raw = await self._call("gw_peek", names, peek_args(counters, now))
        return [
            (bool(raw[i]), int(raw[i + 1]), int(raw[i + 2]))
            for i in range(0, len(raw), 3)
        ]


_limiter = Limiter()


def limiter() -> Limiter:
    return _limiter


__all__ = ["LedgerUnavailable", "Limiter", "LocalLimiter", "limiter"]
