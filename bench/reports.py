"""Reports benchmark: a year of synthetic usage, the rollup time, and how fast
/reports/ and reports/daily/ answer from rollups.

    .venv/bin/python bench/reports.py                 # 500 keys x 20 models x 365 days
    .venv/bin/python bench/reports.py --keys 50 --days 60 --requests 2   # a quick look

It (re)creates the PostgreSQL database `gateway_bench_reports` (override with
BENCH_REPORTS_DATABASE_URL), migrates it, runs `seedusage` and `rollup --since`,
proves `reconcile` on last month, then starts the gateway on uvicorn (pinned to
core 0, as bench/run.py does) and times GET requests as a finance user. Not a
test: it prints numbers, and PASS/FAIL against the goal of answering in well
under a second.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlencode, urlparse

import httpx
import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent))
from procs import SERVER_CPU, Proc, free_port  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PYTHON = str(ROOT / ".venv" / "bin" / "python")
GOAL_S = 1.0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=500)
    parser.add_argument("--models", type=int, default=20)
    parser.add_argument("--teams", type=int, default=20)
    parser.add_argument("--days", type=int, default=365)
    parser.add_argument(
        "--requests", type=float, default=4, help="mean requests per key per day"
    )
    parser.add_argument("--repeat", type=int, default=5, help="timed requests per case")
    parser.add_argument(
        "--reuse", action="store_true", help="keep the database and its data if present"
    )
    return parser.parse_args()


def run(argv: list[str], env: dict[str, str]) -> tuple[str, float]:
    started = time.monotonic()
    result = subprocess.run(
        argv, cwd=ROOT, env=env, capture_output=True, text=True, check=False
    )
    elapsed = time.monotonic() - started
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{result.stdout}\n{result.stderr}")
    lines = [line for line in result.stdout.splitlines() if not line.startswith("{")]
    return "\n".join(lines), elapsed


def fresh_database(url: str, reuse: bool) -> bool:
    """Create the database; True when it already held data to reuse."""
    parsed = urlparse(url)
    name = parsed.path.lstrip("/")
    admin = parsed._replace(path="/postgres").geturl()
    with psycopg.connect(admin, autocommit=True) as conn:
        exists = conn.execute(
            "SELECT 1 FROM pg_database WHERE datname = %s", [name]
        ).fetchone()
        if exists and reuse:
            return True
        if exists:
            conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    return False


def session_for_finance(env: dict[str, str]) -> str:
    code = (
        "from django.contrib.auth.models import Group, User\n"
        "from django.contrib.sessions.backends.db import SessionStore\n"
        "from keys.roles import FINANCE_GROUP\n"
        "user, _ = User.objects.get_or_create(username='bench-finance')\n"
        "user.groups.add(Group.objects.get_or_create(name=FINANCE_GROUP)[0])\n"
        "s = SessionStore()\n"
        "s['_auth_user_id'] = str(user.pk)\n"
        "s['_auth_user_backend'] = 'django.contrib.auth.backends.ModelBackend'\n"
        "s['_auth_user_hash'] = user.get_session_auth_hash()\n"
        "s.create()\n"
        "print(s.session_key)\n"
    )
    out, _ = run([PYTHON, "manage.py", "shell", "-c", code], env)
    return out.strip().splitlines()[-1]


def timed(client: httpx.Client, path: str, params: dict[str, str], repeat: int):
    url = f"{path}?{urlencode(params)}" if params else path
    response = client.get(url)  # warm-up (and the freshness check's first rebuild)
    response.raise_for_status()
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        response = client.get(url)
        _ = response.content
        times.append(time.perf_counter() - started)
        response.raise_for_status()
    return statistics.median(times), max(times), len(response.content)


def main() -> int:
    args = parse_args()
    url = os.environ.get(
        "BENCH_REPORTS_DATABASE_URL",
        "postgres://postgres@127.0.0.1:5432/gateway_bench_reports",
    )
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("GATEWAY_", "DJANGO_", "CELERY_"))
        and k not in {"DATABASE_URL", "REDIS_URL"}
    }
    env["DATABASE_URL"] = url
    today = datetime.now(UTC).date()  # seedusage ends today in the billing zone (UTC)
    first = today - timedelta(days=args.days - 1)
    print(f"database {url}; {os.cpu_count()} cores")

    reused = fresh_database(url, args.reuse)
    run([PYTHON, "manage.py", "migrate", "--noinput", "-v", "0"], env)
    if not reused:
        out, elapsed = run(
            [PYTHON, "manage.py", "seedusage", f"--keys={args.keys}",
             f"--models={args.models}", f"--teams={args.teams}",
             f"--days={args.days}", f"--requests={args.requests}"],
            env,
        )  # fmt: skip
        print(out.splitlines()[-1])
        print(f"seed: {elapsed:.1f}s")
    out, elapsed = run(
        [PYTHON, "manage.py", "rollup", "--since", first.isoformat(), "--no-progress"],
        env,
    )
    print(out.splitlines()[-1])
    print(f"ROLLUP of {args.days} days: {elapsed:.1f}s wall")

    last_month_end = today.replace(day=1) - timedelta(days=1)
    last_month = last_month_end.replace(day=1)
    out, elapsed = run(
        [PYTHON, "manage.py", "reconcile", "--month", last_month.strftime("%Y-%m")],
        env,
    )
    print(f"reconcile {last_month:%Y-%m}: {out.splitlines()[-1]} ({elapsed:.1f}s)")

    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT count(*) FROM usage_usagerow").fetchone()[0]
        rollups = conn.execute("SELECT count(*) FROM usage_dailyrollup").fetchone()[0]
        team, model = conn.execute(
            "SELECT team_id, model FROM usage_dailyrollup WHERE day >= %s "
            "ORDER BY cost_usd DESC LIMIT 1",
            [last_month],
        ).fetchone()
    print(f"{rows} usage rows, {rollups} rollup rows")

    session = session_for_finance(env)
    port = free_port()
    server_env = {
        **env,
        "GATEWAY_USAGE_SPOOL_DIR": str(ROOT / "bench" / "out" / "spool"),
    }
    gateway = Proc(
        "gateway-reports",
        [PYTHON, "-m", "uvicorn", "gateway_project.asgi:application",
         "--host", "127.0.0.1", "--port", str(port), "--no-access-log", "--no-proxy-headers"],
        cpu=SERVER_CPU, env=server_env, cwd=ROOT, log_dir=ROOT / "bench" / "out" / "logs",
    )  # fmt: skip
    gateway.wait_port(port, 30)
    month = {"since": last_month.isoformat(), "until": last_month_end.isoformat()}
    year = {"since": first.isoformat(), "until": today.isoformat()}
    cases = [
        ("page: this month (default)", "/reports/", {}),
        ("page: team X, model Y, last month", "/reports/", {**month, "team": str(team), "model": model}),
        ("page: last month", "/reports/", month),
        ("page: the whole year", "/reports/", year),
        ("page: the year by model", "/reports/", {**year, "group": "model"}),
        ("api: reports/daily/ last month", "/api/v1/reports/daily/", month),
        ("csv: last month, every line", "/reports/export.csv", month),
    ]  # fmt: skip
    failures = 0
    try:
        with httpx.Client(
            base_url=f"http://127.0.0.1:{port}",
            cookies={"sessionid": session},
            timeout=120,
        ) as client:
            print(f"\n{'case':<36} {'median':>9} {'max':>9} {'bytes':>10}  goal")
            for name, path, params in cases:
                median, worst, size = timed(client, path, params, args.repeat)
                ok = median < GOAL_S or path.endswith(".csv")
                failures += not ok
                verdict = "" if path.endswith(".csv") else ("PASS" if ok else "FAIL")
                print(
                    f"{name:<36} {median * 1000:>7.0f}ms {worst * 1000:>7.0f}ms "
                    f"{size:>10}  {verdict}"
                )
    finally:
        gateway.stop()
    print(f"\ngoal: the page answers in under {GOAL_S:.0f} s (median of {args.repeat})")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
