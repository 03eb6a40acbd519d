"""Circuit breaker per route (the :class:`~ragplane.gateway.types.Breaker` protocol) over a
state store: in-process (:mod:`~ragplane.gateway.statestore`) or Redis
(:mod:`~ragplane.gateway.statestore_redis`). The state machine is drawn in the store module.

The router, for each attempt on a route::

    admission = await breaker.acquire(route)      # not allowed → skip the route
    ... the call ...
    await breaker.record(route, admission, ok=not counts_against_route(exc), latency_ms=...)
    # or, if the call was cancelled before an outcome (the caller went away):
    await breaker.release(route, admission)

What counts against a route (:func:`counts_against_route`): 5xx and 529, 408, 429,
timeouts, connection failures, protocol errors and streams broken midway. The upstream
rate limit (429) counts: the gateway's key is shared by every tenant on the route, so a
429 says the route cannot take more right now, and while it is open the router fails
over to the alias's other routes (its cooldown stands in for ``Retry-After``). What does
not count: 4xx caused by the request itself (400, 401, 403, 404, 413, 422) — the route
answered correctly — so they are recorded as successes; errors raised before a call was
made (bulkhead, unknown alias) are not recorded at all.

Every state change is a frozen :class:`BreakerTransition` passed to the registered hooks
(metrics, later) and logged. If the store is unreachable (Redis down) the breaker fails
open: it admits, logs ``breaker_store_unavailable`` (at most every 10 s) and keeps going.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from ragplane.config import GatewaySettings
from ragplane.errors import (
    GatewayError,
    StateStoreUnavailable,
    StreamInterrupted,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from ragplane.gateway.bulkhead import Bulkhead, MemoryBulkhead, RedisBulkhead
from ragplane.gateway.statestore import BreakerStore, MemoryBreakerStore, Transition
from ragplane.gateway.statestore_redis import RedisBreakerStore
from ragplane.gateway.types import Admission, BreakerState, Route, RouteHealth
from ragplane.observe.logging import get_logger

__all__ = [
    "BreakerHook",
    "BreakerTransition",
    "CircuitBreaker",
    "build_resilience",
    "counts_against_route",
    "redis_client",
]

log = get_logger(__name__)

_NOT_ROUTE_FAULTS = frozenset({400, 401, 403, 404, 413, 422})
_FAIL_OPEN = Admission(True, BreakerState.CLOSED)
_UNAVAILABLE_LOG_EVERY_S = 10.0


def counts_against_route(error: BaseException) -> bool:
    """Whether ``error`` (the outcome of a call made on a route) is the route's failure."""
    if isinstance(error, UpstreamError):
        return error.status not in _NOT_ROUTE_FAULTS
    return isinstance(
        error, UpstreamTimeout | UpstreamUnavailable | UpstreamProtocolError | StreamInterrupted
    ) or (isinstance(error, GatewayError) and error.retryable)


@dataclass(frozen=True, slots=True)
class BreakerTransition:
    """One state change of one route's breaker (what hooks receive)."""

    route: str
    from_state: BreakerState
    to_state: BreakerState
    reason: str  # failure_rate | consecutive_failures | cooldown_elapsed | probe_succeeded
    #              probe_failed | slo_breached | slo_recovered
    calls: int  # in the window when it happened
    failures: int
    at: float  # Unix time


BreakerHook = Callable[[BreakerTransition], None]


class CircuitBreaker:
    """The gateway's breaker: one state machine per route, kept in ``store``."""

    def __init__(self, store: BreakerStore, *, hooks: Iterable[BreakerHook] = ()) -> None:
        self.store = store
        self._hooks: list[BreakerHook] = list(hooks)
        self._unavailable_logged_at = -_UNAVAILABLE_LOG_EVERY_S

    def add_hook(self, hook: BreakerHook) -> None:
        self._hooks.append(hook)

    async def acquire(self, route: Route) -> Admission:
        try:
            admission, transition = await self.store.acquire(
                route.name, route.policy.breaker, route.policy.timeouts.total_s
            )
        except StateStoreUnavailable as exc:
            self._unavailable(route, exc)
            return _FAIL_OPEN
        if transition is not None:
            self._emit(route.name, transition)
        return admission

    async def record(
        self, route: Route, admission: Admission, *, ok: bool, latency_ms: float
    ) -> BreakerState:
        try:
            state, transition = await self.store.record(
                route.name,
                route.policy.breaker,
                ok=ok,
                latency_ms=latency_ms,
                lease=admission.lease if admission.probe else None,
            )
        except StateStoreUnavailable as exc:
            self._unavailable(route, exc)
            return admission.state
        if transition is not None:
            self._emit(route.name, transition)
        return state

    async def release(self, route: Route, admission: Admission) -> None:
        """Return a probe's lease without an outcome (the call was cancelled)."""
        if not admission.probe or admission.lease is None:
            return
        try:
            await self.store.release(route.name, admission.lease)
        except StateStoreUnavailable as exc:
            self._unavailable(route, exc)

    async def health(self, route: Route) -> RouteHealth:
        stats = await self.store.stats(route.name, route.policy.breaker)
        return RouteHealth(
            route=route.name,
            state=stats.state,
            calls=stats.calls,
            error_rate=stats.failures / stats.calls if stats.calls else 0.0,
            p50_ms=stats.p50_ms,
            p95_ms=stats.p95_ms,
        )

    async def aclose(self) -> None:
        await self.store.aclose()

    def _emit(self, route: str, transition: Transition) -> None:
        event = BreakerTransition(
            route=route,
            from_state=transition.from_state,
            to_state=transition.to_state,
            reason=transition.reason,
            calls=transition.calls,
            failures=transition.failures,
            at=time.time(),
        )
        level = log.warning if event.to_state is BreakerState.OPEN else log.info
        level(
            "breaker_transition",
            route=route,
            from_state=str(event.from_state),
            to_state=str(event.to_state),
            reason=event.reason,
            calls=event.calls,
            failures=event.failures,
        )
        for hook in self._hooks:
            try:
                hook(event)
            except Exception:  # a broken metrics hook must not fail a call
                log.exception("breaker_hook_failed", route=route, hook=repr(hook))

    def _unavailable(self, route: Route, exc: StateStoreUnavailable) -> None:
        now = time.monotonic()
        if now - self._unavailable_logged_at >= _UNAVAILABLE_LOG_EVERY_S:
            self._unavailable_logged_at = now
            log.warning("breaker_store_unavailable", route=route.name, error=str(exc))


def redis_client(url: str) -> aioredis.Redis:
    """A client for the hot path: short timeouts and one immediate retry (a stale pooled
    connection), never redis-py's default of ten retries with backoff."""
    return aioredis.Redis.from_url(
        url,
        decode_responses=True,
        socket_timeout=0.5,
        socket_connect_timeout=0.5,
        retry=Retry(NoBackoff(), 1),
        health_check_interval=30,
    )


def build_resilience(
    settings: GatewaySettings,
    *,
    hooks: Iterable[BreakerHook] = (),
    prefix: str = "ragplane:",
) -> tuple[CircuitBreaker, Bulkhead, Callable[[], Awaitable[None]]]:
    """The breaker, the bulkhead and a function that closes them: in Redis when
    ``settings.redis_url`` is set (replicas share the state), else in-process."""
    if settings.redis_url is None:
        breaker = CircuitBreaker(MemoryBreakerStore(), hooks=hooks)
        bulkhead: Bulkhead = MemoryBulkhead(settings.bulkheads)
    else:
        client = redis_client(settings.redis_url.get_secret_value())
        breaker = CircuitBreaker(RedisBreakerStore(client, prefix=prefix), hooks=hooks)
        bulkhead = RedisBulkhead(client, settings.bulkheads, prefix=prefix)

    async def close() -> None:
        try:
            await breaker.aclose()
            await bulkhead.aclose()
        finally:
            if settings.redis_url is not None:
                await client.aclose()

    return breaker, bulkhead, close
