"""A key's whole life through each interface an admin has: Django admin (pages, with
the test client), the REST API (with a JWT) and the management commands. Then the
same over HTTP against two real web processes: what the REST API does is refused by
both within a second."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from datetime import timedelta
from io import StringIO
from pathlib import Path
from typing import Any

import httpx
import pytest
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.urls import reverse
from django.utils import timezone
from rest_framework.test import APIClient
from rest_framework_simplejwt.tokens import RefreshToken

from keys.models import ApiKey, KeyEvent
from keys.selectors import key_info_for_secret
from tests.keys.test_admin import ADD_URL, change_form, key_form
from tests.support.gateway import start_gateway, wait_for_config
from tests.support.servers import ServerProcess

SECRET = re.compile(r"^sk-gw-[A-Za-z0-9]{8}-[A-Za-z0-9_-]{32,}$")


def works(secret: str) -> bool:
    """Whether the relay would accept this secret now (the snapshot it reads)."""
    info = key_info_for_secret(secret)
    return info is not None and info.is_usable(timezone.now())


def actions(key: ApiKey) -> list[str]:
    return list(
        KeyEvent.objects.filter(key=key)
        .order_by("at", "id")
        .values_list("action", flat=True)
    )


# --- in process: admin, REST, commands -------------------------------------------------


@pytest.mark.django_db
def test_the_whole_lifecycle_in_admin_pages(admin_client):
    issued = admin_client.post(ADD_URL, key_form(name="admin-app"))
    key = ApiKey.objects.get(name="admin-app")
    first = issued.context["secret"]
    rotate_url = reverse("admin:keys_apikey_rotate", args=[key.pk])

    second = admin_client.post(rotate_url, {"grace_seconds": "0"}).context["secret"]
    first_after_rotation = works(first)
    third = admin_client.post(rotate_url, {"grace_seconds": "600"}).context["secret"]
    both_in_grace = works(second) and works(third)
    key.refresh_from_db()
    past = timezone.localtime(timezone.now() - timedelta(minutes=1))
    admin_client.post(
        reverse("admin:keys_apikey_change", args=[key.pk]),
        change_form(
            key,
            expires_at_0=past.strftime("%Y-%m-%d"),
            expires_at_1=past.strftime("%H:%M:%S"),
        ),
    )
    expired = not works(third)
    admin_client.post(
        reverse("admin:keys_apikey_change", args=[key.pk]), change_form(key)
    )
    usable_again = works(third)
    admin_client.post(reverse("admin:keys_apikey_revoke", args=[key.pk]))

    assert SECRET.match(first) and SECRET.match(second) and SECRET.match(third)
    assert not first_after_rotation
    assert both_in_grace
    assert expired and usable_again
    assert not works(third) and not works(second)
    assert ApiKey.objects.get(pk=key.pk).status() == ApiKey.Status.REVOKED
    assert actions(key) == [
        "issued",
        "rotated",
        "rotated",
        "changed",
        "changed",
        "revoked",
    ]


@pytest.mark.django_db
def test_the_whole_lifecycle_over_rest_with_a_jwt(django_user_model):
    django_user_model.objects.create_superuser("ops", password="lifecycle-pass")
    client = APIClient()
    token = client.post(
        "/api/v1/auth/token/", {"username": "ops", "password": "lifecycle-pass"}
    ).json()["access"]
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {token}")

    created = client.post("/api/v1/keys/", {"name": "rest-app"}, format="json").json()
    url = f"/api/v1/keys/{created['id']}/"
    second = client.post(f"{url}rotate/", {}, format="json").json()["secret"]
    first_after_rotation = works(created["secret"])
    third = client.post(f"{url}rotate/", {"grace_seconds": 600}, format="json").json()
    both_in_grace = works(second) and works(third["secret"])
    past = (timezone.now() - timedelta(seconds=1)).isoformat()
    expired = client.patch(url, {"expires_at": past}, format="json").json()
    expired_works = works(third["secret"])
    client.patch(url, {"expires_at": None}, format="json")
    usable_again = works(third["secret"])
    revoked = client.post(f"{url}revoke/").json()

    assert SECRET.match(created["secret"]) and SECRET.match(third["secret"])
    assert third["id"] == created["id"]  # the id survives rotation
    assert not first_after_rotation and both_in_grace
    assert expired["status"] == "expired" and not expired_works
    assert usable_again
    assert revoked["status"] == "revoked"
    assert not works(third["secret"]) and not works(second)
    key = ApiKey.objects.get(pk=created["id"])
    assert actions(key) == [
        "issued",
        "rotated",
        "rotated",
        "changed",
        "changed",
        "revoked",
    ]


@pytest.mark.django_db
def test_the_lifecycle_with_the_commands():
    soon = (timezone.now() + timedelta(seconds=30)).isoformat()
    out = StringIO()

    call_command("createkey", "--name", "cli-app", "--expires", soon, stdout=out)
    secret = out.getvalue().splitlines()[-1]
    usable = works(secret)
    info = key_info_for_secret(secret)
    call_command("revokekey", "cli-app", stdout=StringIO())

    assert SECRET.match(secret) and usable
    assert info is not None and not info.is_usable(
        timezone.now() + timedelta(seconds=31)
    )
    assert not works(secret)
    # There is no rotate command (yet): admin and REST rotate.
    assert actions(ApiKey.objects.get(name="cli-app")) == ["issued", "revoked"]


# --- over HTTP: two web processes ----------------------------------------------------


@pytest.fixture(scope="module")
def two_gateways(
    django_db_setup: None, django_db_blocker: Any, spool_dir: Path
) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    with django_db_blocker.unblock():
        first = start_gateway(spool_dir)
        try:
            second = start_gateway(spool_dir)
        except BaseException:
            first.stop()
            raise
    yield first, second
    first.stop()
    second.stop()


def relay_answer(server: ServerProcess, secret: str) -> int:
    response = httpx.get(
        f"{server.url}/v1/models", headers={"authorization": f"Bearer {secret}"}
    )
    return response.status_code


def seconds_until_every_server_answers(
    servers: tuple[ServerProcess, ...], secret: str, status: int, limit: float = 5.0
) -> float:
    """How long until each server answers `status` for `secret` (the slowest one)."""
    started = time.monotonic()
    pending = set(range(len(servers)))
    while pending and time.monotonic() - started < limit:
        for index in list(pending):
            if relay_answer(servers[index], secret) == status:
                pending.discard(index)
        time.sleep(0.01)
    assert not pending, f"servers {pending} never answered {status}"
    return time.monotonic() - started


@pytest.fixture
def rest(transactional_db: None) -> httpx.Client:
    user = get_user_model().objects.create_superuser("rest-admin")
    token = RefreshToken.for_user(user).access_token
    return httpx.Client(headers={"authorization": f"Bearer {token}"}, timeout=10)


def test_a_key_revoked_over_rest_is_refused_by_both_processes_within_a_second(
    two_gateways, rest
):
    api = f"{two_gateways[0].url}/api/v1/keys/"
    created = rest.post(api, json={"name": "two-process"}).json()
    for server in two_gateways:
        wait_for_config(server)
        assert relay_answer(server, created["secret"]) == 200

    revoked = rest.post(f"{api}{created['id']}/revoke/")
    elapsed = seconds_until_every_server_answers(two_gateways, created["secret"], 401)

    assert revoked.status_code == 200
    assert elapsed < 1.0


def test_a_rest_rotation_without_grace_moves_both_processes_to_the_new_secret(
    two_gateways, rest
):
    api = f"{two_gateways[1].url}/api/v1/keys/"
    created = rest.post(api, json={"name": "rotating"}).json()
    for server in two_gateways:
        wait_for_config(server)
        assert relay_answer(server, created["secret"]) == 200

    rotated = rest.post(f"{api}{created['id']}/rotate/", json={}).json()
    elapsed = seconds_until_every_server_answers(two_gateways, created["secret"], 401)

    assert elapsed < 1.0
    assert [relay_answer(s, rotated["secret"]) for s in two_gateways] == [200, 200]


def test_a_rest_rotation_with_grace_keeps_the_old_secret_on_both_processes(
    two_gateways, rest
):
    api = f"{two_gateways[0].url}/api/v1/keys/"
    created = rest.post(api, json={"name": "graceful"}).json()

    rotated = rest.post(
        f"{api}{created['id']}/rotate/", json={"grace_seconds": 300}
    ).json()
    for server in two_gateways:
        wait_for_config(server)

    answers = [
        relay_answer(server, secret)
        for server in two_gateways
        for secret in (created["secret"], rotated["secret"])
    ]
    assert answers == [200, 200, 200, 200]
    assert rotated["previous_secret_valid_until"] is not None


def test_an_expiry_set_over_rest_is_refused_by_both_processes_within_a_second(
    two_gateways, rest
):
    api = f"{two_gateways[0].url}/api/v1/keys/"
    created = rest.post(api, json={"name": "expiring"}).json()
    for server in two_gateways:
        wait_for_config(server)
        assert relay_answer(server, created["secret"]) == 200

    past = (timezone.now() - timedelta(seconds=1)).isoformat()
    patched = rest.patch(f"{api}{created['id']}/", json={"expires_at": past})
    elapsed = seconds_until_every_server_answers(two_gateways, created["secret"], 401)

    assert patched.json()["status"] == "expired"
    assert elapsed < 1.0
