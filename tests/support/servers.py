"""Start real server processes for tests and wait until they answer.

Output goes to a log file, not a pipe: a chatty server filling an unread pipe
buffer would block, and the test would hang instead of failing.
"""

from __future__ import annotations

import http.client
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO

PROJECT_ROOT = Path(__file__).resolve().parents[2]
HOST = "127.0.0.1"


class ServerStartError(RuntimeError):
    """The server exited or never answered; the message ends with its log tail."""


def free_port() -> int:
    """A port nothing listens on right now (another process may still take it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


class ServerProcess:
    """A command run as a server on 127.0.0.1:`port`, usable as a context manager.

    `start()` returns once the port accepts connections, or once `GET ready_path`
    answers 200 when a path is given; it raises `ServerStartError` with the tail
    of the server's output if the process dies or `timeout` seconds pass.
    `env` entries are laid over `os.environ`; a value of None removes the name.
    """

    def __init__(
        self,
        argv: Sequence[str],
        *,
        port: int,
        env: Mapping[str, str | None] | None = None,
        cwd: str | Path | None = None,
        ready_path: str | None = None,
        timeout: float = 20.0,
        name: str = "server",
    ) -> None:
        self.argv = list(argv)
        self.port = port
        self.env = dict(env or {})
        self.cwd = cwd
        self.ready_path = ready_path
        self.timeout = timeout
        self.name = name
        self.process: subprocess.Popen[bytes] | None = None
        self._log_dir: Path | None = None
        self._log_file: IO[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def log_path(self) -> Path | None:
        return self._log_dir / f"{self.name}.log" if self._log_dir else None

    def start(self) -> ServerProcess:
        if self.process is not None:
            raise RuntimeError(f"{self.name} already started")
        env = dict(os.environ)
        for key, value in self.env.items():
            if value is None:
                env.pop(key, None)
            else:
                env[key] = value
        self._log_dir = Path(tempfile.mkdtemp(prefix=f"{self.name}-"))
        self._log_file = (self._log_dir / f"{self.name}.log").open("wb")
        self.process = subprocess.Popen(
            self.argv,
            env=env,
            cwd=self.cwd,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
        )
        try:
            self._wait_until_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_until_ready(self) -> None:
        assert self.process is not None
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            code = self.process.poll()
            if code is not None:
                raise ServerStartError(
                    f"{self.name} exited with {code} before answering on port "
                    f"{self.port}:\n{self.log_tail()}"
                )
            if self._answers():
                return
            time.sleep(0.05)
        raise ServerStartError(
            f"{self.name} did not answer on port {self.port} within "
            f"{self.timeout:g}s:\n{self.log_tail()}"
        )

    def _answers(self) -> bool:
        if self.ready_path is None:
            try:
                with socket.create_connection((HOST, self.port), timeout=0.5):
                    return True
            except OSError:
                return False
        connection = http.client.HTTPConnection(HOST, self.port, timeout=1.0)
        try:
            connection.request("GET", self.ready_path)
            return connection.getresponse().status == 200
        except (OSError, http.client.HTTPException):
            return False
        finally:
            connection.close()

    def log_tail(self, lines: int = 40) -> str:
        path = self.log_path
        if path is None or not path.exists():
            return "(no output)"
        if self._log_file is not None:
            self._log_file.flush()
        text = path.read_bytes().decode("utf-8", "replace")
        return "\n".join(text.splitlines()[-lines:]) or "(no output)"

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM, then SIGKILL if the process is still there after `grace` s."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=grace)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        if self._log_dir is not None:
            shutil.rmtree(self._log_dir, ignore_errors=True)
            self._log_dir = None

    def __enter__(self) -> ServerProcess:
        return self if self.process is not None else self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def start_fake_upstream(
    port: int | None = None, api_key: str | None = None
) -> ServerProcess:
    """Start relay/fake_upstream.py in its own process and wait for /health.

    Without `api_key` the fake accepts any request, whatever
    FAKE_UPSTREAM_API_KEY says in the test's environment.
    """
    # A port from free_port() can be taken before the server binds it; only
    # then is trying another port worth it.
    attempts = 1 if port is not None else 3
    for attempt in range(1, attempts + 1):
        chosen = port if port is not None else free_port()
        argv = [sys.executable, "-m", "relay.fake_upstream"]
        argv += ["--host", HOST, "--port", str(chosen)]
        if api_key is not None:
            argv += ["--api-key", api_key]
        server = ServerProcess(
            argv,
            port=chosen,
            env={"FAKE_UPSTREAM_API_KEY": None, "PYTHONUNBUFFERED": "1"},
            cwd=PROJECT_ROOT,
            ready_path="/health",
            name="fake-upstream",
        )
        try:
            return server.start()
        except ServerStartError as exc:
            if attempt == attempts or "address already in use" not in str(exc):
                raise
    raise AssertionError("the loop above returns or raises")
