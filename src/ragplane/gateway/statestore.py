"""Where breaker state lives: the :class:`BreakerStore` protocol and its in-process store.

A store owns the state machine of every route, so that one call decides atomically (the
Redis store, ``statestore_redis.py``, runs the same rules as Lua scripts)::

    CLOSED ──failure rate ≥ policy over the window (≥ min_calls calls),──▶ OPEN
      ▲ │     or consecutive_failures failures in a row                     │
      │ └─p95 > slo_p95_ms (≥ min_calls successes)─▶ DEGRADED ─(also trips)─┤
      │                                                                     │ cooldown_s
      └───────── a probe succeeds (window reset) ◀── HALF_OPEN ◀────────────┘
                         a probe fails ──▶ OPEN again

HALF_OPEN admits at most ``half_open_probes`` probes at once; each holds a lease that
expires after ``lease_s`` (the route's total timeout), so a probe that crashed without
being recorded does not wedge the route.

The window is ``BUCKETS`` time buckets of ``window_s / BUCKETS`` seconds: per bucket, the
calls, the failures and a log-scale histogram of successful calls' latencies (bins 20 %
wide, so percentiles are within about 10 %). Only successes feed the latency figures (a
refused connection is fast, a timeout is the timeout). Recording is O(1); expired buckets
are subtracted from running totals as time moves on.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from ragplane.config import BreakerPolicy
from ragplane.gateway.types import Admission, BreakerState

__all__ = [
    "BUCKETS",
    "HIST_BINS",
    "BreakerStore",
    "MemoryBreakerStore",
    "Transition",
    "WindowStats",
    "bin_latency_ms",
    "latency_bin",
    "percentile_bin",
    "slo_bin",
]

BUCKETS = 10
_GROWTH = 1.2
_LOG_GROWTH = math.log(_GROWTH)
HIST_BINS = 80  # bin i ≥ 1 holds [1.2**(i-1), 1.2**i) ms; the last one everything above

CLOSED, OPEN, HALF_OPEN, DEGRADED = (
    BreakerState.CLOSED,
    BreakerState.OPEN,
    BreakerState.HALF_OPEN,
    BreakerState.DEGRADED,
)


def latency_bin(latency_ms: float) -> int:
    if latency_ms < 1.0:
        return 0
    return min(HIST_BINS - 1, 1 + int(math.log(latency_ms) / _LOG_GROWTH))


def bin_latency_ms(index: int) -> float:
    """A bin's representative latency (its geometric middle; 0.5 ms for bin 0)."""
    return 0.5 if index == 0 else float(_GROWTH ** (index - 0.5))


@functools.lru_cache(maxsize=256)
def slo_bin(slo_p95_ms: float | None) -> int:
    """The lowest bin whose latency is above the SLO (-1: no SLO)."""
    if slo_p95_ms is None:
        return -1
    return next((i for i in range(HIST_BINS) if bin_latency_ms(i) > slo_p95_ms), HIST_BINS)


def percentile_bin(hist: list[int], n: int, percent: int) -> int:
    """The bin of the ``percent``-th percentile of ``n`` samples (nearest rank; -1 if none)."""
    if n <= 0:
        return -1
    rank = (n * percent + 99) // 100
    seen = 0
    for index, count in enumerate(hist):
        seen += count
        if seen >= rank:
            return index
    return HIST_BINS - 1


@dataclass(frozen=True, slots=True)
class Transition:
    from_state: BreakerState
    to_state: BreakerState
    reason: str  # failure_rate | consecutive_failures | cooldown_elapsed | probe_succeeded
    #              probe_failed | slo_breached | slo_recovered
    calls: int  # in the window when it happened
    failures: int


@dataclass(frozen=True, slots=True)
class WindowStats:
    state: BreakerState
    calls: int
    failures: int
    p50_ms: float | None
    p95_ms: float | None


class BreakerStore(Protocol):
    """The breaker state of every route; each method is one atomic step."""

    async def acquire(
        self, route: str, policy: BreakerPolicy, lease_s: float
    ) -> tuple[Admission, Transition | None]: ...

    async def record(
        self,
        route: str,
        policy: BreakerPolicy,
        *,
        ok: bool,
        latency_ms: float,
        lease: str | None,
    ) -> tuple[BreakerState, Transition | None]: ...

    async def release(self, route: str, lease: str) -> None:
        """Give a probe lease back without an outcome (the call was cancelled)."""
        ...

    async def stats(self, route: str, policy: BreakerPolicy) -> WindowStats: ...

    async def aclose(self) -> None: ...


class _Route:
    __slots__ = (
        "b_calls",
        "b_fails",
        "b_hist",
        "calls",
        "consecutive",
        "epoch",
        "fails",
        "hist",
        "leases",
        "opened_at",
        "state",
    )

    def __init__(self, epoch: int) -> None:
        self.state = CLOSED
        self.opened_at = 0.0
        self.consecutive = 0
        self.leases: dict[str, float] = {}
        self.epoch = epoch
        self.calls = 0
        self.fails = 0
        self.hist = [0] * HIST_BINS
        self.b_calls = [0] * BUCKETS
        self.b_fails = [0] * BUCKETS
        self.b_hist: list[dict[int, int]] = [{} for _ in range(BUCKETS)]

    def advance(self, epoch: int) -> bool:
        """Move the window to ``epoch``, dropping buckets that fell out. True if it moved."""
        last = self.epoch
        if epoch <= last:
            return False
        if epoch - last >= BUCKETS:
            self.reset()
        else:
            for k in range(last + 1, epoch + 1):
                i = k % BUCKETS
                self.calls -= self.b_calls[i]
                self.fails -= self.b_fails[i]
                for index, count in self.b_hist[i].items():
                    self.hist[index] -= count
                self.b_calls[i] = self.b_fails[i] = 0
                self.b_hist[i].clear()
        self.epoch = epoch
        return True

    def reset(self) -> None:
        self.calls = self.fails = 0
        self.hist = [0] * HIST_BINS
        self.b_calls = [0] * BUCKETS
        self.b_fails = [0] * BUCKETS
        for bucket in self.b_hist:
            bucket.clear()

    def add(self, ok: bool, latency_ms: float) -> None:
        i = self.epoch % BUCKETS
        self.calls += 1
        self.b_calls[i] += 1
        if ok:
            index = latency_bin(latency_ms)
            self.hist[index] += 1
            bucket = self.b_hist[i]
            bucket[index] = bucket.get(index, 0) + 1
        else:
            self.fails += 1
            self.b_fails[i] += 1

    def latency_state(self, policy: BreakerPolicy) -> BreakerState:
        """CLOSED or DEGRADED by the window's p95 against the SLO."""
        successes = self.calls - self.fails
        if policy.slo_p95_ms is None or successes < policy.min_calls:
            return CLOSED
        p95 = percentile_bin(self.hist, successes, 95)
        return DEGRADED if p95 >= slo_bin(policy.slo_p95_ms) else CLOSED


class MemoryBreakerStore:
    """In-process breaker state (one replica, or tests with an injected ``clock``)."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._routes: dict[str, _Route] = {}
        self._lease_seq = 0

    def _route(self, route: str, policy: BreakerPolicy) -> tuple[_Route, float, bool]:
        """The route's state with its window moved to now; True if the window moved."""
        now = self._clock()
        epoch = int(now // (policy.window_s / BUCKETS))
        state = self._routes.get(route)
        if state is None:
            state = self._routes[route] = _Route(epoch)
            return state, now, False
        return state, now, state.advance(epoch)

    def _move(self, r: _Route, to: BreakerState, reason: str) -> Transition:
        transition = Transition(r.state, to, reason, r.calls, r.fails)
        r.state = to
        return transition

    async def acquire(
        self, route: str, policy: BreakerPolicy, lease_s: float
    ) -> tuple[Admission, Transition | None]:
        known = self._routes.get(route)
        if known is None or known.state is CLOSED:  # its window moves on the next record
            return _ADMIT_CLOSED, None
        r, now, moved = self._route(route, policy)
        state = r.state
        transition = None
        if state is DEGRADED:
            if moved and r.latency_state(policy) is CLOSED:
                return _ADMIT_CLOSED, self._move(r, CLOSED, "slo_recovered")
            return _ADMIT_DEGRADED, None
        if state is OPEN:
            if now < r.opened_at + policy.cooldown_s:
                return _REJECT_OPEN, None
            transition = self._move(r, HALF_OPEN, "cooldown_elapsed")
            r.leases.clear()
        leases = r.leases
        for lease, expiry in list(leases.items()):
            if expiry <= now:
                del leases[lease]
        if len(leases) >= policy.half_open_probes:
            return _REJECT_HALF_OPEN, transition
        self._lease_seq += 1
        lease = str(self._lease_seq)
        leases[lease] = now + lease_s
        return Admission(True, HALF_OPEN, probe=True, lease=lease), transition

    async def record(
        self,
        route: str,
        policy: BreakerPolicy,
        *,
        ok: bool,
        latency_ms: float,
        lease: str | None,
    ) -> tuple[BreakerState, Transition | None]:
        r, now, _ = self._route(route, policy)
        if lease is not None and r.state is HALF_OPEN and r.leases.pop(lease, None) is not None:
            r.leases.clear()
            if ok:
                transition = self._move(r, CLOSED, "probe_succeeded")
                r.reset()
                r.consecutive = 0
                return CLOSED, transition
            r.opened_at = now
            return OPEN, self._move(r, OPEN, "probe_failed")
        r.add(ok, latency_ms)
        state = r.state
        if state is OPEN or state is HALF_OPEN:
            return state, None
        if ok:
            r.consecutive = 0
            if policy.slo_p95_ms is None:
                return state, None
        else:
            r.consecutive += 1
            reason = None
            if r.consecutive >= policy.consecutive_failures:
                reason = "consecutive_failures"
            elif r.calls >= policy.min_calls and r.fails >= policy.failure_rate * r.calls:
                reason = "failure_rate"
            if reason is not None:
                r.opened_at = now
                r.consecutive = 0
                return OPEN, self._move(r, OPEN, reason)
        latency_state = r.latency_state(policy)
        if latency_state is state:
            return state, None
        reason = "slo_breached" if latency_state is DEGRADED else "slo_recovered"
        return latency_state, self._move(r, latency_state, reason)

    async def release(self, route: str, lease: str) -> None:
        r = self._routes.get(route)
        if r is not None:
            r.leases.pop(lease, None)

    async def stats(self, route: str, policy: BreakerPolicy) -> WindowStats:
        r, _, _ = self._route(route, policy)
        successes = r.calls - r.fails
        p50 = percentile_bin(r.hist, successes, 50)
        p95 = percentile_bin(r.hist, successes, 95)
        return WindowStats(
            state=r.state,
            calls=r.calls,
            failures=r.fails,
            p50_ms=bin_latency_ms(p50) if p50 >= 0 else None,
            p95_ms=bin_latency_ms(p95) if p95 >= 0 else None,
        )

    async def aclose(self) -> None:
        self._routes.clear()


_ADMIT_CLOSED = Admission(True, CLOSED)
_ADMIT_DEGRADED = Admission(True, DEGRADED)
_REJECT_OPEN = Admission(False, OPEN)
_REJECT_HALF_OPEN = Admission(False, HALF_OPEN)
