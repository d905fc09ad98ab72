"""Sums of money are exact Decimals on every database: the admin index's numbers,
the quota use and spend that the key admin and /v1/usage show.

SQLite keeps a decimal column as a double and sums it as doubles; summed as
doubles, a thousand costs of 0.00045795 USD make 0.457949999999996, which the
admin shows as 0.4579 instead of 0.4580. PostgreSQL sums `numeric` exactly; the
same tests run there (DATABASE_URL) to hold both backends to the same answer.
"""

from __future__ import annotations

import uuid
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from django.urls import reverse
from django.utils import timezone

from keys.dashboard import admin_dashboard
from keys.models import ApiKey
from keys.selectors import (
    key_info_for_secret,
    key_page_stats,
    key_spend,
    quota_usage,
    usage_totals,
)
from keys.services import QuotaSpec
from relay.key_usage import usage_report
from tests import factories
from usage.models import DailyRollup, UsageRow

pytestmark = pytest.mark.django_db

COST = Decimal("0.0004579500")
COUNT = 1000
EXACT = Decimal("0.45795")  # COST * COUNT, which the admin shows as 0.4580
NOW = datetime(2026, 3, 18, 12, 0, tzinfo=UTC)


def usage_row(key: ApiKey, created_at: datetime, **fields: Any) -> UsageRow:
    values: dict[str, Any] = {
        "request_id": f"req-{uuid.uuid4().hex}",
        "created_at": created_at,
        "key": key,
        "key_prefix": key.prefix,
        "team_id": key.team_id,
        "endpoint": "chat.completions",
        "model": "m1",
        "provider": "fake",  # forwarded: quotas and spend count it
        "status_code": 200,
        "prompt_tokens": 10,
        "completion_tokens": 5,
        "usage_source": UsageRow.Source.PROVIDER,
        "cost_usd": COST,
    }
    values.update(fields)
    return UsageRow(**values)


def add_rows(key: ApiKey, created_at: datetime) -> None:
    UsageRow.objects.bulk_create([usage_row(key, created_at) for _ in range(COUNT)])


def test_the_costs_are_ones_whose_float_sum_is_not_exact():
    float_sum = sum(float(COST) for _ in range(COUNT))

    assert COST * COUNT == EXACT
    assert Decimal(repr(float_sum)) != EXACT
    assert f"{Decimal(repr(float_sum)):.4f}" == "0.4579"


def test_the_dashboard_sums_todays_rows_exactly():
    key, _ = factories.make_key()
    add_rows(key, NOW - timedelta(minutes=5))

    board = admin_dashboard(with_keys=True, now=NOW)

    assert board.spend_today == EXACT
    assert board.spend_month == EXACT
    assert [(m.label, m.cost_usd) for m in board.top_models] == [("m1", EXACT)]
    assert [(k.key_id, k.cost_usd) for k in board.top_keys] == [(key.pk, EXACT)]


def test_the_dashboard_sums_rolled_up_days_exactly():
    key, _ = factories.make_key()
    # One line per team of an earlier day of the month: the month's totals come
    # from summing the rollups, not the rows. Team ids need no Team rows.
    DailyRollup.objects.bulk_create(
        DailyRollup(
            day=date(2026, 3, 17),
            key=key,
            team_id=team_id,
            model="m1",
            requests=1,
            cost_usd=COST,
        )
        for team_id in range(1, COUNT + 1)
    )

    board = admin_dashboard(with_keys=True, now=NOW)

    assert board.rolled_up_until == date(2026, 3, 17)
    assert board.spend_today == 0
    assert board.spend_month == EXACT
    assert [(m.label, m.requests, m.cost_usd) for m in board.top_models] == [
        ("m1", COUNT, EXACT)
    ]
    assert [(k.key_id, k.cost_usd) for k in board.top_keys] == [(key.pk, EXACT)]


def test_the_admin_index_shows_the_exact_spend(admin_client):
    key, _ = factories.make_key()
    add_rows(key, timezone.now())

    page = admin_client.get(reverse("admin:index")).content.decode()

    assert "Spend today (USD)<strong>0.4580</strong>" in page
    assert "Spend this month (USD)<strong>0.4580</strong>" in page


def test_quota_use_and_spend_are_exact_sums():
    team = factories.make_team()
    key, _ = factories.make_key(
        team=team, quotas=[QuotaSpec("cost_usd", "month", Decimal(1))]
    )
    add_rows(key, NOW - timedelta(minutes=5))

    spent = key_spend(key_id=key.pk, since=None)
    by_team = usage_totals(scope="team", ids=[team.pk], since=None)
    [use] = quota_usage(key_id=key.pk, team_id=team.pk, now=NOW)
    stats = key_page_stats([key.pk], NOW)

    assert (spent.requests, spent.cost_usd) == (COUNT, EXACT)
    assert by_team[team.pk].cost_usd == EXACT
    assert (use.used, use.remaining) == (EXACT, 1 - EXACT)
    assert stats[key.pk]["spend_usd"] == EXACT


def test_the_usage_endpoint_reports_the_exact_spend_and_quota_use():
    key, secret = factories.make_key(
        quotas=[QuotaSpec("cost_usd", "month", Decimal(1))]
    )
    add_rows(key, NOW - timedelta(minutes=5))
    info = key_info_for_secret(secret)
    assert info is not None

    report = usage_report(info, NOW)

    assert report["spend_usd"] == "0.4579500000"
    [quota] = report["quotas"]
    assert (quota["used"], quota["remaining"]) == ("0.45795", "0.54205")


def test_no_cost_at_all_sums_to_zero():
    key, _ = factories.make_key()
    UsageRow.objects.bulk_create(
        [usage_row(key, NOW - timedelta(minutes=5), cost_usd=None)]
    )

    board = admin_dashboard(with_keys=True, now=NOW)
    spent = key_spend(key_id=key.pk, since=None)

    assert board.spend_today == board.spend_month == 0
    assert board.top_models[0].cost_usd == 0
    assert (spent.requests, spent.cost_usd) == (1, 0)
