"""Admin for upstream providers and the public models routed to them.

Saves go through `relay.services` (the same upserts `loadconfig` uses), deletes end
with `config_changed()`: every web process caches providers and models and reloads
them only when the configuration generation moves. Rows are identified by name in
config files, so a saved row's name is read-only here.

A provider's API key is write-only: the list and the form say where the key comes
from ("env: NAME", "encrypted", "none"), never the key nor its ciphertext.
"""

from __future__ import annotations

from django.contrib import admin
from django.db.models import QuerySet
from django.http import HttpRequest

from keys.services import config_changed
from relay.forms import ModelRouteForm, ProviderForm
from relay.models import ModelRoute, Provider
from relay.services import upsert_model, upsert_provider


@admin.register(Provider)
class ProviderAdmin(admin.ModelAdmin):
    form = ProviderForm
    fields = [
        "name",
        "base_url",
        "api_key_env",
        "api_key",
        "clear_api_key",
        "key_source",
        "timeout_s",
    ]
    list_display = ["name", "base_url", "key_source", "timeout_s", "updated_at"]
    search_fields = ["name", "base_url"]

    def get_readonly_fields(
        self, request: HttpRequest, obj: Provider | None = None
    ) -> list[str]:
        return ["key_source"] if obj is None else ["name", "key_source"]

    @admin.display(description="key source")
    def key_source(self, obj: Provider) -> str:
        if obj.api_key_env:
            unused = " (stored key unused)" if obj.api_key_encrypted else ""
            return f"env: {obj.api_key_env}{unused}"
        return "encrypted" if obj.api_key_encrypted else "none"

    def save_model(
        self, request: HttpRequest, obj: Provider, form: ProviderForm, change: bool
    ) -> None:
        provider, _ = upsert_provider(**form.upsert_fields(obj))
        obj.pk = provider.pk
        obj.refresh_from_db()
        obj._state.adding = False

    def delete_model(self, request: HttpRequest, obj: Provider) -> None:
        super().delete_model(request, obj)
        config_changed()

    def delete_queryset(
        self, request: HttpRequest, queryset: QuerySet[Provider]
    ) -> None:
        super().delete_queryset(request, queryset)
        config_changed()


@admin.register(ModelRoute)
class ModelRouteAdmin(admin.ModelAdmin):
    form = ModelRouteForm
    list_display = [
        "name",
        "provider",
        "upstream_model",
        "fallback_names",
        "max_output_tokens",
        "is_active",
    ]
    list_filter = ["is_active", "provider"]
    list_select_related = ["provider"]
    search_fields = ["name", "upstream_model"]

    def get_readonly_fields(
        self, request: HttpRequest, obj: ModelRoute | None = None
    ) -> list[str]:
        return [] if obj is None else ["name"]

    @admin.display(description="fallbacks")
    def fallback_names(self, obj: ModelRoute) -> str:
        return ", ".join(obj.fallbacks or [])

    def save_model(
        self, request: HttpRequest, obj: ModelRoute, form: ModelRouteForm, change: bool
    ) -> None:
        route, _ = upsert_model(**form.upsert_fields(obj))
        obj.pk = route.pk
        obj.refresh_from_db()
        obj._state.adding = False

    def delete_model(self, request: HttpRequest, obj: ModelRoute) -> None:
        super().delete_model(request, obj)
        config_changed()

    def delete_queryset(
        self, request: HttpRequest, queryset: QuerySet[ModelRoute]
    ) -> None:
        super().delete_queryset(request, queryset)
        config_changed()
