"""The usage spool and its writer, on whichever database the run uses."""

from __future__ import annotations

import fcntl
import os
import uuid
from pathlib import Path

import orjson
import pytest
from django.utils import timezone

from tests import factories
from usage.models import UsageRow
from usage.recorder import Spool, flush_ready, write_segment

pytestmark = pytest.mark.django_db(transaction=True)


def spooled_row(key, **overrides: object) -> dict[str, object]:
    row: dict[str, object] = {
        "id": uuid.uuid4(),
        "request_id": f"req_{uuid.uuid4().hex}",
        "created_at": timezone.now(),
        "key_id": key.pk,
        "key_prefix": key.prefix,
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
        "cached_tokens": 1,
        "usage_source": "provider",
        "cost_usd": "0.0000031250",
        "price_id": None,
        "latency_ms": 12,
        "ttft_ms": None,
        "client_disconnected": False,
        "cache_hit": False,
        "tags": ["team-a", "=cmd"],
    }
    row.update(overrides)
    return row


def test_rows_written_from_the_spool_keep_every_field(tmp_path: Path):
    key, _ = factories.make_key()
    spool = Spool(tmp_path)
    row = spooled_row(key)
    spool.append(row)
    spool.seal()

    flush_ready(spool)

    written = UsageRow.objects.get(id=row["id"])
    assert written.created_at == row["created_at"]
    assert str(written.cost_usd) == "0.0000031250"
    assert written.tags == ["team-a", "=cmd"]
    assert written.ttft_ms is None and written.cached_tokens == 1
    assert spool.ready_segments() == []


def test_a_segment_replayed_after_a_crash_never_doubles_a_row(tmp_path: Path):
    key, _ = factories.make_key()
    rows = [spooled_row(key) for _ in range(5)]
    segment = tmp_path / "host-1-1.ready"
    content = b"".join(orjson.dumps(r, option=orjson.OPT_APPEND_NEWLINE) for r in rows)
    segment.write_bytes(content)
    write_segment(segment, batch_size=2)
    segment.write_bytes(content)  # The crash came after the insert, before the unlink.

    write_segment(segment, batch_size=2)

    assert UsageRow.objects.filter(key=key).count() == 5


def test_a_line_cut_short_by_a_crash_does_not_hold_back_the_others(tmp_path: Path):
    key, _ = factories.make_key()
    good = [spooled_row(key) for _ in range(3)]
    segment = tmp_path / "host-1-2.ready"
    lines = [orjson.dumps(r) for r in good]
    segment.write_bytes(b"\n".join(lines) + b"\n" + lines[0][: len(lines[0]) // 2])

    write_segment(segment, batch_size=500)

    assert {r.id for r in UsageRow.objects.filter(key=key)} == {r["id"] for r in good}
    assert not segment.exists()


def test_a_dead_processs_live_segment_is_adopted_but_a_live_one_is_not(tmp_path: Path):
    key, _ = factories.make_key()
    dead = tmp_path / "host-999-1.jsonl"
    dead.write_bytes(orjson.dumps(spooled_row(key), option=orjson.OPT_APPEND_NEWLINE))
    alive = tmp_path / "host-998-1.jsonl"
    alive.write_bytes(orjson.dumps(spooled_row(key), option=orjson.OPT_APPEND_NEWLINE))
    holder = os.open(alive, os.O_RDONLY)
    fcntl.flock(holder, fcntl.LOCK_EX)  # Its writer is alive and holds it.
    try:
        written = flush_ready(Spool(tmp_path))
    finally:
        os.close(holder)

    assert written == 1
    assert not dead.exists() and alive.exists()
