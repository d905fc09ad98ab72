"""The limiter's in-process backend: the same algorithm as the Redis scripts, in
this process's memory.

It is the whole limiter without Redis (the embedded default, one web process),
and the fallback for rates while Redis cannot be reached, with a share of each
limit (`keys.limiter`). Every method runs with no await inside, so a check and its
reservation are atomic within the event loop.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field
from datetime import datetime

from keys.quotas import Counter, Demand, Reservation, epoch_ms

# In-process counters are forgotten once expired, checked when there are this many
# (then again when their number has doubled, so the scan costs O(1) per request).
PRUNE_AT = 10_000


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
        now_ms = epoch_ms(now)
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
        now_ms = epoch_ms(now)
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
        now_ms = epoch_ms(now)
        for counter in reservation.counters:
            state = self._counters.get(counter.name)
            if state is not None:
                state.renew(reservation.id, expire_at_ms, now_ms)

    def peek(
        self, counters: list[Counter], now: datetime
    ) -> list[tuple[bool, int, int]]:
        """(known, used, live reservations) per counter, changing nothing. A scan of
        the counter's reservations: for tests and diagnostics, not the request path."""
        now_ms = epoch_ms(now)
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
