"""The relay's hot path: no database query between receiving a request and calling
the upstream, once the key's and the catalog's snapshots are warm."""

from __future__ import annotations

import itertools
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from channels.testing import HttpCommunicator
from django.db.backends.utils import CursorWrapper
from django.test import override_settings

from gateway_project.asgi import application
from relay import upstream
from relay.snapshot import snapshot
from tests import factories
from usage.recorder import Spool, recorder

pytestmark = pytest.mark.django_db(transaction=True)

CHAT = {"model": "hot-model", "messages": [{"role": "user", "content": "hi there"}]}
ANSWER = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "hello"}}],
    "usage": {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3},
}


class QueryCounter:
    """Counts SQL statements run on any thread, through any connection."""

    def __init__(self) -> None:
        self._count = itertools.count()
        self.value = 0
        self._lock = threading.Lock()

    def bump(self) -> None:
        with self._lock:
            self.value = next(self._count) + 1


@pytest.fixture
def queries(monkeypatch: pytest.MonkeyPatch) -> QueryCounter:
    counter = QueryCounter()
    for name in ("execute", "executemany"):
        original = getattr(CursorWrapper, name)

        def counted(self: CursorWrapper, *args: Any, _original: Any = original) -> Any:
            counter.bump()
            return _original(self, *args)

        monkeypatch.setattr(CursorWrapper, name, counted)
    return counter


@pytest.fixture
def quiet_background(tmp_path: Path) -> Iterator[None]:
    """The usage writer and the snapshot poller would query on their own schedule."""
    spool = recorder._spool
    recorder._spool = Spool(tmp_path)  # Rows of this in-process relay stay here.
    with override_settings(
        GATEWAY_USAGE_FLUSH_INTERVAL_S=3600, GATEWAY_SNAPSHOT_POLL_S=3600
    ):
        snapshot.forget()
        yield
        snapshot.forget()
    recorder._spool = spool


@pytest.fixture
async def provider(queries: QueryCounter) -> AsyncIterator[dict[str, Any]]:
    """An upstream that notes how many queries had run when each request arrived."""
    seen: dict[str, Any] = {"arrivals": []}

    async def answer(request: web.Request) -> web.Response:
        seen["arrivals"].append(queries.value)
        return web.Response(body=orjson.dumps(ANSWER), content_type="application/json")

    app = web.Application()
    app.router.add_post("/v1/chat/completions", answer)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    seen["url"] = str(server.make_url("/v1"))
    yield seen
    await upstream.close_sessions()
    await server.close()


async def relay(secret: str) -> dict[str, Any]:
    communicator = HttpCommunicator(
        application,
        "POST",
        "/v1/chat/completions",
        body=orjson.dumps(CHAT),
        headers=[(b"authorization", f"Bearer {secret}".encode())],
    )
    return await communicator.get_response(timeout=10)


async def test_a_warm_request_reaches_the_upstream_without_a_query(
    quiet_background, queries, provider
):
    from channels.db import database_sync_to_async

    @database_sync_to_async
    def arrange() -> str:
        factories.make_provider(provider["url"], name="hot")
        factories.make_route("hot-model", provider="hot", upstream_model="up-model")
        factories.make_price("hot-model")
        _, secret = factories.make_key(quotas=[])
        return secret

    secret = await arrange()
    warm = await relay(secret)  # Loads the key's and the catalog's snapshots.
    assert warm["status"] == 200
    before = queries.value

    response = await relay(secret)

    assert response["status"] == 200
    assert provider["arrivals"][-1] == before  # Not one query on the way in.
    assert provider["arrivals"][0] > 0  # The counter does see queries (the cold one).
