"""The relay's in-process picture of keys and the catalog.

A request reads keys, routes and prices from here and never from the database once
they are warm. A poller task checks the configuration generation every
`GATEWAY_SNAPSHOT_POLL_S` (off the request path) and, when it moved, reloads the
catalog and forgets every cached key, so a revocation reaches every process within
one poll interval plus one reload.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict

from channels.db import database_sync_to_async
from django.conf import settings

from keys.secrets import hash_secret
from keys.selectors import KeyInfo, key_info_for_secret
from relay.catalog import Catalog, load_catalog
from relay.generation import read_config_generation

logger = logging.getLogger(__name__)

MAX_CACHED_KEYS = 50_000
_MISSING = object()


class Snapshot:
    def __init__(self) -> None:
        self.generation: int | None = None
        self._catalog: Catalog | None = None
        # hash of secret -> KeyInfo, or None for a secret that matches no key (so
        # a client retrying a bad key does not cost a query each time).
        self._keys: OrderedDict[str, KeyInfo | None] = OrderedDict()
        self._load_lock: asyncio.Lock | None = None
        self._poller: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def key_for_secret(self, secret: str) -> KeyInfo | None:
        self._ensure_poller()
        digest = hash_secret(secret)
        cached = self._keys.get(digest, _MISSING)
        if cached is not _MISSING:
            return cached  # type: ignore[return-value]
        if self.generation is None:
            # Know the generation first: a key cached before it would be dropped by
            # the catalog's first load and read again.
            await self.refresh()
        generation = self.generation
        info = await database_sync_to_async(key_info_for_secret)(secret)
        # A change landed while this read ran: the read may predate it, so the
        # next request reads again rather than trusting it.
        if generation == self.generation:
            self._keys[digest] = info
            if len(self._keys) > MAX_CACHED_KEYS:
                self._keys.popitem(last=False)
        return info

    async def catalog(self) -> Catalog:
        self._ensure_poller()
        if self._catalog is None:
            await self.refresh()
        assert self._catalog is not None
        return self._catalog

    async def refresh(self) -> None:
        """Reload everything if the generation moved (or nothing was loaded yet)."""
        if self._load_lock is None:
            self._load_lock = asyncio.Lock()
        async with self._load_lock:
            generation = await database_sync_to_async(read_config_generation)()
            if generation == self.generation and self._catalog is not None:
                return
            catalog = await database_sync_to_async(load_catalog)(generation)
            self._keys.clear()
            self._catalog, self.generation = catalog, generation

    def forget(self) -> None:
        """Drop everything; the next request reloads. For tests and signals."""
        self._keys.clear()
        self._catalog, self.generation = None, None

    def ensure_polling(self) -> None:
        """Start the poller in this event loop if it is not running (cheap to repeat)."""
        self._ensure_poller()

    def _ensure_poller(self) -> None:
        loop = asyncio.get_running_loop()
        if self._poller is not None and not self._poller.done() and self._loop is loop:
            return
        self._loop, self._load_lock = loop, None
        self._poller = loop.create_task(self._poll(), name="gateway-snapshot-poller")

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(settings.GATEWAY_SNAPSHOT_POLL_S)
            try:
                await self.refresh()
            except asyncio.CancelledError:
                raise
            except Exception:
                # Keep serving the last good snapshot; the database may be back soon.
                logger.warning("snapshot refresh failed", exc_info=True)

    async def close(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError, RuntimeError):
                await self._poller
        self._poller = None


snapshot = Snapshot()
