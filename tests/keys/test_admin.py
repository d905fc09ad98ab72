"""Keys and teams in Django admin: issuing shows the secret once and only there,
changes, revocation and rotation go through the services and move the generation."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest
from django.contrib.auth import get_user_model
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from keys.models import ApiKey, Quota, Team
from keys.secrets import hash_secret
from keys.selectors import key_info_for_secret
from keys.services import QuotaSpec, revoke_key, upsert_team
from relay.generation import read_config_generation
from tests import factories
from usage.models import UsageRow

pytestmark = pytest.mark.django_db

ADD_URL = reverse("admin:keys_apikey_add")
LIST_URL = reverse("admin:keys_apikey_changelist")


def inline(prefix: str, rows: list[dict[str, str]], initial: int = 0) -> dict[str, str]:
    """The management form and rows of an admin inline formset."""
    data = {
        f"{prefix}-TOTAL_FORMS": str(len(rows)),
        f"{prefix}-INITIAL_FORMS": str(initial),
        f"{prefix}-MIN_NUM_FORMS": "0",
        f"{prefix}-MAX_NUM_FORMS": "1000",
    }
    for index, row in enumerate(rows):
        data.update({f"{prefix}-{index}-{name}": value for name, value in row.items()})
    return data


def key_form(**overrides: str) -> dict[str, str]:
    data = {
        "name": "billing app",
        "owner": "",
        "team": "",
        "allowed_models": "gpt-4o-mini\nrouter/*",
        "ip_allowlist": "10.0.0.0/8, 192.168.1.7",
        "expires_at_0": "",
        "expires_at_1": "",
        **inline("quotas", []),
    }
    data.update(overrides)
    return data


def change_form(key: ApiKey, **overrides: str) -> dict[str, str]:
    quotas = list(key.quotas.order_by("pk"))
    data = {
        "name": key.name,
        "owner": str(key.owner_id or ""),
        "team": str(key.team_id or ""),
        "allowed_models": "\n".join(key.allowed_models),
        "ip_allowlist": "\n".join(key.ip_allowlist),
        "expires_at_0": "",
        "expires_at_1": "",
        **inline(
            "quotas",
            [
                {
                    "id": str(q.pk),
                    "key": str(key.pk),
                    "metric": q.metric,
                    "period": q.period,
                    "limit": str(q.limit),
                }
                for q in quotas
            ],
            initial=len(quotas),
        ),
    }
    data.update(overrides)
    return data


def issue_through_admin(client: Any, **overrides: str) -> tuple[ApiKey, str, Any]:
    response = client.post(ADD_URL, key_form(**overrides))
    assert response.status_code == 200, response.content.decode()[:2000]
    secret = response.context["secret"]
    return (
        ApiKey.objects.get(name=overrides.get("name", "billing app")),
        secret,
        response,
    )


def test_issuing_a_key_shows_its_secret_once_and_stores_only_its_hash(
    admin_client, admin_user, django_capture_on_commit_callbacks
):
    team = factories.make_team("payments")
    before = read_config_generation()
    form = key_form(
        owner=str(admin_user.pk),
        team=str(team.pk),
        log_bodies="on",
        **inline("quotas", [{"metric": "requests", "period": "minute", "limit": "60"}]),
    )

    with django_capture_on_commit_callbacks(execute=True):
        response = admin_client.post(ADD_URL, form)

    assert response.status_code == 200
    assert [t.name for t in response.templates][0] == "admin/keys/apikey/issued.html"
    secret = response.context["secret"]
    key = ApiKey.objects.get()
    assert secret.startswith(f"sk-gw-{key.prefix}-")
    assert secret in response.content.decode()
    assert "no-store" in response["Cache-Control"]
    assert key.secret_hash == hash_secret(secret)
    stored = {f.attname: getattr(key, f.attname) for f in ApiKey._meta.concrete_fields}
    assert secret not in repr(stored)
    assert (key.name, key.owner, key.team, key.created_by) == (
        "billing app",
        admin_user,
        team,
        admin_user,
    )
    assert key.allowed_models == ["gpt-4o-mini", "router/*"]
    assert key.ip_allowlist == ["10.0.0.0/8", "192.168.1.7/32"]
    assert key.log_bodies and not key.allow_unpriced
    assert list(key.quotas.values_list("metric", "period", "limit")) == [
        ("requests", "minute", Decimal(60))
    ]
    info = key_info_for_secret(secret)
    assert info is not None and info.id == key.pk
    assert read_config_generation() > before
    assert not list(response.wsgi_request._messages)  # never parked in messages


def test_the_secret_and_its_hash_never_appear_on_other_key_pages(admin_client):
    key, secret, _ = issue_through_admin(admin_client)
    rotated = admin_client.post(
        reverse("admin:keys_apikey_rotate", args=[key.pk]), {"grace_seconds": "60"}
    )
    new_secret = rotated.context["secret"]
    key.refresh_from_db()
    pages = [
        LIST_URL,
        f"{LIST_URL}?q={key.prefix}",
        reverse("admin:keys_apikey_change", args=[key.pk]),
        reverse("admin:keys_apikey_history", args=[key.pk]),
        reverse("admin:keys_apikey_rotate", args=[key.pk]),
        reverse("admin:keys_apikey_revoke", args=[key.pk]),
        reverse("admin:index"),
    ]

    bodies = [admin_client.get(url) for url in pages]

    for url, response in zip(pages, bodies, strict=True):
        assert response.status_code == 200, url
        body = response.content.decode()
        for hidden in (
            secret,
            new_secret,
            key.secret_hash,
            key.previous_secret_hash,
            secret[len("sk-gw-12345678-") :],  # the random part alone
        ):
            assert hidden not in body, url
    assert f"sk-gw-{key.prefix}-…" in bodies[0].content.decode()


def test_changing_a_key_updates_its_limits_and_keeps_its_secret(
    admin_client, django_capture_on_commit_callbacks
):
    key, secret = factories.make_key(
        quotas=[QuotaSpec("tokens", "minute", Decimal(1000))]
    )
    before = read_config_generation()
    data = change_form(key, name="renamed", allowed_models="gpt-4o")
    data["quotas-0-limit"] = "2000"

    with django_capture_on_commit_callbacks(execute=True):
        response = admin_client.post(
            reverse("admin:keys_apikey_change", args=[key.pk]), data
        )

    assert response.status_code == 302
    key.refresh_from_db()
    assert (key.name, key.allowed_models) == ("renamed", ["gpt-4o"])
    assert key.quotas.get().limit == Decimal(2000)
    assert key.secret_hash == hash_secret(secret)
    assert read_config_generation() > before


def test_an_invalid_ip_allowlist_is_refused_with_a_form_error(admin_client):
    response = admin_client.post(ADD_URL, key_form(ip_allowlist="10.0.0.0/8\nnope"))

    assert response.status_code == 200
    assert "nope is not an IP address" in response.content.decode()
    assert not ApiKey.objects.exists()


def test_revoke_action_asks_first_then_revokes_and_moves_the_generation(
    admin_client, admin_user, django_capture_on_commit_callbacks
):
    first, first_secret = factories.make_key()
    second, _ = factories.make_key()
    kept, _ = factories.make_key()
    before = read_config_generation()
    selected = {"action": "revoke_selected", "_selected_action": [first.pk, second.pk]}

    confirm = admin_client.post(LIST_URL, selected)
    with django_capture_on_commit_callbacks(execute=True):
        done = admin_client.post(LIST_URL, {**selected, "post": "yes"})

    assert confirm.status_code == 200
    assert "Yes, revoke" in confirm.content.decode()
    assert done.status_code == 302
    statuses = {k.pk: (k.status(), k.revoked_by) for k in ApiKey.objects.all()}
    assert statuses == {
        first.pk: (ApiKey.Status.REVOKED, admin_user),
        second.pk: (ApiKey.Status.REVOKED, admin_user),
        kept.pk: (ApiKey.Status.ACTIVE, None),
    }
    info = key_info_for_secret(first_secret)
    assert info is not None and not info.is_usable(timezone.now())
    assert read_config_generation() > before


def test_the_revoke_button_revokes_one_key_after_confirmation(admin_client):
    key, _ = factories.make_key()
    url = reverse("admin:keys_apikey_revoke", args=[key.pk])

    confirm = admin_client.get(url)
    done = admin_client.post(url)

    assert confirm.status_code == 200 and key.name in confirm.content.decode()
    assert done.status_code == 302
    key.refresh_from_db()
    assert key.status() == ApiKey.Status.REVOKED


def test_rotating_shows_a_new_secret_once_and_the_old_one_stops_working(
    admin_client, django_capture_on_commit_callbacks
):
    key, old_secret = factories.make_key()
    url = reverse("admin:keys_apikey_rotate", args=[key.pk])
    before = read_config_generation()

    form = admin_client.get(url)
    with django_capture_on_commit_callbacks(execute=True):
        response = admin_client.post(url, {"grace_seconds": "0"})

    assert form.status_code == 200 and "grace_seconds" in form.content.decode()
    assert response.status_code == 200
    new_secret = response.context["secret"]
    assert new_secret in response.content.decode()
    assert new_secret != old_secret
    assert key_info_for_secret(old_secret) is None
    info = key_info_for_secret(new_secret)
    assert info is not None and info.id == key.pk
    assert read_config_generation() > before


def test_rotating_with_a_grace_period_keeps_the_old_secret_until_then(admin_client):
    key, old_secret = factories.make_key()

    response = admin_client.post(
        reverse("admin:keys_apikey_rotate", args=[key.pk]), {"grace_seconds": "3600"}
    )

    assert response.status_code == 200
    old = key_info_for_secret(old_secret)
    assert old is not None and old.id == key.pk and old.valid_until is not None
    assert (
        timedelta(minutes=59) < old.valid_until - timezone.now() <= timedelta(hours=1)
    )
    assert "previous secret keeps working until" in response.content.decode()


def test_the_rotate_action_takes_exactly_one_key_to_its_rotate_page(admin_client):
    key, _ = factories.make_key()
    other, _ = factories.make_key()

    one = admin_client.post(
        LIST_URL, {"action": "rotate_selected", "_selected_action": [key.pk]}
    )
    two = admin_client.post(
        LIST_URL, {"action": "rotate_selected", "_selected_action": [key.pk, other.pk]}
    )

    assert one.status_code == 302
    assert one["Location"] == reverse("admin:keys_apikey_rotate", args=[key.pk])
    assert two.status_code == 302 and two["Location"].startswith(LIST_URL)


def test_a_revoked_key_cannot_be_rotated(admin_client):
    key, secret = factories.make_key()
    revoke_key(key=key)

    response = admin_client.post(
        reverse("admin:keys_apikey_rotate", args=[key.pk]), {"grace_seconds": "0"}
    )

    assert response.status_code == 302
    key.refresh_from_db()
    assert key.secret_hash == hash_secret(secret)


def test_keys_cannot_be_deleted(admin_client):
    key, _ = factories.make_key()

    page = admin_client.get(reverse("admin:keys_apikey_delete", args=[key.pk]))
    changelist = admin_client.get(LIST_URL)

    assert page.status_code == 403
    assert "delete_selected" not in changelist.content.decode()
    assert ApiKey.objects.filter(pk=key.pk).exists()


def test_the_key_list_filters_by_status_and_finds_a_pasted_prefix(admin_client):
    active, _ = factories.make_key(name="active-key")
    expired, _ = factories.make_key(
        name="expired-key", expires_at=timezone.now() - timedelta(days=1)
    )
    revoked, _ = factories.make_key(name="revoked-key")
    revoke_key(key=revoked)

    def listed(query: str) -> set[str]:
        response = admin_client.get(f"{LIST_URL}?{query}")
        assert response.status_code == 200
        return {k.name for k in response.context["cl"].result_list}

    assert listed("status=active") == {"active-key"}
    assert listed("status=expired") == {"expired-key"}
    assert listed("status=revoked") == {"revoked-key"}
    assert listed(f"q=sk-gw-{expired.prefix}-…") == {"expired-key"}
    assert listed(f"q={active.prefix}") == {"active-key"}


def test_the_key_list_shows_spend_this_month_and_last_use(admin_client):
    key, _ = factories.make_key()
    now = timezone.now()
    UsageRow.objects.bulk_create(
        [
            usage_row(key, created_at=now, cost_usd=Decimal("0.25")),
            usage_row(key, created_at=now, cost_usd=Decimal("0.50")),
            usage_row(key, created_at=now - timedelta(days=40), cost_usd=Decimal(9)),
        ]
    )

    response = admin_client.get(LIST_URL)

    row = response.context["cl"].result_list[0]
    assert row.spend_usd == Decimal("0.75")
    assert row.last_used_at == now
    assert "0.7500" in response.content.decode()


def test_the_key_list_sums_spend_and_quota_use_exactly(admin_client):
    # Summed as doubles (SQLite's SUM of a decimal column), these thousand costs
    # make 0.457949999999996: shown as 0.4579 and short of the limit they reach.
    key, _ = factories.make_key(
        quotas=[QuotaSpec("cost_usd", "month", Decimal("0.45795"))]
    )
    now = timezone.now()
    UsageRow.objects.bulk_create(
        usage_row(
            key,
            request_id=f"req-{n}",
            created_at=now,
            provider="fake",
            cost_usd=Decimal("0.0004579500"),
        )
        for n in range(1000)
    )

    response = admin_client.get(LIST_URL)

    row = response.context["cl"].result_list[0]
    [use] = row.quota_uses
    assert row.spend_usd == Decimal("0.45795")
    assert use.used == use.limit == Decimal("0.45795")
    page = response.content.decode()
    assert '<td class="field-spend_this_month">0.4580</td>' in page
    assert "<strong>USD/month 0.4580 / 0.45795</strong>" in page


def test_the_key_list_answers_in_a_bounded_number_of_queries(
    admin_client, django_assert_max_num_queries
):
    def queries_for_list() -> int:
        with CaptureQueriesContext(connection) as queries:
            response = admin_client.get(LIST_URL)
        assert response.status_code == 200
        return len(queries)

    add_keys_with_usage(3)
    few = queries_for_list()
    add_keys_with_usage(27)

    with django_assert_max_num_queries(12):
        many = queries_for_list()

    assert many == few
    assert ApiKey.objects.count() == 30


def test_a_team_is_added_with_quotas_and_lists_its_keys(
    admin_client, django_capture_on_commit_callbacks
):
    before = read_config_generation()
    data = {
        "name": "research",
        **inline("quotas", [{"metric": "cost_usd", "period": "month", "limit": "100"}]),
    }

    with django_capture_on_commit_callbacks(execute=True):
        response = admin_client.post(reverse("admin:keys_team_add"), data)
    team = Team.objects.get(name="research")
    factories.make_key(team=team)
    factories.make_key(team=team)
    listing = admin_client.get(reverse("admin:keys_team_changelist"))

    assert response.status_code == 302
    assert list(Quota.objects.filter(team=team).values_list("metric", "limit")) == [
        ("cost_usd", Decimal(100))
    ]
    assert read_config_generation() > before
    assert listing.context["cl"].result_list[0].keys_total == 2
    assert f"?team__id__exact={team.pk}" in listing.content.decode()


def test_the_team_list_and_page_show_each_quota_s_use_across_its_keys(
    admin_client, django_assert_max_num_queries
):
    team = upsert_team(
        name="research",
        quotas=[
            QuotaSpec("requests", "day", Decimal(10)),
            QuotaSpec("cost_usd", "month", Decimal("0.75")),
        ],
    )
    idle = upsert_team(name="idle", quotas=[QuotaSpec("tokens", "hour", Decimal(5))])
    now = timezone.now()
    for cost in ("0.25", "0.50"):
        key, _ = factories.make_key(team=team)
        UsageRow.objects.bulk_create(
            [usage_row(key, created_at=now, provider="fake", cost_usd=Decimal(cost))]
        )
    old_key, _ = factories.make_key(team=team)
    UsageRow.objects.bulk_create(
        [
            usage_row(
                old_key,
                created_at=now - timedelta(days=40),
                provider="fake",
                cost_usd=Decimal(5),
            )
        ]
    )

    with django_assert_max_num_queries(10):
        listing = admin_client.get(reverse("admin:keys_team_changelist"))
    page = admin_client.get(reverse("admin:keys_team_change", args=[team.pk]))

    uses = {t.name: t.quota_uses for t in listing.context["cl"].result_list}
    assert [(u.metric, u.period, u.used, u.limit) for u in uses["research"]] == [
        ("cost_usd", "month", Decimal("0.75"), Decimal("0.75")),
        ("requests", "day", 2, Decimal(10)),
    ]
    assert [(u.metric, u.used) for u in uses["idle"]] == [("tokens", 0)]
    assert idle.pk != team.pk
    html = listing.content.decode()
    assert "<strong>team USD/month 0.7500 / 0.75</strong>" in html
    assert "<div>team req/day 2 / 10</div>" in html
    assert "team req/day 2 / 10" in page.content.decode()


def test_teams_cannot_be_deleted(admin_client):
    team = factories.make_team()

    response = admin_client.get(reverse("admin:keys_team_delete", args=[team.pk]))

    assert response.status_code == 403


def usage_row(key: ApiKey, **fields: Any) -> UsageRow:
    values: dict[str, Any] = {
        "request_id": f"req-{key.pk}-{fields.get('created_at')}-{fields.get('cost_usd')}",
        "key": key,
        "key_prefix": key.prefix,
        "team_id": key.team_id,
        "endpoint": "chat.completions",
        "model": "gpt-4o-mini",
        "status_code": 200,
        "prompt_tokens": 10,
        "completion_tokens": 5,
        "usage_source": UsageRow.Source.PROVIDER,
    }
    values.update(fields)
    return UsageRow(**values)


def add_keys_with_usage(count: int) -> None:
    owner = get_user_model().objects.create_user(f"owner-{ApiKey.objects.count()}")
    for _ in range(count):
        key, _ = factories.make_key(team=factories.make_team(), owner=owner)
        usage_row(key, cost_usd=Decimal("0.1")).save()
