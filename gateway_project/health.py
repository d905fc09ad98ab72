"""/health (the process answers) and /health/ready (its dependencies answer)."""

from __future__ import annotations

import logging

from django.conf import settings
from django.core.cache import cache
from django.db import connection
from django.http import HttpRequest, JsonResponse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET

logger = logging.getLogger(__name__)


@require_GET
@never_cache
def alive(request: HttpRequest) -> JsonResponse:
    from relay.snapshot import snapshot

    # The generation lets tests and operators see that this process saw a change.
    return JsonResponse({"status": "ok", "config_generation": snapshot.generation})


@require_GET
@never_cache
def ready(request: HttpRequest) -> JsonResponse:
    checks = {"database": _database(), "cache": _cache(), "broker": _broker()}
    healthy = all(state in {"ok", "not configured"} for state in checks.values())
    return JsonResponse(
        {"status": "ok" if healthy else "unavailable", "checks": checks},
        status=200 if healthy else 503,
    )


def _database() -> str:
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
    except Exception:
        logger.warning("readiness: database unreachable", exc_info=True)
        return "unreachable"
    return "ok"


def _cache() -> str:
    if not settings.REDIS_URL:
        return "not configured"
    try:
        cache.set("gw:health", "1", timeout=5)
        answered = cache.get("gw:health") == "1"
    except Exception:
        logger.warning("readiness: redis unreachable", exc_info=True)
        return "unreachable"
    return "ok" if answered else "unreachable"


def _broker() -> str:
    if settings.CELERY_TASK_ALWAYS_EAGER:
        return "not configured"
    from gateway_project.celery import app

    try:
        with app.connection_for_write(settings.CELERY_BROKER_URL) as conn:
            # One quick retry, no back-off: a probe must answer within its own timeout.
            conn.ensure_connection(max_retries=1, interval_start=0, timeout=2)
    except Exception:
        logger.warning("readiness: broker unreachable", exc_info=True)
        return "unreachable"
    return "ok"
