"""Every relayed endpoint in `relay.routing.ROUTES` is limited and recorded.

The routes are enumerated, not listed by hand: a route served by a
`ProxiedEndpointConsumer` (forwarded to a provider, so it costs money) must refuse
a key past its rpm with 429 and leave one usage row per request, the refusal
included. Any other route must be named in NOT_RELAYED with the reason, so a new
endpoint cannot slip in unmetered.

/v1/models is not relayed: the gateway answers it from its own catalog, nothing
reaches a provider, so it is recorded (authenticated requests always are) but not
counted against quotas.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from django.conf import settings

from keys.services import quota_specs
from relay import routing
from relay.consumers import ProxiedEndpointConsumer
from tests import factories
from tests.support.gateway import wait_for_config
from tests.support.redis_server import forget_all_counters, spread_key_ids

pytestmark = pytest.mark.django_db(transaction=True)

RPM = 2
NOT_RELAYED = {
    "/v1/models": "answered from the gateway's catalog; no provider is called",
    "/v1/usage": "a key reads its own quotas and spend; no provider is called",
}
# SPEC's "Relay (apps)" table: the POST paths forwarded to a provider.
SPEC_RELAYED = [
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/responses",
    "/v1/inference/complete",
    "/v1/inference/stream",
]
# A valid request for each relayed endpoint (keyed by the consumer's `endpoint`).
REQUESTS: dict[str, dict[str, Any]] = {
    "chat.completions": {"messages": [{"role": "user", "content": "say hello"}]},
    "completions": {"prompt": "say hello"},
    "embeddings": {"input": "say hello"},
    "responses": {"input": "say hello"},
    "inference.complete": {"prompt": "say hello"},
    "inference.stream": {"prompt": "say hello"},
}


def consumer_of(path: str) -> type:
    return routing.ROUTES[path].consumer_class


@pytest.fixture(autouse=True)
def distinct_key_ids(transactional_db: None) -> Iterator[None]:
    """Counters are named by key id: keep this run's apart from any other's, and
    remove them from a shared Redis afterwards."""
    spread_key_ids()
    yield
    forget_all_counters(settings.REDIS_URL)


@pytest.mark.parametrize("path", sorted(routing.ROUTES))
def test_every_route_is_either_relayed_or_named_as_not_relayed(path):
    relayed = issubclass(consumer_of(path), ProxiedEndpointConsumer)

    assert relayed != (path in NOT_RELAYED), (
        f"{path}: relayed routes must be metered (and not listed in NOT_RELAYED); "
        "others must be listed there with the reason"
    )


def test_every_relayed_path_of_the_spec_is_routed():
    missing = [path for path in SPEC_RELAYED if path not in routing.ROUTES]

    assert missing == []


@pytest.mark.parametrize(
    "path",
    sorted(
        p for p in routing.ROUTES if issubclass(consumer_of(p), ProxiedEndpointConsumer)
    ),
)
def test_a_relayed_route_refuses_past_the_rpm_and_records_every_request(
    path, live, wait_for_rows
):
    endpoint = consumer_of(path).endpoint
    assert endpoint in REQUESTS, f"add a valid request body for {path} to REQUESTS"
    key, secret = factories.make_key(quotas=quota_specs(rpm=RPM))
    wait_for_config(live["server"])

    responses = [
        httpx.post(
            f"{live['url']}{path}",
            json={"model": live["model"], **REQUESTS[endpoint]},
            headers={"authorization": f"Bearer {secret}"},
            timeout=30,
        )
        for _ in range(RPM + 1)
    ]

    assert [r.status_code for r in responses] == [200] * RPM + [429]
    assert responses[-1].json()["error"]["code"] == "rate_limit_exceeded"
    assert responses[0].headers["x-ratelimit-limit-requests"] == str(RPM)
    rows = wait_for_rows(RPM + 1, key=key)
    assert len(rows) == RPM + 1
    assert {r.endpoint for r in rows} == {endpoint}
    assert [r.status_code for r in rows] == [200] * RPM + [429]
    assert [r.request_id for r in rows] == [
        r.headers["x-request-id"] for r in responses
    ]


def test_listing_models_is_recorded_but_not_counted_against_quotas(live, wait_for_rows):
    key, secret = factories.make_key(quotas=quota_specs(rpm=1))
    wait_for_config(live["server"])

    listings = [
        httpx.get(
            f"{live['url']}/v1/models",
            headers={"authorization": f"Bearer {secret}"},
            timeout=30,
        )
        for _ in range(3)
    ]
    chat = httpx.post(
        f"{live['url']}/v1/chat/completions",
        json={"model": live["model"], **REQUESTS["chat.completions"]},
        headers={"authorization": f"Bearer {secret}"},
        timeout=30,
    )

    assert [r.status_code for r in listings] == [200, 200, 200]
    assert "x-ratelimit-limit-requests" not in listings[0].headers
    assert chat.status_code == 200  # the rpm of 1 was still untouched
    assert len(wait_for_rows(4, key=key)) == 4
