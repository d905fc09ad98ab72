"""The gateway as deployed: on daphne as well as uvicorn, several processes at once,
and its request body limit."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from keys.services import revoke_key
from tests.support.gateway import start_gateway, wait_for_config
from tests.support.servers import ServerProcess

pytestmark = pytest.mark.django_db(transaction=True)

MESSAGES = [{"role": "user", "content": "hello from another server"}]
BODY_LIMIT = 1000


@pytest.fixture(scope="module")
def daphne(
    django_db_setup: None, django_db_blocker: Any, spool_dir: Path
) -> Iterator[ServerProcess]:
    with django_db_blocker.unblock():
        server = start_gateway(spool_dir, server="daphne")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def two_uvicorns(
    django_db_setup: None, django_db_blocker: Any, spool_dir: Path
) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    """Two web processes sharing the database (and Redis when configured)."""
    env = {"GATEWAY_MAX_BODY_BYTES": str(BODY_LIMIT)}
    with django_db_blocker.unblock():
        first = start_gateway(spool_dir, env=env)
        try:
            second = start_gateway(spool_dir, env=env)
        except BaseException:
            first.stop()
            raise
    yield first, second
    first.stop()
    second.stop()


def sdk(server: ServerProcess, secret: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=secret, max_retries=0)


def test_daphne_relays_a_completion_and_a_stream_and_meters_both(
    daphne, relay_config, wait_for_rows
):
    wait_for_config(daphne)
    client = sdk(daphne, relay_config["secret"])

    completion = client.chat.completions.create(
        model=relay_config["model"], messages=MESSAGES
    )
    stream = client.chat.completions.create(
        model=relay_config["model"], messages=MESSAGES, stream=True
    )
    chunks = list(stream)

    assert completion.choices[0].message.content == "tok0 tok1 tok2 tok3 tok4"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == "tok0 tok1 tok2 tok3 tok4 "
    assert all(c.usage is None for c in chunks)
    rows = wait_for_rows(2, key=relay_config["key"])
    assert [row.stream for row in rows] == [False, True]
    assert all(row.status_code == 200 for row in rows)
    assert all((row.prompt_tokens, row.completion_tokens) == (4, 5) for row in rows)
    assert all(row.usage_source == "provider" for row in rows)


def test_daphne_answers_a_bad_key_in_openais_shape(daphne):
    response = httpx.get(
        f"{daphne.url}/v1/models", headers={"authorization": "Bearer sk-gw-nope"}
    )

    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_api_key"
    assert response.headers["x-request-id"].startswith("req_")


def test_a_revoked_key_is_refused_by_every_process_within_a_second(
    two_uvicorns, relay_config
):
    servers = two_uvicorns
    headers = {"authorization": f"Bearer {relay_config['secret']}"}
    for server in servers:
        wait_for_config(server)
        # Each process now holds the key in its cache.
        assert httpx.get(f"{server.url}/v1/models", headers=headers).status_code == 200
    refused_after: dict[str, float] = {}

    revoke_key(key=relay_config["key"])
    started = time.monotonic()
    while len(refused_after) < len(servers) and time.monotonic() - started < 5:
        for server in servers:
            if server.url in refused_after:
                continue
            status = httpx.get(f"{server.url}/v1/models", headers=headers).status_code
            if status == 401:
                refused_after[server.url] = time.monotonic() - started
        time.sleep(0.01)

    assert set(refused_after) == {server.url for server in servers}
    assert max(refused_after.values()) < 1.0, refused_after


def test_a_body_over_the_limit_is_refused_with_413(two_uvicorns, relay_config):
    server = two_uvicorns[0]
    wait_for_config(server)
    padding = "x" * (BODY_LIMIT + 1)

    response = httpx.post(
        f"{server.url}/v1/chat/completions",
        json={"model": relay_config["model"], "messages": MESSAGES, "user": padding},
        headers={"authorization": f"Bearer {relay_config['secret']}"},
    )

    assert response.status_code == 413
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}


def test_a_chunked_body_over_the_limit_is_refused_with_413(
    two_uvicorns, relay_config, wait_for_rows
):
    server = two_uvicorns[0]
    wait_for_config(server)

    def body() -> Iterator[bytes]:
        # No content-length: the limit must hold while the body is read.
        yield b'{"model": "fake-chat", "messages": [], "user": "'
        for _ in range(BODY_LIMIT // 100 + 1):
            yield b"x" * 100
        yield b'"}'

    response = httpx.post(
        f"{server.url}/v1/chat/completions",
        content=body(),
        headers={"authorization": f"Bearer {relay_config['secret']}"},
    )

    assert response.status_code == 413
    [row] = wait_for_rows(key=relay_config["key"])
    assert row.status_code == 413


def test_a_body_under_the_limit_is_accepted(two_uvicorns, relay_config):
    server = two_uvicorns[1]
    wait_for_config(server)

    response = httpx.post(
        f"{server.url}/v1/chat/completions",
        json={"model": relay_config["model"], "messages": MESSAGES},
        headers={"authorization": f"Bearer {relay_config['secret']}"},
    )

    assert response.status_code == 200
