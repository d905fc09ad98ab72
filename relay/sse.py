"""Server-sent events between the upstream and the client.

`SseMeter` passes the upstream's events through as the same bytes, one complete
event at a time (never buffering more than one partial event), and watches them
for usage. Only events that mention usage are parsed as JSON. When the gateway
injected `stream_options.include_usage` on the client's behalf, it removes the
extra usage chunk and the `"usage":null` fields again so the client sees what it
asked for.
"""

from __future__ import annotations

from typing import Any, Protocol

import orjson

from relay.tokens import count_text_tokens

DONE = b"data: [DONE]"


class StreamMeter(Protocol):
    """Turns the upstream's stream into the client's, and watches it for usage."""

    usage: dict[str, Any] | None
    saw_done: bool

    def feed(self, data: bytes) -> bytes: ...

    def flush(self) -> bytes: ...

    def estimated_completion_tokens(self) -> int: ...


class SseMeter:
    def __init__(self, *, strip_usage: bool) -> None:
        self.strip_usage = strip_usage
        self.usage: dict[str, Any] | None = None
        self.saw_done = False
        self.events = 0
        self._partial = b""
        # Raw content events, parsed only if the upstream never reports usage.
        self._content_events: list[bytes] = []

    def feed(self, data: bytes) -> bytes:
        """Bytes to forward now for `data` just read from the upstream."""
        buffer = self._partial + data if self._partial else data
        if b"\r" in buffer:
            # Joined first: a read may end between the \r and \n of a blank line.
            buffer = buffer.replace(b"\r\n", b"\n")
        end = buffer.rfind(b"\n\n")
        if end < 0:
            self._partial = buffer
            return b""
        complete, self._partial = buffer[: end + 2], buffer[end + 2 :]
        if not _mentions_usage(complete) and b"[DONE]" not in complete:
            # The common case: content events only, passed on as they came (but
            # for the `"usage":null` the gateway's own request made them carry).
            self.events += complete.count(b"\n\n")
            self._content_events.append(complete)
            return _without_null_usage(complete) if self.strip_usage else complete
        return b"".join(self._event(e + b"\n\n") for e in complete[:-2].split(b"\n\n"))

    def flush(self) -> bytes:
        """What is left when the upstream ends (a partial event, passed as it came)."""
        rest, self._partial = self._partial, b""
        return rest

    def _event(self, event: bytes) -> bytes:
        self.events += 1
        if event.startswith(DONE):
            self.saw_done = True
            return event
        if not _mentions_usage(event):
            self._content_events.append(event)
            return _without_null_usage(event) if self.strip_usage else event
        payload = data_json(event)
        usage = payload.get("usage") if payload else None
        if isinstance(payload, dict) and isinstance(payload.get("response"), dict):
            usage = payload["response"].get("usage") or usage  # Responses API
        if isinstance(usage, dict):
            self.usage = usage
            if self.strip_usage and payload is not None and not payload.get("choices"):
                return b""  # The chunk the gateway asked for; the client did not.
        else:
            self._content_events.append(event)
        return _without_null_usage(event) if self.strip_usage else event

    def estimated_completion_tokens(self) -> int:
        """Tokens of the content streamed so far, counted locally."""
        text: list[str] = []
        for block in self._content_events:
            for event in block.split(b"\n\n"):
                payload = data_json(event)
                if payload:
                    text.append(delta_text(payload))
        return count_text_tokens("".join(text))


def _mentions_usage(data: bytes) -> bool:
    """Whether `data` carries a usage object (not just `"usage":null`)."""
    return b'"usage":{' in data or b'"usage": {' in data


def _without_null_usage(data: bytes) -> bytes:
    return data.replace(b',"usage":null', b"").replace(b', "usage": null', b"")


def data_json(event: bytes) -> dict[str, Any] | None:
    lines = [
        line[5:].lstrip() for line in event.split(b"\n") if line.startswith(b"data:")
    ]
    if not lines:
        return None
    try:
        payload = orjson.loads(b"\n".join(lines))
    except ValueError:
        return None
    return payload if isinstance(payload, dict) else None


def delta_text(payload: dict[str, Any]) -> str:
    if payload.get("type") == "response.output_text.delta":
        delta = payload.get("delta")
        return delta if isinstance(delta, str) else ""
    parts = []
    for choice in payload.get("choices") or ():
        if not isinstance(choice, dict):
            continue
        delta = choice.get("delta")
        if isinstance(delta, dict) and isinstance(delta.get("content"), str):
            parts.append(delta["content"])
        elif isinstance(choice.get("text"), str):
            parts.append(choice["text"])
    return "".join(parts)


def error_event(message: str, code: str) -> bytes:
    body = {
        "error": {"message": message, "type": "api_error", "param": None, "code": code}
    }
    return b"event: error\ndata: " + orjson.dumps(body) + b"\n\n"
