"""API key secrets: `sk-gw-` + 8-character public prefix + `-` + 43 random characters.

The database keeps the prefix (to find the row) and an HMAC-SHA256 of the whole
secret under `GATEWAY_KEY_HASH_SECRET` (so a stolen database cannot be brute-forced
offline without that secret too).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import string
from dataclasses import dataclass

from django.conf import settings

SECRET_PREFIX = "sk-gw-"  # noqa: S105 (a format marker, not a secret)
PREFIX_ALPHABET = string.ascii_letters + string.digits
SECRET_PATTERN = re.compile(r"sk-gw-([A-Za-z0-9]{8})-([A-Za-z0-9_\-]{32,200})")


@dataclass(frozen=True)
class Secret:
    prefix: str
    value: str

    def __repr__(self) -> str:
        return f"Secret(prefix={self.prefix!r}, value='…')"


def make_secret() -> Secret:
    prefix = "".join(secrets.choice(PREFIX_ALPHABET) for _ in range(8))
    return Secret(
        prefix=prefix, value=f"{SECRET_PREFIX}{prefix}-{secrets.token_urlsafe(32)}"
    )


def parse_prefix(value: str) -> str | None:
    """The public prefix of a well-formed secret, or None for anything else."""
    match = SECRET_PATTERN.fullmatch(value)
    return match.group(1) if match else None


def hash_secret(value: str) -> str:
    key = settings.GATEWAY_KEY_HASH_SECRET.encode()
    return hmac.new(key, value.encode(), hashlib.sha256).hexdigest()


def verify_secret(value: str, secret_hash: str) -> bool:
    return bool(secret_hash) and hmac.compare_digest(hash_secret(value), secret_hash)
