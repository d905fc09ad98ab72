"""Getting a response from an upstream: fallbacks and retries, all before the first
byte reaches the client.

Connect errors, 429 and 5xx are retried on the same candidate with backoff, then
the next candidate (fallback) is tried. A timeout is not retried: it already cost
the provider's whole timeout. What is left after the last try becomes the client's
answer, mapped as SPEC.md's error table says.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import orjson
from django.conf import settings

from relay import upstream
from relay.catalog import Candidate
from relay.errors import RelayError, UpstreamError, UpstreamTimeout

RETRYABLE_STATUSES = frozenset({429, 500, 502, 503, 504})


@dataclass
class Attempt:
    candidate: Candidate
    response: upstream.UpstreamResponse
    # Seconds spent waiting for the upstream's headers, over every try.
    upstream_wait_s: float


class UpstreamRefusal(RelayError):
    """The upstream's own error answer, passed to the client as it was."""

    def __init__(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        super().__init__(f"upstream answered {status}")
        self.status = status
        self.raw_body = body
        self.extra_headers = headers
        self.code = _error_code(body) or "upstream_error"

    def body(self) -> bytes:
        return self.raw_body


def upstream_body(
    body: dict[str, Any], candidate: Candidate, *, stream_usage: bool
) -> bytes:
    """The request as the upstream gets it: its model name, usage asked for."""
    outgoing = dict(body)
    outgoing["model"] = candidate.upstream_model
    if stream_usage:
        options = dict(outgoing.get("stream_options") or {})
        options["include_usage"] = True
        outgoing["stream_options"] = options
    return orjson.dumps(outgoing)


async def open_attempt(
    *, candidates: list[Candidate], body: dict[str, Any], path: str, stream_usage: bool
) -> Attempt:
    """The first upstream response worth giving the client (2xx, or a client error).

    An error raised names the candidate it came from, for the usage row.
    """
    try:
        return await _first_answer(candidates, body, path, stream_usage)
    except RelayError as exc:
        exc.candidate = exc.candidate or candidates[-1]  # Every try named one.
        raise


async def _first_answer(
    candidates: list[Candidate], body: dict[str, Any], path: str, stream_usage: bool
) -> Attempt:
    retries = settings.GATEWAY_UPSTREAM_RETRIES
    backoff = settings.GATEWAY_UPSTREAM_RETRY_BACKOFF_S
    waited = 0.0
    last: RelayError = UpstreamError("no upstream could be reached")
    for candidate in candidates:
        payload = upstream_body(body, candidate, stream_usage=stream_usage)
        for try_number in range(retries + 1):
            if try_number:
                await asyncio.sleep(backoff * 2 ** (try_number - 1))
            started = time.perf_counter()
            try:
                response = await upstream.open_response(
                    provider=candidate.provider, path=path, body=payload
                )
            except upstream.UpstreamFailure as exc:
                waited += time.perf_counter() - started
                if exc.timeout:
                    timeout = UpstreamTimeout("the upstream did not answer in time")
                    timeout.candidate = candidate
                    raise timeout from None
                last = UpstreamError("the upstream could not be reached")
                last.candidate = candidate
                continue
            waited += time.perf_counter() - started
            if response.status_code < 400:
                return Attempt(candidate, response, waited)
            if response.status_code not in RETRYABLE_STATUSES:
                refusal = await _refusal(
                    response
                )  # The client's own mistake: no retry.
                refusal.candidate = candidate
                raise refusal
            if response.status_code == 429:
                last = await _refusal(response)
            else:
                await response.aclose()
                last = UpstreamError(f"the upstream failed with {response.status_code}")
            last.candidate = candidate
    raise last


async def _refusal(response: upstream.UpstreamResponse) -> UpstreamRefusal:
    try:
        body = await response.aread()
    except upstream.UpstreamFailure:
        body = b""
    finally:
        await response.aclose()
    headers = {"content-type": response.headers.get("content-type", "application/json")}
    if "retry-after" in response.headers:
        headers["retry-after"] = response.headers["retry-after"]
    return UpstreamRefusal(response.status_code, body, headers)


def _error_code(body: bytes) -> str | None:
    try:
        payload = orjson.loads(body)
    except ValueError:
        return None
    error = payload.get("error") if isinstance(payload, dict) else None
    code = error.get("code") if isinstance(error, dict) else None
    return code if isinstance(code, str) else None
