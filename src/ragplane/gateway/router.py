"""Aliases to routes, and the attempt loop around one call.

For a call to an alias the router tries its routes in order (or in a weighted random
order), routes it last saw unhealthy at the end, then the alias's fallback aliases.
Each route gets attempts bounded by its retry policy (count and total time, full
jitter, ``Retry-After``), each attempt inside a bulkhead slot and a breaker admission.

A retry happens only before the first byte reached the caller: for a stream, the
router waits for the upstream's first body chunk before it answers the caller at
all, so every failure up to that point is still retryable or can fail over; after
it, a failure ends the caller's stream with an explicit error event.
"""

from __future__ import annotations

import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar, cast

from ragplane.config import GatewaySettings
from ragplane.errors import (
    GatewayError,
    NoHealthyRoute,
    RegionNotServed,
    UnknownAlias,
    UpstreamError,
    UpstreamProtocolError,
)
from ragplane.gateway.apierrors import upstream_error
from ragplane.gateway.breaker import counts_against_route
from ragplane.gateway.bulkhead import Bulkhead, SlotContext
from ragplane.gateway.ledger import LedgerSink
from ragplane.gateway.pricing import cost_usd
from ragplane.gateway.providers import adapter_for, caller_wants_usage, embeddings_adapter
from ragplane.gateway.relay import StreamRelay
from ragplane.gateway.retry import RetryBudget
from ragplane.gateway.sse import SseDecoder
from ragplane.gateway.types import (
    Admission,
    Api,
    Breaker,
    BreakerState,
    LedgerEntry,
    Pool,
    Route,
    StreamTranslator,
    Transport,
    UpstreamRequest,
    UpstreamResponse,
    Usage,
)
from ragplane.observe.logging import get_logger

__all__ = ["Call", "Completion", "Router", "StreamResult"]

log = get_logger("ragplane.gateway")

T = TypeVar("T")
CallKind = Literal["chat", "embeddings"]
_RANK = {BreakerState.CLOSED: 0, BreakerState.HALF_OPEN: 1, BreakerState.DEGRADED: 1}


@dataclass(slots=True)
class Call:
    """One caller request, already authenticated and parsed (not frozen, as every record
    made per call on this path: a frozen dataclass sets each field through
    ``object.__setattr__``, 13 calls here)."""

    api: Api
    alias: str
    body: dict[str, Any]
    tenant_id: str
    request_id: str
    stream: bool = False
    kind: CallKind = "chat"
    feature_id: str | None = None
    trace_id: str | None = None
    pool: Pool = "interactive"
    headers: Mapping[str, str] = field(default_factory=dict)
    region: str | None = None  # the tenant's home region: routes pinned elsewhere are skipped
    traceparent: str | None = None  # forwarded to providers


@dataclass(slots=True)
class Completion:
    body: dict[str, Any]
    route: Route
    usage: Usage
    attempts: int
    upstream_ms: float  # time spent waiting for providers, every attempt
    raw: bytes | None = None  # the provider's own bytes, when ``body`` is its answer as is


@dataclass(slots=True)
class StreamResult:
    """A stream whose first upstream chunk has arrived; ``frames`` yields caller bytes.

    The caller must end it with ``await frames.aclose()`` when done or gone (idempotent):
    that releases the upstream connection and the bulkhead slot and writes the ledger row.
    """

    route: Route
    frames: StreamRelay
    upstream_ms: float  # waiting for providers until the first chunk, every attempt


@dataclass(frozen=True, slots=True)
class _Started:
    """A stream attempt that got its first chunk (nothing sent to the caller yet)."""

    route: Route
    response: UpstreamResponse
    chunks: AsyncIterator[bytes]
    decoder: SseDecoder
    translator: StreamTranslator
    first: list[bytes]
    ttft_ms: float


_NO_PROBE = Admission(True, BreakerState.CLOSED)


@dataclass(slots=True)
class _Tally:
    started: float
    attempts: int = 0
    upstream_s: float = 0.0
    route: Route | None = None
    last_error: GatewayError | None = None
    budget: RetryBudget | None = None  # made at the first failure: most calls need none


_FAIL_OVER: Any = object()


def _traced(request: UpstreamRequest, call: Call) -> UpstreamRequest:
    """The caller's trace continues at the provider (W3C traceparent)."""
    if call.traceparent is not None:
        request.headers["traceparent"] = call.traceparent
    return request


def _status_error(route: Route, response: UpstreamResponse, data: bytes) -> UpstreamError:
    """The provider's error status, as our error with its provider and route."""
    return upstream_error(
        route.upstream_api,
        response.status,
        response.headers,
        data,
        provider=route.provider_name,
        route=route.name,
    )


async def _raise_for_status(route: Route, response: UpstreamResponse) -> None:
    if response.status >= 400:
        raise _status_error(route, response, await response.read())


class Router:
    def __init__(
        self,
        settings: GatewaySettings,
        *,
        transports: Mapping[str, Transport],
        breaker: Breaker,
        bulkhead: Bulkhead,
        ledger: LedgerSink | None,
        rng: random.Random | None = None,
    ) -> None:
        self.settings = settings
        self._transports = transports
        self._breaker = breaker
        self._bulkhead = bulkhead
        self._ledger = ledger
        self._rng = rng or random.Random()  # noqa: S311 - routing, not security
        self._routes = {alias: self._build_routes(alias) for alias in settings.aliases}
        self._seen: dict[str, BreakerState] = {}
        # plans of aliases without a weighted draw, until a route's health changes
        self._plans: dict[tuple[str, str | None], tuple[Route, ...]] = {}
        self._fixed = {alias: self._fixed_order(alias) for alias in settings.aliases}

    # -- plans -------------------------------------------------------------------------

    def _build_routes(self, alias: str) -> tuple[Route, ...]:
        policy = self.settings.aliases[alias]
        routes = []
        for r in policy.routes:
            model = self.settings.models[r.model]
            routes.append(
                Route(
                    alias=alias,
                    name=f"{alias}/{r.model}",
                    model_key=r.model,
                    model=model,
                    provider_name=model.provider,
                    provider=self.settings.providers[model.provider],
                    policy=policy,
                )
            )
        return tuple(routes)

    def aliases(self) -> Mapping[str, tuple[Route, ...]]:
        return self._routes

    def plan(self, alias: str, region: str | None = None) -> tuple[Route, ...]:
        """Routes to try, in order: the alias's own (healthy first), then its fallbacks'.

        With ``region``, routes whose provider is pinned to another region are left out:
        a tenant's prompts are never sent for inference outside its home region.
        """
        cached = self._plans.get((alias, region))
        if cached is not None:
            return cached
        if alias not in self._routes:
            raise UnknownAlias(f"model {alias!r} is not a configured alias")
        plan = tuple(r for name in self._chain(alias) for r in self._ordered(name))
        if region is not None:
            allowed = tuple(r for r in plan if r.provider.region in (None, region))
            if plan and not allowed:
                raise RegionNotServed(
                    f"no route of {alias!r} may serve region {region!r} (the tenant's home)"
                )
            plan = allowed
        if self._fixed[alias]:
            self._plans[alias, region] = plan
        return plan

    def _chain(self, alias: str) -> list[str]:
        """The alias, then its fallbacks' (breadth first, each once)."""
        chain: list[str] = []
        queue = [alias]
        while queue:
            name = queue.pop(0)
            if name not in chain:
                chain.append(name)
                queue.extend(self.settings.aliases[name].fallbacks)
        return chain

    def _fixed_order(self, alias: str) -> bool:
        """True if the alias's plan depends on route health only (no weighted draw)."""
        return not any(
            self.settings.aliases[name].strategy == "weighted" and len(self._routes[name]) > 1
            for name in self._chain(alias)
        )

    def _ordered(self, alias: str) -> list[Route]:
        routes = list(self._routes[alias])
        if self.settings.aliases[alias].strategy == "weighted" and len(routes) > 1:
            routes = self._weighted_order(routes)
        # stable: the configured (or drawn) order holds among routes of equal health
        return sorted(
            routes, key=lambda r: _RANK.get(self._seen.get(r.name, BreakerState.CLOSED), 2)
        )

    def _weighted_order(self, routes: list[Route]) -> list[Route]:
        weights = {
            r.name: next(x.weight for x in r.policy.routes if x.model == r.model_key)
            for r in routes
        }
        order: list[Route] = []
        pool = [r for r in routes if weights[r.name] > 0]
        while pool:
            pick = self._rng.choices(pool, weights=[weights[r.name] for r in pool])[0]
            order.append(pick)
            pool.remove(pick)
        return order + [r for r in routes if weights[r.name] == 0]

    def _note(self, route: Route, state: BreakerState) -> None:
        if self._seen.get(route.name, BreakerState.CLOSED) is not state:
            self._seen[route.name] = state
            self._plans.clear()  # the order of healthy and unhealthy routes changed

    # -- calls -------------------------------------------------------------------------

    async def complete(self, call: Call) -> Completion:
        """A non-streaming call: the whole answer, after retries and failover."""
        tally = _Tally(started=time.perf_counter())

        async def attempt(route: Route) -> Completion:
            adapter = (
                embeddings_adapter(route)
                if call.kind == "embeddings"
                else adapter_for(call.api, route)
            )
            request = _traced(adapter.build_request(call.body, route, headers=call.headers), call)
            timeouts = route.policy.timeouts
            sent = time.perf_counter()
            try:
                response = await self._transports[route.provider_name].send(
                    request,
                    connect_s=timeouts.connect_s,
                    ttft_s=timeouts.ttft_s,
                    total_s=timeouts.total_s,
                )
                try:
                    data = await response.read()
                finally:
                    await response.aclose()
            finally:
                tally.upstream_s += time.perf_counter() - sent
            if response.status >= 400:
                raise _status_error(route, response, data)
            body, usage = adapter.parse_response(data, route)
            return Completion(
                body=body,
                route=route,
                usage=usage,
                attempts=tally.attempts,
                upstream_ms=tally.upstream_s * 1000,
                raw=data if adapter.passes_through else None,
            )

        try:
            result, slot = await self._run(call, tally, attempt)
        except GatewayError as exc:
            self._account(call, tally, None, None, exc, ttft_ms=None)
            raise
        await slot.give()
        self._account(call, tally, result.route, result.usage, None, ttft_ms=None)
        return result

    async def stream(self, call: Call) -> StreamResult:
        """A streaming call: returns once the first upstream chunk arrived."""
        tally = _Tally(started=time.perf_counter())
        include_usage = caller_wants_usage(call.api, call.body)

        async def attempt(route: Route) -> _Started:
            adapter = adapter_for(call.api, route)
            request = _traced(adapter.build_request(call.body, route, headers=call.headers), call)
            timeouts = route.policy.timeouts
            sent = time.perf_counter()
            # the relay bounds the stream's total time (also while the caller reads slowly)
            response = await self._transports[route.provider_name].send(
                request, connect_s=timeouts.connect_s, ttft_s=timeouts.ttft_s
            )
            try:
                await _raise_for_status(route, response)
                translator = adapter.stream_translator(route, include_usage=include_usage)
                decoder = SseDecoder()
                chunks = response.iter_chunks(idle_s=timeouts.idle_s)
                first: list[bytes] = []
                # the first body chunk is still "before the first byte": a failure here
                # retries (the transport bounds its wait by ttft_s)
                while not first:
                    try:
                        chunk = await anext(chunks)
                    except StopAsyncIteration:
                        raise UpstreamProtocolError("the stream ended before any event") from None
                    for event in decoder.feed(chunk):
                        first.extend(translator.feed(event))
                    if translator.finished:
                        break
            except BaseException:
                await response.aclose()
                raise
            ttft_ms = (time.perf_counter() - sent) * 1000
            tally.upstream_s += time.perf_counter() - sent
            return _Started(route, response, chunks, decoder, translator, first, ttft_ms)

        try:
            started, slot = await self._run(call, tally, attempt)
        except GatewayError as exc:
            self._account(call, tally, None, None, exc, ttft_ms=None)
            raise
        route = started.route

        async def on_end(usage: Usage, error: GatewayError | None, status: str | None) -> None:
            try:
                if error is not None:
                    error.provider, error.route = route.provider_name, route.name
                    error.request_id = call.request_id
                    log.warning("stream_interrupted", route=route.name, error=error.message)
                    # the attempt counted as a success at its first chunk; this is its end
                    state = await self._breaker.record(
                        route, _NO_PROBE, ok=False, latency_ms=started.ttft_ms
                    )
                    self._note(route, state)
            finally:
                await slot.give()  # the stream held its bulkhead slot until now
                self._account(
                    call, tally, route, usage, error, ttft_ms=started.ttft_ms, status=status
                )

        relay = StreamRelay(
            response=started.response,
            chunks=started.chunks,
            decoder=started.decoder,
            translator=started.translator,
            first=started.first,
            deadline=tally.started + route.policy.timeouts.total_s,
            total_s=route.policy.timeouts.total_s,
            request_id=call.request_id,
            on_end=on_end,
        )
        return StreamResult(route=route, frames=relay, upstream_ms=tally.upstream_s * 1000)

    async def _run(
        self,
        call: Call,
        tally: _Tally,
        attempt: Callable[[Route], Awaitable[T]],
    ) -> tuple[T, SlotContext]:
        """The first successful attempt's result, and the bulkhead slot it still holds
        (``give`` it back when the call is over: a stream holds it until its end)."""
        plan = self.plan(call.alias, call.region)
        for route in plan:
            if (call.kind == "embeddings") != (route.model.kind == "embedding"):
                continue
            if tally.budget is not None:
                tally.budget.begin_route()
            # the slot is held across this route's retries; BulkheadFull goes to the caller
            slot = self._bulkhead.slot(call.tenant_id, route.name, call.pool)
            await slot.take()
            try:
                result = await self._on_route(call, route, tally, attempt)
            except BaseException:
                await slot.give()
                raise
            if result is not _FAIL_OVER:
                return cast("T", result), slot
            await slot.give()
        if tally.last_error is not None:
            raise tally.last_error
        raise NoHealthyRoute(
            f"every route of {call.alias!r} is unavailable (circuit open)",
            request_id=call.request_id,
        )

    async def _on_route(
        self,
        call: Call,
        route: Route,
        tally: _Tally,
        attempt: Callable[[Route], Awaitable[Any]],
    ) -> Any:
        """Attempts on one route: its result, or ``_FAIL_OVER``; raises to give up."""
        while True:
            admission = await self._breaker.acquire(route)
            self._note(route, admission.state)
            if not admission.allowed:
                return _FAIL_OVER
            tally.attempts += 1
            tally.route = route
            started = time.perf_counter()
            try:
                result = await attempt(route)
            except GatewayError as exc:
                exc.provider, exc.route, exc.attempt = (
                    route.provider_name,
                    route.name,
                    tally.attempts,
                )
                exc.request_id = call.request_id
                tally.last_error = exc
                # caller mistakes (4xx) do not count against the route
                state = await self._breaker.record(
                    route,
                    admission,
                    ok=not counts_against_route(exc),
                    latency_ms=(time.perf_counter() - started) * 1000,
                )
                self._note(route, state)
                budget = tally.budget
                if budget is None:
                    budget = tally.budget = RetryBudget(
                        self.settings.aliases[call.alias].retry,
                        clock=time.perf_counter,
                        rng=self._rng,
                        started=tally.started,
                    )
                decision = budget.decide(exc)
                log.info(
                    "upstream_attempt_failed",
                    route=route.name,
                    attempt=tally.attempts,
                    error=exc.code,
                    decision=decision.action,
                    reason=decision.reason,
                )
                if decision.action == "give_up":
                    raise
                if decision.action == "fail_over":
                    return _FAIL_OVER
                await budget.sleep(decision.delay_s)
                continue
            except BaseException:
                # cancelled (the caller went away) or a bug: no outcome, but a probe's
                # lease must not leak
                await self._breaker.release(route, admission)
                raise
            state = await self._breaker.record(
                route, admission, ok=True, latency_ms=(time.perf_counter() - started) * 1000
            )
            self._note(route, state)
            return result

    def _account(
        self,
        call: Call,
        tally: _Tally,
        route: Route | None,
        usage: Usage | None,
        error: GatewayError | None,
        *,
        ttft_ms: float | None,
        status: str | None = None,
    ) -> None:
        if self._ledger is None:
            return
        latency_ms = (time.perf_counter() - tally.started) * 1000
        # the entry (and its cost) is made by the ledger's flusher, not on this path
        self._ledger.submit_later(
            _ledger_entry,
            call,
            route or tally.route,
            usage,
            error,
            tally.attempts,
            latency_ms,
            ttft_ms,
            status,
        )


def _ledger_entry(
    call: Call,
    route: Route | None,
    usage: Usage | None,
    error: GatewayError | None,
    attempts: int,
    latency_ms: float,
    ttft_ms: float | None,
    status: str | None,
) -> LedgerEntry:
    usage = usage or Usage()
    return LedgerEntry(
        request_id=call.request_id,
        tenant_id=call.tenant_id,
        alias=call.alias,
        route=route.name if route else None,
        provider=route.provider_name if route else None,
        model=route.model.upstream if route else None,
        api=call.api,
        stream=call.stream,
        status=status or ("ok" if error is None else error.code),
        http_status=200 if error is None else error.status_code,
        attempts=attempts,
        usage=usage,
        cost_usd=cost_usd(usage, route.model) if route else 0.0,
        latency_ms=latency_ms,
        ttft_ms=ttft_ms,
        feature_id=call.feature_id,
        trace_id=call.trace_id,
    )
