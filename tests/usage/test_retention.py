"""Retention: old ledger rows are pruned in batches by whole billing days, and no
report, export or later rollup changes because of it."""

from __future__ import annotations

import io
import uuid
from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest
from django.contrib.auth.models import Group, User
from django.core.management import call_command
from django.utils import timezone
from rest_framework.test import APIClient

from keys.models import ApiKey
from keys.roles import FINANCE_GROUP
from tests import factories
from usage.models import DailyRollup, UsageRow
from usage.retention import prune_usage
from usage.rollups import billing_day, day_bounds
from usage.tasks import prune_usage as prune_usage_task

pytestmark = pytest.mark.django_db


def rows_on(key: ApiKey, days_ago: int, count: int, cost: str = "0.25") -> None:
    day = billing_day(timezone.now()) - timedelta(days=days_ago)
    noon = day_bounds(day)[0] + timedelta(hours=12)
    UsageRow.objects.bulk_create(
        [
            UsageRow(
                request_id=f"req-{uuid.uuid4().hex}",
                created_at=noon,
                key=key,
                key_prefix=key.prefix,
                team_id=key.team_id,
                endpoint="chat.completions",
                model="gpt-4o",
                status_code=200,
                prompt_tokens=100,
                completion_tokens=10,
                cost_usd=Decimal(cost),
            )
            for _ in range(count)
        ]
    )


@pytest.fixture
def ledger(db: None) -> dict[str, Any]:
    key, _ = factories.make_key(team=factories.make_team("ml"))
    rows_on(key, days_ago=100, count=5)
    rows_on(key, days_ago=95, count=3, cost="1.5")
    rows_on(key, days_ago=10, count=2)
    rows_on(key, days_ago=0, count=1)
    finance = User.objects.create_user("fin")
    finance.groups.add(Group.objects.get_or_create(name=FINANCE_GROUP)[0])
    client = APIClient()
    client.force_authenticate(finance)
    # The scheduler has rolled everything up, except the 95-day-old day.
    call_command(
        "rollup",
        "--since",
        str(billing_day(timezone.now()) - timedelta(days=100)),
        stdout=io.StringIO(),
    )
    stale_day = billing_day(timezone.now()) - timedelta(days=95)
    DailyRollup.objects.filter(day=stale_day).delete()
    return {"key": key, "client": client}


def report(client: APIClient) -> list[tuple[str, int, str]]:
    since = (billing_day(timezone.now()) - timedelta(days=200)).isoformat()
    lines = client.get("/api/v1/reports/daily/", {"since": since, "limit": 1000}).json()
    return [
        (line["day"], line["requests"], line["cost_usd"]) for line in lines["results"]
    ]


def test_pruning_deletes_only_rows_of_days_past_the_retention_age(ledger, settings):
    settings.GATEWAY_USAGE_RETENTION_DAYS = 30

    pruned = prune_usage(batch_size=2)

    assert (pruned.rows, pruned.days) == (8, 2)
    assert UsageRow.objects.count() == 3
    oldest = UsageRow.objects.order_by("created_at").first()
    assert oldest is not None and billing_day(
        oldest.created_at
    ) == pruned.before + timedelta(days=20)


def test_pruning_never_changes_a_report(ledger, settings):
    settings.GATEWAY_USAGE_RETENTION_DAYS = 30
    # What the report says once every day is rolled up from the full ledger.
    call_command(
        "rollup",
        "--since",
        str(billing_day(timezone.now()) - timedelta(days=100)),
        stdout=io.StringIO(),
    )
    before = report(ledger["client"])

    prune_usage(batch_size=3)

    assert report(ledger["client"]) == before
    assert [requests for _, requests, _ in before] == [5, 3, 2, 1]


def test_a_day_whose_rollup_was_stale_is_rolled_up_before_its_rows_go(ledger, settings):
    settings.GATEWAY_USAGE_RETENTION_DAYS = 30
    stale_day = billing_day(timezone.now()) - timedelta(days=95)

    prune_usage()

    line = DailyRollup.objects.get(day=stale_day)
    assert (line.requests, line.cost_usd) == (3, Decimal("4.5"))


def test_rolling_up_pruned_days_again_keeps_their_totals(ledger, settings):
    settings.GATEWAY_USAGE_RETENTION_DAYS = 30
    prune_usage()
    before = report(ledger["client"])

    call_command(
        "rollup",
        "--since",
        str(billing_day(timezone.now()) - timedelta(days=120)),
        stdout=io.StringIO(),
    )

    assert report(ledger["client"]) == before
    assert sum(requests for _, requests, _ in before) == 11


def test_a_run_prunes_at_most_max_rows_and_the_next_goes_on(ledger, settings):
    settings.GATEWAY_USAGE_RETENTION_DAYS = 30
    since = billing_day(timezone.now()) - timedelta(days=100)
    call_command("rollup", "--since", str(since), stdout=io.StringIO())

    first = prune_usage(batch_size=2, max_rows=3)
    half_pruned = report(ledger["client"])
    second = prune_usage(batch_size=2)

    assert (first.rows, second.rows) == (3, 5)
    assert UsageRow.objects.count() == 3
    # The day left half-pruned by the first run kept its totals through the second.
    assert report(ledger["client"]) == half_pruned
    assert half_pruned[0][1] == 5


def test_without_a_retention_age_nothing_is_pruned(ledger, settings):
    settings.GATEWAY_USAGE_RETENTION_DAYS = None

    assert prune_usage_task() == 0
    assert UsageRow.objects.count() == 11


def test_the_scheduled_task_prunes_with_the_configured_age(ledger, settings):
    settings.GATEWAY_USAGE_RETENTION_DAYS = 96

    assert prune_usage_task() == 5
    assert UsageRow.objects.count() == 6


def test_reconcile_skips_days_whose_rows_were_pruned(ledger, settings):
    settings.GATEWAY_USAGE_RETENTION_DAYS = 30
    prune_usage()
    pruned_month = billing_day(timezone.now()) - timedelta(days=100)
    out = io.StringIO()

    call_command("reconcile", "--month", pruned_month.strftime("%Y-%m"), stdout=out)

    assert "past the retention age" in out.getvalue()
