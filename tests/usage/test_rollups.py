"""Daily rollups: exact sums (property-tested across price changes, billing-zone
midnights and month ends), idempotence when run twice, late or concurrently
(threads here and a real Celery worker), and `manage.py rollup --since`."""

from __future__ import annotations

import io
import threading
import time
import uuid
from collections import defaultdict
from datetime import UTC, date, datetime, timedelta
from datetime import time as clock
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from django.contrib.auth.models import Group, User
from django.core.management import CommandError, call_command
from django.db import IntegrityError, connection, transaction
from django.test import override_settings
from django.utils import timezone
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from keys.models import ApiKey
from keys.roles import FINANCE_GROUP
from tests import factories
from usage.models import DailyRollup, UsageRow
from usage.pricing import PriceInfo, cost_usd, price_at
from usage.rollups import billing_day, rebuild_day, reconcile
from usage.selectors import UsageFilters, daily_report
from usage.tasks import rollup_recent_days

ZONES = [
    "UTC",
    "Europe/Paris",
    "America/Los_Angeles",
    "Asia/Kolkata",
    "Pacific/Chatham",  # +12:45/+13:45
    "Australia/Lord_Howe",  # a half-hour daylight-saving shift
]
# Local days whose midnights traffic clusters around: month and year ends, a leap
# day, and the daylight-saving changes of Europe and the US.
EDGE_DAYS = [
    date(2024, 1, 31),
    date(2024, 2, 29),
    date(2024, 3, 10),
    date(2024, 3, 31),
    date(2024, 4, 30),
    date(2024, 10, 27),
    date(2024, 11, 3),
    date(2024, 12, 31),
]
MICROS_PER_3H = 3 * 3600 * 10**6

pytestmark = pytest.mark.django_db


def usage_row(key: ApiKey, created_at: datetime, **fields: Any) -> UsageRow:
    values: dict[str, Any] = {
        "request_id": f"req-{uuid.uuid4().hex}",
        "created_at": created_at,
        "key": key,
        "key_prefix": key.prefix,
        "team_id": key.team_id,
        "endpoint": "chat.completions",
        "model": "m1",
        "status_code": 200,
        "prompt_tokens": 10,
        "completion_tokens": 5,
        "cost_usd": Decimal("0.0000100000"),
    }
    values.update(fields)
    return UsageRow(**values)


# --- exact arithmetic, property-tested ----------------------------------------------------

rates = st.decimals(min_value=0, max_value=200, places=6)


@st.composite
def traffic(draw: st.DrawFn) -> dict[str, Any]:
    zone = draw(st.sampled_from(ZONES))
    tz = ZoneInfo(zone)
    # m1's price changes at a billing-zone midnight, m2's at an arbitrary instant;
    # m3 has no price at all.
    change_day = draw(st.sampled_from(EDGE_DAYS)) + timedelta(days=1)
    m1_change = datetime.combine(change_day, clock.min, tzinfo=tz)
    m2_change = draw(
        st.datetimes(
            min_value=datetime(2024, 1, 1),  # noqa: DTZ001 (hypothesis wants naive bounds)
            max_value=datetime(2025, 1, 31),  # noqa: DTZ001
            timezones=st.just(UTC),
        )
    )
    old = datetime(2020, 1, 1, tzinfo=UTC)

    def price(n: int, model: str, since: datetime) -> PriceInfo:
        cached = draw(st.none() | rates)
        return PriceInfo(n, model, draw(rates), draw(rates), cached, since)

    prices = {
        "m1": (price(2, "m1", m1_change), price(1, "m1", old)),
        "m2": (price(4, "m2", m2_change), price(3, "m2", old)),
        "m3": (),
    }
    offsets = st.sampled_from([-1, 0, 1]) | st.integers(-MICROS_PER_3H, MICROS_PER_3H)
    requests = []
    for _ in range(draw(st.integers(1, 30))):
        day = draw(st.sampled_from(EDGE_DAYS)) + timedelta(days=1)
        midnight = datetime.combine(day, clock.min, tzinfo=tz)
        at = (midnight + timedelta(microseconds=draw(offsets))).astimezone(UTC)
        prompt = draw(st.integers(0, 2_000_000))
        requests.append(
            {
                "created_at": at,
                "model": draw(st.sampled_from(["m1", "m2", "m3"])),
                "key": draw(st.integers(0, 1)),
                "prompt": prompt,
                "cached": draw(st.integers(0, prompt)),
                "completion": draw(st.integers(0, 500_000)),
                "status": draw(st.sampled_from([200, 200, 200, 429, 502])),
            }
        )
    return {"zone": zone, "prices": prices, "requests": requests}


@pytest.mark.django_db
@hypothesis_settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(world=traffic())
def test_rollups_sum_to_the_rows_costs_exactly_across_prices_midnights_and_months(
    world: dict[str, Any],
):
    with override_settings(GATEWAY_BILLING_TZ=world["zone"]), transaction.atomic():
        keys = [
            factories.make_key()[0],
            factories.make_key(team=factories.make_team())[0],
        ]
        rows = []
        for r in world["requests"]:
            price = price_at(world["prices"][r["model"]], r["created_at"])
            tokens = {
                "prompt_tokens": r["prompt"],
                "completion_tokens": r["completion"],
                "cached_tokens": r["cached"],
            }
            cost = cost_usd(price, **tokens) if price else None
            rows.append(
                usage_row(
                    keys[r["key"]],
                    r["created_at"],
                    model=r["model"],
                    status_code=r["status"],
                    cost_usd=cost,
                    price_id=price.id if price else None,
                    **tokens,
                )
            )
        UsageRow.objects.bulk_create(rows)
        days = {billing_day(r.created_at) for r in rows}
        finance = _finance()

        for day in days:
            rebuild_day(day)

        cost_by_day: dict[date, Decimal] = defaultdict(Decimal)
        cost_by_month: dict[tuple[int, int], Decimal] = defaultdict(Decimal)
        for r in rows:
            day = billing_day(r.created_at)
            cost_by_day[day] += r.cost_usd or 0
            cost_by_month[day.year, day.month] += r.cost_usd or 0
        for day in days:
            rollups = DailyRollup.objects.filter(day=day)
            assert sum(r.cost_usd for r in rollups) == cost_by_day[day], day
            assert sum(r.requests for r in rollups) == sum(
                1 for r in rows if billing_day(r.created_at) == day
            )
        for (year, month), cost in cost_by_month.items():
            first = date(year, month, 1)
            last = (first + timedelta(days=32)).replace(day=1) - timedelta(days=1)
            report = daily_report(finance, UsageFilters(since=first, until=last))
            totals = report.totals()
            assert totals.cost_usd == cost  # to the 1e-10 USD, so to the cent
            assert totals.unpriced_requests == sum(
                1
                for r in rows
                if r.is_unpriced and (year, month) == _month(billing_day(r.created_at))
            )
            assert reconcile(first, last).ok
        transaction.set_rollback(True)


def _month(day: date) -> tuple[int, int]:
    return day.year, day.month


def _finance() -> User:
    person = User.objects.create_user(f"fin-{uuid.uuid4().hex[:8]}")
    person.groups.add(Group.objects.get_or_create(name=FINANCE_GROUP)[0])
    return person


def test_a_billing_day_that_spans_a_daylight_saving_change_has_its_25_hours(settings):
    settings.GATEWAY_BILLING_TZ = "Europe/Paris"
    key, _ = factories.make_key()
    # 2024-10-27 in Paris runs from 22:00 UTC on the 26th to 23:00 UTC on the 27th.
    first = datetime(2024, 10, 26, 22, 0, tzinfo=UTC)
    last = datetime(2024, 10, 27, 22, 59, 59, tzinfo=UTC)
    outside = datetime(2024, 10, 27, 23, 0, tzinfo=UTC)
    UsageRow.objects.bulk_create([usage_row(key, t) for t in (first, last, outside)])

    rebuild_day(date(2024, 10, 27))

    [line] = DailyRollup.objects.filter(day=date(2024, 10, 27))
    assert line.requests == 2


# --- idempotence ----------------------------------------------------------------------------


def test_rebuilding_a_day_twice_gives_the_same_lines():
    key, _ = factories.make_key(team=factories.make_team())
    today = timezone.now()
    UsageRow.objects.bulk_create(
        [usage_row(key, today, model=m) for m in ("a", "a", "b")]
    )

    rebuild_day(billing_day(today))
    first = list(DailyRollup.objects.values_list("model", "requests", "cost_usd"))
    rebuild_day(billing_day(today))
    second = list(DailyRollup.objects.values_list("model", "requests", "cost_usd"))

    assert sorted(first) == sorted(second)
    assert sorted((m, n) for m, n, _ in second) == [("a", 2), ("b", 1)]


def test_a_rebuild_run_late_counts_rows_that_arrived_after_the_first():
    key, _ = factories.make_key()
    yesterday = timezone.now() - timedelta(days=1)
    UsageRow.objects.bulk_create([usage_row(key, yesterday)])
    rebuild_day(billing_day(yesterday))

    # A row spooled during an outage arrives a day late, stamped with its own time.
    UsageRow.objects.bulk_create([usage_row(key, yesterday, prompt_tokens=7)])
    rollup_recent_days()

    [line] = DailyRollup.objects.all()
    assert (line.requests, line.prompt_tokens) == (2, 17)
    assert line.cost_usd == Decimal("0.0000200000")


def test_a_rebuild_repairs_a_rollup_that_counts_more_than_the_rows():
    key, _ = factories.make_key()
    now = timezone.now()
    UsageRow.objects.bulk_create(
        [usage_row(key, now - timedelta(days=3)), usage_row(key, now)]
    )
    rebuild_day(billing_day(now))
    DailyRollup.objects.filter(day=billing_day(now)).update(requests=5)

    rebuild_day(billing_day(now))

    assert DailyRollup.objects.get(day=billing_day(now)).requests == 1


def test_rolling_up_leaves_other_days_alone():
    key, _ = factories.make_key()
    old = timezone.now() - timedelta(days=10)
    UsageRow.objects.bulk_create([usage_row(key, old)])
    rebuild_day(billing_day(old))
    UsageRow.objects.filter(created_at=old).update(prompt_tokens=999)

    rollup_recent_days()

    assert DailyRollup.objects.get().prompt_tokens == 10


@pytest.mark.django_db(transaction=True)
def test_concurrent_rebuilds_of_a_day_never_double_it():
    key, _ = factories.make_key()  # no team: lines only the partial index compares
    now = timezone.now()
    UsageRow.objects.bulk_create(
        [usage_row(key, now, model=m) for m in ("a", "b", "c") for _ in range(5)]
    )
    day = billing_day(now)
    start = threading.Barrier(4)
    errors: list[BaseException] = []

    def rebuild_three_times() -> None:
        try:
            start.wait()
            for _ in range(3):
                rebuild_day(day)
        except BaseException as exc:  # noqa: BLE001 (reported by the assert below)
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=rebuild_three_times) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == []
    lines = DailyRollup.objects.filter(day=day)
    assert sorted(lines.values_list("model", "requests")) == [
        ("a", 5),
        ("b", 5),
        ("c", 5),
    ]


def rollup_line(key: ApiKey, **fields: Any) -> DailyRollup:
    values: dict[str, Any] = {"day": date(2026, 3, 17), "key": key, "model": "m1"}
    values.update(fields)
    return DailyRollup(**values)


def test_the_database_refuses_a_second_team_less_line_for_a_day_key_and_model():
    key, _ = factories.make_key()
    rollup_line(key, team_id=None).save()

    with pytest.raises(IntegrityError), transaction.atomic():
        rollup_line(key, team_id=None).save()

    assert DailyRollup.objects.count() == 1


def test_the_database_refuses_a_second_line_of_a_team():
    team = factories.make_team()
    key, _ = factories.make_key(team=team)
    rollup_line(key, team_id=team.pk).save()

    with pytest.raises(IntegrityError), transaction.atomic():
        rollup_line(key, team_id=team.pk).save()

    assert DailyRollup.objects.count() == 1


def test_a_team_less_line_and_a_team_line_of_one_day_key_and_model_coexist():
    # A key that moved to a team mid-day has rows with and without it.
    team = factories.make_team()
    key, _ = factories.make_key()

    DailyRollup.objects.bulk_create(
        [
            rollup_line(key, team_id=None),
            rollup_line(key, team_id=team.pk),
            rollup_line(key, team_id=None, model="m2"),
            rollup_line(key, team_id=None, day=date(2026, 3, 18)),
        ]
    )

    assert DailyRollup.objects.count() == 4


@pytest.mark.django_db(transaction=True)
def test_the_celery_worker_rolls_up_concurrently_with_other_rebuilds(
    celery_worker_process,
):
    key, _ = factories.make_key()
    team_key, _ = factories.make_key(team=factories.make_team())
    now = timezone.now()
    UsageRow.objects.bulk_create(
        [
            usage_row(k, now, model=m)
            for k in (key, team_key)
            for m in ("a", "b")
            for _ in range(3)
        ]
    )
    day = billing_day(now)
    results = [rollup_recent_days.delay() for _ in range(4)]
    errors: list[BaseException] = []

    def rebuild_meanwhile() -> None:
        try:
            for _ in range(5):
                rebuild_day(day)
        except BaseException as exc:  # noqa: BLE001 (reported by the assert below)
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=rebuild_meanwhile) for _ in range(2)]
    for thread in threads:
        thread.start()
    late = usage_row(key, now, model="a")
    late.save()  # arrives while the rebuilds run
    for thread in threads:
        thread.join()
    _wait_for_tasks(celery_worker_process, [r.id for r in results])
    last_run = rollup_recent_days.delay()  # a last, late run sees the late row
    _wait_for_tasks(celery_worker_process, [last_run.id])

    assert errors == []
    lines = DailyRollup.objects.filter(day=day)
    assert sorted(lines.values_list("key_id", "model", "requests")) == sorted(
        [
            (key.pk, "a", 4),
            (key.pk, "b", 3),
            (team_key.pk, "a", 3),
            (team_key.pk, "b", 3),
        ]
    )
    assert reconcile(day, day).ok


def _wait_for_tasks(worker: Any, task_ids: list[str], timeout: float = 30.0) -> None:
    """Until the worker's log says each task succeeded (there is no result backend)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log = worker.log_tail(5000)
        if all(f"[{task_id}] succeeded" in log for task_id in task_ids):
            return
        time.sleep(0.1)
    raise AssertionError(f"the worker did not finish in time:\n{worker.log_tail()}")


# --- the command ----------------------------------------------------------------------------


def test_the_rollup_command_rebuilds_every_day_of_its_range_with_progress():
    key, _ = factories.make_key()
    days = [date(2024, 2, 27), date(2024, 2, 28), date(2024, 2, 29), date(2024, 3, 1)]
    UsageRow.objects.bulk_create(
        [usage_row(key, datetime.combine(d, clock(12), tzinfo=UTC)) for d in days]
    )
    out = io.StringIO()

    call_command("rollup", "--since", "2024-02-28", "--until", "2024-02-29", stdout=out)

    assert sorted(DailyRollup.objects.values_list("day", flat=True)) == days[1:3]
    assert "2/2 2024-02-29" in out.getvalue()
    assert "2 days rolled up" in out.getvalue()


def test_the_rollup_command_refuses_a_malformed_or_backwards_range():
    with pytest.raises(CommandError):
        call_command("rollup", "--since", "2024-02-30")
    with pytest.raises(CommandError):
        call_command("rollup", "--since", "2024-03-02", "--until", "2024-03-01")
