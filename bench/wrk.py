"""Run wrk with the POST script and parse its JSON summary."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

from procs import LOAD_CPU, pinned

LUA = Path(__file__).resolve().parent / "lua" / "post.lua"
WRK = shutil.which("wrk") or "/usr/bin/wrk"


@dataclass
class WrkResult:
    requests: int
    duration_s: float
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    errors: dict[str, int]
    error_count: int

    def to_dict(self) -> dict:
        return asdict(self)


def run_wrk(
    url: str,
    body: bytes,
    token: str,
    *,
    connections: int,
    duration: float,
    timeout_s: float = 10.0,
) -> WrkResult:
    env = dict(os.environ, BENCH_BODY=body.decode(), BENCH_TOKEN=token)
    cmd = pinned(
        [
            WRK,
            "-t1",
            f"-c{connections}",
            f"-d{duration:g}s",
            f"--timeout={timeout_s:g}s",
            "-s",
            str(LUA),
            url,
        ],
        LOAD_CPU,
    )
    proc = subprocess.run(
        cmd, env=env, capture_output=True, text=True, timeout=duration + 60
    )
    line = next(
        (x for x in proc.stdout.splitlines() if x.startswith("BENCH_JSON ")), None
    )
    if proc.returncode != 0 or line is None:
        raise RuntimeError(
            f"wrk failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}"
        )
    data = json.loads(line.removeprefix("BENCH_JSON "))
    lat = data["latency_us"]
    duration_s = data["duration_us"] / 1e6
    errors = data["errors"]
    # wrk counts a request that timed out or failed its read in neither
    # `requests` nor latency; non-2xx responses are in `requests`.
    ok = max(0, data["requests"] - errors["status"])
    return WrkResult(
        requests=data["requests"],
        duration_s=duration_s,
        rps=ok / duration_s if duration_s else 0.0,
        p50_ms=lat["p50"] / 1000,
        p90_ms=lat["p90"] / 1000,
        p99_ms=lat["p99"] / 1000,
        mean_ms=lat["mean"] / 1000,
        errors=errors,
        error_count=sum(errors.values()),
    )
