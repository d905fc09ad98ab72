"""Admin for API keys, teams and their quotas.

Every write goes through `keys.services`, or ends with `config_changed()` where the
admin writes rows itself (quota inlines): each web process caches keys and quotas
and reloads them only when the configuration generation moves.

A key's secret appears on exactly one page, the response to issuing or rotating it.
It travels there on the request object: never through `messages`, the session or a
cookie, which would store it, and never on the ModelAdmin, which every request shares.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any

from django.contrib import admin, messages
from django.contrib.admin import helpers
from django.core.exceptions import PermissionDenied, ValidationError
from django.db.models import Count, OuterRef, Q, QuerySet, Subquery, Sum
from django.forms import BaseFormSet, ModelForm
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import URLPattern, path, reverse
from django.utils import formats, timezone
from django.utils.html import format_html

from keys.forms import ApiKeyForm, RotateKeyForm
from keys.models import ApiKey, Quota, Team
from keys.secrets import SECRET_PREFIX
from keys.services import (
    config_changed,
    issue_key,
    revoke_key,
    rotate_key,
    set_key_limits,
    upsert_team,
)
from usage.models import UsageRow
from usage.rollups import billing_zone

ISSUED_ATTR = "_gateway_issued_secret"  # the request attribute that carries it


def masked(prefix: str) -> str:
    return f"{SECRET_PREFIX}{prefix}-…"


def prefix_in(search_term: str) -> str | None:
    """The prefix in a pasted `sk-gw-XXXXXXXX-…`, as the list shows keys."""
    term = search_term.strip()
    if term.startswith(SECRET_PREFIX) and len(term) >= len(SECRET_PREFIX) + 8:
        return term[len(SECRET_PREFIX) : len(SECRET_PREFIX) + 8]
    return None


def moment(value: datetime) -> str:
    # Read-only admin fields print a callable's value as is; format it as Django
    # formats its own datetime columns.
    return formats.localize(timezone.template_localtime(value))


def month_start() -> datetime:
    """Midnight on the first of this month, in the billing time zone."""
    now = timezone.now().astimezone(billing_zone())
    return now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)


class QuotaInline(admin.TabularInline):
    """Quotas of a key or a team; the parent's admin calls `config_changed()` after."""

    model = Quota
    fields = ["metric", "period", "limit"]
    extra = 0
    verbose_name_plural = "quotas (limit in requests, tokens or USD)"


class StatusFilter(admin.SimpleListFilter):
    title = "status"
    parameter_name = "status"

    def lookups(
        self, request: HttpRequest, model_admin: admin.ModelAdmin
    ) -> list[tuple[str, str]]:
        return list(ApiKey.Status.choices)

    def queryset(
        self, request: HttpRequest, queryset: QuerySet[ApiKey]
    ) -> QuerySet[ApiKey]:
        value, now = self.value(), timezone.now()
        if value == ApiKey.Status.REVOKED:
            return queryset.filter(revoked_at__isnull=False)
        if value == ApiKey.Status.EXPIRED:
            return queryset.filter(revoked_at__isnull=True, expires_at__lte=now)
        if value == ApiKey.Status.ACTIVE:
            return queryset.filter(
                Q(expires_at__isnull=True) | Q(expires_at__gt=now),
                revoked_at__isnull=True,
            )
        return queryset


@admin.register(ApiKey)
class ApiKeyAdmin(admin.ModelAdmin):
    form = ApiKeyForm
    inlines = [QuotaInline]
    list_display = [
        "name",
        "masked_prefix",
        "status_label",
        "team",
        "owner",
        "spend_this_month",
        "last_used",
        "expires_at",
        "created_at",
    ]
    list_select_related = ["team", "owner"]
    list_filter = [StatusFilter, "team"]
    search_fields = ["name", "prefix", "owner__username"]
    search_help_text = "Name, prefix (or a pasted sk-gw-XXXXXXXX-…) or owner."
    autocomplete_fields = ["owner", "team"]
    actions = ["revoke_selected", "rotate_selected"]
    add_fieldsets = [
        (None, {"fields": ["name", "owner", "team"]}),
        (
            "Limits",
            {
                "fields": [
                    "allowed_models",
                    "ip_allowlist",
                    "expires_at",
                    "log_bodies",
                    "allow_unpriced",
                ]
            },
        ),
    ]
    # The hash columns are never listed: not in a form, not read-only, not anywhere.
    status_fieldset = (
        "Status",
        {
            "fields": [
                "masked_prefix",
                "status_label",
                "rotation_grace",
                "revoked_at",
                "revoked_by",
                "spend_this_month",
                "last_used",
                "usage_link",
                "created_at",
                "created_by",
            ]
        },
    )

    # --- reads -----------------------------------------------------------------

    def get_queryset(self, request: HttpRequest) -> QuerySet[ApiKey]:
        # Correlated subqueries served by the (key, created_at) index: evaluated
        # only for the page's rows, never one query per row.
        usage = UsageRow.objects.filter(key=OuterRef("pk")).order_by()
        spend = (
            usage.filter(created_at__gte=month_start())
            .values("key")
            .annotate(total=Sum("cost_usd"))
            .values("total")
        )
        last = usage.order_by("-created_at").values("created_at")[:1]
        return (
            super()
            .get_queryset(request)
            # Never even loaded into an admin page.
            .defer("secret_hash", "previous_secret_hash")
            .annotate(spend_usd=Subquery(spend), last_used_at=Subquery(last))
        )

    def get_search_results(
        self, request: HttpRequest, queryset: QuerySet[ApiKey], search_term: str
    ) -> tuple[QuerySet[ApiKey], bool]:
        prefix = prefix_in(search_term)
        if prefix is not None:
            return queryset.filter(Q(prefix=prefix) | Q(previous_prefix=prefix)), False
        return super().get_search_results(request, queryset, search_term)

    def get_fieldsets(
        self, request: HttpRequest, obj: ApiKey | None = None
    ) -> list[tuple[str | None, dict[str, Any]]]:
        if obj is None:
            return self.add_fieldsets
        return [*self.add_fieldsets, self.status_fieldset]

    def get_readonly_fields(
        self, request: HttpRequest, obj: ApiKey | None = None
    ) -> list[str]:
        return [] if obj is None else list(self.status_fieldset[1]["fields"])

    def has_delete_permission(
        self, request: HttpRequest, obj: ApiKey | None = None
    ) -> bool:
        # Keys are revoked, never deleted: usage rows and rollups refer to them.
        return False

    @admin.display(description="key", ordering="prefix")
    def masked_prefix(self, obj: ApiKey) -> str:
        return masked(obj.prefix)

    @admin.display(description="status")
    def status_label(self, obj: ApiKey) -> str:
        return obj.status().label

    @admin.display(description="spend this month (USD)", ordering="spend_usd")
    def spend_this_month(self, obj: ApiKey) -> str:
        spend = getattr(obj, "spend_usd", None) or Decimal(0)
        return f"{spend:.4f}"

    @admin.display(description="last used", ordering="last_used_at")
    def last_used(self, obj: ApiKey) -> str:
        used = getattr(obj, "last_used_at", None)
        return moment(used) if used is not None else "never"

    @admin.display(description="previous secret valid until")
    def rotation_grace(self, obj: ApiKey) -> str:
        until = obj.previous_valid_until
        return moment(until) if until and until > timezone.now() else "—"

    @admin.display(description="usage")
    def usage_link(self, obj: ApiKey) -> str:
        url = reverse("admin:usage_usagerow_changelist")
        return format_html(
            '<a href="{}?key={}">Usage rows of this key</a>', url, obj.pk
        )

    # --- writes ----------------------------------------------------------------

    def save_model(
        self, request: HttpRequest, obj: ApiKey, form: ApiKeyForm, change: bool
    ) -> None:
        if change:
            fields = form.limit_fields()
            if fields:
                set_key_limits(key=obj, **fields)
            return
        issued = issue_key(**form.issue_fields(), by=request.user)
        # Inlines, the history entry and the redirect must use the row the service
        # created, not the unsaved instance the form built.
        obj.pk = issued.key.pk
        obj.refresh_from_db()
        obj._state.adding = False
        setattr(request, ISSUED_ATTR, issued.secret)

    def save_related(
        self,
        request: HttpRequest,
        form: ModelForm,
        formsets: list[BaseFormSet],
        change: bool,
    ) -> None:
        super().save_related(request, form, formsets, change)
        config_changed()  # the quota inline wrote rows itself

    def response_add(
        self, request: HttpRequest, obj: ApiKey, post_url_continue: str | None = None
    ) -> HttpResponse:
        secret = getattr(request, ISSUED_ATTR, None)
        if secret is None:
            return super().response_add(request, obj, post_url_continue)
        return self.issued_response(request, obj, secret, rotated=False)

    def issued_response(
        self, request: HttpRequest, key: ApiKey, secret: str, *, rotated: bool
    ) -> TemplateResponse:
        """The only page that ever shows a secret; admin views are never cached."""
        verb = "rotated" if rotated else "issued"
        context = {
            **self.admin_site.each_context(request),
            "opts": self.opts,
            "title": f"API key {verb}: copy the secret now",
            "key": key,
            "masked_prefix": masked(key.prefix),
            "secret": secret,
            "rotated": rotated,
            "grace_until": key.previous_valid_until if rotated else None,
        }
        return TemplateResponse(request, "admin/keys/apikey/issued.html", context)

    # --- revoke and rotate -----------------------------------------------------

    def get_urls(self) -> list[URLPattern]:
        view = self.admin_site.admin_view
        return [
            path(
                "<path:object_id>/rotate/",
                view(self.rotate_view),
                name="keys_apikey_rotate",
            ),
            path(
                "<path:object_id>/revoke/",
                view(self.revoke_view),
                name="keys_apikey_revoke",
            ),
            *super().get_urls(),
        ]

    @admin.action(description="Revoke selected keys", permissions=["change"])
    def revoke_selected(
        self, request: HttpRequest, queryset: QuerySet[ApiKey]
    ) -> TemplateResponse | None:
        keys = list(queryset.filter(revoked_at__isnull=True))
        # Revocation cannot be undone and stops apps at once: confirm first, as
        # Django's own delete action does.
        if request.POST.get("post") != "yes":
            return self.revoke_confirmation(request, keys, action="revoke_selected")
        for key in keys:
            revoke_key(key=key, by=request.user)
            self.log_change(request, key, "Revoked.")
        self.message_user(request, f"Revoked {len(keys)} key(s).", messages.SUCCESS)
        return None

    @admin.action(description="Rotate the selected key…", permissions=["change"])
    def rotate_selected(
        self, request: HttpRequest, queryset: QuerySet[ApiKey]
    ) -> HttpResponseRedirect | None:
        # One key at a time: each new secret must be copied from its own page.
        keys = list(queryset.values_list("pk", flat=True)[:2])
        if len(keys) != 1:
            self.message_user(
                request, "Select exactly one key to rotate.", messages.ERROR
            )
            return None
        return HttpResponseRedirect(reverse("admin:keys_apikey_rotate", args=keys))

    def rotate_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        key = self.get_object(request, object_id)
        if key is None:
            return self._get_obj_does_not_exist_redirect(request, self.opts, object_id)
        if not self.has_change_permission(request, key):
            raise PermissionDenied
        form = RotateKeyForm(request.POST if request.method == "POST" else None)
        if form.is_valid():
            try:
                issued = rotate_key(
                    key=key,
                    grace_seconds=form.cleaned_data["grace_seconds"],
                    by=request.user,
                )
            except ValidationError as exc:
                self.message_user(request, " ".join(exc.messages), messages.ERROR)
                return HttpResponseRedirect(self.change_url(key))
            self.log_change(request, key, "Rotated the secret.")
            return self.issued_response(
                request, issued.key, issued.secret, rotated=True
            )
        context = {
            **self.admin_site.each_context(request),
            "opts": self.opts,
            "title": f"Rotate {key}",
            "key": key,
            "form": form,
        }
        return TemplateResponse(request, "admin/keys/apikey/rotate.html", context)

    def revoke_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        key = self.get_object(request, object_id)
        if key is None:
            return self._get_obj_does_not_exist_redirect(request, self.opts, object_id)
        if not self.has_change_permission(request, key):
            raise PermissionDenied
        if request.method != "POST":
            return self.revoke_confirmation(request, [key], action=None)
        if key.revoked_at is None:
            revoke_key(key=key, by=request.user)
            self.log_change(request, key, "Revoked.")
        self.message_user(request, f"Revoked {key}.", messages.SUCCESS)
        return HttpResponseRedirect(self.change_url(key))

    def revoke_confirmation(
        self, request: HttpRequest, keys: list[ApiKey], *, action: str | None
    ) -> TemplateResponse:
        context = {
            **self.admin_site.each_context(request),
            "opts": self.opts,
            "title": "Revoke API keys?",
            "keys": keys,
            "action": action,
            "action_checkbox_name": helpers.ACTION_CHECKBOX_NAME,
        }
        return TemplateResponse(
            request, "admin/keys/apikey/revoke_confirmation.html", context
        )

    def change_url(self, key: ApiKey) -> str:
        return reverse("admin:keys_apikey_change", args=[key.pk])


@admin.register(Team)
class TeamAdmin(admin.ModelAdmin):
    inlines = [QuotaInline]
    fields = ["name"]
    list_display = ["name", "key_count", "created_at"]
    search_fields = ["name"]

    def get_queryset(self, request: HttpRequest) -> QuerySet[Team]:
        return super().get_queryset(request).annotate(keys_total=Count("api_keys"))

    def has_delete_permission(
        self, request: HttpRequest, obj: Team | None = None
    ) -> bool:
        # Usage rows and rollups keep the team's id; deleting it would orphan them.
        return False

    @admin.display(description="keys", ordering="keys_total")
    def key_count(self, obj: Team) -> str:
        url = reverse("admin:keys_apikey_changelist")
        return format_html(
            '<a href="{}?team__id__exact={}">{}</a>', url, obj.pk, obj.keys_total
        )

    def save_model(
        self, request: HttpRequest, obj: Team, form: ModelForm, change: bool
    ) -> None:
        if change:
            # A rename: nothing cached refers to a team by name, so no service is
            # needed; the quota inline's writes bump the generation in save_related.
            obj.save(update_fields=["name"])
            return
        team = upsert_team(name=form.cleaned_data["name"])
        obj.pk = team.pk
        obj.refresh_from_db()
        obj._state.adding = False

    def save_related(
        self,
        request: HttpRequest,
        form: ModelForm,
        formsets: list[BaseFormSet],
        change: bool,
    ) -> None:
        super().save_related(request, form, formsets, change)
        config_changed()  # team quotas are part of every member key's snapshot
