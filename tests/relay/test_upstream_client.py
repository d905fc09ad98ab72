"""`relay.forwarding.open_attempt` over `httpx.MockTransport`: what is retried,
what falls back, and how failures map to the SPEC's errors."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator

import httpx
import pytest
from django.test import override_settings

from relay import upstream
from relay.catalog import Candidate, ProviderInfo, RouteInfo
from relay.errors import UpstreamError, UpstreamTimeout
from relay.forwarding import UpstreamRefusal, open_attempt
from tests.support.servers import free_port

Handler = Callable[[httpx.Request], httpx.Response]
CHAT = {"model": "public", "messages": [{"role": "user", "content": "hi"}]}


def candidate(
    name: str = "public", *, provider: str = "p1", base_url: str = ""
) -> Candidate:
    info = ProviderInfo(
        id=1,
        name=provider,
        base_url=base_url or f"http://{provider}.invalid/v1",
        api_key="sk-provider",
        timeout_s=5.0,
    )
    route = RouteInfo(
        name=name,
        provider=info,
        upstream_model=f"{name}-upstream",
        fallbacks=(),
        max_output_tokens=None,
    )
    return Candidate(name, route, route.upstream_model)


class Upstream:
    """Answers each request with the next handler; records what it was sent."""

    def __init__(self, *handlers: Handler) -> None:
        self.handlers = list(handlers)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        handler = self.handlers[min(len(self.requests), len(self.handlers)) - 1]
        return handler(request)

    def transport(self) -> type[httpx.AsyncBaseTransport]:
        answer = self

        class Transport(httpx.MockTransport):
            def __init__(self) -> None:
                super().__init__(answer)

        return Transport


def status(code: int, body: bytes = b"{}", **headers: str) -> Handler:
    return lambda request: httpx.Response(code, content=body, headers=headers)


def raises(error: type[httpx.TransportError]) -> Handler:
    def handler(request: httpx.Request) -> httpx.Response:
        raise error("simulated", request=request)

    return handler


@pytest.fixture(autouse=True)
def quick_retries() -> Iterator[None]:
    with override_settings(
        GATEWAY_UPSTREAM_RETRIES=2, GATEWAY_UPSTREAM_RETRY_BACKOFF_S=0.0
    ):
        yield


@pytest.fixture
def answer() -> Iterator[Callable[..., Upstream]]:
    def install(*handlers: Handler) -> Upstream:
        fake = Upstream(*handlers)
        upstream.use_transport(fake.transport())
        return fake

    yield install
    upstream.use_transport(None)


async def attempt(candidates: list[Candidate] | None = None, stream_usage=False):
    return await open_attempt(
        candidates=candidates or [candidate()],
        body=CHAT,
        path="/chat/completions",
        stream_usage=stream_usage,
    )


async def test_a_503_is_retried_and_the_next_answer_is_used(answer):
    fake = answer(status(503), status(200, b'{"ok": true}'))

    result = await attempt()

    assert result.response.status_code == 200
    assert json.loads(await result.response.aread()) == {"ok": True}
    assert len(fake.requests) == 2


async def test_a_400_is_handed_back_as_it_came_without_a_retry(answer):
    body = (
        b'{"error": {"message": "bad", "type": "invalid_request_error", "code": "x"}}'
    )
    fake = answer(status(400, body, **{"content-type": "application/json"}))

    with pytest.raises(UpstreamRefusal) as refused:
        await attempt()

    assert refused.value.status == 400
    assert refused.value.body() == body
    assert refused.value.code == "x"
    assert len(fake.requests) == 1


async def test_a_connect_error_becomes_a_502_after_every_retry(answer):
    fake = answer(raises(httpx.ConnectError))

    with pytest.raises(UpstreamError) as failed:
        await attempt()

    assert failed.value.status == 502 and failed.value.code == "upstream_error"
    assert len(fake.requests) == 3  # the first try and GATEWAY_UPSTREAM_RETRIES=2


async def test_a_read_timeout_becomes_a_504_without_a_retry(answer):
    fake = answer(raises(httpx.ReadTimeout), status(200))

    with pytest.raises(UpstreamTimeout) as timed_out:
        await attempt()

    assert timed_out.value.status == 504 and timed_out.value.code == "upstream_timeout"
    assert len(fake.requests) == 1


async def test_a_5xx_that_lasts_becomes_a_502_after_every_retry(answer):
    fake = answer(status(500))

    with pytest.raises(UpstreamError) as failed:
        await attempt()

    assert failed.value.status == 502
    assert len(fake.requests) == 3


async def test_a_429_that_lasts_is_handed_back_with_its_retry_after(answer):
    body = b'{"error": {"message": "slow down", "code": "rate_limit_exceeded"}}'
    fake = answer(status(429, body, **{"retry-after": "7"}))

    with pytest.raises(UpstreamRefusal) as refused:
        await attempt()

    assert refused.value.status == 429
    assert refused.value.body() == body
    assert refused.value.extra_headers["retry-after"] == "7"
    assert len(fake.requests) == 3


async def test_the_number_of_retries_follows_the_setting(answer):
    fake = answer(status(502))

    with override_settings(GATEWAY_UPSTREAM_RETRIES=0), pytest.raises(UpstreamError):
        await attempt()

    assert len(fake.requests) == 1


async def test_a_failing_candidate_falls_back_to_the_next_one(answer):
    def by_host(request: httpx.Request) -> httpx.Response:
        return httpx.Response(500 if request.url.host == "p1.invalid" else 200)

    fake = answer(by_host)
    first, second = candidate("main", provider="p1"), candidate("backup", provider="p2")

    result = await attempt([first, second])

    assert result.candidate == second
    assert [r.url.host for r in fake.requests] == ["p1.invalid"] * 3 + ["p2.invalid"]
    assert json.loads(fake.requests[-1].content)["model"] == "backup-upstream"


async def test_a_client_error_does_not_fall_back(answer):
    fake = answer(status(400))

    with pytest.raises(UpstreamRefusal):
        await attempt([candidate("main", provider="p1"), candidate("b", provider="p2")])

    assert len(fake.requests) == 1


async def test_the_upstream_gets_its_model_name_the_providers_key_and_usage_asked_for(
    answer,
):
    fake = answer(status(200))

    await attempt(stream_usage=True)

    [sent] = fake.requests
    assert sent.url == "http://p1.invalid/v1/chat/completions"
    assert sent.headers["authorization"] == "Bearer sk-provider"
    body = json.loads(sent.content)
    assert body["model"] == "public-upstream"
    assert body["stream_options"] == {"include_usage": True}
    assert body["messages"] == CHAT["messages"]


async def test_usage_is_not_asked_for_when_not_streaming(answer):
    fake = answer(status(200))

    await attempt(stream_usage=False)

    assert "stream_options" not in json.loads(fake.requests[0].content)


async def test_a_refused_connection_over_the_real_transport_becomes_a_502():
    closed = candidate(base_url=f"http://127.0.0.1:{free_port()}/v1")

    try:
        with pytest.raises(UpstreamError) as failed:
            await attempt([closed])
    finally:
        await upstream.close_transports()

    assert failed.value.status == 502
