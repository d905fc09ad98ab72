"""Keys' IP allowlists through real gateway processes: X-Forwarded-For counts only
when GATEWAY_TRUSTED_PROXIES names the peer, whichever server runs the gateway."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests import factories
from tests.support.gateway import start_gateway, wait_for_config
from tests.support.servers import ServerProcess

pytestmark = pytest.mark.django_db(transaction=True)

MESSAGES = [{"role": "user", "content": "where am I calling from"}]
ALLOWLIST = ["203.0.113.0/24"]


def chat(url: str, secret: str, model: str, forwarded_for: str | None = None):
    headers = {"authorization": f"Bearer {secret}"}
    if forwarded_for is not None:
        headers["x-forwarded-for"] = forwarded_for
    return httpx.post(
        f"{url}/v1/chat/completions",
        json={"model": model, "messages": MESSAGES},
        headers=headers,
        timeout=30,
    )


@pytest.fixture(scope="module")
def trusting_gateway(
    django_db_setup: None, django_db_blocker: Any, spool_dir: Path
) -> Iterator[ServerProcess]:
    """A gateway that believes X-Forwarded-For from 127.0.0.1."""
    with django_db_blocker.unblock():
        server = start_gateway(spool_dir, env={"GATEWAY_TRUSTED_PROXIES": "127.0.0.1"})
    yield server
    server.stop()


@pytest.fixture(scope="module", params=["uvicorn", "daphne"])
def self_forwarding_gateway(
    request: pytest.FixtureRequest,
    django_db_setup: None,
    django_db_blocker: Any,
    spool_dir: Path,
) -> Iterator[ServerProcess]:
    """A gateway whose server rewrites the client from X-Forwarded-For itself:
    uvicorn as SPEC's command line types it, daphne with --proxy-headers."""
    with django_db_blocker.unblock():
        server = start_gateway(
            spool_dir, server=request.param, server_proxy_headers=True
        )
    yield server
    server.stop()


def test_a_forwarded_address_from_an_untrusted_peer_is_refused_and_still_a_row(
    live, wait_for_rows
):
    key, secret = factories.make_key(ip_allowlist=ALLOWLIST)
    wait_for_config(live["server"])

    response = chat(live["url"], secret, live["model"], forwarded_for="203.0.113.5")

    assert response.status_code == 403
    assert response.json()["error"]["code"] == "permission_denied"
    [row] = wait_for_rows(key=key)
    assert row.status_code == 403 and row.error_code == "permission_denied"
    assert row.prompt_tokens == row.completion_tokens == 0


def test_a_forwarded_address_from_a_trusted_proxy_is_admitted(
    trusting_gateway, relay_config, wait_for_rows
):
    key, secret = factories.make_key(ip_allowlist=ALLOWLIST)
    wait_for_config(trusting_gateway)

    response = chat(
        trusting_gateway.url, secret, relay_config["model"], forwarded_for="203.0.113.5"
    )

    assert response.status_code == 200
    [row] = wait_for_rows(key=key)
    assert row.status_code == 200 and row.completion_tokens > 0


@pytest.mark.parametrize(
    "forwarded_for",
    [
        None,  # the proxy itself, 127.0.0.1
        "198.51.100.7",  # a client outside the allowlist
        "203.0.113.5, 198.51.100.7",  # ... that put an allowed address first
        "203.0.113.5, unknown",  # the trusted proxy's own claim is unusable
    ],
)
def test_through_a_trusted_proxy_the_first_untrusted_address_is_judged(
    trusting_gateway, relay_config, wait_for_rows, forwarded_for
):
    key, secret = factories.make_key(ip_allowlist=ALLOWLIST)
    wait_for_config(trusting_gateway)

    response = chat(trusting_gateway.url, secret, relay_config["model"], forwarded_for)

    assert response.status_code == 403
    assert response.json()["error"]["code"] == "permission_denied"
    [row] = wait_for_rows(key=key)
    assert row.error_code == "permission_denied"


def test_a_server_that_rewrites_the_client_itself_cannot_admit_a_forwarded_address(
    self_forwarding_gateway, relay_config, wait_for_rows
):
    key, secret = factories.make_key(ip_allowlist=ALLOWLIST)
    wait_for_config(self_forwarding_gateway)

    response = chat(
        self_forwarding_gateway.url,
        secret,
        relay_config["model"],
        forwarded_for="203.0.113.5",
    )

    assert response.status_code == 403
    assert response.json()["error"]["code"] == "permission_denied"
    [row] = wait_for_rows(key=key)
    assert row.error_code == "permission_denied"


def test_a_server_that_rewrites_the_client_itself_still_judges_plain_requests(
    self_forwarding_gateway, relay_config
):
    _, secret = factories.make_key(ip_allowlist=["127.0.0.1"])
    wait_for_config(self_forwarding_gateway)

    response = chat(self_forwarding_gateway.url, secret, relay_config["model"])

    assert response.status_code == 200
