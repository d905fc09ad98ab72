"""Reads of usage and reports, with the access rules every interface shares.

Who sees what (the REST API, the /reports/ page and the exports all ask here):
- staff with `usage.view_usagerow` (superusers too) and group `finance`: all usage;
  for reports `usage.view_dailyrollup` is enough as well;
- any other signed-in user: the rows of the keys they own;
- anonymous: nothing.

Reports read rollups, never the ledger, except for the freshness check of the
last few billing days (`usage.rollups.refresh_live_days`).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from decimal import Decimal
from typing import Any

from django.contrib.auth.models import AbstractBaseUser, AnonymousUser
from django.db.models import F, Q, QuerySet, Sum

from keys.models import ApiKey, Team
from keys.roles import is_finance
from keys.secrets import SECRET_PREFIX
from relay.models import ModelRoute
from usage.models import DailyRollup, Price, UsageRow
from usage.rollups import (
    as_money,
    billing_day,
    day_bounds,
    money_sum,
    refresh_live_days,
)

User = AbstractBaseUser | AnonymousUser


class Scope(enum.Enum):
    ALL = "all"
    OWN = "own"  # the rows of the keys the user owns
    NONE = "none"


def usage_scope(user: User) -> Scope:
    # Kept on the user object for the request, as Django keeps permissions: the
    # page asks several selectors, each of which would query the groups again.
    scope: Scope | None = getattr(user, "_usage_scope", None)
    if scope is None:
        if not user.is_authenticated:
            scope = Scope.NONE
        elif user.has_perm("usage.view_usagerow") or is_finance(user):
            scope = Scope.ALL
        else:
            scope = Scope.OWN
        user._usage_scope = scope  # type: ignore[union-attr]
    return scope


def report_scope(user: User) -> Scope:
    if user.is_authenticated and user.has_perm("usage.view_dailyrollup"):
        return Scope.ALL
    return usage_scope(user)


def may_open_reports_page(user: User) -> bool:
    """The page is for finance and staff, and for owners of keys (their own)."""
    scope = report_scope(user)
    if scope is Scope.ALL:
        return True
    return scope is Scope.OWN and ApiKey.objects.filter(owner_id=user.pk).exists()


def _own_keys(user: User) -> QuerySet[ApiKey]:
    return ApiKey.objects.filter(owner_id=user.pk).values("pk")


# --- filters -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class UsageFilters:
    """The filters of usage/, reports/daily/ and the page.

    `since` and `until` are a billing day (whole day, both ends included) or an
    instant (`since` included, `until` excluded).
    """

    since: date | datetime | None = None
    until: date | datetime | None = None
    key: str = ""  # a key id or its prefix (sk-gw-XXXXXXXX-… is cut to the prefix)
    team: str = ""  # a team id or name
    model: str = ""  # a public model name; a trailing * matches a prefix
    request_id: str = ""

    def start(self) -> datetime | None:
        if self.since is None:
            return None
        if isinstance(self.since, datetime):
            return self.since
        return day_bounds(self.since)[0]

    def end(self) -> datetime | None:
        if self.until is None:
            return None
        if isinstance(self.until, datetime):
            return self.until
        return day_bounds(self.until)[1]

    def first_day(self) -> date | None:
        if isinstance(self.since, datetime):
            return billing_day(self.since)
        return self.since

    def last_day(self) -> date | None:
        if isinstance(self.until, datetime):
            return billing_day(self.until - timedelta(microseconds=1))
        return self.until


NOTHING = Q(pk__in=[])


def _as_id(value: str) -> int | None:
    # Past 18 digits it is no id, and it would overflow a bigint in the query.
    return int(value) if value.isdigit() and len(value) <= 18 else None


def _key_match(value: str) -> Q:
    value = value.strip()
    if value.startswith(SECRET_PREFIX):
        value = value[len(SECRET_PREFIX) : len(SECRET_PREFIX) + 8]
    if not value:
        return NOTHING  # `previous_prefix=""` would match every unrotated key
    match = Q(prefix=value) | Q(previous_prefix=value)
    if (pk := _as_id(value)) is not None:
        match |= Q(pk=pk)
    return match


def _team_match(value: str) -> Q:
    value = value.strip()
    match = Q(name=value)
    if (pk := _as_id(value)) is not None:
        match |= Q(pk=pk)
    return match


def _model_match(value: str) -> Q:
    if value.endswith("*"):
        return Q(model__startswith=value[:-1])
    return Q(model=value)


def _label_filters(qs: QuerySet[Any], filters: UsageFilters) -> QuerySet[Any]:
    if filters.key:
        qs = qs.filter(
            key_id__in=ApiKey.objects.filter(_key_match(filters.key)).values("pk")
        )
    if filters.team:
        qs = qs.filter(
            team_id__in=Team.objects.filter(_team_match(filters.team)).values("pk")
        )
    if filters.model:
        qs = qs.filter(_model_match(filters.model))
    return qs


# --- the ledger ----------------------------------------------------------------------------


def visible_usage(user: User) -> QuerySet[UsageRow]:
    qs = UsageRow.objects.all()
    scope = usage_scope(user)
    if scope is Scope.NONE:
        return qs.none()
    if scope is Scope.OWN:
        # By key id, which the (key, created_at) index serves.
        return qs.filter(key_id__in=_own_keys(user))
    return qs


def usage_rows(user: User, filters: UsageFilters) -> QuerySet[UsageRow]:
    """The rows a user may see, filtered, newest first (team names joined)."""
    qs = _label_filters(visible_usage(user), filters)
    start, end = filters.start(), filters.end()
    if start is not None:
        qs = qs.filter(created_at__gte=start)
    if end is not None:
        qs = qs.filter(created_at__lt=end)
    if filters.request_id:
        qs = qs.filter(request_id=filters.request_id)
    return qs.select_related("team").order_by("-created_at", "-id")


# --- reports -----------------------------------------------------------------------------------


class GroupBy(enum.Enum):
    """How report lines are grouped; DETAIL is the rollups' own grain."""

    DETAIL = ("day", "key_id", "team_id", "model")
    DAY = ("day",)
    MODEL = ("model",)
    TEAM = ("team_id",)
    KEY = ("key_id",)

    @property
    def dimensions(self) -> tuple[str, ...]:
        return self.value


@dataclass(frozen=True, slots=True)
class ReportLine:
    """One line of a report; the dimensions a grouping leaves out are None."""

    day: date | None
    key_id: int | None
    key_name: str
    key_prefix: str
    team_id: int | None
    team_name: str
    model: str | None
    requests: int
    errors: int
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    cost_usd: Decimal
    unpriced_requests: int


@dataclass(frozen=True, slots=True)
class Totals:
    requests: int
    errors: int
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    cost_usd: Decimal
    unpriced_requests: int


@dataclass(frozen=True, slots=True)
class ModelSeries:
    model: str
    costs: tuple[Decimal, ...]  # one per day of `CostChart.days`


@dataclass(frozen=True, slots=True)
class CostChart:
    days: tuple[date, ...]
    series: tuple[ModelSeries, ...]


_TOTALS = {
    "total_requests": Sum("requests"),
    "total_errors": Sum("errors"),
    "total_prompt": Sum("prompt_tokens"),
    "total_completion": Sum("completion_tokens"),
    "total_cached": Sum("cached_tokens"),
    "total_unpriced": Sum("unpriced_requests"),
}
_ROW_VALUES = {
    "total_requests": F("requests"),
    "total_errors": F("errors"),
    "total_prompt": F("prompt_tokens"),
    "total_completion": F("completion_tokens"),
    "total_cached": F("cached_tokens"),
    "total_unpriced": F("unpriced_requests"),
    "total_cost": F("cost_usd"),
}


@dataclass(frozen=True)
class DailyReport:
    """Rollups a user may see, filtered; the lines, totals and chart read from them."""

    rollups: QuerySet[DailyRollup]
    first_day: date | None
    last_day: date | None
    _labels: _Labels = field(default_factory=lambda: _Labels())

    def rows(self, group_by: GroupBy = GroupBy.DETAIL) -> QuerySet[Any]:
        """Dicts of the dimensions and `total_*` values, in the report's order."""
        dims = group_by.dimensions
        qs = self.rollups.order_by().values(*dims)
        if group_by is GroupBy.DETAIL:
            # Already one rollup per line: no GROUP BY over the year.
            qs = qs.annotate(**_ROW_VALUES)
            return qs.order_by("day", "key_id", "team_id", "model")
        qs = qs.annotate(**_TOTALS, total_cost=money_sum("cost_usd"))
        if group_by is GroupBy.DAY:
            return qs.order_by("day")
        return qs.order_by("-total_cost", *dims)

    def lines(self, rows: Iterable[dict[str, Any]]) -> Iterator[ReportLine]:
        """Rows from `rows()` as ReportLines with key and team names, in chunks."""
        chunk: list[dict[str, Any]] = []
        for row in rows:
            chunk.append(row)
            if len(chunk) == 2000:
                yield from self._resolve(chunk)
                chunk = []
        yield from self._resolve(chunk)

    def _resolve(self, chunk: list[dict[str, Any]]) -> Iterator[ReportLine]:
        self._labels.load(
            {r["key_id"] for r in chunk if r.get("key_id") is not None},
            {r["team_id"] for r in chunk if r.get("team_id") is not None},
        )
        for row in chunk:
            key_id, team_id = row.get("key_id"), row.get("team_id")
            key_name, key_prefix = self._labels.keys.get(key_id, ("", ""))
            yield ReportLine(
                day=row.get("day"),
                key_id=key_id,
                key_name=key_name,
                key_prefix=key_prefix,
                team_id=team_id,
                team_name=self._labels.teams.get(team_id, ""),
                model=row.get("model"),
                requests=row["total_requests"] or 0,
                errors=row["total_errors"] or 0,
                prompt_tokens=row["total_prompt"] or 0,
                completion_tokens=row["total_completion"] or 0,
                cached_tokens=row["total_cached"] or 0,
                cost_usd=as_money(row["total_cost"]),
                unpriced_requests=row["total_unpriced"] or 0,
            )

    def totals(self) -> Totals:
        sums = self.rollups.order_by().aggregate(
            **_TOTALS, total_cost=money_sum("cost_usd")
        )
        return Totals(
            requests=sums["total_requests"] or 0,
            errors=sums["total_errors"] or 0,
            prompt_tokens=sums["total_prompt"] or 0,
            completion_tokens=sums["total_completion"] or 0,
            cached_tokens=sums["total_cached"] or 0,
            cost_usd=as_money(sums["total_cost"]),
            unpriced_requests=sums["total_unpriced"] or 0,
        )

    def cost_chart(self, max_series: int = 10) -> CostChart:
        """Cost per day and model; beyond `max_series` models the rest is "other"."""
        per_day_model = (
            self.rollups.order_by()
            .values("day", "model")
            .annotate(cost=money_sum("cost_usd"))
        )
        costs: dict[str, dict[date, Decimal]] = {}
        seen_days: set[date] = set()
        for row in per_day_model:
            seen_days.add(row["day"])
            costs.setdefault(row["model"], {})[row["day"]] = as_money(row["cost"])
        if not seen_days:
            return CostChart(days=(), series=())
        first = self.first_day or min(seen_days)
        last = self.last_day or max(seen_days)
        days = tuple(first + timedelta(days=n) for n in range((last - first).days + 1))
        ranked = sorted(costs, key=lambda m: (-sum(costs[m].values()), m))
        shown, rest = ranked[:max_series], ranked[max_series:]
        zero = as_money(0)
        series = [
            ModelSeries(m, tuple(costs[m].get(d, zero) for d in days)) for m in shown
        ]
        if rest:
            other = tuple(
                sum((costs[m].get(d, zero) for m in rest), zero) for d in days
            )
            series.append(ModelSeries("other", other))
        return CostChart(days=days, series=tuple(series))


class _Labels:
    """Names of keys and teams, fetched once per id for the lines of one report."""

    def __init__(self) -> None:
        self.keys: dict[int | None, tuple[str, str]] = {}
        self.teams: dict[int | None, str] = {}

    def load(self, key_ids: set[int], team_ids: set[int]) -> None:
        missing_keys = key_ids - self.keys.keys()
        if missing_keys:
            for pk, name, prefix in ApiKey.objects.filter(
                pk__in=missing_keys
            ).values_list("pk", "name", "prefix"):
                self.keys[pk] = (name, prefix)
        missing_teams = team_ids - self.teams.keys()
        if missing_teams:
            self.teams.update(
                Team.objects.filter(pk__in=missing_teams).values_list("pk", "name")
            )


def visible_rollups(user: User) -> QuerySet[DailyRollup]:
    qs = DailyRollup.objects.all()
    scope = report_scope(user)
    if scope is Scope.NONE:
        return qs.none()
    if scope is Scope.OWN:
        return qs.filter(key_id__in=_own_keys(user))
    return qs


def daily_report(user: User, filters: UsageFilters) -> DailyReport:
    """The daily report (rollups) a user may see, with the recent days made fresh."""
    first, last = filters.first_day(), filters.last_day()
    refresh_live_days(first, last)
    qs = _label_filters(visible_rollups(user), filters)
    if first is not None:
        qs = qs.filter(day__gte=first)
    if last is not None:
        qs = qs.filter(day__lte=last)
    if filters.request_id:
        qs = qs.filter(_lines_of_request(user, filters.request_id))
    return DailyReport(rollups=qs, first_day=first, last_day=last)


def _lines_of_request(user: User, request_id: str) -> Q:
    """The rollup lines that count a request's row(s): its day, key, team, model."""
    match = NOTHING
    rows = visible_usage(user).filter(request_id=request_id)
    for created_at, key_id, team_id, model in rows.values_list(
        "created_at", "key_id", "team_id", "model"
    )[:100]:
        match |= Q(
            day=billing_day(created_at), key_id=key_id, team_id=team_id, model=model
        )
    return match


def report_choices(user: User) -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
    """(keys, teams) a user may filter the page by, as (id, label) pairs."""
    keys = ApiKey.objects.order_by("name", "pk")
    teams = Team.objects.order_by("name")
    if report_scope(user) is not Scope.ALL:
        keys = keys.filter(owner_id=user.pk)
        teams = teams.filter(pk__in=keys.values("team_id"))
    key_choices = [
        (pk, f"{name} ({SECRET_PREFIX}{prefix}…)")
        for pk, name, prefix in keys.values_list("pk", "name", "prefix")
    ]
    return key_choices, list(teams.values_list("pk", "name"))


def known_models() -> list[str]:
    """Model names to suggest in the page's filter: routes and prices, not the ledger."""
    names = set(ModelRoute.objects.values_list("name", flat=True))
    names |= set(Price.objects.order_by().values_list("model", flat=True).distinct())
    return sorted(names)
