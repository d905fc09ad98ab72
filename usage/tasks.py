"""Celery tasks: thin wrappers over idempotent functions."""

from __future__ import annotations

from celery import shared_task
from django.db import OperationalError

from usage import retention
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


@shared_task(autoretry_for=(OperationalError,), retry_backoff=True)
def prune_usage(max_rows: int = 1_000_000) -> int:
    """Delete ledger rows past GATEWAY_USAGE_RETENTION_DAYS (none when unset).

    A slice per run, oldest day first; rollups keep every pruned day's totals.
    """
    return retention.prune_usage(max_rows=max_rows).rows
