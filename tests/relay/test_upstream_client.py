"""`relay.forwarding.open_attempt` against a scripted in-process HTTP server: what
is retried, what falls back, and how failures map to the SPEC's errors."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from django.test import override_settings

from relay import upstream
from relay.catalog import Candidate, ProviderInfo, RouteInfo
from relay.errors import UpstreamError, UpstreamTimeout
from relay.forwarding import UpstreamRefusal, open_attempt
from tests.support.servers import free_port

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
CHAT = {"model": "public", "messages": [{"role": "user", "content": "hi"}]}


@dataclass
class Seen:
    """What the scripted upstream was sent."""

    path: str
    headers: dict[str, str]
    content: bytes


@dataclass
class Upstream:
    """Answers each request with the next handler; records what it was sent."""

    handlers: list[Handler]
    url: str = ""
    requests: list[Seen] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        content = await request.read()
        self.requests.append(Seen(request.path, dict(request.headers), content))
        handler = self.handlers[min(len(self.requests), len(self.handlers)) - 1]
        return await handler(request)


def candidate(
    name: str = "public",
    *,
    provider: str = "p1",
    base_url: str = "",
    timeout_s: float = 5.0,
) -> Candidate:
    info = ProviderInfo(
        id=1,
        name=provider,
        base_url=base_url or f"{UPSTREAM_URL[0]}/{provider}/v1",
        api_key="sk-provider",
        timeout_s=timeout_s,
    )
    route = RouteInfo(
        name=name,
        provider=info,
        upstream_model=f"{name}-upstream",
        fallbacks=(),
        max_output_tokens=None,
    )
    return Candidate(name, route, route.upstream_model)


# The scripted server of the running test; the `answer` fixture sets it.
UPSTREAM_URL = ["http://127.0.0.1:1"]


def status(code: int, body: bytes = b"{}", **headers: str) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(status=code, body=body, headers=headers)

    return handler


async def drop_connection(request: web.Request) -> web.StreamResponse:
    """The connection dies before any answer: the upstream could not be reached."""
    assert request.transport is not None
    request.transport.abort()
    return web.Response()


def slow(seconds: float) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(seconds)
        return web.Response(body=b"{}")

    return handler


@pytest.fixture(autouse=True)
def quick_retries() -> Iterator[None]:
    with override_settings(
        GATEWAY_UPSTREAM_RETRIES=2, GATEWAY_UPSTREAM_RETRY_BACKOFF_S=0.0
    ):
        yield


@pytest.fixture
async def answer() -> AsyncIterator[Callable[..., Awaitable[Upstream]]]:
    servers: list[TestServer] = []

    async def install(*handlers: Handler) -> Upstream:
        fake = Upstream(list(handlers))
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", fake.handle)
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        servers.append(server)
        fake.url = UPSTREAM_URL[0] = str(server.make_url("")).rstrip("/")
        return fake

    yield install
    await upstream.close_sessions()
    for server in servers:
        await server.close()


async def attempt(candidates: list[Candidate] | None = None, stream_usage=False):
    return await open_attempt(
        candidates=candidates or [candidate()],
        body=CHAT,
        path="/chat/completions",
        stream_usage=stream_usage,
    )


async def test_a_503_is_retried_and_the_next_answer_is_used(answer):
    fake = await answer(status(503), status(200, b'{"ok": true}'))

    result = await attempt()

    assert result.response.status_code == 200
    assert json.loads(await result.response.aread()) == {"ok": True}
    assert len(fake.requests) == 2


async def test_a_400_is_handed_back_as_it_came_without_a_retry(answer):
    body = (
        b'{"error": {"message": "bad", "type": "invalid_request_error", "code": "x"}}'
    )
    fake = await answer(status(400, body, **{"content-type": "application/json"}))

    with pytest.raises(UpstreamRefusal) as refused:
        await attempt()

    assert refused.value.status == 400
    assert refused.value.body() == body
    assert refused.value.code == "x"
    assert len(fake.requests) == 1


async def test_a_connect_error_becomes_a_502_after_every_retry(answer):
    fake = await answer(drop_connection)

    with pytest.raises(UpstreamError) as failed:
        await attempt()

    assert failed.value.status == 502 and failed.value.code == "upstream_error"
    assert len(fake.requests) == 3  # the first try and GATEWAY_UPSTREAM_RETRIES=2


async def test_a_read_timeout_becomes_a_504_without_a_retry(answer):
    fake = await answer(slow(2.0), status(200))

    with pytest.raises(UpstreamTimeout) as timed_out:
        await attempt([candidate(timeout_s=0.2)])

    assert timed_out.value.status == 504 and timed_out.value.code == "upstream_timeout"
    assert len(fake.requests) == 1


async def test_a_5xx_that_lasts_becomes_a_502_after_every_retry(answer):
    fake = await answer(status(500))

    with pytest.raises(UpstreamError) as failed:
        await attempt()

    assert failed.value.status == 502
    assert len(fake.requests) == 3


async def test_a_429_that_lasts_is_handed_back_with_its_retry_after(answer):
    body = b'{"error": {"message": "slow down", "code": "rate_limit_exceeded"}}'
    fake = await answer(status(429, body, **{"retry-after": "7"}))

    with pytest.raises(UpstreamRefusal) as refused:
        await attempt()

    assert refused.value.status == 429
    assert refused.value.body() == body
    assert refused.value.extra_headers["retry-after"] == "7"
    assert len(fake.requests) == 3


async def test_the_number_of_retries_follows_the_setting(answer):
    fake = await answer(status(502))

    with override_settings(GATEWAY_UPSTREAM_RETRIES=0), pytest.raises(UpstreamError):
        await attempt()

    assert len(fake.requests) == 1


async def test_a_failing_candidate_falls_back_to_the_next_one(answer):
    async def by_provider(request: web.Request) -> web.StreamResponse:
        return web.Response(status=500 if request.path.startswith("/p1/") else 200)

    fake = await answer(by_provider)
    first, second = candidate("main", provider="p1"), candidate("backup", provider="p2")

    result = await attempt([first, second])
    await result.response.aclose()

    assert result.candidate == second
    providers = [r.path.split("/")[1] for r in fake.requests]
    assert providers == ["p1"] * 3 + ["p2"]
    assert json.loads(fake.requests[-1].content)["model"] == "backup-upstream"


async def test_a_client_error_does_not_fall_back(answer):
    fake = await answer(status(400))

    with pytest.raises(UpstreamRefusal):
        await attempt([candidate("main", provider="p1"), candidate("b", provider="p2")])

    assert len(fake.requests) == 1


async def test_the_upstream_gets_its_model_name_the_providers_key_and_usage_asked_for(
    answer,
):
    fake = await answer(status(200))

    await attempt(stream_usage=True)

    [sent] = fake.requests
    assert sent.path == "/p1/v1/chat/completions"
    assert sent.headers["Authorization"] == "Bearer sk-provider"
    body = json.loads(sent.content)
    assert body["model"] == "public-upstream"
    assert body["stream_options"] == {"include_usage": True}
    assert body["messages"] == CHAT["messages"]


async def test_usage_is_not_asked_for_when_not_streaming(answer):
    fake = await answer(status(200))

    await attempt(stream_usage=False)

    assert "stream_options" not in json.loads(fake.requests[0].content)


async def test_a_refused_connection_becomes_a_502_after_every_retry():
    closed = candidate(base_url=f"http://127.0.0.1:{free_port()}/v1")

    try:
        with pytest.raises(UpstreamError) as failed:
            await attempt([closed])
    finally:
        await upstream.close_sessions()

    assert failed.value.status == 502
