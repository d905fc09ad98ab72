"""Quotas through the relay (uvicorn + the fake upstream): refusals and their
headers, unpriced and free models, team quotas, and reservations released however
a request ends.

The gateway uses Redis for its counters when REDIS_URL is set, else its in-process
limiter; these tests hold for both. Prices here are USD per million tokens, so a
price of 100 is 100 micro-USD per token.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
import uuid
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import httpx
import orjson
import pytest
import redis
from asgiref.sync import sync_to_async
from channels.db import database_sync_to_async
from channels.testing import HttpCommunicator
from django.conf import settings
from django.db import OperationalError, connections

from keys import quota_ledger
from keys.limiter import Limiter
from keys.models import Quota
from keys.services import QuotaSpec, config_changed, quota_specs
from relay import quota_admission, upstream
from relay.consumers import ChatCompletionsConsumer
from relay.snapshot import snapshot
from relay.tokens import count_prompt_tokens
from tests import factories
from tests.support.gateway import PROVIDER_KEY, PROVIDER_KEY_ENV, wait_for_config
from tests.support.redis_server import (
    forget_all_counters,
    pending_reservations,
    spread_key_ids,
)

pytestmark = pytest.mark.django_db(transaction=True)

CONTENT = "please count these five words"
MICRO_USD_PER_TOKEN = 100  # the price below: 100 USD per million tokens
DURATION = re.compile(r"^(\d+ms|\d+s|\d+m\d+s|\d+h\d+m\d+s)$")


@pytest.fixture(autouse=True)
def distinct_key_ids(transactional_db: None) -> Iterator[None]:
    """Counters are named by key id: keep this run's apart from any other's, and
    remove them from a shared Redis afterwards."""
    spread_key_ids()
    yield
    forget_all_counters(settings.REDIS_URL)


def unique(directives: str = "") -> str:
    """An upstream model string of its own, so fake-upstream records can be told apart."""
    return f"fake-{uuid.uuid4().hex[:8]}" + (f";{directives}" if directives else "")


def body(model: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": CONTENT}], **extra}


def post(
    live: dict[str, Any],
    secret: str,
    payload: dict[str, Any],
    path: str = "/v1/chat/completions",
) -> httpx.Response:
    return httpx.post(
        f"{live['url']}{path}",
        json=payload,
        headers={"authorization": f"Bearer {secret}"},
        timeout=30,
    )


def priced_route(name: str, upstream_model: str, **route: Any) -> None:
    factories.make_route(name, upstream_model=upstream_model, **route)
    factories.make_price(name, input="100", output="100", cached_input=None)


def worst_case_tokens(max_tokens: int) -> int:
    """What the gateway reserves: its own prompt count plus the output limit."""
    return count_prompt_tokens(body("x")) + max_tokens


def actual_tokens(chunks: int) -> int:
    """What the fake upstream reports: one prompt token per word, one per chunk."""
    return len(CONTENT.split()) + chunks


def seen_by_fake(fake_upstream: Any, upstream_model: str) -> int:
    seen = httpx.get(f"{fake_upstream.url}/_fake/requests").json()
    return sum(1 for r in seen if (r["body"] or {}).get("model") == upstream_model)


# --- refusals and headers -------------------------------------------------------


def test_requests_over_the_rpm_get_429_with_retry_after_and_openai_headers(
    live, wait_for_rows
):
    key, secret = factories.make_key(quotas=quota_specs(rpm=2))
    wait_for_config(live["server"])

    responses = [post(live, secret, body(live["model"])) for _ in range(3)]

    first, second, third = responses
    assert [r.status_code for r in responses] == [200, 200, 429]
    assert first.headers["x-ratelimit-limit-requests"] == "2"
    assert first.headers["x-ratelimit-remaining-requests"] == "1"
    assert second.headers["x-ratelimit-remaining-requests"] == "0"
    assert DURATION.match(first.headers["x-ratelimit-reset-requests"])
    assert third.json()["error"]["code"] == "rate_limit_exceeded"
    assert 1 <= int(third.headers["retry-after"]) <= 61
    assert third.headers["x-ratelimit-limit-requests"] == "2"
    assert third.headers["x-ratelimit-remaining-requests"] == "0"
    assert DURATION.match(third.headers["x-ratelimit-reset-requests"])
    assert "x-ratelimit-limit-tokens" not in third.headers  # the key has no token quota
    rows = wait_for_rows(3, key=key)
    assert [r.status_code for r in rows] == [200, 200, 429]
    assert rows[2].error_code == "rate_limit_exceeded" and rows[2].provider == ""


def test_token_headers_show_the_worst_case_reserved_then_the_actual_settled(live):
    key, secret = factories.make_key(quotas=quota_specs(tpm=1000))
    wait_for_config(live["server"])

    first = post(live, secret, body(live["model"], max_tokens=50))
    second = post(live, secret, body(live["model"], max_tokens=50))

    assert first.status_code == second.status_code == 200
    assert first.headers["x-ratelimit-limit-tokens"] == "1000"
    reserved = worst_case_tokens(50)
    used_by_first = first.json()["usage"]["total_tokens"]
    assert int(first.headers["x-ratelimit-remaining-tokens"]) == 1000 - reserved
    assert int(second.headers["x-ratelimit-remaining-tokens"]) == (
        1000 - used_by_first - reserved
    )


@pytest.mark.parametrize(
    ("path", "payload", "outputs"),
    [
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": CONTENT}], "n": 3},
            3,
        ),
        ("/v1/completions", {"prompt": [CONTENT, CONTENT, CONTENT]}, 3),
    ],
    ids=["chat-n", "completions-prompts"],
)
def test_a_request_for_several_outputs_reserves_max_tokens_for_each(
    live, path, payload, outputs
):
    _, secret = factories.make_key(quotas=quota_specs(tpm=10_000))
    wait_for_config(live["server"])
    request = {"model": live["model"], "max_tokens": 50, **payload}

    response = post(live, secret, request, path=path)

    assert response.status_code == 200
    reserved = 10_000 - int(response.headers["x-ratelimit-remaining-tokens"])
    assert reserved == count_prompt_tokens(request) + outputs * 50


def test_a_request_whose_worst_case_exceeds_the_tpm_never_reaches_the_upstream(
    live, fake_upstream
):
    upstream_model = unique()
    factories.make_route(
        "capped", upstream_model=upstream_model, max_output_tokens=4000
    )
    factories.make_price("capped")
    key, secret = factories.make_key(quotas=quota_specs(tpm=100))
    wait_for_config(live["server"])

    no_limit = post(live, secret, body("capped"))  # the model's 4000 are reserved
    over = post(live, secret, body("capped", max_tokens=200))
    within = post(live, secret, body("capped", max_tokens=20))

    assert no_limit.status_code == over.status_code == 429
    assert over.json()["error"]["code"] == "rate_limit_exceeded"
    assert over.headers["x-ratelimit-remaining-tokens"] == "100"
    assert within.status_code == 200
    assert seen_by_fake(fake_upstream, upstream_model) == 1


def test_a_budget_refuses_with_insufficient_quota_once_its_worst_case_no_longer_fits(
    live, wait_for_rows
):
    priced_route("metered-chat", "fake-gpt;chunks=5", max_output_tokens=1000)
    reserved = worst_case_tokens(20) * MICRO_USD_PER_TOKEN
    spent = actual_tokens(5) * MICRO_USD_PER_TOKEN
    budget = Decimal(reserved + spent // 2) / 1_000_000  # one request, not two
    key, secret = factories.make_key(quotas=quota_specs(budget_usd=budget))
    wait_for_config(live["server"])

    first = post(live, secret, body("metered-chat", max_tokens=20))
    second = post(live, secret, body("metered-chat", max_tokens=20))
    small = post(live, secret, body("metered-chat", max_tokens=5))

    assert first.status_code == 200
    assert second.status_code == 429
    error = second.json()["error"]
    assert error["code"] == "insufficient_quota"
    assert "budget" in error["message"]
    assert int(second.headers["retry-after"]) >= 1  # the month's end
    assert small.status_code == 200  # a smaller worst case still fits
    rows = wait_for_rows(3, key=key)
    assert sum(r.cost_usd for r in rows) <= budget
    assert rows[0].cost_usd == Decimal(spent) / 1_000_000


def test_a_model_without_a_price_is_refused_for_a_key_with_a_budget(
    live, fake_upstream, wait_for_rows
):
    upstream_model = unique()
    factories.make_route("unpriced", upstream_model=upstream_model)
    key, secret = factories.make_key(quotas=quota_specs(budget_usd=Decimal(5)))
    wait_for_config(live["server"])

    response = post(live, secret, body("unpriced"))

    assert response.status_code == 403
    assert response.json()["error"]["code"] == "model_not_priced"
    assert response.json()["error"]["param"] == "model"
    assert seen_by_fake(fake_upstream, upstream_model) == 0
    [row] = wait_for_rows(key=key)
    assert row.status_code == 403 and row.error_code == "model_not_priced"


def test_a_key_allowed_unpriced_use_gets_rows_flagged_without_a_cost(
    live, wait_for_rows
):
    factories.make_route("unpriced", upstream_model="fake-gpt")
    key, secret = factories.make_key(
        quotas=quota_specs(budget_usd=Decimal("0.000001")), allow_unpriced=True
    )
    wait_for_config(live["server"])

    responses = [post(live, secret, body("unpriced")) for _ in range(2)]

    assert [r.status_code for r in responses] == [200, 200]  # budgets skip it
    rows = wait_for_rows(2, key=key)
    assert all(r.cost_usd is None and r.price_id is None for r in rows)
    assert all(r.prompt_tokens > 0 for r in rows)


def test_an_unpriced_model_is_served_to_a_key_without_a_budget(live):
    factories.make_route("unpriced", upstream_model="fake-gpt")
    _, secret = factories.make_key(quotas=quota_specs(rpm=10, tpm=10_000))
    wait_for_config(live["server"])

    response = post(live, secret, body("unpriced"))

    assert response.status_code == 200


def test_a_model_priced_at_zero_is_exempt_even_from_a_budget_of_zero(
    live, wait_for_rows
):
    factories.make_route("free-model", upstream_model="fake-gpt")
    factories.make_price("free-model", input="0", output="0", cached_input=None)
    key, secret = factories.make_key(quotas=quota_specs(budget_usd=Decimal(0)))
    wait_for_config(live["server"])

    free = [post(live, secret, body("free-model")) for _ in range(3)]
    priced = post(live, secret, body(live["model"]))

    assert [r.status_code for r in free] == [200, 200, 200]
    assert priced.status_code == 429
    assert priced.json()["error"]["code"] == "insufficient_quota"
    rows = wait_for_rows(4, key=key)
    assert [r.cost_usd for r in rows[:3]] == [Decimal(0)] * 3


def test_a_team_quota_is_shared_by_every_key_of_the_team(live):
    team = factories.make_team()
    Quota.objects.create(team=team, metric="requests", period="minute", limit=2)
    config_changed()
    _, first_secret = factories.make_key(team=team)
    _, second_secret = factories.make_key(team=team)
    wait_for_config(live["server"])

    first = [post(live, first_secret, body(live["model"])) for _ in range(2)]
    second = post(live, second_secret, body(live["model"]))

    assert [r.status_code for r in first] == [200, 200]
    assert second.status_code == 429
    assert "team" in second.json()["error"]["message"]


def test_a_streamed_answer_carries_the_rate_limit_headers(live):
    _, secret = factories.make_key(quotas=[QuotaSpec("requests", "hour", Decimal(5))])
    wait_for_config(live["server"])

    with httpx.stream(
        "POST",
        f"{live['url']}/v1/chat/completions",
        json=body(live["model"], stream=True),
        headers={"authorization": f"Bearer {secret}"},
        timeout=30,
    ) as response:
        text = "".join(response.iter_text())

    assert response.status_code == 200
    assert response.headers["x-ratelimit-limit-requests"] == "5"
    assert response.headers["x-ratelimit-remaining-requests"] == "4"
    assert text.rstrip().endswith("data: [DONE]")


# --- reservations are released however a request ends ---------------------------


def one_at_a_time_key(max_tokens: int, then_actual: int = 0) -> tuple[Any, str, int]:
    """A key whose tokens-per-minute hold one worst case (plus `then_actual`), never
    two: a reservation that is not released blocks the next request for a minute."""
    limit = worst_case_tokens(max_tokens) + then_actual
    key, secret = factories.make_key(quotas=quota_specs(tpm=limit))
    return key, secret, limit


def test_a_reservation_is_released_when_the_upstream_fails(live, wait_for_rows):
    factories.make_route("broken", upstream_model=unique("fault=500"))
    key, secret, limit = one_at_a_time_key(max_tokens=30)
    wait_for_config(live["server"])

    failures = [post(live, secret, body("broken", max_tokens=30)) for _ in range(3)]
    healthy = post(live, secret, body(live["model"], max_tokens=30))

    assert [r.status_code for r in failures] == [502, 502, 502]
    assert healthy.status_code == 200
    assert int(
        healthy.headers["x-ratelimit-remaining-tokens"]
    ) == limit - worst_case_tokens(30)
    assert [r.completion_tokens for r in wait_for_rows(4, key=key)] == [0, 0, 0, 5]


def test_a_reservation_is_released_when_the_upstream_times_out(live, fake_upstream):
    factories.make_provider(f"{fake_upstream.url}/v1", name="slow", timeout_s=1.0)
    factories.make_route("hangs", provider="slow", upstream_model=unique("fault=hang"))
    _, secret, limit = one_at_a_time_key(max_tokens=30)
    wait_for_config(live["server"])

    timeouts = [post(live, secret, body("hangs", max_tokens=30)) for _ in range(2)]
    healthy = post(live, secret, body(live["model"], max_tokens=30))

    assert [r.status_code for r in timeouts] == [504, 504]
    assert timeouts[0].json()["error"]["code"] == "upstream_timeout"
    assert healthy.status_code == 200
    assert int(
        healthy.headers["x-ratelimit-remaining-tokens"]
    ) == limit - worst_case_tokens(30)


def test_a_reservation_is_settled_to_what_was_generated_when_the_client_disconnects(
    live, wait_for_rows
):
    factories.make_route("slow-stream", upstream_model=unique("chunks=20;delay_ms=50"))
    key, secret, limit = one_at_a_time_key(max_tokens=60, then_actual=actual_tokens(20))
    wait_for_config(live["server"])

    with httpx.stream(
        "POST",
        f"{live['url']}/v1/chat/completions",
        json=body("slow-stream", stream=True, max_tokens=60),
        headers={"authorization": f"Bearer {secret}"},
        timeout=30,
    ) as response:
        next(response.iter_raw())  # the first chunk, then hang up
    [gone] = wait_for_rows(key=key)
    time.sleep(0.2)  # the settlement follows the row within the same request
    after = post(live, secret, body(live["model"], max_tokens=60))

    assert gone.client_disconnected
    assert gone.prompt_tokens + gone.completion_tokens == actual_tokens(20)
    assert after.status_code == 200
    assert after.headers["x-ratelimit-remaining-tokens"] == "0"


def test_after_a_burst_of_failures_no_reservation_is_outstanding(
    live, fake_upstream, wait_for_rows
):
    factories.make_provider(f"{fake_upstream.url}/v1", name="slow", timeout_s=1.0)
    factories.make_route("broken", upstream_model=unique("fault=500"))
    factories.make_route("hangs", provider="slow", upstream_model=unique("fault=hang"))
    factories.make_route("cut", upstream_model=unique("fault=truncate"))
    key, secret = factories.make_key(quotas=quota_specs(rpm=100, tpm=100_000))
    wait_for_config(live["server"])
    statuses: list[int] = []

    def fail(model: str) -> None:
        statuses.append(post(live, secret, body(model, max_tokens=100)).status_code)

    threads = [
        threading.Thread(target=fail, args=(model,))
        for model in ["broken", "hangs", "cut"] * 6
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    rows = wait_for_rows(18, key=key)
    time.sleep(0.2)
    after = post(live, secret, body(live["model"], max_tokens=100))

    assert sorted(set(statuses)) == [502, 504]
    spent = sum(r.prompt_tokens + r.completion_tokens for r in rows)
    assert int(after.headers["x-ratelimit-remaining-tokens"]) == (
        100_000 - spent - worst_case_tokens(100)
    )
    assert after.headers["x-ratelimit-remaining-requests"] == str(100 - 18 - 1)
    wait_for_rows(19, key=key)  # `after` is settled too
    if settings.REDIS_URL:  # and Redis holds no reservation of the key's anymore
        client = redis.Redis.from_url(settings.REDIS_URL)
        assert pending_reservations(client, key_id=key.id) == 0
        client.close()


# --- a request holds its room for as long as it runs ------------------------------


class Rows:
    """Stands in for the usage recorder of the in-process consumer below."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def record(self, row: dict[str, Any]) -> None:
        self.rows.append(row)


async def in_process(secret: str, payload: dict[str, Any]) -> dict[str, Any]:
    communicator = HttpCommunicator(
        ChatCompletionsConsumer.as_asgi(),
        "POST",
        "/v1/chat/completions",
        body=orjson.dumps(payload),
        headers=[
            (b"authorization", f"Bearer {secret}".encode()),
            (b"content-type", b"application/json"),
        ],
    )
    response = await communicator.get_response(timeout=15)
    await communicator.wait()
    return response


async def close_in_process() -> None:
    """What the in-process consumer opened: snapshots, upstream sessions."""
    await snapshot.close()
    snapshot.forget()
    await upstream.close_sessions()
    # The snapshot was read in database_sync_to_async's thread: close its
    # connection, or PostgreSQL cannot drop the test database at the end.
    await database_sync_to_async(connections.close_all)()


async def test_a_stream_that_outlives_its_reservation_ttl_still_holds_its_room(
    relay_config, monkeypatch
):
    """The real TTL is over a minute; here it is 300 ms, so that a one-second stream
    outlives it. Run in-process (Channels' HttpCommunicator) to shorten it."""
    monkeypatch.setenv(PROVIDER_KEY_ENV, PROVIDER_KEY)
    monkeypatch.setattr(quota_admission, "reservation_ttl_ms", lambda timeout_s: 300)
    monkeypatch.setattr("relay.metering.recorder", Rows())
    await sync_to_async(factories.make_route)(
        "long-stream", upstream_model=unique("chunks=10;delay_ms=100")
    )
    _, secret, _ = await sync_to_async(one_at_a_time_key)(max_tokens=30)
    snapshot.forget()
    try:
        streaming = asyncio.ensure_future(
            in_process(secret, body("long-stream", stream=True, max_tokens=30))
        )
        await asyncio.sleep(0.6)  # the stream runs on, past its reservation's TTL

        meanwhile = await in_process(secret, body(relay_config["model"], max_tokens=30))
        first = await streaming
    finally:
        await close_in_process()

    assert first["status"] == 200
    assert meanwhile["status"] == 429  # the stream still holds the room


# --- the usage ledger unreachable ---------------------------------------------------


def ledger_down(counters: Any, now: Any) -> Any:
    raise OperationalError("connection to server at 127.0.0.1 failed")


async def test_while_the_ledger_cannot_rebuild_counters_budgets_get_503_rates_are_served(
    relay_config, monkeypatch
):
    """PostgreSQL down when a counter must be rebuilt (new process, Redis flushed,
    new month): as when Redis is down, never 500."""
    monkeypatch.setenv(PROVIDER_KEY_ENV, PROVIDER_KEY)
    monkeypatch.setattr("relay.metering.recorder", Rows())
    monkeypatch.setattr(quota_ledger, "spent_many", ledger_down)
    own = Limiter()  # the ledger's back-off stays out of other tests' limiter
    monkeypatch.setattr(quota_admission, "limiter", lambda: own)
    _, budget_secret = await sync_to_async(factories.make_key)(
        quotas=quota_specs(budget_usd=Decimal(5))
    )
    _, rate_secret = await sync_to_async(factories.make_key)(
        quotas=quota_specs(rpm=10, tpm=10_000)
    )
    snapshot.forget()
    try:
        budget = await in_process(budget_secret, body(relay_config["model"]))
        rate = await in_process(rate_secret, body(relay_config["model"]))
    finally:
        await own.aclose()
        await close_in_process()

    assert budget["status"] == 503
    assert orjson.loads(budget["body"])["error"]["code"] == "quota_unavailable"
    assert (b"retry-after", b"1") in budget["headers"]
    assert rate["status"] == 200
    assert (b"x-ratelimit-limit-requests", b"10") in rate["headers"]
