"""usage/ and reports/daily/: read-only, JSON pages or whole CSV/FOCUS exports.

`?format=csv` (or `Accept: text/csv`) and `?format=focus` answer with every
matching row, streamed, instead of a JSON page; errors stay JSON.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from django.db.models import QuerySet
from django.http import HttpRequest, StreamingHttpResponse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import extend_schema, extend_schema_view
from rest_framework import generics, viewsets
from rest_framework.exceptions import NotAcceptable
from rest_framework.renderers import BaseRenderer, JSONRenderer
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.settings import api_settings

from usage.exports import (
    csv_response,
    daily_csv,
    focus_daily_csv,
    focus_usage_csv,
    usage_csv,
)
from usage.models import UsageRow
from usage.permissions import ReadsUsage
from usage.selectors import (
    GroupBy,
    UsageFilters,
    daily_report,
    usage_rows,
    visible_usage,
)
from usage.serializers import (
    DailyReportLineSerializer,
    UsageFilterSerializer,
    UsageRowSerializer,
)

EXPORT_CHUNK = 2000


class CsvRenderer(BaseRenderer):
    """Selects CSV; the views stream the export themselves."""

    media_type = "text/csv"
    format = "csv"
    charset = "utf-8"

    def render(
        self,
        data: Any,
        accepted_media_type: str | None = None,
        renderer_context: dict[str, Any] | None = None,
    ) -> bytes:
        raise NotImplementedError("CSV exports are streamed by the view")


class FocusRenderer(CsvRenderer):
    format = "focus"


class ExportsMixin:
    """JSON, the browsable API, CSV and FOCUS; errors are always JSON."""

    renderer_classes = [
        *api_settings.DEFAULT_RENDERER_CLASSES,
        CsvRenderer,
        FocusRenderer,
    ]
    permission_classes = [ReadsUsage]
    request: Request

    def export_format(self) -> str | None:
        renderer = getattr(self.request, "accepted_renderer", None)
        return renderer.format if isinstance(renderer, CsvRenderer) else None

    def handle_exception(self, exc: Exception) -> Response:
        response = super().handle_exception(exc)  # type: ignore[misc]
        if self.export_format() is not None:
            self.request.accepted_renderer = JSONRenderer()
            self.request.accepted_media_type = JSONRenderer.media_type
        return response

    def filters(self) -> UsageFilters:
        params = UsageFilterSerializer(data=self.request.query_params)
        params.is_valid(raise_exception=True)
        return params.filters()

    def export(self, lines: Iterator[str], filename: str) -> StreamingHttpResponse:
        django_request: HttpRequest = self.request._request
        return csv_response(lines, filename, asgi=hasattr(django_request, "scope"))


EXPORTS_DOC = (
    " `?format=csv` (or `Accept: text/csv`) answers with every matching row as "
    "CSV instead of a page of JSON; `?format=focus` in the FinOps FOCUS format."
)


@extend_schema(tags=["usage"])
@extend_schema_view(
    list=extend_schema(
        summary="List usage rows",
        description="Finance and staff with `usage.view_usagerow` see every key; "
        "anyone else the keys they own." + EXPORTS_DOC,
        parameters=[UsageFilterSerializer],
        responses={
            (200, "application/json"): UsageRowSerializer(many=True),
            (200, "text/csv"): OpenApiTypes.STR,
        },
    ),
    retrieve=extend_schema(summary="One usage row"),
)
class UsageViewSet(ExportsMixin, viewsets.ReadOnlyModelViewSet):
    """The usage ledger: one row per authenticated relay request, newest first."""

    serializer_class = UsageRowSerializer
    lookup_value_regex = "[0-9a-fA-F-]{32,36}"

    def get_queryset(self) -> QuerySet[UsageRow]:
        if self.action == "list":
            return usage_rows(self.request.user, self.filters())
        return visible_usage(self.request.user).select_related("team")

    def retrieve(self, request: Request, *args: Any, **kwargs: Any) -> Any:
        if self.export_format() is not None:
            raise NotAcceptable("Exports are of lists: usage/?request_id=…&format=csv")
        return super().retrieve(request, *args, **kwargs)

    def list(self, request: Request, *args: Any, **kwargs: Any) -> Any:
        export = self.export_format()
        if export is None:
            return super().list(request, *args, **kwargs)
        rows = self.get_queryset().iterator(chunk_size=EXPORT_CHUNK)
        if export == "focus":
            return self.export(focus_usage_csv(rows), "usage-focus.csv")
        return self.export(usage_csv(rows), "usage.csv")


@extend_schema(
    tags=["reports"],
    summary="Daily report",
    description="Daily rollups, one line per billing day × key × team × model, "
    "oldest day first; `since`/`until` take billing days (both included)."
    + EXPORTS_DOC,
    parameters=[UsageFilterSerializer],
    responses={
        (200, "application/json"): DailyReportLineSerializer(many=True),
        (200, "text/csv"): OpenApiTypes.STR,
    },
)
class DailyReportView(ExportsMixin, generics.ListAPIView):
    """Daily rollups: billing day × key × team × model, oldest day first."""

    serializer_class = DailyReportLineSerializer

    def list(self, request: Request, *args: Any, **kwargs: Any) -> Any:
        report = daily_report(request.user, self.filters())
        rows = report.rows(GroupBy.DETAIL)
        export = self.export_format()
        if export is not None:
            lines = report.lines(rows.iterator(chunk_size=EXPORT_CHUNK))
            if export == "focus":
                return self.export(focus_daily_csv(lines), "daily-report-focus.csv")
            return self.export(daily_csv(lines), "daily-report.csv")
        page = self.paginate_queryset(rows)
        lines_page = list(report.lines(page if page is not None else rows))
        data = self.get_serializer(lines_page, many=True).data
        if page is None:
            return Response(data)
        return self.get_paginated_response(data)
