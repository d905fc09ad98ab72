"""A budget rebuilt from the usage ledger holds the exact cost of its rows.

Costs are rounded up to whole micro-USD once, on the exact sum. SQLite keeps a
decimal column as a double and sums it as doubles: 45 costs of 0.15 USD make
6.750000000000005, which rounded up would be one micro-USD over 6.75. PostgreSQL
sums `numeric` exactly; the same tests run there (DATABASE_URL) to hold both to
the same answer.
"""

from __future__ import annotations

import dataclasses
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from keys import quota_ledger
from keys.models import ApiKey
from keys.quotas import counters_for
from tests import factories
from tests.support.redis_server import unit_key
from usage.models import UsageRow

pytestmark = pytest.mark.django_db

COST = Decimal("0.15")
COUNT = 45
EXACT_MICROS = 6_750_000  # COST * COUNT
NOW = datetime(2026, 3, 18, 12, 0, 30, tzinfo=UTC)


def add_rows(key: ApiKey, created_at: datetime) -> None:
    UsageRow.objects.bulk_create(
        UsageRow(
            request_id=f"req-{uuid.uuid4().hex}",
            created_at=created_at,
            key=key,
            key_prefix=key.prefix,
            endpoint="chat.completions",
            model="m1",
            provider="fake",  # forwarded: quotas count it
            status_code=200,
            cost_usd=COST,
        )
        for _ in range(COUNT)
    )


def test_the_costs_are_ones_whose_float_sum_is_over_the_exact_one():
    float_sum = sum(float(COST) for _ in range(COUNT))

    assert COST * COUNT * 1_000_000 == EXACT_MICROS
    assert Decimal(repr(float_sum)) > COST * COUNT


@pytest.mark.parametrize("period", ["hour", "day", "month", "total"])
def test_a_rebuilt_budget_holds_the_exact_cost_of_its_rows(period):
    key, _ = factories.make_key()
    add_rows(key, NOW - timedelta(seconds=20))
    info = dataclasses.replace(unit_key([("cost_usd", period, "100")]), id=key.id)
    [counter] = counters_for(info, NOW)

    spent = quota_ledger.spent(counter, NOW)

    assert sum(amount for _, amount in spent) == EXACT_MICROS
