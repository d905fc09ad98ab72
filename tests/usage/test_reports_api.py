"""usage/ and reports/daily/ over the REST API: who sees what, filters, fields,
CSV, JWT, read-only, and freshness against the real gateway."""

from __future__ import annotations

import csv
import io
import time
import uuid
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

import httpx
import pytest
from django.contrib.auth.models import Group, Permission, User
from django.utils import timezone
from rest_framework.test import APIClient

from keys.models import ApiKey
from keys.roles import FINANCE_GROUP
from tests import factories
from usage.models import UsageRow
from usage.rollups import rebuild_day

USAGE = "/api/v1/usage/"
DAILY = "/api/v1/reports/daily/"
SPEC_ROW_FIELDS = {
    "id",
    "request_id",
    "created_at",
    "key",
    "key_prefix",
    "team",
    "user",
    "endpoint",
    "model",
    "upstream_model",
    "provider",
    "status_code",
    "error_code",
    "stream",
    "prompt_tokens",
    "completion_tokens",
    "cached_tokens",
    "usage_source",
    "cost_usd",
    "price",
    "latency_ms",
    "ttft_ms",
    "client_disconnected",
    "cache_hit",
    "tags",
}
DAY = date(2024, 5, 14)
SEVEN_WORDS = [{"role": "user", "content": "count these seven words for me please"}]
NOON = datetime(2024, 5, 14, 12, tzinfo=UTC)


def row(key: ApiKey, **fields: Any) -> UsageRow:
    values: dict[str, Any] = {
        "request_id": f"req-{uuid.uuid4().hex[:12]}",
        "created_at": NOON,
        "key": key,
        "key_prefix": key.prefix,
        "team_id": key.team_id,
        "endpoint": "chat.completions",
        "model": "gpt-4o-mini",
        "status_code": 200,
        "prompt_tokens": 100,
        "completion_tokens": 20,
        "usage_source": UsageRow.Source.PROVIDER,
        "cost_usd": Decimal("0.0000270000"),
        "latency_ms": 321,
    }
    values.update(fields)
    return UsageRow.objects.create(**values)


def user(name: str, *, finance: bool = False, perms: tuple[str, ...] = ()) -> User:
    person = User.objects.create_user(name)  # no password: hashing one takes ~0.2 s
    if finance:
        person.groups.add(Group.objects.get_or_create(name=FINANCE_GROUP)[0])
    for perm in perms:
        app, codename = perm.split(".")
        person.user_permissions.add(
            Permission.objects.get(content_type__app_label=app, codename=codename)
        )
    if perms:
        person.is_staff = True
        person.save()
    return person


def client_for(person: User | None) -> APIClient:
    client = APIClient()
    if person is not None:
        client.force_authenticate(person)
    return client


@pytest.fixture
def world(db: None) -> dict[str, Any]:
    """Two owners with a key each (teams red and blue), finance, staff, outsider."""
    alice, bob = user("alice"), user("bob")
    red, blue = factories.make_team("red"), factories.make_team("blue")
    alice_key, _ = factories.make_key(name="alice-app", team=red, owner=alice)
    bob_key, _ = factories.make_key(name="bob-app", team=blue, owner=bob)
    rows = [
        row(alice_key, request_id="alice-1"),
        row(alice_key, request_id="alice-2", model="gpt-4o", cost_usd=Decimal("1.5")),
        row(bob_key, request_id="bob-1", created_at=NOON + timedelta(days=1)),
    ]
    for day in (DAY, DAY + timedelta(days=1)):
        rebuild_day(day)
    return {
        "alice": alice,
        "bob": bob,
        "alice_key": alice_key,
        "bob_key": bob_key,
        "red": red,
        "blue": blue,
        "rows": rows,
        "finance": user("fin", finance=True),
        "staff": user("staff", perms=("usage.view_usagerow", "usage.view_dailyrollup")),
        "outsider": user("outsider"),
    }


def request_ids(response: Any) -> set[str]:
    assert response.status_code == 200, response.content
    return {r["request_id"] for r in response.json()["results"]}


def csv_rows(response: Any) -> list[dict[str, str]]:
    assert response.status_code == 200, response.content
    assert response["content-type"].startswith("text/csv")
    text = b"".join(response.streaming_content).decode()
    return list(csv.DictReader(io.StringIO(text)))


# --- who sees what --------------------------------------------------------------------------


def test_anonymous_callers_get_401_on_usage_and_reports(world):
    client = client_for(None)

    assert client.get(USAGE).status_code == 401
    assert client.get(DAILY).status_code == 401
    assert client.get(DAILY, {"format": "csv"}).status_code == 401


def test_finance_reads_every_keys_usage_and_reports(world):
    client = client_for(world["finance"])

    assert request_ids(client.get(USAGE)) == {"alice-1", "alice-2", "bob-1"}
    lines = client.get(DAILY).json()["results"]
    assert {(line["key_name"], line["model"]) for line in lines} == {
        ("alice-app", "gpt-4o-mini"),
        ("alice-app", "gpt-4o"),
        ("bob-app", "gpt-4o-mini"),
    }


def test_staff_with_the_usage_permission_read_everything(world):
    client = client_for(world["staff"])

    assert request_ids(client.get(USAGE)) == {"alice-1", "alice-2", "bob-1"}
    assert client.get(DAILY).json()["count"] == 3


def test_staff_without_the_permission_see_only_their_own_keys(world):
    world["outsider"].is_staff = True
    world["outsider"].save()

    assert request_ids(client_for(world["outsider"]).get(USAGE)) == set()


def test_an_ordinary_user_sees_only_the_usage_of_keys_they_own(world):
    client = client_for(world["alice"])

    assert request_ids(client.get(USAGE)) == {"alice-1", "alice-2"}
    lines = client.get(DAILY).json()["results"]
    assert {line["key"] for line in lines} == {world["alice_key"].pk}
    # Naming someone else's key does not widen the view.
    assert request_ids(client.get(USAGE, {"key": world["bob_key"].pk})) == set()
    assert client.get(DAILY, {"key": world["bob_key"].pk}).json()["count"] == 0
    assert request_ids(client.get(USAGE, {"request_id": "bob-1"})) == set()


def test_a_user_without_keys_sees_no_usage(world):
    client = client_for(world["outsider"])

    assert request_ids(client.get(USAGE)) == set()
    assert client.get(DAILY).json()["count"] == 0


@pytest.mark.parametrize("role", ["finance", "staff", "alice"])
def test_the_usage_api_takes_no_writes_from_anyone(world, role):
    client = client_for(world[role])
    some_row = world["rows"][0]

    assert client.post(USAGE, {"request_id": "x"}).status_code == 405
    assert client.put(f"{USAGE}{some_row.pk}/", {}).status_code == 405
    assert client.patch(f"{USAGE}{some_row.pk}/", {}).status_code == 405
    assert client.delete(f"{USAGE}{some_row.pk}/").status_code == 405
    assert client.post(DAILY, {}).status_code == 405
    assert UsageRow.objects.count() == 3


def test_a_jwt_from_the_token_endpoint_reads_reports(world, settings):
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    world["finance"].set_password("pw-fin-long-enough")
    world["finance"].save()
    client = APIClient()
    tokens = client.post(
        "/api/v1/auth/token/", {"username": "fin", "password": "pw-fin-long-enough"}
    ).json()

    client.credentials(HTTP_AUTHORIZATION=f"Bearer {tokens['access']}")

    assert request_ids(client.get(USAGE)) == {"alice-1", "alice-2", "bob-1"}
    assert [r["day"] for r in csv_rows(client.get(DAILY, {"format": "csv"}))] == [
        "2024-05-14",
        "2024-05-14",
        "2024-05-15",
    ]


def test_a_bad_jwt_is_refused_with_401(world):
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION="Bearer not-a-token")

    assert client.get(USAGE).status_code == 401


# --- rows and lines ------------------------------------------------------------------------------


def test_a_usage_row_has_the_specs_fields_and_money_as_a_decimal_string(world):
    key = world["alice_key"]
    price = factories.make_price("gpt-4o-mini")
    row(
        key,
        request_id="full",
        cost_usd=Decimal("0.0000040500"),
        price=price,
        cached_tokens=3,
        tags=["a", "b"],
        user="end-user-7",
        ttft_ms=42,
    )

    response = client_for(world["finance"]).get(USAGE, {"request_id": "full"})

    [data] = response.json()["results"]
    assert SPEC_ROW_FIELDS <= data.keys()
    assert data["cost_usd"] == "0.0000040500"
    assert data["key"] == key.pk and data["key_prefix"] == key.prefix
    assert data["team"] == "red"
    assert data["price"] == price.pk
    assert data["tags"] == ["a", "b"]
    assert (data["user"], data["ttft_ms"], data["cached_tokens"]) == (
        "end-user-7",
        42,
        3,
    )


def test_an_unpriced_row_has_a_null_cost_and_is_flagged(world):
    row(world["alice_key"], request_id="no-price", cost_usd=None, price=None)

    response = client_for(world["finance"]).get(USAGE, {"request_id": "no-price"})

    [data] = response.json()["results"]
    assert data["cost_usd"] is None and data["price"] is None
    assert data["unpriced"] is True


def test_report_lines_are_rollups_with_names_and_decimal_string_costs(world):
    response = client_for(world["finance"]).get(DAILY, {"model": "gpt-4o"})

    [line] = response.json()["results"]
    assert line == {
        "day": "2024-05-14",
        "key": world["alice_key"].pk,
        "key_name": "alice-app",
        "key_prefix": world["alice_key"].prefix,
        "team": "red",
        "team_id": world["red"].pk,
        "model": "gpt-4o",
        "requests": 1,
        "errors": 0,
        "prompt_tokens": 100,
        "completion_tokens": 20,
        "cached_tokens": 0,
        "cost_usd": "1.5000000000",
        "unpriced_requests": 0,
    }


# --- filters -----------------------------------------------------------------------------------------


def test_usage_filters_by_key_id_or_prefix_team_name_or_id_and_model(world):
    client = client_for(world["finance"])
    alice_key, red = world["alice_key"], world["red"]

    assert request_ids(client.get(USAGE, {"key": alice_key.pk})) == {
        "alice-1",
        "alice-2",
    }
    assert request_ids(client.get(USAGE, {"key": alice_key.prefix})) == {
        "alice-1",
        "alice-2",
    }
    assert request_ids(client.get(USAGE, {"team": "blue"})) == {"bob-1"}
    assert request_ids(client.get(USAGE, {"team": red.pk})) == {"alice-1", "alice-2"}
    assert request_ids(client.get(USAGE, {"model": "gpt-4o"})) == {"alice-2"}
    assert request_ids(client.get(USAGE, {"model": "gpt-4o*"})) == {
        "alice-1",
        "alice-2",
        "bob-1",
    }
    assert request_ids(client.get(USAGE, {"team": "no-such-team"})) == set()


def test_usage_filters_by_billing_days_and_instants(world):
    client = client_for(world["finance"])

    assert request_ids(client.get(USAGE, {"since": "2024-05-15"})) == {"bob-1"}
    assert request_ids(client.get(USAGE, {"until": "2024-05-14"})) == {
        "alice-1",
        "alice-2",
    }
    # An instant: since included, until excluded.
    assert request_ids(
        client.get(
            USAGE, {"since": "2024-05-14T12:00:00Z", "until": "2024-05-15T12:00:00Z"}
        )
    ) == {"alice-1", "alice-2"}
    assert request_ids(client.get(USAGE, {"since": "2024-05-14T12:00:01+00:00"})) == {
        "bob-1"
    }


def test_days_follow_the_billing_zone(world, settings):
    settings.GATEWAY_BILLING_TZ = "Asia/Tokyo"  # noon UTC is 21:00 in Tokyo
    row(
        world["alice_key"],
        request_id="tokyo-next-day",
        created_at=datetime(2024, 5, 14, 15, 30, tzinfo=UTC),  # 00:30 on the 15th
    )

    response = client_for(world["finance"]).get(USAGE, {"since": "2024-05-15"})

    assert request_ids(response) == {"tokyo-next-day", "bob-1"}


def test_reports_filter_by_days_team_key_and_model(world):
    client = client_for(world["finance"])

    def keys_and_days(**params: Any) -> set[tuple[int, str]]:
        lines = client.get(DAILY, params).json()["results"]
        return {(line["key"], line["day"]) for line in lines}

    alice, bob = world["alice_key"].pk, world["bob_key"].pk
    assert keys_and_days(since="2024-05-15") == {(bob, "2024-05-15")}
    assert keys_and_days(until="2024-05-14") == {(alice, "2024-05-14")}
    assert keys_and_days(team="blue") == {(bob, "2024-05-15")}
    assert keys_and_days(key=alice) == {(alice, "2024-05-14")}
    assert keys_and_days(model="gpt-4o", team="red") == {(alice, "2024-05-14")}


def test_a_report_filtered_by_request_id_shows_the_line_that_counts_it(world):
    response = client_for(world["finance"]).get(DAILY, {"request_id": "alice-2"})

    [line] = response.json()["results"]
    assert (line["key"], line["model"], line["day"]) == (
        world["alice_key"].pk,
        "gpt-4o",
        "2024-05-14",
    )


def test_a_malformed_filter_is_a_400_in_json_even_when_csv_was_asked(world):
    client = client_for(world["finance"])

    bad_day = client.get(DAILY, {"since": "2024-13-01", "format": "csv"})
    backwards = client.get(USAGE, {"since": "2024-05-15", "until": "2024-05-14"})

    assert bad_day.status_code == 400
    assert bad_day["content-type"].startswith("application/json")
    assert "since" in bad_day.json()
    assert backwards.status_code == 400 and "until" in backwards.json()


# --- CSV -----------------------------------------------------------------------------------------------


def test_the_daily_csv_has_exactly_the_specs_columns_and_every_line(world):
    response = client_for(world["finance"]).get(DAILY, {"format": "csv"})

    text = b"".join(response.streaming_content).decode()
    header = text.splitlines()[0]
    assert header == (
        "day,key,team,model,requests,errors,prompt_tokens,completion_tokens,"
        "cached_tokens,cost_usd"
    )
    lines = list(csv.DictReader(io.StringIO(text)))
    assert len(lines) == 3
    assert {
        (r["team"], r["model"], r["cost_usd"])
        for r in lines
        if r["day"] == "2024-05-14"
    } == {("red", "gpt-4o-mini", "0.0000270000"), ("red", "gpt-4o", "1.5000000000")}
    assert "attachment" in response["content-disposition"]


def test_the_daily_csv_is_filtered_and_scoped_like_the_json(world):
    alice_csv = csv_rows(client_for(world["alice"]).get(DAILY, {"format": "csv"}))
    finance_csv = csv_rows(
        client_for(world["finance"]).get(DAILY, {"format": "csv", "team": "blue"})
    )

    assert {r["key"] for r in alice_csv} == {str(world["alice_key"].pk)}
    assert [r["key"] for r in finance_csv] == [str(world["bob_key"].pk)]


def test_text_csv_in_the_accept_header_selects_the_csv_too(world):
    response = client_for(world["finance"]).get(DAILY, HTTP_ACCEPT="text/csv")

    assert len(csv_rows(response)) == 3


def test_the_usage_csv_has_every_row_with_the_api_field_names(world):
    rows = csv_rows(client_for(world["finance"]).get(USAGE, {"format": "csv"}))

    assert {r["request_id"] for r in rows} == {"alice-1", "alice-2", "bob-1"}
    assert SPEC_ROW_FIELDS == set(rows[0].keys())
    assert {r["cost_usd"] for r in rows} == {"0.0000270000", "1.5000000000"}


def test_a_csv_export_is_not_cut_to_one_page(world):
    key = world["alice_key"]
    UsageRow.objects.bulk_create(
        [
            UsageRow(
                request_id=f"bulk-{n}",
                created_at=NOON,
                key=key,
                key_prefix=key.prefix,
                endpoint="chat.completions",
                model="gpt-4o-mini",
                status_code=200,
            )
            for n in range(150)
        ]
    )

    rows = csv_rows(client_for(world["finance"]).get(USAGE, {"format": "csv"}))

    assert len(rows) == 153


# --- freshness -------------------------------------------------------------------------------------------


def test_a_row_written_after_a_report_shows_in_the_next_report(world):
    client = client_for(world["finance"])
    today = timezone.now()
    before = client.get(DAILY, {"since": today.date().isoformat()}).json()["count"]

    row(world["alice_key"], request_id="just-now", created_at=today)

    lines = client.get(DAILY, {"since": today.date().isoformat()}).json()["results"]
    assert before == 0
    assert [line["requests"] for line in lines] == [1]


@pytest.mark.django_db(transaction=True)
def test_a_finished_relay_request_shows_in_the_daily_report_within_30_seconds(live):
    finance = user("fin-live", finance=True)
    client = client_for(finance)
    today = timezone.now().date().isoformat()
    client.get(DAILY, {"since": today})  # the report is read before the request
    started = time.monotonic()

    response = httpx.post(
        f"{live['url']}/v1/chat/completions",
        json={"model": live["model"], "messages": SEVEN_WORDS},
        headers={"authorization": f"Bearer {live['secret']}"},
        timeout=30,
    )

    assert response.status_code == 200
    lines: list[dict[str, Any]] = []
    while time.monotonic() - started < 30 and not lines:
        lines = client.get(DAILY, {"since": today, "key": live["key"].pk}).json()[
            "results"
        ]
        time.sleep(0.2)
    assert [line["requests"] for line in lines] == [1], "not in the report after 30 s"
    # The fake upstream counts 7 prompt and 5 completion tokens: 7 × 0.15 + 5 × 0.60.
    assert lines[0]["cost_usd"] == "0.0000040500"


def test_one_row_is_read_by_its_id_within_the_same_scope(world):
    [alice_row, _, bob_row] = world["rows"]
    alice = client_for(world["alice"])

    mine = alice.get(f"{USAGE}{alice_row.pk}/")
    theirs = alice.get(f"{USAGE}{bob_row.pk}/")
    as_csv = alice.get(f"{USAGE}{alice_row.pk}/", {"format": "csv"})

    assert mine.status_code == 200 and mine.json()["request_id"] == "alice-1"
    assert theirs.status_code == 404
    assert as_csv.status_code == 406 and "detail" in as_csv.json()


@pytest.mark.parametrize("value", ["sk-gw-", "99999999999999999999999", "nope"])
def test_a_key_filter_that_names_no_key_matches_nothing(world, value):
    client = client_for(world["finance"])

    assert request_ids(client.get(USAGE, {"key": value})) == set()
    assert client.get(DAILY, {"key": value, "team": value}).json()["count"] == 0


def test_a_pasted_secret_filters_by_its_prefix(world):
    pasted = f"sk-gw-{world['bob_key'].prefix}-the-rest-of-the-secret"

    response = client_for(world["finance"]).get(USAGE, {"key": pasted})

    assert request_ids(response) == {"bob-1"}
