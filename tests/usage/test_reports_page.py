"""The /reports/ page: who may open it, filters, totals, the chart's data, the
table and its CSV export, escaping, and that it reads rollups, not the ledger."""

from __future__ import annotations

import csv
import io
import json
import re
import uuid
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from django.contrib.auth.models import Group, Permission, User
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from keys.models import ApiKey
from keys.roles import FINANCE_GROUP
from tests import factories
from usage.models import UsageRow
from usage.rollups import rebuild_days

pytestmark = pytest.mark.django_db

PAGE = "/reports/"
EXPORT = "/reports/export.csv"
XSS = '<script>alert("x")</script>'


def user(name: str, *, finance: bool = False, perms: tuple[str, ...] = ()) -> User:
    person = User.objects.create_user(name)
    if finance:
        person.groups.add(Group.objects.get_or_create(name=FINANCE_GROUP)[0])
    for perm in perms:
        app, codename = perm.split(".")
        person.user_permissions.add(
            Permission.objects.get(content_type__app_label=app, codename=codename)
        )
    return person


def signed_in(person: User) -> Client:
    client = Client()
    client.force_login(person)
    return client


def spend(key: ApiKey, day: date, model: str, cost: str, count: int = 1, **f: Any):
    at = datetime.combine(day, datetime.min.time(), tzinfo=UTC) + timedelta(hours=12)
    UsageRow.objects.bulk_create(
        [
            UsageRow(
                request_id=f"req-{uuid.uuid4().hex}",
                created_at=at,
                key=key,
                key_prefix=key.prefix,
                team_id=key.team_id,
                endpoint="chat.completions",
                model=model,
                status_code=f.get("status_code", 200),
                prompt_tokens=f.get("prompt_tokens", 1000),
                completion_tokens=200,
                cost_usd=Decimal(cost) if cost is not None else None,
            )
            for _ in range(count)
        ]
    )


@pytest.fixture
def books(db: None) -> dict[str, Any]:
    """Two teams' spend over April and May 2024, rolled up."""
    owner = user("owner")
    ml, web = factories.make_team("ml"), factories.make_team("web")
    ml_key, _ = factories.make_key(name="ml-batch", team=ml, owner=owner)
    web_key, _ = factories.make_key(name="web-app", team=web)
    spend(ml_key, date(2024, 4, 3), "gpt-4o", "10.25", count=2)
    spend(ml_key, date(2024, 4, 30), "gpt-4o-mini", "0.0000040500")
    spend(ml_key, date(2024, 5, 1), "gpt-4o", "7.00")
    spend(web_key, date(2024, 4, 3), "gpt-4o", "1.10")
    spend(web_key, date(2024, 4, 20), "gpt-4o-mini", "0.50", count=3)
    rebuild_days([date(2024, 4, 1) + timedelta(days=n) for n in range(40)])
    return {
        "owner": owner,
        "ml": ml,
        "web": web,
        "ml_key": ml_key,
        "web_key": web_key,
        "finance": user("fin", finance=True),
    }


def page(client: Client, **params: Any) -> Any:
    response = client.get(PAGE, params)
    assert response.status_code == 200, response.content[:500]
    return response


def table(response: Any) -> list[dict[str, str]]:
    """The table's cells by column, as the CSV would write them."""
    html = response.content.decode()
    body = html[html.index('<table id="report-table">') :]
    rows = re.findall(r"<tr[^>]*>(.*?)</tr>", body[body.index("<tbody>") :], re.S)
    return [
        dict(re.findall(r'<td data-column="([^"]+)" data-value="([^"]*)"', row))
        for row in rows
        if "data-column" in row
    ]


def export(client: Client, **params: Any) -> list[dict[str, str]]:
    response = client.get(EXPORT, params)
    assert response.status_code == 200
    text = b"".join(response.streaming_content).decode()
    return list(csv.DictReader(io.StringIO(text)))


# --- access -------------------------------------------------------------------------------


def test_anonymous_visitors_are_sent_to_sign_in(books):
    response = Client().get(PAGE)

    assert response.status_code == 302
    assert response["location"].startswith("/reports/login/?next=/reports/")
    assert Client().get(EXPORT).status_code == 302


def test_a_user_with_no_role_and_no_keys_is_refused(books):
    client = signed_in(user("nobody"))

    assert client.get(PAGE).status_code == 403
    assert client.get(EXPORT).status_code == 403


def test_finance_sees_every_team(books):
    response = page(signed_in(books["finance"]), since="2024-04-01", until="2024-05-31")

    assert response.context["totals"].cost_usd == Decimal("30.1000040500")
    assert {row["team"] for row in table(response)} == {"ml", "web"}


def test_staff_with_the_rollup_permission_see_every_team(books):
    staff = user("staff", perms=("usage.view_dailyrollup",))

    response = page(signed_in(staff), since="2024-04-01", until="2024-05-31")

    assert response.context["totals"].requests == 8


def test_a_key_owner_sees_only_their_keys_even_when_asking_for_others(books):
    client = signed_in(books["owner"])

    mine = page(client, since="2024-04-01", until="2024-05-31")
    theirs = client.get(PAGE, {"team": books["web"].pk})

    assert {row["key_name"] for row in table(mine)} == {"ml-batch"}
    assert mine.context["totals"].cost_usd == Decimal("27.5000040500")
    assert "web-app" not in mine.content.decode()
    # Another team is not even a choice: the form refuses it.
    assert theirs.status_code == 400 and "team" in theirs.context["form"].errors
    assert export(client, since="2024-04-01") == export(
        client, since="2024-04-01", key=books["ml_key"].pk
    )


def test_the_sign_in_page_lets_a_non_staff_user_in(books, settings):
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    books["finance"].set_password("finance-password-1")
    books["finance"].save()
    client = Client()

    response = client.post(
        "/reports/login/?next=/reports/",
        {"username": "fin", "password": "finance-password-1", "next": "/reports/"},
    )

    assert response.status_code == 302 and response["location"] == "/reports/"
    assert client.get(PAGE).status_code == 200


# --- what finance asks -----------------------------------------------------------------------


def test_what_team_ml_spent_on_gpt_4o_in_april_is_on_the_page_and_in_the_csv(books):
    client = signed_in(books["finance"])
    april = {
        "since": "2024-04-01",
        "until": "2024-04-30",
        "team": books["ml"].pk,
        "model": "gpt-4o",
    }

    response = page(client, **april)
    lines = export(client, **april)

    assert response.context["totals"].cost_usd == Decimal("20.5000000000")
    assert 'id="total-cost">20.50<' in response.content.decode()
    assert sum(Decimal(line["cost_usd"]) for line in lines) == Decimal("20.50")
    assert {(line["team"], line["model"]) for line in lines} == {("ml", "gpt-4o")}


@pytest.mark.parametrize(
    ("params", "expected_cost"),
    [
        ({"since": "2024-04-01", "until": "2024-04-30"}, "23.1000040500"),
        ({"since": "2024-05-01", "until": "2024-05-31"}, "7.0000000000"),
        (
            {"since": "2024-04-01", "until": "2024-05-31", "model": "gpt-4o-mini"},
            "1.5000040500",
        ),
        ({"since": "2024-04-01", "until": "2024-05-31", "key": "web_key"}, "2.60"),
    ],
)
def test_each_filter_narrows_the_totals(books, params, expected_cost):
    if "key" in params:  # a fixture's key, by its id
        params = {**params, "key": books[params["key"]].pk}

    response = page(signed_in(books["finance"]), **params)

    assert response.context["totals"].cost_usd == Decimal(expected_cost)


def test_the_default_range_is_this_billing_month(books):
    response = page(signed_in(books["finance"]))

    form = response.context["form"]
    assert form.cleaned_data["since"].day == 1
    assert form.cleaned_data["until"] >= form.cleaned_data["since"]


def test_lines_can_be_grouped_by_team_with_the_csv_grouped_alike(books):
    client = signed_in(books["finance"])
    params = {"since": "2024-04-01", "until": "2024-05-31", "group": "team"}

    shown = table(page(client, **params))
    exported = export(client, **params)

    assert [(row["team"], row["cost_usd"]) for row in shown] == [
        ("ml", "27.5000040500"),
        ("web", "2.6000000000"),
    ]
    assert exported == shown


def test_the_csv_export_holds_exactly_the_tables_lines(books):
    client = signed_in(books["finance"])
    params = {"since": "2024-04-01", "until": "2024-05-31"}

    shown = table(page(client, **params))
    exported = export(client, **params)

    assert len(shown) == 5
    assert exported == shown


def test_unpriced_usage_is_flagged_on_the_page_never_shown_as_free(books):
    spend(books["web_key"], date(2024, 4, 21), "mystery-model", None, count=2)
    rebuild_days([date(2024, 4, 21)])

    response = page(signed_in(books["finance"]), since="2024-04-21", until="2024-04-21")

    html = response.content.decode()
    assert response.context["totals"].unpriced_requests == 2
    assert 'id="total-unpriced"' in html
    assert '<span class="flag"' in html and ">unpriced</span>" in html


def test_the_chart_data_is_cost_per_day_stacked_by_model(books):
    response = page(signed_in(books["finance"]), since="2024-04-02", until="2024-04-04")

    html = response.content.decode()
    data = json.loads(
        re.search(
            r'<script id="chart-data" type="application/json">(.*?)</script>',
            html,
            re.S,
        ).group(1)
    )
    assert data["labels"] == ["2024-04-02", "2024-04-03", "2024-04-04"]
    assert data["series"] == [
        {"label": "gpt-4o", "data": ["0.0000000000", "21.6000000000", "0.0000000000"]}
    ]
    assert "/static/usage/vendor/chart-4.6.1.umd.js" in html
    assert "cdn" not in html.lower()


def test_names_and_models_with_markup_are_escaped_everywhere(books):
    team = factories.make_team(XSS)
    key, _ = factories.make_key(name=XSS, team=team)
    spend(key, date(2024, 4, 5), XSS, "1")
    rebuild_days([date(2024, 4, 5)])

    html = page(
        signed_in(books["finance"]), since="2024-04-05", until="2024-04-05"
    ).content.decode()

    assert XSS not in html
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in html
    # json_script escapes <, > and & inside the chart data.
    assert "\\u003Cscript\\u003E" in html


def test_a_backwards_date_range_is_an_error_on_the_form(books):
    response = signed_in(books["finance"]).get(
        PAGE, {"since": "2024-05-02", "until": "2024-05-01"}
    )

    assert response.status_code == 400
    assert "The first day comes after the last." in response.content.decode()


def test_a_long_table_is_paged_while_the_csv_has_every_line(books):
    key, _ = factories.make_key(name="busy")
    for n in range(210):
        spend(key, date(2024, 4, 1), f"model-{n:03d}", "0.01")
    rebuild_days([date(2024, 4, 1)])
    client = signed_in(books["finance"])

    first = page(client, since="2024-04-01", until="2024-04-01")
    second = page(client, since="2024-04-01", until="2024-04-01", page=2)

    assert len(table(first)) == 200 and len(table(second)) == 10
    assert len(export(client, since="2024-04-01", until="2024-04-01")) == 210


# --- rollups, not the ledger ----------------------------------------------------------------


def test_a_past_range_is_answered_from_rollups_without_touching_the_ledger(books):
    client = signed_in(books["finance"])

    with CaptureQueriesContext(connection) as queries:
        page(client, since="2024-04-01", until="2024-05-31")

    assert not [q for q in queries.captured_queries if "usage_usagerow" in q["sql"]]
    assert len(queries.captured_queries) <= 15


def test_the_page_costs_the_same_number_of_queries_for_more_data(books):
    client = signed_in(books["finance"])

    def queries_for_page() -> int:
        with CaptureQueriesContext(connection) as queries:
            page(client, since="2024-04-01", until="2024-05-31")
        return len(queries.captured_queries)

    before = queries_for_page()
    for n in range(30):
        key, _ = factories.make_key(team=factories.make_team())
        spend(key, date(2024, 4, 10), f"m{n % 4}", "0.25")
    rebuild_days([date(2024, 4, 10)])

    assert queries_for_page() == before


def test_todays_usage_shows_on_the_page_at_once(books):
    client = signed_in(books["finance"])
    today = timezone.now().date()
    page(client)  # rollups are read (and refreshed) before the request

    spend(books["web_key"], today, "gpt-4o", "3.33")

    response = page(client, since=today.isoformat(), until=today.isoformat())
    assert response.context["totals"].cost_usd == Decimal("3.33")
