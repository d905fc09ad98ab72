"""What a quota's counter holds, recomputed from the usage ledger.

Used when the limiter has lost a counter (Redis flushed or restarted, a new web
process without Redis), so spend survives them. Counts admitted requests only:
rows that reached an upstream (`provider` set); refusals before forwarding
(auth, model, quota) spent nothing.

Costs are summed exactly (`usage.rollups.money_sum`), then rounded up to micro-USD
as the counters keep them: a float sum on SQLite could be a hair over the exact
one and round up to one micro-USD too many.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from django.db.models import Count, F, QuerySet, Sum
from django.db.models.functions import TruncMinute, TruncSecond

from keys.quotas import Counter, cost_micros
from usage.models import UsageRow
from usage.rollups import as_money, money_sum


def _rows(counter: Counter) -> QuerySet[UsageRow]:
    rows = UsageRow.objects.exclude(provider="")
    if counter.quota.scope == "key":
        return rows.filter(key_id=counter.owner_id)
    return rows.filter(team_id=counter.owner_id)


def _amount(metric: str) -> Count | Sum:
    if metric == "requests":
        return Count("id")
    if metric == "tokens":
        return Sum(F("prompt_tokens") + F("completion_tokens"))
    return money_sum("cost_usd")


def _to_int(metric: str, value: object) -> int:
    if value is None:
        return 0
    if metric == "cost_usd":
        return cost_micros(as_money(value))  # type: ignore[arg-type]
    return int(value)  # type: ignore[call-overload]


def spent(counter: Counter, now: datetime) -> list[tuple[int, int]]:
    """(bucket start in ms, amount) pairs for the counter's current window."""
    metric = counter.quota.metric
    rows = _rows(counter)
    if counter.window_ms:
        since = now - timedelta(milliseconds=counter.window_ms)
        trunc = TruncSecond if counter.bucket_ms == 1_000 else TruncMinute
        buckets = (
            rows.filter(created_at__gt=since, created_at__lte=now)
            .annotate(bucket=trunc("created_at", tzinfo=UTC))
            .values("bucket")
            .annotate(amount=_amount(metric))
            .order_by()
        )
        return [
            (int(b["bucket"].timestamp() * 1000), _to_int(metric, b["amount"]))
            for b in buckets
        ]
    if counter.period_start is not None:
        rows = rows.filter(
            created_at__gte=counter.period_start, created_at__lt=counter.period_end
        )
    total = rows.aggregate(amount=_amount(metric))["amount"]
    return [(0, _to_int(metric, total))]


def spent_many(counters: list[Counter], now: datetime) -> list[list[tuple[int, int]]]:
    return [spent(counter, now) for counter in counters]
