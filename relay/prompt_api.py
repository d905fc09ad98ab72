"""The simple prompt API: `POST /v1/inference/complete` and `/v1/inference/stream`.

For apps that want one string in and one string out, with what it cost: the
request `{prompt, model, max_tokens?, temperature?, user_id?}` becomes a one-message
chat completion, forwarded, limited and metered exactly like
`/v1/chat/completions` (same routing, quotas, retries and usage row), and the
answer is summarised as `{response, model, prompt_tokens, completion_tokens,
estimated_cost_usd, duration_ms, request_id}`.

The stream variant sends server-sent events as the text arrives:
`data: {"type": "delta", "delta": "..."}` for each piece, then one
`data: {"type": "done", ...the summary...}` and `data: [DONE]`. A failure after
the first event ends the stream with an `event: error` in OpenAI's error shape.

`estimated_cost_usd` is written as an exact JSON number from the `Decimal` cost
(never through a float), or null when the model has no price.
"""

from __future__ import annotations

import time
from decimal import Decimal
from typing import Any, ClassVar

import orjson

from relay import errors, upstream
from relay.consumers import (
    ProxiedEndpointConsumer,
    answer_text,
    json_object,
    request_tags,
    required_model,
)
from relay.metering import priced
from relay.sse import DONE, SseMeter, StreamMeter, data_json, delta_text
from relay.tokens import count_text_tokens

MAX_TEMPERATURE = 2


class PromptConsumer(ProxiedEndpointConsumer):
    """The prompt API's request and summary; the two endpoints differ in delivery."""

    upstream_path = "/chat/completions"
    streamed: ClassVar[bool] = False

    def parse(self, body: bytes) -> dict[str, Any]:
        fields = json_object(body)
        model = required_model(fields)
        self.call.model = model
        prompt = fields.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            raise errors.InvalidRequest(
                "'prompt' is required and must be a non-empty string.", param="prompt"
            )
        chat: dict[str, Any] = {
            "model": model,
            "messages": [{"role": "user", "content": prompt}],
        }
        max_tokens = fields.get("max_tokens")
        if max_tokens is not None:
            if not _is_int(max_tokens) or max_tokens < 1:
                raise errors.InvalidRequest(
                    "'max_tokens' must be a positive integer.", param="max_tokens"
                )
            chat["max_tokens"] = max_tokens
        temperature = fields.get("temperature")
        if temperature is not None:
            if not _is_number(temperature) or not 0 <= temperature <= MAX_TEMPERATURE:
                raise errors.InvalidRequest(
                    f"'temperature' must be a number from 0 to {MAX_TEMPERATURE}.",
                    param="temperature",
                )
            chat["temperature"] = temperature
        user_id = fields.get("user_id")
        if user_id is not None:
            if not isinstance(user_id, str):
                raise errors.InvalidRequest(
                    "'user_id' must be a string.", param="user_id"
                )
            chat["user"] = user_id
        self.call.user = user_id or ""
        self.call.tags = request_tags(self.scope["headers"])
        if self.streamed:
            chat["stream"] = True
        return chat

    def summary(self, text: str) -> dict[str, Any]:
        """The answer as the prompt API reports it, once usage is known."""
        cost, _ = priced(self.call, self.catalog)
        return {
            "response": text,
            "model": self.call.model,
            "prompt_tokens": self.call.prompt_tokens,
            "completion_tokens": self.call.completion_tokens,
            "estimated_cost_usd": _exact_number(cost),
            "duration_ms": int((time.perf_counter() - self.call.started) * 1000),
            "request_id": self.call.request_id,
        }


class InferenceCompleteConsumer(PromptConsumer):
    endpoint = "inference.complete"

    async def answer_whole(
        self, response: upstream.UpstreamResponse, content: bytes, payload: Any
    ) -> None:
        body = orjson.dumps(self.summary(answer_text(payload)))
        await self.send_response(
            response.status_code, body, headers=self.response_headers()
        )


class InferenceStreamConsumer(PromptConsumer):
    endpoint = "inference.stream"
    streamed = True

    def stream_meter(self, *, strip_usage: bool) -> StreamMeter:
        return PromptStreamMeter()

    def stream_tail(self, meter: StreamMeter) -> bytes:
        assert isinstance(meter, PromptStreamMeter)
        done = {"type": "done", **self.summary(meter.text())}
        return b"data: " + orjson.dumps(done) + b"\n\n" + DONE + b"\n\n"


class PromptStreamMeter:
    """Chat completion chunks in, the prompt API's delta events out.

    Each complete upstream event is translated as soon as it arrives; the usage
    chunk and `[DONE]` are kept back for the summary that ends the stream.
    """

    def __init__(self) -> None:
        self._events = SseMeter(strip_usage=False)
        self._pieces: list[str] = []

    @property
    def usage(self) -> dict[str, Any] | None:
        return self._events.usage

    @property
    def saw_done(self) -> bool:
        return self._events.saw_done

    def feed(self, data: bytes) -> bytes:
        complete = self._events.feed(data)
        if not complete:
            return b""
        out = []
        for event in complete.split(b"\n\n"):
            payload = data_json(event) if event and not event.startswith(DONE) else None
            piece = delta_text(payload) if payload else ""
            if piece:
                self._pieces.append(piece)
                delta = {"type": "delta", "delta": piece}
                out.append(b"data: " + orjson.dumps(delta) + b"\n\n")
        return b"".join(out)

    def flush(self) -> bytes:
        # An unterminated last event is not a whole chunk: nothing to translate.
        self._events.flush()
        return b""

    def text(self) -> str:
        return "".join(self._pieces)

    def estimated_completion_tokens(self) -> int:
        return count_text_tokens(self.text())


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _exact_number(cost: Decimal | None) -> orjson.Fragment | None:
    """A Decimal as a JSON number with exactly its digits (orjson would need a
    float, which cannot hold most decimal fractions)."""
    if cost is None:
        return None
    return orjson.Fragment(format(cost, "f"))
