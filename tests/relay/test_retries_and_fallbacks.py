"""Upstream failures before the first byte: retries, fallbacks and the errors the
client sees, against uvicorn and the fake upstream."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import pytest

from tests import factories
from tests.support.gateway import wait_for_config
from tests.support.servers import free_port

pytestmark = pytest.mark.django_db(transaction=True)

MESSAGES = [{"role": "user", "content": "are you there"}]


def unique(directives: str) -> str:
    """An upstream model the fake has never seen, so `fail_times` counts from 0."""
    return f"fake-{uuid.uuid4().hex[:8]};{directives}"


def chat(live: dict[str, Any], model: str) -> httpx.Response:
    return httpx.post(
        f"{live['url']}/v1/chat/completions",
        json={"model": model, "messages": MESSAGES},
        headers={"authorization": f"Bearer {live['secret']}"},
        timeout=30,
    )


def seen_by_fake(fake_upstream: Any, upstream_model: str) -> int:
    seen = httpx.get(f"{fake_upstream.url}/_fake/requests").json()
    return sum(1 for r in seen if (r["body"] or {}).get("model") == upstream_model)


def test_an_upstream_500_that_clears_is_retried_and_answered(
    live, fake_upstream, wait_for_rows
):
    upstream_model = unique("fault=500;fail_times=1")
    factories.make_route("flaky", upstream_model=upstream_model)
    wait_for_config(live["server"])

    response = chat(live, "flaky")

    assert response.status_code == 200
    assert response.json()["choices"][0]["message"]["content"]
    assert seen_by_fake(fake_upstream, upstream_model) == 2
    [row] = wait_for_rows(key=live["key"])
    assert row.status_code == 200 and row.error_code == ""


def test_an_upstream_429_that_lasts_reaches_the_client_with_its_body_and_retry_after(
    live, fake_upstream, wait_for_rows
):
    upstream_model = unique("fault=429")
    factories.make_route("throttled", upstream_model=upstream_model)
    wait_for_config(live["server"])

    response = chat(live, "throttled")

    assert response.status_code == 429
    assert response.headers["retry-after"] == "1"
    assert response.json()["error"] == {
        "message": "Rate limit reached for requests (fake upstream).",
        "type": "requests",
        "param": None,
        "code": "rate_limit_exceeded",
    }
    assert response.headers["x-request-id"]
    assert seen_by_fake(fake_upstream, upstream_model) == 3  # tried, then 2 retries
    [row] = wait_for_rows(key=live["key"])
    assert row.status_code == 429 and row.error_code == "rate_limit_exceeded"


def test_an_upstream_400_is_passed_through_as_it_came_and_not_retried(
    live, fake_upstream, wait_for_rows
):
    upstream_model = unique("fault=400")
    factories.make_route("rejected", upstream_model=upstream_model)
    wait_for_config(live["server"])

    response = chat(live, "rejected")

    assert response.status_code == 400
    assert response.json() == {
        "error": {
            "message": "fake bad request",
            "type": "invalid_request_error",
            "param": None,
            "code": None,
        }
    }
    assert seen_by_fake(fake_upstream, upstream_model) == 1
    [row] = wait_for_rows(key=live["key"])
    assert row.status_code == 400
    assert row.prompt_tokens == row.completion_tokens == 0


def test_a_model_whose_upstream_keeps_failing_is_answered_by_its_fallback(
    live, fake_upstream, wait_for_rows
):
    broken = unique("fault=500")
    factories.make_provider(f"{fake_upstream.url}/v1", name="backup")
    factories.make_route(
        "good-model", provider="backup", upstream_model="fake-gpt-mini"
    )
    price = factories.make_price("good-model", input="1", output="2")
    factories.make_route(
        "always-broken", upstream_model=broken, fallbacks=["good-model"]
    )
    wait_for_config(live["server"])

    response = chat(live, "always-broken")

    assert response.status_code == 200
    assert response.json()["choices"][0]["message"]["content"]
    assert seen_by_fake(fake_upstream, broken) == 3
    assert seen_by_fake(fake_upstream, "fake-gpt-mini") == 1
    [row] = wait_for_rows(key=live["key"])
    assert row.status_code == 200
    assert row.model == "good-model"
    assert (row.provider, row.upstream_model) == ("backup", "fake-gpt-mini")
    assert row.price_id == price.pk


def test_an_upstream_answer_that_is_not_json_becomes_a_502(live, wait_for_rows):
    factories.make_route("garbled", upstream_model=unique("fault=garbage"))
    wait_for_config(live["server"])

    response = chat(live, "garbled")

    assert response.status_code == 502
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == "upstream_error"
    assert "<html>" not in response.text
    [row] = wait_for_rows(key=live["key"])
    assert row.status_code == 502 and row.error_code == "upstream_error"


def test_an_unreachable_upstream_becomes_a_502(live, wait_for_rows):
    factories.make_provider(f"http://127.0.0.1:{free_port()}/v1", name="nowhere")
    factories.make_route("unreachable", provider="nowhere", upstream_model="fake-gpt")
    wait_for_config(live["server"])

    response = chat(live, "unreachable")

    assert response.status_code == 502
    assert response.json()["error"]["code"] == "upstream_error"
    [row] = wait_for_rows(key=live["key"])
    assert row.status_code == 502 and row.error_code == "upstream_error"
    assert row.model == "unreachable"


def test_a_row_for_a_failed_upstream_names_the_provider_that_failed(
    live, wait_for_rows
):
    factories.make_provider(f"http://127.0.0.1:{free_port()}/v1", name="nowhere")
    factories.make_route("unreachable", provider="nowhere", upstream_model="fake-gpt")
    wait_for_config(live["server"])

    chat(live, "unreachable")

    [row] = wait_for_rows(key=live["key"])
    assert (row.provider, row.upstream_model) == ("nowhere", "fake-gpt")


def test_an_answer_the_upstream_cuts_off_becomes_a_502(live, wait_for_rows):
    factories.make_route("cut-short", upstream_model=unique("fault=truncate"))
    wait_for_config(live["server"])

    response = chat(live, "cut-short")

    assert response.status_code == 502
    assert response.json()["error"]["code"] == "upstream_error"
    [row] = wait_for_rows(key=live["key"])
    assert row.status_code == 502 and row.completion_tokens == 0


def test_a_model_whose_provider_is_unreachable_is_answered_by_its_fallback(
    live, wait_for_rows
):
    factories.make_provider(f"http://127.0.0.1:{free_port()}/v1", name="nowhere")
    factories.make_route(
        "primary", provider="nowhere", upstream_model="fake-gpt", fallbacks=["backup"]
    )
    factories.make_route("backup", upstream_model="fake-gpt-mini")
    wait_for_config(live["server"])

    response = chat(live, "primary")

    assert response.status_code == 200
    [row] = wait_for_rows(key=live["key"])
    assert (row.model, row.provider, row.upstream_model) == (
        "backup",
        "fake",
        "fake-gpt-mini",
    )


def test_a_stream_whose_upstream_fails_before_the_first_byte_is_retried(
    live, fake_upstream, wait_for_rows
):
    upstream_model = unique("fault=503;fail_times=2")
    factories.make_route("flaky-stream", upstream_model=upstream_model)
    wait_for_config(live["server"])

    with httpx.stream(
        "POST",
        f"{live['url']}/v1/chat/completions",
        json={"model": "flaky-stream", "messages": MESSAGES, "stream": True},
        headers={"authorization": f"Bearer {live['secret']}"},
    ) as response:
        raw = response.read().decode()

    assert response.status_code == 200
    assert raw.endswith("data: [DONE]\n\n") and "event: error" not in raw
    assert seen_by_fake(fake_upstream, upstream_model) == 3
    [row] = wait_for_rows(key=live["key"])
    assert row.stream is True and row.usage_source == "provider"
