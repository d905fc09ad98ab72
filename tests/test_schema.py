"""The OpenAPI schema against the running API (schemathesis): for every operation of
/api/schema/, generated requests (valid and invalid) never get a 5xx, and every
documented answer matches its schema. Signed in as staff, so the operations run
for real instead of stopping at 401/403."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import httpx
import pytest
from django.contrib.auth import get_user_model
from hypothesis import HealthCheck, given, settings
from rest_framework_simplejwt.tokens import RefreshToken

from keys.services import QuotaSpec
from tests import factories
from tests.support.services import IN_CI

if not IN_CI:  # CI must have it (requirements-dev.txt): there the import fails loudly
    pytest.importorskip("schemathesis")
import schemathesis  # noqa: E402
from schemathesis.checks import (  # noqa: E402
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.generation import GenerationMode  # noqa: E402

# Routes whose every status code is in the schema (keys/ app and the JWT routes);
# the others are held to "no 5xx, and documented answers match".
FULLY_DOCUMENTED = (
    "/api/v1/keys/",
    "/api/v1/teams/",
    "/api/v1/auth/me/",
    "/api/v1/auth/token/",
)
# Keep each operation short: ~20 operations x 20 examples stay under a minute.
EXAMPLES = 20


@pytest.fixture
def staff_token(transactional_db: None) -> str:
    user = get_user_model().objects.create_superuser("schema-admin")
    # Something for the generated ids to find: small ids, as hypothesis tries first.
    team = factories.make_team("schema-team")
    for n in range(3):
        factories.make_key(
            name=f"schema-key-{n}",
            team=team,
            quotas=[QuotaSpec("requests", "minute", Decimal(60))],
        )
    return str(RefreshToken.for_user(user).access_token)


@pytest.fixture
def password_user(transactional_db: None) -> tuple[str, str]:
    get_user_model().objects.create_user("schema-user", password="schema-pw-1")
    return "schema-user", "schema-pw-1"


def documented_codes(gateway: Any, path: str) -> set[str]:
    document = httpx.get(f"{gateway.url}/api/schema/?format=json").json()
    return set(document["paths"][path]["post"]["responses"])


def operation_labels() -> list[str]:
    """Every operation of the schema, as `METHOD /path`, for one test each.

    Read from the schema generator at collection, when no server runs yet; each
    test then loads the schema the running server serves at /api/schema/.
    """
    from drf_spectacular.generators import SchemaGenerator

    document = SchemaGenerator().get_schema(request=None, public=True)
    return [
        f"{method.upper()} {path}"
        for path, operations in document["paths"].items()
        for method in operations
        if method in {"get", "post", "put", "patch", "delete"}
    ]


OPERATIONS = operation_labels()


def test_the_schema_is_served_and_names_every_key_route(gateway):
    document = httpx.get(f"{gateway.url}/api/schema/?format=json").json()
    docs = httpx.get(f"{gateway.url}/api/docs/")

    paths = set(document["paths"])
    assert {
        "/api/v1/auth/token/",
        "/api/v1/auth/token/refresh/",
        "/api/v1/auth/me/",
        "/api/v1/keys/",
        "/api/v1/keys/{id}/",
        "/api/v1/keys/{id}/revoke/",
        "/api/v1/keys/{id}/rotate/",
        "/api/v1/teams/",
        "/api/v1/teams/{id}/",
    } <= paths
    key = document["components"]["schemas"]["ApiKey"]["properties"]
    assert "secret" not in key and "secret_hash" not in key
    assert "secret" in document["components"]["schemas"]["IssuedKey"]["properties"]
    assert docs.status_code == 200 and "swagger" in docs.text.lower()


def test_the_token_route_documents_and_answers_400_and_401(gateway, password_user):
    url = f"{gateway.url}/api/v1/auth/token/"
    username, password = password_user

    documented = documented_codes(gateway, "/api/v1/auth/token/")
    missing = httpx.post(url, json={"username": username})
    malformed = httpx.post(
        url, content=b"{not json", headers={"Content-Type": "application/json"}
    )
    wrong = httpx.post(url, json={"username": username, "password": "wrong"})
    unknown = httpx.post(url, json={"username": "nobody", "password": password})
    right = httpx.post(url, json={"username": username, "password": password})

    assert {"200", "400", "401"} <= documented
    assert (missing.status_code, malformed.status_code) == (400, 400)
    assert missing.json() == {"password": ["This field is required."]}
    assert (wrong.status_code, unknown.status_code) == (401, 401)
    assert wrong.json() == unknown.json()  # an unknown user reads as a wrong password
    assert set(wrong.json()) == {"detail"}
    assert wrong.headers["WWW-Authenticate"] == 'Bearer realm="api"'
    assert right.status_code == 200
    assert set(right.json()) == {"access", "refresh"}


def test_the_refresh_route_documents_and_answers_400_and_401(gateway, password_user):
    url = f"{gateway.url}/api/v1/auth/token/refresh/"
    username, password = password_user
    tokens = httpx.post(
        f"{gateway.url}/api/v1/auth/token/",
        json={"username": username, "password": password},
    ).json()

    documented = documented_codes(gateway, "/api/v1/auth/token/refresh/")
    missing = httpx.post(url, json={})
    garbage = httpx.post(url, json={"refresh": "not-a-token"})
    access_instead = httpx.post(url, json={"refresh": tokens["access"]})
    fresh = httpx.post(url, json={"refresh": tokens["refresh"]})

    assert {"200", "400", "401"} <= documented
    assert missing.status_code == 400
    assert missing.json() == {"refresh": ["This field is required."]}
    assert (garbage.status_code, access_instead.status_code) == (401, 401)
    assert garbage.json()["code"] == access_instead.json()["code"] == "token_not_valid"
    assert fresh.status_code == 200
    assert set(fresh.json()) == {"access"}


@pytest.mark.parametrize("label", OPERATIONS)
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_operation_answers_5xx_or_breaks_its_schema(
    gateway, staff_token, label, mode
):
    method, path = label.split(" ", 1)
    operation = schemathesis.openapi.from_url(f"{gateway.url}/api/schema/")[path][
        method
    ]
    headers = {"Authorization": f"Bearer {staff_token}"}
    checks = [not_a_server_error, response_schema_conformance]
    if path.startswith(FULLY_DOCUMENTED):
        # These routes document every answer they give, errors included.
        checks += [status_code_conformance, content_type_conformance]

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        derandomize=True,
        database=None,
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def call(case: Any) -> None:
        case.call_and_validate(
            headers=headers,
            checks=checks,
            timeout=30,
        )

    call()
