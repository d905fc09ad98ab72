"""CSV and FinOps FOCUS exports: exact Decimal strings, the FOCUS columns and
periods, and spreadsheet-formula injection neutralised in every export."""

from __future__ import annotations

import csv
import io
import json
import uuid
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

import pytest
from django.contrib.auth.models import Group, User
from django.test import Client

from keys.models import ApiKey
from keys.roles import FINANCE_GROUP
from tests import factories
from usage.exports import FOCUS_COLUMNS, neutralise
from usage.models import UsageRow
from usage.rollups import rebuild_days

pytestmark = pytest.mark.django_db

DAY = date(2024, 7, 1)
FOCUS_REQUIRED = {
    "BilledCost",
    "BillingAccountId",
    "BillingCurrency",
    "BillingPeriodStart",
    "BillingPeriodEnd",
    "ChargeCategory",
    "ChargeDescription",
    "ChargeFrequency",
    "ChargePeriodStart",
    "ChargePeriodEnd",
    "ContractedCost",
    "EffectiveCost",
    "InvoiceIssuerName",
    "ListCost",
    "ProviderName",
    "PublisherName",
    "ResourceId",
    "ServiceCategory",
    "ServiceName",
    "SubAccountId",
    "SubAccountName",
    "Tags",
}


@pytest.mark.parametrize(
    ("text", "safe"),
    [
        ('=HYPERLINK("http://x")', '\'=HYPERLINK("http://x")'),
        ("+SUM(A1)", "'+SUM(A1)"),
        ("-2+3", "'-2+3"),
        ("@SUM(A1)", "'@SUM(A1)"),
        ("\t=1", "'\t=1"),
        ("\r=1", "'\r=1"),
        ("team-a", "team-a"),
        ("a=b", "a=b"),
        ("", ""),
    ],
)
def test_cells_that_spreadsheets_would_run_get_a_leading_quote(text, safe):
    assert neutralise(text) == safe


def finance_client() -> Client:
    person, _ = User.objects.get_or_create(username="fin")
    person.groups.add(Group.objects.get_or_create(name=FINANCE_GROUP)[0])
    client = Client()
    client.force_login(person)
    return client


def add_row(key: ApiKey, **fields: Any) -> UsageRow:
    values: dict[str, Any] = {
        "request_id": f"req-{uuid.uuid4().hex}",
        "created_at": datetime(2024, 7, 1, 12, tzinfo=UTC),
        "key": key,
        "key_prefix": key.prefix,
        "team_id": key.team_id,
        "endpoint": "chat.completions",
        "model": "gpt-4o-mini",
        "status_code": 200,
        "prompt_tokens": 7,
        "completion_tokens": 5,
        "cost_usd": Decimal("0.0000040500"),
    }
    values.update(fields)
    return UsageRow.objects.create(**values)


def download(client: Client, url: str, **params: Any) -> list[dict[str, str]]:
    response = client.get(url, params)
    assert response.status_code == 200, response.content
    assert response["content-type"].startswith("text/csv")
    text = b"".join(response.streaming_content).decode()
    return list(csv.DictReader(io.StringIO(text)))


@pytest.fixture
def hostile(db: None) -> dict[str, Any]:
    """Names, a model, a user and tags chosen to be run by a spreadsheet."""
    team = factories.make_team("=cmd|' /C calc'!A0")
    key, _ = factories.make_key(name="@SUM(1+1)", team=team)
    add_row(
        key,
        request_id="-2+3",
        model="+evil-model",
        user='=HYPERLINK("http://attacker")',
        tags=["=tag", "ok"],
    )
    rebuild_days([DAY])
    return {"team": team, "key": key}


def test_the_daily_report_csv_neutralises_team_and_model_names(hostile):
    [line] = download(finance_client(), "/api/v1/reports/daily/", format="csv")

    assert line["team"] == "'=cmd|' /C calc'!A0"
    assert line["model"] == "'+evil-model"
    assert line["cost_usd"] == "0.0000040500"


def test_the_usage_csv_neutralises_user_request_id_model_and_tags(hostile):
    [row] = download(finance_client(), "/api/v1/usage/", format="csv")

    assert row["user"] == '\'=HYPERLINK("http://attacker")'
    assert row["request_id"] == "'-2+3"
    assert row["model"] == "'+evil-model"
    assert row["tags"] == "'=tag,ok"
    assert row["team"] == "'=cmd|' /C calc'!A0"


def test_the_pages_csv_neutralises_key_and_team_names(hostile):
    [line] = download(
        finance_client(), "/reports/export.csv", since="2024-07-01", until="2024-07-01"
    )

    assert line["key_name"] == "'@SUM(1+1)"
    assert line["team"] == "'=cmd|' /C calc'!A0"


def test_every_focus_export_neutralises_names_too(hostile):
    client = finance_client()

    exports = [
        download(client, "/api/v1/reports/daily/", format="focus"),
        download(client, "/api/v1/usage/", format="focus"),
        download(client, "/reports/export.csv", since="2024-07-01", format="focus"),
    ]

    for [row] in exports:
        assert row["SubAccountName"] == "'=cmd|' /C calc'!A0"
        assert row["ServiceName"] == "'+evil-model"
        assert row["Tags"].startswith("{")


def test_a_money_value_keeps_every_digit_from_the_database_to_the_csv(db):
    key, _ = factories.make_key(team=factories.make_team("t"))
    # 15 significant digits: exact on PostgreSQL (numeric) and SQLite alike.
    add_row(key, cost_usd=Decimal("12345.6789012345"))
    add_row(key, cost_usd=Decimal("0.0000000001"))
    rebuild_days([DAY])

    [line] = download(finance_client(), "/api/v1/reports/daily/", format="csv")
    rows = download(finance_client(), "/api/v1/usage/", format="csv")

    assert line["cost_usd"] == "12345.6789012346"
    assert {r["cost_usd"] for r in rows} == {"12345.6789012345", "0.0000000001"}


def test_the_focus_export_maps_a_daily_line_to_focus_columns(db, settings):
    settings.GATEWAY_BILLING_TZ = "Europe/Paris"
    team = factories.make_team("ml")
    key, _ = factories.make_key(name="batch", team=team)
    add_row(key, cached_tokens=2)
    add_row(key, cost_usd=Decimal("1.25"), status_code=502)
    rebuild_days([DAY])

    [line] = download(finance_client(), "/api/v1/reports/daily/", format="focus")

    assert FOCUS_REQUIRED <= line.keys()
    assert list(line.keys()) == list(FOCUS_COLUMNS)
    assert line["BilledCost"] == line["EffectiveCost"] == "1.2500040500"
    assert line["ListCost"] == line["ContractedCost"] == "1.2500040500"
    assert line["BillingCurrency"] == "USD"
    assert line["ChargeCategory"] == "Usage"
    assert line["ChargeFrequency"] == "Usage-Based"
    # A Paris billing day and month, as UTC instants: [start, end).
    assert line["ChargePeriodStart"] == "2024-06-30T22:00:00Z"
    assert line["ChargePeriodEnd"] == "2024-07-01T22:00:00Z"
    assert line["BillingPeriodStart"] == "2024-06-30T22:00:00Z"
    assert line["BillingPeriodEnd"] == "2024-07-31T22:00:00Z"
    assert line["ResourceId"] == str(key.pk) and line["ResourceName"] == "batch"
    assert line["SubAccountId"] == str(team.pk) and line["SubAccountName"] == "ml"
    assert line["ServiceName"] == line["SkuId"] == "gpt-4o-mini"
    assert line["ConsumedQuantity"] == "24" and line["ConsumedUnit"] == "Tokens"
    assert json.loads(line["Tags"]) == {"team": "ml", "key_prefix": key.prefix}
    assert (line["x_Requests"], line["x_Errors"], line["x_CachedTokens"]) == (
        "2",
        "1",
        "2",
    )


def test_an_unpriced_line_is_flagged_in_focus_not_passed_off_as_free(db):
    key, _ = factories.make_key()
    add_row(key, model="no-price", cost_usd=None)
    rebuild_days([DAY])

    [line] = download(finance_client(), "/api/v1/reports/daily/", format="focus")

    assert line["x_UnpricedRequests"] == "1"
    assert "1 unpriced requests not in the cost" in line["ChargeDescription"]
