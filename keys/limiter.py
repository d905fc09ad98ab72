"""The limiter backends: Redis (shared by every process) and in-process.

`limiter()` picks one per process. Both run the same algorithm (`keys.quotas`):
purge expired reservations, sum each counter's window, refuse if any counter lacks
room, else reserve on all of them. With Redis this is one Lua script, so it is
atomic across processes and costs one round trip whatever the number of quotas.

Reservations in flight are renewed by the process that holds them: the limiter
keeps those it issued and has not settled (per event loop, weakly: a request that
vanished without settling stops holding its room), and one background task renews
all of them every half of the shortest TTL among them, in one call. A killed
process renews nothing, so its reservations expire on their own.

Redis unreachable: requests carrying a cost budget are refused with 503 (money is
never admitted blind); request and token rates fall back to the in-process limiter
with a share of each limit (`GATEWAY_QUOTA_FALLBACK_SHARE`, the number of web
processes). A counter that must be rebuilt while the usage ledger (the database)
cannot be read is handled the same way. Both are counted in metrics.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import math
import time
import weakref
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from channels.db import database_sync_to_async
from django.conf import settings
from django.db import InterfaceError, OperationalError
from django.utils import timezone

from keys import quota_ledger
from keys.quotas import (
    Counter,
    CounterState,
    Demand,
    QuotaRefused,
    QuotaUnavailable,
    Reservation,
    new_reservation,
    reset_seconds,
)
from usage import metrics

logger = logging.getLogger(__name__)

# After the ledger failed to answer, how long counters are not rebuilt from it: a
# dead database is not asked by every request (its connection attempts queue on
# the one thread database_sync_to_async uses). Matches the 503's Retry-After.
LEDGER_RETRY_S = 1.0
# Reservations renewed per script call. A script blocks Redis while it runs (about
# 5 µs per reservation of two counters), so thousands in flight are renewed in
# several calls of a few milliseconds, not one long stall of every other process.
RENEW_CHUNK = 500
# In-process counters are forgotten once expired, checked when there are this many
# (then again when their number has doubled, so the scan costs O(1) per request).
PRUNE_AT = 10_000

# Many reservations in one call, each checked and applied in turn (atomically: a
# script runs alone). KEYS: every reservation's counters, in order. ARGV: now_ms,
# count, then per reservation: id, expire_at_ms, n, and per counter: limit, amount,
# window_ms, bucket_ms, ttl_s, init ("-" or "bucket:amount,..."). Per reservation it
# returns: status (0 counters missing, 1 reserved, 2 refused, 3 failed), the refused counter,
# then n values (used; for status 0, 1 where the counter is missing), then n oldest
# buckets (-1: none).
RESERVE = """
local now = tonumber(ARGV[1])
local m = tonumber(ARGV[2])
local a, k = 3, 1
local out = {}
local function reserve(a, k, res, expire_at, n)
  local flags, any_missing = {}, false
  for i = 0, n - 1 do
    local key = KEYS[k + i]
    local init = ARGV[a + i * 6 + 5]
    flags[i + 1] = 0
    if redis.call('EXISTS', key) == 0 then
      if init == '-' then
        flags[i + 1], any_missing = 1, true
      else
        redis.call('HSET', key, '_', '1')
        for b, v in string.gmatch(init, '(%-?%d+):(%-?%d+)') do
          if tonumber(v) ~= 0 then redis.call('HINCRBY', key, b, v) end
        end
      end
    end
  end
  if any_missing then
    out[#out + 1] = 0
    out[#out + 1] = 0
    for i = 1, n do out[#out + 1] = flags[i] end
    for i = 1, n do out[#out + 1] = -1 end
  else
    local used, oldest = {}, {}
    for i = 0, n - 1 do
      local key = KEYS[k + i]
      local base = a + i * 6
      local window = tonumber(ARGV[base + 2])
      local bucket_ms = tonumber(ARGV[base + 3])
      local pending, amounts = key .. ':p', key .. ':a'
      local expired = redis.call('ZRANGEBYSCORE', pending, '-inf', now)
      for _, e in ipairs(expired) do
        local v = redis.call('HGET', amounts, e)
        if v then
          local b, amt = string.match(v, '(%-?%d+):(%-?%d+)')
          local d = tonumber(amt)
          -- Redis refuses "-0" as an increment: skip reservations of nothing.
          if d ~= 0 and (window == 0 or tonumber(b) + bucket_ms > now - window) then
            redis.call('HINCRBY', key, b, -d)
          end
          redis.call('HDEL', amounts, e)
        end
      end
      if #expired > 0 then redis.call('ZREMRANGEBYSCORE', pending, '-inf', now) end
      local total, first = 0, -1
      local fields = redis.call('HGETALL', key)
      for j = 1, #fields, 2 do
        local f = fields[j]
        if f ~= '_' then
          local b = tonumber(f)
          if window == 0 or b + bucket_ms > now - window then
            local v = tonumber(fields[j + 1])
            total = total + v
            if v > 0 and (first == -1 or b < first) then first = b end
          else
            redis.call('HDEL', key, f)
          end
        end
      end
      used[i + 1], oldest[i + 1] = total, first
    end
    local status, refused = 1, 0
    for i = 0, n - 1 do
      local amount = tonumber(ARGV[a + i * 6 + 1])
      if amount > 0 and used[i + 1] + amount > tonumber(ARGV[a + i * 6]) then
        status, refused = 2, i + 1
        break
      end
    end
    if status == 1 then
      for i = 0, n - 1 do
        local key = KEYS[k + i]
        local base = a + i * 6
        local amount = tonumber(ARGV[base + 1])
        local window = tonumber(ARGV[base + 2])
        local bucket_ms = tonumber(ARGV[base + 3])
        local ttl = tonumber(ARGV[base + 4])
        local bucket = 0
        if window > 0 then bucket = now - (now % bucket_ms) end
        if amount ~= 0 then redis.call('HINCRBY', key, bucket, amount) end
        redis.call('ZADD', key .. ':p', expire_at, res)
        redis.call('HSET', key .. ':a', res, bucket .. ':' .. amount)
        used[i + 1] = used[i + 1] + amount
        if oldest[i + 1] == -1 and amount > 0 then oldest[i + 1] = bucket end
        if ttl > 0 then
          redis.call('EXPIRE', key, ttl)
          redis.call('EXPIRE', key .. ':p', ttl)
          redis.call('EXPIRE', key .. ':a', ttl)
        end
      end
    end
    out[#out + 1] = status
    out[#out + 1] = refused
    for i = 1, n do out[#out + 1] = used[i] end
    for i = 1, n do out[#out + 1] = oldest[i] end
  end
end
for r = 1, m do
  local res = ARGV[a]
  local expire_at = tonumber(ARGV[a + 1])
  local n = tonumber(ARGV[a + 2])
  a = a + 3
  local before = #out
  -- One reservation's failure (a damaged counter) must not fail the others.
  local ok = pcall(reserve, a, k, res, expire_at, n)
  if not ok then
    for j = #out, before + 1, -1 do out[j] = nil end
    out[#out + 1] = 3
    out[#out + 1] = 0
    for i = 1, 2 * n do out[#out + 1] = -1 end
  end
  a = a + n * 6
  k = k + n
end
return out
"""

# Many settlements in one call. KEYS: every reservation's counters, in order. ARGV:
# now_ms, count, then per reservation: id, n, and per counter: bucket, actual amount,
# window_ms, bucket_ms.
SETTLE = """
local now = tonumber(ARGV[1])
local m = tonumber(ARGV[2])
local a, k = 3, 1
for r = 1, m do
  local res = ARGV[a]
  local n = tonumber(ARGV[a + 1])
  a = a + 2
  for i = 0, n - 1 do
    local key = KEYS[k + i]
    local base = a + i * 4
    local bucket = ARGV[base]
    local actual = tonumber(ARGV[base + 1])
    local window = tonumber(ARGV[base + 2])
    local bucket_ms = tonumber(ARGV[base + 3])
    local live = window == 0 or tonumber(bucket) + bucket_ms > now - window
    local v = redis.call('HGET', key .. ':a', res)
    if v then
      local b, amt = string.match(v, '(%-?%d+):(%-?%d+)')
      redis.call('HDEL', key .. ':a', res)
      redis.call('ZREM', key .. ':p', res)
      if actual ~= tonumber(amt) and live and redis.call('EXISTS', key) == 1 then
        redis.call('HINCRBY', key, b, actual - tonumber(amt))
      end
    elseif actual ~= 0 and live and redis.call('EXISTS', key) == 1 then
      -- The reservation expired, or the counter was rebuilt: count what was spent.
      redis.call('HINCRBY', key, bucket, actual)
    end
  end
  a = a + n * 4
  k = k + n
end
return m
"""

# KEYS: counters. ARGV: now_ms, then window_ms, bucket_ms per counter. Read-only.
PEEK = """
local now = tonumber(ARGV[1])
local out = {}
for i = 1, #KEYS do
  local window = tonumber(ARGV[1 + (i - 1) * 2 + 1])
  local bucket_ms = tonumber(ARGV[1 + (i - 1) * 2 + 2])
  local total, pending = 0, redis.call('ZCOUNT', KEYS[i] .. ':p', now, '+inf')
  local fields = redis.call('HGETALL', KEYS[i])
  for j = 1, #fields, 2 do
    local f = fields[j]
    if f ~= '_' and (window == 0 or tonumber(f) + bucket_ms > now - window) then
      total = total + tonumber(fields[j + 1])
    end
  end
  out[#out + 1] = redis.call('EXISTS', KEYS[i])
  out[#out + 1] = total
  out[#out + 1] = pending
end
return out
"""


# Renew held reservations. KEYS: one counter per (reservation, counter) pair. ARGV:
# now_ms, then per key: the reservation id and its new expiry. Only extends a
# reservation still live: one already expired may have lost its room to another
# request, even if no check has purged it yet. Returns how many were renewed.
RENEW = """
local now = tonumber(ARGV[1])
local renewed = 0
for i = 1, #KEYS do
  local pending = KEYS[i] .. ':p'
  local res, expire_at = ARGV[i * 2], tonumber(ARGV[i * 2 + 1])
  local score = redis.call('ZSCORE', pending, res)
  if score and tonumber(score) > now and expire_at > tonumber(score) then
    redis.call('ZADD', pending, expire_at, res)
    renewed = renewed + 1
  end
end
return renewed
"""


class LedgerUnavailable(Exception):
    """The usage ledger (the database) cannot be read to rebuild a counter."""


def _init_arg(spent: list[tuple[int, int]]) -> str:
    return ",".join(f"{bucket}:{amount}" for bucket, amount in spent) or "0:0"


def _ms(now: datetime) -> int:
    return int(now.timestamp() * 1000)


def _carries_budget(reservation: Reservation) -> bool:
    return any(c.quota.metric == "cost_usd" for c in reservation.counters)


@dataclass(slots=True)
class _LocalCounter:
    """One counter in memory: its buckets and the reservations it holds."""

    buckets: dict[int, int]
    # reservation id -> (expire_at_ms, bucket, amount)
    pending: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    # A min-heap of (expire_at_ms, reservation id), so a check pops only what has
    # expired instead of scanning every reservation. An entry whose reservation was
    # settled or renewed since is stale: skipped when popped, dropped on compaction.
    expiries: list[tuple[int, str]] = field(default_factory=list)
    expires_at: float = math.inf  # When the counter itself may be forgotten.
    # Started from zero because the ledger could not be read: rebuilt once it can.
    provisional: bool = False

    def hold(self, res_id: str, expire_at_ms: int, bucket: int, amount: int) -> None:
        self.pending[res_id] = (expire_at_ms, bucket, amount)
        heapq.heappush(self.expiries, (expire_at_ms, res_id))

    def release(self, res_id: str) -> tuple[int, int, int] | None:
        held = self.pending.pop(res_id, None)
        self._compact()
        return held

    def renew(self, res_id: str, expire_at_ms: int, now_ms: int) -> None:
        held = self.pending.get(res_id)
        if held is None or held[0] <= now_ms or expire_at_ms <= held[0]:
            return  # Settled, already expired (its room may be gone), or no later.
        self.hold(res_id, expire_at_ms, held[1], held[2])
        self._compact()

    def purge_expired(self, now_ms: int) -> None:
        while self.expiries and self.expiries[0][0] <= now_ms:
            expire_at, res_id = heapq.heappop(self.expiries)
            held = self.pending.get(res_id)
            if held is None or held[0] != expire_at:
                continue  # Stale: settled, or renewed to a later expiry.
            del self.pending[res_id]
            if held[1] in self.buckets:
                self.buckets[held[1]] -= held[2]

    def drop_old_buckets(self, counter: Counter, now_ms: int) -> None:
        if not counter.window_ms:
            return
        # A bucket counts while it overlaps the window: b + bucket_ms > now - window.
        gone = now_ms - counter.window_ms - counter.bucket_ms
        if any(b <= gone for b in self.buckets):
            self.buckets = {b: a for b, a in self.buckets.items() if b > gone}

    def oldest_positive(self) -> int | None:
        return min((b for b, a in self.buckets.items() if a > 0), default=None)

    def _compact(self) -> None:
        # Settlements and renewals leave stale entries; rebuilding the heap once they
        # outnumber the live ones keeps its size O(pending) at O(1) amortized cost.
        if len(self.expiries) > 2 * len(self.pending) + 8:
            self.expiries = [(e, r) for r, (e, _, _) in self.pending.items()]
            heapq.heapify(self.expiries)


class LocalLimiter:
    """The same algorithm in this process's memory (the embedded default)."""

    def __init__(self) -> None:
        self._counters: dict[str, _LocalCounter] = {}
        self._prune_at = PRUNE_AT

    def has(self, counter: Counter) -> bool:
        return counter.name in self._counters

    def missing(
        self, counters: list[Counter], *, retry_provisional: bool = False
    ) -> list[Counter]:
        """Counters to rebuild from the ledger: absent ones, and those started from
        zero while it was unreadable when it may be read again."""
        return [
            c
            for c in counters
            if (state := self._counters.get(c.name)) is None
            or (retry_provisional and state.provisional)
        ]

    def load(
        self, counter: Counter, spent: list[tuple[int, int]], now: datetime
    ) -> None:
        """Start the counter from the ledger's amounts (unless another caller did
        meanwhile). A provisional counter is replaced: its reservations in flight
        count again when they settle, as after a rebuild on Redis."""
        state = self._counters.get(counter.name)
        if state is None or state.provisional:
            self._counters[counter.name] = _LocalCounter({b: a for b, a in spent if a})
            self._touch(counter, now)

    def load_provisional(self, counter: Counter, now: datetime) -> None:
        """Start the counter from zero, until the ledger can be read."""
        if counter.name not in self._counters:
            self._counters[counter.name] = _LocalCounter({}, provisional=True)
            self._touch(counter, now)

    def _touch(self, counter: Counter, now: datetime) -> None:
        ttl = counter.ttl_s(now)
        self._counters[counter.name].expires_at = (
            now.timestamp() + ttl if ttl else math.inf
        )

    def reserve_now(
        self,
        reservation: Reservation,
        expire_at_ms: int,
        now: datetime,
        limits: list[int],
    ) -> tuple[bool, int, list[int], list[int | None]]:
        """Check and reserve with no await in between: atomic within the loop."""
        now_ms = _ms(now)
        states = [self._counters[c.name] for c in reservation.counters]
        used: list[int] = []
        oldest: list[int | None] = []
        for counter, state in zip(reservation.counters, states, strict=True):
            state.purge_expired(now_ms)
            state.drop_old_buckets(counter, now_ms)
            used.append(sum(state.buckets.values()))
            oldest.append(state.oldest_positive())
        for i, amount in enumerate(reservation.amounts):
            if amount > 0 and used[i] + amount > limits[i]:
                return False, i, used, oldest
        for i, (counter, state) in enumerate(
            zip(reservation.counters, states, strict=True)
        ):
            bucket, amount = reservation.buckets[i], reservation.amounts[i]
            state.buckets[bucket] = state.buckets.get(bucket, 0) + amount
            state.hold(reservation.id, expire_at_ms, bucket, amount)
            used[i] += amount
            if oldest[i] is None and amount > 0:
                oldest[i] = bucket
            self._touch(counter, now)
        if len(self._counters) >= self._prune_at:
            self._prune(now)
        return True, -1, used, oldest

    def settle_now(
        self, reservation: Reservation, actual: Demand, now: datetime
    ) -> None:
        now_ms = _ms(now)
        for i, counter in enumerate(reservation.counters):
            state = self._counters.get(counter.name)
            if state is None:
                continue
            bucket = reservation.buckets[i]
            held = state.release(reservation.id)
            if (
                counter.window_ms
                and bucket + counter.bucket_ms <= now_ms - counter.window_ms
            ):
                continue  # Its bucket has left the window: nothing to correct.
            reserved = held[2] if held is not None else 0
            amount = actual.amount(counter.quota.metric)
            state.buckets[bucket] = state.buckets.get(bucket, 0) + amount - reserved

    def renew_now(
        self, reservation: Reservation, expire_at_ms: int, now: datetime
    ) -> None:
        now_ms = _ms(now)
        for counter in reservation.counters:
            state = self._counters.get(counter.name)
            if state is not None:
                state.renew(reservation.id, expire_at_ms, now_ms)

    def peek(
        self, counters: list[Counter], now: datetime
    ) -> list[tuple[bool, int, int]]:
        """(known, used, live reservations) per counter, changing nothing. A scan of
        the counter's reservations: for tests and diagnostics, not the request path."""
        now_ms = _ms(now)
        out = []
        for counter in counters:
            state = self._counters.get(counter.name)
            if state is None:
                out.append((False, 0, 0))
                continue
            total = sum(
                a
                for b, a in state.buckets.items()
                if not counter.window_ms
                or b + counter.bucket_ms > now_ms - counter.window_ms
            )
            pending = sum(1 for e, _, _ in state.pending.values() if e > now_ms)
            out.append((True, total, pending))
        return out

    def _prune(self, now: datetime) -> None:
        stamp = now.timestamp()
        for name in [n for n, s in self._counters.items() if s.expires_at < stamp]:
            del self._counters[name]
        self._prune_at = max(PRUNE_AT, 2 * len(self._counters))

    def clear(self) -> None:
        self._counters.clear()
        self._prune_at = PRUNE_AT


class _Batch:
    """Calls made during one event-loop iteration, sent to Redis as one script call."""

    def __init__(self, now_ms: int) -> None:
        self.now_ms = (
            now_ms  # The clock of the first call; calls of one batch share it.
        )
        self.keys: list[str] = []
        self.args: list[Any] = []
        self.waiters: list[tuple[int, asyncio.Future[list[Any]]]] = []


class _Held:
    """The reservations one event loop's requests hold, and the task renewing them.

    Weak references: a reservation whose request dropped it without settling (a
    handler that crashed past its `finally`) is no longer renewed and expires.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.reservations: weakref.WeakValueDictionary[str, Reservation] = (
            weakref.WeakValueDictionary()
        )
        self.renewer: asyncio.Task[None] | None = None
        self.wake = asyncio.Event()
        self.next_renewal = math.inf  # Loop time the renewer wakes at.

    def period_s(self) -> float | None:
        """Half the shortest TTL held: each is renewed before half its TTL passes."""
        ttls = [r.ttl_ms for r in list(self.reservations.values())]
        return min(ttls) / 2000 if ttls else None


class Limiter:
    """Reserve and settle, on Redis when configured, else in this process.

    With Redis, every reservation made in one event-loop iteration goes to Redis in
    one script call (and likewise settlements): one round trip per request at most,
    shared under load, and no waiting (the batch is sent when the iteration ends).
    Renewals are off that path: one call per half TTL for all reservations held.
    """

    def __init__(self, *, renew_in_background: bool = True) -> None:
        self.local = LocalLimiter()
        # Used when Redis is down: rates get a per-process share of their limits.
        self.fallback = LocalLimiter()
        # Off for tests on a controlled clock, which call renew() themselves.
        self.renew_in_background = renew_in_background
        self._clients: dict[asyncio.AbstractEventLoop, Any] = {}
        self._reserves: _Batch | None = None
        self._settles: _Batch | None = None
        # Per event loop: a process has one, but a second one (async_to_sync in a
        # thread) must not stop the first's renewals.
        self._held: dict[asyncio.AbstractEventLoop, _Held] = {}
        self._ledger_retry_at = 0.0  # time.monotonic() before which it is not asked

    def _redis(self) -> Any:
        loop = asyncio.get_running_loop()
        client = self._clients.get(loop)
        if client is None:
            import redis.asyncio as aioredis

            # No socket_timeout: redis-py would wrap every send in a task
            # (asyncio.wait_for); calls are bounded with asyncio.timeout instead.
            client = aioredis.Redis.from_url(
                settings.REDIS_URL,
                socket_connect_timeout=settings.GATEWAY_QUOTA_REDIS_TIMEOUT_S,
            )
            client.gw_reserve = client.register_script(RESERVE)
            client.gw_settle = client.register_script(SETTLE)
            client.gw_peek = client.register_script(PEEK)
            client.gw_renew = client.register_script(RENEW)
            self._clients = {loop: client}
            self._reserves = self._settles = None
        return client

    async def _call(self, script: str, keys: list[str], args: list[Any]) -> Any:
        client = self._redis()
        async with asyncio.timeout(settings.GATEWAY_QUOTA_REDIS_TIMEOUT_S):
            return await getattr(client, script)(keys=keys, args=args)

    def _enqueue(
        self, kind: str, keys: list[str], args: list[Any], width: int, now: datetime
    ) -> asyncio.Future[list[Any]]:
        """Add one call to this iteration's batch; resolves to its slice of the reply."""
        loop = asyncio.get_running_loop()
        self._redis()
        batch = self._reserves if kind == "gw_reserve" else self._settles
        if batch is None:
            batch = _Batch(_ms(now))
            if kind == "gw_reserve":
                self._reserves = batch
            else:
                self._settles = batch
            loop.call_soon(self._send, kind, batch)
        waiter: asyncio.Future[list[Any]] = loop.create_future()
        batch.keys += keys
        batch.args += args
        batch.waiters.append((width, waiter))
        return waiter

    def _send(self, kind: str, batch: _Batch) -> None:
        if kind == "gw_reserve":
            self._reserves = None
        else:
            self._settles = None
        asyncio.get_running_loop().create_task(self._deliver(kind, batch))

    async def _deliver(self, kind: str, batch: _Batch) -> None:
        args = [batch.now_ms, len(batch.waiters), *batch.args]
        try:
            reply = await self._call(kind, batch.keys, args)
        except Exception as exc:
            for _, waiter in batch.waiters:
                if not waiter.done():
                    waiter.set_exception(exc)
            return
        offset = 0
        for width, waiter in batch.waiters:
            if not waiter.done():
                waiter.set_result(list(reply[offset : offset + width]) if width else [])
            offset += width

    async def reserve(
        self, counters: list[Counter], demand: Demand, now: datetime, ttl_ms: int
    ) -> Reservation:
        """Reserve `demand` on every counter, or on none (QuotaRefused); the
        reservation holds its room for `ttl_ms`, renewed until it is settled."""
        reservation = new_reservation(counters, demand, _ms(now), ttl_ms)
        if not counters:
            return reservation
        if not settings.REDIS_URL:
            await self._reserve_local(self.local, reservation, now, share=1)
        else:
            try:
                await self._reserve_redis(reservation, now)
            except QuotaRefused:
                raise
            except Exception as exc:
                await self._reserve_without_redis(reservation, now, exc)
        self._hold(reservation)
        return reservation

    def _reserve_args(
        self, reservation: Reservation, now: datetime, inits: list[str]
    ) -> list[Any]:
        expire_at = _ms(now) + reservation.ttl_ms
        args: list[Any] = [reservation.id, expire_at, len(reservation.counters)]
        for i, counter in enumerate(reservation.counters):
            args += [
                counter.limit,
                reservation.amounts[i],
                counter.window_ms,
                counter.bucket_ms,
                counter.ttl_s(now),
                inits[i],
            ]
        return args

    async def _reserve_redis(self, reservation: Reservation, now: datetime) -> None:
        counters = reservation.counters
        n = len(counters)
        inits = ["-"] * n
        for _ in range(2):
            args = self._reserve_args(reservation, now, inits)
            keys = [c.name for c in counters]
            result = await self._enqueue("gw_reserve", keys, args, 2 + 2 * n, now)
            if result[0] == 0:  # Counters Redis does not have: rebuild them.
                lost = [
                    c
                    for c, flag in zip(counters, result[2 : 2 + n], strict=True)
                    if flag
                ]
                spent = await self._spent(lost, now)
                metrics.QUOTA_REBUILDS.inc(len(lost))
                for counter, amounts in zip(lost, spent, strict=True):
                    inits[counters.index(counter)] = _init_arg(amounts)
                continue
            if result[0] == 3:
                raise RuntimeError(
                    "the quota script failed on one of this key's counters"
                )
            used, oldest = result[2 : 2 + n], result[2 + n : 2 + 2 * n]
            self._outcome(
                reservation, result[0] == 1, int(result[1]) - 1, used, oldest, now
            )
            return
        raise RuntimeError("quota counters could not be rebuilt")

    async def _spent(
        self, counters: list[Counter], now: datetime
    ) -> list[list[tuple[int, int]]]:
        """What the ledger says the lost counters hold. LedgerUnavailable when the
        database does not answer, and for LEDGER_RETRY_S after, without asking it."""
        if time.monotonic() < self._ledger_retry_at:
            raise LedgerUnavailable("the usage ledger could not be read just now")
        try:
            return await database_sync_to_async(quota_ledger.spent_many)(counters, now)
        except (OperationalError, InterfaceError) as exc:
            self._ledger_retry_at = time.monotonic() + LEDGER_RETRY_S
            logger.warning(
                "usage ledger unreachable: quota counters cannot be rebuilt",
                exc_info=exc,
            )
            raise LedgerUnavailable("the usage ledger cannot be read") from exc

    async def _reserve_local(
        self,
        limiter: LocalLimiter,
        reservation: Reservation,
        now: datetime,
        *,
        share: int,
    ) -> None:
        ledger_may_answer = time.monotonic() >= self._ledger_retry_at
        lost = limiter.missing(
            reservation.counters, retry_provisional=ledger_may_answer
        )
        if lost:
            await self._rebuild_local(limiter, reservation, lost, now)
        limits = [max(c.limit // share, 0) for c in reservation.counters]
        expire_at = _ms(now) + reservation.ttl_ms
        admitted, refused, used, oldest = limiter.reserve_now(
            reservation, expire_at, now, limits
        )
        reservation.local = limiter
        self._outcome(reservation, admitted, refused, used, oldest, now)

    async def _rebuild_local(
        self,
        limiter: LocalLimiter,
        reservation: Reservation,
        lost: list[Counter],
        now: datetime,
    ) -> None:
        try:
            spent = await self._spent(lost, now)
        except LedgerUnavailable as exc:
            absent = [c for c in lost if not limiter.has(c)]
            if absent and _carries_budget(reservation):
                metrics.QUOTA_BACKEND_ERRORS.inc()
                raise QuotaUnavailable("the usage ledger cannot be read") from exc
            # Rates only: this process counts from zero until the ledger answers
            # (a provisional counter that was in use keeps what it has counted).
            for counter in absent:
                limiter.load_provisional(counter, now)
            return
        for counter, amounts in zip(lost, spent, strict=True):
            limiter.load(counter, amounts, now)

    async def _reserve_without_redis(
        self, reservation: Reservation, now: datetime, exc: Exception
    ) -> None:
        metrics.QUOTA_BACKEND_ERRORS.inc()
        # The ledger's failure was logged once by _spent; Redis errors are not.
        ledger = isinstance(exc, LedgerUnavailable)
        store = "usage ledger" if ledger else "quota backend"
        if _carries_budget(reservation):
            logger.error(
                "%s unreachable: budgets refused",
                store,
                exc_info=None if ledger else exc,
            )
            raise QuotaUnavailable(f"the {store} cannot be reached") from exc
        logger.warning(
            "%s unreachable: rates limited per process",
            store,
            exc_info=None if ledger else exc,
        )
        share = max(settings.GATEWAY_QUOTA_FALLBACK_SHARE, 1)
        await self._reserve_local(self.fallback, reservation, now, share=share)

    def _outcome(
        self,
        reservation: Reservation,
        admitted: bool,
        refused: int,
        used: list[Any],
        oldest: list[Any],
        now: datetime,
    ) -> None:
        states = []
        for i, counter in enumerate(reservation.counters):
            first = None if oldest[i] is None or int(oldest[i]) < 0 else int(oldest[i])
            states.append(
                CounterState(counter, int(used[i]), reset_seconds(counter, first, now))
            )
        reservation.states = states
        if not admitted:
            reservation.settled = True  # Nothing was reserved.
            raise QuotaRefused(states[refused], states)

    async def settle(
        self, reservation: Reservation, actual: Demand, now: datetime
    ) -> None:
        if reservation.settled or not reservation.counters:
            return
        reservation.settled = True
        for held in list(self._held.values()):  # Other loops run in other threads.
            held.reservations.pop(reservation.id, None)
        if reservation.local is not None:
            reservation.local.settle_now(reservation, actual, now)
            return
        args: list[Any] = [reservation.id, len(reservation.counters)]
        for i, counter in enumerate(reservation.counters):
            args += [
                reservation.buckets[i],
                actual.amount(counter.quota.metric),
                counter.window_ms,
                counter.bucket_ms,
            ]
        try:
            keys = [c.name for c in reservation.counters]
            await self._enqueue("gw_settle", keys, args, 0, now)
        except Exception:
            # The reservation expires on its own; the ledger rebuilds what is lost.
            metrics.QUOTA_BACKEND_ERRORS.inc()
            logger.warning("quota settlement failed", exc_info=True)

    # --- renewal ------------------------------------------------------------------

    def _held_here(self) -> _Held:
        loop = asyncio.get_running_loop()
        held = self._held.get(loop)
        if held is None:
            # What a closed loop held died with it, as a killed process's
            # reservations do, and expires on its own.
            for closed in [other for other in list(self._held) if other.is_closed()]:
                del self._held[closed]
            held = self._held[loop] = _Held(loop)
        return held

    def _hold(self, reservation: Reservation) -> None:
        held = self._held_here()
        held.reservations[reservation.id] = reservation
        if not self.renew_in_background:
            return
        if held.renewer is None or held.renewer.done():
            held.renewer = held.loop.create_task(self._renew_while_held(held))
        elif held.loop.time() + reservation.ttl_ms / 2000 < held.next_renewal:
            held.wake.set()  # Due before the renewer wakes: let it wake sooner.

    async def _renew_while_held(self, held: _Held) -> None:
        """Renew everything held each half of the shortest TTL held; end when
        nothing is held (the next reservation starts a new task)."""
        while (period_s := held.period_s()) is not None:
            held.next_renewal = held.loop.time() + period_s
            held.wake.clear()
            if await _woken_before(held.wake, held.next_renewal):
                continue  # A shorter TTL arrived: sleep for its period instead.
            try:
                await self.renew(timezone.now())
            except Exception:
                # Those reservations may expire; their settlements still count.
                metrics.QUOTA_BACKEND_ERRORS.inc()
                logger.warning("quota reservations could not be renewed", exc_info=True)
        held.next_renewal = math.inf

    async def renew(self, now: datetime) -> None:
        """Extend every reservation this event loop holds to `now` plus its TTL: one
        call to Redis for all of them (per RENEW_CHUNK). Expired ones stay expired."""
        held = self._held.get(asyncio.get_running_loop())
        if held is None:
            return
        on_redis = []
        for reservation in list(held.reservations.values()):
            if reservation.settled:
                continue
            if reservation.local is not None:
                expire_at = _ms(now) + reservation.ttl_ms
                reservation.local.renew_now(reservation, expire_at, now)
            else:
                on_redis.append(reservation)
        for start in range(0, len(on_redis), RENEW_CHUNK):
            await self._renew_on_redis(on_redis[start : start + RENEW_CHUNK], now)

    async def _renew_on_redis(
        self, reservations: list[Reservation], now: datetime
    ) -> None:
        keys: list[str] = []
        args: list[Any] = [_ms(now)]
        for reservation in reservations:
            expire_at = _ms(now) + reservation.ttl_ms
            for counter in reservation.counters:
                keys.append(counter.name)
                args += [reservation.id, expire_at]
        await self._call("gw_renew", keys, args)

    def held_count(self) -> int:
        """Reservations this process holds and renews (metrics, benchmarks)."""
        return sum(len(held.reservations) for held in list(self._held.values()))

    async def aclose(self) -> None:
        """Stop renewing and close this process's Redis connections."""
        held, self._held = self._held, {}
        for renewals in held.values():
            if renewals.renewer is not None:
                renewals.renewer.cancel()
        for client in self._clients.values():
            await client.aclose()
        self._clients = {}

    async def peek(
        self, counters: list[Counter], now: datetime
    ) -> list[tuple[bool, int, int]]:
        """(known, used, pending reservations) per counter, changing nothing."""
        if not settings.REDIS_URL:
            return self.local.peek(counters, now)
        args: list[Any] = [_ms(now)]
        for counter in counters:
            args += [counter.window_ms, counter.bucket_ms]
        raw = await self._call("gw_peek", [c.name for c in counters], args)
        return [
            (bool(raw[i]), int(raw[i + 1]), int(raw[i + 2]))
            for i in range(0, len(raw), 3)
        ]


async def _woken_before(wake: asyncio.Event, when: float) -> bool:
    """Whether `wake` is set before the loop time `when`."""
    try:
        async with asyncio.timeout_at(when):
            await wake.wait()
    except TimeoutError:
        return False
    return True


_limiter = Limiter()


def limiter() -> Limiter:
    return _limiter


__all__ = ["LedgerUnavailable", "Limiter", "LocalLimiter", "limiter"]
