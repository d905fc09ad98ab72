"""PostgreSQL stopped during traffic: the relay keeps answering, finished requests'
rows wait in the spool (through a restart of the web process too) and are written
once the database is back: none lost, none doubled.

The test runs a private PostgreSQL cluster of its own (initdb + pg_ctl on a free
port in a temporary folder), never the machine's, which other test runs share.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg
import pytest

from tests.support.gateway import start_gateway
from tests.support.servers import HOST, PROJECT_ROOT, ServerProcess, free_port
from tests.support.services import IN_CI

SEVEN_WORDS = [{"role": "user", "content": "count these seven words for me please"}]


def _postgres_bin() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return Path(found[-1]).parent
    message = "PostgreSQL server binaries (initdb, pg_ctl) are not installed"
    if IN_CI:
        pytest.fail(f"CI needs {message}", pytrace=False)
    pytest.skip(message)


class PrivateCluster:
    """A throw-away PostgreSQL cluster; as root, run as the postgres user."""

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.root = Path(tempfile.mkdtemp(prefix="gateway-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        self.url = f"postgres://postgres@{HOST}:{self.port}/outage"
        self.as_postgres: list[str] = []
        if os.geteuid() == 0:  # initdb refuses to run as root
            shutil.chown(self.root, "postgres", "postgres")
            self.as_postgres = ["runuser", "-u", "postgres", "--"]

    def _run(self, *argv: str) -> None:
        subprocess.run(
            [*self.as_postgres, *argv], check=True, capture_output=True, timeout=60
        )

    def init(self) -> None:
        initdb = str(self.bindir / "initdb")
        self._run(initdb, "-D", str(self.data), "-A", "trust", "-U", "postgres", "-N")
        self.start()
        with psycopg.connect(
            f"postgres://postgres@{HOST}:{self.port}/postgres", autocommit=True
        ) as conn:
            conn.execute("CREATE DATABASE outage")

    def start(self) -> None:
        options = (
            f"-p {self.port} -k {self.root} -c listen_addresses={HOST} -c fsync=off"
        )
        self._run(
            str(self.bindir / "pg_ctl"), "-D", str(self.data), "-o", options,
            "-l", str(self.root / "postgres.log"), "-w", "start",
        )  # fmt: skip

    def stop(self) -> None:
        self._run(
            str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop"
        )  # fmt: skip

    def remove(self) -> None:
        try:
            if (self.data / "postmaster.pid").exists():
                self.stop()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def request_ids(self) -> list[str]:
        with psycopg.connect(self.url) as conn:
            return [r[0] for r in conn.execute("SELECT request_id FROM usage_usagerow")]


@pytest.fixture
def cluster() -> Iterator[PrivateCluster]:
    private = PrivateCluster(_postgres_bin())
    try:
        private.init()
        yield private
    finally:
        private.remove()


def _manage(cluster: PrivateCluster, *argv: str) -> str:
    env = {**os.environ, "DATABASE_URL": cluster.url}
    for name in ("REDIS_URL", "CELERY_BROKER_URL"):
        env.pop(name, None)  # the shared Redis must not see this database's state
    result = subprocess.run(
        [sys.executable, "manage.py", *argv],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def _gateway(cluster: PrivateCluster, spool: Path) -> ServerProcess:
    return start_gateway(
        spool,
        env={
            "DATABASE_URL": cluster.url,
            "REDIS_URL": None,
            "CELERY_BROKER_URL": None,
            "GATEWAY_USAGE_FLUSH_INTERVAL_S": "0.05",
        },
    )


def _chat(server: ServerProcess, secret: str, request_id: str) -> None:
    response = httpx.post(
        f"{server.url}/v1/chat/completions",
        json={"model": "outage-chat", "messages": SEVEN_WORDS},
        headers={"authorization": f"Bearer {secret}", "x-request-id": request_id},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    assert response.headers["x-request-id"] == request_id


def _wait_for(cluster: PrivateCluster, wanted: set[str], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if wanted <= set(cluster.request_ids()):
            return
        time.sleep(0.1)
    missing = wanted - set(cluster.request_ids())
    raise AssertionError(f"{len(missing)} rows never written: {sorted(missing)[:5]}")


def test_rows_of_requests_served_while_postgresql_is_down_are_written_once_it_is_back(
    cluster: PrivateCluster, fake_upstream: ServerProcess, tmp_path: Path
):
    _manage(cluster, "migrate", "-v", "0")
    config = tmp_path / "outage.yaml"
    config.write_text(
        f"""
providers:
  - name: fake
    base_url: {fake_upstream.url}/v1
    api_key_env: FAKE_PROVIDER_KEY
    timeout_s: 5
models:
  - name: outage-chat
    provider: fake
    upstream_model: fake-gpt
prices:
  - model: outage-chat
    input: "0.15"
    output: "0.60"
    effective_from: 2024-01-01
"""
    )
    _manage(cluster, "loadconfig", str(config))
    secret = _manage(cluster, "createkey", "--name", "outage").strip().splitlines()[-1]
    spool = tmp_path / "spool"
    before = {f"before-{n}" for n in range(5)}
    during = {f"during-{n}" for n in range(10)}
    after = {f"after-{n}" for n in range(5)}

    first = _gateway(cluster, spool)
    try:
        for request_id in sorted(before):
            _chat(first, secret, request_id)
        _wait_for(cluster, before)
        cluster.stop()
        # The relay keeps serving from its snapshot; the rows wait in the spool.
        for request_id in sorted(during):
            _chat(first, secret, request_id)
    finally:
        first.stop()  # still down: the process exits with its rows on disk
    assert any(spool.iterdir()), "the rows were not left in the spool"

    second = _gateway(cluster, spool)  # a restart, while the database is down
    try:
        cluster.start()
        for request_id in sorted(after):
            _chat(second, secret, request_id)
        _wait_for(cluster, before | during | after)
    finally:
        second.stop()

    written = cluster.request_ids()
    assert sorted(written) == sorted(before | during | after)  # none lost, none twice
    assert not list(spool.glob("*.ready")) and not list(spool.glob("*.jsonl"))
