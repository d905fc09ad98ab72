"""The simple prompt API (`/v1/inference/complete` and `/v1/inference/stream`)
through uvicorn and the fake upstream: the SPEC's fields, the chat request it
becomes, exact costs, streamed deltas, validation and failures."""

from __future__ import annotations

import json
import time
import uuid
from decimal import Decimal
from itertools import pairwise
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay.prompt_api import PromptStreamMeter
from tests import factories
from tests.support.gateway import wait_for_config

pytestmark = pytest.mark.django_db(transaction=True)

SUMMARY_FIELDS = {
    "response",
    "model",
    "prompt_tokens",
    "completion_tokens",
    "estimated_cost_usd",
    "duration_ms",
    "request_id",
}
PROMPT = "write four words please"


def post(
    live: dict[str, Any], path: str, payload: Any, **headers: str
) -> httpx.Response:
    return httpx.post(
        f"{live['url']}/v1/inference/{path}",
        json=payload,
        headers={"authorization": f"Bearer {live['secret']}", **headers},
        timeout=30,
    )


def add_model(live: dict[str, Any], upstream_directives: str, *, price: bool = True):
    """A model of its own, so this test's upstream requests can be found."""
    name = f"prompt-{uuid.uuid4().hex[:8]}"
    upstream_model = f"fake-{uuid.uuid4().hex[:8]}"
    if upstream_directives:
        upstream_model += f";{upstream_directives}"
    factories.make_route(name, upstream_model=upstream_model)
    if price:
        factories.make_price(name, input="3", output="15")
    wait_for_config(live["server"])
    return name, upstream_model


def upstream_requests(fake_upstream: Any, upstream_model: str) -> list[dict[str, Any]]:
    seen = httpx.get(f"{fake_upstream.url}/_fake/requests").json()
    return [r for r in seen if r["body"].get("model") == upstream_model]


def exact(response: httpx.Response) -> dict[str, Any]:
    """The JSON body with numbers read as Decimals, as finance would read them."""
    return json.loads(response.text, parse_float=Decimal)


def data_events(raw: str) -> list[str]:
    events = [e for e in raw.replace("\r\n", "\n").split("\n\n") if e]
    return [e[len("data: ") :] for e in events if e.startswith("data: ")]


def test_complete_answers_with_the_specs_summary_of_the_row_it_recorded(
    live, fake_upstream, wait_for_rows
):
    model, upstream_model = add_model(live, "chunks=4")

    response = post(
        live,
        "complete",
        {"prompt": PROMPT, "model": model, "max_tokens": 50, "user_id": "u-42"},
    )

    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    body = exact(response)
    assert set(body) == SUMMARY_FIELDS
    [row] = wait_for_rows(1, key=live["key"])
    assert body["response"] == "tok0 tok1 tok2 tok3"
    assert body["model"] == model == row.model
    assert (body["prompt_tokens"], body["completion_tokens"]) == (4, 4)
    assert (row.prompt_tokens, row.completion_tokens) == (4, 4)
    assert body["estimated_cost_usd"] == row.cost_usd
    assert row.cost_usd == Decimal(4 * 3 + 4 * 15) / 1_000_000
    assert body["request_id"] == response.headers["x-request-id"] == row.request_id
    assert isinstance(body["duration_ms"], int) and body["duration_ms"] >= 0
    assert float(response.headers["x-gateway-overhead-ms"]) >= 0
    assert (row.endpoint, row.user, row.stream, row.status_code) == (
        "inference.complete",
        "u-42",
        False,
        200,
    )
    [sent] = upstream_requests(fake_upstream, upstream_model)
    assert sent["path"] == "/v1/chat/completions"
    assert sent["body"]["messages"] == [{"role": "user", "content": PROMPT}]
    assert sent["body"]["max_tokens"] == 50
    assert sent["body"]["user"] == "u-42"
    assert not sent["body"].get("stream")


def test_optional_fields_are_forwarded_only_when_given(live, fake_upstream):
    model, upstream_model = add_model(live, "")

    post(live, "complete", {"prompt": PROMPT, "model": model})
    post(live, "complete", {"prompt": PROMPT, "model": model, "temperature": 0.2})

    bare, tempered = upstream_requests(fake_upstream, upstream_model)[-2:]
    assert set(bare["body"]) == {"model", "messages"}
    assert tempered["body"]["temperature"] == 0.2


def test_a_client_request_id_is_the_request_id_of_the_answer(live):
    model, _ = add_model(live, "")

    response = post(
        live, "complete", {"prompt": PROMPT, "model": model}, **{"x-request-id": "r-7"}
    )

    assert response.json()["request_id"] == "r-7"


def test_an_unpriced_model_reports_a_null_cost(live, wait_for_rows):
    model, _ = add_model(live, "", price=False)

    body = post(live, "complete", {"prompt": PROMPT, "model": model}).json()

    assert body["estimated_cost_usd"] is None
    [row] = wait_for_rows(1, key=live["key"])
    assert row.cost_usd is None and row.completion_tokens == body["completion_tokens"]


def test_stream_sends_each_delta_as_it_arrives_then_the_summary(
    live, fake_upstream, wait_for_rows
):
    model, upstream_model = add_model(live, "chunks=4;delay_ms=300")
    arrivals: list[float] = []
    payloads: list[str] = []

    started = time.monotonic()
    with httpx.stream(
        "POST",
        f"{live['url']}/v1/inference/stream",
        json={"prompt": PROMPT, "model": model},
        headers={"authorization": f"Bearer {live['secret']}"},
        timeout=30,
    ) as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                payloads.append(line[len("data: ") :])
                arrivals.append(time.monotonic() - started)

    assert response.status_code == 200
    assert response.headers["content-type"] == "text/event-stream"
    assert payloads[-1] == "[DONE]"
    deltas = [json.loads(p) for p in payloads[:-2]]
    done = json.loads(payloads[-2], parse_float=Decimal)
    assert [d["type"] for d in deltas] == ["delta"] * 4
    assert "".join(d["delta"] for d in deltas) == done["response"]
    assert done["type"] == "done" and set(done) == SUMMARY_FIELDS | {"type"}
    # Relayed one upstream delay apart, not buffered until the end.
    assert all(later - earlier > 0.15 for earlier, later in pairwise(arrivals[:4]))
    [row] = wait_for_rows(1, key=live["key"])
    assert (row.endpoint, row.stream, row.usage_source) == (
        "inference.stream",
        True,
        "provider",
    )
    assert done["completion_tokens"] == row.completion_tokens == 4
    assert done["estimated_cost_usd"] == row.cost_usd
    assert done["request_id"] == row.request_id
    [sent] = upstream_requests(fake_upstream, upstream_model)
    assert sent["body"]["stream"] is True
    assert sent["body"]["stream_options"] == {"include_usage": True}


def test_stream_without_upstream_usage_is_estimated(live, wait_for_rows):
    model, _ = add_model(live, "chunks=3;usage=off")

    response = post(live, "stream", {"prompt": PROMPT, "model": model})

    done = json.loads(data_events(response.text)[-2])
    [row] = wait_for_rows(1, key=live["key"])
    assert row.usage_source == "estimated"
    assert done["completion_tokens"] == row.completion_tokens > 0


def test_a_stream_the_upstream_cuts_off_ends_with_an_error_event(live, wait_for_rows):
    model, _ = add_model(live, "chunks=6;fault=truncate")

    response = post(live, "stream", {"prompt": PROMPT, "model": model})

    assert response.status_code == 200
    events = [e for e in response.text.split("\n\n") if e]
    assert events[-1].startswith("event: error")
    assert json.loads(events[-1].split("data: ", 1)[1])["error"]["code"] == (
        "upstream_error"
    )
    assert all('"type":"done"' not in e for e in events)
    [row] = wait_for_rows(1, key=live["key"])
    assert row.error_code == "upstream_error"


@pytest.mark.parametrize("path", ["complete", "stream"])
def test_an_upstream_error_before_the_answer_is_relayed_in_openais_shape(live, path):
    model, _ = add_model(live, "fault=400")

    response = post(live, path, {"prompt": PROMPT, "model": model})

    assert response.status_code == 400
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}


@pytest.mark.parametrize("path", ["complete", "stream"])
def test_an_unknown_model_is_not_found(live, path):
    response = post(live, path, {"prompt": PROMPT, "model": "no-such-model"})

    assert response.status_code == 404
    assert response.json()["error"]["code"] == "model_not_found"


INVALID = [
    ({"model": "M"}, "prompt"),
    ({"model": "M", "prompt": ""}, "prompt"),
    ({"model": "M", "prompt": ["a"]}, "prompt"),
    ({"prompt": "hi"}, "model"),
    ({"model": "M", "prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ({"model": "M", "prompt": "hi", "max_tokens": "9"}, "max_tokens"),
    ({"model": "M", "prompt": "hi", "max_tokens": True}, "max_tokens"),
    ({"model": "M", "prompt": "hi", "temperature": 2.5}, "temperature"),
    ({"model": "M", "prompt": "hi", "temperature": "hot"}, "temperature"),
    ({"model": "M", "prompt": "hi", "user_id": 7}, "user_id"),
]


@pytest.mark.parametrize("path", ["complete", "stream"])
@pytest.mark.parametrize(("payload", "param"), INVALID)
def test_bad_input_is_refused_with_its_param_and_reaches_no_upstream(
    live, fake_upstream, path, payload, param
):
    before = len(httpx.get(f"{fake_upstream.url}/_fake/requests").json())
    payload = {**payload, "model": live["model"]} if "model" in payload else payload

    response = post(live, path, payload)

    assert response.status_code == 400
    error = response.json()["error"]
    assert (error["type"], error["param"]) == ("invalid_request_error", param)
    assert len(httpx.get(f"{fake_upstream.url}/_fake/requests").json()) == before


def test_a_body_that_is_not_an_object_is_refused(live):
    response = httpx.post(
        f"{live['url']}/v1/inference/complete",
        content=b"[1, 2]",
        headers={"authorization": f"Bearer {live['secret']}"},
    )

    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"


def chunk(text: str) -> bytes:
    body = {"choices": [{"index": 0, "delta": {"content": text}}]}
    return b"data: " + json.dumps(body).encode() + b"\n\n"


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    pieces=st.lists(
        st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=8),
        min_size=1,
        max_size=8,
    ),
    cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=6),
)
def test_the_stream_meter_translates_every_piece_once_however_reads_are_cut(
    pieces, cuts
):
    usage = (
        b'data: {"choices":[],"usage":{"prompt_tokens":2,"completion_tokens":3}}\n\n'
    )
    stream = b"".join(chunk(p) for p in pieces) + usage + b"data: [DONE]\n\n"
    bounds = sorted({0, len(stream), *(min(c, len(stream)) for c in cuts)})
    meter = PromptStreamMeter()

    out = b"".join(meter.feed(stream[a:b]) for a, b in pairwise(bounds))
    out += meter.flush()

    deltas = [json.loads(e) for e in data_events(out.decode())]
    assert [d["delta"] for d in deltas] == pieces
    assert meter.text() == "".join(pieces)
    assert meter.usage == {"prompt_tokens": 2, "completion_tokens": 3}
    assert meter.saw_done
