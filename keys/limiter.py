"""The limiter backends: Redis (shared by every process) and in-process.

`limiter()` picks one per process. Both run the same algorithm (`keys.quotas`):
purge expired reservations, sum each counter's window, refuse if any counter lacks
room, else reserve on all of them. With Redis this is one Lua script, so it is
atomic across processes and costs one round trip whatever the number of quotas.

Redis unreachable: requests carrying a cost budget are refused with 503 (money is
never admitted blind); request and token rates fall back to the in-process limiter
with a share of each limit (`GATEWAY_QUOTA_FALLBACK_SHARE`, the number of web
processes). Both are counted in metrics.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime
from typing import Any

from channels.db import database_sync_to_async
from django.conf import settings

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


def _init_arg(spent: list[tuple[int, int]]) -> str:
    return ",".join(f"{bucket}:{amount}" for bucket, amount in spent) or "0:0"


class LocalLimiter:
    """The same algorithm in this process's memory (the embedded default)."""

    def __init__(self) -> None:
        self._buckets: dict[str, dict[int, int]] = {}
        self._pending: dict[str, dict[str, tuple[int, int, int]]] = {}
        self._expires: dict[str, float] = {}

    def missing(self, counters: list[Counter]) -> list[Counter]:
        return [c for c in counters if c.name not in self._buckets]

    def load(
        self, counter: Counter, spent: list[tuple[int, int]], now: datetime
    ) -> None:
        if counter.name not in self._buckets:
            self._buckets[counter.name] = {b: a for b, a in spent if a}
            self._pending[counter.name] = {}
            self._touch(counter, now)

    def _touch(self, counter: Counter, now: datetime) -> None:
        ttl = counter.ttl_s(now)
        self._expires[counter.name] = now.timestamp() + ttl if ttl else float("inf")

    def reserve_now(
        self,
        reservation: Reservation,
        expire_at_ms: int,
        now: datetime,
        limits: list[int],
    ) -> tuple[bool, int, list[int], list[int | None]]:
        """Check and reserve with no await in between: atomic within the loop."""
        now_ms_ = int(now.timestamp() * 1000)
        used: list[int] = []
        oldest: list[int | None] = []
        for counter in reservation.counters:
            buckets = self._buckets[counter.name]
            pending = self._pending[counter.name]
            for res_id, (expire_at, bucket, amount) in list(pending.items()):
                if expire_at <= now_ms_:
                    del pending[res_id]
                    if bucket in buckets:
                        buckets[bucket] -= amount
            live = {
                b: a
                for b, a in buckets.items()
                if not counter.window_ms
                or b + counter.bucket_ms > now_ms_ - counter.window_ms
            }
            if len(live) != len(buckets):
                self._buckets[counter.name] = buckets = live
            used.append(sum(buckets.values()))
            positive = [b for b, a in buckets.items() if a > 0]
            oldest.append(min(positive) if positive else None)
        for i, amount in enumerate(reservation.amounts):
            if amount > 0 and used[i] + amount > limits[i]:
                return False, i, used, oldest
        for i, counter in enumerate(reservation.counters):
            bucket, amount = reservation.buckets[i], reservation.amounts[i]
            buckets = self._buckets[counter.name]
            buckets[bucket] = buckets.get(bucket, 0) + amount
            self._pending[counter.name][reservation.id] = (expire_at_ms, bucket, amount)
            used[i] += amount
            if oldest[i] is None and amount > 0:
                oldest[i] = bucket
            self._touch(counter, now)
        self._prune(now)
        return True, -1, used, oldest

    def settle_now(
        self, reservation: Reservation, actual: Demand, now: datetime
    ) -> None:
        now_ms_ = int(now.timestamp() * 1000)
        for i, counter in enumerate(reservation.counters):
            buckets = self._buckets.get(counter.name)
            if buckets is None:
                continue
            bucket = reservation.buckets[i]
            if (
                counter.window_ms
                and bucket + counter.bucket_ms <= now_ms_ - counter.window_ms
            ):
                self._pending[counter.name].pop(reservation.id, None)
                continue
            amount = actual.amount(counter.quota.metric)
            held = self._pending[counter.name].pop(reservation.id, None)
            reserved = held[2] if held is not None else 0
            buckets[bucket] = buckets.get(bucket, 0) + amount - reserved

    def peek(
        self, counters: list[Counter], now: datetime
    ) -> list[tuple[bool, int, int]]:
        now_ms_ = int(now.timestamp() * 1000)
        out = []
        for counter in counters:
            buckets = self._buckets.get(counter.name)
            if buckets is None:
                out.append((False, 0, 0))
                continue
            total = sum(
                a
                for b, a in buckets.items()
                if not counter.window_ms
                or b + counter.bucket_ms > now_ms_ - counter.window_ms
            )
            pending = sum(
                1 for e, _, _ in self._pending[counter.name].values() if e > now_ms_
            )
            out.append((True, total, pending))
        return out

    def _prune(self, now: datetime) -> None:
        if len(self._expires) < 10_000:
            return
        stamp = now.timestamp()
        for name in [n for n, at in self._expires.items() if at < stamp]:
            self._buckets.pop(name, None)
            self._pending.pop(name, None)
            self._expires.pop(name, None)

    def clear(self) -> None:
        self._buckets.clear()
        self._pending.clear()
        self._expires.clear()


class _Batch:
    """Calls made during one event-loop iteration, sent to Redis as one script call."""

    def __init__(self, now_ms: int) -> None:
        self.now_ms = (
            now_ms  # The clock of the first call; calls of one batch share it.
        )
        self.keys: list[str] = []
        self.args: list[Any] = []
        self.waiters: list[tuple[int, asyncio.Future[list[Any]]]] = []


class Limiter:
    """Reserve and settle, on Redis when configured, else in this process.

    With Redis, every reservation made in one event-loop iteration goes to Redis in
    one script call (and likewise settlements): one round trip per request at most,
    shared under load, and no waiting (the batch is sent when the iteration ends).
    """

    def __init__(self) -> None:
        self.local = LocalLimiter()
        # Used when Redis is down: rates get a per-process share of their limits.
        self.fallback = LocalLimiter()
        self._clients: dict[asyncio.AbstractEventLoop, Any] = {}
        self._reserves: _Batch | None = None
        self._settles: _Batch | None = None

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
            batch = _Batch(int(now.timestamp() * 1000))
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
        reservation = new_reservation(counters, demand, int(now.timestamp() * 1000))
        if not counters:
            return reservation
        if settings.REDIS_URL:
            try:
                return await self._reserve_redis(reservation, now, ttl_ms)
            except QuotaRefused:
                raise
            except Exception as exc:
                return await self._reserve_without_redis(reservation, now, ttl_ms, exc)
        return await self._reserve_local(self.local, reservation, now, ttl_ms, share=1)

    def _reserve_args(
        self, reservation: Reservation, now: datetime, ttl_ms: int, inits: list[str]
    ) -> list[Any]:
        now_ms_ = int(now.timestamp() * 1000)
        args: list[Any] = [reservation.id, now_ms_ + ttl_ms, len(reservation.counters)]
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

    async def _reserve_redis(
        self, reservation: Reservation, now: datetime, ttl_ms: int
    ) -> Reservation:
        counters = reservation.counters
        n = len(counters)
        inits = ["-"] * n
        for _ in range(2):
            args = self._reserve_args(reservation, now, ttl_ms, inits)
            keys = [c.name for c in counters]
            result = await self._enqueue("gw_reserve", keys, args, 2 + 2 * n, now)
            if result[0] == 0:  # Counters Redis does not have: rebuild them.
                lost = [
                    c
                    for c, flag in zip(counters, result[2 : 2 + n], strict=True)
                    if flag
                ]
                metrics.QUOTA_REBUILDS.inc(len(lost))
                spent = await database_sync_to_async(quota_ledger.spent_many)(lost, now)
                for counter, amounts in zip(lost, spent, strict=True):
                    inits[counters.index(counter)] = _init_arg(amounts)
                continue
            if result[0] == 3:
                raise RuntimeError(
                    "the quota script failed on one of this key's counters"
                )
            used, oldest = result[2 : 2 + n], result[2 + n : 2 + 2 * n]
            return self._outcome(
                reservation, result[0] == 1, int(result[1]) - 1, used, oldest, now
            )
        raise RuntimeError("quota counters could not be rebuilt")

    async def _reserve_local(
        self,
        limiter: LocalLimiter,
        reservation: Reservation,
        now: datetime,
        ttl_ms: int,
        *,
        share: int,
    ) -> Reservation:
        lost = limiter.missing(reservation.counters)
        if lost:
            spent = await database_sync_to_async(quota_ledger.spent_many)(lost, now)
            for counter, amounts in zip(lost, spent, strict=True):
                limiter.load(counter, amounts, now)
        limits = [max(c.limit // share, 0) for c in reservation.counters]
        expire_at = int(now.timestamp() * 1000) + ttl_ms
        admitted, refused, used, oldest = limiter.reserve_now(
            reservation, expire_at, now, limits
        )
        reservation.local = limiter
        return self._outcome(reservation, admitted, refused, used, oldest, now)

    async def _reserve_without_redis(
        self, reservation: Reservation, now: datetime, ttl_ms: int, exc: Exception
    ) -> Reservation:
        metrics.QUOTA_BACKEND_ERRORS.inc()
        if any(c.quota.metric == "cost_usd" for c in reservation.counters):
            logger.error("quota backend unreachable: budgets refused", exc_info=exc)
            raise QuotaUnavailable("the quota store cannot be reached") from exc
        logger.warning(
            "quota backend unreachable: rates limited per process", exc_info=exc
        )
        share = max(settings.GATEWAY_QUOTA_FALLBACK_SHARE, 1)
        return await self._reserve_local(
            self.fallback, reservation, now, ttl_ms, share=share
        )

    def _outcome(
        self,
        reservation: Reservation,
        admitted: bool,
        refused: int,
        used: list[Any],
        oldest: list[Any],
        now: datetime,
    ) -> Reservation:
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
        return reservation

    async def settle(
        self, reservation: Reservation, actual: Demand, now: datetime
    ) -> None:
        if reservation.settled or not reservation.counters:
            return
        reservation.settled = True
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

    async def peek(
        self, counters: list[Counter], now: datetime
    ) -> list[tuple[bool, int, int]]:
        """(known, used, pending reservations) per counter, changing nothing."""
        if not settings.REDIS_URL:
            return self.local.peek(counters, now)
        args: list[Any] = [int(now.timestamp() * 1000)]
        for counter in counters:
            args += [counter.window_ms, counter.bucket_ms]
        raw = await self._call("gw_peek", [c.name for c in counters], args)
        return [
            (bool(raw[i]), int(raw[i + 1]), int(raw[i + 2]))
            for i in range(0, len(raw), 3)
        ]


_limiter = Limiter()


def limiter() -> Limiter:
    return _limiter


__all__ = ["Limiter", "LocalLimiter", "limiter"]
