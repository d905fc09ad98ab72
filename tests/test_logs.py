"""Logs: JSON lines, one access line per request, and never a secret.

Unit tests drive `redact()`, `RedactSecretsFilter` and `JsonFormatter` through a
real `logging` handler; the end-to-end tests read the log of the gateway as the
SPEC serves it (uvicorn, `--no-access-log`).
"""

from __future__ import annotations

import io
import json
import logging
import re
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway_project.logs import JsonFormatter, RedactSecretsFilter, redact
from keys.secrets import make_secret
from tests.support.gateway import PROVIDER_KEY

GATEWAY_SECRET = "sk-gw-AbCd1234-" + "s3cr3t_Random-Part" * 3
PROVIDER_SECRET = "sk-proj-Provider0123456789abcdefXYZ"
MESSAGES = [{"role": "user", "content": "say hello to the gateway"}]
ACCESS_FIELDS = {
    "request_id",
    "key_prefix",
    "model",
    "status",
    "prompt_tokens",
    "completion_tokens",
    "cost_usd",
    "duration_ms",
}


@pytest.fixture
def log() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    """A logger wired as settings.LOGGING wires the root: JSON, secrets redacted."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RedactSecretsFilter())
    logger = logging.getLogger("tests.logs")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    yield logger, stream
    logger.removeHandler(handler)
    logger.propagate = True


def lines_of(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


# --- redact() ---------------------------------------------------------------------------


def test_a_gateway_secret_keeps_only_its_public_prefix():
    text = f"key {GATEWAY_SECRET} refused"

    assert redact(text) == "key sk-gw-AbCd1234-[redacted] refused"


def test_a_bearer_token_is_masked():
    assert redact("Bearer abc.DEF-123_xyz==") == "Bearer [redacted]"
    assert redact(f"bearer {GATEWAY_SECRET}") == "bearer sk-gw-AbCd1234-[redacted]"


@pytest.mark.parametrize(
    "text",
    [
        "Authorization: Basic dXNlcjpwYXNzd29yZA==",
        "authorization=Token abc123",
        "{'authorization': 'Bearer opaque-token-value'}",
        '"Proxy-Authorization": "Basic dXNlcjpwYXNz"',
    ],
)
def test_an_authorization_value_is_masked_whatever_its_scheme(text):
    masked = redact(text)

    for secret in (
        "dXNlcjpwYXNzd29yZA",
        "abc123",
        "opaque-token-value",
        "dXNlcjpwYXNz",
    ):
        assert secret not in masked
    assert "[redacted]" in masked


def test_provider_keys_are_masked():
    text = f"upstream said no to {PROVIDER_SECRET} and {PROVIDER_KEY}"

    assert redact(text) == "upstream said no to sk-[redacted] and sk-[redacted]"


def test_a_mangled_gateway_key_is_masked_too():
    assert redact("sk-gw-short-0123456789abcdefghij") == "sk-[redacted]"


@pytest.mark.parametrize(
    "url, expected",
    [
        ("/v1/models?api_key=opaque123&x=1", "/v1/models?api_key=[redacted]&x=1"),
        ("/v1/models?x=1&key=opaque123", "/v1/models?x=1&key=[redacted]"),
        ("/v1/models?api-key=opaque123", "/v1/models?api-key=[redacted]"),
        ("/cb?access_token=opaque123#frag", "/cb?access_token=[redacted]#frag"),
    ],
)
def test_keys_in_a_query_string_are_masked(url, expected):
    assert redact(url) == expected


def test_credentials_in_a_url_are_masked():
    text = "cannot reach redis://:hunter2@10.0.0.5:6379/0 or postgres://gw:pw0rd@db/gw"

    assert redact(text) == (
        "cannot reach redis://:[redacted]@10.0.0.5:6379/0"
        " or postgres://gw:[redacted]@db/gw"
    )


def test_ordinary_text_is_left_alone():
    text = (
        "request req_0123 model gpt-4o-mini status 200 max_tokens=100"
        " prompt_tokens: 5 key_prefix=AbCd1234 risk-assessment-model-v2"
        " postgres://gw@db/gw api_key_env=OPENAI_API_KEY"
    )

    assert redact(text) == text


@given(before=st.text(), after=st.text())
def test_a_gateway_secret_never_survives_whatever_surrounds_it(before, after):
    secret = make_secret()
    random_part = secret.value.split("-", 3)[3]

    masked = redact(before + secret.value + after)

    assert secret.value not in masked
    assert random_part not in masked


@given(before=st.text(), after=st.text())
def test_a_provider_key_after_a_separator_never_survives(before, after):
    masked = redact(before + " " + PROVIDER_SECRET + after)

    assert PROVIDER_SECRET not in masked


@given(text=st.text())
def test_redacting_twice_changes_nothing_more(text):
    once = redact(text)

    assert redact(once) == once


# --- RedactSecretsFilter and JsonFormatter ---------------------------------------------


def test_secrets_in_the_message_and_its_arguments_are_masked(log):
    logger, stream = log

    logger.info("client sent %s with %r", GATEWAY_SECRET, {"k": PROVIDER_SECRET})

    [line] = lines_of(stream)
    assert line["message"] == (
        "client sent sk-gw-AbCd1234-[redacted] with {'k': 'sk-[redacted]'}"
    )


def test_secrets_in_extra_fields_are_masked_however_deep(log):
    logger, stream = log

    logger.warning(
        "upstream refused",
        extra={
            "request": {
                "url": f"/v1/models?api_key={GATEWAY_SECRET}",
                "headers": {"Authorization": "Basic dXNlcjpwYXNz", "accept": "*/*"},
                "tries": [{"x-api-key": "opaque-provider-value"}],
            },
            "scope_headers": [(b"authorization", b"Bearer opaque"), (b"host", b"gw")],
            "api_key": "plain-value-in-a-field",
            "raw": GATEWAY_SECRET.encode(),
        },
    )

    [line] = lines_of(stream)
    text = json.dumps(line)
    for secret in (
        GATEWAY_SECRET,
        "dXNlcjpwYXNz",
        "opaque-provider-value",
        "Bearer opaque",
        "plain-value-in-a-field",
    ):
        assert secret not in text
    assert line["request"]["headers"] == {
        "Authorization": "[redacted]",
        "accept": "*/*",
    }
    assert line["request"]["url"] == "/v1/models?api_key=[redacted]"
    assert line["scope_headers"] == [["authorization", "[redacted]"], ["host", "gw"]]
    assert line["api_key"] == "[redacted]"
    assert line["raw"] == "sk-gw-AbCd1234-[redacted]"


def test_secrets_in_an_exception_are_masked(log):
    logger, stream = log

    try:
        raise ValueError(f"bad key {GATEWAY_SECRET} for {PROVIDER_SECRET}")
    except ValueError:
        logger.exception("relay failed")

    [line] = lines_of(stream)
    assert GATEWAY_SECRET not in json.dumps(line)
    assert PROVIDER_SECRET not in json.dumps(line)
    assert (
        "ValueError: bad key sk-gw-AbCd1234-[redacted] for sk-[redacted]"
        in (line["exception"])
    )
    assert "Traceback" in line["exception"]


def test_an_exception_logged_as_the_message_is_masked(log):
    logger, stream = log

    logger.error(ValueError(f"refused {GATEWAY_SECRET}"))

    [line] = lines_of(stream)
    assert line["message"] == "refused sk-gw-AbCd1234-[redacted]"


def test_an_object_that_shows_a_secret_is_logged_masked(log):
    class Credentials:
        def __str__(self) -> str:
            return f"Credentials({PROVIDER_SECRET})"

    logger, stream = log

    logger.info("calling upstream", extra={"credentials": Credentials()})

    [line] = lines_of(stream)
    assert line["credentials"] == "Credentials(sk-[redacted])"


def test_a_record_that_cannot_be_redacted_is_withheld_not_raised_or_leaked(log):
    class Unprintable:
        def __str__(self) -> str:
            raise RuntimeError(f"cannot show {GATEWAY_SECRET}")

    logger, stream = log

    logger.info("sending %s", GATEWAY_SECRET, extra={"weird": Unprintable()})

    [line] = lines_of(stream)
    assert line["message"] == "log record withheld: redaction failed (RuntimeError)"
    assert line["logger"] == "tests.logs" and "weird" not in line
    assert GATEWAY_SECRET not in stream.getvalue()


def test_extra_fields_without_secrets_keep_their_types_on_the_record(log):
    logger, stream = log
    records: list[logging.LogRecord] = []
    logger.addFilter(lambda record: records.append(record) or True)

    logger.info("request", extra={"status": 200, "cost_usd": Decimal("0.0000037500")})

    [record] = records
    # The filter runs in the handler, after logger-level filters, on the same record.
    assert record.status == 200
    assert record.cost_usd == Decimal("0.0000037500")
    [line] = lines_of(stream)
    assert (line["status"], line["cost_usd"]) == (200, "0.0000037500")


def test_each_record_is_one_json_object_on_one_line(log):
    logger, stream = log

    logger.info("first\nsecond line", extra={"request_id": "req_1", "status": 200})
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logger.error("with a traceback", exc_info=True)
    logger.debug(
        "%d%% done", 50, extra={"when": datetime(2024, 7, 18, 12, 0, tzinfo=UTC)}
    )

    lines = stream.getvalue().splitlines()
    assert len(lines) == 3
    first, second, third = (json.loads(line) for line in lines)
    assert first["message"] == "first\nsecond line"
    assert (first["request_id"], first["status"]) == ("req_1", 200)
    assert second["level"] == "error" and "RuntimeError: boom" in second["exception"]
    assert (
        third["message"] == "50% done" and third["when"] == "2024-07-18T12:00:00+00:00"
    )


def test_a_line_carries_time_level_logger_and_message(log):
    logger, stream = log

    logger.warning("careful", extra={"level": "not the level", "model": "gpt-4o-mini"})

    [line] = lines_of(stream)
    assert list(line)[:4] == ["time", "level", "logger", "message"]
    assert datetime.fromisoformat(line["time"]).utcoffset() is not None
    assert (line["level"], line["logger"], line["message"]) == (
        "warning",
        "tests.logs",
        "careful",
    )
    assert line["model"] == "gpt-4o-mini"


# --- end to end: the gateway's own log ---------------------------------------------------


def server_log(live: dict[str, Any]) -> str:
    return live["server"].log_path.read_text(encoding="utf-8", errors="replace")


def access_lines(live: dict[str, Any], request_ids: set[str]) -> list[dict[str, Any]]:
    """The access lines of these requests, once each has had time to appear."""
    deadline = time.monotonic() + 10
    while True:
        lines = [
            json.loads(line)
            for line in server_log(live).splitlines()
            if line.startswith("{") and '"gateway.access"' in line
        ]
        mine = [line for line in lines if line.get("request_id") in request_ids]
        if {line["request_id"] for line in mine} >= request_ids:
            time.sleep(0.2)  # A second line for the same request would come now.
            return [
                json.loads(line)
                for line in server_log(live).splitlines()
                if line.startswith("{") and '"gateway.access"' in line
                if json.loads(line).get("request_id") in request_ids
            ]
        if time.monotonic() > deadline:
            raise AssertionError(f"access lines for {request_ids}: {mine}")
        time.sleep(0.05)


@pytest.mark.django_db(transaction=True)
def test_the_gateway_logs_one_json_access_line_per_request_and_no_secret(live):
    secret, url, model = live["secret"], live["url"], live["model"]
    body = {"model": model, "messages": MESSAGES}
    chat = f"{url}/v1/chat/completions"
    with httpx.Client(timeout=10) as client:
        responses = {
            "bearer": client.post(
                chat, json=body, headers={"authorization": f"Bearer {secret}"}
            ),
            "x-api-key": client.post(chat, json=body, headers={"x-api-key": secret}),
            "query api_key": client.post(f"{chat}?api_key={secret}", json=body),
            "query key": client.get(f"{url}/v1/models?key={secret}"),
            "query and header": client.post(
                f"{chat}?key={secret}", json=body, headers={"api-key": secret}
            ),
        }
    request_ids = {name: r.headers["x-request-id"] for name, r in responses.items()}

    lines = access_lines(live, set(request_ids.values()))

    statuses = {name: r.status_code for name, r in responses.items()}
    assert statuses == {
        "bearer": 200,
        "x-api-key": 200,
        "query api_key": 401,
        "query key": 401,
        "query and header": 200,
    }
    assert sorted(line["request_id"] for line in lines) == sorted(request_ids.values())
    by_request = {line["request_id"]: line for line in lines}
    for name, request_id in request_ids.items():
        line = by_request[request_id]
        assert ACCESS_FIELDS <= set(line), name
        assert line["status"] == statuses[name], name
        assert isinstance(line["duration_ms"], int) and line["duration_ms"] >= 0
    served = by_request[request_ids["bearer"]]
    assert served["key_prefix"] == live["key"].prefix
    assert served["model"] == model
    assert (served["prompt_tokens"], served["completion_tokens"]) == (5, 5)
    assert Decimal(served["cost_usd"]) == Decimal("0.0000037500")
    assert by_request[request_ids["query key"]]["key_prefix"] is None
    log_text = server_log(live)
    assert secret not in log_text
    assert secret.split("-", 3)[3] not in log_text
    assert PROVIDER_KEY not in log_text
    assert not re.search(
        r"(?i)bearer\s+(?!\[redacted\]|sk-gw-\w{8}-\[redacted\])\S", log_text
    )
    for line in log_text.splitlines():
        if line.startswith("{"):
            json.loads(line)


@pytest.mark.django_db(transaction=True)
def test_a_secret_sent_as_a_request_id_does_not_reach_the_log(live):
    secret = live["secret"]

    response = httpx.post(
        f"{live['url']}/v1/chat/completions",
        json={"model": live["model"], "messages": MESSAGES},
        headers={"authorization": f"Bearer {secret}", "x-request-id": secret},
    )

    assert response.status_code == 200
    # A key pasted as a request id is neither echoed nor stored: the gateway's own id
    # replaces it.
    request_id = response.headers["x-request-id"]
    assert request_id.startswith("req_")
    [line] = access_lines(live, {request_id})
    assert line["status"] == 200
    assert secret not in server_log(live)
