"""Streaming through the relay: chunks as they arrive, disconnects, broken and
usage-less upstreams, against uvicorn and the fake upstream."""

from __future__ import annotations

import json
import time
from itertools import pairwise
from typing import Any

import httpx
import pytest

from relay.tokens import count_prompt_tokens, count_text_tokens
from tests import factories
from tests.support.gateway import wait_for_config

pytestmark = pytest.mark.django_db(transaction=True)

MESSAGES = [{"role": "user", "content": "tell the gateway a short story"}]


def add_model(live: dict[str, Any], name: str, upstream_model: str) -> None:
    factories.make_route(name, upstream_model=upstream_model)
    factories.make_price(name)
    wait_for_config(live["server"])


def post_stream(live: dict[str, Any], model: str, **extra: Any):  # noqa: ANN201
    return httpx.stream(
        "POST",
        f"{live['url']}/v1/chat/completions",
        json={"model": model, "messages": MESSAGES, "stream": True, **extra},
        headers={"authorization": f"Bearer {live['secret']}"},
        timeout=30,
    )


def events_of(raw: str) -> list[str]:
    return [event for event in raw.replace("\r\n", "\n").split("\n\n") if event]


def content_of(events: list[str]) -> str:
    text = []
    for event in events:
        if not event.startswith("data: {"):
            continue
        for choice in json.loads(event[len("data: ") :]).get("choices", []):
            text.append(choice.get("delta", {}).get("content") or "")
    return "".join(text)


def is_content(line: str) -> bool:
    return bool(line.startswith("data: {") and content_of([line]))


def fake_requests(fake_upstream: Any, model_prefix: str) -> list[dict[str, Any]]:
    seen = httpx.get(f"{fake_upstream.url}/_fake/requests").json()
    return [r for r in seen if str(r["body"].get("model", "")).startswith(model_prefix)]


def test_each_chunk_reaches_the_client_before_the_upstream_sends_the_next(
    live, wait_for_rows
):
    add_model(live, "paced", "fake-gpt;chunks=4;delay_ms=300")
    arrivals: list[float] = []

    started = time.monotonic()
    with post_stream(live, "paced") as response:
        for line in response.iter_lines():
            if is_content(line):
                arrivals.append(time.monotonic() - started)
    total = time.monotonic() - started

    assert response.status_code == 200
    assert len(arrivals) == 4
    assert arrivals[0] < 0.9  # one upstream delay (0.3 s) plus overhead
    assert total >= 1.2  # four delays: the stream really was paced
    # Buffered chunks would arrive together; relayed ones come one delay apart.
    gaps = [later - earlier for earlier, later in pairwise(arrivals)]
    assert all(gap > 0.1 for gap in gaps), gaps
    assert arrivals[-1] - arrivals[0] >= 0.75
    [row] = wait_for_rows(key=live["key"])
    assert row.ttft_ms is not None and row.ttft_ms < 900
    assert row.latency_ms >= 1200


def test_a_client_that_leaves_mid_stream_is_billed_for_everything_generated(
    live, wait_for_rows
):
    add_model(live, "slow", "fake-gpt;chunks=10;delay_ms=200")
    received = 0

    with post_stream(live, "slow") as response:
        for line in response.iter_lines():
            received += is_content(line)
            if received == 2:
                break  # leaving the block closes the connection

    # The upstream finishes 1.6 s later, inside the 3 s grace: its usage counts.
    [row] = wait_for_rows(key=live["key"], timeout=10)
    assert row.client_disconnected is True
    assert row.completion_tokens == 10
    assert row.prompt_tokens == 6
    assert row.usage_source == "provider"
    assert row.cost_usd > 0


def test_a_client_that_leaves_a_long_stream_is_billed_for_what_was_read_in_the_grace(
    live, wait_for_rows
):
    add_model(live, "endless", "fake-gpt;chunks=100;delay_ms=100")
    received = 0

    started = time.monotonic()
    with post_stream(live, "endless") as response:
        for line in response.iter_lines():
            received += is_content(line)
            if received == 2:
                break

    # 100 chunks would take 10 s; the gateway stops reading 3 s after the client left.
    [row] = wait_for_rows(key=live["key"], timeout=10)
    assert time.monotonic() - started < 8
    assert row.client_disconnected is True
    assert row.usage_source in {"estimated", "provider_partial"}
    everything = count_text_tokens("".join(f"tok{i} " for i in range(100)))
    assert count_text_tokens("tok0 tok1 ") < row.completion_tokens < everything
    assert row.latency_ms < 6000


def test_a_stream_cut_off_by_the_upstream_ends_with_an_error_event_and_bills_what_arrived(
    live, wait_for_rows, fake_upstream
):
    add_model(live, "cut", "fake-gpt;chunks=10;fault=truncate")
    httpx.delete(f"{fake_upstream.url}/_fake/requests")

    started = time.monotonic()
    with post_stream(live, "cut") as response:
        raw = response.read().decode()
    events = events_of(raw)

    assert time.monotonic() - started < 5
    assert response.status_code == 200
    text = content_of(events)
    assert text == "tok0 tok1 tok2 tok3 tok4 "
    assert events[-1].startswith("event: error\n")
    error = json.loads(events[-1].split("data: ", 1)[1])["error"]
    assert error["code"] == "upstream_error"
    assert "data: [DONE]" not in raw
    # Already streaming: no retry, whatever the upstream does.
    assert len(fake_requests(fake_upstream, "fake-gpt;chunks=10;fault=truncate")) == 1
    [row] = wait_for_rows(key=live["key"])
    assert row.completion_tokens == count_text_tokens(text)
    assert row.usage_source == "estimated"
    assert row.error_code == "upstream_error"
    assert row.cost_usd > 0


def test_a_stream_without_usage_from_the_upstream_is_estimated_locally(
    live, wait_for_rows
):
    add_model(live, "no-usage", "fake-gpt;chunks=6;usage=off")
    request = {"model": "no-usage", "messages": MESSAGES, "stream": True}

    with post_stream(live, "no-usage") as response:
        text = content_of(events_of(response.read().decode()))

    [row] = wait_for_rows(key=live["key"])
    assert text == "tok0 tok1 tok2 tok3 tok4 tok5 "
    assert row.usage_source == "estimated"
    assert row.prompt_tokens == count_prompt_tokens(request) > 0
    assert row.completion_tokens == count_text_tokens(text) >= 6
    assert row.cost_usd > 0 and row.error_code == ""


def test_an_answer_without_usage_from_the_upstream_is_estimated_locally(
    live, wait_for_rows
):
    add_model(live, "no-usage-whole", "fake-gpt;chunks=6;usage=off")
    request = {"model": "no-usage-whole", "messages": MESSAGES}

    response = httpx.post(
        f"{live['url']}/v1/chat/completions",
        json=request,
        headers={"authorization": f"Bearer {live['secret']}"},
    )

    text = response.json()["choices"][0]["message"]["content"]
    [row] = wait_for_rows(key=live["key"])
    assert row.usage_source == "estimated"
    assert row.prompt_tokens == count_prompt_tokens(request)
    assert row.completion_tokens == count_text_tokens(text) >= 6


def test_usage_is_asked_of_the_upstream_even_when_the_client_declined_it(
    live, fake_upstream
):
    httpx.delete(f"{fake_upstream.url}/_fake/requests")

    with post_stream(
        live, live["model"], stream_options={"include_usage": False}
    ) as response:
        raw = response.read().decode()

    [seen] = fake_requests(fake_upstream, "fake-gpt")
    assert seen["body"]["stream_options"] == {"include_usage": True}
    assert '"usage"' not in raw  # neither the usage chunk nor "usage": null
    assert raw.endswith("data: [DONE]\n\n")


def test_usage_is_not_asked_for_on_an_answer_that_does_not_stream(live, fake_upstream):
    httpx.delete(f"{fake_upstream.url}/_fake/requests")

    httpx.post(
        f"{live['url']}/v1/chat/completions",
        json={"model": live["model"], "messages": MESSAGES},
        headers={"authorization": f"Bearer {live['secret']}"},
    )

    [seen] = fake_requests(fake_upstream, "fake-gpt")
    assert "stream_options" not in seen["body"]


def test_a_client_that_leaves_before_the_first_chunk_is_billed_for_the_stream(
    live, wait_for_rows
):
    add_model(live, "late-start", "fake-gpt;ttfb_ms=800")

    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            f"{live['url']}/v1/chat/completions",
            json={"model": "late-start", "messages": MESSAGES, "stream": True},
            headers={"authorization": f"Bearer {live['secret']}"},
            timeout=httpx.Timeout(5, read=0.2),
        )

    [row] = wait_for_rows(key=live["key"], timeout=10)
    assert row.client_disconnected is True
    assert (row.prompt_tokens, row.completion_tokens) == (6, 5)
    assert row.usage_source == "provider"


def test_the_gateways_overhead_header_leaves_out_the_upstreams_wait(live):
    add_model(live, "slow-start", "fake-gpt;ttfb_ms=500")

    with post_stream(live, "slow-start") as response:
        response.read()

    assert 0 <= float(response.headers["x-gateway-overhead-ms"]) < 250
