"""The fake upstream, driven over HTTP as a real process, as the relay sees it."""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.support.servers import ServerProcess, start_fake_upstream

API_KEY = "sk-fake-upstream-test"
HELLO = [{"role": "user", "content": "hello there general kenobi"}]  # 4 words


@pytest.fixture(scope="module")
def upstream() -> Iterator[ServerProcess]:
    server = start_fake_upstream()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def secured_upstream() -> Iterator[ServerProcess]:
    server = start_fake_upstream(api_key=API_KEY)
    yield server
    server.stop()


@pytest.fixture
def client(upstream: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=upstream.url, timeout=10.0) as http:
        yield http


def chat(model: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": HELLO, **extra}


def sse_events(response: httpx.Response) -> list[str]:
    """The `data:` payloads of an SSE response, in order."""
    return [
        line.removeprefix("data: ")
        for line in response.iter_lines()
        if line.startswith("data: ")
    ]


def stream_chat(client: httpx.Client, body: dict[str, Any]) -> list[str]:
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        return sse_events(response)


def test_health_answers_ok(client: httpx.Client) -> None:
    response = client.get("/health")

    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_models_lists_the_fake_model_ids(client: httpx.Client) -> None:
    response = client.get("/v1/models")

    assert response.status_code == 200
    ids = [model["id"] for model in response.json()["data"]]
    assert "fake-gpt" in ids
    assert response.json()["object"] == "list"


def test_chat_completion_answers_like_openai(client: httpx.Client) -> None:
    response = client.post("/v1/chat/completions", json=chat("fake-gpt;chunks=3"))

    assert response.status_code == 200
    body = response.json()
    assert body["id"].startswith("chatcmpl-")
    assert body["object"] == "chat.completion"
    assert isinstance(body["created"], int)
    assert body["model"] == "fake-gpt"
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert body["choices"][0]["message"]["content"] == "tok0 tok1 tok2"
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"] == {
        "prompt_tokens": 4,
        "completion_tokens": 3,
        "total_tokens": 7,
        "prompt_tokens_details": {"cached_tokens": 0},
    }


def test_prompt_tokens_count_words_in_text_parts_of_every_message(
    client: httpx.Client,
) -> None:
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "one two three"}]},
    ]

    response = client.post(
        "/v1/chat/completions", json={"model": "fake-gpt", "messages": messages}
    )

    assert response.json()["usage"]["prompt_tokens"] == 5


def test_usage_off_leaves_usage_out_of_the_answer(client: httpx.Client) -> None:
    response = client.post("/v1/chat/completions", json=chat("fake-gpt;usage=off"))

    assert response.status_code == 200
    assert "usage" not in response.json()


def test_cached_tokens_are_capped_at_the_prompt_size(client: httpx.Client) -> None:
    small = client.post("/v1/chat/completions", json=chat("fake-gpt;cached=2"))
    large = client.post("/v1/chat/completions", json=chat("fake-gpt;cached=99"))

    assert small.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 2
    assert large.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 4


def test_header_directive_wins_over_the_model_string(client: httpx.Client) -> None:
    response = client.post(
        "/v1/chat/completions",
        json=chat("fake-gpt;chunks=9"),
        headers={"x-fake-chunks": "2"},
    )

    assert response.json()["choices"][0]["message"]["content"] == "tok0 tok1"
    assert response.json()["model"] == "fake-gpt"


def test_unknown_directive_is_refused_with_400(client: httpx.Client) -> None:
    response = client.post("/v1/chat/completions", json=chat("fake-gpt;chunk=2"))

    assert response.status_code == 400
    assert "unknown fake directive" in response.json()["error"]["message"]


def test_streaming_chat_sends_role_content_finish_and_done(
    client: httpx.Client,
) -> None:
    events = stream_chat(client, chat("fake-gpt;chunks=3", stream=True))

    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert [c["choices"][0]["delta"] for c in chunks] == [
        {"role": "assistant", "content": ""},
        {"content": "tok0 "},
        {"content": "tok1 "},
        {"content": "tok2 "},
        {},
    ]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert {c["id"] for c in chunks} == {chunks[0]["id"]}
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert {c["model"] for c in chunks} == {"fake-gpt"}
    assert {c["created"] for c in chunks} == {chunks[0]["created"]}
    assert all(c.get("usage") is None for c in chunks)


def test_streaming_sends_usage_chunk_only_when_include_usage_is_asked(
    client: httpx.Client,
) -> None:
    with_usage = stream_chat(
        client,
        chat("fake-gpt;chunks=2", stream=True, stream_options={"include_usage": True}),
    )
    usage_off = stream_chat(
        client,
        chat(
            "fake-gpt;chunks=2;usage=off",
            stream=True,
            stream_options={"include_usage": True},
        ),
    )

    usage_chunk = json.loads(with_usage[-2])
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"]["prompt_tokens"] == 4
    assert usage_chunk["usage"]["completion_tokens"] == 2
    assert usage_chunk["usage"]["total_tokens"] == 6
    assert len(with_usage) == len(usage_off) + 1
    assert all("usage" not in json.loads(e) for e in usage_off[:-1])


def test_streaming_sends_each_chunk_as_it_is_produced(client: httpx.Client) -> None:
    body = chat("fake-gpt;chunks=3;delay_ms=200", stream=True)
    arrivals: list[float] = []

    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        for line in response.iter_lines():
            if '"content":"tok' in line:
                arrivals.append(time.monotonic())

    assert len(arrivals) == 3
    gaps = [later - earlier for earlier, later in itertools.pairwise(arrivals)]
    assert all(gap >= 0.15 for gap in gaps), gaps


def test_ttfb_delays_the_response_headers(client: httpx.Client) -> None:
    started = time.monotonic()

    response = client.post("/v1/chat/completions", json=chat("fake-gpt;ttfb_ms=300"))

    assert response.status_code == 200
    assert time.monotonic() - started >= 0.3


def test_legacy_completion_answers_text_and_usage(client: httpx.Client) -> None:
    response = client.post(
        "/v1/completions",
        json={"model": "fake-gpt;chunks=2", "prompt": ["say this", "and that"]},
    )

    body = response.json()
    assert body["object"] == "text_completion"
    assert body["choices"][0]["text"] == "tok0 tok1"
    assert body["usage"]["prompt_tokens"] == 4
    assert body["usage"]["completion_tokens"] == 2


def test_legacy_completion_streams_text_chunks(client: httpx.Client) -> None:
    body = {
        "model": "fake-gpt;chunks=2",
        "prompt": "say this",
        "stream": True,
        "stream_options": {"include_usage": True},
    }

    with client.stream("POST", "/v1/completions", json=body) as response:
        events = sse_events(response)

    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert [c["choices"][0]["text"] for c in chunks[:-1]] == ["tok0 ", "tok1 ", ""]
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["usage"]["total_tokens"] == 4


def test_embeddings_are_deterministic_and_one_per_input(
    client: httpx.Client,
) -> None:
    body = {"model": "fake-embedding", "input": ["one two", "three"]}

    first = client.post("/v1/embeddings", json=body).json()
    second = client.post("/v1/embeddings", json=body).json()

    assert first["data"] == second["data"]
    assert [item["index"] for item in first["data"]] == [0, 1]
    assert all(len(item["embedding"]) == 8 for item in first["data"])
    assert first["data"][0]["embedding"] != first["data"][1]["embedding"]
    assert first["usage"] == {"prompt_tokens": 3, "total_tokens": 3}


def test_embeddings_honour_base64_encoding_as_the_openai_sdk_asks(
    client: httpx.Client,
) -> None:
    body = {"model": "fake-embedding", "input": "hi", "encoding_format": "base64"}

    response = client.post("/v1/embeddings", json=body)

    assert isinstance(response.json()["data"][0]["embedding"], str)


def test_responses_answers_output_text_and_usage(client: httpx.Client) -> None:
    response = client.post(
        "/v1/responses", json={"model": "fake-gpt;chunks=2", "input": "a b c"}
    )

    body = response.json()
    assert body["object"] == "response"
    assert body["status"] == "completed"
    assert body["output"][0]["content"][0]["text"] == "tok0 tok1"
    assert body["usage"]["input_tokens"] == 3
    assert body["usage"]["output_tokens"] == 2
    assert body["usage"]["total_tokens"] == 5


def test_responses_streams_created_deltas_and_completed_with_usage(
    client: httpx.Client,
) -> None:
    body = {
        "model": "fake-gpt;chunks=3",
        "input": [{"role": "user", "content": "a b"}],
        "stream": True,
    }

    with client.stream("POST", "/v1/responses", json=body) as response:
        events = [json.loads(event) for event in sse_events(response)]

    types = [event["type"] for event in events]
    assert types[0] == "response.created"
    assert types[-1] == "response.completed"
    deltas = [e["delta"] for e in events if e["type"] == "response.output_text.delta"]
    assert deltas == ["tok0 ", "tok1 ", "tok2 "]
    assert events[-1]["response"]["usage"]["input_tokens"] == 2
    assert events[-1]["response"]["usage"]["output_tokens"] == 3
    assert events[-1]["response"]["usage"]["total_tokens"] == 5


def test_unknown_path_answers_404_in_openai_shape(client: httpx.Client) -> None:
    response = client.post("/v1/nope", json={})

    assert response.status_code == 404
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_malformed_json_answers_400_in_openai_shape(client: httpx.Client) -> None:
    response = client.post(
        "/v1/chat/completions",
        content=b'{"model": ',
        headers={"content-type": "application/json"},
    )

    assert response.status_code == 400
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}


@pytest.mark.parametrize("status", [500, 502, 503])
def test_server_error_faults_answer_that_status(
    client: httpx.Client, status: int
) -> None:
    response = client.post("/v1/chat/completions", json=chat(f"m;fault={status}"))

    assert response.status_code == status
    assert response.json()["error"]["type"] == "server_error"


def test_rate_limit_fault_sends_retry_after(client: httpx.Client) -> None:
    response = client.post("/v1/chat/completions", json=chat("m;fault=429"))

    assert response.status_code == 429
    assert response.headers["retry-after"] == "1"
    assert response.json()["error"]["code"] == "rate_limit_exceeded"


def test_bad_request_fault_answers_400(client: httpx.Client) -> None:
    response = client.post(
        "/v1/embeddings", json={"model": "m;fault=400", "input": "x"}
    )

    assert response.status_code == 400
    assert response.json()["error"]["message"] == "fake bad request"


def test_fail_times_fails_only_the_first_requests_for_that_model_string(
    client: httpx.Client,
) -> None:
    model = "fail-times-test;fault=503;fail_times=2"

    statuses = [
        client.post("/v1/chat/completions", json=chat(model)).status_code
        for _ in range(4)
    ]
    other = client.post("/v1/chat/completions", json=chat(model + ";chunks=1"))

    assert statuses == [503, 503, 200, 200]
    assert other.status_code == 503


def test_hanging_request_does_not_block_other_requests(
    client: httpx.Client, upstream: ServerProcess
) -> None:
    with (
        httpx.Client(base_url=upstream.url, timeout=0.5) as impatient,
        pytest.raises(httpx.ReadTimeout),
    ):
        impatient.post("/v1/chat/completions", json=chat("m;fault=hang"))

    assert client.get("/health", timeout=1.0).status_code == 200


def test_truncated_stream_stops_halfway_without_done(client: httpx.Client) -> None:
    body = chat("m;chunks=4;fault=truncate", stream=True)
    lines: list[str] = []

    with (
        pytest.raises(httpx.RemoteProtocolError),
        client.stream("POST", "/v1/chat/completions", json=body) as response,
    ):
        for line in response.iter_lines():
            lines.append(line)

    contents = [line for line in lines if '"content":"tok' in line]
    assert len(contents) == 2
    assert "data: [DONE]" not in lines


def test_truncated_answer_closes_before_the_promised_length(
    client: httpx.Client,
) -> None:
    with pytest.raises(httpx.RemoteProtocolError):
        client.post("/v1/chat/completions", json=chat("m;fault=truncate"))


def test_garbage_fault_answers_200_with_a_body_that_is_not_json(
    client: httpx.Client,
) -> None:
    response = client.post("/v1/chat/completions", json=chat("m;fault=garbage"))

    assert response.status_code == 200
    with pytest.raises(json.JSONDecodeError):
        response.json()


def test_requests_are_recorded_with_lowercase_headers_and_parsed_body(
    client: httpx.Client,
) -> None:
    client.delete("/_fake/requests")

    client.post(
        "/v1/chat/completions", json=chat("fake-gpt"), headers={"X-Trace": "abc"}
    )
    recorded = client.get("/_fake/requests").json()

    assert len(recorded) == 1
    assert recorded[0]["method"] == "POST"
    assert recorded[0]["path"] == "/v1/chat/completions"
    assert recorded[0]["headers"]["x-trace"] == "abc"
    assert recorded[0]["body"] == chat("fake-gpt")


def test_request_log_keeps_only_the_last_200_and_clears_on_delete(
    client: httpx.Client,
) -> None:
    for i in range(205):
        client.post("/v1/embeddings", json={"model": "fake-embedding", "input": str(i)})

    recorded = client.get("/_fake/requests").json()
    cleared = client.delete("/_fake/requests")

    assert len(recorded) == 200
    assert recorded[-1]["body"]["input"] == "204"
    assert cleared.status_code == 204
    assert client.get("/_fake/requests").json() == []


def test_configured_key_refuses_requests_without_it(
    secured_upstream: ServerProcess,
) -> None:
    with httpx.Client(base_url=secured_upstream.url, timeout=10.0) as http:
        missing = http.post("/v1/chat/completions", json=chat("fake-gpt"))
        wrong = http.get("/v1/models", headers={"authorization": "Bearer nope"})

    assert missing.status_code == 401
    assert missing.json() == {
        "error": {
            "message": missing.json()["error"]["message"],
            "type": "invalid_request_error",
            "param": None,
            "code": "invalid_api_key",
        }
    }
    assert wrong.status_code == 401


def test_configured_key_accepts_requests_that_carry_it(
    secured_upstream: ServerProcess,
) -> None:
    with httpx.Client(base_url=secured_upstream.url, timeout=10.0) as http:
        response = http.post(
            "/v1/chat/completions",
            json=chat("fake-gpt"),
            headers={"authorization": f"Bearer {API_KEY}"},
        )
        health = http.get("/health")

    assert response.status_code == 200
    assert health.status_code == 200
