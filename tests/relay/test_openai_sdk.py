"""The relay through the official `openai` SDK, against uvicorn and the fake upstream."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import httpx
import openai
import pytest

from keys.services import revoke_key
from tests import factories
from tests.support.gateway import PROVIDER_KEY, wait_for_config

pytestmark = pytest.mark.django_db(transaction=True)

MESSAGES = [{"role": "user", "content": "say hello to the gateway"}]


def sdk(live: dict[str, Any], **kwargs: Any) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{live['url']}/v1", api_key=live["secret"], max_retries=0, **kwargs
    )


def test_a_completion_is_relayed_and_metered(live, wait_for_rows):
    completion = sdk(live).chat.completions.create(
        model=live["model"], messages=MESSAGES
    )

    assert completion.choices[0].message.content == "tok0 tok1 tok2 tok3 tok4"
    assert completion.usage.prompt_tokens == 5
    [row] = wait_for_rows(key=live["key"])
    assert (row.prompt_tokens, row.completion_tokens) == (5, 5)
    assert row.usage_source == "provider"
    # 5 × 0.15 + 5 × 0.60 per million tokens
    assert row.cost_usd == Decimal("0.0000037500")
    assert row.price_id == live["price"].pk
    assert row.status_code == 200 and row.stream is False
    assert row.provider == "fake" and row.upstream_model == "fake-gpt"


def test_a_stream_arrives_in_chunks_without_the_usage_chunk_it_did_not_ask_for(
    live, wait_for_rows
):
    stream = sdk(live).chat.completions.create(
        model=live["model"], messages=MESSAGES, stream=True
    )

    chunks = list(stream)

    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "tok0 tok1 tok2 tok3 tok4 "
    assert all(c.usage is None for c in chunks)
    assert all(c.choices for c in chunks)
    [row] = wait_for_rows(key=live["key"])
    assert (row.prompt_tokens, row.completion_tokens) == (5, 5)
    assert row.stream is True and row.usage_source == "provider"


def test_a_stream_keeps_the_usage_chunk_when_the_client_asks_for_it(live):
    stream = sdk(live).chat.completions.create(
        model=live["model"],
        messages=MESSAGES,
        stream=True,
        stream_options={"include_usage": True},
    )

    usage = [c.usage for c in stream if c.usage is not None]

    assert len(usage) == 1
    assert (usage[0].prompt_tokens, usage[0].completion_tokens) == (5, 5)


def test_the_upstream_gets_the_providers_key_never_the_clients(live, fake_upstream):
    httpx.delete(f"{fake_upstream.url}/_fake/requests")

    sdk(live).chat.completions.create(
        model=live["model"], messages=MESSAGES, stream=True
    )

    [seen] = httpx.get(f"{fake_upstream.url}/_fake/requests").json()
    assert seen["headers"]["authorization"] == f"Bearer {PROVIDER_KEY}"
    assert live["secret"] not in str(seen)
    assert seen["body"]["model"] == "fake-gpt"
    assert seen["body"]["stream_options"] == {"include_usage": True}


def test_models_lists_only_what_the_key_may_use(live, gateway):
    factories.make_route("other-model", upstream_model="fake-gpt")
    _, limited = factories.make_key(models=[live["model"]])
    wait_for_config(gateway)
    client = openai.OpenAI(base_url=f"{live['url']}/v1", api_key=limited, max_retries=0)

    listed = [m.id for m in client.models.list()]

    assert listed == [live["model"]]
    assert client.models.retrieve(live["model"]).id == live["model"]
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("other-model")


@pytest.mark.parametrize("header", ["authorization", "x-api-key", "api-key"])
def test_a_bad_key_is_refused_in_every_header_style(live, header):
    value = "sk-gw-AAAAAAAA-" + "x" * 43
    headers = {header: f"Bearer {value}" if header == "authorization" else value}

    response = httpx.post(
        f"{live['url']}/v1/chat/completions",
        json={"model": live["model"], "messages": MESSAGES},
        headers=headers,
    )

    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_api_key"
    assert response.headers["x-request-id"]


@pytest.mark.parametrize("header", ["authorization", "x-api-key", "api-key"])
def test_a_good_key_is_accepted_in_every_header_style(live, header):
    secret = live["secret"]
    headers = {header: f"Bearer {secret}" if header == "authorization" else secret}

    response = httpx.post(
        f"{live['url']}/v1/chat/completions",
        json={"model": live["model"], "messages": MESSAGES},
        headers=headers,
    )

    assert response.status_code == 200


def test_a_key_in_the_query_string_is_not_accepted(live):
    response = httpx.post(
        f"{live['url']}/v1/chat/completions?api_key={live['secret']}",
        json={"model": live["model"], "messages": MESSAGES},
    )

    assert response.status_code == 401


def test_a_revoked_key_is_refused_on_the_next_request(live, gateway):
    client = sdk(live)
    client.chat.completions.create(model=live["model"], messages=MESSAGES)

    revoke_key(key=live["key"])
    wait_for_config(gateway)

    with pytest.raises(openai.AuthenticationError) as refused:
        client.chat.completions.create(model=live["model"], messages=MESSAGES)
    assert refused.value.code == "invalid_api_key"


def test_a_model_the_key_may_not_use_reads_as_unknown(live, gateway, wait_for_rows):
    factories.make_route("forbidden-model", upstream_model="fake-gpt")
    key, secret = factories.make_key(models=[live["model"]])
    wait_for_config(gateway)
    client = openai.OpenAI(base_url=f"{live['url']}/v1", api_key=secret, max_retries=0)

    with pytest.raises(openai.NotFoundError) as forbidden:
        client.chat.completions.create(model="forbidden-model", messages=MESSAGES)
    with pytest.raises(openai.NotFoundError) as unknown:
        client.chat.completions.create(model="no-such-model", messages=MESSAGES)

    assert forbidden.value.code == unknown.value.code == "model_not_found"
    assert forbidden.value.body["message"].replace(
        "forbidden-model", "X"
    ) == unknown.value.body["message"].replace("no-such-model", "X")
    rows = wait_for_rows(2, key=key)
    assert {r.status_code for r in rows} == {404}
    assert all(r.prompt_tokens == r.completion_tokens == 0 for r in rows)


@pytest.mark.parametrize(
    "body",
    [b"{not json", b"[1, 2]", b'{"messages": []}', b'{"model": 5, "messages": []}'],
)
def test_malformed_requests_get_a_400_in_openais_shape(live, body, wait_for_rows):
    response = httpx.post(
        f"{live['url']}/v1/chat/completions",
        content=body,
        headers={"authorization": f"Bearer {live['secret']}"},
    )

    assert response.status_code == 400
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == "invalid_request_error"
    [row] = wait_for_rows(key=live["key"])
    assert row.status_code == 400


def test_an_upstream_500_becomes_a_502(live, gateway):
    factories.make_route("broken", upstream_model="fake-gpt;fault=500")
    wait_for_config(gateway)

    with pytest.raises(openai.APIStatusError) as failed:
        sdk(live).chat.completions.create(model="broken", messages=MESSAGES)

    assert failed.value.status_code == 502
    assert failed.value.code == "upstream_error"


def test_a_hanging_upstream_becomes_a_504(live, gateway, fake_upstream):
    factories.make_provider(f"{fake_upstream.url}/v1", name="slow", timeout_s=1.0)
    factories.make_route("hangs", provider="slow", upstream_model="fake-gpt;fault=hang")
    wait_for_config(gateway)

    with pytest.raises(openai.APIStatusError) as failed:
        sdk(live, timeout=20).chat.completions.create(model="hangs", messages=MESSAGES)

    assert failed.value.status_code == 504
    assert failed.value.code == "upstream_timeout"


def test_every_response_carries_a_request_id_and_the_gateways_overhead(live):
    mine = httpx.post(
        f"{live['url']}/v1/chat/completions",
        json={"model": live["model"], "messages": MESSAGES},
        headers={
            "authorization": f"Bearer {live['secret']}",
            "x-request-id": "client-42",
        },
    )
    theirs = httpx.get(f"{live['url']}/v1/models")

    assert mine.headers["x-request-id"] == "client-42"
    assert float(mine.headers["x-gateway-overhead-ms"]) >= 0
    assert theirs.status_code == 401 and theirs.headers["x-request-id"].startswith(
        "req_"
    )
