"""Deployment checks (`manage.py check --deploy`) for the gateway's own secrets."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.checks import CheckMessage, Tags, Warning, register


@register(Tags.security, deploy=True)
def secrets_independent_of_django(**kwargs: Any) -> list[CheckMessage]:
    """Key hashes and provider keys must not hang on DJANGO_SECRET_KEY.

    Both default to values derived from it, which is convenient in development;
    in production rotating Django's secret (as its own docs advise after a leak)
    would then invalidate every issued API key and make every stored provider key
    unreadable.
    """
    messages: list[CheckMessage] = []
    if settings.GATEWAY_KEY_HASH_SECRET == settings.SECRET_KEY:
        messages.append(
            Warning(
                "GATEWAY_KEY_HASH_SECRET is not set, so API keys are hashed with "
                "DJANGO_SECRET_KEY: rotating that secret would invalidate every key.",
                hint="Set GATEWAY_KEY_HASH_SECRET to its own long random value.",
                id="keys.W001",
            )
        )
    if not settings.GATEWAY_ENCRYPTION_KEY:
        messages.append(
            Warning(
                "GATEWAY_ENCRYPTION_KEY is not set, so provider keys are encrypted "
                "with a key derived from DJANGO_SECRET_KEY: rotating that secret "
                "would make them unreadable.",
                hint="Set GATEWAY_ENCRYPTION_KEY to a Fernet key "
                "(Fernet.generate_key()).",
                id="keys.W002",
            )
        )
    return messages
