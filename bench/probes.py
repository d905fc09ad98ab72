"""Small clients: a correctness check, time to first byte, and many open streams."""

from __future__ import annotations

import asyncio
import json
import socket
import statistics
import time
from dataclasses import dataclass, field


def request_bytes(port: int, path: str, body: bytes, token: str) -> bytes:
    head = (
        f"POST {path} HTTP/1.1\r\n"
        f"Host: 127.0.0.1:{port}\r\n"
        "Content-Type: application/json\r\n"
        "Accept: */*\r\n"
        f"Content-Length: {len(body)}\r\n"
    )
    if token:
        head += f"Authorization: Bearer {token}\r\n"
    return head.encode() + b"\r\n" + body


class HttpConnection:
    """A keep-alive HTTP/1.1 client on a raw socket, timing the first byte.

    Only what the benchmark needs: Content-Length, chunked, or read-to-close bodies.
    """

    def __init__(self, port: int, timeout: float = 30.0) -> None:
        self.port = port
        self.timeout = timeout
        self.sock: socket.socket | None = None
        self.buf = b""

    def _connect(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=self.timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""
        return sock

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def _recv(self) -> bytes:
        assert self.sock is not None
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("connection closed")
        return data

    def _fill(self, n: int) -> None:
        while len(self.buf) < n:
            self.buf += self._recv()

    def _line(self) -> bytes:
        while b"\r\n" not in self.buf:
            self.buf += self._recv()
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line

    def request(self, raw: bytes) -> tuple[int, bytes, float, float]:
        """Send ``raw``; return (status, body, seconds to first byte, to last)."""
        if self.sock is None:
            self.sock = self._connect()
        t0 = time.perf_counter()
        self.sock.sendall(raw)
        if not self.buf:
            self.buf = self._recv()
        t_first = time.perf_counter() - t0
        while b"\r\n\r\n" not in self.buf:
            self.buf += self._recv()
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip().lower()
        body = b""
        if b"content-length" in headers:
            n = int(headers[b"content-length"])
            self._fill(n)
            body, self.buf = self.buf[:n], self.buf[n:]
        elif b"chunked" in headers.get(b"transfer-encoding", b""):
            parts = []
            while True:
                size = int(self._line().split(b";")[0], 16)
                if size == 0:
                    while self._line():  # trailers, then the empty line
                        pass
                    break
                self._fill(size + 2)
                parts.append(self.buf[:size])
                self.buf = self.buf[size + 2 :]
            body = b"".join(parts)
        else:  # read to close
            try:
                while True:
                    self.buf += self._recv()
            except ConnectionError:
                pass
            body, self.buf = self.buf, b""
            self.close()
        t_last = time.perf_counter() - t0
        if headers.get(b"connection") == b"close":
            self.close()
        return status, body, t_first, t_last


@dataclass
class CheckResult:
    ok: bool
    detail: str
    headers_seen: dict[str, str] = field(default_factory=dict)


def check(
    port: int, path: str, body: bytes, token: str, *, stream: bool
) -> CheckResult:
    """One request: 200, a chat completion, and for a stream all 20 content chunks."""
    conn = HttpConnection(port)
    try:
        status, data, _, _ = conn.request(request_bytes(port, path, body, token))
    except OSError as exc:
        return CheckResult(False, f"request failed: {exc}")
    finally:
        conn.close()
    if status != 200:
        return CheckResult(False, f"status {status}: {data[:300]!r}")
    if not stream:
        try:
            payload = json.loads(data)
            payload["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            return CheckResult(False, f"not a chat completion: {data[:300]!r}")
        return CheckResult(True, "ok")
    events = [
        line[5:].strip()
        for line in data.split(b"\n")
        if line.startswith(b"data:") and line[5:].strip() != b"[DONE]"
    ]
    contents = 0
    for event in events:
        try:
            choice = json.loads(event)["choices"]
        except (ValueError, KeyError, TypeError):
            return CheckResult(False, f"bad SSE event: {event[:200]!r}")
        if choice and (choice[0].get("delta") or {}).get("content"):
            contents += 1
    if b"[DONE]" not in data:
        return CheckResult(False, "stream without [DONE]")
    return CheckResult(
        contents == 20, f"{contents} content chunks in {len(events)} events"
    )


def ttfb(
    port: int, path: str, body: bytes, token: str, *, count: int = 200, warmup: int = 20
) -> dict[str, float]:
    """Sequential requests on one keep-alive connection: p50/p90 of the first byte."""
    raw = request_bytes(port, path, body, token)
    conn = HttpConnection(port)
    firsts, lasts, errors = [], [], 0
    try:
        for i in range(warmup + count):
            try:
                status, _, first, last = conn.request(raw)
            except OSError:
                conn.close()
                errors += 1
                continue
            if status != 200:
                errors += 1
            elif i >= warmup:
                firsts.append(first * 1000)
                lasts.append(last * 1000)
    finally:
        conn.close()
    if not firsts:
        return {"errors": errors}
    firsts.sort()
    return {
        "ttfb_p50_ms": statistics.median(firsts),
        "ttfb_p90_ms": firsts[int(len(firsts) * 0.9) - 1],
        "total_p50_ms": statistics.median(lasts),
        "samples": len(firsts),
        "errors": errors,
    }


class _Streams:
    """Counts of the streams a client holds: opened, refused, failed, finished."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.open = 0
        self.non_200 = 0
        self.failed = 0
        self.finished = 0
        self.settled = asyncio.Event()  # every stream open, refused or failed

    def _tick(self) -> None:
        if self.open + self.non_200 + self.failed >= self.count:
            self.settled.set()


async def _hold_stream(
    port: int, raw: bytes, gate: asyncio.Semaphore, timeout: float, state: _Streams
) -> None:
    """Open one stream, count it open once its head arrived, then read it to the end."""
    writer = None
    try:
        async with gate:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", port), timeout
            )
            writer.write(raw)
            await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
    except (
        OSError,
        TimeoutError,
        asyncio.IncompleteReadError,
        asyncio.LimitOverrunError,
    ):
        state.failed += 1
        state._tick()
        if writer is not None:
            writer.close()
        return
    if head.split(b" ", 2)[1] != b"200":
        state.non_200 += 1
        state._tick()
        writer.close()
        return
    state.open += 1
    state._tick()
    try:
        while await reader.read(65536):
            pass
        state.finished += 1  # ended before the measurement: it was not held open
    except OSError:
        state.finished += 1
    finally:
        writer.close()


async def _open_streams(
    port: int, raw: bytes, count: int, timeout: float, measure
) -> dict:
    gate = asyncio.Semaphore(100)  # connects in flight: spares small accept backlogs
    state = _Streams(count)
    t0 = time.perf_counter()
    tasks = [
        asyncio.ensure_future(_hold_stream(port, raw, gate, timeout, state))
        for _ in range(count)
    ]
    try:
        await asyncio.wait_for(state.settled.wait(), timeout * 2)
    except TimeoutError:
        pass
    opened_s = time.perf_counter() - t0
    await asyncio.sleep(0.5)  # let the server settle on what it holds
    memory = measure()
    held = state.open - state.finished
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await asyncio.sleep(0.2)
    return {
        "open": held,
        "opened": state.open,
        "finished_early": state.finished,
        "non_200": state.non_200,
        "failed": state.failed,
        "open_s": opened_s,
        **memory,
    }


def open_streams(
    port: int,
    path: str,
    body: bytes,
    token: str,
    *,
    count: int,
    timeout: float,
    measure,
) -> dict:
    """Open ``count`` streams, wait for every response head, call ``measure()``, close."""
    raw = request_bytes(port, path, body, token)
    return asyncio.run(_open_streams(port, raw, count, timeout, measure))
