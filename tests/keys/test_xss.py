"""Key names, team names, model names and tags are user input: with HTML or script
in them, every admin page (and the finance reports) shows them as text."""

from __future__ import annotations

import uuid
from decimal import Decimal
from typing import Any

import pytest
from django.urls import Resolver404, resolve, reverse
from django.utils import timezone
from django.utils.html import escape

from keys.models import ApiKey, Team
from keys.services import QuotaSpec, revoke_key, set_key_limits, upsert_team
from tests import factories
from usage.models import UsageRow
from usage.rollups import billing_day, rebuild_day

pytestmark = pytest.mark.django_db

KEY_NAME = '<script>alert("key")</script>'
NEW_KEY_NAME = "<img src=x onerror=alert('renamed')>"
TEAM_NAME = '"><img src=x onerror=alert("team")>'
MODEL = "<svg/onload=alert('model')>"
TAG = "<script>alert('tag')</script>"
PAYLOADS = [KEY_NAME, NEW_KEY_NAME, TEAM_NAME, MODEL, TAG]


@pytest.fixture
def hostile() -> dict[str, Any]:
    team = upsert_team(
        name=TEAM_NAME, quotas=[QuotaSpec("cost_usd", "month", Decimal(10))]
    )
    key, _ = factories.make_key(name=KEY_NAME, team=team, models=[MODEL])
    set_key_limits(key=key, name=NEW_KEY_NAME)
    set_key_limits(key=key, name=KEY_NAME)
    row = UsageRow.objects.create(
        request_id=f"req-{uuid.uuid4().hex}",
        created_at=timezone.now(),
        key=key,
        key_prefix=key.prefix,
        team=team,
        endpoint="chat.completions",
        model=MODEL,
        status_code=200,
        prompt_tokens=3,
        completion_tokens=4,
        cost_usd=Decimal("0.5"),
        tags=[TAG, "plain"],
    )
    return {"key": ApiKey.objects.get(pk=key.pk), "team": team, "row": row}


def assert_inert(body: str, shown: list[str]) -> None:
    for payload in PAYLOADS:
        assert payload not in body, f"raw {payload!r} in the page"
    for payload in shown:
        assert escape(payload) in body, f"{payload!r} not shown as text"


def page(client: Any, url: str, **params: str) -> str:
    response = client.get(url, params)
    assert response.status_code == 200, url
    return response.content.decode()


def test_key_pages_show_hostile_names_as_text(admin_client, hostile):
    key = hostile["key"]

    pages = {
        "list": page(admin_client, reverse("admin:keys_apikey_changelist")),
        "search": page(
            admin_client, reverse("admin:keys_apikey_changelist"), q="script"
        ),
        "change": page(
            admin_client, reverse("admin:keys_apikey_change", args=[key.pk])
        ),
        "rotate": page(
            admin_client, reverse("admin:keys_apikey_rotate", args=[key.pk])
        ),
        "revoke": page(
            admin_client, reverse("admin:keys_apikey_revoke", args=[key.pk])
        ),
        "history": page(
            admin_client, reverse("admin:keys_apikey_history", args=[key.pk])
        ),
    }

    assert_inert(pages["list"], [KEY_NAME, TEAM_NAME])
    assert_inert(pages["search"], [KEY_NAME])
    # The change page's audit trail quotes the old and new names.
    assert_inert(pages["change"], [KEY_NAME, NEW_KEY_NAME, MODEL])
    assert_inert(pages["rotate"], [KEY_NAME])
    assert_inert(pages["revoke"], [KEY_NAME])
    assert_inert(pages["history"], [])


def test_the_issued_secret_page_shows_a_hostile_name_as_text(admin_client):
    from tests.keys.test_admin import ADD_URL, key_form

    response = admin_client.post(ADD_URL, key_form(name=KEY_NAME))

    assert response.status_code == 200
    assert_inert(response.content.decode(), [KEY_NAME])


def test_the_bulk_revoke_confirmation_shows_hostile_names_as_text(
    admin_client, hostile
):
    response = admin_client.post(
        reverse("admin:keys_apikey_changelist"),
        {"action": "revoke_selected", "_selected_action": [hostile["key"].pk]},
    )

    assert_inert(response.content.decode(), [KEY_NAME])


def test_team_pages_show_a_hostile_team_name_as_text(admin_client, hostile):
    team: Team = hostile["team"]

    listing = page(admin_client, reverse("admin:keys_team_changelist"))
    change = page(admin_client, reverse("admin:keys_team_change", args=[team.pk]))

    assert_inert(listing, [TEAM_NAME])
    assert_inert(change, [TEAM_NAME])


def test_usage_pages_show_hostile_models_teams_and_tags_as_text(admin_client, hostile):
    row: UsageRow = hostile["row"]

    listing = page(admin_client, reverse("admin:usage_usagerow_changelist"))
    one = page(admin_client, reverse("admin:usage_usagerow_change", args=[row.pk]))
    rollups = page(admin_client, reverse("admin:usage_dailyrollup_changelist"))

    assert_inert(listing, [MODEL, TEAM_NAME])
    assert_inert(one, [MODEL, TAG])
    assert_inert(rollups, [])


def test_the_audit_list_and_the_index_show_hostile_names_as_text(admin_client, hostile):
    revoke_key(key=hostile["key"])

    events = page(admin_client, reverse("admin:keys_keyevent_changelist"))
    index = page(admin_client, reverse("admin:index"))

    assert_inert(events, [KEY_NAME, NEW_KEY_NAME])
    assert_inert(index, [KEY_NAME, MODEL])  # top keys, top models


def test_the_finance_reports_show_hostile_names_as_text(admin_client, hostile):
    try:
        resolve("/reports/")
    except Resolver404:
        pytest.skip("the finance reports (issue 4) are not mounted yet")

    rebuild_day(billing_day(timezone.now()))  # the reports read rollups

    body = page(admin_client, "/reports/")

    assert_inert(body, [MODEL, TEAM_NAME])
