"""The breaker's conformance suite: every state store (in-process with an injected clock,
Redis with real time and small windows) runs the same tests. Plus two separate
processes sharing one Redis, the failure classification, hooks and failing open."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import FrozenInstanceError
from pathlib import Path
from typing import Any

import anyio
import pytest
import structlog

from ragplane.config import (
    AliasSettings,
    BreakerPolicy,
    GatewaySettings,
    ModelSettings,
    ProviderSettings,
    RouteSettings,
    TimeoutPolicy,
)
from ragplane.errors import (
    BulkheadFull,
    StreamInterrupted,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from ragplane.gateway.breaker import (
    BreakerTransition,
    CircuitBreaker,
    build_resilience,
    counts_against_route,
    redis_client,
)
from ragplane.gateway.bulkhead import MemoryBulkhead, RedisBulkhead
from ragplane.gateway.statestore import MemoryBreakerStore
from ragplane.gateway.statestore_redis import RedisBreakerStore
from ragplane.gateway.types import Admission, BreakerState, Route

CLOSED, OPEN, HALF_OPEN, DEGRADED = (
    BreakerState.CLOSED,
    BreakerState.OPEN,
    BreakerState.HALF_OPEN,
    BreakerState.DEGRADED,
)
COOLDOWN_S = 0.5
LEASE_S = 1.0  # the route's total timeout is the probe lease
WINDOW_S = 2.0


def make_route(name: str = "chat/m1", lease_s: float = LEASE_S, **policy: Any) -> Route:
    values: dict[str, Any] = {
        "window_s": WINDOW_S,
        "min_calls": 10,
        "failure_rate": 0.5,
        "consecutive_failures": 100,
        "cooldown_s": COOLDOWN_S,
    }
    values.update(policy)
    alias = AliasSettings(
        routes=(RouteSettings(model="m1"),),
        breaker=BreakerPolicy.model_validate(values),
        timeouts=TimeoutPolicy(total_s=lease_s),
    )
    return Route(
        alias="chat",
        name=name,
        model_key="m1",
        model=ModelSettings(provider="p", upstream="m1"),
        provider_name="p",
        provider=ProviderSettings(type="openai", base_url="http://127.0.0.1:9"),
        policy=alias,
    )


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


class Harness:
    """One breaker over one store, with a way to let time pass."""

    def __init__(self, kind: str, breaker: CircuitBreaker, clock: FakeClock | None) -> None:
        self.kind = kind
        self.breaker = breaker
        self.clock = clock
        self.events: list[BreakerTransition] = []
        breaker.add_hook(self.events.append)

    async def advance(self, seconds: float) -> None:
        if self.clock is not None:
            self.clock.now += seconds
        else:
            await anyio.sleep(seconds)

    async def calls(self, route: Route, outcomes: str, latency_ms: float = 5.0) -> BreakerState:
        """Record one admitted call per character: ``s`` success, ``f`` failure."""
        state = CLOSED
        for outcome in outcomes:
            admission = await self.breaker.acquire(route)
            assert admission.allowed
            state = await self.breaker.record(
                route, admission, ok=outcome == "s", latency_ms=latency_ms
            )
        return state

    def reasons(self) -> list[str]:
        return [e.reason for e in self.events]


@pytest.fixture(params=["memory", "redis"])
async def harness(request: pytest.FixtureRequest) -> AsyncIterator[Harness]:
    if request.param == "memory":
        clock = FakeClock()
        yield Harness("memory", CircuitBreaker(MemoryBreakerStore(clock=clock)), clock)
        return
    url = request.getfixturevalue("clean_redis")
    client = redis_client(url)
    store = RedisBreakerStore(client, prefix=f"test:{uuid.uuid4().hex[:8]}:", owns_client=True)
    breaker = CircuitBreaker(store)
    try:
        yield Harness("redis", breaker, None)
    finally:
        await breaker.aclose()


async def open_route(h: Harness, route: Route) -> None:
    await h.calls(route, "f" * route.policy.breaker.consecutive_failures)
    assert (await h.breaker.health(route)).state is OPEN


# --- conformance: every store ---------------------------------------------------------


async def test_opens_on_failure_rate_once_min_calls_is_reached(harness: Harness) -> None:
    route = make_route(min_calls=10, failure_rate=0.5)
    assert await harness.calls(route, "fsfsfsfsf") is CLOSED  # 5 of 9: below min_calls
    assert await harness.calls(route, "f") is OPEN  # 6 of 10
    admission = await harness.breaker.acquire(route)
    assert (admission.allowed, admission.state) == (False, OPEN)
    [event] = harness.events
    assert (event.route, event.from_state, event.to_state) == (route.name, CLOSED, OPEN)
    assert (event.reason, event.calls, event.failures) == ("failure_rate", 10, 6)


async def test_a_rate_under_the_threshold_stays_closed(harness: Harness) -> None:
    route = make_route(min_calls=10, failure_rate=0.5)
    assert await harness.calls(route, "sfssfssfssfssf") is CLOSED  # 5 of 14
    assert harness.events == []


async def test_opens_on_consecutive_failures(harness: Harness) -> None:
    route = make_route(consecutive_failures=3, min_calls=100)
    assert await harness.calls(route, "ffsff") is CLOSED  # a success resets the run
    assert await harness.calls(route, "f") is OPEN
    assert harness.reasons() == ["consecutive_failures"]


async def test_cooldown_leads_to_half_open_with_a_probe(harness: Harness) -> None:
    route = make_route(consecutive_failures=2)
    await open_route(harness, route)
    assert not (await harness.breaker.acquire(route)).allowed
    await harness.advance(COOLDOWN_S + 0.05)
    probe = await harness.breaker.acquire(route)
    assert (probe.allowed, probe.state, probe.probe) == (True, HALF_OPEN, True)
    assert probe.lease
    assert harness.reasons() == ["consecutive_failures", "cooldown_elapsed"]


async def test_half_open_admits_at_most_the_probe_limit(harness: Harness) -> None:
    route = make_route(consecutive_failures=2, half_open_probes=2)
    await open_route(harness, route)
    await harness.advance(COOLDOWN_S + 0.05)
    first = await harness.breaker.acquire(route)
    second = await harness.breaker.acquire(route)
    third = await harness.breaker.acquire(route)
    assert [a.allowed for a in (first, second, third)] == [True, True, False]
    assert third.state is HALF_OPEN
    assert first.lease != second.lease
    # a cancelled probe gives its lease back
    await harness.breaker.release(route, first)
    again = await harness.breaker.acquire(route)
    assert (again.allowed, again.probe) == (True, True)


async def test_an_unrecorded_probe_lease_expires(harness: Harness) -> None:
    route = make_route(consecutive_failures=2, half_open_probes=1)
    await open_route(harness, route)
    await harness.advance(COOLDOWN_S + 0.05)
    lost = await harness.breaker.acquire(route)  # its caller crashes: never recorded
    assert lost.probe
    assert not (await harness.breaker.acquire(route)).allowed
    await harness.advance(LEASE_S + 0.1)
    probe = await harness.breaker.acquire(route)
    assert (probe.allowed, probe.probe) == (True, True)
    assert probe.lease != lost.lease
    # the late result of the expired probe decides nothing
    assert await harness.breaker.record(route, lost, ok=True, latency_ms=5) is HALF_OPEN
    assert await harness.breaker.record(route, probe, ok=True, latency_ms=5) is CLOSED


async def test_probe_success_closes_and_resets_the_window(harness: Harness) -> None:
    route = make_route(consecutive_failures=3)
    await harness.calls(route, "sss")
    await open_route(harness, route)
    await harness.advance(COOLDOWN_S + 0.05)
    probe = await harness.breaker.acquire(route)
    assert await harness.breaker.record(route, probe, ok=True, latency_ms=5) is CLOSED
    health = await harness.breaker.health(route)
    assert (health.state, health.calls, health.error_rate) == (CLOSED, 0, 0.0)
    assert (await harness.breaker.acquire(route)) == Admission(True, CLOSED)
    assert harness.reasons()[-1] == "probe_succeeded"
    # counting starts over: two more failures do not reopen it (three in a row do)
    assert await harness.calls(route, "ff") is CLOSED


async def test_probe_failure_opens_again(harness: Harness) -> None:
    route = make_route(consecutive_failures=2)
    await open_route(harness, route)
    await harness.advance(COOLDOWN_S + 0.05)
    probe = await harness.breaker.acquire(route)
    assert await harness.breaker.record(route, probe, ok=False, latency_ms=5) is OPEN
    assert not (await harness.breaker.acquire(route)).allowed
    assert harness.reasons()[-2:] == ["cooldown_elapsed", "probe_failed"]
    await harness.advance(COOLDOWN_S + 0.05)  # and the cycle starts again
    assert (await harness.breaker.acquire(route)).probe


async def test_late_results_while_open_do_not_change_the_state(harness: Harness) -> None:
    route = make_route(consecutive_failures=2)
    before = Admission(True, CLOSED)  # admitted before it opened, finishing now
    await open_route(harness, route)
    assert await harness.breaker.record(route, before, ok=True, latency_ms=5) is OPEN
    assert await harness.breaker.record(route, before, ok=False, latency_ms=5) is OPEN


async def test_degraded_when_p95_breaks_the_slo_and_recovers(harness: Harness) -> None:
    route = make_route(slo_p95_ms=100.0, min_calls=5)
    assert await harness.calls(route, "s" * 10, latency_ms=20.0) is CLOSED
    assert await harness.calls(route, "s" * 10, latency_ms=400.0) is DEGRADED
    admission = await harness.breaker.acquire(route)
    assert (admission.allowed, admission.state) == (True, DEGRADED)
    assert (await harness.breaker.health(route)).state is DEGRADED
    # the slow calls leave the window: the next acquire sees the route recovered
    await harness.advance(WINDOW_S + 0.3)
    assert (await harness.breaker.acquire(route)).state is CLOSED
    assert harness.reasons() == ["slo_breached", "slo_recovered"]
    # degraded routes still trip open on failures
    await harness.calls(route, "s" * 10, latency_ms=400.0)
    assert await harness.calls(route, "f" * 10) is OPEN


async def test_a_slo_needs_min_calls_successes(harness: Harness) -> None:
    route = make_route(slo_p95_ms=100.0, min_calls=5)
    assert await harness.calls(route, "ssss", latency_ms=900.0) is CLOSED
    assert await harness.calls(route, "s", latency_ms=900.0) is DEGRADED


async def test_caller_4xx_do_not_count_against_the_route(harness: Harness) -> None:
    route = make_route(min_calls=5, consecutive_failures=3)
    for status in (400, 401, 403, 404, 413, 422) * 3:
        error = UpstreamError("bad request", status=status)
        admission = await harness.breaker.acquire(route)
        ok = not counts_against_route(error)
        assert await harness.breaker.record(route, admission, ok=ok, latency_ms=3) is CLOSED
    health = await harness.breaker.health(route)
    assert (health.state, health.calls, health.error_rate) == (CLOSED, 18, 0.0)


async def test_health_snapshot_numbers(harness: Harness) -> None:
    route = make_route(min_calls=100)
    fresh = await harness.breaker.health(route)
    assert (fresh.route, fresh.state, fresh.calls, fresh.error_rate) == (route.name, CLOSED, 0, 0)
    assert (fresh.p50_ms, fresh.p95_ms) == (None, None)
    latencies = [10.0 * i for i in range(1, 21)]  # 10 … 200 ms: p50 100, p95 190
    for latency in latencies:
        await harness.calls(route, "s", latency_ms=latency)
    await harness.calls(route, "fffff", latency_ms=5000.0)  # failures: no latency sample
    health = await harness.breaker.health(route)
    assert (health.calls, health.error_rate) == (25, 0.2)
    assert health.p50_ms == pytest.approx(100.0, rel=0.11)
    assert health.p95_ms == pytest.approx(190.0, rel=0.11)


async def test_the_window_slides(harness: Harness) -> None:
    route = make_route(min_calls=4, failure_rate=0.5)
    await harness.calls(route, "fff")
    await harness.advance(WINDOW_S + 0.3)  # those failures are out of the window
    assert (await harness.breaker.health(route)).calls == 0
    assert await harness.calls(route, "sssf") is CLOSED


async def test_routes_are_independent(harness: Harness) -> None:
    sick, well = make_route("chat/sick", consecutive_failures=2), make_route("chat/well")
    await open_route(harness, sick)
    assert (await harness.breaker.acquire(well)) == Admission(True, CLOSED)
    assert (await harness.breaker.health(well)).calls == 0


# --- classification, hooks, failing open, the factory ----------------------------------


@pytest.mark.parametrize(
    ("error", "counts"),
    [
        (UpstreamError("x", status=500), True),
        (UpstreamError("x", status=503), True),
        (UpstreamError("x", status=529), True),
        (UpstreamError("x", status=408), True),
        (UpstreamError("x", status=429), True),
        (UpstreamTimeout("x", phase="ttft"), True),
        (UpstreamUnavailable("x"), True),
        (UpstreamProtocolError("x"), True),
        (StreamInterrupted("x"), True),
        (UpstreamError("x", status=400), False),
        (UpstreamError("x", status=401), False),
        (UpstreamError("x", status=404), False),
        (UpstreamError("x", status=422), False),
        (BulkheadFull("x", retry_after_s=1), False),
        (ValueError("x"), False),
    ],
)
def test_what_counts_against_a_route(error: BaseException, counts: bool) -> None:
    assert counts_against_route(error) is counts


async def test_events_are_frozen_and_a_broken_hook_is_contained() -> None:
    clock = FakeClock()
    seen: list[BreakerTransition] = []

    def broken(event: BreakerTransition) -> None:
        raise RuntimeError("metrics backend down")

    breaker = CircuitBreaker(MemoryBreakerStore(clock=clock), hooks=[broken, seen.append])
    route = make_route(consecutive_failures=1)
    with structlog.testing.capture_logs() as logs:
        admission = await breaker.acquire(route)
        assert await breaker.record(route, admission, ok=False, latency_ms=1) is OPEN
    [event] = seen
    with pytest.raises(FrozenInstanceError):
        event.reason = "changed"  # type: ignore[misc]
    names = [entry["event"] for entry in logs]
    assert names == ["breaker_transition", "breaker_hook_failed"]
    assert logs[0]["to_state"] == "open"
    assert logs[0]["log_level"] == "warning"


async def test_fails_open_when_redis_is_unreachable() -> None:
    import socket

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client = redis_client(f"redis://127.0.0.1:{port}/0")
    breaker = CircuitBreaker(RedisBreakerStore(client, owns_client=True))
    route = make_route()
    try:
        with structlog.testing.capture_logs() as logs:
            admission = await breaker.acquire(route)
            state = await breaker.record(route, admission, ok=False, latency_ms=1)
        assert (admission.allowed, admission.state, state) == (True, CLOSED, CLOSED)
        assert [entry["event"] for entry in logs] == ["breaker_store_unavailable"]
    finally:
        await breaker.aclose()


async def test_build_resilience_is_in_process_without_redis_url(redis_url: str) -> None:
    breaker, bulkhead, close = build_resilience(GatewaySettings())
    assert isinstance(breaker.store, MemoryBreakerStore)
    assert isinstance(bulkhead, MemoryBulkhead)
    await close()
    breaker, bulkhead, close = build_resilience(GatewaySettings(redis_url=redis_url))
    try:
        assert isinstance(breaker.store, RedisBreakerStore)
        assert isinstance(bulkhead, RedisBulkhead)
        assert (await breaker.acquire(make_route("chat/factory"))).allowed
    finally:
        await close()


# --- two processes, one Redis ----------------------------------------------------------

PEER = """
import asyncio, json, sys, time
from ragplane.gateway.breaker import CircuitBreaker, redis_client
from ragplane.gateway.statestore_redis import RedisBreakerStore
from ragplane.observe.logging import configure_logging
from tests.integration.test_breaker import make_route

async def main(url, prefix, role):
    configure_logging("warning")  # logs to stderr; stdout carries the JSON results
    breaker = CircuitBreaker(RedisBreakerStore(redis_client(url), prefix=prefix, owns_client=True))
    route = make_route("chat/shared", consecutive_failures=5, cooldown_s=60.0)
    if role == "recorder":
        while True:
            admission = await breaker.acquire(route)
            sent_at = time.time()
            state = await breaker.record(route, admission, ok=False, latency_ms=1.0)
            if state.value == "open":
                print(json.dumps({"sent_at": sent_at}), flush=True)
                break
    else:
        admission = await breaker.acquire(route)
        print(json.dumps({"ready": admission.state.value}), flush=True)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            admission = await breaker.acquire(route)
            if not admission.allowed:
                break
            await asyncio.sleep(0.005)
        print(json.dumps({"seen_at": time.time(), "state": admission.state.value,
                          "allowed": admission.allowed}), flush=True)
    await breaker.aclose()

asyncio.run(main(*sys.argv[1:]))
"""


def test_two_processes_share_one_breaker_through_redis(clean_redis: str) -> None:
    prefix = f"test:{uuid.uuid4().hex[:8]}:"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    argv = [sys.executable, "-c", PEER, clean_redis, prefix]
    watcher = subprocess.Popen([*argv, "watcher"], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert watcher.stdout is not None
        assert json.loads(watcher.stdout.readline()) == {"ready": "closed"}
        recorder = subprocess.run(
            [*argv, "recorder"], capture_output=True, text=True, env=env, timeout=60, check=True
        )
        sent_at = json.loads(recorder.stdout)["sent_at"]
        seen = json.loads(watcher.stdout.readline())
        assert watcher.wait(timeout=30) == 0
    finally:
        if watcher.poll() is None:
            watcher.kill()
            watcher.wait()
        if watcher.stdout is not None:
            watcher.stdout.close()
    assert (seen["allowed"], seen["state"]) == (False, "open")
    # an upper bound: from sending the failure that opened it to the watcher's sighting
    # (the watcher polls every 5 ms); printed, not asserted (no wall-clock thresholds)
    delay = seen["seen_at"] - sent_at
    print(f"\nthe other process saw the breaker open within {delay * 1000:.1f} ms")


async def test_every_redis_key_expires(clean_redis: str) -> None:
    """Idle routes and tenants leave nothing behind: every key has a TTL."""
    prefix = f"test:{uuid.uuid4().hex[:8]}:"
    client = redis_client(clean_redis)
    breaker = CircuitBreaker(RedisBreakerStore(client, prefix=prefix))
    bulkhead = RedisBulkhead(client, GatewaySettings().bulkheads, prefix=prefix)
    try:
        route = make_route(consecutive_failures=2, failure_rate=1.0, slo_p95_ms=50.0, min_calls=1)
        async with bulkhead.slot("tnt_a", route.name, "interactive"):
            h = Harness("redis", breaker, None)
            await h.calls(route, "s", latency_ms=80.0)  # degraded: the state hash exists
            await open_route(h, route)
            await h.advance(COOLDOWN_S + 0.05)
            assert (await breaker.acquire(route)).probe  # the probe lease set exists
            keys = [key async for key in client.scan_iter(match=prefix + "*")]
            assert len(keys) >= 5  # state, probes, buckets, two bulkhead sets
            for key in keys:
                assert await client.pttl(key) > 0, key
    finally:
        await client.aclose()
