"""GET /v1/usage: a key reads its own quotas, their current use and its spend this
billing month, with nothing but its own secret."""

from __future__ import annotations

import uuid
from datetime import timedelta
from decimal import Decimal
from typing import Any

import httpx
import orjson
import pytest
from asgiref.sync import sync_to_async
from channels.testing import HttpCommunicator
from django.db import connections
from django.utils import timezone

from keys.models import ApiKey
from keys.selectors import billing_month_start
from keys.services import QuotaSpec, revoke_key, rotate_key, upsert_team
from relay import routing
from relay.key_usage import KeyUsageConsumer
from relay.snapshot import snapshot
from tests import factories
from tests.support.gateway import wait_for_config
from usage.models import UsageRow

pytestmark = pytest.mark.django_db(transaction=True)


class Rows:
    """Stands in for the usage recorder: the rows the consumer meters, in memory."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def record(self, row: dict[str, Any]) -> None:
        self.rows.append(row)


@pytest.fixture
def metered(monkeypatch: pytest.MonkeyPatch) -> Rows:
    rows = Rows()
    monkeypatch.setattr("relay.metering.recorder", rows)
    return rows


@pytest.fixture
async def fresh_snapshot() -> Any:
    """A process-wide snapshot with nothing cached, and the database connection of
    the thread that `database_sync_to_async` uses closed after (it would otherwise
    outlive the test database)."""
    snapshot.forget()
    yield
    await snapshot.close()
    snapshot.forget()
    await sync_to_async(connections.close_all)()


async def call(secret: str | None, method: str = "GET") -> tuple[int, Any]:
    headers = [(b"authorization", f"Bearer {secret}".encode())] if secret else []
    communicator = HttpCommunicator(
        KeyUsageConsumer.as_asgi(), method, "/v1/usage", headers=headers
    )
    response = await communicator.get_response(timeout=5)
    await communicator.wait()
    return response["status"], orjson.loads(response["body"])


async def _sync(function: Any, *args: Any, **kwargs: Any) -> Any:
    return await sync_to_async(function)(*args, **kwargs)


def row(
    key: ApiKey,
    *,
    ago: timedelta,
    cost: str | None,
    tokens: int = 10,
    provider: str = "fake",
) -> UsageRow:
    return UsageRow(
        provider=provider,
        request_id=f"req-{uuid.uuid4().hex}",
        created_at=timezone.now() - ago,
        key=key,
        key_prefix=key.prefix,
        team_id=key.team_id,
        endpoint="chat.completions",
        model="gpt-4o-mini",
        status_code=200,
        prompt_tokens=tokens,
        completion_tokens=tokens,
        usage_source=UsageRow.Source.PROVIDER,
        cost_usd=Decimal(cost) if cost is not None else None,
    )


def usage_key() -> tuple[ApiKey, str, ApiKey]:
    """A key with quotas of every kind, its team with one, and a teammate key."""
    team = upsert_team(
        name="team-a", quotas=[QuotaSpec("cost_usd", "month", Decimal(50))]
    )
    key, secret = factories.make_key(
        name="app",
        team=team,
        quotas=[
            QuotaSpec("requests", "minute", Decimal(100)),
            QuotaSpec("tokens", "day", Decimal(1000)),
            QuotaSpec("cost_usd", "month", Decimal(5)),
            QuotaSpec("requests", "total", Decimal(10)),
        ],
    )
    teammate, _ = factories.make_key(name="teammate", team=team)
    return key, secret, teammate


async def test_a_key_reads_its_quotas_their_use_and_its_spend(metered, fresh_snapshot):
    key, secret, teammate = await _sync(usage_key)
    now = timezone.now()
    since_month = now - billing_month_start(now)
    rows = [
        row(key, ago=timedelta(seconds=5), cost="0.25"),
        row(key, ago=timedelta(seconds=30), cost=None, tokens=7),  # unpriced
        row(key, ago=timedelta(minutes=5), cost="0.50"),
        row(key, ago=since_month + timedelta(hours=1), cost="9"),  # last month
        row(teammate, ago=timedelta(seconds=1), cost="2"),
        # Refused before forwarding (no provider): spends nothing, counts for nothing.
        row(key, ago=timedelta(seconds=2), cost="0", tokens=0, provider=""),
    ]
    await UsageRow.objects.abulk_create(rows)

    status, body = await call(secret)

    month_start = billing_month_start(timezone.now())
    this_month = [
        r
        for r in rows
        if r.key_id == key.pk and r.created_at >= month_start and r.provider
    ]
    assert status == 200
    assert body["key"] == {
        "id": key.pk,
        "name": "app",
        "prefix": key.prefix,
        "team": key.team_id,
        "expires_at": None,
        "valid_until": None,
    }
    assert body["period"]["name"] == "month"
    assert body["period"]["start"] == month_start.isoformat()
    assert body["requests"] == len(this_month)
    spent = sum((r.cost_usd or Decimal(0) for r in this_month), Decimal(0))
    assert body["spend_usd"] == f"{spent:.10f}"
    assert body["tokens"] == sum(
        r.prompt_tokens + r.completion_tokens for r in this_month
    )
    used = {(q["scope"], q["metric"], q["period"]): q for q in body["quotas"]}
    assert set(used) == {
        ("key", "requests", "minute"),
        ("key", "tokens", "day"),
        ("key", "cost_usd", "month"),
        ("key", "requests", "total"),
        ("team", "cost_usd", "month"),
    }
    assert used["key", "requests", "minute"] == {
        **used["key", "requests", "minute"],
        "limit": "100",
        "used": "2",
        "remaining": "98",
        "resets_at": None,
    }
    assert used["key", "requests", "total"] == {
        **used["key", "requests", "total"],
        "limit": "10",
        "used": "4",
        "remaining": "6",
        "window_start": None,
    }
    assert used["key", "cost_usd", "month"]["used"] == f"{spent.normalize():f}"
    assert used["team", "cost_usd", "month"]["limit"] == "50"
    assert Decimal(used["team", "cost_usd", "month"]["used"]) == spent + 2
    assert [r["endpoint"] for r in metered.rows] == ["usage"]
    assert metered.rows[0]["key_id"] == key.pk


async def test_unknown_and_revoked_keys_are_refused_in_openais_shape(
    metered, fresh_snapshot
):
    key, secret = await _sync(factories.make_key)
    await _sync(revoke_key, key=key)

    answers = [
        await call(None),
        await call("sk-gw-AAAAAAAA-" + "x" * 40),
        await call(secret),
    ]

    assert [status for status, _ in answers] == [401, 401, 401]
    assert all(body["error"]["code"] == "invalid_api_key" for _, body in answers)
    assert metered.rows == []


async def test_only_get_is_allowed(metered, fresh_snapshot):
    _, secret = await _sync(factories.make_key)

    status, body = await call(secret, method="POST")

    assert status == 405
    assert body["error"]["code"] == "method_not_allowed"


async def test_an_old_secret_in_its_grace_period_sees_until_when_it_works(
    metered, fresh_snapshot
):
    key, old = await _sync(factories.make_key)
    rotated = await _sync(rotate_key, key=key, grace_seconds=300)

    status, body = await call(old)

    assert status == 200
    until = rotated.key.previous_valid_until
    assert body["key"]["valid_until"] == until.isoformat()
    assert body["quotas"] == [] and body["spend_usd"] == "0.0000000000"


@pytest.mark.skipif(
    "/v1/usage" not in routing.ROUTES,
    reason="the lead adds /v1/usage to relay.routing.ROUTES",
)
def test_the_running_gateway_answers_v1_usage(gateway):
    key, secret = factories.make_key(
        quotas=[QuotaSpec("requests", "minute", Decimal(60))]
    )
    wait_for_config(gateway)

    response = httpx.get(
        f"{gateway.url}/v1/usage", headers={"authorization": f"Bearer {secret}"}
    )

    assert response.status_code == 200
    body = response.json()
    assert body["key"]["id"] == key.pk
    assert body["quotas"][0]["limit"] == "60"
    assert response.headers["x-request-id"]
