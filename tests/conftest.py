"""Fixtures: real processes (fake upstream, gateway servers, Celery worker), users by role."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings

from tests import factories
from tests.support import services
from tests.support.gateway import server_env, start_gateway, wait_for_config
from tests.support.servers import PROJECT_ROOT, ServerProcess, start_fake_upstream

CHAT_MODEL = "fake-chat"


@pytest.fixture(autouse=True)
def generation_read_from_the_database() -> Iterator[None]:
    """Redis mirrors the config generation; a rolled-back or flushed test database
    leaves the mirror ahead of it. Without the mirror, readers fall back to the row."""

    def forget_mirror() -> None:
        if settings.REDIS_URL:
            from django_redis import get_redis_connection

            from relay.generation import generation_key

            get_redis_connection("default").delete(generation_key())

    forget_mirror()
    yield
    forget_mirror()


@pytest.fixture(scope="session")
def fake_upstream() -> Iterator[ServerProcess]:
    server = start_fake_upstream(api_key=None)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def spool_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("usage-spool")


@pytest.fixture(scope="session")
def gateway(
    django_db_setup: None, django_db_blocker: Any, spool_dir: Path
) -> Iterator[ServerProcess]:
    """The gateway on uvicorn, as the SPEC serves it, on the test database."""
    with django_db_blocker.unblock():
        server = start_gateway(spool_dir, server="uvicorn")
    yield server
    server.stop()


@pytest.fixture
def relay_config(
    transactional_db: None, fake_upstream: ServerProcess
) -> dict[str, Any]:
    """A provider pointing at the fake upstream, a priced chat model and a key."""
    factories.make_provider(f"{fake_upstream.url}/v1")
    factories.make_route(CHAT_MODEL, upstream_model="fake-gpt", max_output_tokens=1000)
    price = factories.make_price(CHAT_MODEL)
    key, secret = factories.make_key()
    return {"key": key, "secret": secret, "price": price, "model": CHAT_MODEL}


@pytest.fixture
def live(gateway: ServerProcess, relay_config: dict[str, Any]) -> dict[str, Any]:
    """relay_config, loaded by the running gateway."""
    wait_for_config(gateway)
    return {**relay_config, "url": gateway.url, "server": gateway}


@pytest.fixture
def wait_for_rows() -> Callable[..., list[Any]]:
    """Poll the ledger until `count` rows match (the writer flushes in batches)."""
    from usage.models import UsageRow

    def wait(count: int = 1, timeout: float = 10.0, **filters: Any) -> list[Any]:
        deadline = time.monotonic() + timeout
        rows: list[Any] = []
        while time.monotonic() < deadline:
            rows = list(UsageRow.objects.filter(**filters).order_by("created_at"))
            if len(rows) >= count:
                return rows
            time.sleep(0.05)
        raise AssertionError(f"{len(rows)} usage rows for {filters}, wanted {count}")

    return wait


@pytest.fixture(scope="session")
def redis_url() -> str:
    return services.require("Redis", settings.REDIS_URL, 6379)


@pytest.fixture(scope="session")
def worker_spool_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The worker's own spool, so no web process adopts what a test leaves there."""
    return tmp_path_factory.mktemp("worker-spool")


@pytest.fixture(scope="session")
def celery_worker_process(
    django_db_setup: None, django_db_blocker: Any, worker_spool_dir: Path
) -> Iterator[ServerProcess]:
    """A real Celery worker on the broker, using the test database."""
    broker = services.require("A Celery broker", settings.CELERY_BROKER_URL, 6379)
    with django_db_blocker.unblock():
        env = server_env(worker_spool_dir, CELERY_BROKER_URL=broker)
    argv = [sys.executable, "-m", "celery", "-A", "gateway_project", "worker"]
    argv += ["-l", "info", "--pool", "solo", "--without-heartbeat", "--without-gossip"]
    argv += ["--without-mingle", "-Q", "celery"]
    worker = _CeleryWorker(argv, env=env, cwd=PROJECT_ROOT)
    worker.start()
    yield worker
    worker.stop()


class _CeleryWorker(ServerProcess):
    """A worker has no port: it is ready when it says so in its log."""

    def __init__(
        self, argv: list[str], *, env: dict[str, str | None], cwd: Path
    ) -> None:
        super().__init__(
            argv, port=0, env=env, cwd=cwd, timeout=60, name="celery-worker"
        )

    def _answers(self) -> bool:
        return "ready." in self.log_tail(200)
