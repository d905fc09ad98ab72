"""Where a relay request's key comes from: headers only, never the query string."""

from __future__ import annotations

from collections.abc import Iterable


def secret_from_headers(headers: Iterable[tuple[bytes, bytes]]) -> str | None:
    """The key from `Authorization: Bearer`, `x-api-key` or `api-key`, in that order."""
    bearer = api_key = None
    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                bearer = token.strip()
        elif name in (b"x-api-key", b"api-key") and api_key is None:
            api_key = value.decode("latin-1").strip() or None
    return bearer or api_key
