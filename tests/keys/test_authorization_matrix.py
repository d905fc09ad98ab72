"""Every role against every REST route of keys/, teams/ and auth/, on its own objects
and on someone else's: only the intended answers succeed, a refused call changes
nothing, and finance never sees a key."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group, Permission
from django.urls import reverse
from rest_framework.test import APIClient
from rest_framework_simplejwt.tokens import RefreshToken

from keys.dashboard import admin_dashboard
from keys.models import ApiKey, Team
from tests import factories
from usage.models import UsageRow

pytestmark = pytest.mark.django_db

ROLES = ["staff", "finance", "user", "plain_staff", "anonymous"]

# (method, path template, body): {own} / {other} are key ids, {team} a team id.
ROUTES: dict[str, tuple[str, str, dict[str, Any] | None]] = {
    "list keys": ("get", "/api/v1/keys/", None),
    "create key": ("post", "/api/v1/keys/", {"name": "new key"}),
    "read own key": ("get", "/api/v1/keys/{own}/", None),
    "read other key": ("get", "/api/v1/keys/{other}/", None),
    "patch own key": ("patch", "/api/v1/keys/{own}/", {"name": "patched"}),
    "patch other key": ("patch", "/api/v1/keys/{other}/", {"name": "patched"}),
    "rotate own key": ("post", "/api/v1/keys/{own}/rotate/", {"grace_seconds": 0}),
    "rotate other key": ("post", "/api/v1/keys/{other}/rotate/", {"grace_seconds": 0}),
    "revoke own key": ("post", "/api/v1/keys/{own}/revoke/", None),
    "revoke other key": ("post", "/api/v1/keys/{other}/revoke/", None),
    "list teams": ("get", "/api/v1/teams/", None),
    "create team": ("post", "/api/v1/teams/", {"name": "new team"}),
    "read team": ("get", "/api/v1/teams/{team}/", None),
    "patch team": ("patch", "/api/v1/teams/{team}/", {"name": "renamed team"}),
    "who am i": ("get", "/api/v1/auth/me/", None),
}

# The intended answer of each route for each role. A user ("user", and staff
# without model permissions) sees, rotates and revokes their own keys; another
# user's key reads as missing (404). Finance is refused every key route (403).
EXPECTED: dict[str, dict[str, int]] = {
    "list keys": {"staff": 200, "finance": 403, "user": 200, "plain_staff": 200},
    "create key": {"staff": 201, "finance": 403, "user": 403, "plain_staff": 403},
    "read own key": {"staff": 200, "finance": 403, "user": 200, "plain_staff": 200},
    "read other key": {"staff": 200, "finance": 403, "user": 404, "plain_staff": 404},
    "patch own key": {"staff": 200, "finance": 403, "user": 403, "plain_staff": 403},
    "patch other key": {"staff": 200, "finance": 403, "user": 403, "plain_staff": 403},
    "rotate own key": {"staff": 200, "finance": 403, "user": 200, "plain_staff": 200},
    "rotate other key": {
        "staff": 200,
        "finance": 403,
        "user": 404,
        "plain_staff": 404,
    },
    "revoke own key": {"staff": 200, "finance": 403, "user": 200, "plain_staff": 200},
    "revoke other key": {
        "staff": 200,
        "finance": 403,
        "user": 404,
        "plain_staff": 404,
    },
    "list teams": {"staff": 200, "finance": 403, "user": 403, "plain_staff": 403},
    "create team": {"staff": 201, "finance": 403, "user": 403, "plain_staff": 403},
    "read team": {"staff": 200, "finance": 403, "user": 403, "plain_staff": 403},
    "patch team": {"staff": 200, "finance": 403, "user": 403, "plain_staff": 403},
    "who am i": {"staff": 200, "finance": 200, "user": 200, "plain_staff": 200},
}
for answers in EXPECTED.values():
    answers["anonymous"] = 401


def make_actor(role: str) -> Any:
    if role == "anonymous":
        return None
    user = get_user_model().objects.create_user(
        f"{role}-actor", is_staff=role in {"staff", "plain_staff", "finance"}
    )
    if role == "staff":
        user.user_permissions.set(
            Permission.objects.filter(
                content_type__app_label="keys",
                codename__in=[
                    f"{verb}_{model}"
                    for verb in ("view", "add", "change")
                    for model in ("apikey", "team")
                ],
            )
        )
    if role == "finance":
        user.groups.add(Group.objects.get_or_create(name="finance")[0])
        user.user_permissions.set(
            Permission.objects.filter(content_type__app_label="usage")
        )
    return user


def client_for(actor: Any) -> APIClient:
    client = APIClient()
    if actor is not None:
        token = RefreshToken.for_user(actor).access_token
        client.credentials(HTTP_AUTHORIZATION=f"Bearer {token}")
    return client


def snapshot() -> list[tuple[Any, ...]]:
    keys = ApiKey.objects.order_by("pk").values_list(
        "pk", "name", "secret_hash", "revoked_at", "updated_at"
    )
    teams = Team.objects.order_by("pk").values_list("pk", "name")
    return [*keys, *teams]


@pytest.mark.parametrize("route", list(ROUTES))
@pytest.mark.parametrize("role", ROLES)
def test_each_role_gets_only_the_intended_answer(role, route):
    actor = make_actor(role)
    someone = get_user_model().objects.create_user("someone-else")
    own, _ = factories.make_key(name="own key", owner=actor)
    other, _ = factories.make_key(name="other key", owner=someone)
    team = factories.make_team("a team")
    method, template, body = ROUTES[route]
    path = template.format(own=own.pk, other=other.pk, team=team.pk)
    before = snapshot()

    response = getattr(client_for(actor), method)(path, body, format="json")

    expected = EXPECTED[route][role]
    assert response.status_code == expected, response.content
    if expected >= 400:
        assert snapshot() == before, "a refused call changed something"
    text = response.content.decode()
    if role in {"finance", "anonymous"}:
        # Not even a key's name or prefix.
        for key in (own, other):
            assert key.prefix not in text and key.name not in text


@pytest.mark.parametrize("role", ["user", "plain_staff"])
def test_a_user_lists_only_their_own_keys(role):
    actor = make_actor(role)
    someone = get_user_model().objects.create_user("someone-else")
    mine, _ = factories.make_key(owner=actor)
    factories.make_key(owner=someone)
    factories.make_key()

    listed = client_for(actor).get("/api/v1/keys/").json()

    assert [k["id"] for k in listed["results"]] == [mine.pk]
    assert listed["count"] == 1


def test_staff_list_every_key():
    actor = make_actor("staff")
    keys = [factories.make_key(owner=owner)[0] for owner in (actor, None)]

    listed = client_for(actor).get("/api/v1/keys/").json()

    assert {k["id"] for k in listed["results"]} == {k.pk for k in keys}


def test_finance_with_key_ids_in_hand_still_sees_nothing():
    actor = make_actor("finance")
    key, _ = factories.make_key(owner=actor)  # even a key they own
    client = client_for(actor)

    answers = [
        client.get("/api/v1/keys/"),
        client.get(f"/api/v1/keys/{key.pk}/"),
        client.get("/api/v1/keys/", {"search": key.prefix}),
        client.post(f"/api/v1/keys/{key.pk}/rotate/", {}, format="json"),
    ]

    assert [a.status_code for a in answers] == [403, 403, 403, 403]
    assert all(key.prefix not in a.content.decode() for a in answers)


def test_finance_sees_spend_on_the_admin_index_but_no_key(client):
    finance = make_actor("finance")
    key, _ = factories.make_key(name="secret-project-key")
    before = admin_dashboard(with_keys=False).spend_today
    UsageRow.objects.create(
        request_id="req-finance-index",
        key=key,
        key_prefix=key.prefix,
        endpoint="chat.completions",
        model="gpt-x",
        status_code=200,
        cost_usd=Decimal("0.25"),
    )
    client.force_login(finance)

    response = client.get(reverse("admin:index"))

    body = response.content.decode()
    dashboard = response.context["gateway_dashboard"]
    assert dashboard.spend_today == before + Decimal("0.25")
    assert dashboard.top_keys == [] and "gpt-x" in body
    assert "secret-project-key" not in body and key.prefix not in body
