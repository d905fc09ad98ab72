"""The one pooled HTTP client each process uses to reach providers: aiohttp.

Chosen by measurement (bench/RESULTS.md): httpx's own pool scans every idle
connection per request, and httpx over the aiohttp transport still spent as much
time building and converting requests, headers and responses as aiohttp spent
sending them. The relay needs none of what that buys (redirects, auth flows,
cookies), so it speaks to aiohttp directly, through the small surface below.

One `ClientSession` per event loop, keep-alive connections, no retries here: the
relay decides what to retry (`relay.forwarding`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping

import aiohttp
from django.conf import settings

from relay.catalog import ProviderInfo

CONNECT_TIMEOUT_S = 10.0

_sessions: dict[asyncio.AbstractEventLoop, aiohttp.ClientSession] = {}


class UpstreamFailure(Exception):
    """The upstream could not be reached, broke off, or was too slow (`timeout`)."""

    def __init__(self, message: str, *, timeout: bool) -> None:
        super().__init__(message)
        self.timeout = timeout


def _failure(exc: BaseException) -> UpstreamFailure:
    # A connect timeout counts as unreachable: trying again or elsewhere is worth
    # it, and the SPEC calls an unreachable upstream a 502, a slow one a 504.
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return UpstreamFailure("connecting to the upstream timed out", timeout=False)
    if isinstance(exc, TimeoutError):
        return UpstreamFailure("the upstream was too slow", timeout=True)
    return UpstreamFailure(
        f"upstream connection failed: {type(exc).__name__}", timeout=False
    )


class UpstreamResponse:
    """An upstream's answer once its headers are in; read it once, then close it."""

    __slots__ = ("_response", "headers", "status_code")

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response
        self.status_code: int = response.status
        self.headers: Mapping[str, str] = response.headers  # Case-insensitive.

    async def aread(self) -> bytes:
        try:
            return await self._response.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise _failure(exc) from exc

    async def aiter_raw(self) -> AsyncIterator[bytes]:
        """The body as it arrives, in whatever pieces the network delivers."""
        content = self._response.content
        while True:
            try:
                chunk = await content.readany()
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise _failure(exc) from exc
            if not chunk:
                if not content.is_eof():  # pragma: no cover - readany's contract
                    continue
                return
            yield chunk

    async def aclose(self) -> None:
        # A body read to the end hands its connection back to the pool; one
        # abandoned halfway (client gone, error) is closed so the upstream stops.
        if self._response.content.is_eof():
            self._response.release()
        else:
            self._response.close()


def session() -> aiohttp.ClientSession:
    loop = asyncio.get_running_loop()
    found = _sessions.get(loop)
    if found is None or found.closed:
        connector = aiohttp.TCPConnector(
            limit=settings.GATEWAY_UPSTREAM_MAX_CONNECTIONS,
            keepalive_timeout=30.0,
            ttl_dns_cache=300,
        )
        found = aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,  # Bytes pass through as the provider sent them.
            trust_env=False,
            skip_auto_headers=("User-Agent",),
        )
        for stale in [other for other in _sessions if other.is_closed()]:
            del _sessions[stale]
        _sessions[loop] = found
    return found


_timeouts: dict[float, aiohttp.ClientTimeout] = {}


def _timeout(read_s: float) -> aiohttp.ClientTimeout:
    found = _timeouts.get(read_s)
    if found is None:
        # No total: a stream may last long; each read may wait up to `read_s`.
        found = _timeouts[read_s] = aiohttp.ClientTimeout(
            total=None, sock_connect=CONNECT_TIMEOUT_S, sock_read=read_s
        )
    return found


async def open_response(
    *, provider: ProviderInfo, path: str, body: bytes
) -> UpstreamResponse:
    """POST `body` to the provider and return once the response headers are in.

    The caller reads the body (`aiter_raw`/`aread`) and must `aclose()` it.
    Raises `UpstreamFailure`.
    """
    headers = {"Content-Type": "application/json", "Accept-Encoding": "identity"}
    if provider.api_key:
        headers["Authorization"] = f"Bearer {provider.api_key}"
    try:
        response = await session().post(
            provider.base_url + path,
            data=body,
            headers=headers,
            timeout=_timeout(provider.timeout_s),
            allow_redirects=False,
        )
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise _failure(exc) from exc
    return UpstreamResponse(response)


async def close_sessions() -> None:
    loop = asyncio.get_running_loop()
    found = _sessions.pop(loop, None)
    if found is not None:
        with contextlib.suppress(Exception):
            await found.close()
