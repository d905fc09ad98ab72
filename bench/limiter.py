"""What the quota limiter costs per request, and how many Redis round trips.

    .venv/bin/python bench/limiter.py                       # private redis-server
    .venv/bin/python bench/limiter.py --requests 20000 --concurrency 1,10,100
    .venv/bin/python bench/limiter.py --redis-url redis://127.0.0.1:6379/2

A key with two quotas (requests and tokens per minute, sized never to refuse) is
reserved and settled N times through `keys.limiter.Limiter`, exactly as the relay
does for each request: once on the in-process backend, then on Redis. For Redis it
counts the commands the server executed, from `INFO commandstats` deltas taken
around the reservations alone and around the settlements alone, so the output
shows how many EVALSHA (one script call = one round trip) each reservation cost.
Sequentially that is exactly one; with concurrent requests the limiter batches the
reservations of one event-loop iteration into one call, so it drops below one.

Renewal is not on that path: a background task renews every reservation in flight
once per half TTL (60 s for the 120 s TTL here), in one call. The benchmark times
one such renewal of all N reservations it holds between reserving and settling
("renew ms", and its commands), so its cost per request is that divided by the
requests served in half a TTL.

By default a private `redis-server` (free port, no persistence) is started, so the
command counts are not mixed with other clients' (INFO commandstats is
server-wide). Counters are fresh, so the usage ledger is not read (it is stubbed
out): this measures the limiter, not the database.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def private_redis() -> Iterator[str]:
    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit("redis-server not found: install it or pass --redis-url")
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="bench-limiter-redis-")
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
    argv += ["--appendonly", "no", "--dir", workdir]
    process = subprocess.Popen(
        argv, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
    )
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        process.wait(timeout=10)
        shutil.rmtree(workdir, ignore_errors=True)


def setup_django(redis_url: str) -> None:
    os.environ["DJANGO_SETTINGS_MODULE"] = "gateway_project.settings"
    os.environ["REDIS_URL"] = redis_url
    import django

    django.setup()
    from keys import quota_ledger

    # Fresh counters: nothing to rebuild, and no database needed.
    quota_ledger.spent_many = lambda counters, now: [[] for _ in counters]


def make_key() -> Any:
    from keys.selectors import KeyInfo, QuotaInfo

    return KeyInfo(
        id=int(time.time() * 1000),
        prefix="bench",
        name="bench",
        team_id=None,
        allowed_models=(),
        ip_allowlist=(),
        expires_at=None,
        revoked=False,
        valid_until=None,
        log_bodies=False,
        allow_unpriced=False,
        quotas=(
            QuotaInfo("key", "requests", "minute", Decimal(10**9)),
            QuotaInfo("key", "tokens", "minute", Decimal(10**12)),
        ),
    )


def command_counts(client: Any) -> dict[str, int]:
    return {
        name.removeprefix("cmdstat_"): int(stats["calls"])
        for name, stats in client.info("commandstats").items()
    }


def delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    changed = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    changed["info"] = changed.get("info", 0) - 1  # the INFO that read `after`
    return {k: v for k, v in changed.items() if v}


async def run(
    backend: str, requests: int, concurrency: int, redis_url: str
) -> dict[str, Any]:
    from django.conf import settings

    from keys.limiter import Limiter
    from keys.quotas import Demand, counters_for

    settings.REDIS_URL = redis_url if backend == "redis" else None
    limiter = Limiter()
    key = make_key()
    demand, actual = Demand(requests=1, tokens=600), Demand(requests=1, tokens=180)
    per_worker = requests // concurrency

    async def reserve_all() -> list[Any]:
        now = datetime.now(UTC)
        counters = counters_for(key, now)
        return [
            await limiter.reserve(counters, demand, now, 120_000)
            for _ in range(per_worker)
        ]

    async def settle_all(reservations: list[Any]) -> None:
        now = datetime.now(UTC)
        for reservation in reservations:
            await limiter.settle(reservation, actual, now)

    async def pairs() -> list[float]:
        times = []
        for _ in range(per_worker):
            start = time.perf_counter()
            now = datetime.now(UTC)
            reservation = await limiter.reserve(
                counters_for(key, now), demand, now, 120_000
            )
            await limiter.settle(reservation, actual, now)
            times.append(time.perf_counter() - start)
        return times

    await settle_all(await reserve_all())  # warm-up: script load, connections, counters

    import redis

    client = redis.Redis.from_url(redis_url)
    before = command_counts(client)
    start = time.perf_counter()
    held = await asyncio.gather(*(reserve_all() for _ in range(concurrency)))
    reserve_s = time.perf_counter() - start
    middle = command_counts(client)
    start = time.perf_counter()
    await limiter.renew(datetime.now(UTC))  # what the background task does
    renew_s = time.perf_counter() - start
    renewed = command_counts(client)
    start = time.perf_counter()
    await asyncio.gather(*(settle_all(r) for r in held))
    settle_s = time.perf_counter() - start
    after = command_counts(client)

    start = time.perf_counter()
    latencies = [
        t
        for ts in await asyncio.gather(*(pairs() for _ in range(concurrency)))
        for t in ts
    ]
    pairs_s = time.perf_counter() - start
    client.close()
    await limiter.aclose()

    n = per_worker * concurrency
    reserves, settles = delta(before, middle), delta(renewed, after)
    return {
        "backend": backend,
        "concurrency": concurrency,
        "requests": n,
        "us_per_request": pairs_s / n * 1e6,
        "us_reserve": reserve_s / n * 1e6,
        "us_settle": settle_s / n * 1e6,
        "ms_renew": renew_s * 1e3,
        "renew_commands": delta(middle, renewed),
        "p50_pair_us": statistics.median(latencies) * 1e6,
        "p99_pair_us": statistics.quantiles(latencies, n=100)[98] * 1e6,
        "reserve_commands": reserves,
        "settle_commands": settles,
        "evalsha_per_reserve": reserves.get("evalsha", 0) / n,
        "evalsha_per_settle": settles.get("evalsha", 0) / n,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--concurrency", default="1,50", help="comma list")
    parser.add_argument(
        "--redis-url", help="an existing Redis (default: a private one)"
    )
    options = parser.parse_args()
    levels = [int(c) for c in options.concurrency.split(",")]

    with (
        private_redis()
        if options.redis_url is None
        else _given(options.redis_url) as url
    ):
        setup_django(url)
        print(
            f"limiter benchmark: {options.requests} requests, 2 quotas, Redis at {url}"
        )
        print(
            f"{'backend':8} {'conc':>4} {'µs/req':>8} {'µs res':>7} {'µs set':>7} "
            f"{'renew ms':>8} {'p50':>7} {'p99':>7} {'EVALSHA/res':>11} {'EVALSHA/set':>11}"
            "  commands (reserve | renew all held | settle)"
        )
        for backend in ("local", "redis"):
            for level in levels:
                r = asyncio.run(run(backend, options.requests, level, url))
                commands = ""
                if backend == "redis":
                    commands = (
                        f"{r['reserve_commands']} | {r['renew_commands']} | "
                        f"{r['settle_commands']}"
                    )
                print(
                    f"{backend:8} {level:>4} {r['us_per_request']:>8.1f} {r['us_reserve']:>7.1f} "
                    f"{r['us_settle']:>7.1f} {r['ms_renew']:>8.2f} "
                    f"{r['p50_pair_us']:>7.1f} {r['p99_pair_us']:>7.1f} "
                    f"{r['evalsha_per_reserve'] if backend == 'redis' else 0:>11.3f} "
                    f"{r['evalsha_per_settle'] if backend == 'redis' else 0:>11.3f}  {commands}"
                )


@contextmanager
def _given(url: str) -> Iterator[str]:
    print("note: INFO commandstats is server-wide; other clients' commands add up")
    yield url


if __name__ == "__main__":
    main()
