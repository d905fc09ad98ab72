"""Pruning old ledger rows in batches, without changing any report.

Only whole billing days older than the retention age are pruned, oldest first,
and each day's rollups are rebuilt just before its rows go, so they hold its
final totals. A rebuild never lowers a day's totals once its rows are gone
(`usage.rollups.rebuild_day`), so reports, CSVs and a later `rollup --since`
see the same numbers before and after.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import date, timedelta

from django.conf import settings
from django.utils import timezone

from usage.models import UsageRow
from usage.rollups import billing_day, day_bounds, rebuild_day

logger = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 5000


@dataclass(frozen=True, slots=True)
class Pruned:
    rows: int
    days: int
    before: date | None  # rows of billing days before this one were pruned


def retention_days() -> int | None:
    """GATEWAY_USAGE_RETENTION_DAYS; None (unset or 0) keeps rows forever."""
    days = getattr(settings, "GATEWAY_USAGE_RETENTION_DAYS", None)
    return int(days) if days else None


def retention_horizon(days: int | None = None) -> date | None:
    """The first billing day whose rows are kept; None when nothing is pruned."""
    days = retention_days() if days is None else days
    if not days:
        return None
    return billing_day(timezone.now()) - timedelta(days=days)


def prune_usage(
    *,
    older_than_days: int | None = None,
    batch_size: int | None = None,
    max_rows: int | None = None,
) -> Pruned:
    """Delete rows of billing days older than the retention age, in batches.

    `max_rows` bounds one run (a scheduled task does a slice, the next run goes
    on where it stopped, always at the oldest day).
    """
    horizon = retention_horizon(older_than_days)
    if horizon is None:
        return Pruned(rows=0, days=0, before=None)
    batch = batch_size or getattr(
        settings, "GATEWAY_USAGE_PRUNE_BATCH_SIZE", DEFAULT_BATCH_SIZE
    )
    cutoff = day_bounds(horizon)[0]
    deleted = days = 0
    while max_rows is None or deleted < max_rows:
        oldest = (
            UsageRow.objects.filter(created_at__lt=cutoff)
            .order_by("created_at")
            .values_list("created_at", flat=True)
            .first()
        )
        if oldest is None:
            break
        day = billing_day(oldest)
        rebuild_day(day)  # the rollups hold the day's final totals first
        deleted += _delete_day(
            day, batch, None if max_rows is None else max_rows - deleted
        )
        days += 1
    if deleted:
        logger.info(
            "usage rows pruned",
            extra={"rows": deleted, "days": days, "before": horizon.isoformat()},
        )
    return Pruned(rows=deleted, days=days, before=horizon)


def _delete_day(day: date, batch: int, budget: int | None) -> int:
    start, end = day_bounds(day)
    rows = UsageRow.objects.filter(created_at__gte=start, created_at__lt=end)
    deleted = 0
    while budget is None or deleted < budget:
        size = batch if budget is None else min(batch, budget - deleted)
        ids = list(rows.order_by().values_list("pk", flat=True)[:size])
        if not ids:
            break
        # No signals or cascades on UsageRow: one DELETE ... WHERE id IN (...).
        count, _ = UsageRow.objects.filter(pk__in=ids).delete()
        deleted += count
    return deleted
