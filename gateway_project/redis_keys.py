"""Names of the gateway's Redis keys, under one namespace per deployment.

Two deployments (or two test runs) sharing a Redis database must never read each
other's quota counters or configuration generation: key ids start at 1 in every
database. The namespace is GATEWAY_REDIS_NAMESPACE, or else derived from the
database the gateway writes to.
"""

from __future__ import annotations

import hashlib

from django.conf import settings
from django.db import connection


def namespace() -> str:
    configured = settings.GATEWAY_REDIS_NAMESPACE
    if configured:
        return configured
    db = connection.settings_dict
    identity = (
        f"{db['ENGINE']}|{db.get('HOST') or ''}|{db.get('PORT') or ''}|{db['NAME']}"
    )
    return hashlib.sha256(identity.encode()).hexdigest()[:10]


def redis_key(*parts: str) -> str:
    """`gw:<namespace>:<parts...>`."""
    return ":".join(("gw", namespace(), *parts))
