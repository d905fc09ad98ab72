"""Admin at scale: 100,000 keys and 200,000 usage rows. The key list (plain, searched,
filtered), the usage list and the index answer in a fixed, small number of queries,
never one per row, and never count a whole big table. And the index's numbers,
which stay cheap by reading past days from the rollups."""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from django.contrib.auth import get_user_model
from django.db import connection, transaction
from django.db.models import AutoField, Model
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from keys.dashboard import admin_dashboard
from keys.models import ApiKey, Quota, Team
from tests import factories
from usage.models import DailyRollup, UsageRow
from usage.rollups import rebuild_day

KEYS = 100_000
ROWS = 200_000
KEYS_WITH_USAGE = 2_000
PAGE = 100

KEY_LIST = reverse("admin:keys_apikey_changelist")
USAGE_LIST = reverse("admin:usage_usagerow_changelist")
EVENT_LIST = reverse("admin:keys_keyevent_changelist")
INDEX = reverse("admin:index")


def insert(
    model: type[Model],
    constant: dict[str, Any],
    varying: Sequence[str],
    rows: Iterable[Sequence[Any]],
) -> None:
    """INSERT many rows with one prepared statement, in one transaction.

    `bulk_create` builds a model instance and converts every field of every row,
    and on SQLite sends a few dozen rows per statement: minutes for 200k rows.
    Here the fields in `constant` are converted once (by the fields themselves),
    and `rows` carry the `varying` ones already as the database takes them
    (`db_uuid`, `db_time`).
    """
    fields = [f for f in model._meta.concrete_fields if not isinstance(f, AutoField)]
    template = model(**constant)
    fixed = {
        f.attname: f.get_db_prep_save(getattr(template, f.attname), connection)
        for f in fields
        if f.attname not in varying
    }
    position = {name: index for index, name in enumerate(varying)}
    names = [f.attname for f in fields]
    table = connection.ops.quote_name(model._meta.db_table)
    columns = ", ".join(connection.ops.quote_name(f.column) for f in fields)
    marks = ", ".join(["%s"] * len(fields))
    params = (
        [row[position[n]] if n in position else fixed[n] for n in names] for row in rows
    )
    # One transaction: SQLite in autocommit would sync the file after every row.
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.executemany(f"INSERT INTO {table} ({columns}) VALUES ({marks})", params)  # noqa: S608


def db_uuid(value: uuid.UUID) -> Any:
    return value if connection.features.has_native_uuid_field else value.hex


def db_time(value: datetime) -> Any:
    return connection.ops.adapt_datetimefield_value(value)


def delete_where(model: type[Model], condition: str) -> None:
    """DELETE without Django's collector, which would load 100k keys to cascade."""
    table = connection.ops.quote_name(model._meta.db_table)
    with connection.cursor() as cursor:
        cursor.execute(f"DELETE FROM {table} WHERE {condition}")  # noqa: S608


@pytest.fixture(scope="module")
def big_tables(django_db_setup: None, django_db_blocker: Any) -> Iterator[None]:
    """100k keys (newest first: key-0, key-1, …), 100 teams with quotas, quotas on
    the newest keys, 200k usage rows over the last 40 days. Written once for the
    module, straight into the tables (the services would take minutes), and removed
    after it, so the other tests find the database as they expect."""
    random.seed(5)
    now = timezone.now()
    with django_db_blocker.unblock():
        owners = [
            get_user_model().objects.create_user(f"scale-owner-{i}") for i in range(10)
        ]
        teams = Team.objects.bulk_create(
            Team(name=f"scale-team-{i}") for i in range(100)
        )
        Quota.objects.bulk_create(
            Quota(team=team, metric="cost_usd", period="month", limit=Decimal(100))
            for team in teams
        )
        insert(
            ApiKey,
            {"updated_at": now},
            ["name", "prefix", "secret_hash", "team_id", "owner_id", "created_at"],
            (
                (
                    f"key-{i}",
                    f"k{i:07d}",
                    f"{i:064x}",
                    teams[i % 100].pk,
                    owners[i % 10].pk,
                    db_time(now - timedelta(seconds=i)),
                )
                for i in range(KEYS)
            ),
        )
        by_name = dict(
            ApiKey.objects.filter(prefix__startswith="k").values_list("name", "pk")
        )
        newest = [by_name[f"key-{i}"] for i in range(KEYS_WITH_USAGE)]
        Quota.objects.bulk_create(
            Quota(key_id=newest[i], metric=metric, period=period, limit=Decimal(1000))
            for i in range(PAGE * 2)
            for metric, period in (("requests", "minute"), ("tokens", "day"))
        )
        insert(
            UsageRow,
            {
                "endpoint": "chat.completions",
                "provider": "fake",
                "prompt_tokens": 100,
                "completion_tokens": 20,
                "usage_source": "provider",
                "cost_usd": Decimal("0.0001"),
            },
            [
                "id",
                "request_id",
                "created_at",
                "key_id",
                "key_prefix",
                "team_id",
                "model",
                "status_code",
            ],
            (
                (
                    db_uuid(uuid.UUID(int=random.getrandbits(128), version=4)),
                    f"scale-{n}",
                    db_time(now - timedelta(seconds=random.randrange(40 * 86400))),
                    newest[n % KEYS_WITH_USAGE],
                    f"k{n % KEYS_WITH_USAGE:07d}",
                    teams[(n % KEYS_WITH_USAGE) % 100].pk,
                    f"model-{n % 7}",
                    200 if n % 20 else 502,
                )
                for n in range(ROWS)
            ),
        )
    yield
    with django_db_blocker.unblock():
        delete_where(UsageRow, "request_id LIKE 'scale-%%'")
        delete_where(Quota, "1 = 1")
        delete_where(ApiKey, "name LIKE 'key-%%'")
        Team.objects.filter(name__startswith="scale-team-").delete()
        get_user_model().objects.filter(username__startswith="scale-owner-").delete()


@pytest.fixture
def staff_client(big_tables: None, client: Any, django_user_model: Any) -> Any:
    user = django_user_model.objects.create_superuser("scale-admin")
    client.force_login(user)
    return client


def counted_queries(client: Any, url: str, **params: str) -> tuple[Any, list[str]]:
    with CaptureQueriesContext(connection) as queries:
        started = time.monotonic()
        response = client.get(url, params)
        elapsed = time.monotonic() - started
    assert response.status_code == 200, response.content[:2000]
    print(f"{url} {params}: {len(queries)} queries, {elapsed:.2f} s")  # noqa: T201
    return response, [q["sql"] for q in queries.captured_queries]


def counts_of(table: str, sqls: list[str]) -> list[str]:
    return [sql for sql in sqls if "COUNT(" in sql.upper() and f'"{table}"' in sql]


@pytest.mark.django_db
def test_the_key_list_of_100k_keys_costs_a_fixed_number_of_queries(
    staff_client, django_assert_max_num_queries
):
    with django_assert_max_num_queries(20):
        response, sqls = counted_queries(staff_client, KEY_LIST)

    page = response.context["cl"].result_list
    assert len(page) == PAGE and page[0].name == "key-0"
    assert response.context["cl"].result_count == KEYS
    with_usage = [key for key in page if key.last_used_at is not None]
    assert len(with_usage) == PAGE  # the newest keys are the used ones
    assert all(key.spend_usd > 0 for key in with_usage)
    assert all(len(key.quota_uses) == 3 for key in page)  # 2 own + the team's
    # One filtered count of the keys; the usage ledger is never counted whole.
    assert len(counts_of("keys_apikey", sqls)) == 1
    for sql in counts_of("usage_usagerow", sqls):
        assert "WHERE" in sql.upper() or "LIMIT" in sql.upper(), sql
    assert "key-0" in response.content.decode()


@pytest.mark.django_db
def test_a_longer_page_costs_no_more_queries_than_a_short_one(staff_client):
    # key-42 has quotas of the same periods as every key on the first page.
    short, few = counted_queries(staff_client, KEY_LIST, q="k0000042")
    full, many = counted_queries(staff_client, KEY_LIST)

    assert len(short.context["cl"].result_list) == 1
    assert len(full.context["cl"].result_list) == PAGE
    assert len(many) == len(few)


@pytest.mark.django_db
@pytest.mark.parametrize(
    "params, first",
    [
        ({"q": "key-99999"}, "key-99999"),
        ({"q": "k0012345"}, "key-12345"),
        ({"q": "sk-gw-k0000042-…"}, "key-42"),
        ({"q": "scale-owner-3", "status": "active"}, "key-3"),
        ({"team__id__exact": "__team__", "o": "1"}, None),
    ],
)
def test_searching_and_filtering_100k_keys_is_server_side_and_bounded(
    staff_client, django_assert_max_num_queries, params, first
):
    if params.get("team__id__exact") == "__team__":
        params = {
            **params,
            "team__id__exact": str(Team.objects.get(name="scale-team-7").pk),
        }

    with django_assert_max_num_queries(20):
        response, _ = counted_queries(staff_client, KEY_LIST, **params)

    page = response.context["cl"].result_list
    assert page
    if first is not None:
        assert page[0].name == first
    else:
        assert all(key.team.name == "scale-team-7" for key in page)


@pytest.mark.django_db
def test_the_usage_list_of_200k_rows_costs_a_fixed_number_of_queries(
    staff_client, django_assert_max_num_queries
):
    key = ApiKey.objects.get(name="key-5")

    with django_assert_max_num_queries(15):
        plain, sqls = counted_queries(staff_client, USAGE_LIST)
    with django_assert_max_num_queries(15):
        by_key, more = counted_queries(staff_client, USAGE_LIST, key=key.prefix)

    assert len(plain.context["cl"].result_list) == 50
    assert {row.key_id for row in by_key.context["cl"].result_list} == {key.pk}
    for sql in counts_of("usage_usagerow", sqls + more):
        assert "WHERE" in sql.upper() or "LIMIT" in sql.upper(), sql


@pytest.mark.django_db
def test_the_index_dashboard_costs_a_fixed_number_of_queries(
    staff_client, django_assert_max_num_queries
):
    with django_assert_max_num_queries(20):
        response, sqls = counted_queries(staff_client, INDEX)

    dashboard = response.context["gateway_dashboard"]
    assert dashboard.requests_month > 0 and dashboard.spend_month > 0
    assert len(dashboard.top_keys) == 10 and len(dashboard.top_models) == 7
    for sql in counts_of("usage_usagerow", sqls):
        assert "WHERE" in sql.upper(), sql


@pytest.mark.django_db
def test_the_audit_list_and_a_key_page_are_bounded_too(
    staff_client, django_assert_max_num_queries
):
    key = ApiKey.objects.get(name="key-7")
    url: Callable[[int], str] = lambda pk: reverse(  # noqa: E731
        "admin:keys_apikey_change", args=[pk]
    )

    with django_assert_max_num_queries(20):
        counted_queries(staff_client, EVENT_LIST)
    with django_assert_max_num_queries(25):
        page, _ = counted_queries(staff_client, url(key.pk))

    assert "key-7" in page.content.decode()


# --- the index's numbers: rollups for past days, rows for the rest ------------------


def ledger_row(key: ApiKey, when: datetime, cost: str, model: str = "m") -> UsageRow:
    return UsageRow(
        request_id=f"req-{uuid.uuid4().hex}",
        created_at=when,
        key=key,
        key_prefix=key.prefix,
        team_id=key.team_id,
        endpoint="chat.completions",
        model=model,
        status_code=200,
        cost_usd=Decimal(cost),
    )


@pytest.mark.django_db
def test_the_index_adds_rolled_up_days_to_the_rows_of_later_days():
    now = datetime(2026, 3, 20, 12, 0, tzinfo=UTC)
    key, _ = factories.make_key(name="rolled")
    UsageRow.objects.bulk_create(
        [
            ledger_row(key, datetime(2026, 3, 2, 9, tzinfo=UTC), "1.00", "a"),
            ledger_row(key, datetime(2026, 3, 19, 9, tzinfo=UTC), "2.00", "b"),
            ledger_row(key, datetime(2026, 3, 20, 9, tzinfo=UTC), "4.00", "b"),
            ledger_row(key, datetime(2026, 2, 27, 9, tzinfo=UTC), "8.00", "a"),
        ]
    )
    rebuild_day(date(2026, 3, 2))  # the rollups reach the 2nd; later days are rows
    # A rollup the rows no longer back: proof that rolled-up days are read from it.
    DailyRollup.objects.filter(day=date(2026, 3, 2)).update(cost_usd=Decimal("1.50"))

    numbers = admin_dashboard(with_keys=True, now=now)

    assert numbers.rolled_up_until == date(2026, 3, 2)
    assert numbers.spend_today == Decimal("4.00")
    assert numbers.spend_month == Decimal("7.50")
    assert numbers.requests_month == 3
    assert [(m.label, m.cost_usd) for m in numbers.top_models] == [
        ("b", Decimal("6.00")),
        ("a", Decimal("1.50")),
    ]
    assert [(k.label, k.requests) for k in numbers.top_keys] == [("rolled", 3)]
