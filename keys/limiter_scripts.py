"""The limiter's Lua scripts, how they are loaded, and the arguments they take.

Each script runs alone on Redis, so what it does is atomic across processes. The
comment above each states its KEYS and ARGV; the `*_args` functions below build
exactly those, so the layout is written down in one place.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

from keys.quotas import Counter, Demand, Reservation, epoch_ms

# A call of one registered script: (name, keys, args) -> its reply.
ScriptCall = Callable[[str, list[str], list[Any]], Awaitable[Any]]

# What RESERVE answers per reservation, first.
MISSING, RESERVED, REFUSED, FAILED = 0, 1, 2, 3

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


def connect(url: str, timeout_s: float) -> Any:
    """A Redis client with the scripts registered as `gw_reserve`, `gw_settle`,
    `gw_peek` and `gw_renew` (sent by hash, loaded on first use)."""
    # Imported here: without REDIS_URL a process never needs redis-py.
    import redis.asyncio as aioredis

    # No socket_timeout: redis-py would wrap every send in a task
    # (asyncio.wait_for); callers bound each call with asyncio.timeout instead.
    client = aioredis.Redis.from_url(url, socket_connect_timeout=timeout_s)
    client.gw_reserve = client.register_script(RESERVE)
    client.gw_settle = client.register_script(SETTLE)
    client.gw_peek = client.register_script(PEEK)
    client.gw_renew = client.register_script(RENEW)
    return client


def init_arg(spent: list[tuple[int, int]]) -> str:
    """RESERVE's `init` for a counter rebuilt from the ledger's (bucket, amount)s."""
    return ",".join(f"{bucket}:{amount}" for bucket, amount in spent) or "0:0"


def reserve_args(
    reservation: Reservation, now: datetime, inits: list[str]
) -> list[Any]:
    """One reservation's part of RESERVE's ARGV (after now_ms and count)."""
    expire_at = epoch_ms(now) + reservation.ttl_ms
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


def settle_args(reservation: Reservation, actual: Demand) -> list[Any]:
    """One settlement's part of SETTLE's ARGV (after now_ms and count)."""
    args: list[Any] = [reservation.id, len(reservation.counters)]
    for i, counter in enumerate(reservation.counters):
        args += [
            reservation.buckets[i],
            actual.amount(counter.quota.metric),
            counter.window_ms,
            counter.bucket_ms,
        ]
    return args


def peek_args(counters: list[Counter], now: datetime) -> list[Any]:
    args: list[Any] = [epoch_ms(now)]
    for counter in counters:
        args += [counter.window_ms, counter.bucket_ms]
    return args


def renew_call(
    reservations: list[Reservation], now: datetime
) -> tuple[list[str], list[Any]]:
    """RENEW's KEYS and ARGV: every counter of each reservation, to now + its TTL."""
    keys: list[str] = []
    args: list[Any] = [epoch_ms(now)]
    for reservation in reservations:
        expire_at = epoch_ms(now) + reservation.ttl_ms
        for counter in reservation.counters:
            keys.append(counter.name)
            args += [reservation.id, expire_at]
    return keys, args
