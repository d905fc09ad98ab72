"""Fixtures of the quota tests: each limiter test runs on both backends."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.support.redis_server import LimiterBackend, limiter_backend


@pytest.fixture(params=["local", "redis"])
async def backend(
    request: pytest.FixtureRequest, settings, monkeypatch
) -> AsyncIterator[LimiterBackend]:
    """The in-process limiter, then the Redis one (skipped without Redis, failed
    in CI)."""
    backend = limiter_backend(request.param, request, settings, monkeypatch)
    yield backend
    await backend.close()
