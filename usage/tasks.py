"""Celery tasks: thin wrappers over idempotent functions."""

from __future__ import annotations

from celery import shared_task
from django.db import OperationalError

from usage.recorder import recorder
from usage.rollups import rebuild_day, recent_billing_days


@shared_task(autoretry_for=(OperationalError,), retry_backoff=True, max_retries=None)
def flush_usage() -> int:
    """Write spooled usage rows left by processes that died (same host's spool)."""
    return recorder.flush_sync()


@shared_task(autoretry_for=(OperationalError,), retry_backoff=True)
def rollup_recent_days(days: int = 2) -> int:
    """Recompute today's and yesterday's rollups; safe to run twice or late."""
    return sum(rebuild_day(day) for day in recent_billing_days(days))
