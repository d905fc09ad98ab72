"""Side-by-side relay benchmark: the gateway against direct, nginx and LiteLLM.

    .venv/bin/python bench/run.py [--duration 10] [--runs 3] [--only a,b] [--quick]

Starts the fake upstream, every selected target, drives each with wrk
(non-streaming and 20-chunk streaming, 1 and 64 connections) in interleaved runs,
measures time to first byte and memory with 500 open slow streams, prints one
table and the goals, and writes bench/out/results.json. See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import probes
import targets as tg
from procs import CPU_COUNT, LOAD_CPU, SERVER_CPU, cpu_seconds, pin_self, tree_memory
from wrk import WRK, run_wrk

OUT = tg.BENCH / "out"
MODES = (("chat", "plain"), ("stream", "stream"))
CONNS = (1, 64)

# (key, label, kind, threshold). kind: "x_nginx" / "x_litellm" are ratios of
# requests/s at 64 connections; "max" is an upper bound on a measured number.
GOALS = (
    ("chat_x_nginx", "plain req/s @64 conns >= 0.2 x nginx", "min", 0.2),
    ("chat_x_litellm", "plain req/s @64 conns >= 10 x LiteLLM", "min", 10.0),
    ("stream_x_nginx", "streams/s @64 conns >= 0.5 x nginx", "min", 0.5),
    ("stream_x_litellm", "streams/s @64 conns >= 50 x LiteLLM", "min", 50.0),
    ("added_p50_ms", "added latency p50 @1 conn (plain) <= 0.5 ms", "max", 0.5),
    ("ttfb_chat_ms", "TTFB p50 @1 conn, plain <= 1 ms", "max", 1.0),
    ("ttfb_stream_ms", "TTFB p50 @1 conn, stream <= 1 ms", "max", 1.0),
    ("rss_mib", "RSS with 500 open slow streams <= 150 MiB", "max", 150.0),
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=10.0, help="seconds per wrk run")
    p.add_argument("--runs", type=int, default=3, help="interleaved runs (median)")
    p.add_argument(
        "--only",
        default=",".join(tg.ALL_TARGETS),
        help=f"comma list of targets ({','.join(tg.ALL_TARGETS)})",
    )
    p.add_argument("--quick", action="store_true", help="2 s, 1 run: a smoke test")
    p.add_argument("--streams", type=int, default=500, help="open slow streams for RSS")
    p.add_argument("--ttfb-requests", type=int, default=200)
    p.add_argument("--out", type=Path, default=OUT / "results.json")
    args = p.parse_args(argv)
    if args.quick:
        args.duration, args.runs = 2.0, 1
    args.only = [t.strip() for t in args.only.split(",") if t.strip()]
    unknown = set(args.only) - set(tg.ALL_TARGETS)
    if unknown:
        p.error(f"unknown targets: {', '.join(sorted(unknown))}")
    args.only = [t for t in tg.ALL_TARGETS if t in args.only]  # canonical order
    return args


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --- starting ------------------------------------------------------------------------


def start_targets(names, upstream, upstream_port, work, log_dir):
    """The targets that started and relay correctly, and the gateway's setup."""
    started: dict[str, tg.Target] = {}
    setup = None
    for name in names:
        try:
            if name == "direct":
                target = tg.direct(upstream, upstream_port)
            elif name == "nginx":
                target = tg.nginx(upstream_port, work, log_dir)
            elif name == "litellm":
                target = tg.litellm(upstream_port, work, log_dir)
            else:
                if setup is None:
                    log("gateway: database, migrations, config, key with two quotas")
                    setup = tg.setup_gateway(upstream_port, work)
                target = tg.gateway(name, setup, log_dir)
        except tg.Unavailable as exc:
            log(f"{name}: skipped: {exc}")
            continue
        except Exception as exc:  # noqa: BLE001 (one broken target must not stop the rest)
            log(f"{name}: failed to start: {exc}")
            continue
        problems = []
        for kind in ("chat", "stream"):
            result = probes.check(
                target.port,
                tg.PATH,
                target.body(kind),
                target.token,
                stream=kind != "chat",
            )
            if not result.ok:
                problems.append(f"{kind}: {result.detail}")
        if problems:
            log(f"{name}: does not relay correctly, skipped: {'; '.join(problems)}")
            if target.proc is not upstream:
                target.stop()
            continue
        log(
            f"{name}: up on port {target.port} (pid {target.proc.pid}) {target.version}"
        )
        started[name] = target
    return started, setup


# --- measuring -----------------------------------------------------------------------


def measure_load(target: tg.Target, upstream, kind: str, conns: int, duration: float):
    cpu0, up0 = cpu_seconds(target.proc.pid), cpu_seconds(upstream.pid)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = run_wrk(
        target.url,
        target.body(kind),
        target.token,
        connections=conns,
        duration=duration,
    )
    row = result.to_dict()
    wall = result.duration_s or duration
    row["server_cpu"] = (cpu_seconds(target.proc.pid) - cpu0) / wall
    row["upstream_cpu"] = (cpu_seconds(upstream.pid) - up0) / wall
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    row["wrk_cpu"] = (
        after.ru_utime + after.ru_stime - kids.ru_utime - kids.ru_stime
    ) / wall
    # CPU the server spent per completed response: steadier than req/s when other
    # work steals the core.
    row["server_cpu_ms_per_req"] = (
        row["server_cpu"] * 1000 / row["rps"] if row["rps"] else None
    )
    return row


def warm_up(target: tg.Target, seconds: float) -> None:
    for kind in ("chat", "stream"):
        run_wrk(
            target.url,
            target.body(kind),
            target.token,
            connections=16,
            duration=seconds,
        )


def measure_memory(target: tg.Target, count: int) -> dict:
    before = tree_memory(target.proc.pid)
    result = probes.open_streams(
        target.port,
        tg.PATH,
        target.body("slow"),
        target.token,
        count=count,
        timeout=60.0,
        measure=lambda: tree_memory(target.proc.pid),
    )
    result["idle_rss_mib"] = before["rss_mib"]
    return result


# --- summarising ---------------------------------------------------------------------


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarise(raw: dict, ttfb: dict, memory: dict) -> dict:
    summary: dict = {}
    for name, cells in raw.items():
        s = summary.setdefault(name, {})
        for (kind, conns), runs in cells.items():
            s[f"{kind}@{conns}"] = {
                key: median([r[key] for r in runs])
                for key in (
                    "rps",
                    "p50_ms",
                    "p90_ms",
                    "p99_ms",
                    "server_cpu",
                    "server_cpu_ms_per_req",
                    "upstream_cpu",
                    "wrk_cpu",
                )
            } | {"errors": sum(r["error_count"] for r in runs), "runs": len(runs)}
        for kind in ("chat", "stream"):
            samples = ttfb.get(name, {}).get(kind, [])
            s[f"ttfb_{kind}_ms"] = median([x.get("ttfb_p50_ms") for x in samples])
        s["memory"] = memory.get(name)
    direct = summary.get("direct")
    for s in summary.values():
        for kind, _ in MODES:
            for conns in CONNS:
                cell = s[f"{kind}@{conns}"]
                for base in ("nginx", "litellm"):
                    other = summary.get(base, {}).get(f"{kind}@{conns}")
                    cell[f"x_{base}"] = (
                        cell["rps"] / other["rps"] if other and other["rps"] else None
                    )
                cell["added_p50_ms"] = (
                    cell["p50_ms"] - direct[f"{kind}@{conns}"]["p50_ms"]
                    if direct and conns == 1
                    else None
                )
    return summary


def evaluate_goals(summary: dict) -> dict:
    goals: dict = {}
    for name in summary:
        if not name.startswith("gateway"):
            continue
        s = summary[name]
        values = {
            "chat_x_nginx": s["chat@64"]["x_nginx"],
            "chat_x_litellm": s["chat@64"]["x_litellm"],
            "stream_x_nginx": s["stream@64"]["x_nginx"],
            "stream_x_litellm": s["stream@64"]["x_litellm"],
            "added_p50_ms": s["chat@1"]["added_p50_ms"],
            "ttfb_chat_ms": s["ttfb_chat_ms"],
            "ttfb_stream_ms": s["ttfb_stream_ms"],
            "rss_mib": (s["memory"] or {}).get("rss_mib"),
        }
        out = {}
        for key, label, kind, threshold in GOALS:
            value = values[key]
            if key == "rss_mib" and s["memory"] and s["memory"]["open"] == 0:
                value = None
            if value is None:
                verdict = "n/a"
            elif kind == "min":
                verdict = "PASS" if value >= threshold else "FAIL"
            else:
                verdict = "PASS" if value <= threshold else "FAIL"
            out[key] = {
                "label": label,
                "value": value,
                "goal": threshold,
                "verdict": verdict,
            }
        goals[name] = out
    return goals


# --- printing ------------------------------------------------------------------------


def fmt(value, spec: str = ".2f", suffix: str = "") -> str:
    if value is None:
        return "-"
    return f"{value:{spec}}{suffix}"


def render_table(headers: list[str], rows: list[list[str]], right_from: int) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells):
        return "  ".join(
            c.rjust(w) if i >= right_from else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), sep, *(line(r) for r in rows)])


def main_table(summary: dict, streams: int) -> str:
    headers = [
        "target",
        "mode",
        "conns",
        "req/s",
        "x nginx",
        "x LiteLLM",
        "p50 ms",
        "p99 ms",
        "+p50 ms",
        "TTFB p50 ms",
        f"RSS {streams} MiB",
        "srv CPU",
        "CPU ms/req",
        "up CPU",
        "errors",
    ]
    rows = []
    for name, s in summary.items():
        first = True
        for kind, label in MODES:
            for conns in CONNS:
                c = s[f"{kind}@{conns}"]
                mem = s["memory"]
                rss = ""
                if first:
                    if mem and mem["open"]:
                        rss = fmt(mem["rss_mib"], ".1f")
                        if mem["open"] < mem.get("wanted", mem["open"]):
                            rss += f" ({mem['open']} open)"
                    else:
                        rss = "-"
                rows.append(
                    [
                        name if first else "",
                        label,
                        str(conns),
                        fmt(c["rps"], ".0f"),
                        fmt(c["x_nginx"], ".3f"),
                        fmt(c["x_litellm"], ".2f"),
                        fmt(c["p50_ms"], ".2f"),
                        fmt(c["p99_ms"], ".2f"),
                        fmt(c["added_p50_ms"], "+.2f") if conns == 1 else "",
                        fmt(s[f"ttfb_{kind}_ms"], ".2f") if conns == 1 else "",
                        rss,
                        fmt(c["server_cpu"] * 100, ".0f", "%"),
                        fmt(c["server_cpu_ms_per_req"], ".3f"),
                        fmt(c["upstream_cpu"] * 100, ".0f", "%"),
                        str(c["errors"]),
                    ]
                )
                first = False
    return render_table(headers, rows, right_from=2)


def goals_table(goals: dict) -> str:
    if not goals:
        return "(no gateway target measured: no goals to check)"
    names = list(goals)
    headers = ["goal", *names]
    rows = []
    for key, label, _kind, _ in GOALS:
        row = [label]
        for name in names:
            g = goals[name][key]
            if g["value"] is None:
                row.append("n/a")
            else:
                spec = ".3f" if key.endswith(("nginx", "litellm")) else ".2f"
                unit = "x" if key.startswith(("chat_x", "stream_x")) else ""
                row.append(f"{g['value']:{spec}}{unit} {g['verdict']}")
        rows.append(row)
    return render_table(headers, rows, right_from=1)


# --- environment ---------------------------------------------------------------------


def versions(started: dict[str, tg.Target]) -> dict:
    wrk_v = subprocess.run([WRK, "-v"], capture_output=True, text=True)
    return {
        "python": platform.python_version(),
        "wrk": (wrk_v.stdout or wrk_v.stderr).split("\n")[0].strip(),
        **{name: t.version for name, t in started.items() if t.version},
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not shutil.which(WRK) and not Path(WRK).exists():
        print("wrk is not installed (apt-get install -y wrk)", file=sys.stderr)
        return 2
    pin_self(LOAD_CPU)  # this process's probes count as load; children inherit
    OUT.mkdir(parents=True, exist_ok=True)
    log_dir = OUT / "logs"
    work = Path(tempfile.mkdtemp(prefix="gateway-bench-"))
    log(
        f"{len(args.only)} targets, {args.runs} run(s) x {args.duration:g}s, "
        f"server on CPU {SERVER_CPU}, load on CPU {LOAD_CPU} ({CPU_COUNT} CPUs); "
        f"logs in {log_dir.relative_to(tg.ROOT)}"
    )
    upstream = None
    started: dict[str, tg.Target] = {}
    try:
        upstream, upstream_port = tg.start_upstream(log_dir)
        log(f"fake upstream on port {upstream_port} (pid {upstream.pid})")
        started, setup = start_targets(
            args.only, upstream, upstream_port, work, log_dir
        )
        if not started:
            log("no target could be started")
            return 1
        warm = min(1.0, args.duration / 2)
        for target in started.values():
            warm_up(target, warm)

        raw: dict = {name: {} for name in started}
        ttfb: dict = {name: {} for name in started}
        for run in range(1, args.runs + 1):
            for name, target in started.items():
                for kind, label in MODES:
                    for conns in CONNS:
                        row = measure_load(target, upstream, kind, conns, args.duration)
                        row["run"] = run
                        raw[name].setdefault((kind, conns), []).append(row)
                        log(
                            f"run {run} {name:16} {label:6} c={conns:<3} "
                            f"{row['rps']:9.0f} req/s  p50 {row['p50_ms']:7.2f} ms  "
                            f"p99 {row['p99_ms']:8.2f} ms  errors {row['error_count']}"
                        )
                        time.sleep(0.3)
                for kind, _ in MODES:
                    t = probes.ttfb(
                        target.port,
                        tg.PATH,
                        target.body(kind),
                        target.token,
                        count=args.ttfb_requests,
                    )
                    ttfb[name].setdefault(kind, []).append(t)
                log(
                    f"run {run} {name:16} TTFB p50 plain "
                    f"{fmt(ttfb[name]['chat'][-1].get('ttfb_p50_ms'))} ms, stream "
                    f"{fmt(ttfb[name]['stream'][-1].get('ttfb_p50_ms'))} ms"
                )
                time.sleep(0.5)

        memory: dict = {}
        for name, target in started.items():
            try:
                m = measure_memory(target, args.streams)
            except Exception as exc:  # noqa: BLE001
                log(f"{name}: open streams failed: {exc}")
                continue
            m["wanted"] = args.streams
            memory[name] = m
            log(
                f"{name:16} {m['open']}/{args.streams} streams open "
                f"(opened in {m['open_s']:.1f}s; {m['failed']} failed, "
                f"{m['non_200']} refused): RSS {m['rss_mib']:.1f} MiB "
                f"(PSS {m['pss_mib']:.1f}, {m['processes']} processes; "
                f"idle RSS {m['idle_rss_mib']:.1f})"
            )
            time.sleep(1.0)

        gateway_state = None
        if setup is not None:
            time.sleep(1.0)  # the usage writer flushes every 0.2 s
            gateway_state = {
                "key": setup.key_name,
                "database_url": setup.database_url,
                "redis_url": setup.redis_url,
                "usage_rows": setup.usage_rows(),
                "redis_keys": setup.redis_keys(),
            }
        summary = summarise(raw, ttfb, memory)
        goals = evaluate_goals(summary)
        header = (
            f"Relay benchmark: median of {args.runs} interleaved run(s) x "
            f"{args.duration:g}s; wrk -t1; server on CPU {SERVER_CPU}, wrk + upstream "
            f"on CPU {LOAD_CPU}. plain = non-streaming, stream = 20 SSE chunks; "
            "req/s = completed responses (streams) per second."
        )
        print()
        print(header)
        print(main_table(summary, args.streams))
        print()
        print("Goals")
        print(goals_table(goals))
        if gateway_state is not None:
            keys = gateway_state["redis_keys"]
            print(
                f"\nGateway key {gateway_state['key']} (rpm + tpm quotas): "
                f"{fmt(gateway_state['usage_rows'], 'd')} usage rows in PostgreSQL; "
                f"Redis keys: {', '.join(keys) if keys else keys}"
            )
        results = {
            "meta": {
                "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "duration_s": args.duration,
                "runs": args.runs,
                "cpus": CPU_COUNT,
                "server_cpu": SERVER_CPU,
                "load_cpu": LOAD_CPU,
                "streams": args.streams,
                "ttfb_requests": args.ttfb_requests,
                "targets": list(started),
                "versions": versions(started),
            },
            "summary": summary,
            "goals": goals,
            "gateway": gateway_state,
            "raw": {
                name: {f"{k}@{c}": runs for (k, c), runs in cells.items()}
                for name, cells in raw.items()
            },
            "ttfb": ttfb,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2, default=str))
        print(f"\nWritten: {args.out}")
        return 0
    finally:
        for name, target in started.items():
            if name != "direct":
                target.stop()
        if upstream is not None:
            upstream.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
