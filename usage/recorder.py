"""Usage rows: a durable hand-off on the request path, bulk writes off it.

`record(row)` appends one JSON line to this process's spool segment: one `write()`
to a file opened with O_APPEND, microseconds, and the line survives the process
being killed right after (it is in the kernel's page cache). A flusher task moves
closed segments into the database with `bulk_create(ignore_conflicts=True)` keyed
on the row's id, so replaying a segment after a crash never doubles a row. While
the database is down the segments wait on disk and are retried with backoff.

Each live segment is held with an exclusive `flock`; a segment nobody holds
belongs to a process that died, and any flusher adopts it.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

import orjson
from django.conf import settings
from django.db import DatabaseError, DataError, IntegrityError, connection, transaction
from django.db.models import Field

from usage.models import UsageRow

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

LIVE_SUFFIX = ".jsonl"
READY_SUFFIX = ".ready"
# How often an idle flusher looks for segments that dead processes left behind.
ORPHAN_CHECK_INTERVAL_S = 30.0


def _encode(value: Any) -> Any:
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    raise TypeError(f"cannot spool {type(value).__name__}")


class Spool:
    """This process's spool directory and live segment."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._fd: int | None = None
        self._path: Path | None = None
        self._pending = 0
        self._pid = os.getpid()
        self._host = ""
        self._ready_to_write = False

    def append(self, row: dict[str, Any]) -> None:
        line = orjson.dumps(row, default=_encode, option=orjson.OPT_APPEND_NEWLINE)
        if self._fd is None or self._pid != os.getpid():
            self._open_segment()
        assert self._fd is not None
        os.write(self._fd, line)
        self._pending += 1

    @property
    def pending(self) -> int:
        return self._pending

    def seal(self) -> None:
        """Close the live segment so a flush can take it; the next row opens another."""
        if self._fd is None or self._path is None or not self._pending:
            return
        ready = self._path.with_suffix(READY_SUFFIX)
        os.rename(self._path, ready)
        os.close(self._fd)  # Releases the flock too.
        self._fd, self._path, self._pending = None, None, 0

    def _open_segment(self) -> None:
        if self._pid != os.getpid() or not self._ready_to_write:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._pid, self._host = os.getpid(), socket.gethostname()
            self._ready_to_write = True
        name = f"{self._host}-{self._pid}-{time.time_ns()}{LIVE_SUFFIX}"
        self._path = self.directory / name
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT
        try:
            self._fd = os.open(self._path, flags, 0o600)
        except FileNotFoundError:  # The directory was removed under us.
            self.directory.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self._path, flags, 0o600)
        fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self._pending = 0

    def adopt_orphans(self) -> int:
        """Mark live segments of dead processes ready; returns how many."""
        adopted = 0
        if not self.directory.exists():
            return 0
        for path in self.directory.glob(f"*{LIVE_SUFFIX}"):
            if path == self._path:
                continue
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # Its writer is alive.
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.rename(path, path.with_suffix(READY_SUFFIX))
                    adopted += 1
            finally:
                os.close(fd)
        return adopted

    def ready_segments(self) -> list[Path]:
        if not self.directory.exists():
            return []
        return sorted(self.directory.glob(f"*{READY_SUFFIX}"))


def _parse_lines(lines: list[bytes], source: str) -> list[dict[str, Any]]:
    rows = []
    for line in lines:
        try:
            rows.append(orjson.loads(line))
        except orjson.JSONDecodeError:
            # A line cut short by a crash mid-write: nothing of it was accepted.
            logger.error("unreadable usage spool line skipped", extra={"file": source})
    return rows


def _python_value(field: Field[Any, Any], data: dict[str, Any]) -> Any:
    if field.attname not in data:  # A row spooled by an older version.
        return field.get_default()
    value = data[field.attname]
    if value is None:
        return None
    if field.attname == "created_at":
        return datetime.fromisoformat(value)
    if field.attname == "cost_usd":
        return Decimal(value)
    if field.attname == "id":
        return uuid.UUID(value)
    return value


def insert_rows(rows: list[dict[str, Any]]) -> None:
    """Insert spooled rows, skipping ids already written (a replayed segment).

    One prepared INSERT through `executemany`: the ORM's bulk_create compiles SQL
    and builds a model instance per row, which measured a quarter of a busy web
    process's CPU. Values still go through each field's own `get_db_prep_save`.
    """
    fields = UsageRow._meta.concrete_fields
    params = [
        [f.get_db_prep_save(_python_value(f, row), connection) for f in fields]
        for row in rows
    ]
    quote = connection.ops.quote_name
    table = quote(UsageRow._meta.db_table)
    columns = ", ".join(quote(f.column) for f in fields)
    values = ", ".join(["%s"] * len(fields))
    # Table and column names come from the model, quoted; values are parameters.
    if connection.vendor == "postgresql":
        sql = f"INSERT INTO {table} ({columns}) VALUES ({values}) ON CONFLICT (id) DO NOTHING"  # noqa: S608
    elif connection.vendor == "sqlite":
        sql = f"INSERT OR IGNORE INTO {table} ({columns}) VALUES ({values})"  # noqa: S608
    else:  # Other backends: the ORM's portable, slower path.
        UsageRow.objects.bulk_create(
            [
                UsageRow(**{f.attname: _python_value(f, r) for f in fields})
                for r in rows
            ],
            ignore_conflicts=True,
        )
        return
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.executemany(sql, params)


def insert_lines(lines: list[bytes], source: str) -> None:
    """Insert spooled JSON lines; on PostgreSQL without parsing them in Python.

    PostgreSQL turns the lines into rows itself (`json_populate_recordset`), which
    keeps the web process's CPU for requests. Anything it refuses (a line cut short
    by a crash) sends the batch through the row-by-row path, which skips bad lines.
    """
    if connection.vendor == "postgresql":
        fields = UsageRow._meta.concrete_fields
        quote = connection.ops.quote_name
        table = quote(UsageRow._meta.db_table)
        columns = ", ".join(quote(f.column) for f in fields)
        sql = (
            f"INSERT INTO {table} ({columns}) SELECT {columns} "  # noqa: S608
            f"FROM json_populate_recordset(NULL::{table}, %s::json) "
            "ON CONFLICT (id) DO NOTHING"
        )
        payload = (b"[" + b",".join(lines) + b"]").decode()
        try:
            with transaction.atomic(), connection.cursor() as cursor:
                cursor.execute(sql, [payload])
            return
        except DatabaseError as exc:
            if not isinstance(exc, DataError | IntegrityError):
                raise  # The database is down: the segment waits for the next flush.
    insert_rows(_parse_lines(lines, source))


def write_segment(path: Path, batch_size: int) -> int:
    """Insert a ready segment's rows (sync; the database must be reachable)."""
    lines = [line for line in path.read_bytes().splitlines() if line.strip()]
    for start in range(0, len(lines), batch_size):
        insert_lines(lines[start : start + batch_size], path.name)
    path.unlink()
    return len(lines)


def flush_ready(spool: Spool) -> int:
    """Write every ready segment (and orphans) to the database; sync.

    Runs on the recorder's own thread, which keeps its connection between flushes;
    a failed flush drops it so the next one reconnects.
    """
    try:
        spool.adopt_orphans()
        written = 0
        for path in spool.ready_segments():
            try:
                written += write_segment(path, settings.GATEWAY_USAGE_BATCH_SIZE)
            except FileNotFoundError:
                continue  # Another flusher took it.
        return written
    except Exception:
        with contextlib.suppress(Exception):
            connection.close()
        raise


class Recorder:
    """The process-wide recorder: `record()` on the hot path, `run()` as a task."""

    def __init__(self) -> None:
        self._spool: Spool | None = None
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._orphans_checked = float("-inf")
        # One thread for every flush: its database connection lives across flushes.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="usage")

    @property
    def spool(self) -> Spool:
        if self._spool is None:
            self._spool = Spool(Path(settings.GATEWAY_USAGE_SPOOL_DIR))
        return self._spool

    def record(self, row: dict[str, Any]) -> None:
        self.spool.append(row)
        self._ensure_flusher()
        if (
            self._wake is not None
            and self.spool.pending >= settings.GATEWAY_USAGE_BATCH_SIZE
        ):
            self._wake.set()

    def start(self) -> None:
        """Run the flusher now (at server start), so spooled rows a previous process
        left are written before the first request."""
        self._ensure_flusher()
        if self._wake is not None:
            self._orphans_checked = float("-inf")
            self._wake.set()

    def _ensure_flusher(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        if self._task is not None and not self._task.done() and self._loop is loop:
            return
        self._loop, self._wake = loop, asyncio.Event()
        self._task = loop.create_task(self._run(), name="gateway-usage-flusher")

    async def _run(self) -> None:
        backoff = settings.GATEWAY_USAGE_FLUSH_INTERVAL_S
        assert self._wake is not None
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=backoff)
            self._wake.clear()
            try:
                await self.flush()
                backoff = settings.GATEWAY_USAGE_FLUSH_INTERVAL_S
            except asyncio.CancelledError:
                raise
            except Exception:
                backoff = min(backoff * 2, 30.0)
                logger.warning(
                    "usage rows wait in the spool: database unavailable",
                    extra={"retry_in_s": backoff},
                    exc_info=True,
                )

    async def flush(self) -> int:
        self.spool.seal()
        now = time.monotonic()
        if not self.spool.ready_segments():
            if now - self._orphans_checked < ORPHAN_CHECK_INTERVAL_S:
                return 0
            self._orphans_checked = now
            if not await self._in_thread(self.spool.adopt_orphans):
                return 0
        return await self._in_thread(flush_ready, self.spool)

    async def _in_thread(self, function: Callable[..., _T], *args: Any) -> _T:
        return await asyncio.get_running_loop().run_in_executor(
            self._executor, function, *args
        )

    def flush_sync(self) -> int:
        self.spool.seal()
        return flush_ready(self.spool)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, RuntimeError):
                await self._task
            self._task = None
        try:
            await self.flush()
        except Exception:
            logger.warning("usage rows left in the spool at shutdown", exc_info=True)


recorder = Recorder()
