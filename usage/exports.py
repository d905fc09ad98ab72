"""CSV exports of usage and reports, plain and in the FinOps FOCUS format.

Every text cell goes through `neutralise()`: key and team names, models, tags,
the request's `user` and `request_id` are chosen by clients or admins, and a cell
starting with `=`, `+`, `-`, `@`, a tab or a carriage return is run as a formula
by spreadsheets. Such a cell gets a leading single quote, which spreadsheets
show as text. Numbers the gateway formats itself are written as they are; money
is the Decimal's own digits (`format(value, "f")`), never a float.
"""

from __future__ import annotations

import csv
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from datetime import UTC, date, datetime
from decimal import Decimal
from itertools import islice
from typing import Any

import orjson
from asgiref.sync import sync_to_async
from django.http import StreamingHttpResponse

from usage.models import ROLLUP_MEASURES, UsageRow
from usage.rollups import billing_day, day_bounds
from usage.selectors import ReportLine

FORMULA_TRIGGERS = ("=", "+", "-", "@", "\t", "\r")

DAILY_COLUMNS = (
    "day",
    "key",
    "team",
    "model",
    "requests",
    "errors",
    "prompt_tokens",
    "completion_tokens",
    "cached_tokens",
    "cost_usd",
)

USAGE_COLUMNS = (
    "id",
    "request_id",
    "created_at",
    "key",
    "key_prefix",
    "team",
    "user",
    "endpoint",
    "model",
    "upstream_model",
    "provider",
    "status_code",
    "error_code",
    "stream",
    "prompt_tokens",
    "completion_tokens",
    "cached_tokens",
    "usage_source",
    "cost_usd",
    "price",
    "latency_ms",
    "ttft_ms",
    "client_disconnected",
    "cache_hit",
    "tags",
)

# The page's table, column for column (`templates/usage/reports.html`).
PAGE_COLUMNS = {
    "detail": ("day", "key", "key_name", "team", "model"),
    "day": ("day",),
    "model": ("model",),
    "team": ("team",),
    "key": ("key", "key_name"),
}
PAGE_TOTAL_COLUMNS = ROLLUP_MEASURES

# FOCUS 1.0 columns (https://focus.finops.org), then the gateway's own (x_).
FOCUS_COLUMNS = (
    "BilledCost",
    "BillingAccountId",
    "BillingAccountName",
    "BillingCurrency",
    "BillingPeriodEnd",
    "BillingPeriodStart",
    "ChargeCategory",
    "ChargeClass",
    "ChargeDescription",
    "ChargeFrequency",
    "ChargePeriodEnd",
    "ChargePeriodStart",
    "ConsumedQuantity",
    "ConsumedUnit",
    "ContractedCost",
    "EffectiveCost",
    "InvoiceIssuerName",
    "ListCost",
    "PricingCategory",
    "PricingQuantity",
    "PricingUnit",
    "ProviderName",
    "PublisherName",
    "RegionId",
    "RegionName",
    "ResourceId",
    "ResourceName",
    "ResourceType",
    "ServiceCategory",
    "ServiceName",
    "SkuId",
    "SkuPriceId",
    "SubAccountId",
    "SubAccountName",
    "Tags",
    "x_Requests",
    "x_Errors",
    "x_PromptTokens",
    "x_CompletionTokens",
    "x_CachedTokens",
    "x_UnpricedRequests",
)
FOCUS_PROVIDER = "LLM gateway"


def neutralise(text: str) -> str:
    """Text that no spreadsheet runs as a formula."""
    if text.startswith(FORMULA_TRIGGERS):
        return "'" + text
    return text


def cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Decimal):
        return format(value, "f")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat().replace("+00:00", "Z")
    if isinstance(value, date):
        return value.isoformat()
    return neutralise(str(value))


class _Echo:
    def write(self, value: str) -> str:
        return value


def csv_text(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> Iterator[str]:
    """CSV lines, one at a time (for streaming): the header, then the rows."""
    writer = csv.writer(_Echo())
    yield writer.writerow(header)
    for row in rows:
        yield writer.writerow([cell(value) for value in row])


async def _in_chunks(lines: Iterator[str], size: int = 500) -> AsyncIterator[str]:
    """The lines, `size` at a time, each chunk read in Django's sync thread.

    Under ASGI Django would otherwise read a sync iterator whole into memory
    before sending a byte; the queryset behind `lines` needs the request's
    thread (and database connection), hence `thread_sensitive`.
    """
    take = sync_to_async(lambda: "".join(islice(lines, size)), thread_sensitive=True)
    while chunk := await take():
        yield chunk


def csv_response(
    lines: Iterator[str], filename: str, *, asgi: bool = False
) -> StreamingHttpResponse:
    """A streamed CSV download; `asgi` when the request came through ASGI."""
    content = _in_chunks(lines) if asgi else lines
    response = StreamingHttpResponse(content, content_type="text/csv; charset=utf-8")
    response["Content-Disposition"] = f'attachment; filename="{filename}"'
    return response


# --- plain CSV ---------------------------------------------------------------------------------


def daily_csv(lines: Iterable[ReportLine]) -> Iterator[str]:
    """reports/daily/?format=csv: the SPEC's columns, key by id, team by name."""
    return csv_text(
        DAILY_COLUMNS,
        (
            (
                line.day,
                line.key_id,
                line.team_name,
                line.model,
                line.requests,
                line.errors,
                line.prompt_tokens,
                line.completion_tokens,
                line.cached_tokens,
                line.cost_usd,
            )
            for line in lines
        ),
    )


def page_csv(lines: Iterable[ReportLine], group: str) -> Iterator[str]:
    """The page's table as CSV: the same columns, rows and order."""
    columns = PAGE_COLUMNS[group] + PAGE_TOTAL_COLUMNS
    return csv_text(columns, (page_cells(line, group) for line in lines))


def page_cells(line: ReportLine, group: str) -> list[Any]:
    values = {
        "day": line.day,
        "key": line.key_id,
        "key_name": line.key_name,
        "team": line.team_name,
        "model": line.model,
        "requests": line.requests,
        "errors": line.errors,
        "prompt_tokens": line.prompt_tokens,
        "completion_tokens": line.completion_tokens,
        "cached_tokens": line.cached_tokens,
        "cost_usd": line.cost_usd,
        "unpriced_requests": line.unpriced_requests,
    }
    return [values[c] for c in PAGE_COLUMNS[group] + PAGE_TOTAL_COLUMNS]


def usage_csv(rows: Iterable[UsageRow]) -> Iterator[str]:
    """usage/?format=csv: every field of the REST API, tags joined by commas."""
    return csv_text(
        USAGE_COLUMNS,
        (
            (
                row.id,
                row.request_id,
                row.created_at,
                row.key_id,
                row.key_prefix,
                row.team.name if row.team_id and row.team else "",
                row.user,
                row.endpoint,
                row.model,
                row.upstream_model,
                row.provider,
                row.status_code,
                row.error_code,
                row.stream,
                row.prompt_tokens,
                row.completion_tokens,
                row.cached_tokens,
                row.usage_source,
                row.cost_usd,
                row.price_id,
                row.latency_ms,
                row.ttft_ms,
                row.client_disconnected,
                row.cache_hit,
                ",".join(str(tag) for tag in row.tags or ()),
            )
            for row in rows
        ),
    )


# --- FOCUS ------------------------------------------------------------------------------------


def _month_bounds(day: date) -> tuple[datetime, datetime]:
    first = day.replace(day=1)
    following = date(first.year + first.month // 12, first.month % 12 + 1, 1)
    return day_bounds(first)[0], day_bounds(following)[0]


def _focus_row(
    *,
    day: date,
    cost: Decimal,
    description: str,
    key_id: int | None,
    key_name: str,
    team_id: int | None,
    team_name: str,
    model: str,
    tags: dict[str, Any],
    requests: int,
    errors: int,
    prompt_tokens: int,
    completion_tokens: int,
    cached_tokens: int,
    unpriced: int,
) -> list[Any]:
    charge_start, charge_end = day_bounds(day)
    period_start, period_end = _month_bounds(day)
    tokens = prompt_tokens + completion_tokens
    return [
        cost,  # BilledCost
        "gateway",  # BillingAccountId
        FOCUS_PROVIDER,  # BillingAccountName
        "USD",  # BillingCurrency
        period_end,  # BillingPeriodEnd
        period_start,  # BillingPeriodStart
        "Usage",  # ChargeCategory
        None,  # ChargeClass: not a correction
        description,  # ChargeDescription
        "Usage-Based",  # ChargeFrequency
        charge_end,  # ChargePeriodEnd
        charge_start,  # ChargePeriodStart
        tokens,  # ConsumedQuantity
        "Tokens",  # ConsumedUnit
        cost,  # ContractedCost: no negotiated rates
        cost,  # EffectiveCost: no commitments to amortise
        FOCUS_PROVIDER,  # InvoiceIssuerName
        cost,  # ListCost
        "Standard",  # PricingCategory
        tokens,  # PricingQuantity
        "Tokens",  # PricingUnit
        FOCUS_PROVIDER,  # ProviderName
        FOCUS_PROVIDER,  # PublisherName
        None,  # RegionId
        None,  # RegionName
        key_id,  # ResourceId: the API key
        key_name,  # ResourceName
        "API key",  # ResourceType
        "AI and Machine Learning",  # ServiceCategory
        model,  # ServiceName: the public model name
        model,  # SkuId
        None,  # SkuPriceId: a line may span a price change
        team_id,  # SubAccountId: the team
        team_name,  # SubAccountName
        orjson.dumps(tags).decode(),  # Tags
        requests,
        errors,
        prompt_tokens,
        completion_tokens,
        cached_tokens,
        unpriced,
    ]


def _description(model: str, unpriced: int) -> str:
    text = f"{model} tokens"
    if unpriced:
        text += f"; {unpriced} unpriced requests not in the cost"
    return text


def focus_daily_csv(lines: Iterable[ReportLine]) -> Iterator[str]:
    """FOCUS rows from daily report lines (day × key × team × model)."""
    return csv_text(
        FOCUS_COLUMNS,
        (
            _focus_row(
                day=line.day,
                cost=line.cost_usd,
                description=_description(line.model or "", line.unpriced_requests),
                key_id=line.key_id,
                key_name=line.key_name,
                team_id=line.team_id,
                team_name=line.team_name,
                model=line.model or "",
                tags={"team": line.team_name, "key_prefix": line.key_prefix},
                requests=line.requests,
                errors=line.errors,
                prompt_tokens=line.prompt_tokens,
                completion_tokens=line.completion_tokens,
                cached_tokens=line.cached_tokens,
                unpriced=line.unpriced_requests,
            )
            for line in lines
            if line.day is not None
        ),
    )


def focus_usage_csv(rows: Iterable[UsageRow]) -> Iterator[str]:
    """FOCUS rows from ledger rows, one per request, charged to its billing day."""

    def focus(row: UsageRow) -> list[Any]:
        unpriced = 1 if row.is_unpriced else 0
        return _focus_row(
            day=billing_day(row.created_at),
            cost=row.cost_usd if row.cost_usd is not None else Decimal("0E-10"),
            description=_description(row.model, unpriced),
            key_id=row.key_id,
            key_name="",
            team_id=row.team_id,
            team_name=row.team.name if row.team_id and row.team else "",
            model=row.model,
            tags={
                "request_id": row.request_id,
                "key_prefix": row.key_prefix,
                "user": row.user,
                "tags": ",".join(str(tag) for tag in row.tags or ()),
            },
            requests=1,
            errors=1 if row.status_code >= 400 else 0,
            prompt_tokens=row.prompt_tokens,
            completion_tokens=row.completion_tokens,
            cached_tokens=row.cached_tokens,
            unpriced=unpriced,
        )

    return csv_text(FOCUS_COLUMNS, (focus(row) for row in rows))
