"""Admin for API keys, teams, their quotas and the keys' audit trail.

Every write goes through `keys.services`, quotas included: the quota inline is
validated here but written by the service, in the same call (and the same audited
event) as the key's own fields. Each web process caches keys and quotas and reloads
them when a service moves the configuration generation.

The key list stays fast at 100k keys: spend, last use and quota use are computed
for the rows of the page only (`keys.selectors.key_page_stats`, `quota_uses`), in
a fixed number of queries, and the list never counts the whole table twice.

A key's secret appears on exactly one page, the response to issuing or rotating it.
It travels there on the request object: never through `messages`, the session or a
cookie, which would store it, and never on the ModelAdmin, which every request shares.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from decimal import Decimal
from typing import Any

from django.contrib import admin, messages
from django.contrib.admin import helpers
from django.contrib.admin.views.main import ChangeList
from django.core.exceptions import PermissionDenied, ValidationError
from django.db.models import Count, Prefetch, Q, QuerySet
from django.forms import BaseFormSet, BaseInlineFormSet, ModelForm
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import URLPattern, path, reverse
from django.utils import formats, timezone
from django.utils.html import format_html, format_html_join

from keys.audit import limit_text, summarize
from keys.dashboard import admin_dashboard
from keys.forms import ApiKeyForm, RotateKeyForm
from keys.models import ApiKey, KeyEvent, Quota, Team
from keys.secrets import SECRET_PREFIX
from keys.selectors import (
    QuotaUse,
    key_events,
    key_page_stats,
    quota_uses,
    team_quota_uses,
)
from keys.services import (
    QuotaSpec,
    issue_key,
    revoke_key,
    revoke_keys,
    rotate_key,
    set_key_limits,
    update_team,
    upsert_team,
)
from usage.admin import InputFilter, ReadOnlyAdmin

VIA = KeyEvent.Via.ADMIN

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


class QuotaFormSet(BaseInlineFormSet):
    def clean(self) -> None:
        super().clean()
        seen = set()
        for spec in quota_specs_of(self):
            if (spec.metric, spec.period) in seen:
                raise ValidationError(
                    f"Two quotas for {spec.metric} per {spec.period}: keep one."
                )
            seen.add((spec.metric, spec.period))


def quota_specs_of(formset: BaseFormSet) -> list[QuotaSpec]:
    """The quotas a valid inline formset asks for: its rows, less deleted or empty ones."""
    specs = []
    for form in formset.forms:
        data = getattr(form, "cleaned_data", None) or {}
        if data.get("DELETE") or not data.get("metric") or data.get("limit") is None:
            continue
        specs.append(QuotaSpec(data["metric"], data["period"], data["limit"]))
    return specs


def save_quota_inline(formsets: Sequence[BaseFormSet]) -> list[QuotaSpec] | None:
    """The quota inline's rows as specs, for a service to write; None without one.

    `save(commit=False)` writes nothing: it only lists the new, changed and deleted
    rows, which Django's change message (the object's history) describes.
    """
    for formset in formsets:
        if formset.model is Quota:
            formset.save(commit=False)
            return quota_specs_of(formset)
    return None


class QuotaInline(admin.TabularInline):
    """Quotas of a key or a team; written by the parent admin through a service."""

    model = Quota
    formset = QuotaFormSet
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


class KeyChangeList(ChangeList):
    """Adds spend, last use and quota use to the page's keys, in a fixed number of
    queries whatever the page size (instead of one per row or per quota)."""

    def get_results(self, request: HttpRequest) -> None:
        super().get_results(request)
        attach_stats(list(self.result_list))


def attach_stats(keys: Sequence[ApiKey]) -> None:
    """Set `spend_usd`, `last_used_at` and `quota_uses` on these keys.

    Expects the keys' quotas and their team's quotas prefetched (`get_queryset`).
    """
    now = timezone.now()
    stats = key_page_stats([key.pk for key in keys], now)
    uses = quota_uses(
        [
            (
                key.pk,
                key.team_id,
                list(key.quotas.all()),
                list(key.team.quotas.all()) if key.team is not None else [],
            )
            for key in keys
        ],
        now,
    )
    for key in keys:
        found = stats.get(key.pk, {})
        key.spend_usd = found.get("spend_usd", Decimal(0))  # type: ignore[attr-defined]
        key.last_used_at = found.get("last_used_at")  # type: ignore[attr-defined]
        key.quota_uses = uses.get(key.pk, [])  # type: ignore[attr-defined]


SHORT_METRIC = {"requests": "req", "tokens": "tok", "cost_usd": "USD"}
SHORT_PERIOD = {"minute": "min", "hour": "hour", "day": "day", "month": "month"}


def describe_use(use: QuotaUse) -> str:
    """`req/min 6 / 60`, `team USD/month 0.1500 / 50`: short enough for a list cell."""
    scope = "team " if use.scope == "team" else ""
    metric = SHORT_METRIC.get(use.metric, use.metric)
    period = SHORT_PERIOD.get(use.period, use.period)
    used = (
        f"{use.used:.4f}"
        if use.metric == Quota.Metric.COST_USD
        else limit_text(use.used)
    )
    return f"{scope}{metric}/{period} {used} / {limit_text(use.limit)}"


def render_uses(uses: Sequence[QuotaUse]) -> str:
    """One line per quota; a quota at or over its limit stands out."""
    if not uses:
        return "—"
    lines = (
        format_html(
            "<div><strong>{}</strong></div>"
            if use.used >= use.limit
            else "<div>{}</div>",
            describe_use(use),
        )
        for use in uses
    )
    return format_html_join("", "{}", ((line,) for line in lines))


class TeamChangeList(ChangeList):
    """Adds each team's quota use to the page, one query per period present."""

    def get_results(self, request: HttpRequest) -> None:
        super().get_results(request)
        attach_team_uses(list(self.result_list))


def attach_team_uses(teams: Sequence[Team]) -> None:
    """Set `quota_uses` on these teams (their quotas prefetched)."""
    uses = team_quota_uses([(team.pk, list(team.quotas.all())) for team in teams])
    for team in teams:
        team.quota_uses = uses.get(team.pk, [])  # type: ignore[attr-defined]


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
        "quota_use",
        "expires_at",
        "created_at",
    ]
    list_select_related = ["team", "owner"]
    list_filter = [StatusFilter, "team"]
    # Server-side search: name and prefix (a pasted secret prefix is an exact match,
    # see get_search_results), and the owner's username.
    search_fields = ["name", "prefix", "owner__username"]
    search_help_text = "Name, prefix (or a pasted sk-gw-XXXXXXXX-…) or owner."
    autocomplete_fields = ["owner", "team"]
    actions = ["revoke_selected", "rotate_selected"]
    # The filtered count is enough; a second COUNT(*) of every key is not needed.
    show_full_result_count = False
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
                "quota_use",
                "usage_link",
                "created_at",
                "created_by",
            ]
        },
    )
    audit_fieldset = ("Audit trail", {"fields": ["audit_trail"]})

    # --- reads -----------------------------------------------------------------

    def get_queryset(self, request: HttpRequest) -> QuerySet[ApiKey]:
        ordered = Quota.objects.order_by("metric", "period")
        return (
            super()
            .get_queryset(request)
            # Never even loaded into an admin page.
            .defer("secret_hash", "previous_secret_hash")
            .prefetch_related(
                Prefetch("quotas", queryset=ordered),
                Prefetch("team__quotas", queryset=ordered),
            )
        )

    def get_changelist(self, request: HttpRequest, **kwargs: Any) -> type[ChangeList]:
        return KeyChangeList

    def get_object(
        self, request: HttpRequest, object_id: str, from_field: str | None = None
    ) -> ApiKey | None:
        key = super().get_object(request, object_id, from_field)
        if key is not None:
            attach_stats([key])
        return key

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
        return [*self.add_fieldsets, self.status_fieldset, self.audit_fieldset]

    def get_readonly_fields(
        self, request: HttpRequest, obj: ApiKey | None = None
    ) -> list[str]:
        if obj is None:
            return []
        return [*self.status_fieldset[1]["fields"], *self.audit_fieldset[1]["fields"]]

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

    # Spend and last use are not sortable: sorting 100k keys by them would compute
    # them for every key. The index page ranks the top keys by spend instead.
    @admin.display(description="spend this month (USD)")
    def spend_this_month(self, obj: ApiKey) -> str:
        spend = getattr(obj, "spend_usd", None) or Decimal(0)
        return f"{spend:.4f}"

    @admin.display(description="last used")
    def last_used(self, obj: ApiKey) -> str:
        used = getattr(obj, "last_used_at", None)
        return moment(used) if used is not None else "never"

    @admin.display(description="quota use")
    def quota_use(self, obj: ApiKey) -> str:
        return render_uses(getattr(obj, "quota_uses", []))

    @admin.display(description="events (newest first)")
    def audit_trail(self, obj: ApiKey) -> str:
        events = list(key_events(obj)[: self.TRAIL_SHOWN])
        if not events:
            return "—"
        rows = format_html_join(
            "",
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            (
                (
                    moment(event.at),
                    event.get_action_display(),
                    event.actor_name or "—",
                    event.get_via_display(),
                    summarize(event),
                )
                for event in events
            ),
        )
        url = reverse("admin:keys_keyevent_changelist")
        return format_html(
            "<table><thead><tr><th>when</th><th>what</th><th>who</th><th>via</th>"
            "<th>details</th></tr></thead><tbody>{}</tbody></table>"
            '<p><a href="{}?key={}">Every event of this key</a></p>',
            rows,
            url,
            obj.pk,
        )

    TRAIL_SHOWN = 20

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
        # Written in save_related, where the quota inline is at hand: one service
        # call (and one audited event) covers the key's fields and its quotas.
        pass

    def save_related(
        self,
        request: HttpRequest,
        form: ModelForm,
        formsets: list[BaseFormSet],
        change: bool,
    ) -> None:
        assert isinstance(form, ApiKeyForm)
        quotas = save_quota_inline(formsets)
        key = form.instance
        if change:
            set_key_limits(
                key=key, quotas=quotas, by=request.user, via=VIA, **form.limit_fields()
            )
            return
        issued = issue_key(
            **form.issue_fields(), quotas=quotas or (), by=request.user, via=VIA
        )
        # The history entry and the redirect must use the row the service created,
        # not the unsaved instance the form built.
        key.pk = issued.key.pk
        key.refresh_from_db()
        key._state.adding = False
        setattr(request, ISSUED_ATTR, issued.secret)

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
        revoked = revoke_keys(keys=keys, by=request.user, via=VIA)
        for key in revoked:
            self.log_change(request, key, "Revoked.")
        self.message_user(request, f"Revoked {len(revoked)} key(s).", messages.SUCCESS)
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
                    via=VIA,
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
        if revoke_key(key=key, by=request.user, via=VIA):
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
    fields = ["name", "quota_use"]
    readonly_fields = ["quota_use"]
    list_display = ["name", "key_count", "quota_use", "created_at"]
    search_fields = ["name"]

    def get_queryset(self, request: HttpRequest) -> QuerySet[Team]:
        ordered = Quota.objects.order_by("metric", "period")
        return (
            super()
            .get_queryset(request)
            .annotate(keys_total=Count("api_keys"))
            .prefetch_related(Prefetch("quotas", queryset=ordered))
        )

    def get_changelist(self, request: HttpRequest, **kwargs: Any) -> type[ChangeList]:
        return TeamChangeList

    def get_object(
        self, request: HttpRequest, object_id: str, from_field: str | None = None
    ) -> Team | None:
        team = super().get_object(request, object_id, from_field)
        if team is not None:
            attach_team_uses([team])
        return team

    @admin.display(description="quota use")
    def quota_use(self, obj: Team) -> str:
        return render_uses(getattr(obj, "quota_uses", []))

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
        # Written in save_related, with the quota inline, by one service call.
        pass

    def save_related(
        self,
        request: HttpRequest,
        form: ModelForm,
        formsets: list[BaseFormSet],
        change: bool,
    ) -> None:
        quotas = save_quota_inline(formsets)
        team = form.instance
        if change:
            update_team(team=team, name=form.cleaned_data["name"], quotas=quotas)
            return
        created = upsert_team(name=form.cleaned_data["name"], quotas=quotas)
        team.pk = created.pk
        team.refresh_from_db()
        team._state.adding = False


class EventKeyFilter(InputFilter):
    title = "key"
    parameter_name = "key"
    placeholder = "key id, prefix or sk-gw-XXXXXXXX-…"

    def queryset(self, request: HttpRequest, queryset: QuerySet) -> QuerySet:
        value = (self.value() or "").strip()
        if not value:
            return queryset
        prefix = prefix_in(value) or value
        match = Q(prefix=prefix) | Q(previous_prefix=prefix)
        if value.isdigit():
            match |= Q(pk=int(value))
        return queryset.filter(key_id__in=ApiKey.objects.filter(match).values("pk"))


@admin.register(KeyEvent)
class KeyEventAdmin(ReadOnlyAdmin):
    """The audit trail: read-only, newest first; written only by `keys.services`."""

    list_display = ["at", "key_column", "action", "actor_column", "via", "summary"]
    list_filter = [EventKeyFilter, "action", "via"]
    list_select_related = ["key"]
    search_fields = ["actor_name"]
    search_help_text = "Username of whoever acted."
    fields = ["at", "key_column", "action", "actor_column", "via", "summary", "details"]
    readonly_fields = fields

    @admin.display(description="key", ordering="key_id")
    def key_column(self, obj: KeyEvent) -> str:
        url = reverse("admin:keys_apikey_change", args=[obj.key_id])
        return format_html(
            '<a href="{}">{} ({})</a>', url, obj.key.name, masked(obj.key.prefix)
        )

    @admin.display(description="who", ordering="actor_name")
    def actor_column(self, obj: KeyEvent) -> str:
        return obj.actor_name or "—"

    @admin.display(description="details")
    def summary(self, obj: KeyEvent) -> str:
        return summarize(obj)


# --- the index page ------------------------------------------------------------------

_site_index = admin.site.index


def index_with_dashboard(
    request: HttpRequest, extra_context: dict[str, Any] | None = None
) -> TemplateResponse:
    """Django's admin index, with the gateway's numbers above the app list.

    Spend and models for users who may read usage; top keys only for those who may
    also see keys (finance never sees a key, not even on this page).
    """
    user = request.user
    context: dict[str, Any] = {}
    if user.has_perm("usage.view_usagerow") or user.has_perm("usage.view_dailyrollup"):
        context["gateway_dashboard"] = admin_dashboard(
            with_keys=user.has_perm("keys.view_apikey")
        )
    return _site_index(request, {**context, **(extra_context or {})})


# The default site's URLs are built on first use, after this module is imported by
# autodiscover, so they route to this wrapper.
admin.site.index = index_with_dashboard  # type: ignore[method-assign]
