"""The key audit trail: every step of a key's life through admin, REST and the
commands is recorded with who, when, how and what changed; never a secret or a
hash; and admin shows it without letting anyone edit it."""

from __future__ import annotations

import json
from decimal import Decimal
from io import StringIO
from typing import Any

import pytest
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.urls import reverse
from rest_framework.test import APIClient
from rest_framework_simplejwt.tokens import RefreshToken

from keys.models import ApiKey, KeyEvent
from keys.services import QuotaSpec, set_key_limits
from tests import factories
from tests.keys.test_admin import ADD_URL, change_form, inline, key_form

pytestmark = pytest.mark.django_db

EVENTS_URL = reverse("admin:keys_keyevent_changelist")


def trail(key: ApiKey) -> list[tuple[str, str, str]]:
    """(action, actor name, via) of a key's events, oldest first."""
    return list(
        KeyEvent.objects.filter(key=key)
        .order_by("at", "id")
        .values_list("action", "actor_name", "via")
    )


def secrets_absent(events: Any, secrets: list[str], hashes: list[str]) -> None:
    stored = json.dumps([e.details for e in events]) + " ".join(
        f"{e.actor_name} {e}" for e in events
    )
    for secret in secrets:
        assert secret not in stored
        assert secret.split("-", 3)[3] not in stored  # the random part alone
    for digest in hashes:
        assert digest and digest not in stored


def test_admin_issue_change_rotate_and_revoke_are_each_recorded_once(
    admin_client, admin_user
):
    issued = admin_client.post(
        ADD_URL,
        key_form(
            **inline(
                "quotas", [{"metric": "requests", "period": "minute", "limit": "60"}]
            )
        ),
    )
    key = ApiKey.objects.get()
    first_hash = key.secret_hash
    data = change_form(key, name="renamed", allowed_models="gpt-4o")
    data["quotas-0-limit"] = "120"
    admin_client.post(reverse("admin:keys_apikey_change", args=[key.pk]), data)
    rotated = admin_client.post(
        reverse("admin:keys_apikey_rotate", args=[key.pk]), {"grace_seconds": "60"}
    )
    admin_client.post(reverse("admin:keys_apikey_revoke", args=[key.pk]))
    key.refresh_from_db()

    assert trail(key) == [
        ("issued", "admin", "admin"),
        ("changed", "admin", "admin"),
        ("rotated", "admin", "admin"),
        ("revoked", "admin", "admin"),
    ]
    events = list(KeyEvent.objects.filter(key=key).order_by("at", "id"))
    assert all(e.actor == admin_user for e in events)
    assert events[0].details["quotas"] == [
        {"metric": "requests", "period": "minute", "limit": "60"}
    ]
    assert events[1].details["changes"] == {
        "name": ["billing app", "renamed"],
        "allowed_models": [["gpt-4o-mini", "router/*"], ["gpt-4o"]],
        "quotas": [
            [{"metric": "requests", "period": "minute", "limit": "60"}],
            [{"metric": "requests", "period": "minute", "limit": "120"}],
        ],
    }
    assert events[2].details["grace_seconds"] == 60
    assert events[2].details["previous_valid_until"] is not None
    secrets_absent(
        events,
        [issued.context["secret"], rotated.context["secret"]],
        [first_hash, key.secret_hash],
    )


def test_rest_steps_are_recorded_with_the_api_user_and_never_the_secret():
    user = get_user_model().objects.create_superuser("robot")
    client = APIClient()
    client.credentials(
        HTTP_AUTHORIZATION=f"Bearer {RefreshToken.for_user(user).access_token}"
    )

    created = client.post("/api/v1/keys/", {"name": "ci"}, format="json").json()
    key_url = f"/api/v1/keys/{created['id']}/"
    client.patch(key_url, {"log_bodies": True}, format="json")
    rotated = client.post(f"{key_url}rotate/", {}, format="json").json()
    client.post(f"{key_url}revoke/")
    key = ApiKey.objects.get()

    assert trail(key) == [
        ("issued", "robot", "api"),
        ("changed", "robot", "api"),
        ("rotated", "robot", "api"),
        ("revoked", "robot", "api"),
    ]
    changed = KeyEvent.objects.get(key=key, action="changed")
    assert changed.details["changes"] == {"log_bodies": [False, True]}
    secrets_absent(
        KeyEvent.objects.filter(key=key),
        [created["secret"], rotated["secret"]],
        [key.secret_hash],
    )


def test_commands_are_recorded_as_the_command_line_with_no_user():
    out = StringIO()
    call_command("createkey", "--name", "cli-key", "--rpm", "5", stdout=out)
    call_command("revokekey", "cli-key", stdout=StringIO())
    key = ApiKey.objects.get()

    assert trail(key) == [("issued", "", "cli"), ("revoked", "", "cli")]
    assert all(e.actor is None for e in KeyEvent.objects.filter(key=key))
    secrets_absent(
        KeyEvent.objects.filter(key=key),
        [out.getvalue().splitlines()[-1]],
        [key.secret_hash],
    )


def test_a_change_that_changes_nothing_records_nothing():
    key, _ = factories.make_key(
        name="same", quotas=[QuotaSpec("tokens", "day", Decimal(10))]
    )

    set_key_limits(
        key=key, name="same", quotas=[QuotaSpec("tokens", "day", Decimal("10.000"))]
    )

    assert [action for action, _, _ in trail(key)] == ["issued"]


def test_the_key_page_shows_its_trail_and_links_to_all_of_it(admin_client):
    key, _ = factories.make_key(name="audited")
    set_key_limits(key=key, log_bodies=True)

    page = admin_client.get(reverse("admin:keys_apikey_change", args=[key.pk]))
    events = admin_client.get(EVENTS_URL, {"key": key.prefix})

    body = page.content.decode()
    assert "Audit trail" in body
    assert "log_bodies: False → True" in body
    assert f"{EVENTS_URL}?key={key.pk}" in body
    listed = events.context["cl"].result_list
    assert [e.action for e in listed] == ["changed", "issued"]


def test_the_event_list_filters_by_action_and_by_key_id(admin_client):
    key, _ = factories.make_key()
    other, _ = factories.make_key()
    set_key_limits(key=key, log_bodies=True)

    by_action = admin_client.get(EVENTS_URL, {"action": "changed"})
    by_key = admin_client.get(EVENTS_URL, {"key": str(other.pk)})

    assert [e.key_id for e in by_action.context["cl"].result_list] == [key.pk]
    assert [e.key_id for e in by_key.context["cl"].result_list] == [other.pk]


def test_the_trail_cannot_be_added_to_changed_or_deleted_in_admin(admin_client):
    key, _ = factories.make_key()
    event = KeyEvent.objects.get(key=key)

    add = admin_client.get(reverse("admin:keys_keyevent_add"))
    change = admin_client.post(
        reverse("admin:keys_keyevent_change", args=[event.pk]), {"action": "revoked"}
    )
    delete = admin_client.post(
        reverse("admin:keys_keyevent_delete", args=[event.pk]), {"post": "yes"}
    )

    assert add.status_code == 403
    assert change.status_code == 403
    assert delete.status_code == 403
    assert KeyEvent.objects.get(pk=event.pk).action == "issued"
