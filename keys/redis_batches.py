"""Script calls made during one event-loop iteration, sent to Redis as one call.

Every reservation made in one iteration goes to Redis in one RESERVE call (and
likewise settlements in one SETTLE call): one round trip per request at most,
shared under load, and no waiting, since the batch is sent when the iteration
ends. The scripts take many reservations at once for this (`keys.limiter_scripts`).
"""

from __future__ import annotations

import asyncio
from typing import Any

from keys.limiter_scripts import ScriptCall


class _Batch:
    """The calls of one script collected in one iteration."""

    def __init__(self, now_ms: int) -> None:
        self.now_ms = (
            now_ms  # The clock of the first call; calls of one batch share it.
        )
        self.keys: list[str] = []
        self.args: list[Any] = []
        self.waiters: list[tuple[int, asyncio.Future[list[Any]]]] = []


class RedisBatches:
    """The batches being collected, one per script, and their delivery."""

    def __init__(self, call: ScriptCall) -> None:
        self._call = call
        self._open: dict[str, _Batch] = {}

    def forget(self) -> None:
        """Drop the batches not sent yet: they belong to a client (and event loop)
        that has been replaced."""
        self._open = {}

    def add(
        self, script: str, keys: list[str], args: list[Any], width: int, now_ms: int
    ) -> asyncio.Future[list[Any]]:
        """Add one call to this iteration's batch of `script`; resolves to its
        `width` values of the reply."""
        loop = asyncio.get_running_loop()
        batch = self._open.get(script)
        if batch is None:
            batch = self._open[script] = _Batch(now_ms)
            loop.call_soon(self._send, script, batch)
        waiter: asyncio.Future[list[Any]] = loop.create_future()
        batch.keys += keys
        batch.args += args
        batch.waiters.append((width, waiter))
        return waiter

    def _send(self, script: str, batch: _Batch) -> None:
        self._open.pop(script, None)
        asyncio.get_running_loop().create_task(self._deliver(script, batch))

    async def _deliver(self, script: str, batch: _Batch) -> None:
        args = [batch.now_ms, len(batch.waiters), *batch.args]
        try:
            reply = await self._call(script, batch.keys, args)
        except Exception as exc:
            for _, waiter in batch.waiters:
                if not waiter.done():
                    waiter.set_exception(exc)
            return
        offset = 0
        for width, waiter in batch.waiters:
            if not waiter.done():
                waiter.set_result(list(reply[offset : offset + width]) if width else [])
            offset += width
