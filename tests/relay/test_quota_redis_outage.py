"""Quotas when Redis loses its data or goes away.

Each test runs its own redis-server (tests/support/redis_server.py: a free port, no
persistence) and a gateway process pointed at it, so flushing or killing it never
touches the machine's shared Redis. The gateway splits rate limits between
processes while Redis is down (GATEWAY_QUOTA_FALLBACK_SHARE=2 here).

- Flushed: counters are rebuilt from the usage ledger, so a month's spend and a
  minute's requests survive.
- Stopped under load: requests that carry a budget get 503 `quota_unavailable`,
  none is admitted past a budget; rate-only keys keep working, each process
  enforcing its share of the limit.
- Back: budgets are checked again, from the ledger.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import httpx
import pytest

from keys.services import quota_specs
from relay.generation import generation_key
from relay.models import ConfigGeneration
from relay.tokens import count_prompt_tokens
from tests import factories
from tests.support.gateway import start_gateway
from tests.support.redis_server import PrivateRedis, spread_key_ids, start_private_redis
from tests.support.servers import ServerProcess

pytestmark = pytest.mark.django_db(transaction=True)

CONTENT = "please count these five words"
PRICE = 100  # USD per million tokens: 100 micro-USD per token
FALLBACK_SHARE = 2


@dataclass
class Stack:
    redis: PrivateRedis
    gateway: ServerProcess

    @property
    def url(self) -> str:
        return self.gateway.url

    def wait_for_config(self, timeout: float = 5.0) -> None:
        """Like tests.support.gateway.wait_for_config, for a gateway whose Redis is
        not the test's: its config-generation mirror is dropped so it reads the row."""
        wanted = ConfigGeneration.objects.get(pk=1).value
        deadline = time.monotonic() + timeout
        seen = None
        while time.monotonic() < deadline:
            self.redis.client().delete(generation_key())
            httpx.get(f"{self.url}/v1/models", timeout=5)
            seen = httpx.get(f"{self.url}/health", timeout=5).json()[
                "config_generation"
            ]
            if seen == wanted:
                return
            time.sleep(0.05)
        raise AssertionError(f"gateway at generation {seen}, wanted {wanted}")


@pytest.fixture
def stack(
    relay_config: dict[str, Any],
    django_db_blocker: Any,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Stack]:
    """A private Redis and a gateway on it (and on the test database)."""
    spread_key_ids()
    redis_server = start_private_redis()
    env = {
        "REDIS_URL": redis_server.redis_url,
        "GATEWAY_QUOTA_FALLBACK_SHARE": str(FALLBACK_SHARE),
        "GATEWAY_QUOTA_REDIS_TIMEOUT_S": "0.3",
    }
    with django_db_blocker.unblock():
        gateway = start_gateway(tmp_path_factory.mktemp("outage-spool"), env=env)
    stack = Stack(redis_server, gateway)
    yield stack
    gateway.stop()
    stack.redis.stop()  # a test may have replaced the server it started with


def chat(url: str, secret: str, model: str, max_tokens: int = 20) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/chat/completions",
        json={
            "model": model,
            "messages": [{"role": "user", "content": CONTENT}],
            "max_tokens": max_tokens,
        },
        headers={"authorization": f"Bearer {secret}"},
        timeout=30,
    )


def code(response: httpx.Response) -> str | None:
    return None if response.status_code == 200 else response.json()["error"]["code"]


def micro_usd(micros: int) -> Decimal:
    return Decimal(micros) / 1_000_000


def priced_model(
    name: str, upstream_model: str = "fake-gpt;chunks=5"
) -> tuple[int, int]:
    """A model at PRICE; returns (worst case of a max_tokens=20 request, its actual
    cost), in micro-USD."""
    factories.make_route(name, upstream_model=upstream_model, max_output_tokens=1000)
    factories.make_price(name, input=str(PRICE), output=str(PRICE), cached_input=None)
    prompt = count_prompt_tokens({"messages": [{"role": "user", "content": CONTENT}]})
    return (prompt + 20) * PRICE, (len(CONTENT.split()) + 5) * PRICE


def test_a_flushed_redis_still_knows_the_months_spend_and_the_minutes_requests(
    stack, wait_for_rows
):
    worst, actual = priced_model("ledgered")
    budget = micro_usd(2 * actual + worst - 1)  # two requests, then not a third
    key, secret = factories.make_key(quotas=quota_specs(rpm=3, budget_usd=budget))
    stack.wait_for_config()
    spent = [chat(stack.url, secret, "ledgered") for _ in range(2)]
    wait_for_rows(2, key=key)

    stack.redis.client().flushdb()
    stack.wait_for_config()
    big = chat(stack.url, secret, "ledgered")
    small = chat(stack.url, secret, "ledgered", max_tokens=1)
    over_rpm = chat(stack.url, secret, "ledgered", max_tokens=1)

    assert [r.status_code for r in spent] == [200, 200]
    assert (big.status_code, code(big)) == (429, "insufficient_quota")
    assert small.status_code == 200  # a smaller worst case fits what is left
    assert (over_rpm.status_code, code(over_rpm)) == (429, "rate_limit_exceeded")
    assert stack.redis.client().keys(f"gw:*:q:k:{key.id}:cost_usd:month:*")


@dataclass
class Outcome:
    key: str
    started: float
    status: int
    code: str | None


def test_when_redis_dies_under_load_budgets_get_503_and_rates_a_per_process_share(
    stack, wait_for_rows
):
    worst, actual = priced_model(
        "paid", upstream_model="fake-gpt;chunks=5;delay_ms=150"
    )
    budget = micro_usd(6 * worst)
    budget_key, budget_secret = factories.make_key(
        quotas=quota_specs(budget_usd=budget)
    )
    rate_key, rate_secret = factories.make_key(quotas=quota_specs(rpm=60))
    stack.wait_for_config()
    outcomes: list[Outcome] = []
    stop = threading.Event()

    def load(name: str, secret: str, model: str, pause: float) -> None:
        while not stop.is_set():
            started = time.monotonic()
            response = chat(stack.url, secret, model)
            outcomes.append(
                Outcome(name, started, response.status_code, code(response))
            )
            time.sleep(pause)

    workers = [
        threading.Thread(target=load, args=("budget", budget_secret, "paid", 0)),
        threading.Thread(target=load, args=("budget", budget_secret, "paid", 0)),
        threading.Thread(target=load, args=("rate", rate_secret, "fake-chat", 0.1)),
    ]
    for worker in workers:
        worker.start()
    time.sleep(0.8)
    stack.redis.kill()
    killed = time.monotonic()
    time.sleep(1.2)
    stop.set()
    for worker in workers:
        worker.join(timeout=30)
    after = [o for o in outcomes if o.started > killed + 0.05]
    rate_before = sum(
        1
        for o in outcomes
        if o.key == "rate" and o.started < killed and o.status == 200
    )
    more_rate = [chat(stack.url, rate_secret, "fake-chat") for _ in range(35)]

    budget_after = {(o.status, o.code) for o in after if o.key == "budget"}
    assert budget_after == {(503, "quota_unavailable")}
    budget_rows = wait_for_rows(
        sum(1 for o in outcomes if o.key == "budget"), key=budget_key
    )
    assert sum(r.cost_usd for r in budget_rows) <= budget
    assert any(
        o.status == 200 for o in outcomes if o.key == "budget"
    )  # before the kill
    rate_after = [(o.status, o.code) for o in after if o.key == "rate"] + [
        (r.status_code, code(r)) for r in more_rate
    ]
    admitted_after = rate_after.count((200, None))
    assert set(rate_after) == {(200, None), (429, "rate_limit_exceeded")}
    assert 0 < admitted_after <= 60 // FALLBACK_SHARE  # its share, not the whole rpm
    assert rate_before + admitted_after < 60
    assert rate_after[-1] == (429, "rate_limit_exceeded")
    assert wait_for_rows(1, key=rate_key)


def test_budgets_are_checked_again_from_the_ledger_once_redis_is_back(
    stack, wait_for_rows
):
    worst, actual = priced_model("ledgered")
    budget = micro_usd(2 * actual + worst - 1)
    key, secret = factories.make_key(quotas=quota_specs(budget_usd=budget))
    stack.wait_for_config()
    spent = [chat(stack.url, secret, "ledgered") for _ in range(2)]
    wait_for_rows(2, key=key)
    stack.redis.kill()
    while_down = chat(stack.url, secret, "ledgered")

    stack.redis.stop()
    stack.redis = start_private_redis(port=stack.redis.port)
    stack.wait_for_config()
    big = chat(stack.url, secret, "ledgered")
    small = chat(stack.url, secret, "ledgered", max_tokens=1)

    assert [r.status_code for r in spent] == [200, 200]
    assert (while_down.status_code, code(while_down)) == (503, "quota_unavailable")
    assert while_down.headers["retry-after"] == "1"
    assert (big.status_code, code(big)) == (429, "insufficient_quota")
    assert small.status_code == 200
