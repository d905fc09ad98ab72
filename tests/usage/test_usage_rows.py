"""The usage row each authenticated relay request leaves: tokens, cost, price,
identifiers and labels, against uvicorn and the fake upstream."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal
from typing import Any

import httpx
import pytest
from django.utils import timezone

from tests import factories
from tests.support.gateway import wait_for_config
from usage.models import UsageRow

pytestmark = pytest.mark.django_db(transaction=True)

# Seven words: the fake upstream counts seven prompt tokens.
MESSAGES = [{"role": "user", "content": "count these seven words for me please"}]


def chat(
    live: dict[str, Any],
    model: str | None = None,
    *,
    secret: str | None = None,
    **extra,
) -> httpx.Response:
    headers = {"authorization": f"Bearer {secret or live['secret']}"}
    headers.update(extra.pop("headers", {}))
    return httpx.post(
        f"{live['url']}/v1/chat/completions",
        json={"model": model or live["model"], "messages": MESSAGES, **extra},
        headers=headers,
        timeout=30,
    )


def test_a_row_has_the_providers_tokens_and_their_exact_cost_with_cached_tokens(
    live, wait_for_rows
):
    factories.make_route("cached-model", upstream_model="fake-gpt;chunks=9;cached=4")
    price = factories.make_price(
        "cached-model", input="2.5", output="10", cached_input="1.25"
    )
    wait_for_config(live["server"])

    response = chat(live, "cached-model")

    assert response.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 4
    [row] = wait_for_rows(key=live["key"])
    assert (row.prompt_tokens, row.cached_tokens, row.completion_tokens) == (7, 4, 9)
    # (7 - 4) × 2.5 + 4 × 1.25 + 9 × 10 = 102.5 USD per million tokens
    assert row.cost_usd == Decimal("0.0001025000")
    assert isinstance(row.cost_usd, Decimal)
    assert row.cost_usd.as_tuple().exponent == -10
    assert row.price_id == price.pk
    assert row.usage_source == "provider"


def test_a_cost_that_needs_rounding_is_rounded_half_even_once(live, wait_for_rows):
    factories.make_route("tiny-price", upstream_model="fake-gpt;chunks=2")
    factories.make_price(
        "tiny-price", input="0.00005", output="0.00005", cached_input=None
    )
    wait_for_config(live["server"])

    chat(live, "tiny-price")

    [row] = wait_for_rows(key=live["key"])
    assert (row.prompt_tokens, row.completion_tokens) == (7, 2)
    # 3.5 + 1.0 = 4.5 quanta of 1e-10 USD: half-even gives 4; half-up, or rounding
    # the prompt and completion parts apart (4 + 1), would give 5.
    assert row.cost_usd == Decimal("0.0000000004")


def test_a_new_price_costs_new_requests_and_leaves_old_rows_alone(live, wait_for_rows):
    chat(live, headers={"x-request-id": "before-the-change"})
    [before] = wait_for_rows(key=live["key"])
    new_price = factories.make_price(
        live["model"], input="1", output="3", effective_from=timezone.now()
    )
    wait_for_config(live["server"])

    chat(live, headers={"x-request-id": "after-the-change"})

    [after] = wait_for_rows(key=live["key"], request_id="after-the-change")
    before.refresh_from_db()
    # The fake counts 7 prompt and 5 completion tokens each time.
    assert before.price_id == live["price"].pk
    assert before.cost_usd == Decimal("0.0000040500")  # 7 × 0.15 + 5 × 0.60
    assert after.price_id == new_price.pk
    assert after.cost_usd == Decimal("0.0000220000")  # 7 × 1 + 5 × 3


def test_a_price_that_takes_effect_later_does_not_cost_todays_requests(
    live, wait_for_rows
):
    factories.make_price(
        live["model"],
        input="100",
        output="100",
        effective_from=timezone.now() + timedelta(days=1),
    )
    wait_for_config(live["server"])

    chat(live)

    [row] = wait_for_rows(key=live["key"])
    assert row.price_id == live["price"].pk
    assert row.cost_usd == Decimal("0.0000040500")


def test_a_model_without_a_price_records_its_tokens_and_no_cost(live, wait_for_rows):
    factories.make_route("unpriced", upstream_model="fake-gpt")
    wait_for_config(live["server"])

    response = chat(live, "unpriced")

    assert response.status_code == 200
    [row] = wait_for_rows(key=live["key"])
    assert (row.prompt_tokens, row.completion_tokens) == (7, 5)
    assert row.cost_usd is None and row.price_id is None
    assert row.is_unpriced


def test_gateway_tags_are_stored_as_a_list(live, wait_for_rows):
    chat(live, headers={"x-gateway-tags": "a, b"})

    [row] = wait_for_rows(key=live["key"])
    assert row.tags == ["a", "b"]


def test_the_requests_user_field_is_stored(live, wait_for_rows):
    chat(live, user="end-user-42")

    [row] = wait_for_rows(key=live["key"])
    assert row.user == "end-user-42"


def test_a_row_names_its_key_team_endpoint_and_timings(live, wait_for_rows):
    team = factories.make_team()
    key, secret = factories.make_key(team=team)
    wait_for_config(live["server"])

    chat(live, secret=secret)

    [row] = wait_for_rows(key=key)
    assert row.key_prefix == key.prefix and row.team_id == team.pk
    assert row.endpoint == "chat.completions" and row.model == live["model"]
    assert (row.provider, row.upstream_model) == ("fake", "fake-gpt")
    assert row.status_code == 200 and row.error_code == ""
    assert row.latency_ms >= 0 and row.ttft_ms is not None


def test_refusals_after_authentication_are_rows_and_unauthenticated_ones_are_not(
    live, wait_for_rows
):
    bad_key = "sk-gw-AAAAAAAA-" + "x" * 43

    unauthenticated = chat(live, secret=bad_key, headers={"x-request-id": "no-key"})
    unknown_model = chat(live, "no-such-model", headers={"x-request-id": "model"})
    malformed = chat(live, headers={"x-request-id": "malformed"}, stream="yes")

    assert [r.status_code for r in (unauthenticated, unknown_model, malformed)] == [
        401,
        404,
        400,
    ]
    rows = wait_for_rows(2, key=live["key"])
    by_request = {row.request_id: row for row in rows}
    assert set(by_request) == {"model", "malformed"}
    assert by_request["model"].error_code == "model_not_found"
    assert by_request["malformed"].error_code == "invalid_request_error"
    for row in rows:
        assert row.prompt_tokens == row.completion_tokens == row.cached_tokens == 0
        assert row.cost_usd == 0 and row.usage_source == "none"
    # The refused request came first; rows after it are written, it never is.
    assert not UsageRow.objects.filter(request_id="no-key").exists()


def test_a_refusal_for_the_clients_address_is_a_row(live, wait_for_rows):
    key, secret = factories.make_key(ip_allowlist=["203.0.113.0/24"])
    wait_for_config(live["server"])

    response = chat(live, secret=secret)

    assert response.status_code == 403
    [row] = wait_for_rows(key=key)
    assert row.status_code == 403 and row.error_code == "permission_denied"
    assert row.prompt_tokens == row.completion_tokens == 0


def test_the_rows_request_id_is_the_one_the_response_carried(live, wait_for_rows):
    response = chat(live)

    [row] = wait_for_rows(key=live["key"])
    assert response.headers["x-request-id"].startswith("req_")
    assert row.request_id == response.headers["x-request-id"]


def test_a_client_that_repeats_its_request_id_still_gets_a_row_each_time(
    live, wait_for_rows
):
    first = chat(live, headers={"x-request-id": "client-id-7"})
    second = chat(live, headers={"x-request-id": "client-id-7"})

    rows = wait_for_rows(2, key=live["key"])
    assert first.headers["x-request-id"] == second.headers["x-request-id"]
    assert [row.request_id for row in rows] == ["client-id-7", "client-id-7"]
    assert rows[0].id != rows[1].id


def test_a_client_that_gives_up_on_a_whole_answer_is_billed_and_marked_as_gone(
    live, wait_for_rows
):
    factories.make_route("slow-answer", upstream_model="fake-gpt;delay_ms=1000")
    factories.make_price("slow-answer")
    wait_for_config(live["server"])

    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            f"{live['url']}/v1/chat/completions",
            json={"model": "slow-answer", "messages": MESSAGES},
            headers={"authorization": f"Bearer {live['secret']}"},
            timeout=httpx.Timeout(5, read=0.3),
        )

    [row] = wait_for_rows(key=live["key"], timeout=10)
    assert (row.prompt_tokens, row.completion_tokens) == (7, 5)
    assert row.cost_usd == Decimal("0.0000040500")
    assert row.client_disconnected is True
