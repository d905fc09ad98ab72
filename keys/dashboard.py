"""The admin index's numbers: spend today and this month, top keys and models, and
the error rate of the last hour.

Built to stay cheap on a ledger of millions of rows: billing days before today come
from the daily rollups (recomputed by Celery), the rest from the rows themselves
through their `created_at` index. The rollups' newest day marks the boundary, so
with no rollups at all (Celery never ran, as on the embedded defaults) every number
comes from the rows and is still right.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from decimal import Decimal
from typing import Any

from django.db.models import Count, Max, Q, Sum
from django.utils import timezone

from keys.models import ApiKey
from keys.selectors import billing_day_start, billing_month_start
from usage.models import DailyRollup, UsageRow
from usage.rollups import as_money, billing_day, day_bounds, money_sum

TOP = 10


@dataclass(frozen=True)
class Ranked:
    """One line of a top list: a key or a model, with its month's totals."""

    label: str
    requests: int
    cost_usd: Decimal
    key_id: int | None = None
    prefix: str = ""


@dataclass(frozen=True)
class Dashboard:
    now: datetime
    month_start: datetime
    day_start: datetime
    spend_today: Decimal
    spend_month: Decimal
    requests_month: int
    requests_hour: int
    errors_hour: int
    server_errors_hour: int
    top_models: list[Ranked] = field(default_factory=list)
    # Empty for viewers who may not see keys (finance).
    top_keys: list[Ranked] = field(default_factory=list)
    rolled_up_until: date | None = None

    @property
    def error_rate_hour(self) -> float | None:
        """Share of the last hour's requests answered 4xx or 5xx; None without any."""
        if not self.requests_hour:
            return None
        return self.errors_hour / self.requests_hour

    @property
    def error_percent_hour(self) -> float | None:
        rate = self.error_rate_hour
        return None if rate is None else rate * 100


def admin_dashboard(*, with_keys: bool, now: datetime | None = None) -> Dashboard:
    """The index's numbers; `with_keys` adds the top keys (never shown to finance)."""
    now = now or timezone.now()
    today = billing_day(now)
    month_start = billing_month_start(now)
    day_start = billing_day_start(now)
    first_day = month_start.date()
    rolled_up_until = (
        DailyRollup.objects.filter(day__gte=first_day, day__lt=today)
        .order_by()
        .aggregate(last=Max("day"))["last"]
    )
    rollups = DailyRollup.objects.none()
    rows_since = month_start
    if rolled_up_until is not None:
        rollups = DailyRollup.objects.filter(
            day__gte=first_day, day__lte=rolled_up_until
        )
        rows_since = day_bounds(rolled_up_until + timedelta(days=1))[0]
    # Bounded above too, so the numbers are those of `now` whatever it is.
    rows = UsageRow.objects.filter(created_at__gte=rows_since, created_at__lte=now)

    by_model = _merge(
        [
            rollups.order_by()
            .values("model")
            .annotate(n=Sum("requests"), c=money_sum("cost_usd")),
            rows.order_by()
            .values("model")
            .annotate(n=Count("id"), c=money_sum("cost_usd")),
        ],
        "model",
    )
    today_rows = UsageRow.objects.filter(
        created_at__gte=day_start, created_at__lte=now
    ).order_by()
    hour = (
        UsageRow.objects.filter(
            created_at__gte=now - timedelta(hours=1), created_at__lte=now
        )
        .order_by()
        .aggregate(
            n=Count("id"),
            errors=Count("id", filter=Q(status_code__gte=400)),
            server=Count("id", filter=Q(status_code__gte=500)),
        )
    )
    top_keys: list[Ranked] = []
    if with_keys:
        by_key = _merge(
            [
                rollups.order_by()
                .values("key_id")
                .annotate(n=Sum("requests"), c=money_sum("cost_usd")),
                rows.order_by()
                .values("key_id")
                .annotate(n=Count("id"), c=money_sum("cost_usd")),
            ],
            "key_id",
        )
        top_keys = _top_keys(by_key)
    return Dashboard(
        now=now,
        month_start=month_start,
        day_start=day_start,
        spend_today=as_money(today_rows.aggregate(c=money_sum("cost_usd"))["c"]),
        spend_month=sum((c for _, c in by_model.values()), as_money(0)),
        requests_month=sum(n for n, _ in by_model.values()),
        requests_hour=hour["n"],
        errors_hour=hour["errors"],
        server_errors_hour=hour["server"],
        top_models=[
            Ranked(label=model or "(none)", requests=n, cost_usd=c)
            for model, (n, c) in _ranked(by_model)
        ],
        top_keys=top_keys,
        rolled_up_until=rolled_up_until,
    )


def _merge(groups: list[Any], column: str) -> dict[Any, tuple[int, Decimal]]:
    """Add grouped (requests, cost) totals from rollups and rows by their group.

    Costs come from `money_sum` (whole 1e-10 USD on SQLite) and are added as Decimal.
    """
    totals: dict[Any, list[Any]] = defaultdict(lambda: [0, as_money(0)])
    for group in groups:
        for row in group:
            entry = totals[row[column]]
            entry[0] += row["n"] or 0
            entry[1] += as_money(row["c"])
    return {name: (n, c) for name, (n, c) in totals.items()}


def _ranked(
    totals: dict[Any, tuple[int, Decimal]],
) -> list[tuple[Any, tuple[int, Decimal]]]:
    # By cost, then requests: free models still rank by traffic.
    ordered = sorted(
        totals.items(), key=lambda item: (item[1][1], item[1][0]), reverse=True
    )
    return ordered[:TOP]


def _top_keys(by_key: dict[Any, tuple[int, Decimal]]) -> list[Ranked]:
    ranked = _ranked(by_key)
    names = {
        row["pk"]: row
        for row in ApiKey.objects.filter(pk__in=[key_id for key_id, _ in ranked])
        .order_by()
        .values("pk", "name", "prefix")
    }
    return [
        Ranked(
            label=names.get(key_id, {}).get("name", f"key {key_id}"),
            requests=n,
            cost_usd=c,
            key_id=key_id,
            prefix=names.get(key_id, {}).get("prefix", ""),
        )
        for key_id, (n, c) in ranked
    ]
