"""The gateway as the SPEC serves it, in its own process, on the test database."""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx
from django.conf import settings
from django.db import connection

from relay.generation import read_config_generation
from tests.support.servers import HOST, PROJECT_ROOT, ServerProcess, free_port

PROVIDER_KEY_ENV = "FAKE_PROVIDER_KEY"
PROVIDER_KEY = "sk-upstream-provider-secret-0123456789"


def database_url_for_tests() -> str:
    """DATABASE_URL of the database pytest-django set up for this run."""
    db = connection.settings_dict
    if db["ENGINE"] == "django.db.backends.sqlite3":
        return f"sqlite:///{db['NAME']}"
    user = db.get("USER") or "postgres"
    password = f":{db['PASSWORD']}" if db.get("PASSWORD") else ""
    host = db.get("HOST") or "127.0.0.1"
    port = db.get("PORT") or 5432
    return f"postgres://{user}{password}@{host}:{port}/{db['NAME']}"


def server_env(spool_dir: Path, **extra: str | None) -> dict[str, str | None]:
    env: dict[str, str | None] = {
        "DJANGO_SETTINGS_MODULE": "gateway_project.settings",
        "DATABASE_URL": database_url_for_tests(),
        "REDIS_URL": settings.REDIS_URL,
        "CELERY_BROKER_URL": settings.CELERY_BROKER_URL,
        "GATEWAY_USAGE_SPOOL_DIR": str(spool_dir),
        "GATEWAY_SNAPSHOT_POLL_S": "0.1",
        "GATEWAY_DISCONNECT_GRACE_S": "3",
        "GATEWAY_UPSTREAM_RETRY_BACKOFF_S": "0.01",
        PROVIDER_KEY_ENV: PROVIDER_KEY,
        "PYTHONUNBUFFERED": "1",
    }
    env.update(extra)
    return env


def start_gateway(
    spool_dir: Path,
    *,
    server: str = "uvicorn",
    env: Mapping[str, str | None] | None = None,
    server_proxy_headers: bool = False,
) -> ServerProcess:
    """Start the gateway as deployed: the servers leave X-Forwarded-For alone, so
    `GATEWAY_TRUSTED_PROXIES` alone decides whose forwarded address is believed.

    `server_proxy_headers=True` turns the server's own handling on: uvicorn without
    `--no-proxy-headers` (SPEC's command line as typed; it then replaces the client
    with an X-Forwarded-For entry when the peer is local), daphne with
    `--proxy-headers` (which replaces it for every peer).
    """
    port = free_port()
    if server == "uvicorn":
        argv = [sys.executable, "-m", "uvicorn", "gateway_project.asgi:application"]
        argv += ["--host", HOST, "--port", str(port), "--no-access-log"]
        if not server_proxy_headers:
            argv.append("--no-proxy-headers")
    elif server == "daphne":
        argv = [sys.executable, "-m", "daphne", "-v", "0", "-b", HOST, "-p", str(port)]
        if server_proxy_headers:
            argv.append("--proxy-headers")
        argv += ["gateway_project.asgi:application"]
    else:
        raise ValueError(server)
    process = ServerProcess(
        argv,
        port=port,
        env=server_env(spool_dir, **dict(env or {})),
        cwd=PROJECT_ROOT,
        ready_path="/health",
        timeout=30,
        name=f"gateway-{server}",
    )
    return process.start()


def wait_for_config(server: ServerProcess, timeout: float = 5.0) -> None:
    """Block until the server has loaded the configuration the test just wrote."""
    wanted = read_config_generation()
    deadline = time.monotonic() + timeout
    seen: Any = None
    while time.monotonic() < deadline:
        # The poller starts with the first relay request; any request will do.
        httpx.get(f"{server.url}/v1/models", timeout=5)
        seen = httpx.get(f"{server.url}/health", timeout=5).json()["config_generation"]
        if seen == wanted:
            return
        time.sleep(0.02)
    raise AssertionError(f"server at generation {seen}, wanted {wanted}")
