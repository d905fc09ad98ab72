"""Daily rollups, recomputed from the ledger rather than incremented.

`rebuild_day()` replaces one billing day's rollups with totals computed from its
rows in one transaction, so running it twice, late or concurrently gives the same
totals and the rollups always sum to the rows.

Money is summed exactly on every database: PostgreSQL sums `numeric`; SQLite
stores decimals as 15-digit floats and would sum them as floats, so there the
costs are summed as whole units of 1e-10 USD (integers) and turned back into
`Decimal` in Python (`money_sum`, `as_money`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

from django.conf import settings
from django.db import connection, transaction
from django.db.models import BigIntegerField, Count, Func, Q, Sum
from django.db.models.functions import TruncDate
from django.utils import timezone

from usage.models import ROLLUP_MEASURES, DailyRollup, UsageRow
from usage.pricing import COST_QUANTUM

logger = logging.getLogger(__name__)

# How many recent billing days a report read checks against the ledger (today
# included) and rebuilds when rows arrived since: reports are fresh even where no
# beat runs (the embedded default). 0 turns the check off.
DEFAULT_LIVE_DAYS = 7


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


def days_between(first: date, last: date) -> list[date]:
    """Every billing day from `first` to `last`, both included."""
    return [first + timedelta(days=n) for n in range((last - first).days + 1)]


# --- exact money sums ---------------------------------------------------------------


class _CostUnits(Func):
    """A SQLite cost column as an integer count of 1e-10 USD.

    SQLite keeps a decimal as a double holding its 15 significant digits, which is
    exact below 100,000 USD at 10 places; rounding the scaled double recovers the
    integer exactly, and integer sums are exact.
    """

    template = "CAST(ROUND(%(expressions)s * 10000000000) AS INTEGER)"
    output_field = BigIntegerField()


def money_sum(field: str, **extra: Any) -> Sum:
    """`Sum(field)` of a money column, exact on every backend (see `as_money`)."""
    if connection.vendor == "sqlite":
        return Sum(_CostUnits(field), **extra)
    return Sum(field, **extra)


def as_money(value: Decimal | int | float | None) -> Decimal:
    """A `money_sum` result (or a stored cost) as a Decimal with 10 places."""
    if value is None:
        return Decimal(0).quantize(COST_QUANTUM)
    if isinstance(value, int):
        return Decimal(value).scaleb(-10).quantize(COST_QUANTUM)
    if isinstance(value, float):  # A single SQLite value read without a converter.
        return Decimal(repr(value)).quantize(COST_QUANTUM)
    return value.quantize(COST_QUANTUM)


# --- rebuilding ------------------------------------------------------------------------


def _lock_day(day: date) -> None:
    """Serialise rebuilds of one day across processes until the transaction ends.

    Without it two rebuilds on PostgreSQL both delete the old rows and both insert
    new ones; the rollups' unique constraints (team-less lines included) refuse the
    second set, so that rebuild would fail with an IntegrityError. With it, the
    second waits and recomputes. SQLite needs nothing: its transactions take the
    write lock up front (`transaction_mode` IMMEDIATE in settings).
    """
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            # Namespaced so it cannot collide with other advisory locks.
            cursor.execute(
                "SELECT pg_advisory_xact_lock(%s, %s)", [0x5553, day.toordinal()]
            )


def rollup_totals(start: datetime, end: datetime) -> list[dict[str, Any]]:
    """Totals of the rows in [start, end) per (key, team, model)."""
    totals = (
        UsageRow.objects.filter(created_at__gte=start, created_at__lt=end)
        .values("key_id", "team_id", "model")
        .annotate(
            requests=Count("id"),
            errors=Count("id", filter=Q(status_code__gte=400)),
            prompt=Sum("prompt_tokens"),
            completion=Sum("completion_tokens"),
            cached=Sum("cached_tokens"),
            cost=money_sum("cost_usd"),
            unpriced=Count(
                "id",
                filter=Q(cost_usd__isnull=True)
                & (Q(prompt_tokens__gt=0) | Q(completion_tokens__gt=0)),
            ),
        )
        .order_by()
    )
    return list(totals)


@transaction.atomic
def rebuild_day(day: date) -> int:
    """Recompute one billing day's rollups; returns how many rollup rows it holds.

    Rows are deleted only by retention, whole days, oldest first. On a day no later
    than the oldest remaining row's, a rebuild that would count fewer requests than
    the rollups hold means the day's rows were pruned: the rollups keep the totals
    and the day is left as it is. Any later day is always recomputed, which also
    repairs rollups that count too much.
    """
    _lock_day(day)
    start, end = day_bounds(day)
    totals = rollup_totals(start, end)
    existing = DailyRollup.objects.filter(day=day)
    held = existing.aggregate(n=Sum("requests"))["n"] or 0
    counted = sum(t["requests"] for t in totals)
    if counted < held and _may_have_been_pruned(day):
        logger.warning(
            "rollups kept: the day's rows were pruned",
            extra={"day": day.isoformat(), "rows": counted, "rollup_requests": held},
        )
        return existing.count()
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
            cost_usd=as_money(t["cost"]),
            unpriced_requests=t["unpriced"],
        )
        for t in totals
    ]
    existing.delete()
    DailyRollup.objects.bulk_create(rollups)
    return len(rollups)


def _may_have_been_pruned(day: date) -> bool:
    oldest = (
        UsageRow.objects.order_by("created_at")
        .values_list("created_at", flat=True)
        .first()
    )
    return oldest is None or day <= billing_day(oldest)


def rebuild_days(
    days: Iterable[date], progress: Callable[[date, int], None] | None = None
) -> int:
    """Rebuild each day in its own transaction; returns the rollup rows written."""
    written = 0
    for day in days:
        count = rebuild_day(day)
        written += count
        if progress is not None:
            progress(day, count)
    return written


def refresh_live_days(first: date | None, last: date | None) -> list[date]:
    """Rebuild the recent days of [first, last] whose rows changed since their rollup.

    Reports call this before reading rollups, so a finished request shows as soon
    as its row is written, with or without a beat. Rows are append-only, so a day
    is stale exactly when it has more rows than its rollups count requests: one
    indexed count per recent day, and a rebuild only of the days that changed.
    Returns the days rebuilt.
    """
    live_days = getattr(settings, "GATEWAY_REPORTS_LIVE_DAYS", DEFAULT_LIVE_DAYS)
    if live_days <= 0:
        return []
    today = billing_day(timezone.now())
    candidates = [
        day
        for day in (today - timedelta(days=n) for n in range(live_days))
        if (first is None or day >= first) and (last is None or day <= last)
    ]
    if not candidates:
        return []
    held = dict(
        DailyRollup.objects.filter(day__in=candidates)
        .order_by()
        .values_list("day")
        .annotate(n=Sum("requests"))
    )
    stale = []
    for day in candidates:
        start, end = day_bounds(day)
        rows = UsageRow.objects.filter(created_at__gte=start, created_at__lt=end)
        if rows.count() > held.get(day, 0):
            stale.append(day)
    for day in stale:
        rebuild_day(day)
    return stale


# --- reconciliation ------------------------------------------------------------------------

RECONCILED_FIELDS = ROLLUP_MEASURES
LineKey = tuple[date, int, int | None, str]


@dataclass(frozen=True, slots=True)
class Mismatch:
    line: LineKey  # (day, key id, team id, model)
    field: str
    rows: int | Decimal  # what the ledger says
    rollups: int | Decimal  # what the rollups say


@dataclass(frozen=True, slots=True)
class Reconciliation:
    first: date
    last: date
    lines: int
    requests: int
    cost_usd: Decimal
    unpriced_requests: int
    mismatches: tuple[Mismatch, ...]

    @property
    def ok(self) -> bool:
        return not self.mismatches


def _totals_by_line(
    rows: Iterable[dict[str, Any]],
) -> dict[LineKey, dict[str, int | Decimal]]:
    return {
        (r["day"], r["key_id"], r["team_id"], r["model"]): {
            "requests": r["n_requests"] or 0,
            "errors": r["n_errors"] or 0,
            "prompt_tokens": r["n_prompt"] or 0,
            "completion_tokens": r["n_completion"] or 0,
            "cached_tokens": r["n_cached"] or 0,
            "cost_usd": as_money(r["n_cost"]),
            "unpriced_requests": r["n_unpriced"] or 0,
        }
        for r in rows
    }


def reconcile(first: date, last: date) -> Reconciliation:
    """Compare the rollups of [first, last] with totals computed afresh from rows.

    The ledger side groups by the billing day the database computes
    (`TruncDate` in the billing zone), not by `day_bounds()` as `rebuild_day`
    does, so the check does not share the code it checks.
    """
    start, end = day_bounds(first)[0], day_bounds(last)[1]
    ledger = (
        UsageRow.objects.filter(created_at__gte=start, created_at__lt=end)
        .annotate(day=TruncDate("created_at", tzinfo=billing_zone()))
        .values("day", "key_id", "team_id", "model")
        .annotate(
            n_requests=Count("id"),
            n_errors=Count("id", filter=Q(status_code__gte=400)),
            n_prompt=Sum("prompt_tokens"),
            n_completion=Sum("completion_tokens"),
            n_cached=Sum("cached_tokens"),
            n_cost=money_sum("cost_usd"),
            n_unpriced=Count(
                "id",
                filter=Q(cost_usd__isnull=True)
                & (Q(prompt_tokens__gt=0) | Q(completion_tokens__gt=0)),
            ),
        )
        .order_by()
    )
    rollups = (
        DailyRollup.objects.filter(day__gte=first, day__lte=last)
        .values("day", "key_id", "team_id", "model")
        .annotate(
            n_requests=Sum("requests"),
            n_errors=Sum("errors"),
            n_prompt=Sum("prompt_tokens"),
            n_completion=Sum("completion_tokens"),
            n_cached=Sum("cached_tokens"),
            n_cost=money_sum("cost_usd"),
            n_unpriced=Sum("unpriced_requests"),
        )
        .order_by()
    )
    from_rows, from_rollups = _totals_by_line(ledger), _totals_by_line(rollups)
    zero: dict[str, int | Decimal] = dict.fromkeys(RECONCILED_FIELDS, 0)
    mismatches = []
    for line in sorted(from_rows.keys() | from_rollups.keys(), key=_line_order):
        counted = from_rows.get(line, zero)
        held = from_rollups.get(line, zero)
        for name in RECONCILED_FIELDS:
            if counted[name] != held[name]:
                mismatches.append(Mismatch(line, name, counted[name], held[name]))
    return Reconciliation(
        first=first,
        last=last,
        lines=len(from_rows),
        requests=sum(int(t["requests"]) for t in from_rows.values()),
        cost_usd=sum((Decimal(t["cost_usd"]) for t in from_rows.values()), as_money(0)),
        unpriced_requests=sum(int(t["unpriced_requests"]) for t in from_rows.values()),
        mismatches=tuple(mismatches),
    )


def _line_order(line: LineKey) -> tuple[date, int, int, str]:
    day, key_id, team_id, model = line
    return day, key_id, -1 if team_id is None else team_id, model
