"""The relay's HTTP endpoints: Channels consumers served as plain ASGI.

Protocol only: read the request, authorize, hand over to forwarding, stream the
answer, meter it. Nothing here queries the database once the snapshot is warm.
"""

from __future__ import annotations

import asyncio
import itertools
import re
import secrets
import time
from typing import Any, ClassVar

import orjson
from channels.generic.http import AsyncHttpConsumer
from django.conf import settings
from django.utils import timezone

from keys.quotas import Reservation
from keys.selectors import KeyInfo
from relay import client_address, errors, quota_admission, upstream
from relay.auth import secret_from_headers
from relay.catalog import Candidate, Catalog
from relay.forwarding import open_attempt
from relay.metering import Call, Source, finish
from relay.snapshot import snapshot
from relay.sse import SseMeter, StreamMeter, error_event
from relay.tokens import count_prompt_tokens, count_text_tokens
from usage import metrics

# Request ids: a random per-process prefix and a counter, unique without a system
# call per request (uuid4 reads the kernel's random pool every time).
_PROCESS_ID = secrets.token_hex(8)
_request_numbers = itertools.count(1)
REQUEST_ID_PATTERN = re.compile(r"[A-Za-z0-9._:\-]{1,200}")
JSON_HEADERS = [(b"content-type", b"application/json")]


class ClientGone(Exception):
    """The client disconnected before its request body arrived."""


class RelayConsumer(AsyncHttpConsumer):
    """Base of every /v1/ endpoint.

    Replaces Channels' dispatch loop: it awaits one message at a time, so while a
    response streams it would never see `http.disconnect`, and it runs a
    `sync_to_async` connection clean-up per message. Here the body is read
    directly, then a watcher task reads `receive()` for the disconnect while the
    response is produced.
    """

    channel_layer_alias = (
        "relay-none"  # No channel layer: none is allocated per request.
    )
    endpoint: ClassVar[str] = ""

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        self.scope, self.base_send, self.channel_layer = scope, send, None
        self.client_gone = asyncio.Event()
        self._read_deadline: asyncio.Timeout | None = None
        self.response_started = self.response_finished = False
        self.call = Call(endpoint=self.endpoint, request_id=_request_id(scope))
        self.catalog: Catalog | None = None
        self.reservation: Reservation | None = None
        watcher: asyncio.Task[None] | None = None
        snapshot.ensure_polling()
        try:
            try:
                self.call.key = await self.authenticate()
                body = await self.read_body(receive)
                watcher = asyncio.ensure_future(self._watch_disconnect(receive))
                await self.handle(body)
            except errors.RelayError as exc:
                if exc.candidate is not None and self.call.candidate is None:
                    self.call.candidate = exc.candidate  # The row names who failed.
                await self.send_error(exc)
            except ClientGone:
                self.call.client_disconnected = True
                self.call.status, self.call.error_code = 499, "client_disconnected"
        finally:
            if watcher is not None:
                watcher.cancel()
            cost = finish(self.call, self.catalog)
            if self.reservation is not None:
                await quota_admission.settle(self.reservation, self.call, cost)

    # --- reading -----------------------------------------------------------------

    async def authenticate(self) -> KeyInfo:
        secret = secret_from_headers(self.scope["headers"])
        if secret is None:
            raise errors.InvalidApiKey(
                "Missing API key. Send it as 'Authorization: Bearer KEY'."
            )
        key = await snapshot.key_for_secret(secret)
        if key is None or not key.is_usable(timezone.now()):
            raise errors.InvalidApiKey("Incorrect, revoked or expired API key.")
        if key.ip_allowlist and not client_address.ip_allowed(
            self.scope, key.ip_allowlist
        ):
            self.call.key = key
            raise errors.PermissionDenied("This key may not be used from this address.")
        return key

    async def read_body(self, receive: Any) -> bytes:
        limit = settings.GATEWAY_MAX_BODY_BYTES
        for name, value in self.scope["headers"]:
            if name == b"content-length" and value.isdigit() and int(value) > limit:
                raise errors.PayloadTooLarge(f"Request body over {limit} bytes.")
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientGone
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise errors.PayloadTooLarge(f"Request body over {limit} bytes.")
            chunks.append(chunk)
            if not message.get("more_body"):
                return b"".join(chunks)

    async def _watch_disconnect(self, receive: Any) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                self.client_gone.set()
                self._start_grace()
                return

    def _start_grace(self) -> None:
        """The client left: subclasses bound what they still wait for."""

    # --- writing -----------------------------------------------------------------

    async def send_response(  # type: ignore[override]
        self, status: int, body: bytes, *, headers: list[tuple[bytes, bytes]]
    ) -> None:
        """A whole answer with its length, as providers send them (not chunked)."""
        headers = [*headers, (b"content-length", str(len(body)).encode())]
        await self.base_send(
            {"type": "http.response.start", "status": status, "headers": headers}
        )
        await self.base_send({"type": "http.response.body", "body": body})

    def response_headers(
        self, content_type: bytes = b"application/json"
    ) -> list[tuple[bytes, bytes]]:
        headers = [
            (b"content-type", content_type),
            (b"x-request-id", self.call.request_id.encode()),
            (b"x-gateway-overhead-ms", f"{self.call.overhead_ms():.2f}".encode()),
        ]
        if self.reservation is not None and self.reservation.states:
            headers += quota_admission.rate_limit_headers(self.reservation.states)
        return headers

    async def send_error(self, exc: errors.RelayError) -> None:
        self.call.status, self.call.error_code = exc.status, exc.code
        if self.response_started:
            return
        headers = self.response_headers()[1:]
        headers.insert(0, (b"content-type", b"application/json"))
        for name, value in exc.extra_headers.items():
            if name.lower() != "content-type":
                headers.append((name.lower().encode(), value.encode()))
        await self.send_response(exc.status, exc.body(), headers=headers)

    async def send_json(self, status: int, payload: Any) -> None:
        self.call.status = status
        body = orjson.dumps(payload)
        await self.send_response(status, body, headers=self.response_headers())

    async def handle(self, body: bytes) -> None:
        raise NotImplementedError


class ProxiedEndpointConsumer(RelayConsumer):
    """An OpenAI endpoint forwarded to the model's provider and metered."""

    upstream_path: ClassVar[str] = ""
    streams: ClassVar[bool] = True
    # Chat and completions report stream usage only when asked for it.
    stream_usage_option: ClassVar[bool] = True

    async def handle(self, body: bytes) -> None:
        if self.scope["method"] != "POST":
            raise errors.MethodNotAllowed("Use POST.", headers={"allow": "POST"})
        request = self.parse(body)
        candidates = await self.route(request)
        assert self.call.key is not None and self.catalog is not None
        self.reservation = await quota_admission.admit(
            self.call.key, self.catalog, request, candidates, endpoint=self.endpoint
        )
        stream = bool(request.get("stream")) and self.streams
        self.call.stream = stream
        client_wants_usage = bool(
            (request.get("stream_options") or {}).get("include_usage")
        )
        attempt = await open_attempt(
            candidates=candidates,
            body=request,
            path=self.upstream_path,
            stream_usage=stream and self.stream_usage_option,
        )
        self.call.candidate = attempt.candidate
        self.call.model = attempt.candidate.public_name
        self.call.upstream_wait_s = attempt.upstream_wait_s
        if stream:
            strip = self.stream_usage_option and not client_wants_usage
            await self.relay_stream(attempt.response, request, strip_usage=strip)
        else:
            await self.relay_whole(attempt.response, request)

    def parse(self, body: bytes) -> dict[str, Any]:
        """The request to forward, checked; 400 `invalid_request_error` if not."""
        request = json_object(body)
        self.call.model = required_model(request)
        if "stream" in request and not isinstance(request["stream"], bool | None):
            raise errors.InvalidRequest("'stream' must be a boolean.", param="stream")
        user = request.get("user")
        if user is not None and not isinstance(user, str):
            raise errors.InvalidRequest("'user' must be a string.", param="user")
        self.call.user = user or ""
        self.call.tags = request_tags(self.scope["headers"])
        self.validate(request)
        return request

    def validate(self, request: dict[str, Any]) -> None:
        """Endpoint-specific checks of required fields."""

    async def route(self, request: dict[str, Any]) -> list[Candidate]:
        assert self.call.key is not None
        self.catalog = await snapshot.catalog()
        model = request["model"]
        candidates = (
            self.catalog.candidates(model) if self.call.key.allows_model(model) else []
        )
        if not candidates:
            # Unknown and not allowed read the same: the key cannot tell which.
            raise errors.ModelNotFound(
                f"The model '{model}' does not exist or you do not have access to it.",
                param="model",
            )
        return candidates

    async def relay_whole(
        self, response: upstream.UpstreamResponse, request: dict[str, Any]
    ) -> None:
        try:
            content = await self._read_whole(response)
        except TimeoutError:
            # The client left and the upstream did not finish within the grace.
            self.estimate(request, None, completion=0)
            return
        except upstream.UpstreamFailure as exc:
            if exc.timeout:
                raise errors.UpstreamTimeout("the upstream did not finish") from None
            raise errors.UpstreamError("the upstream broke off its answer") from None
        finally:
            await response.aclose()
        try:
            payload = orjson.loads(content)
        except ValueError:
            raise errors.UpstreamError("the upstream's answer is not JSON") from None
        if not isinstance(payload, dict):
            raise errors.UpstreamError("the upstream's answer is not a JSON object")
        if not self.call.take_usage(payload.get("usage")):
            self.estimate(request, answer_text(payload))
        self.call.status = response.status_code
        self.call.mark_first_byte()
        await self.answer_whole(response, content, payload)
        self.response_finished = True

    async def answer_whole(
        self, response: upstream.UpstreamResponse, content: bytes, payload: Any
    ) -> None:
        """Send the upstream's whole answer on: the same bytes, as providers do."""
        content_type = response.headers.get("content-type", "application/json").encode()
        await self.send_response(
            response.status_code, content, headers=self.response_headers(content_type)
        )

    async def _read_whole(self, response: upstream.UpstreamResponse) -> bytes:
        """The whole answer; once the client is gone, only for the grace period.

        No extra task: the disconnect watcher moves this deadline (from never to
        now + grace) when the client leaves.
        """
        async with asyncio.timeout(None) as deadline:
            self._read_deadline = deadline
            if self.client_gone.is_set():
                self._start_grace()
            try:
                return await response.aread()
            finally:
                self._read_deadline = None

    def _start_grace(self) -> None:
        if self.response_finished:
            return  # It left after getting everything: not a disconnect.
        self.call.client_disconnected = True
        if self._read_deadline is not None:
            loop = asyncio.get_running_loop()
            self._read_deadline.reschedule(
                loop.time() + settings.GATEWAY_DISCONNECT_GRACE_S
            )

    async def relay_stream(
        self,
        response: upstream.UpstreamResponse,
        request: dict[str, Any],
        *,
        strip_usage: bool,
    ) -> None:
        meter = self.stream_meter(strip_usage=strip_usage)
        self.call.status = response.status_code
        await self.send_headers(
            status=response.status_code,
            headers=[
                *self.response_headers(b"text/event-stream"),
                (b"cache-control", b"no-cache"),
            ],
        )
        self.response_started = True
        metrics.OPEN_STREAMS.inc()
        failure: str | None = None
        try:
            failure = await self._pump(response, meter)
        finally:
            metrics.OPEN_STREAMS.dec()
            await response.aclose()
        if failure is not None:
            self.call.error_code = "upstream_error"
        if not self.call.take_usage(meter.usage, partial=failure is not None):
            self.estimate(request, None, completion=meter.estimated_completion_tokens())
        if not self.client_gone.is_set():
            if failure is not None:
                await self.send_body(
                    error_event(failure, "upstream_error"), more_body=True
                )
            else:
                tail = self.stream_tail(meter)
                if tail:
                    await self.send_body(tail, more_body=True)
            await self.send_body(b"")
            self.response_finished = True

    def stream_meter(self, *, strip_usage: bool) -> StreamMeter:
        """What turns the upstream's bytes into the client's: the same events."""
        return SseMeter(strip_usage=strip_usage)

    def stream_tail(self, meter: StreamMeter) -> bytes:
        """Events to send after the upstream's, once usage is known: none."""
        return b""

    async def _pump(
        self, response: upstream.UpstreamResponse, meter: StreamMeter
    ) -> str | None:
        """Relay the upstream's events as they arrive; the failure text, if any."""
        chunks = response.aiter_raw()
        deadline: float | None = None
        while True:
            if deadline is None and self.client_gone.is_set():
                # Keep reading a short while for the usage the upstream owes us.
                self.call.client_disconnected = True
                deadline = time.monotonic() + settings.GATEWAY_DISCONNECT_GRACE_S
            try:
                if deadline is None:
                    data = await anext(chunks)
                else:
                    data = await asyncio.wait_for(
                        anext(chunks), deadline - time.monotonic()
                    )
            except StopAsyncIteration:
                break
            except TimeoutError:
                return None  # Grace over after a disconnect: stop reading.
            except upstream.UpstreamFailure as exc:
                if exc.timeout:
                    return "The upstream stopped sending in time."
                return "The upstream broke off the stream."
            out = meter.feed(data)
            if out and deadline is None:
                self.call.mark_first_byte()
                await self.send_body(out, more_body=True)
        rest = meter.flush()
        if rest and deadline is None:
            await self.send_body(rest, more_body=True)
        if not meter.saw_done and meter.usage is None and self.endpoint != "responses":
            return "The upstream ended the stream early."
        return None

    def estimate(
        self, request: dict[str, Any], answer: str | None, completion: int = 0
    ) -> None:
        """Count locally what the upstream did not report."""
        self.call.prompt_tokens = count_prompt_tokens(request)
        self.call.completion_tokens = (
            count_text_tokens(answer) if answer is not None else completion
        )
        self.call.usage_source = Source.ESTIMATED


class ChatCompletionsConsumer(ProxiedEndpointConsumer):
    endpoint = "chat.completions"
    upstream_path = "/chat/completions"

    def validate(self, request: dict[str, Any]) -> None:
        messages = request.get("messages")
        if not isinstance(messages, list) or not messages:
            raise errors.InvalidRequest(
                "'messages' is required and must be a non-empty array.",
                param="messages",
            )
        if not all(isinstance(m, dict) for m in messages):
            raise errors.InvalidRequest(
                "Each message must be an object.", param="messages"
            )


class CompletionsConsumer(ProxiedEndpointConsumer):
    endpoint = "completions"
    upstream_path = "/completions"

    def validate(self, request: dict[str, Any]) -> None:
        if not isinstance(request.get("prompt"), str | list):
            raise errors.InvalidRequest("'prompt' is required.", param="prompt")


class EmbeddingsConsumer(ProxiedEndpointConsumer):
    endpoint = "embeddings"
    upstream_path = "/embeddings"
    streams = False

    def validate(self, request: dict[str, Any]) -> None:
        if not isinstance(request.get("input"), str | list):
            raise errors.InvalidRequest("'input' is required.", param="input")


class ResponsesConsumer(ProxiedEndpointConsumer):
    endpoint = "responses"
    upstream_path = "/responses"
    stream_usage_option = (
        False  # The Responses API reports usage in response.completed.
    )

    def validate(self, request: dict[str, Any]) -> None:
        if not isinstance(request.get("input"), str | list):
            raise errors.InvalidRequest("'input' is required.", param="input")


class ModelsConsumer(RelayConsumer):
    """GET /v1/models and /v1/models/{id}: only what this key may use."""

    endpoint = "models"

    async def handle(self, body: bytes) -> None:
        if self.scope["method"] not in {"GET", "HEAD"}:
            raise errors.MethodNotAllowed("Use GET.")
        assert self.call.key is not None
        self.catalog = await snapshot.catalog()
        key = self.call.key
        model_id = self.scope["url_route"]["kwargs"].get("model_id")
        created = int(time.time())
        if model_id is not None:
            self.call.model = model_id
            if not key.allows_model(model_id) or self.catalog.resolve(model_id) is None:
                raise errors.ModelNotFound(
                    f"The model '{model_id}' does not exist or you do not have access to it.",
                    param="model",
                )
            await self.send_json(200, _model_object(model_id, created))
            return
        listed = [
            _model_object(route.name, created)
            for route in self.catalog.listed_models()
            if key.allows_model(route.name)
        ]
        await self.send_json(200, {"object": "list", "data": listed})


class NotFoundConsumer(RelayConsumer):
    endpoint = "unknown"

    async def authenticate(self) -> KeyInfo:  # type: ignore[override]
        raise errors.NotFound(f"Unknown path {self.scope['path']}.")


def _model_object(name: str, created: int) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": "gateway"}


def _request_id(scope: dict[str, Any]) -> str:
    for name, value in scope["headers"]:
        if name == b"x-request-id":
            candidate = value.decode("latin-1")
            # A key pasted into the wrong header must not be echoed and stored.
            if REQUEST_ID_PATTERN.fullmatch(candidate) and not candidate.startswith(
                "sk-"
            ):
                return candidate
    return f"req_{_PROCESS_ID}{next(_request_numbers):012x}"


def request_tags(headers: list[tuple[bytes, bytes]]) -> list[str]:
    for name, value in headers:
        if name == b"x-gateway-tags":
            tags = [
                t.strip()[:100] for t in value.decode("utf-8", "replace").split(",")
            ]
            return [t for t in tags if t][:20]
    return []


def json_object(body: bytes) -> dict[str, Any]:
    try:
        request = orjson.loads(body)
    except ValueError:
        raise errors.InvalidRequest("The request body is not valid JSON.") from None
    if not isinstance(request, dict):
        raise errors.InvalidRequest("The request body must be a JSON object.")
    return request


def required_model(request: dict[str, Any]) -> str:
    model = request.get("model")
    if not isinstance(model, str) or not model:
        raise errors.InvalidRequest(
            "'model' is required and must be a string.", param="model"
        )
    return model


def answer_text(payload: dict[str, Any]) -> str:
    """The generated text of a whole (not streamed) answer, for every endpoint."""
    parts = []
    for choice in payload.get("choices") or ():
        if isinstance(choice, dict):
            message = choice.get("message")
            if isinstance(message, dict) and isinstance(message.get("content"), str):
                parts.append(message["content"])
            elif isinstance(choice.get("text"), str):
                parts.append(choice["text"])
    if isinstance(payload.get("output_text"), str):
        parts.append(payload["output_text"])
    return "".join(parts)
