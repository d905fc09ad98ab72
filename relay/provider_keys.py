"""Provider API keys at rest: Fernet tokens, or the name of an environment variable."""

from __future__ import annotations

import base64
import hashlib
import os

from cryptography.fernet import Fernet, InvalidToken
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured


def _fernet() -> Fernet:
    configured = settings.GATEWAY_ENCRYPTION_KEY
    if configured:
        return Fernet(configured.encode())
    # Derived from SECRET_KEY when no key of its own is set, so rotating SECRET_KEY
    # makes stored provider keys unreadable: set GATEWAY_ENCRYPTION_KEY in production.
    digest = hashlib.sha256(b"gateway-provider-keys:" + settings.SECRET_KEY.encode())
    return Fernet(base64.urlsafe_b64encode(digest.digest()))


def encrypt_provider_key(value: str) -> str:
    return _fernet().encrypt(value.encode()).decode()


def decrypt_provider_key(token: str) -> str:
    try:
        return _fernet().decrypt(token.encode()).decode()
    except InvalidToken as exc:
        raise ImproperlyConfigured(
            "a provider key cannot be decrypted: GATEWAY_ENCRYPTION_KEY changed?"
        ) from exc


def resolve_provider_key(*, api_key_env: str, api_key_encrypted: str) -> str:
    """The key to send upstream: the environment variable wins, then the stored token."""
    if api_key_env:
        return os.environ.get(api_key_env, "")
    if api_key_encrypted:
        return decrypt_provider_key(api_key_encrypted)
    return ""
