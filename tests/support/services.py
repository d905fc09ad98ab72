"""Tests that need a real service: skipped locally when it is down, failed in CI."""

from __future__ import annotations

import os
import socket
from urllib.parse import urlparse

import pytest

IN_CI = os.getenv("CI", "").lower() in {"1", "true", "yes"}


def _reachable(url: str, default_port: int) -> bool:
    parsed = urlparse(url)
    try:
        with socket.create_connection(
            (parsed.hostname or "127.0.0.1", parsed.port or default_port), timeout=1
        ):
            return True
    except OSError:
        return False


def require(service: str, url: str | None, default_port: int) -> str:
    """The service's URL; skips (locally) or fails (CI=true) when it is missing."""
    if url and _reachable(url, default_port):
        return url
    message = f"{service} is not configured or not reachable ({url or 'unset'})"
    if IN_CI:
        pytest.fail(f"CI needs {message}", pytrace=False)
    pytest.skip(message)
