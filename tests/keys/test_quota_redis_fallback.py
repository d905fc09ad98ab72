"""Rates counted in this process while Redis is down, over two outages.

Redis is a private redis-server (tests/support/redis_server.py) that the test kills
and starts again, empty, on the same port. The usage ledger is a stub that says
what was admitted so far, as the spool would have recorded it. Each process's
share of a limit is the whole limit here (GATEWAY_QUOTA_FALLBACK_SHARE=1), so the
counts are the limit's.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime

import pytest

from keys import quota_ledger
from keys.quotas import Counter, Demand, QuotaRefused, counters_for, epoch_ms
from keys.selectors import KeyInfo
from tests.support.redis_server import LimiterBackend, PrivateRedis, start_private_redis

# The limiter calls the (stubbed) ledger through database_sync_to_async, whose thread
# may hold a connection an earlier test left: database access must be allowed.
pytestmark = pytest.mark.django_db

T0 = datetime(2026, 5, 12, 9, 30, tzinfo=UTC)
TTL_MS = 600_000


class Ledger:
    """Stands in for `quota_ledger.spent_many`: `requests` admitted in T0's bucket."""

    def __init__(self) -> None:
        self.requests = 0

    def __call__(
        self, counters: list[Counter], now: datetime
    ) -> list[list[tuple[int, int]]]:
        return [
            [(c.bucket(epoch_ms(now)), self.requests)] if self.requests else []
            for c in counters
        ]


@dataclass
class Outages:
    redis: PrivateRedis
    backend: LimiterBackend
    ledger: Ledger

    def kill_redis(self) -> None:
        self.redis.kill()

    def restart_redis(self) -> None:
        self.redis.stop()
        self.redis = start_private_redis(port=self.redis.port)


@pytest.fixture
async def outages(settings, monkeypatch) -> AsyncIterator[Outages]:
    redis_server = start_private_redis()
    settings.REDIS_URL = redis_server.redis_url
    settings.GATEWAY_QUOTA_FALLBACK_SHARE = 1
    settings.GATEWAY_QUOTA_REDIS_TIMEOUT_S = 0.3  # bounds a call that hangs
    ledger = Ledger()
    monkeypatch.setattr(quota_ledger, "spent_many", ledger)
    outages = Outages(redis_server, LimiterBackend("redis", None), ledger)
    yield outages
    await outages.backend.close()
    outages.redis.stop()


async def admitted_count(backend: LimiterBackend, key: KeyInfo, tries: int) -> int:
    admitted = 0
    for _ in range(tries):
        try:
            await backend.limiter.reserve(counters_for(key, T0), Demand(), T0, TTL_MS)
        except QuotaRefused:
            continue
        admitted += 1
    return admitted


async def test_a_second_outage_counts_what_redis_admitted_since_the_first(outages):
    """The fallback's counters of the first outage do not hold the requests admitted
    through Redis in between: the second outage starts from the ledger instead."""
    key = outages.backend.key([("requests", "hour", 10)])
    outages.kill_redis()
    first_outage = await admitted_count(outages.backend, key, tries=2)
    outages.ledger.requests = 2

    outages.restart_redis()  # empty: its counter is rebuilt from the ledger
    redis_back = await admitted_count(outages.backend, key, tries=5)
    outages.ledger.requests = 7
    outages.kill_redis()
    second_outage = await admitted_count(outages.backend, key, tries=4)

    assert (first_outage, redis_back) == (2, 5)
    assert second_outage == 10 - 7
