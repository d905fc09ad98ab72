"""Providers and models in Django admin: saves go through the upserts and move the
generation; a provider's API key is write-only."""

from __future__ import annotations

import pytest
from django.urls import reverse

from relay.generation import read_config_generation
from relay.models import ModelRoute, Provider
from relay.provider_keys import decrypt_provider_key, resolve_provider_key
from tests import factories

pytestmark = pytest.mark.django_db

PROVIDER_KEY = "sk-upstream-0123456789abcdefghijklmnop"


def provider_form(**overrides: str) -> dict[str, str]:
    return {
        "name": "openai",
        "base_url": "https://api.openai.com/v1",
        "api_key_env": "",
        "api_key": "",
        "timeout_s": "60",
        **overrides,
    }


def provider_pages(provider: Provider) -> list[str]:
    return [
        reverse("admin:relay_provider_changelist"),
        reverse("admin:relay_provider_change", args=[provider.pk]),
        reverse("admin:relay_provider_history", args=[provider.pk]),
        reverse("admin:relay_provider_delete", args=[provider.pk]),
    ]


def test_a_provider_key_entered_in_admin_is_stored_encrypted_and_never_shown(
    admin_client, django_capture_on_commit_callbacks
):
    before = read_config_generation()

    with django_capture_on_commit_callbacks(execute=True):
        response = admin_client.post(
            reverse("admin:relay_provider_add"), provider_form(api_key=PROVIDER_KEY)
        )
    provider = Provider.objects.get(name="openai")
    pages = [admin_client.get(url) for url in provider_pages(provider)]

    assert response.status_code == 302
    assert provider.api_key_encrypted and PROVIDER_KEY not in provider.api_key_encrypted
    assert decrypt_provider_key(provider.api_key_encrypted) == PROVIDER_KEY
    assert read_config_generation() > before
    for page in pages:
        body = page.content.decode()
        assert page.status_code == 200
        assert PROVIDER_KEY not in body
        assert provider.api_key_encrypted not in body
    assert "encrypted" in pages[0].content.decode()


def test_saving_a_provider_without_a_new_key_keeps_the_stored_one(admin_client):
    provider = factories.make_provider("https://old.example/v1", name="openai")
    admin_client.post(
        reverse("admin:relay_provider_change", args=[provider.pk]),
        provider_form(api_key=PROVIDER_KEY),
    )

    response = admin_client.post(
        reverse("admin:relay_provider_change", args=[provider.pk]),
        provider_form(base_url="https://new.example/v1", timeout_s="5"),
    )

    assert response.status_code == 302
    provider.refresh_from_db()
    assert (provider.base_url, provider.timeout_s) == ("https://new.example/v1", 5.0)
    assert decrypt_provider_key(provider.api_key_encrypted) == PROVIDER_KEY
    assert resolve_provider_key(
        api_key_env=provider.api_key_env, api_key_encrypted=provider.api_key_encrypted
    ) == (PROVIDER_KEY)


def test_the_stored_provider_key_can_be_removed(admin_client):
    provider = factories.make_provider("https://api.example/v1", name="openai")
    url = reverse("admin:relay_provider_change", args=[provider.pk])
    admin_client.post(url, provider_form(api_key=PROVIDER_KEY))

    admin_client.post(url, provider_form(clear_api_key="on"))

    provider.refresh_from_db()
    assert provider.api_key_encrypted == ""


def test_the_provider_list_says_where_each_key_comes_from(admin_client):
    factories.make_provider("https://a.example/v1", name="from-env")
    admin_client.post(
        reverse("admin:relay_provider_add"),
        provider_form(name="stored", api_key=PROVIDER_KEY),
    )
    admin_client.post(reverse("admin:relay_provider_add"), provider_form(name="bare"))

    response = admin_client.get(reverse("admin:relay_provider_changelist"))

    admin = response.context["cl"].model_admin
    sources = {p.name: admin.key_source(p) for p in response.context["cl"].result_list}
    assert sources == {
        "from-env": "env: FAKE_PROVIDER_KEY",
        "stored": "encrypted",
        "bare": "none",
    }


def test_a_key_pasted_into_the_variable_name_field_is_refused(admin_client):
    response = admin_client.post(
        reverse("admin:relay_provider_add"), provider_form(api_key_env=PROVIDER_KEY)
    )

    assert response.status_code == 200
    assert "not its value" in response.content.decode()
    assert not Provider.objects.exists()


def test_a_model_is_added_and_changed_through_the_upsert(
    admin_client, django_capture_on_commit_callbacks
):
    provider = factories.make_provider("https://api.example/v1", name="openai")
    before = read_config_generation()
    form = {
        "name": "gpt-4o-mini",
        "provider": str(provider.pk),
        "upstream_model": "",
        "fallbacks": "backup-mini\nbackup-two",
        "max_output_tokens": "16384",
        "is_active": "on",
    }

    with django_capture_on_commit_callbacks(execute=True):
        added = admin_client.post(reverse("admin:relay_modelroute_add"), form)
    route = ModelRoute.objects.get()
    changed_at = read_config_generation()
    with django_capture_on_commit_callbacks(execute=True):
        changed = admin_client.post(
            reverse("admin:relay_modelroute_change", args=[route.pk]),
            {**form, "fallbacks": "backup-two", "is_active": ""},
        )

    assert (added.status_code, changed.status_code) == (302, 302)
    route.refresh_from_db()
    assert (route.fallbacks, route.is_active, route.max_output_tokens) == (
        ["backup-two"],
        False,
        16384,
    )
    assert before < changed_at < read_config_generation()


def test_deleting_a_model_moves_the_generation(
    admin_client, django_capture_on_commit_callbacks
):
    factories.make_provider("https://api.example/v1", name="openai")
    route = factories.make_route("gpt-4o-mini", provider="openai")
    before = read_config_generation()

    with django_capture_on_commit_callbacks(execute=True):
        response = admin_client.post(
            reverse("admin:relay_modelroute_delete", args=[route.pk]), {"post": "yes"}
        )

    assert response.status_code == 302
    assert not ModelRoute.objects.exists()
    assert read_config_generation() > before


def test_the_model_list_answers_in_a_bounded_number_of_queries(
    admin_client, django_assert_max_num_queries
):
    for index in range(30):
        factories.make_provider("https://api.example/v1", name=f"p{index}")
        factories.make_route(f"model-{index}", provider=f"p{index}")

    with django_assert_max_num_queries(8):
        response = admin_client.get(reverse("admin:relay_modelroute_changelist"))

    assert len(response.context["cl"].result_list) == 30
