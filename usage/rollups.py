"""Daily rollups, recomputed from the ledger rather than incremented.

`rebuild_day()` replaces one billing day's rollups with totals computed from its
rows in one transaction, so running it twice, late or concurrently gives the same
totals and the rollups always sum to the rows.
"""

from __future__ import annotations

from datetime import date, datetime, time, timedelta
from zoneinfo import ZoneInfo

from django.conf import settings
from django.db import transaction
from django.db.models import Count, Q, Sum
from django.utils import timezone

from usage.models import DailyRollup, UsageRow


def billing_zone() -> ZoneInfo:
    return ZoneInfo(settings.GATEWAY_BILLING_TZ)


def day_bounds(day: date) -> tuple[datetime, datetime]:
    """[start, end) of a billing day; 23 or 25 hours long on daylight-saving days."""
    zone = billing_zone()
    start = datetime.combine(day, time.min, tzinfo=zone)
    end = datetime.combine(day + timedelta(days=1), time.min, tzinfo=zone)
    return start, end


def billing_day(moment: datetime) -> date:
    return moment.astimezone(billing_zone()).date()


def recent_billing_days(days: int) -> list[date]:
    today = billing_day(timezone.now())
    return [today - timedelta(days=offset) for offset in range(days)]


@transaction.atomic
def rebuild_day(day: date) -> int:
    """Recompute one billing day's rollups; returns how many rollup rows it holds."""
    start, end = day_bounds(day)
    totals = (
        UsageRow.objects.filter(created_at__gte=start, created_at__lt=end)
        .values("key_id", "team_id", "model")
        .annotate(
            requests=Count("id"),
            errors=Count("id", filter=Q(status_code__gte=400)),
            prompt=Sum("prompt_tokens"),
            completion=Sum("completion_tokens"),
            cached=Sum("cached_tokens"),
            cost=Sum("cost_usd"),
            unpriced=Count(
                "id",
                filter=Q(cost_usd__isnull=True)
                & (Q(prompt_tokens__gt=0) | Q(completion_tokens__gt=0)),
            ),
        )
        .order_by()
    )
    rollups = [
        DailyRollup(
            day=day,
            key_id=t["key_id"],
            team_id=t["team_id"],
            model=t["model"],
            requests=t["requests"],
            errors=t["errors"],
            prompt_tokens=t["prompt"] or 0,
            completion_tokens=t["completion"] or 0,
            cached_tokens=t["cached"] or 0,
            cost_usd=t["cost"] or 0,
            unpriced_requests=t["unpriced"],
        )
        for t in totals
    ]
    DailyRollup.objects.filter(day=day).delete()
    DailyRollup.objects.bulk_create(rollups)
    return len(rollups)
