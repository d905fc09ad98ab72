"""The REST API's keys/, teams/ and auth/ routes, driven over HTTP with JWTs as an
admin's script would: issue, change, rotate and revoke keys; teams; who am I."""

from __future__ import annotations

import json
from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group, Permission
from django.utils import timezone
from rest_framework.test import APIClient
from rest_framework_simplejwt.tokens import RefreshToken

from keys.models import ApiKey, KeyEvent, Quota, Team
from keys.secrets import hash_secret
from keys.selectors import key_info_for_secret
from keys.services import QuotaSpec, revoke_key
from relay.generation import read_config_generation
from tests import factories

pytestmark = pytest.mark.django_db

KEYS = "/api/v1/keys/"
TEAMS = "/api/v1/teams/"
KEY_PERMS = ["view_apikey", "add_apikey", "change_apikey"]
TEAM_PERMS = ["view_team", "add_team", "change_team"]


def make_user(username: str, *, perms: list[str] = (), groups: list[str] = ()) -> Any:
    user = get_user_model().objects.create_user(username, is_staff=bool(perms))
    user.user_permissions.set(
        Permission.objects.filter(content_type__app_label="keys", codename__in=perms)
    )
    for name in groups:
        user.groups.add(Group.objects.get_or_create(name=name)[0])
    return user


def jwt_client(user: Any) -> APIClient:
    client = APIClient()
    token = RefreshToken.for_user(user).access_token
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {token}")
    return client


@pytest.fixture
def staff() -> Any:
    return make_user("key-admin", perms=KEY_PERMS + TEAM_PERMS)


@pytest.fixture
def api(staff: Any) -> APIClient:
    return jwt_client(staff)


def test_a_script_signs_in_with_a_password_and_learns_who_it_is(django_user_model):
    django_user_model.objects.create_user("ops", password="s3cret-pass", is_staff=True)
    client = APIClient()

    tokens = client.post(
        "/api/v1/auth/token/", {"username": "ops", "password": "s3cret-pass"}
    ).json()
    refreshed = client.post(
        "/api/v1/auth/token/refresh/", {"refresh": tokens["refresh"]}
    )
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {refreshed.json()['access']}")
    me = client.get("/api/v1/auth/me/")

    assert refreshed.status_code == 200
    assert me.status_code == 200
    body = me.json()
    assert body["username"] == "ops" and body["is_staff"] is True
    assert body["groups"] == [] and body["role"] == "user"


def test_me_names_the_finance_role_and_the_admin_role(staff):
    finance = make_user("fiona", groups=["finance"])

    roles = [jwt_client(u).get("/api/v1/auth/me/").json() for u in (finance, staff)]

    assert [r["role"] for r in roles] == ["finance", "admin"]
    assert roles[0]["groups"] == ["finance"]


def test_without_a_token_every_route_answers_401():
    key, _ = factories.make_key()
    client = APIClient()

    statuses = [
        client.get(KEYS).status_code,
        client.get(f"{KEYS}{key.pk}/").status_code,
        client.post(f"{KEYS}{key.pk}/revoke/").status_code,
        client.get(TEAMS).status_code,
        client.get("/api/v1/auth/me/").status_code,
    ]

    assert statuses == [401] * 5
    assert ApiKey.objects.get().revoked_at is None


def test_creating_a_key_answers_its_secret_once_and_stores_only_the_hash(
    api, staff, django_capture_on_commit_callbacks
):
    team = factories.make_team("payments")
    owner = make_user("app-owner")
    before = read_config_generation()

    with django_capture_on_commit_callbacks(execute=True):
        response = api.post(
            KEYS,
            {
                "name": "  billing app ",
                "owner": owner.pk,
                "team": team.pk,
                "allowed_models": ["gpt-4o-mini", "router/*"],
                "ip_allowlist": ["10.0.0.0/8", "192.168.1.7"],
                "expires_at": "2030-01-01T00:00:00Z",
                "quotas": [
                    {"metric": "requests", "period": "minute", "limit": "60"},
                    {"metric": "cost_usd", "period": "month", "limit": "12.50"},
                ],
                "log_bodies": True,
            },
            format="json",
        )

    assert response.status_code == 201, response.content
    assert response["Cache-Control"] == "no-store"
    body = response.json()
    key = ApiKey.objects.get()
    secret = body["secret"]
    assert secret.startswith(f"sk-gw-{key.prefix}-")
    assert key.secret_hash == hash_secret(secret)
    assert body["id"] == key.pk and body["prefix"] == key.prefix
    assert body["status"] == "active" and body["name"] == "billing app"
    assert (body["owner"], body["team"]) == (owner.pk, team.pk)
    assert body["ip_allowlist"] == ["10.0.0.0/8", "192.168.1.7/32"]
    assert body["expires_at"] == "2030-01-01T00:00:00Z"
    assert body["quotas"] == [
        {"metric": "cost_usd", "period": "month", "limit": "12.5000000000"},
        {"metric": "requests", "period": "minute", "limit": "60.0000000000"},
    ]
    assert body["log_bodies"] is True and body["allow_unpriced"] is False
    assert (
        "secret_hash" not in body and key.secret_hash not in response.content.decode()
    )
    assert key.created_by == staff
    assert read_config_generation() > before
    info = key_info_for_secret(secret)
    assert info is not None and info.allows_model("router/x")


def test_the_secret_is_never_in_a_later_answer(api):
    created = api.post(KEYS, {"name": "billing"}, format="json").json()
    key = ApiKey.objects.get()

    answers = [
        api.get(KEYS),
        api.get(f"{KEYS}{key.pk}/"),
        api.patch(f"{KEYS}{key.pk}/", {"name": "renamed"}, format="json"),
        api.post(f"{KEYS}{key.pk}/revoke/"),
    ]

    for answer in answers:
        assert answer.status_code == 200
        text = answer.content.decode()
        assert created["secret"] not in text and key.secret_hash not in text
        assert (
            "secret" not in answer.json() if isinstance(answer.json(), dict) else True
        )


def test_a_key_lists_and_reads_with_the_spec_fields_and_filters(api):
    team = factories.make_team()
    listed, _ = factories.make_key(name="listed key", team=team)
    factories.make_key(name="other key")
    gone, _ = factories.make_key(name="revoked key", team=team)
    revoke_key(key=gone)

    everything = api.get(KEYS).json()
    by_team = api.get(KEYS, {"team": team.pk, "status": "active"}).json()
    by_prefix = api.get(KEYS, {"search": f"sk-gw-{listed.prefix}-…"}).json()
    one = api.get(f"{KEYS}{listed.pk}/").json()

    assert everything["count"] == 3
    assert [k["name"] for k in everything["results"]] == [
        "revoked key",
        "other key",
        "listed key",
    ]
    assert [k["id"] for k in by_team["results"]] == [listed.pk]
    assert [k["id"] for k in by_prefix["results"]] == [listed.pk]
    assert set(one) == {
        "id",
        "name",
        "prefix",
        "status",
        "team",
        "owner",
        "allowed_models",
        "ip_allowlist",
        "expires_at",
        "revoked_at",
        "created_at",
        "quotas",
        "log_bodies",
        "allow_unpriced",
    }


def test_a_bad_list_filter_is_a_400(api):
    response = api.get(KEYS, {"status": "sleeping", "team": "x"})

    assert response.status_code == 400
    assert set(response.json()) == {"status", "team"}


def test_patching_a_key_changes_only_what_was_sent_and_replaces_the_quotas(
    api, django_capture_on_commit_callbacks
):
    key, secret = factories.make_key(
        name="app",
        models=["gpt-4o"],
        quotas=[QuotaSpec("tokens", "minute", Decimal(1000))],
    )
    team = factories.make_team()
    before = read_config_generation()

    with django_capture_on_commit_callbacks(execute=True):
        response = api.patch(
            f"{KEYS}{key.pk}/",
            {
                "team": team.pk,
                "ip_allowlist": ["127.0.0.1"],
                "expires_at": None,
                "quotas": [{"metric": "cost_usd", "period": "day", "limit": "5"}],
                "allow_unpriced": True,
            },
            format="json",
        )

    assert response.status_code == 200, response.content
    key.refresh_from_db()
    assert (key.name, key.allowed_models, key.team) == ("app", ["gpt-4o"], team)
    assert key.ip_allowlist == ["127.0.0.1/32"] and key.allow_unpriced
    assert list(key.quotas.values_list("metric", "period", "limit")) == [
        ("cost_usd", "day", Decimal(5))
    ]
    assert response.json()["quotas"] == [
        {"metric": "cost_usd", "period": "day", "limit": "5.0000000000"}
    ]
    assert key.secret_hash == hash_secret(secret)
    assert read_config_generation() > before


@pytest.mark.parametrize(
    "payload, field",
    [
        ({"ip_allowlist": ["10.0.0.0/8", "not-an-ip"]}, "ip_allowlist"),
        ({"name": "   "}, "name"),
        (
            {"quotas": [{"metric": "requests", "period": "week", "limit": "1"}]},
            "quotas",
        ),
        ({"quotas": [{"metric": "tokens", "period": "day", "limit": "-1"}]}, "quotas"),
        (
            {
                "quotas": [
                    {"metric": "tokens", "period": "day", "limit": "1"},
                    {"metric": "tokens", "period": "day", "limit": "2"},
                ]
            },
            "quotas",
        ),
        ({"team": 999999}, "team"),
        ({"expires_at": "yesterday"}, "expires_at"),
        ({"allowed_models": "gpt-4o"}, "allowed_models"),
    ],
)
def test_invalid_changes_are_refused_with_a_400_naming_the_field(api, payload, field):
    key, _ = factories.make_key(name="app")

    response = api.patch(f"{KEYS}{key.pk}/", payload, format="json")

    assert response.status_code == 400
    assert field in response.json()
    key.refresh_from_db()
    assert key.name == "app" and not key.quotas.exists()
    assert not KeyEvent.objects.filter(action="changed").exists()


def test_a_service_refusal_is_a_400_in_drfs_shape_not_a_500(api):
    key, _ = factories.make_key()
    revoke_key(key=key)

    response = api.post(f"{KEYS}{key.pk}/rotate/", {"grace_seconds": 10}, format="json")

    assert response.status_code == 400
    assert response.json() == {"non_field_errors": ["a revoked key cannot be rotated"]}


def test_only_json_bodies_are_accepted(api):
    response = api.post(KEYS, {"name": "form-encoded"})

    assert response.status_code == 415
    assert not ApiKey.objects.exists()


def test_rotating_without_grace_answers_a_new_secret_and_retires_the_old_one(
    api, django_capture_on_commit_callbacks
):
    key, old = factories.make_key()
    before = read_config_generation()

    with django_capture_on_commit_callbacks(execute=True):
        response = api.post(f"{KEYS}{key.pk}/rotate/", format="json")

    assert response.status_code == 200
    body = response.json()
    assert body["id"] == key.pk and body["secret"] != old
    assert body["previous_secret_valid_until"] is None
    assert response["Cache-Control"] == "no-store"
    assert key_info_for_secret(old) is None
    new = key_info_for_secret(body["secret"])
    assert new is not None and new.id == key.pk
    assert read_config_generation() > before


def test_rotating_with_grace_keeps_the_old_secret_until_the_answered_time(api):
    key, old = factories.make_key()

    body = api.post(
        f"{KEYS}{key.pk}/rotate/", {"grace_seconds": 600}, format="json"
    ).json()

    until = body["previous_secret_valid_until"]
    info = key_info_for_secret(old)
    assert info is not None and info.id == key.pk
    assert info.valid_until is not None and info.valid_until.isoformat().startswith(
        until.replace("Z", "+00:00")[:19]
    )
    assert (
        timedelta(seconds=590)
        < info.valid_until - timezone.now()
        <= timedelta(seconds=600)
    )


def test_a_grace_period_over_a_week_is_refused(api):
    key, secret = factories.make_key()

    response = api.post(
        f"{KEYS}{key.pk}/rotate/", {"grace_seconds": 8 * 24 * 3600}, format="json"
    )

    assert response.status_code == 400 and "grace_seconds" in response.json()
    assert ApiKey.objects.get().secret_hash == hash_secret(secret)


def test_revoking_answers_the_revoked_key_and_is_idempotent(
    api, staff, django_capture_on_commit_callbacks
):
    key, secret = factories.make_key()

    with django_capture_on_commit_callbacks(execute=True):
        first = api.post(f"{KEYS}{key.pk}/revoke/")
    again = api.post(f"{KEYS}{key.pk}/revoke/")

    assert first.status_code == again.status_code == 200
    assert first.json()["status"] == "revoked" and first.json()["revoked_at"]
    assert again.json()["revoked_at"] == first.json()["revoked_at"]
    key.refresh_from_db()
    assert key.revoked_by == staff
    info = key_info_for_secret(secret)
    assert info is not None and not info.is_usable(timezone.now())
    assert KeyEvent.objects.filter(key=key, action="revoked").count() == 1


def test_an_expiry_in_the_past_makes_the_key_expired(api):
    key, secret = factories.make_key()
    past = (timezone.now() - timedelta(seconds=1)).isoformat()

    response = api.patch(f"{KEYS}{key.pk}/", {"expires_at": past}, format="json")

    assert response.json()["status"] == "expired"
    info = key_info_for_secret(secret)
    assert info is not None and not info.is_usable(timezone.now())


def test_staff_create_read_and_change_teams_with_quotas(
    api, django_capture_on_commit_callbacks
):
    created = api.post(
        TEAMS,
        {
            "name": "research",
            "quotas": [{"metric": "cost_usd", "period": "month", "limit": "100"}],
        },
        format="json",
    )
    team = Team.objects.get(name="research")
    duplicate = api.post(TEAMS, {"name": "research"}, format="json")
    before = read_config_generation()
    with django_capture_on_commit_callbacks(execute=True):
        changed = api.patch(
            f"{TEAMS}{team.pk}/", {"name": "research-2", "quotas": []}, format="json"
        )
    listed = api.get(TEAMS).json()

    assert created.status_code == 201
    assert created.json()["quotas"] == [
        {"metric": "cost_usd", "period": "month", "limit": "100.0000000000"}
    ]
    assert duplicate.status_code == 400 and "name" in duplicate.json()
    assert changed.status_code == 200
    assert changed.json() == {**changed.json(), "name": "research-2", "quotas": []}
    assert not Quota.objects.filter(team=team).exists()
    assert read_config_generation() > before
    assert [t["name"] for t in listed["results"]] == ["research-2"]


def test_renaming_a_team_to_a_taken_name_is_a_400(api):
    factories.make_team("taken")
    team = factories.make_team("mine")

    response = api.patch(f"{TEAMS}{team.pk}/", {"name": "taken"}, format="json")

    assert response.status_code == 400
    assert Team.objects.get(pk=team.pk).name == "mine"


def test_put_and_delete_are_not_offered(api):
    key, _ = factories.make_key()
    team = factories.make_team()

    answers = [
        api.put(f"{KEYS}{key.pk}/", {"name": "x"}, format="json"),
        api.delete(f"{KEYS}{key.pk}/"),
        api.delete(f"{TEAMS}{team.pk}/"),
    ]

    # Teams check model permissions first: no one holds a "delete" one that works.
    assert [a.status_code for a in answers] == [405, 405, 403]
    assert ApiKey.objects.filter(pk=key.pk, name=key.name).exists()
    assert Team.objects.filter(pk=team.pk).exists()


def test_the_admin_session_works_too(admin_client):
    key, _ = factories.make_key()

    response = admin_client.get(f"{KEYS}{key.pk}/")

    assert response.status_code == 200
    assert json.loads(response.content)["id"] == key.pk
