"""Reads of keys: the frozen snapshot the relay works from, who may see which key,
and how much of its quotas a key has used."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from django.contrib.auth.models import AbstractBaseUser, AnonymousUser
from django.db.models import Count, F, OuterRef, Prefetch, Q, QuerySet, Subquery, Sum
from django.utils import timezone

from keys.models import ApiKey, KeyEvent, Quota, Team
from keys.roles import is_finance
from keys.secrets import parse_prefix, verify_secret
from usage.models import UsageRow
from usage.rollups import as_money, billing_day, billing_zone, day_bounds, money_sum


@dataclass(frozen=True, slots=True)
class QuotaInfo:
    scope: str  # "key" or "team"
    metric: str
    period: str
    limit: Decimal


@dataclass(frozen=True, slots=True)
class KeyInfo:
    """What the relay needs of a key, read once and cached in-process.

    Never a model instance, so no lazy query can slip into a request.
    """

    id: int
    prefix: str
    name: str
    team_id: int | None
    allowed_models: tuple[str, ...]
    ip_allowlist: tuple[str, ...]
    expires_at: datetime | None
    revoked: bool
    # Set when the secret presented is the previous one, inside its grace period.
    valid_until: datetime | None
    log_bodies: bool
    allow_unpriced: bool
    quotas: tuple[QuotaInfo, ...]

    def is_usable(self, now: datetime) -> bool:
        if self.revoked:
            return False
        if self.expires_at is not None and self.expires_at <= now:
            return False
        return self.valid_until is None or self.valid_until > now

    def allows_model(self, name: str) -> bool:
        if not self.allowed_models:
            return True
        for allowed in self.allowed_models:
            if allowed == name or (
                allowed.endswith("*") and name.startswith(allowed[:-1])
            ):
                return True
        return False


def key_info_for_secret(secret: str) -> KeyInfo | None:
    """Look a presented secret up in the database; None when it matches no key."""
    prefix = parse_prefix(secret)
    if prefix is None:
        return None
    candidates = ApiKey.objects.filter(Q(prefix=prefix) | Q(previous_prefix=prefix))
    for key in candidates:
        if key.prefix == prefix and verify_secret(secret, key.secret_hash):
            return _key_info(key, valid_until=None)
        if key.previous_prefix == prefix and verify_secret(
            secret, key.previous_secret_hash
        ):
            return _key_info(key, valid_until=key.previous_valid_until)
    return None


def _key_info(key: ApiKey, *, valid_until: datetime | None) -> KeyInfo:
    quotas = [QuotaInfo("key", q.metric, q.period, q.limit) for q in key.quotas.all()]
    if key.team_id is not None:
        quotas += [
            QuotaInfo("team", q.metric, q.period, q.limit)
            for q in Quota.objects.filter(team_id=key.team_id)
        ]
    return KeyInfo(
        id=key.pk,
        prefix=key.prefix,
        name=key.name,
        team_id=key.team_id,
        allowed_models=tuple(key.allowed_models or ()),
        ip_allowlist=tuple(key.ip_allowlist or ()),
        expires_at=key.expires_at,
        revoked=key.revoked_at is not None,
        valid_until=valid_until,
        log_bodies=key.log_bodies,
        allow_unpriced=key.allow_unpriced,
        quotas=tuple(quotas),
    )


def visible_keys(user: AbstractBaseUser | AnonymousUser) -> QuerySet[ApiKey]:
    """The keys a user may see: staff with the permission all, finance none, others their own."""
    qs = ApiKey.objects.select_related("team", "owner")
    if not user.is_authenticated:
        return qs.none()
    if user.has_perm("keys.view_apikey"):
        return qs
    if is_finance(user):
        return qs.none()  # Finance sees usage, never keys.
    return qs.filter(owner=user)


def visible_teams(user: AbstractBaseUser | AnonymousUser) -> QuerySet[Team]:
    """Teams, for users allowed to view them (staff with the permission)."""
    qs = Team.objects.prefetch_related(
        Prefetch("quotas", queryset=Quota.objects.order_by("metric", "period"))
    )
    if not user.is_authenticated or not user.has_perm("keys.view_team"):
        return qs.none()
    return qs


def user_role(user: AbstractBaseUser | AnonymousUser) -> str:
    """`admin` (manages keys), `finance` (usage and reports only) or `user` (own keys)."""
    if user.has_perm("keys.view_apikey"):
        return "admin"
    if is_finance(user):
        return "finance"
    return "user"


def key_events(key: ApiKey) -> QuerySet[KeyEvent]:
    """A key's audit trail, newest first."""
    return (
        KeyEvent.objects.filter(key=key).select_related("actor").order_by("-at", "-id")
    )


# --- quotas and spend --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class QuotaUse:
    """One quota of a key or of its team, and how much of it is used now."""

    scope: str  # "key" or "team"
    metric: str
    period: str
    limit: Decimal
    used: Decimal
    # Sliding windows (minute, hour) start `now - length` and never reset at once;
    # calendar windows (day, month) reset at `resets_at`; `total` has neither.
    window_start: datetime | None
    resets_at: datetime | None

    @property
    def remaining(self) -> Decimal:
        return max(self.limit - self.used, Decimal(0))


@dataclass(frozen=True, slots=True)
class Totals:
    """What a key or team used in a window: requests, tokens (prompt + completion),
    and cost (unpriced rows count as requests and tokens, not as cost)."""

    requests: int = 0
    tokens: int = 0
    cost_usd: Decimal = Decimal(0)

    def of(self, metric: str) -> Decimal:
        if metric == Quota.Metric.REQUESTS:
            return Decimal(self.requests)
        if metric == Quota.Metric.TOKENS:
            return Decimal(self.tokens)
        return self.cost_usd


def billing_day_start(now: datetime) -> datetime:
    return day_bounds(billing_day(now))[0]


def billing_month_start(now: datetime) -> datetime:
    local = now.astimezone(billing_zone())
    return datetime(local.year, local.month, 1, tzinfo=billing_zone())


def _next_month(start: datetime) -> datetime:
    year, month = divmod(start.year * 12 + start.month, 12)
    # Rebuilt in the zone, not added: months differ in length and DST moves offsets.
    return datetime(year, month + 1, 1, tzinfo=billing_zone())


def quota_window(period: str, now: datetime) -> tuple[datetime | None, datetime | None]:
    """[start, reset) of a quota period at `now`; calendar periods in GATEWAY_BILLING_TZ."""
    if period == Quota.Period.MINUTE:
        return now - timedelta(minutes=1), None
    if period == Quota.Period.HOUR:
        return now - timedelta(hours=1), None
    if period == Quota.Period.DAY:
        return day_bounds(billing_day(now))
    if period == Quota.Period.MONTH:
        start = billing_month_start(now)
        return start, _next_month(start)
    return None, None


def admitted(rows: QuerySet[UsageRow]) -> QuerySet[UsageRow]:
    """Rows of requests the gateway forwarded (a provider is named): what quotas
    count. Refusals (auth, model, IP, quota) and /v1/usage itself are not."""
    return rows.exclude(provider="")


def usage_totals(
    *, scope: str, ids: Iterable[int], since: datetime | None
) -> dict[int, Totals]:
    """Requests, tokens and cost of each key (or team) since `since`, in one query.

    Counted as quota enforcement counts them (`keys.quota_ledger`): rows of requests
    that reached a provider; refusals before forwarding spent nothing. Served by the
    (key, created_at) and (team, created_at) indexes.
    """
    ids = sorted(set(ids))
    if not ids:
        return {}
    column = "key_id" if scope == "key" else "team_id"
    rows = admitted(UsageRow.objects.filter(**{f"{column}__in": ids}))
    if since is not None:
        rows = rows.filter(created_at__gte=since)
    totals = (
        rows.order_by()
        .values(column)
        .annotate(
            n=Count("id"),
            tokens=Sum(F("prompt_tokens") + F("completion_tokens")),
            cost=money_sum("cost_usd"),
        )
    )
    return {
        t[column]: Totals(t["n"], int(t["tokens"] or 0), as_money(t["cost"]))
        for t in totals
    }


def quota_uses(
    owners: Sequence[tuple[int, int | None, Sequence[Quota], Sequence[Quota]]],
    now: datetime | None = None,
) -> dict[int, list[QuotaUse]]:
    """Each key's quotas with their current use: `{key id: [QuotaUse, ...]}`.

    `owners` holds (key id, team id, the key's quotas, the team's quotas). One
    aggregate query per scope and period present, whatever the number of keys: a
    page of 100 keys costs at most ten queries, never one per key.
    """
    quotas_of: dict[tuple[str, int], Sequence[Quota]] = {}
    for key_id, team_id, key_quotas, team_quotas in owners:
        quotas_of["key", key_id] = key_quotas
        if team_id is not None:
            quotas_of["team", team_id] = team_quotas
    uses = _owner_quota_uses(quotas_of, now or timezone.now())
    return {
        key_id: [
            *uses.get(("key", key_id), []),
            *(uses.get(("team", team_id), []) if team_id is not None else []),
        ]
        for key_id, team_id, _, _ in owners
    }


def team_quota_uses(
    teams: Sequence[tuple[int, Sequence[Quota]]], now: datetime | None = None
) -> dict[int, list[QuotaUse]]:
    """Each team's quotas with their current use, `{team id: [QuotaUse, ...]}`,
    counted as `quota_uses` counts (one query per period present)."""
    quotas_of = {("team", team_id): quotas for team_id, quotas in teams}
    uses = _owner_quota_uses(quotas_of, now or timezone.now())
    return {team_id: uses.get(("team", team_id), []) for team_id, _ in teams}


def _owner_quota_uses(
    quotas_of: dict[tuple[str, int], Sequence[Quota]], now: datetime
) -> dict[tuple[str, int], list[QuotaUse]]:
    wanted: dict[tuple[str, str], set[int]] = defaultdict(set)
    for (scope, owner_id), quotas in quotas_of.items():
        for quota in quotas:
            wanted[scope, quota.period].add(owner_id)
    windows = {period: quota_window(period, now) for _, period in wanted}
    totals = {
        (scope, period): usage_totals(scope=scope, ids=ids, since=windows[period][0])
        for (scope, period), ids in wanted.items()
    }
    result: dict[tuple[str, int], list[QuotaUse]] = {}
    for (scope, owner_id), quotas in quotas_of.items():
        uses = []
        for quota in sorted(quotas, key=lambda q: (q.metric, q.period)):
            start, resets = windows[quota.period]
            found = totals[scope, quota.period].get(owner_id, Totals())
            uses.append(
                QuotaUse(
                    scope=scope,
                    metric=quota.metric,
                    period=quota.period,
                    limit=quota.limit,
                    used=found.of(quota.metric),
                    window_start=start,
                    resets_at=resets,
                )
            )
        result[scope, owner_id] = uses
    return result


def quota_usage(
    *, key_id: int, team_id: int | None, now: datetime | None = None
) -> list[QuotaUse]:
    """The quotas of one key and of its team, with their current use."""
    quotas = list(
        Quota.objects.filter(
            Q(key_id=key_id) | Q(team_id=team_id) if team_id else Q(key_id=key_id)
        )
    )
    key_quotas = [q for q in quotas if q.key_id == key_id]
    team_quotas = [q for q in quotas if q.team_id is not None]
    return quota_uses([(key_id, team_id, key_quotas, team_quotas)], now)[key_id]


def key_spend(
    *, key_id: int, since: datetime | None, until: datetime | None = None
) -> Totals:
    """What one key used between two moments (every secret it had included),
    counted as `usage_totals` counts."""
    rows = admitted(UsageRow.objects.filter(key_id=key_id))
    if since is not None:
        rows = rows.filter(created_at__gte=since)
    if until is not None:
        rows = rows.filter(created_at__lt=until)
    found = rows.order_by().aggregate(
        n=Count("id"),
        tokens=Sum(F("prompt_tokens") + F("completion_tokens")),
        cost=money_sum("cost_usd"),
    )
    return Totals(found["n"], int(found["tokens"] or 0), as_money(found["cost"]))


def key_page_stats(
    key_ids: Sequence[int], now: datetime | None = None
) -> dict[int, dict[str, Any]]:
    """Spend this billing month and last use of each key on one admin page.

    Per-key subqueries on the (key, created_at) index, evaluated for these keys
    only (never for the whole key table): one query for the page.
    """
    if not key_ids:
        return {}
    now = now or timezone.now()
    month = billing_month_start(now)
    rows = UsageRow.objects.filter(key_id=OuterRef("pk")).order_by()
    spend = (
        rows.filter(created_at__gte=month)
        .values("key_id")
        .annotate(total=money_sum("cost_usd"))
        .values("total")
    )
    last = rows.order_by("-created_at").values("created_at")[:1]
    found = (
        ApiKey.objects.filter(pk__in=list(key_ids))
        .order_by()
        .annotate(spend_usd=Subquery(spend), last_used_at=Subquery(last))
        .values("pk", "spend_usd", "last_used_at")
    )
    return {
        row["pk"]: {
            "spend_usd": as_money(row["spend_usd"]),
            "last_used_at": row["last_used_at"],
        }
        for row in found
    }
