"""The servers the benchmark drives: how to set each up, start it and call it.

Every target serves ``POST /v1/chat/completions`` on 127.0.0.1 and relays to the
same fake upstream (or is it, for ``direct``). Three models per target: ``chat``
(a plain answer), ``stream`` (20 SSE content chunks, no delay) and ``slow``
(60 chunks, one a second: for holding many streams open; a minute is long
enough for even the slowest target to have all 500 open at once).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from procs import LOAD_CPU, SERVER_CPU, Proc, free_port

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
VENV_BIN = ROOT / ".venv" / "bin"
PYTHON = str(VENV_BIN / "python") if (VENV_BIN / "python").exists() else sys.executable
LITELLM_VENV = BENCH / ".venvs" / "litellm"
LITELLM_VERSION = "1.80.0"

PATH = "/v1/chat/completions"
UPSTREAM_MODELS = {
    "chat": "fake-gpt",
    "stream": "fake-gpt;chunks=20",
    "slow": "fake-gpt;chunks=60;delay_ms=1000",
}
PUBLIC_MODELS = {"chat": "bench-chat", "stream": "bench-stream", "slow": "bench-slow"}

ALL_TARGETS = (
    "direct",
    "nginx",
    "litellm",
    "gateway",
    "gateway-daphne",
    "gateway-granian",
)
GATEWAY_SERVERS = {
    "gateway": "uvicorn",
    "gateway-daphne": "daphne",
    "gateway-granian": "granian",
}


class Unavailable(Exception):
    """A target that cannot run here (missing binary); the others go on."""


@dataclass
class Target:
    name: str
    port: int
    token: str
    models: dict[str, str]
    proc: Proc  # the server under test: its tree is what RSS measures
    extra: list[Proc] = field(default_factory=list)
    version: str = ""

    def body(self, kind: str) -> bytes:
        payload = {
            "model": self.models[kind],
            "messages": [{"role": "user", "content": "Say hello to the benchmark."}],
        }
        if kind != "chat":
            payload["stream"] = True
        return json.dumps(payload, separators=(",", ":")).encode()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{PATH}"

    def stop(self) -> None:
        for proc in (self.proc, *self.extra):
            proc.stop()


def _run(cmd: list[str], env: dict[str, str] | None = None, **kw) -> str:
    proc = subprocess.run(
        cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600, **kw
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        )
    return proc.stdout


# --- the fake upstream and direct ----------------------------------------------------


def start_upstream(log_dir: Path) -> tuple[Proc, int]:
    port = free_port()
    proc = Proc(
        "upstream",
        [
            PYTHON,
            "-m",
            "relay.fake_upstream",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        cpu=LOAD_CPU,
        cwd=ROOT,
        log_dir=log_dir,
    )
    proc.wait_port(port, 30)
    return proc, port


def direct(upstream: Proc, upstream_port: int) -> Target:
    return Target("direct", upstream_port, "x", dict(UPSTREAM_MODELS), upstream)


# --- nginx ---------------------------------------------------------------------------

NGINX_CONF = """\
daemon off;
worker_processes 1;
worker_rlimit_nofile 20000;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    upstream fake {{
        server 127.0.0.1:{upstream};
        keepalive 64;
        keepalive_requests 1000000;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        keepalive_requests 1000000;
        location / {{
            proxy_pass http://fake;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_read_timeout 120s;
        }}
    }}
}}
"""


def nginx(upstream_port: int, work: Path, log_dir: Path) -> Target:
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    if not os.path.exists(binary):
        raise Unavailable("nginx is not installed (apt-get install -y nginx)")
    conf_dir = work / "nginx"
    conf_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    conf = conf_dir / "nginx.conf"
    conf.write_text(NGINX_CONF.format(dir=conf_dir, upstream=upstream_port, port=port))
    version = subprocess.run([binary, "-v"], capture_output=True, text=True).stderr
    proc = Proc(
        "nginx",
        [
            binary,
            "-c",
            str(conf),
            "-p",
            str(conf_dir),
            "-e",
            str(conf_dir / "error.log"),
        ],
        cpu=SERVER_CPU,
        log_dir=log_dir,
    )
    proc.wait_port(port, 15)
    return Target(
        "nginx",
        port,
        "x",
        dict(UPSTREAM_MODELS),
        proc,
        version=version.strip().split("/")[-1],
    )


# --- LiteLLM -------------------------------------------------------------------------

LITELLM_MASTER_KEY = "sk-bench-master"
# uvicorn's access logger without handlers: its log lines are skipped entirely.
LITELLM_LOG_CONFIG = {
    "version": 1,
    "disable_existing_loggers": False,
    "loggers": {
        "uvicorn.access": {"level": "WARNING", "handlers": [], "propagate": False},
        "uvicorn.error": {"level": "WARNING"},
    },
}


def ensure_litellm() -> Path:
    """The LiteLLM proxy's own virtualenv, created on first use."""
    binary = LITELLM_VENV / "bin" / "litellm"
    if binary.exists():
        return binary
    print(
        f"Creating {LITELLM_VENV.relative_to(ROOT)} with litellm[proxy]=="
        f"{LITELLM_VERSION} (once; a minute or two)...",
        flush=True,
    )
    base = shutil.which("python3.11") or shutil.which("python3") or "python3"
    _run([base, "-m", "venv", str(LITELLM_VENV)])
    _run(
        [
            str(LITELLM_VENV / "bin" / "pip"),
            "install",
            "-q",
            f"litellm[proxy]=={LITELLM_VERSION}",
        ]
    )
    return binary


def litellm(upstream_port: int, work: Path, log_dir: Path) -> Target:
    binary = ensure_litellm()
    conf_dir = work / "litellm"
    conf_dir.mkdir(parents=True, exist_ok=True)
    api_base = f"http://127.0.0.1:{upstream_port}/v1"
    config = {
        "model_list": [
            {
                "model_name": PUBLIC_MODELS[kind],
                "litellm_params": {
                    "model": f"openai/{UPSTREAM_MODELS[kind]}",
                    "api_base": api_base,
                    "api_key": "x",
                },
            }
            for kind in ("chat", "stream", "slow")
        ],
        "litellm_settings": {"set_verbose": False, "telemetry": False},
        "general_settings": {"master_key": LITELLM_MASTER_KEY},
    }
    # JSON is YAML: no YAML writer needed.
    (conf_dir / "config.yaml").write_text(json.dumps(config, indent=2))
    (conf_dir / "log.json").write_text(json.dumps(LITELLM_LOG_CONFIG))
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in {"DATABASE_URL", "REDIS_URL", "REDIS_HOST", "VIRTUAL_ENV"}
    }
    env.update(
        LITELLM_LOCAL_MODEL_COST_MAP="True",
        LITELLM_MASTER_KEY=LITELLM_MASTER_KEY,
        LITELLM_LOG="ERROR",
        PATH=f"{LITELLM_VENV / 'bin'}:{env.get('PATH', '')}",
    )
    port = free_port()
    proc = Proc(
        "litellm",
        [
            str(binary),
            "--config",
            str(conf_dir / "config.yaml"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--num_workers",
            "1",
            "--telemetry",
            "False",
            "--log_config",
            str(conf_dir / "log.json"),
        ],
        cpu=SERVER_CPU,
        env=env,
        cwd=conf_dir,
        log_dir=log_dir,
    )
    proc.wait_port(port, 120)
    return Target(
        "litellm",
        port,
        LITELLM_MASTER_KEY,
        dict(PUBLIC_MODELS),
        proc,
        version=LITELLM_VERSION,
    )


# --- the gateway ---------------------------------------------------------------------

GATEWAY_CONFIG = """\
# Written by bench/run.py: the fake upstream as the only provider.
providers:
  - name: bench-fake
    base_url: http://127.0.0.1:{upstream}/v1
    api_key_env: BENCH_PROVIDER_KEY
    timeout_s: 60
models:
  - name: bench-chat
    provider: bench-fake
    upstream_model: "fake-gpt"
    max_output_tokens: 4096
  - name: bench-stream
    provider: bench-fake
    upstream_model: "fake-gpt;chunks=20"
    max_output_tokens: 4096
  - name: bench-slow
    provider: bench-fake
    upstream_model: "fake-gpt;chunks=60;delay_ms=1000"
    max_output_tokens: 4096
prices:
  - model: bench-chat
    input: "0.15"
    output: "0.60"
    effective_from: 2024-01-01
  - model: bench-stream
    input: "0.15"
    output: "0.60"
    effective_from: 2024-01-01
  - model: bench-slow
    input: "0.15"
    output: "0.60"
    effective_from: 2024-01-01
"""


@dataclass
class GatewaySetup:
    env: dict[str, str]
    key: str
    key_name: str
    database_url: str
    redis_url: str

    def usage_rows(self) -> int | None:
        """Usage rows in PostgreSQL for this run's key (None if unreadable)."""
        name = self.key_name.replace("'", "''")  # ours, but quote it anyway
        query = f"SELECT count(*) FROM usage_usagerow u JOIN keys_apikey k ON k.id = u.key_id WHERE k.name = '{name}'"  # noqa: S608
        out = subprocess.run(
            ["psql", self.database_url, "-tAc", query], capture_output=True, text=True
        )
        try:
            return int(out.stdout.strip())
        except ValueError:
            return None

    def redis_keys(self) -> list[str] | None:
        """What the gateways keep in their Redis database (quota counters, ...)."""
        try:
            import redis

            client = redis.Redis.from_url(self.redis_url)
            return sorted(k.decode() for k in client.scan_iter(count=1000))[:50]
        except Exception:  # noqa: BLE001 (informational only)
            return None


def _ensure_database(url: str) -> None:
    """Create the benchmark's PostgreSQL database if it is missing."""
    from urllib.parse import urlparse

    parts = urlparse(url)
    if parts.scheme not in {"postgres", "postgresql"}:
        return
    name = parts.path.lstrip("/")
    args = ["-h", parts.hostname or "127.0.0.1", "-p", str(parts.port or 5432)]
    args += ["-U", parts.username or "postgres"]
    env = dict(os.environ)
    if parts.password:
        env["PGPASSWORD"] = parts.password
    listing = subprocess.run(
        ["psql", *args, "-d", "postgres", "-lqtA"],
        env=env,
        capture_output=True,
        text=True,
    )
    if listing.returncode != 0:
        raise RuntimeError(f"PostgreSQL is not reachable at {url}: {listing.stderr}")
    if name not in {line.split("|")[0] for line in listing.stdout.splitlines()}:
        _run(["createdb", *args, name], env=env)


def setup_gateway(upstream_port: int, work: Path) -> GatewaySetup:
    """Database, migrations, providers/models/prices and a key with two quotas."""
    database_url = os.environ.get(
        "BENCH_DATABASE_URL", "postgres://postgres@127.0.0.1:5432/gateway_bench"
    )
    redis_url = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/2")
    _ensure_database(database_url)
    spool = work / "usage-spool"
    spool.mkdir(parents=True, exist_ok=True)
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("GATEWAY_", "DJANGO_", "CELERY_"))
        and k not in {"DATABASE_URL", "REDIS_URL"}
    }
    env.update(
        DATABASE_URL=database_url,
        REDIS_URL=redis_url,
        GATEWAY_USAGE_SPOOL_DIR=str(spool),
        BENCH_PROVIDER_KEY="x",
    )
    _run([PYTHON, "manage.py", "migrate", "--noinput", "-v", "0"], env=env)
    config = work / "gateway.yaml"
    config.write_text(GATEWAY_CONFIG.format(upstream=upstream_port))
    _run([PYTHON, "manage.py", "loadconfig", str(config)], env=env)
    key_name = f"bench-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    out = _run(
        [
            PYTHON,
            "manage.py",
            "createkey",
            "--name",
            key_name,
            "--rpm",
            "100000000",
            "--tpm",
            "1000000000",  # the quota column holds < 10**10
        ],
        env=env,
    )
    key = out.strip().splitlines()[-1].strip()
    if not key.startswith("sk-gw-"):
        raise RuntimeError(f"createkey printed no key:\n{out}")
    return GatewaySetup(env, key, key_name, database_url, redis_url)


def _server_cmd(server: str, port: int) -> list[str]:
    app = "gateway_project.asgi:application"
    if server == "uvicorn":
        return [
            str(VENV_BIN / "uvicorn"),
            app,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--no-access-log",
            "--no-proxy-headers",  # as deployed: X-Forwarded-For is the gateway's
        ]
    if server == "daphne":
        return [
            str(VENV_BIN / "daphne"),
            "-v",
            "0",
            "-b",
            "127.0.0.1",
            "-p",
            str(port),
            app,
        ]
    if server == "granian":
        binary = VENV_BIN / "granian"
        if not binary.exists():
            raise Unavailable(
                "granian is not installed in .venv "
                "(.venv/bin/pip install -r bench/requirements.txt)"
            )
        return [
            str(binary),
            "--interface",
            "asgi",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--no-ws",
            "--no-access-log",
            "--log-level",
            "warning",
            app,
        ]
    raise ValueError(server)


def _server_version(server: str) -> str:
    try:
        from importlib.metadata import version

        return version(server)
    except Exception:  # noqa: BLE001 (informational only)
        return ""


def gateway(name: str, setup: GatewaySetup, log_dir: Path) -> Target:
    server = GATEWAY_SERVERS[name]
    port = free_port()
    proc = Proc(
        name,
        _server_cmd(server, port),
        cpu=SERVER_CPU,
        env=setup.env,
        cwd=ROOT,
        log_dir=log_dir,
    )
    proc.wait_port(port, 60)
    return Target(
        name,
        port,
        setup.key,
        dict(PUBLIC_MODELS),
        proc,
        version=f"{server} {_server_version(server)}".strip(),
    )
