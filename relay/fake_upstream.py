"""A fake OpenAI-compatible upstream for tests, the demo and the benchmark.

A raw ASGI application with no Django and no framework, so it starts in a blink,
runs anywhere and stays out of the way when the gateway is measured::

    python -m relay.fake_upstream --host 127.0.0.1 --port 9100 [--api-key KEY]

Each request is steered by directives appended to its ``model``, separated by
``;`` (``fake-gpt;chunks=20;delay_ms=10;usage=off``), or by ``x-fake-<name>``
headers, which win over the model string. ``Directives`` lists them all.

``GET /_fake/requests`` lists the last ``RECORD_LIMIT`` requests the fake
received (introspection and ``/health`` excluded); ``DELETE`` clears the list.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import itertools
import json
import os
import secrets
import struct
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, TypedDict

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Headers = list[tuple[bytes, bytes]]

API_KEY_ENV: Final = "FAKE_UPSTREAM_API_KEY"
DEFAULT_HOST: Final = "127.0.0.1"
DEFAULT_PORT: Final = 9100
MODEL_IDS: Final = ("fake-gpt", "fake-gpt-mini", "fake-embedding")
RECORD_LIMIT: Final = 200
EMBEDDING_SIZE: Final = 8
HANG_SECONDS: Final = 3600.0
MAX_CHUNKS: Final = 100_000  # token texts are cached, so bound what a request can ask
FAULTS: Final = frozenset(
    {"500", "502", "503", "429", "400", "hang", "truncate", "garbage"}
)
GARBAGE: Final = b"<html>this is not json"

# One encoder, built once: json.dumps() with custom separators builds a new
# JSONEncoder on every call, which shows up in the benchmark.
_encode = json.JSONEncoder(separators=(",", ":")).encode

# Ids only need to be unique, not secret: a per-process random prefix keeps two
# fakes (or two test runs) apart, and a counter is cheaper than uuid4().
_ID_PREFIX: Final = secrets.token_hex(6)
_id_counter = itertools.count(1)


def _new_id(prefix: str) -> str:
    return f"{prefix}{_ID_PREFIX}{next(_id_counter):012x}"


class Usage(TypedDict):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: dict[str, int]


class RecordedRequest(TypedDict):
    method: str
    path: str
    headers: dict[str, str]
    body: Any


class FakeError(Exception):
    """An OpenAI-shaped error answer; raised before the response starts."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type_: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: Headers | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body = _encode(
            {
                "error": {
                    "message": message,
                    "type": type_,
                    "param": param,
                    "code": code,
                }
            }
        ).encode()
        self.headers = headers or []


@dataclass(frozen=True, slots=True)
class Directives:
    """How one request should be answered; defaults answer like a healthy API."""

    chunks: int = 5  # completion tokens: content chunks when streaming
    delay_ms: int = 0  # before each content chunk, or once before a plain answer
    ttfb_ms: int = 0  # before the response headers
    usage: bool = True  # off: no usage in the body or the stream
    cached: int = 0  # prompt_tokens_details.cached_tokens, capped at prompt tokens
    fault: str | None = None  # one of FAULTS
    fail_times: int | None = None  # with fault: only the first N requests fail


DEFAULT_DIRECTIVES: Final = Directives()
_INT_DIRECTIVES: Final = frozenset(
    {"chunks", "delay_ms", "ttfb_ms", "cached", "fail_times"}
)
_HEADER_PREFIX: Final = "x-fake-"


def _parse_directive(name: str, value: str, into: dict[str, Any]) -> None:
    value = value.strip()
    if name in _INT_DIRECTIVES:
        if not value.isdigit():
            raise FakeError(400, f"fake directive {name} needs an integer >= 0")
        into[name] = int(value)
        if name == "chunks" and into[name] > MAX_CHUNKS:
            raise FakeError(400, f"fake directive chunks must be <= {MAX_CHUNKS}")
    elif name == "usage":
        if value not in {"on", "off"}:
            raise FakeError(400, "fake directive usage must be on or off")
        into[name] = value == "on"
    elif name == "fault":
        if value not in FAULTS:
            raise FakeError(
                400, f"fake directive fault must be one of {sorted(FAULTS)}"
            )
        into[name] = value
    else:
        # Refuse typos loudly: a silently ignored directive makes a test pass
        # for the wrong reason.
        raise FakeError(400, f"unknown fake directive {name!r}")


def parse_directives(
    model: str, headers: dict[str, str]
) -> tuple[str, Directives, str]:
    """Split ``model`` into (base model, directives, fault counter key).

    Header directives (``x-fake-<name>``) override those in the model string.
    The counter key is the raw model string plus any header directives, so
    ``fail_times`` counts requests that asked for exactly the same thing.
    """
    base, sep, rest = model.partition(";")
    header_items = [
        (name[len(_HEADER_PREFIX) :].replace("-", "_"), value)
        for name, value in headers.items()
        if name.startswith(_HEADER_PREFIX)
    ]
    if not sep and not header_items:
        return model, DEFAULT_DIRECTIVES, model
    values: dict[str, Any] = {}
    for item in rest.split(";") if sep else ():
        if not item.strip():
            continue
        name, eq, value = item.partition("=")
        if not eq:
            raise FakeError(400, f"fake directive {item!r} needs name=value")
        _parse_directive(name.strip(), value, values)
    for name, value in header_items:
        _parse_directive(name, value, values)
    key = model
    if header_items:
        key += "|" + ";".join(f"{name}={value}" for name, value in sorted(header_items))
    return base.strip(), Directives(**values), key


def _words(text: Any) -> int:
    return len(text.split()) if isinstance(text, str) else 0


def _content_words(content: Any) -> int:
    if isinstance(content, str):
        return len(content.split())
    if isinstance(content, list):
        return sum(
            _words(part.get("text")) if isinstance(part, dict) else _words(part)
            for part in content
        )
    return 0


def _prompt_words(prompt: Any) -> int:
    """Words in a prompt or embedding input: str, list of str, or token ids."""
    if isinstance(prompt, str):
        return len(prompt.split())
    if isinstance(prompt, list):
        total = 0
        for item in prompt:
            if isinstance(item, str):
                total += len(item.split())
            elif isinstance(item, int):
                total += 1  # a token id
            elif isinstance(item, list):
                total += len(item)  # a list of token ids
        return total
    return 0


def count_prompt_tokens(endpoint: str, body: dict[str, Any]) -> int:
    """Deterministic prompt size for tests: whitespace-separated words, min 1."""
    if endpoint == "chat":
        messages = body.get("messages")
        words = (
            sum(
                _content_words(m.get("content"))
                for m in messages
                if isinstance(m, dict)
            )
            if isinstance(messages, list)
            else 0
        )
    elif endpoint == "completions":
        words = _prompt_words(body.get("prompt"))
    elif endpoint == "embeddings":
        words = _prompt_words(body.get("input"))
    else:  # responses
        value = body.get("input")
        if isinstance(value, list):
            words = sum(
                _content_words(item.get("content"))
                if isinstance(item, dict)
                else _words(item)
                for item in value
            )
        else:
            words = _words(value)
    return max(1, words)


def _usage(prompt_tokens: int, completion_tokens: int, cached: int) -> Usage:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": min(cached, prompt_tokens)},
    }


def _responses_usage(usage: Usage) -> dict[str, Any]:
    return {
        "input_tokens": usage["prompt_tokens"],
        "input_tokens_details": usage["prompt_tokens_details"],
        "output_tokens": usage["completion_tokens"],
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": usage["total_tokens"],
    }


# Token texts are the same for every request; build them once.
_TOKENS: list[str] = [f"tok{i} " for i in range(64)]


def _tokens(count: int) -> list[str]:
    if count > len(_TOKENS):
        _TOKENS.extend(f"tok{i} " for i in range(len(_TOKENS), count))
    return _TOKENS[:count]


def _embedding(item: Any) -> list[float]:
    """Eight floats in [-1, 1] derived from the input, the same on every run."""
    digest = hashlib.blake2b(_encode(item).encode(), digest_size=16).digest()
    return [round(x / 32767.5 - 1.0, 6) for x in struct.unpack("<8H", digest)]


@dataclass(slots=True)
class Call:
    """One model request after parsing: what to answer and how."""

    endpoint: str
    body: dict[str, Any]
    model: str
    directives: Directives
    prompt_tokens: int
    stream: bool
    include_usage: bool
    truncate: bool = False
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def usage(self) -> Usage | None:
        d = self.directives
        if not d.usage:
            return None
        return _usage(self.prompt_tokens, d.chunks, d.cached)


@dataclass(slots=True)
class Stream:
    """SSE events in three parts; ``content`` events are paced by ``delay_ms``."""

    head: list[bytes]
    content: list[bytes]
    tail: list[bytes]


def _sse(payload: Any) -> bytes:
    return b"data: " + _encode(payload).encode() + b"\n\n"


_SSE_DONE: Final = b"data: [DONE]\n\n"


def _named_sse(payload: dict[str, Any]) -> bytes:
    return (
        b"event: "
        + payload["type"].encode()
        + b"\ndata: "
        + _encode(payload).encode()
        + b"\n\n"
    )


# --- chat completions -------------------------------------------------------


def chat_body(call: Call) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": _new_id("chatcmpl-"),
        "object": "chat.completion",
        "created": call.created,
        "model": call.model,
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": "".join(_tokens(call.directives.chunks)).rstrip(),
                    "refusal": None,
                },
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
    }
    usage = call.usage
    if usage is not None:
        body["usage"] = usage
    return body


def chat_stream(call: Call) -> Stream:
    base = {
        "id": _new_id("chatcmpl-"),
        "object": "chat.completion.chunk",
        "created": call.created,
        "model": call.model,
    }
    usage = call.usage if call.include_usage else None
    # OpenAI marks every chunk with "usage": null when usage will follow.
    extra: dict[str, Any] = {"usage": None} if usage is not None else {}

    def chunk(delta: dict[str, str], finish: str | None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return _sse({**base, "choices": [choice], **extra})

    tail = [chunk({}, "stop")]
    if usage is not None:
        tail.append(_sse({**base, "choices": [], "usage": usage}))
    tail.append(_SSE_DONE)
    return Stream(
        head=[chunk({"role": "assistant", "content": ""}, None)],
        content=[
            chunk({"content": tok}, None) for tok in _tokens(call.directives.chunks)
        ],
        tail=tail,
    )


# --- legacy text completions ------------------------------------------------


def completion_body(call: Call) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": _new_id("cmpl-"),
        "object": "text_completion",
        "created": call.created,
        "model": call.model,
        "choices": [
            {
                "text": "".join(_tokens(call.directives.chunks)).rstrip(),
                "index": 0,
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
    }
    usage = call.usage
    if usage is not None:
        body["usage"] = usage
    return body


def completion_stream(call: Call) -> Stream:
    base = {
        "id": _new_id("cmpl-"),
        "object": "text_completion",
        "created": call.created,
        "model": call.model,
    }
    usage = call.usage if call.include_usage else None

    def chunk(text: str, finish: str | None) -> bytes:
        choice = {"text": text, "index": 0, "logprobs": None, "finish_reason": finish}
        return _sse({**base, "choices": [choice]})

    tail = [chunk("", "stop")]
    if usage is not None:
        tail.append(_sse({**base, "choices": [], "usage": usage}))
    tail.append(_SSE_DONE)
    return Stream(
        head=[],
        content=[chunk(tok, None) for tok in _tokens(call.directives.chunks)],
        tail=tail,
    )


# --- embeddings -------------------------------------------------------------


def embeddings_body(call: Call) -> dict[str, Any]:
    value = call.body.get("input")
    items: list[Any] = value if isinstance(value, list) else [value]
    # A flat list of token ids is one input, not many.
    if items and all(isinstance(item, int) for item in items):
        items = [items]
    as_base64 = call.body.get("encoding_format") == "base64"
    data = []
    for index, item in enumerate(items):
        vector = _embedding(item)
        embedding: Any = (
            base64.b64encode(struct.pack(f"<{EMBEDDING_SIZE}f", *vector)).decode()
            if as_base64
            else vector
        )
        data.append({"object": "embedding", "index": index, "embedding": embedding})
    body: dict[str, Any] = {"object": "list", "data": data, "model": call.model}
    if call.directives.usage:
        body["usage"] = {
            "prompt_tokens": call.prompt_tokens,
            "total_tokens": call.prompt_tokens,
        }
    return body


# --- responses --------------------------------------------------------------


def _response_object(
    call: Call, response_id: str, message: dict[str, Any] | None
) -> dict[str, Any]:
    return {
        "id": response_id,
        "object": "response",
        "created_at": call.created,
        "status": "completed" if message else "in_progress",
        "model": call.model,
        "output": [message] if message else [],
    }


def _response_message(message_id: str, text: str, status: str) -> dict[str, Any]:
    content = [{"type": "output_text", "text": text, "annotations": []}]
    return {
        "type": "message",
        "id": message_id,
        "status": status,
        "role": "assistant",
        "content": content if status == "completed" else [],
    }


def response_body(call: Call) -> dict[str, Any]:
    text = "".join(_tokens(call.directives.chunks)).rstrip()
    message = _response_message(_new_id("msg_"), text, "completed")
    body = _response_object(call, _new_id("resp_"), message)
    usage = call.usage
    if usage is not None:
        body["usage"] = _responses_usage(usage)
    return body


def response_stream(call: Call) -> Stream:
    response_id, message_id = _new_id("resp_"), _new_id("msg_")
    tokens = _tokens(call.directives.chunks)
    text = "".join(tokens)
    sequence = itertools.count()
    where = {"item_id": message_id, "output_index": 0, "content_index": 0}
    part = {"type": "output_text", "text": "", "annotations": []}
    in_progress = _response_object(call, response_id, None)
    head = [
        {"type": "response.created", "response": in_progress},
        {"type": "response.in_progress", "response": in_progress},
        {
            "type": "response.output_item.added",
            "output_index": 0,
            "item": _response_message(message_id, "", "in_progress"),
        },
        {"type": "response.content_part.added", **where, "part": part},
    ]
    content = [
        {"type": "response.output_text.delta", **where, "delta": tok} for tok in tokens
    ]
    done_message = _response_message(message_id, text, "completed")
    completed = _response_object(call, response_id, done_message)
    usage = call.usage
    if usage is not None:
        completed["usage"] = _responses_usage(usage)
    tail = [
        {"type": "response.output_text.done", **where, "text": text},
        {
            "type": "response.content_part.done",
            **where,
            "part": {**part, "text": text},
        },
        {"type": "response.output_item.done", "output_index": 0, "item": done_message},
        {"type": "response.completed", "response": completed},
    ]

    def events(payloads: list[dict[str, Any]]) -> list[bytes]:
        return [_named_sse({**p, "sequence_number": next(sequence)}) for p in payloads]

    return Stream(head=events(head), content=events(content), tail=events(tail))


ENDPOINTS: Final[dict[str, str]] = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "completions",
    "/v1/embeddings": "embeddings",
    "/v1/responses": "responses",
}
_BODIES: Final[dict[str, Callable[[Call], dict[str, Any]]]] = {
    "chat": chat_body,
    "completions": completion_body,
    "embeddings": embeddings_body,
    "responses": response_body,
}
_STREAMS: Final[dict[str, Callable[[Call], Stream]]] = {
    "chat": chat_stream,
    "completions": completion_stream,
    "responses": response_stream,
}

_HEALTH: Final = b'{"status":"ok"}'
_MODELS: Final = _encode(
    {
        "object": "list",
        "data": [
            {"id": m, "object": "model", "created": 1700000000, "owned_by": "fake"}
            for m in MODEL_IDS
        ],
    }
).encode()
_JSON: Final = (b"content-type", b"application/json")
_SSE_HEADERS: Final[Headers] = [
    (b"content-type", b"text/event-stream"),
    (b"cache-control", b"no-cache"),
]


async def _read_body(receive: Receive) -> bytes:
    message = await receive()
    body: bytes = message.get("body", b"")
    if not message.get("more_body", False):
        return body  # the common case: the whole body in one message
    parts = [body]
    while message.get("more_body", False):
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        parts.append(message.get("body", b""))
    return b"".join(parts)


async def _send_json(
    send: Send, status: int, body: bytes, headers: Headers | None = None
) -> None:
    start = [_JSON, (b"content-length", str(len(body)).encode())]
    if headers:
        start.extend(headers)
    await send({"type": "http.response.start", "status": status, "headers": start})
    await send({"type": "http.response.body", "body": body})


async def _wait_for_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class FakeUpstream:
    """The ASGI application. State (request log, fault counters) is per instance."""

    def __init__(self, api_key: str | None = None) -> None:
        self.api_key = api_key
        self._expected_auth = f"Bearer {api_key}" if api_key else None
        self.requests: deque[RecordedRequest] = deque(maxlen=RECORD_LIMIT)
        self.fault_counts: dict[str, int] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return  # lifespan is off and websockets are no part of the API
        method: str = scope["method"]
        path: str = scope["path"]
        if path == "/health":
            await _send_json(send, 200, _HEALTH)
            return
        if path == "/_fake/requests":
            await self._introspect(method, send)
            return

        headers = {
            k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]
        }
        raw = await _read_body(receive)
        body: Any = None
        parse_error = False
        if raw:
            try:
                body = json.loads(raw)
            except ValueError:
                parse_error = True
        elif method == "POST":
            parse_error = True
        self.requests.append(
            {"method": method, "path": path, "headers": headers, "body": body}
        )
        try:
            if (
                self._expected_auth is not None
                and headers.get("authorization") != self._expected_auth
            ):
                raise FakeError(
                    401,
                    "Incorrect API key provided.",
                    code="invalid_api_key",
                )
            if path == "/v1/models":
                if method != "GET":
                    raise FakeError(405, f"Method {method} not allowed on {path}")
                await _send_json(send, 200, _MODELS)
                return
            endpoint = ENDPOINTS.get(path)
            if endpoint is None:
                raise FakeError(404, f"Invalid URL ({method} {path})")
            if method != "POST":
                raise FakeError(405, f"Method {method} not allowed on {path}")
            if parse_error or not isinstance(body, dict):
                raise FakeError(
                    400,
                    "We could not parse the JSON body of your request. The fake "
                    "upstream expects a JSON object.",
                )
            await self._answer(endpoint, body, headers, receive, send)
        except FakeError as exc:
            await _send_json(send, exc.status, exc.body, exc.headers)

    async def _introspect(self, method: str, send: Send) -> None:
        if method == "GET":
            await _send_json(send, 200, _encode(list(self.requests)).encode())
        elif method == "DELETE":
            self.requests.clear()
            await send({"type": "http.response.start", "status": 204, "headers": []})
            await send({"type": "http.response.body", "body": b""})
        else:
            error = FakeError(405, f"Method {method} not allowed on /_fake/requests")
            await _send_json(send, error.status, error.body)

    async def _answer(
        self,
        endpoint: str,
        body: dict[str, Any],
        headers: dict[str, str],
        receive: Receive,
        send: Send,
    ) -> None:
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise FakeError(400, "you must provide a model parameter", param="model")
        base_model, directives, fault_key = parse_directives(model, headers)
        fault = directives.fault
        if fault is not None and directives.fail_times is not None:
            seen = self.fault_counts.get(fault_key, 0)
            self.fault_counts[fault_key] = seen + 1
            if seen >= directives.fail_times:
                fault = None
        stream = body.get("stream") is True and endpoint in _STREAMS
        options = body.get("stream_options")
        call = Call(
            endpoint=endpoint,
            body=body,
            model=base_model,
            directives=directives,
            prompt_tokens=count_prompt_tokens(endpoint, body),
            stream=stream,
            include_usage=isinstance(options, dict)
            and options.get("include_usage") is True,
            truncate=fault == "truncate",
        )

        if directives.ttfb_ms:
            await asyncio.sleep(directives.ttfb_ms / 1000)
        if fault is not None and fault != "truncate":
            await self._fault(fault, stream, receive, send)
            return
        if stream:
            await self._stream(
                _STREAMS[endpoint](call), directives, call, receive, send
            )
            return
        if directives.delay_ms:
            await asyncio.sleep(directives.delay_ms / 1000)
        payload = _encode(_BODIES[endpoint](call)).encode()
        if call.truncate:
            # Promise more than is sent, then let the server close the socket.
            length = str(len(payload) + 100).encode()
            start = [_JSON, (b"content-length", length)]
            await send({"type": "http.response.start", "status": 200, "headers": start})
            half = payload[: len(payload) // 2]
            await send({"type": "http.response.body", "body": half, "more_body": True})
            return  # uvicorn closes the connection: response never completed
        await _send_json(send, 200, payload)

    async def _stream(
        self, events: Stream, d: Directives, call: Call, receive: Receive, send: Send
    ) -> None:
        await send(
            {"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS}
        )
        for event in events.head:
            await send({"type": "http.response.body", "body": event, "more_body": True})
        content = (
            events.content[: len(events.content) // 2]
            if call.truncate
            else events.content
        )
        if d.delay_ms:
            # A paced stream watches for the client leaving so an abandoned
            # stream with many slow chunks does not keep its task alive.
            delay = d.delay_ms / 1000
            left = asyncio.ensure_future(_wait_for_disconnect(receive))
            try:
                for event in content:
                    await asyncio.wait((left,), timeout=delay)
                    if left.done():
                        return
                    await send(
                        {"type": "http.response.body", "body": event, "more_body": True}
                    )
            finally:
                left.cancel()
        else:
            for event in content:
                await send(
                    {"type": "http.response.body", "body": event, "more_body": True}
                )
        if call.truncate:
            return  # uvicorn closes the connection mid-body: no [DONE]
        for event in events.tail:
            await send({"type": "http.response.body", "body": event, "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    async def _fault(
        self, fault: str, stream: bool, receive: Receive, send: Send
    ) -> None:
        if fault == "hang":
            # Accept and never answer, without holding up other requests; stop
            # when the client gives up so the task does not outlive it.
            try:
                await asyncio.wait_for(_wait_for_disconnect(receive), HANG_SECONDS)
            except TimeoutError:
                pass
            return
        if fault == "garbage":
            if stream:
                await send(
                    {
                        "type": "http.response.start",
                        "status": 200,
                        "headers": _SSE_HEADERS,
                    }
                )
                await send(
                    {
                        "type": "http.response.body",
                        "body": b"data: " + GARBAGE + b"\n\n",
                        "more_body": True,
                    }
                )
                await send({"type": "http.response.body", "body": b""})
            else:
                await _send_json(send, 200, GARBAGE)
            return
        if fault == "429":
            raise FakeError(
                429,
                "Rate limit reached for requests (fake upstream).",
                type_="requests",
                code="rate_limit_exceeded",
                headers=[(b"retry-after", b"1")],
            )
        if fault == "400":
            raise FakeError(400, "fake bad request")
        raise FakeError(
            int(fault),
            "The server had an error while processing your request (fake upstream).",
            type_="server_error",
        )


def make_app(api_key: str | None = None) -> FakeUpstream:
    """An app with ``api_key`` or, when None, the key from FAKE_UPSTREAM_API_KEY."""
    if api_key is None:
        api_key = os.environ.get(API_KEY_ENV) or None
    return FakeUpstream(api_key=api_key)


# For `uvicorn relay.fake_upstream:app`; main() builds its own from its arguments.
app = make_app()


def serve(
    *, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, api_key: str | None = None
) -> None:
    """Serve the fake until interrupted (SIGINT or SIGTERM)."""
    # Imported here so the ASGI app stays importable (and cheap to import) anywhere.
    import uvicorn

    uvicorn.run(
        make_app(api_key),
        host=host,
        port=port,
        log_level="warning",
        access_log=False,
        loop="uvloop",
        http="httptools",
        lifespan="off",
        # A `fault=hang` request never completes; without this, SIGTERM would
        # wait for it forever instead of exiting.
        timeout_graceful_shutdown=1,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m relay.fake_upstream",
        description="Fake OpenAI-compatible upstream for tests, demo and benchmark.",
    )
    add_arguments(parser)
    return parser


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The CLI options, shared with the `fakeupstream` management command."""
    parser.add_argument("--host", default=DEFAULT_HOST)
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument(
        "--api-key",
        default=None,
        help=f"require 'Authorization: Bearer KEY' (default: ${API_KEY_ENV})",
    )


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    serve(host=args.host, port=args.port, api_key=args.api_key)


if __name__ == "__main__":
    main()
