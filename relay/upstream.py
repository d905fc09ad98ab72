"""The one pooled HTTP client each process uses to reach providers.

httpx's API over the aiohttp transport (`httpx-aiohttp`): httpx's own pool scans
every idle connection per request, which measured 3-10x slower here (see
bench/RESULTS.md). One client per event loop, kept alive connections, no retries
at this level: the relay decides what to retry (`relay.forwarding`).
"""

from __future__ import annotations

import asyncio
import contextlib

import httpx
from django.conf import settings
from httpx_aiohttp import AiohttpTransport

from relay.catalog import ProviderInfo

CONNECT_TIMEOUT_S = 10.0

_clients: dict[asyncio.AbstractEventLoop, httpx.AsyncClient] = {}
_transport_factory: type[httpx.AsyncBaseTransport] | None = None


def use_transport(factory: type[httpx.AsyncBaseTransport] | None) -> None:
    """Swap the transport (tests use httpx.MockTransport subclasses)."""
    global _transport_factory
    _transport_factory = factory
    _clients.clear()


def client() -> httpx.AsyncClient:
    loop = asyncio.get_running_loop()
    found = _clients.get(loop)
    if found is None:
        limits = httpx.Limits(
            max_connections=settings.GATEWAY_UPSTREAM_MAX_CONNECTIONS,
            max_keepalive_connections=settings.GATEWAY_UPSTREAM_MAX_CONNECTIONS,
            keepalive_expiry=30.0,
        )
        transport = (
            _transport_factory()
            if _transport_factory
            else AiohttpTransport(limits=limits)
        )
        found = httpx.AsyncClient(transport=transport, limits=limits, trust_env=False)
        for stale in [other for other in _clients if other.is_closed()]:
            del _clients[stale]
        _clients[loop] = found
    return found


async def open_response(
    *, provider: ProviderInfo, path: str, body: bytes
) -> httpx.Response:
    """POST `body` to the provider and return once the response headers are in.

    The caller reads the body (`aiter_raw`/`aread`) and must `aclose()` it.
    """
    headers = {
        "content-type": "application/json",
        "accept-encoding": "identity",
    }
    if provider.api_key:
        headers["authorization"] = f"Bearer {provider.api_key}"
    request = client().build_request(
        "POST",
        provider.base_url + path,
        content=body,
        headers=headers,
        timeout=httpx.Timeout(provider.timeout_s, connect=CONNECT_TIMEOUT_S),
    )
    return await client().send(request, stream=True)


async def close_clients() -> None:
    loop = asyncio.get_running_loop()
    found = _clients.pop(loop, None)
    if found is not None:
        with contextlib.suppress(Exception):
            await found.aclose()
