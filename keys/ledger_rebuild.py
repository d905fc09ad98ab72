"""Counters rebuilt from the usage ledger, and what happens while it cannot be read.

A counter the limiter does not have (Redis flushed or restarted, a new web process
without Redis, a new period) is rebuilt from the ledger (`keys.quota_ledger`).
While the ledger (the database) does not answer, a counter that carries a budget
is refused (money is never admitted blind) and rates are counted by this process
from zero, as when Redis is down.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime

from channels.db import database_sync_to_async
from django.db import InterfaceError, OperationalError

from keys import quota_ledger
from keys.local_limiter import LocalLimiter
from keys.quotas import Counter, QuotaUnavailable, Reservation
from usage import metrics

logger = logging.getLogger(__name__)

# After the ledger failed to answer, how long counters are not rebuilt from it: a
# dead database is not asked by every request (its connection attempts queue on
# the one thread database_sync_to_async uses). Matches the 503's Retry-After.
LEDGER_RETRY_S = 1.0


class LedgerUnavailable(Exception):
    """The usage ledger (the database) cannot be read to rebuild a counter."""


class LedgerRebuild:
    """Reads what lost counters hold, not asking a database that has just failed."""

    def __init__(self) -> None:
        self._retry_at = 0.0  # time.monotonic() before which it is not asked

    def may_answer(self) -> bool:
        return time.monotonic() >= self._retry_at

    async def spent(
        self, counters: list[Counter], now: datetime
    ) -> list[list[tuple[int, int]]]:
        """What the ledger says the lost counters hold. LedgerUnavailable when the
        database does not answer, and for LEDGER_RETRY_S after, without asking it."""
        if not self.may_answer():
            raise LedgerUnavailable("the usage ledger could not be read just now")
        try:
            return await database_sync_to_async(quota_ledger.spent_many)(counters, now)
        except (OperationalError, InterfaceError) as exc:
            self._retry_at = time.monotonic() + LEDGER_RETRY_S
            logger.warning(
                "usage ledger unreachable: quota counters cannot be rebuilt",
                exc_info=exc,
            )
            raise LedgerUnavailable("the usage ledger cannot be read") from exc

    async def rebuild_local(
        self,
        limiter: LocalLimiter,
        reservation: Reservation,
        lost: list[Counter],
        now: datetime,
    ) -> None:
        """Load the in-process counters `lost` from the ledger, or, while it cannot
        be read, start rate counters from zero (QuotaUnavailable for a budget)."""
        try:
            spent = await self.spent(lost, now)
        except LedgerUnavailable as exc:
            absent = [c for c in lost if not limiter.has(c)]
            if absent and reservation.carries_budget:
                metrics.QUOTA_BACKEND_ERRORS.inc()
                raise QuotaUnavailable("the usage ledger cannot be read") from exc
            # Rates only: this process counts from zero until the ledger answers
            # (a provisional counter that was in use keeps what it has counted).
            for counter in absent:
                limiter.load_provisional(counter, now)
            return
        for counter, amounts in zip(lost, spent, strict=True):
            limiter.load(counter, amounts, now)
