"""The one pooled HTTP transport each process uses to reach providers.

httpx's request and response types over the aiohttp transport (`httpx-aiohttp`):
httpx's own connection pool scans every idle connection per request and measured
3-10x slower here (bench/RESULTS.md). Requests go straight to the transport: the
client's per-request layers (URL merging, cookies, auth and redirect flows) do
nothing a relay needs and cost as much as the rest of the hot path. No retries at
this level: the relay decides what to retry (`relay.forwarding`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

import aiohttp
import httpx
from django.conf import settings
from httpx_aiohttp import AiohttpTransport

from relay.catalog import ProviderInfo

CONNECT_TIMEOUT_S = 10.0

_transports: dict[asyncio.AbstractEventLoop, httpx.AsyncBaseTransport] = {}
_transport_factory: Callable[[], httpx.AsyncBaseTransport] | None = None
_urls: dict[str, httpx.URL] = {}


def use_transport(factory: Callable[[], httpx.AsyncBaseTransport] | None) -> None:
    """Swap the transport (tests pass httpx.MockTransport factories); None restores."""
    global _transport_factory
    _transport_factory = factory
    _transports.clear()


def transport() -> httpx.AsyncBaseTransport:
    loop = asyncio.get_running_loop()
    found = _transports.get(loop)
    if found is None:
        if _transport_factory is not None:
            found = _transport_factory()
        else:
            limits = httpx.Limits(
                max_connections=settings.GATEWAY_UPSTREAM_MAX_CONNECTIONS,
                max_keepalive_connections=settings.GATEWAY_UPSTREAM_MAX_CONNECTIONS,
                keepalive_expiry=30.0,
            )
            found = AiohttpTransport(limits=limits, trust_env=False)
        for stale in [other for other in _transports if other.is_closed()]:
            del _transports[stale]
        _transports[loop] = found
    return found


def _url(value: str) -> httpx.URL:
    url = _urls.get(value)
    if url is None:
        if len(_urls) > 10_000:  # Provider URLs are few; never let this grow unbounded.
            _urls.clear()
        url = _urls[value] = httpx.URL(value)
    return url


async def open_response(
    *, provider: ProviderInfo, path: str, body: bytes
) -> httpx.Response:
    """POST `body` to the provider and return once the response headers are in.

    The caller reads the body (`aiter_raw`/`aread`) and must `aclose()` it.
    Raises httpx's exceptions (`TimeoutException`, `HTTPError`).
    """
    headers = [
        (b"host", b""),  # Filled from the URL below.
        (b"content-type", b"application/json"),
        (b"accept-encoding", b"identity"),
        (b"content-length", str(len(body)).encode()),
    ]
    if provider.api_key:
        headers.append((b"authorization", b"Bearer " + provider.api_key.encode()))
    url = _url(provider.base_url + path)
    headers[0] = (b"host", url.netloc)
    timeout = provider.timeout_s
    request = httpx.Request(
        "POST",
        url,
        headers=headers,
        content=body,
        extensions={
            "timeout": {
                "connect": CONNECT_TIMEOUT_S,
                "read": timeout,
                "write": timeout,
                "pool": timeout,
            }
        },
    )
    return await transport().handle_async_request(request)


def is_timeout(exc: httpx.HTTPError) -> bool:
    """Whether the upstream was too slow to answer (504), not unreachable (502).

    httpx-aiohttp maps every aiohttp connection error, a refused connection
    included, to `httpx.ConnectTimeout`; the aiohttp exception it keeps as the
    cause tells the truth. A connect timeout counts as unreachable: retrying it
    elsewhere is worth it, and the SPEC calls an unreachable upstream a 502.
    """
    cause = exc.__cause__
    if cause is None:
        return isinstance(exc, httpx.TimeoutException) and not isinstance(
            exc, httpx.ConnectTimeout
        )
    if isinstance(cause, aiohttp.ConnectionTimeoutError):
        return False
    return isinstance(cause, TimeoutError)


async def close_transports() -> None:
    loop = asyncio.get_running_loop()
    found = _transports.pop(loop, None)
    if found is not None:
        with contextlib.suppress(Exception):
            await found.aclose()
