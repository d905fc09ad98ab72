"""Serializers of usage/ and reports/daily/: query filters in, rows and lines out.

Output only: the usage API is read-only. Money is a `Decimal` rendered as a
string with its 10 places, never a float.
"""

from __future__ import annotations

from datetime import date, datetime
from typing import Any

from django.utils import timezone
from django.utils.dateparse import parse_datetime
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from usage.models import MONEY, UsageRow
from usage.rollups import billing_zone
from usage.selectors import ReportLine, UsageFilters


@extend_schema_field(
    {
        "type": "string",
        "example": "2024-07-01",
        "description": "A billing day (YYYY-MM-DD) or an ISO 8601 instant",
    }
)
class DayOrMomentField(serializers.Field):
    """`YYYY-MM-DD` (a billing day) or an ISO 8601 instant (naive: billing zone)."""

    default_error_messages = {
        "invalid": "Use a date (YYYY-MM-DD) or an ISO 8601 date and time."
    }

    def to_internal_value(self, data: Any) -> date | datetime:
        text = str(data).strip()
        if len(text) == 10:
            try:
                return date.fromisoformat(text)
            except ValueError:
                self.fail("invalid")
        # An unencoded "+" in a query string arrives as a space.
        if "T" in text:
            text = text.replace(" ", "+")
        try:
            moment = parse_datetime(text)
        except ValueError:  # well formed, but not a real date or time
            moment = None
        if moment is None:
            self.fail("invalid")
        if timezone.is_naive(moment):
            moment = moment.replace(tzinfo=billing_zone())
        return moment

    def to_representation(self, value: date | datetime) -> str:
        return value.isoformat()


class UsageFilterSerializer(serializers.Serializer):
    since = DayOrMomentField(required=False)
    until = DayOrMomentField(required=False)
    key = serializers.CharField(required=False, max_length=100)
    team = serializers.CharField(required=False, max_length=100)
    model = serializers.CharField(required=False, max_length=200)
    request_id = serializers.CharField(required=False, max_length=200)

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        filters = UsageFilters(**attrs)
        start, end = filters.start(), filters.end()
        if start is not None and end is not None and start >= end:
            raise serializers.ValidationError({"until": "Must come after since."})
        return attrs

    def filters(self) -> UsageFilters:
        return UsageFilters(**self.validated_data)


class UsageRowSerializer(serializers.Serializer):
    """A ledger row with the SPEC's field names; `team` is the team's name."""

    id = serializers.UUIDField()
    request_id = serializers.CharField()
    created_at = serializers.DateTimeField()
    key = serializers.IntegerField(source="key_id")
    key_prefix = serializers.CharField()
    team = serializers.SerializerMethodField()
    team_id = serializers.IntegerField(allow_null=True)
    user = serializers.CharField()
    endpoint = serializers.CharField()
    model = serializers.CharField()
    upstream_model = serializers.CharField()
    provider = serializers.CharField()
    status_code = serializers.IntegerField()
    error_code = serializers.CharField()
    stream = serializers.BooleanField()
    prompt_tokens = serializers.IntegerField()
    completion_tokens = serializers.IntegerField()
    cached_tokens = serializers.IntegerField()
    usage_source = serializers.CharField()
    cost_usd = serializers.DecimalField(**MONEY, coerce_to_string=True, allow_null=True)
    unpriced = serializers.BooleanField(source="is_unpriced")
    price = serializers.IntegerField(source="price_id", allow_null=True)
    latency_ms = serializers.IntegerField()
    ttft_ms = serializers.IntegerField(allow_null=True)
    client_disconnected = serializers.BooleanField()
    cache_hit = serializers.BooleanField()
    tags = serializers.ListField(child=serializers.CharField())

    def get_team(self, row: UsageRow) -> str | None:
        # select_related("team") leaves None when the team row is gone.
        return row.team.name if row.team_id is not None and row.team else None


class DailyReportLineSerializer(serializers.Serializer):
    """A rollup: billing day × key × team × model."""

    day = serializers.DateField()
    key = serializers.IntegerField(source="key_id")
    key_name = serializers.CharField()
    key_prefix = serializers.CharField()
    team = serializers.SerializerMethodField()
    team_id = serializers.IntegerField(allow_null=True)
    model = serializers.CharField()
    requests = serializers.IntegerField()
    errors = serializers.IntegerField()
    prompt_tokens = serializers.IntegerField()
    completion_tokens = serializers.IntegerField()
    cached_tokens = serializers.IntegerField()
    cost_usd = serializers.DecimalField(**MONEY, coerce_to_string=True)
    unpriced_requests = serializers.IntegerField()

    def get_team(self, line: ReportLine) -> str | None:
        return line.team_name if line.team_id is not None else None
