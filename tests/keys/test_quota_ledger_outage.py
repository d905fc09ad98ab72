"""Counters that must be rebuilt from the usage ledger while the database is down.

The ledger's query is replaced by a stub that raises django.db.OperationalError
while "down" (what Django raises when PostgreSQL does not answer), else returns
what it was told was spent. Both backends: with Redis the counter is missing from
Redis; in-process, from the process's memory (a new process, a new period).

The policy is the one for a Redis outage: budgets are refused (503), rates are
enforced by this process alone, from zero, with its share of each limit.
"""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from django.db import OperationalError, ProgrammingError

from keys import ledger_rebuild, quota_ledger
from keys.quotas import (
    Counter,
    Demand,
    QuotaRefused,
    QuotaUnavailable,
    Reservation,
    counters_for,
)
from keys.selectors import KeyInfo
from tests.support.redis_server import LimiterBackend

pytestmark = pytest.mark.django_db

T0 = datetime(2026, 5, 12, 9, 30, tzinfo=UTC)
TTL_MS = 600_000
ONE_REQUEST = Demand()


class Ledger:
    """Stands in for `quota_ledger.spent_many`: down, or the amounts spent."""

    def __init__(self) -> None:
        self.down = True
        self.spent: dict[str, list[tuple[int, int]]] = {}  # by metric
        self.queries = 0

    def __call__(
        self, counters: list[Counter], now: datetime
    ) -> list[list[tuple[int, int]]]:
        self.queries += 1
        if self.down:
            raise OperationalError("connection to server at 127.0.0.1 failed")
        return [self.spent.get(c.quota.metric, []) for c in counters]


@pytest.fixture
def ledger(monkeypatch) -> Ledger:
    ledger = Ledger()
    monkeypatch.setattr(quota_ledger, "spent_many", ledger)
    return ledger


@pytest.fixture
def retry_at_once(monkeypatch) -> None:
    """Ask the ledger again on the next check instead of a second later."""
    monkeypatch.setattr(ledger_rebuild, "LEDGER_RETRY_S", 0.0)


async def reserve(
    backend: LimiterBackend, key: KeyInfo, demand: Demand = ONE_REQUEST
) -> Reservation:
    return await backend.limiter.reserve(counters_for(key, T0), demand, T0, TTL_MS)


async def admitted_count(backend: LimiterBackend, key: KeyInfo, tries: int) -> int:
    admitted = 0
    for _ in range(tries):
        try:
            await reserve(backend, key)
        except QuotaRefused:
            continue
        admitted += 1
    return admitted


async def test_a_budget_that_must_be_rebuilt_is_refused_while_the_ledger_is_down(
    backend, ledger, retry_at_once
):
    key = backend.key([("cost_usd", "month", "1.00"), ("requests", "minute", 10)])
    demand = Demand(cost_micros=300_000)

    with pytest.raises(QuotaUnavailable):
        await reserve(backend, key, demand)
    ledger.down, ledger.spent = False, {"cost_usd": [(0, 600_000)]}
    admitted = await reserve(backend, key, demand)

    assert [s.used for s in admitted.states] == [900_000, 1]  # nothing left behind
    with pytest.raises(QuotaRefused):
        await reserve(backend, key, demand)


@pytest.mark.parametrize(
    ("backend", "share"), [("local", 1), ("redis", 2)], indirect=["backend"]
)
async def test_rates_are_limited_by_this_process_from_zero_while_the_ledger_is_down(
    backend, share, ledger, settings
):
    """With Redis, several processes share the limit: each gets its share, as when
    Redis is down. In-process, the process is the only one and gets all of it."""
    settings.GATEWAY_QUOTA_FALLBACK_SHARE = 2
    key = backend.key([("requests", "minute", 4), ("tokens", "month", 10**6)])

    admitted = await admitted_count(backend, key, tries=6)

    assert admitted == 4 // share


async def test_rate_counters_are_rebuilt_from_the_ledger_once_it_answers_again(
    backend, ledger, retry_at_once
):
    key = backend.key([("requests", "total", 5)])
    while_down = await reserve(backend, key)
    ledger.down, ledger.spent = False, {"requests": [(0, 3)]}  # settled meanwhile

    rebuilt = await reserve(backend, key)

    assert while_down.states[0].used == 1
    assert rebuilt.states[0].used == 3 + 1
    assert await admitted_count(backend, key, tries=3) == 1


async def test_a_dead_database_is_asked_at_most_once_a_second(backend, ledger):
    key = backend.key([("cost_usd", "month", "1.00")])

    for _ in range(5):
        with pytest.raises(QuotaUnavailable):
            await reserve(backend, key, Demand(cost_micros=1))

    assert ledger.queries == 1


async def test_a_query_error_that_is_not_an_outage_is_not_hidden(backend, monkeypatch):
    def broken(counters: list[Counter], now: datetime) -> list[list[tuple[int, int]]]:
        raise ProgrammingError('column "cost_usd" does not exist')

    monkeypatch.setattr(quota_ledger, "spent_many", broken)
    key = backend.key([("requests", "minute", 4)])

    with pytest.raises(ProgrammingError):
        await reserve(backend, key)
