"""/reports/: the finance page (filters, totals, a daily cost chart, a table, CSV).

Server-rendered: the filters are a GET form, the chart's data is a `json_script`
block drawn by the vendored Chart.js (no CDN). Everything is read from rollups
through `usage.selectors.daily_report`, never from the ledger.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import date
from decimal import Decimal
from typing import Any

from django import forms
from django.contrib.auth import views as auth_views
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.core.paginator import Paginator
from django.http import HttpRequest, HttpResponse, QueryDict, StreamingHttpResponse
from django.shortcuts import render
from django.urls import reverse_lazy
from django.utils import timezone
from django.views.decorators.http import require_GET

from usage.exports import (
    PAGE_COLUMNS,
    PAGE_TOTAL_COLUMNS,
    cell,
    csv_response,
    focus_daily_csv,
    page_cells,
    page_csv,
)
from usage.rollups import billing_day
from usage.selectors import (
    DailyReport,
    GroupBy,
    ReportLine,
    UsageFilters,
    daily_report,
    known_models,
    may_open_reports_page,
    report_choices,
)

PAGE_SIZE = 200
GROUPS = {
    "detail": GroupBy.DETAIL,
    "day": GroupBy.DAY,
    "model": GroupBy.MODEL,
    "team": GroupBy.TEAM,
    "key": GroupBy.KEY,
}
GROUP_LABELS = [
    ("detail", "Day × key × team × model"),
    ("day", "Day"),
    ("model", "Model"),
    ("team", "Team"),
    ("key", "Key"),
]
COLUMN_LABELS = {
    "day": "Day",
    "key": "Key id",
    "key_name": "Key",
    "team": "Team",
    "model": "Model",
    "requests": "Requests",
    "errors": "Errors",
    "prompt_tokens": "Prompt tokens",
    "completion_tokens": "Completion tokens",
    "cached_tokens": "Cached tokens",
    "cost_usd": "Cost (USD)",
    "unpriced_requests": "Unpriced requests",
}
NUMERIC_COLUMNS = set(PAGE_TOTAL_COLUMNS) | {"key"}


class ReportFilterForm(forms.Form):
    since = forms.DateField(
        required=False, widget=forms.DateInput(attrs={"type": "date"})
    )
    until = forms.DateField(
        required=False, widget=forms.DateInput(attrs={"type": "date"})
    )
    team = forms.TypedChoiceField(required=False, coerce=int, empty_value=None)
    key = forms.TypedChoiceField(required=False, coerce=int, empty_value=None)
    model = forms.CharField(
        required=False,
        max_length=200,
        widget=forms.TextInput(attrs={"list": "models", "placeholder": "any model"}),
    )
    group = forms.ChoiceField(choices=GROUP_LABELS, required=False)

    def __init__(
        self,
        data: Mapping[str, Any],
        *,
        keys: list[tuple[int, str]],
        teams: list[tuple[int, str]],
    ) -> None:
        super().__init__(data)
        self.fields["team"].choices = [("", "all teams"), *teams]
        self.fields["key"].choices = [("", "all keys"), *keys]

    def clean(self) -> dict[str, Any]:
        data = super().clean()
        since, until = data.get("since"), data.get("until")
        if since and until and since > until:
            raise forms.ValidationError("The first day comes after the last.")
        return data

    def filters(self) -> UsageFilters:
        data = self.cleaned_data
        return UsageFilters(
            since=data["since"],
            until=data["until"],
            key=str(data["key"]) if data["key"] is not None else "",
            team=str(data["team"]) if data["team"] is not None else "",
            model=data["model"].strip(),
        )

    def grouping(self) -> str:
        return self.cleaned_data["group"] or "detail"

    def query(self) -> str:
        """The filters as a query string, defaults spelled out (export links)."""
        query = QueryDict(mutable=True)
        for name, value in self.cleaned_data.items():
            if value not in (None, ""):
                query[name] = value.isoformat() if isinstance(value, date) else value
        return query.urlencode()


def money_text(value: Decimal) -> str:
    """Every digit the Decimal has, at least cents, thousands separated: no rounding."""
    whole, _, fraction = format(value, "f").partition(".")
    fraction = fraction.rstrip("0").ljust(2, "0")
    return f"{int(whole):,}.{fraction}" if whole != "-0" else f"-0.{fraction}"


def _display(column: str, value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, Decimal):
        return money_text(value)
    if isinstance(value, int) and column != "key":
        return f"{value:,}"
    if isinstance(value, date):
        return value.isoformat()
    return str(value)


def _table(lines: list[ReportLine], group: str) -> list[dict[str, Any]]:
    columns = PAGE_COLUMNS[group] + PAGE_TOTAL_COLUMNS
    rows = []
    for line in lines:
        values = page_cells(line, group)
        rows.append(
            {
                "unpriced": line.unpriced_requests > 0,
                "cells": [
                    {
                        "column": column,
                        "text": _display(column, value),
                        # What the CSV export holds for this cell.
                        "value": cell(value),
                        "numeric": column in NUMERIC_COLUMNS,
                    }
                    for column, value in zip(columns, values, strict=True)
                ],
            }
        )
    return rows


def _chart_data(report: DailyReport) -> dict[str, Any]:
    chart = report.cost_chart()
    return {
        "labels": [day.isoformat() for day in chart.days],
        # Decimal strings: the page turns them into numbers only to draw them.
        "series": [
            {"label": s.model, "data": [format(c, "f") for c in s.costs]}
            for s in chart.series
        ],
    }


def _form(request: HttpRequest) -> ReportFilterForm:
    if not may_open_reports_page(request.user):
        raise PermissionDenied("Reports are for finance, staff and key owners.")
    data = request.GET.copy()
    if "since" not in data and "until" not in data:
        # This billing month so far.
        today = billing_day(timezone.now())
        data["since"] = today.replace(day=1).isoformat()
        data["until"] = today.isoformat()
    keys, teams = report_choices(request.user)
    return ReportFilterForm(data, keys=keys, teams=teams)


@require_GET
@login_required(login_url="reports:login")
def reports_page(request: HttpRequest) -> HttpResponse:
    form = _form(request)
    context: dict[str, Any] = {"form": form, "models": known_models()}
    if not form.is_valid():
        return render(request, "usage/reports.html", context, status=400)
    group = form.grouping()
    report = daily_report(request.user, form.filters())
    page = Paginator(report.rows(GROUPS[group]), PAGE_SIZE).get_page(
        request.GET.get("page")
    )
    totals = report.totals()
    query = form.query()
    context.update(
        {
            "group": group,
            "columns": [
                {"name": c, "label": COLUMN_LABELS[c], "numeric": c in NUMERIC_COLUMNS}
                for c in PAGE_COLUMNS[group] + PAGE_TOTAL_COLUMNS
            ],
            "table": _table(list(report.lines(page.object_list)), group),
            "page": page,
            "totals": totals,
            "totals_text": {
                "requests": f"{totals.requests:,}",
                "errors": f"{totals.errors:,}",
                "prompt_tokens": f"{totals.prompt_tokens:,}",
                "completion_tokens": f"{totals.completion_tokens:,}",
                "cached_tokens": f"{totals.cached_tokens:,}",
                "cost_usd": money_text(totals.cost_usd),
                "unpriced_requests": f"{totals.unpriced_requests:,}",
            },
            "chart": _chart_data(report),
            "query": query,
        }
    )
    return render(request, "usage/reports.html", context)


@require_GET
@login_required(login_url="reports:login")
def reports_export(request: HttpRequest) -> StreamingHttpResponse | HttpResponse:
    """The page's table as CSV (all pages), or `?format=focus` for FinOps tools."""
    form = _form(request)
    if not form.is_valid():
        return HttpResponse(
            form.errors.as_text(), status=400, content_type="text/plain"
        )
    report = daily_report(request.user, form.filters())
    asgi = hasattr(request, "scope")
    if request.GET.get("format") == "focus":
        lines = report.lines(report.rows(GroupBy.DETAIL).iterator(chunk_size=2000))
        return csv_response(focus_daily_csv(lines), "report-focus.csv", asgi=asgi)
    group = form.grouping()
    lines = report.lines(report.rows(GROUPS[group]).iterator(chunk_size=2000))
    return csv_response(page_csv(lines, group), f"report-{group}.csv", asgi=asgi)


login = auth_views.LoginView.as_view(
    template_name="usage/login.html",
    redirect_authenticated_user=True,
    next_page=reverse_lazy("reports:index"),
)
logout = auth_views.LogoutView.as_view(next_page=reverse_lazy("reports:login"))
