"""`manage.py reconcile --month YYYY-MM` proves the rollups equal the rows, and
fails (non-zero exit) on any difference; `seedusage` data reconciles."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import uuid
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

import pytest
from django.core.management import CommandError, call_command
from django.db.models import F
from django.utils import timezone

from keys.models import ApiKey
from tests import factories
from tests.support.gateway import database_url_for_tests
from tests.support.servers import PROJECT_ROOT
from usage.models import DailyRollup, UsageRow
from usage.rollups import billing_day, rebuild_days

pytestmark = pytest.mark.django_db

MARCH = [date(2024, 3, 1) + timedelta(days=n) for n in range(31)]


def add_row(key: ApiKey, at: datetime, **fields: object) -> None:
    values: dict[str, object] = {
        "request_id": f"req-{uuid.uuid4().hex}",
        "created_at": at,
        "key": key,
        "key_prefix": key.prefix,
        "team_id": key.team_id,
        "endpoint": "chat.completions",
        "model": "gpt-4o",
        "status_code": 200,
        "prompt_tokens": 10,
        "completion_tokens": 3,
        "cost_usd": Decimal("0.0000123456"),
    }
    values.update(fields)
    UsageRow.objects.create(**values)


@pytest.fixture
def march(db: None) -> ApiKey:
    key, _ = factories.make_key(team=factories.make_team())
    add_row(key, datetime(2024, 3, 1, 0, 0, tzinfo=UTC))
    add_row(key, datetime(2024, 3, 31, 23, 59, 59, tzinfo=UTC), status_code=502)
    add_row(key, datetime(2024, 3, 15, 8, tzinfo=UTC), model="unpriced", cost_usd=None)
    rebuild_days(MARCH)
    return key


def reconcile(month: str) -> str:
    out = io.StringIO()
    call_command("reconcile", "--month", month, stdout=out)
    return out.getvalue()


def test_rollups_built_from_the_rows_reconcile(march):
    output = reconcile("2024-03")

    assert "OK: the rollups equal the rows." in output
    assert "3 requests" in output and "1 unpriced" in output


def test_a_rollup_off_by_a_ten_billionth_of_a_dollar_fails(march):
    DailyRollup.objects.filter(day=date(2024, 3, 1)).update(
        cost_usd=F("cost_usd") + Decimal("0.0000000001")
    )

    with pytest.raises(CommandError, match="1 differences"):
        reconcile("2024-03")


def test_rows_that_arrived_after_the_rollup_fail_until_it_is_rebuilt(march):
    add_row(march, datetime(2024, 3, 20, 12, tzinfo=UTC))

    with pytest.raises(CommandError):
        reconcile("2024-03")
    call_command(
        "rollup", "--since", "2024-03-20", "--until", "2024-03-20", stdout=io.StringIO()
    )
    assert "OK" in reconcile("2024-03")


def test_a_rollup_line_without_rows_fails(march):
    DailyRollup.objects.create(
        day=date(2024, 3, 9), key=march, model="ghost", requests=1
    )

    with pytest.raises(CommandError):
        reconcile("2024-03")


def test_a_malformed_month_is_refused(db):
    with pytest.raises(CommandError, match="YYYY-MM"):
        reconcile("2024-13")


def test_the_seeded_demo_data_reconciles(db):
    call_command(
        "seedusage",
        "--keys=6",
        "--teams=2",
        "--models=3",
        "--days=40",
        "--rollup",
        stdout=io.StringIO(),
    )
    today = billing_day(timezone.now())
    months = {(today - timedelta(days=n)).strftime("%Y-%m") for n in range(40)}

    outputs = [reconcile(month) for month in sorted(months)]

    assert UsageRow.objects.count() > 100
    assert all("OK: the rollups equal the rows." in output for output in outputs)


@pytest.mark.django_db(transaction=True)
def test_the_command_exits_non_zero_when_rollups_and_rows_differ(march):
    def run() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "manage.py", "reconcile", "--month", "2024-03"],
            cwd=PROJECT_ROOT,
            env={**os.environ, "DATABASE_URL": database_url_for_tests()},
            capture_output=True,
            text=True,
            timeout=60,
        )

    clean = run()
    DailyRollup.objects.filter(day=date(2024, 3, 31)).update(errors=0)
    broken = run()

    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert broken.returncode != 0
    assert "errors rows=1 rollups=0" in broken.stdout
