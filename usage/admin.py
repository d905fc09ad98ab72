"""Admin for prices (effective-dated), the usage ledger and daily rollups.

The ledger and its rollups are read-only here: rows are written by the relay and
recomputed by Celery, never by hand. They grow without bound, so their lists never
count the whole table, never list distinct values of a column to build a filter,
and never join a row to a key that may no longer exist.
"""

from __future__ import annotations

from datetime import date
from typing import Any

from django.contrib import admin
from django.core.paginator import Paginator
from django.db.models import Exists, OuterRef, Q, QuerySet, Subquery
from django.forms import ModelForm
from django.http import HttpRequest
from django.urls import reverse
from django.utils import timezone
from django.utils.functional import cached_property
from django.utils.html import format_html

from keys.models import ApiKey
from keys.secrets import SECRET_PREFIX
from keys.services import config_changed
from relay.models import ModelRoute
from relay.services import upsert_price
from usage.models import DailyRollup, Price, UsageRow
from usage.rollups import day_bounds

# --- prices ------------------------------------------------------------------------

PRICE_HELP = (
    "Prices are effective-dated: a request is costed with the row in force at its "
    "time, and recorded usage keeps the cost it was charged. A price already in "
    "force cannot be edited or deleted: to change it, add a new row effective from "
    "the moment the new price applies. A scheduled row (effective in the future) may "
    "still be corrected or deleted."
)


@admin.register(Price)
class PriceAdmin(admin.ModelAdmin):
    fieldsets = [
        (
            None,
            {
                "description": PRICE_HELP,
                "fields": [
                    "model",
                    "input",
                    "output",
                    "cached_input",
                    "effective_from",
                ],
            },
        )
    ]
    list_display = [
        "model",
        "input",
        "output",
        "cached_input",
        "effective_from",
        "state",
    ]
    list_filter = ["model"]  # distinct models of the small price table
    search_fields = ["model"]

    def get_queryset(self, request: HttpRequest) -> QuerySet[Price]:
        newer_in_force = Price.objects.filter(
            model=OuterRef("model"),
            effective_from__gt=OuterRef("effective_from"),
            effective_from__lte=timezone.now(),
        )
        return super().get_queryset(request).annotate(superseded=Exists(newer_in_force))

    def get_readonly_fields(
        self, request: HttpRequest, obj: Price | None = None
    ) -> list[str]:
        # A scheduled row is found by (model, effective_from): only its numbers change.
        return [] if obj is None else ["model", "effective_from"]

    def has_change_permission(
        self, request: HttpRequest, obj: Price | None = None
    ) -> bool:
        if obj is not None and self.in_force(obj):
            return False
        return super().has_change_permission(request, obj)

    def has_delete_permission(
        self, request: HttpRequest, obj: Price | None = None
    ) -> bool:
        if obj is not None and self.in_force(obj):
            return False
        return super().has_delete_permission(request, obj)

    def get_actions(self, request: HttpRequest) -> dict[str, Any]:
        # The bulk delete action would not ask `has_delete_permission` per row.
        actions = super().get_actions(request)
        actions.pop("delete_selected", None)
        return actions

    @staticmethod
    def in_force(obj: Price) -> bool:
        return obj.effective_from <= timezone.now()

    @admin.display(description="state")
    def state(self, obj: Price) -> str:
        if not self.in_force(obj):
            return "scheduled"
        return "superseded" if getattr(obj, "superseded", False) else "in force"

    def save_model(
        self, request: HttpRequest, obj: Price, form: ModelForm, change: bool
    ) -> None:
        price, _ = upsert_price(
            model=obj.model,
            input=form.cleaned_data["input"],
            output=form.cleaned_data["output"],
            cached_input=form.cleaned_data.get("cached_input"),
            effective_from=obj.effective_from,
        )
        obj.pk = price.pk
        obj.refresh_from_db()
        obj._state.adding = False

    def delete_model(self, request: HttpRequest, obj: Price) -> None:
        super().delete_model(request, obj)
        config_changed()


# --- shared by the ledger and the rollups --------------------------------------------


class BoundedCountPaginator(Paginator):
    """Counts at most `cap` rows instead of running COUNT(*) over the whole ledger.

    Past the cap the page links stop there; filters narrow the list instead.
    (healthchecks' admin for pings does the same with a fixed count.)
    """

    cap = 10_000

    @cached_property
    def count(self) -> int:  # type: ignore[override]
        return self.object_list.order_by().values("pk")[: self.cap].count()


class InputFilter(admin.SimpleListFilter):
    """A filter typed into a text box rather than picked from a list of every value."""

    template = "admin/input_filter.html"
    placeholder = ""

    def lookups(
        self, request: HttpRequest, model_admin: admin.ModelAdmin
    ) -> list[tuple[str, str]]:
        return [("", "")]  # one entry, so the filter is shown at all

    def choices(self, changelist: Any) -> Any:
        # The other filters, the search and the ordering ride along as hidden inputs.
        others = {
            name: value
            for name, value in changelist.params.items()
            if name != self.parameter_name
        }
        yield {
            "value": self.value() or "",
            "placeholder": self.placeholder,
            "hidden": sorted(others.items()),
            "clear_url": changelist.get_query_string(remove=[self.parameter_name]),
        }


class KeyFilter(InputFilter):
    title = "key"
    parameter_name = "key"
    placeholder = "prefix, sk-gw-XXXXXXXX-… or id"

    def queryset(self, request: HttpRequest, queryset: QuerySet) -> QuerySet:
        value = (self.value() or "").strip()
        if not value:
            return queryset
        if value.startswith(SECRET_PREFIX):
            value = value[len(SECRET_PREFIX) : len(SECRET_PREFIX) + 8]
        match = Q(prefix=value) | Q(previous_prefix=value)
        if value.isdigit():
            match |= Q(pk=int(value))
        # By key id, which the (key, created_at) index serves, and which covers the
        # rows written under the key's earlier secrets too.
        return queryset.filter(key_id__in=ApiKey.objects.filter(match).values("pk"))


class DayFilter(InputFilter):
    title = "billing day"
    parameter_name = "day"
    placeholder = "YYYY-MM-DD"

    def queryset(self, request: HttpRequest, queryset: QuerySet) -> QuerySet:
        value = (self.value() or "").strip()
        if not value:
            return queryset
        try:
            start, end = day_bounds(date.fromisoformat(value))
        except ValueError:
            return queryset.none()
        return queryset.filter(created_at__gte=start, created_at__lt=end)


class ModelFilter(admin.SimpleListFilter):
    """Configured model names, from the small routes table rather than DISTINCT over
    the ledger; `?model=` takes any other name too."""

    title = "model"
    parameter_name = "model"

    def lookups(
        self, request: HttpRequest, model_admin: admin.ModelAdmin
    ) -> list[tuple[str, str]]:
        names = set(ModelRoute.objects.values_list("name", flat=True))
        names |= set(
            Price.objects.order_by().values_list("model", flat=True).distinct()
        )
        asked = request.GET.get(self.parameter_name)
        if asked:
            names.add(asked)
        return [(name, name) for name in sorted(names)]

    def queryset(self, request: HttpRequest, queryset: QuerySet) -> QuerySet:
        value = self.value()
        if not value:
            return queryset
        if value.endswith("*"):
            return queryset.filter(model__startswith=value[:-1])
        return queryset.filter(model=value)


class StatusCodeFilter(admin.SimpleListFilter):
    title = "status"
    parameter_name = "status"

    def lookups(
        self, request: HttpRequest, model_admin: admin.ModelAdmin
    ) -> list[tuple[str, str]]:
        return [
            ("2xx", "success (2xx)"),
            ("4xx", "refused or client error (4xx)"),
            ("429", "rate or quota (429)"),
            ("5xx", "upstream error (5xx)"),
        ]

    def queryset(self, request: HttpRequest, queryset: QuerySet) -> QuerySet:
        value = self.value()
        if value == "429":
            return queryset.filter(status_code=429)
        if value in {"2xx", "4xx", "5xx"}:
            low = int(value[0]) * 100
            return queryset.filter(status_code__gte=low, status_code__lt=low + 100)
        return queryset


def key_link(key_id: int, prefix: str, name: str | None = None) -> str:
    url = reverse("admin:keys_apikey_change", args=[key_id])
    label = f"{SECRET_PREFIX}{prefix}-…" if prefix else f"key {key_id}"
    if name:
        label = f"{name} ({label})"
    return format_html('<a href="{}">{}</a>', url, label)


class ReadOnlyAdmin(admin.ModelAdmin):
    actions = None
    show_full_result_count = False
    paginator = BoundedCountPaginator

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(
        self, request: HttpRequest, obj: Any | None = None
    ) -> bool:
        return False

    def has_delete_permission(
        self, request: HttpRequest, obj: Any | None = None
    ) -> bool:
        return False


# --- the ledger --------------------------------------------------------------------


@admin.register(UsageRow)
class UsageRowAdmin(ReadOnlyAdmin):
    list_display = [
        "created_at",
        "request_id",
        "key_column",
        "team",
        "model",
        "status_code",
        "prompt_tokens",
        "completion_tokens",
        "cost",
        "latency_ms",
        "stream",
    ]
    # Team is nullable (LEFT JOIN); the key is not, and an INNER JOIN would hide rows
    # whose key row is gone, so the list shows the prefix stored on the row instead.
    list_select_related = ["team"]
    list_filter = [
        KeyFilter,
        ModelFilter,
        StatusCodeFilter,
        "usage_source",
        ("created_at", admin.DateFieldListFilter),
        DayFilter,
        "stream",
        "team",
    ]
    # No date_hierarchy: its year/month/day links run DISTINCT over the ledger.
    search_fields = ["request_id"]
    search_help_text = "An exact request id (x-request-id)."
    list_per_page = 50

    def get_search_results(
        self, request: HttpRequest, queryset: QuerySet[UsageRow], search_term: str
    ) -> tuple[QuerySet[UsageRow], bool]:
        # Exact, so the request_id index serves it (icontains would scan the ledger).
        term = search_term.strip()
        return (queryset.filter(request_id=term) if term else queryset), False

    @admin.display(description="key", ordering="key_prefix")
    def key_column(self, obj: UsageRow) -> str:
        return key_link(obj.key_id, obj.key_prefix)

    @admin.display(description="cost (USD)", ordering="cost_usd")
    def cost(self, obj: UsageRow) -> str:
        if obj.cost_usd is not None:
            return f"{obj.cost_usd:f}"
        return "unpriced" if obj.is_unpriced else "—"


@admin.register(DailyRollup)
class DailyRollupAdmin(ReadOnlyAdmin):
    list_display = [
        "day",
        "key_column",
        "team",
        "model",
        "requests",
        "errors",
        "prompt_tokens",
        "completion_tokens",
        "cached_tokens",
        "cost_usd",
        "unpriced_requests",
    ]
    list_select_related = ["team"]
    list_filter = [KeyFilter, ModelFilter, "team"]
    date_hierarchy = "day"

    def get_queryset(self, request: HttpRequest) -> QuerySet[DailyRollup]:
        # Subqueries by primary key rather than a join, for the reason given above.
        key = ApiKey.objects.filter(pk=OuterRef("key_id")).order_by()
        return (
            super()
            .get_queryset(request)
            .annotate(
                key_name=Subquery(key.values("name")[:1]),
                key_prefix=Subquery(key.values("prefix")[:1]),
            )
        )

    @admin.display(description="key", ordering="key_id")
    def key_column(self, obj: DailyRollup) -> str:
        return key_link(
            obj.key_id,
            getattr(obj, "key_prefix", None) or "",
            getattr(obj, "key_name", None),
        )
