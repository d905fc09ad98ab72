"""Prices, the usage ledger and rollups in Django admin: prices are effective-dated,
the ledger and rollups are read-only and their lists cost a bounded number of queries."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from django.urls import reverse
from django.utils import timezone

from keys.models import ApiKey
from relay.generation import read_config_generation
from tests import factories
from usage.models import DailyRollup, Price, UsageRow
from usage.rollups import billing_day, rebuild_day

pytestmark = pytest.mark.django_db

USAGE_URL = reverse("admin:usage_usagerow_changelist")
ROLLUP_URL = reverse("admin:usage_dailyrollup_changelist")


def usage_row(key: ApiKey, **fields: Any) -> UsageRow:
    values: dict[str, Any] = {
        "request_id": f"req-{uuid.uuid4().hex[:12]}",
        "key": key,
        "key_prefix": key.prefix,
        "team_id": key.team_id,
        "endpoint": "chat.completions",
        "model": "gpt-4o-mini",
        "status_code": 200,
        "prompt_tokens": 100,
        "completion_tokens": 20,
        "usage_source": UsageRow.Source.PROVIDER,
        "cost_usd": Decimal("0.0000270000"),
        "latency_ms": 321,
    }
    values.update(fields)
    return UsageRow(**values)


def add_rows(count: int, **fields: Any) -> list[UsageRow]:
    rows = []
    for _ in range(count):
        key, _ = factories.make_key(team=factories.make_team())
        rows.append(usage_row(key, **fields))
    return UsageRow.objects.bulk_create(rows)


def listed(client: Any, url: str) -> list[Any]:
    response = client.get(url)
    assert response.status_code == 200, url
    return list(response.context["cl"].result_list)


def test_the_usage_list_shows_rows_and_flags_unpriced_ones(admin_client):
    key, secret = factories.make_key()
    priced = usage_row(key, request_id="req-priced")
    unpriced = usage_row(key, request_id="req-unpriced", cost_usd=None)
    refused = usage_row(
        key, request_id="req-refused", cost_usd=None, status_code=429, prompt_tokens=0
    )
    refused.completion_tokens = 0
    UsageRow.objects.bulk_create([priced, unpriced, refused])

    response = admin_client.get(USAGE_URL)

    body = response.content.decode()
    admin = response.context["cl"].model_admin
    costs = {r.request_id: admin.cost(r) for r in response.context["cl"].result_list}
    assert response.status_code == 200
    assert costs == {
        "req-priced": "0.0000270000",
        "req-unpriced": "unpriced",
        "req-refused": "—",
    }
    assert all(request_id in body for request_id in costs)
    assert '<td class="field-cost">unpriced</td>' in body
    assert f"sk-gw-{key.prefix}-…" in body
    assert secret not in body


def test_the_usage_ledger_is_read_only(admin_client):
    key, _ = factories.make_key()
    (row,) = UsageRow.objects.bulk_create([usage_row(key)])
    change_url = reverse("admin:usage_usagerow_change", args=[row.pk])

    listing = admin_client.get(USAGE_URL)
    detail = admin_client.get(change_url)
    posted = admin_client.post(change_url, {"status_code": "500"})
    add = admin_client.get(reverse("admin:usage_usagerow_add"))
    delete = admin_client.get(reverse("admin:usage_usagerow_delete", args=[row.pk]))

    assert listing.status_code == 200
    assert 'name="_selected_action"' not in listing.content.decode()
    assert detail.status_code == 200
    assert 'name="_save"' not in detail.content.decode()
    assert posted.status_code == 403
    assert (add.status_code, delete.status_code) == (403, 403)
    row.refresh_from_db()
    assert row.status_code == 200


def test_the_usage_list_filters_by_key_model_status_and_day(admin_client):
    key, _ = factories.make_key()
    other, _ = factories.make_key()
    day = datetime(2024, 3, 5, 12, tzinfo=UTC)
    UsageRow.objects.bulk_create(
        [
            usage_row(key, request_id="a", created_at=day),
            usage_row(key, request_id="b", created_at=day, model="gpt-4o"),
            usage_row(key, request_id="c", created_at=day, status_code=429),
            usage_row(key, request_id="d", created_at=day + timedelta(days=1)),
            usage_row(other, request_id="e", created_at=day),
        ]
    )

    def ids(query: str) -> set[str]:
        return {row.request_id for row in listed(admin_client, f"{USAGE_URL}?{query}")}

    assert ids(f"key={key.prefix}") == {"a", "b", "c", "d"}
    assert ids(f"key=sk-gw-{other.prefix}-…") == {"e"}
    assert ids(f"key={other.pk}") == {"e"}
    assert ids("model=gpt-4o") == {"b"}
    assert ids("status=429") == {"c"}
    assert ids("status=2xx&day=2024-03-05") == {"a", "b", "e"}
    assert ids("q=d") == {"d"}
    assert ids("usage_source=provider&key=nope") == set()


def test_the_usage_list_answers_in_a_bounded_number_of_queries_without_counting_all(
    admin_client, django_assert_max_num_queries
):
    add_rows(30)

    with django_assert_max_num_queries(8) as queries:
        rows = listed(admin_client, USAGE_URL)

    assert len(rows) == 30
    counts = [q["sql"] for q in queries.captured_queries if "COUNT(" in q["sql"]]
    assert counts and all("LIMIT" in sql for sql in counts)


def test_the_usage_row_page_shows_one_row(admin_client):
    key, _ = factories.make_key()
    (row,) = UsageRow.objects.bulk_create([usage_row(key, request_id="req-detail")])

    response = admin_client.get(reverse("admin:usage_usagerow_change", args=[row.pk]))

    assert response.status_code == 200
    assert "req-detail" in response.content.decode()


def test_rollups_are_read_only_and_listed_in_a_bounded_number_of_queries(
    admin_client, django_assert_max_num_queries
):
    add_rows(30, created_at=timezone.now())
    rebuild_day(billing_day(timezone.now()))

    with django_assert_max_num_queries(10):
        rows = listed(admin_client, ROLLUP_URL)
    first = DailyRollup.objects.first()
    assert first is not None
    change = admin_client.post(
        reverse("admin:usage_dailyrollup_change", args=[first.pk]), {"requests": "9"}
    )
    model = listed(admin_client, f"{ROLLUP_URL}?model=gpt-4o-mini")

    assert len(rows) == 30 and len(model) == 30
    assert change.status_code == 403
    assert rows[0].key_name


def test_a_new_price_is_added_through_the_upsert_and_moves_the_generation(
    admin_client, django_capture_on_commit_callbacks
):
    before = read_config_generation()

    with django_capture_on_commit_callbacks(execute=True):
        response = admin_client.post(
            reverse("admin:usage_price_add"),
            {
                "model": "gpt-4o-mini",
                "input": "0.15",
                "output": "0.60",
                "cached_input": "",
                "effective_from_0": "2024-07-18",
                "effective_from_1": "00:00:00",
            },
        )

    assert response.status_code == 302
    price = Price.objects.get()
    assert (price.input, price.output, price.cached_input) == (
        Decimal("0.15"),
        Decimal("0.60"),
        None,
    )
    assert read_config_generation() > before


def test_a_price_in_force_is_read_only_and_cannot_be_deleted(admin_client):
    price = factories.make_price("gpt-4o-mini", input="0.15")
    url = reverse("admin:usage_price_change", args=[price.pk])

    page = admin_client.get(url)
    posted = admin_client.post(url, {"input": "9", "output": "9"})
    delete = admin_client.get(reverse("admin:usage_price_delete", args=[price.pk]))
    listing = admin_client.get(reverse("admin:usage_price_changelist"))

    assert page.status_code == 200
    assert 'name="_save"' not in page.content.decode()
    assert "add a new row" in page.content.decode()
    assert posted.status_code == 403
    assert delete.status_code == 403
    assert "delete_selected" not in listing.content.decode()
    price.refresh_from_db()
    assert price.input == Decimal("0.15")


def test_a_scheduled_price_may_be_corrected(
    admin_client, django_capture_on_commit_callbacks
):
    start = timezone.now() + timedelta(days=30)
    price = factories.make_price("gpt-4o-mini", input="0.15", effective_from=start)
    before = read_config_generation()

    with django_capture_on_commit_callbacks(execute=True):
        response = admin_client.post(
            reverse("admin:usage_price_change", args=[price.pk]),
            {"input": "0.20", "output": "0.80", "cached_input": "0.10"},
        )

    assert response.status_code == 302
    price.refresh_from_db()
    assert (price.input, price.output, price.effective_from) == (
        Decimal("0.20"),
        Decimal("0.80"),
        start,
    )
    assert read_config_generation() > before
