"""Redis for the quota tests, and the limiter backends their unit tests run on.

- `start_private_redis()`: a redis-server of the test's own, on a free port, with no
  persistence, that a test may flush or kill without touching the machine's shared
  Redis (other test runs use it at the same time).
- `spread_key_ids()` and `forget_counters()`: quota counters are named after key and
  team ids (`gw:<namespace>:q:k:<id>:...`), and every test database numbers its keys from 1, so
  two test runs sharing one Redis, or two runs one after the other, would count on
  each other's counters. Starting the ids at a random offset keeps them apart.
- `LimiterBackend`: a fresh `keys.limiter.Limiter` on the in-process or the Redis
  backend, keys (`KeyInfo`) with random ids, and the clean-up of their counters.
  It does not renew reservations in the background unless asked: renewals read the
  real clock, and most unit tests pass a controlled one (they call `renew(now)`).
"""

from __future__ import annotations

import random
import shutil
import signal
from collections.abc import Iterable
from decimal import Decimal
from typing import Any

import pytest
import redis
from django.db import connection

from keys.limiter import Limiter
from keys.selectors import KeyInfo, QuotaInfo
from tests.support import services
from tests.support.servers import HOST, ServerProcess, free_port

_ids = random.SystemRandom()


class PrivateRedis(ServerProcess):
    """A redis-server process owned by one test (or module)."""

    @property
    def redis_url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(host=HOST, port=self.port, socket_timeout=2)

    def kill(self) -> None:
        """SIGKILL: Redis vanishes as it would on a crash, without a goodbye."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=5)


def redis_server_binary() -> str:
    """Path of redis-server; skips locally, fails in CI, when it is not installed."""
    binary = shutil.which("redis-server")
    if binary is None:
        message = "redis-server is not installed"
        if services.IN_CI:
            pytest.fail(f"CI needs {message}", pytrace=False)
        pytest.skip(message)
    return binary


def start_private_redis(port: int | None = None) -> PrivateRedis:
    """A new redis-server; `port` to bring one back where a killed one listened."""
    binary = redis_server_binary()
    port = port or free_port()
    argv = [binary, "--port", str(port), "--bind", HOST, "--save", ""]
    argv += ["--appendonly", "no", "--protected-mode", "no"]
    server = PrivateRedis(argv, port=port, name="private-redis", timeout=10)
    server.start()
    return server


def spread_key_ids() -> int:
    """Make the next API key id (and team id) a random large number; returns it."""
    start = _ids.randrange(10**8, 10**12)
    with connection.cursor() as cursor:
        for table in ("keys_apikey", "keys_team"):
            if connection.vendor == "postgresql":
                cursor.execute(
                    "SELECT setval(pg_get_serial_sequence(%s, 'id'), %s, false)",
                    [table, start],
                )
            else:  # SQLite: AUTOINCREMENT tables keep their high-water mark here.
                cursor.execute("DELETE FROM sqlite_sequence WHERE name = %s", [table])
                cursor.execute(
                    "INSERT INTO sqlite_sequence (name, seq) VALUES (%s, %s)",
                    [table, start - 1],
                )
    return start


def forget_counters(
    client: Any, *, key_id: int | None = None, team_id: int | None = None
) -> int:
    """Delete the quota counters (and their pending reservations) of a key or team."""
    patterns = []
    if key_id is not None:
        patterns.append(f"gw:*:q:k:{key_id}:*")
    if team_id is not None:
        patterns.append(f"gw:*:q:t:{team_id}:*")
    names = [name for p in patterns for name in client.scan_iter(match=p, count=1000)]
    return client.delete(*names) if names else 0


def pending_reservations(client: Any, *, key_id: int) -> int:
    """Outstanding reservations over all of a key's counters (ZCARD of `<counter>:p`)."""
    return sum(
        client.zcard(name)
        for name in client.scan_iter(match=f"gw:*:q:k:{key_id}:*:p", count=1000)
    )


class LimiterBackend:
    """A fresh Limiter on one backend ("local" or "redis"), for unit tests.

    The caller points `settings.REDIS_URL` at Redis or at nothing; the Limiter reads
    it on every call, as it does in the gateway.
    """

    def __init__(
        self, name: str, redis_url: str | None, *, renew_in_background: bool = False
    ) -> None:
        self.name = name
        self.redis_url = redis_url
        self.limiter = Limiter(renew_in_background=renew_in_background)
        self._key_ids: list[int] = []

    def key(
        self,
        quotas: Iterable[tuple[str, str, int | str | Decimal]],
        *,
        allow_unpriced: bool = False,
    ) -> KeyInfo:
        """A key with these (metric, period, limit) quotas and an id no one else uses."""
        key = unit_key(quotas, allow_unpriced=allow_unpriced)
        self._key_ids.append(key.id)
        return key

    async def close(self) -> None:
        await self.limiter.aclose()
        if self.redis_url is not None:
            client = redis.Redis.from_url(self.redis_url)
            try:
                for key_id in self._key_ids:
                    forget_counters(client, key_id=key_id)
            finally:
                client.close()


def unit_key(
    quotas: Iterable[tuple[str, str, int | str | Decimal]],
    *,
    allow_unpriced: bool = False,
) -> KeyInfo:
    """A key's snapshot with these (metric, period, limit) quotas and a random id."""
    # SystemRandom: hypothesis reseeds `random` for every example it (re)plays.
    key_id = _ids.randrange(10**12, 10**15)
    return KeyInfo(
        id=key_id,
        prefix="gw-unit",
        name=f"unit-{key_id}",
        team_id=None,
        allowed_models=(),
        ip_allowlist=(),
        expires_at=None,
        revoked=False,
        valid_until=None,
        log_bodies=False,
        allow_unpriced=allow_unpriced,
        quotas=tuple(
            QuotaInfo("key", metric, period, Decimal(limit))
            for metric, period, limit in quotas
        ),
    )


def limiter_backend(
    name: str,
    request: Any,
    settings: Any,
    monkeypatch: Any,
    *,
    renew_in_background: bool = False,
) -> LimiterBackend:
    """For a fixture: point settings at Redis ("redis": skips or fails like the
    `redis_url` fixture when it is missing) or at nothing ("local"), and stub the
    usage ledger as empty (counters are fresh; rebuilding is tested via the relay)."""
    from keys import quota_ledger

    url = request.getfixturevalue("redis_url") if name == "redis" else None
    settings.REDIS_URL = url
    monkeypatch.setattr(
        quota_ledger, "spent_many", lambda counters, now: [[] for _ in counters]
    )
    return LimiterBackend(name, url, renew_in_background=renew_in_background)


def forget_all_counters(redis_url: str | None) -> None:
    """Delete the counters of every key and team in the test database from Redis
    (monthly and total counters would otherwise stay for weeks)."""
    if not redis_url:
        return
    from keys.models import ApiKey, Team

    client = redis.Redis.from_url(redis_url)
    try:
        for key_id in ApiKey.objects.values_list("id", flat=True):
            forget_counters(client, key_id=key_id)
        for team_id in Team.objects.values_list("id", flat=True):
            forget_counters(client, team_id=team_id)
    finally:
        client.close()
