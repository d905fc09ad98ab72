"""Celery tasks run by a real worker process on the real broker."""

from __future__ import annotations

import json
import time
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
from django.utils import timezone

from tests import factories
from usage.models import DailyRollup, UsageRow
from usage.tasks import flush_usage, rollup_recent_days

pytestmark = pytest.mark.django_db(transaction=True)


def _orphan_row(key_id: int, prefix: str) -> dict[str, object]:
    return {
        "id": str(uuid.uuid4()),
        "request_id": f"req_{uuid.uuid4().hex}",
        "created_at": timezone.now().isoformat(),
        "key_id": key_id,
        "key_prefix": prefix,
        "team_id": None,
        "user": "",
        "endpoint": "chat.completions",
        "model": "fake-chat",
        "upstream_model": "fake-gpt",
        "provider": "fake",
        "status_code": 200,
        "error_code": "",
        "stream": False,
        "prompt_tokens": 3,
        "completion_tokens": 4,
        "cached_tokens": 0,
        "usage_source": "provider",
        "cost_usd": "0.0000012000",
        "price_id": None,
        "latency_ms": 12,
        "ttft_ms": 10,
        "client_disconnected": False,
        "cache_hit": False,
        "tags": [],
    }


def _wait(predicate, timeout: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError("the worker did not do it in time")


def test_the_worker_writes_rows_a_dead_web_process_left_in_the_spool(
    celery_worker_process, worker_spool_dir: Path
):
    key, _ = factories.make_key()
    row = _orphan_row(key.pk, key.prefix)
    # A live segment nobody holds a lock on: its writer was killed after the response.
    segment = worker_spool_dir / "web-1-999999999.jsonl"
    segment.write_text(json.dumps(row) + "\n")

    flush_usage.delay()

    _wait(lambda: UsageRow.objects.filter(id=row["id"]).exists())
    written = UsageRow.objects.get(id=row["id"])
    assert (written.prompt_tokens, written.completion_tokens) == (3, 4)
    assert not segment.exists()


def test_the_worker_rolls_up_today_idempotently(celery_worker_process):
    key, _ = factories.make_key()
    now = timezone.now()
    for tokens in (10, 20):
        UsageRow.objects.create(
            request_id=f"req_{uuid.uuid4().hex}",
            created_at=now - timedelta(seconds=1),
            key=key,
            key_prefix=key.prefix,
            endpoint="chat.completions",
            model="fake-chat",
            status_code=200,
            prompt_tokens=tokens,
            completion_tokens=1,
            cost_usd="0.0000010000",
        )

    rollup_recent_days.delay()
    _wait(lambda: DailyRollup.objects.filter(key=key).exists())
    rollup_recent_days.delay()
    time.sleep(1)

    [rollup] = DailyRollup.objects.filter(key=key)
    assert rollup.requests == 2
    assert rollup.prompt_tokens == 30
    assert str(rollup.cost_usd) == "0.0000020000"
