"""RetryBudget: full-jitter backoff bounded by attempts and total time, Retry-After,
what is retried, and the fast test mode (an injected clock, random source and sleep)."""

from __future__ import annotations

import random

import pytest

from ragplane.config import RetryPolicy
from ragplane.errors import (
    BulkheadFull,
    GatewayError,
    StreamInterrupted,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from ragplane.gateway import retry
from ragplane.gateway.retry import RetryBudget


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def budget(clock: FakeClock | None = None, seed: int = 7, **policy: float) -> RetryBudget:
    values: dict[str, float] = {"attempts": 3, "total_s": 20.0, "base_s": 0.1}
    values.update(policy)
    return RetryBudget(
        RetryPolicy.model_validate(values), clock=clock or FakeClock(), rng=random.Random(seed)
    )


def server_error(status: int = 503, retry_after_s: float | None = None) -> UpstreamError:
    return UpstreamError("boom", status=status, retry_after_s=retry_after_s, route="a/m")


@pytest.mark.parametrize(
    "error",
    [
        server_error(500),
        server_error(502),
        server_error(503),
        server_error(504),
        server_error(529),
        server_error(408),
        server_error(429),
        UpstreamTimeout("slow", phase="ttft"),
        UpstreamUnavailable("refused"),
        UpstreamProtocolError("garbage"),
    ],
    ids=lambda e: type(e).__name__ + str(getattr(e, "status", "")),
)
def test_retries_transient_errors(error: GatewayError) -> None:
    assert budget().decide(error).action == "retry"


@pytest.mark.parametrize(
    "error",
    [
        server_error(400),
        server_error(401),
        server_error(404),
        server_error(422),
        StreamInterrupted("after first byte"),
        BulkheadFull("full", retry_after_s=1),
        ValueError("a bug is never retried"),
        GatewayError("generic"),
    ],
    ids=lambda e: type(e).__name__ + str(getattr(e, "status", "")),
)
def test_gives_up_on_everything_else(error: BaseException) -> None:
    decision = budget().decide(error)
    assert decision.action == "give_up"
    assert decision.reason == "not_retryable"
    assert budget().next_delay(error) is None


def test_full_jitter_backoff_grows_and_is_capped() -> None:
    # the n-th retry waits uniform(0, min(max_backoff, base * 2**n)); sample many budgets
    caps = {0: 0.1, 1: 0.2, 2: 0.4, 3: 0.8, 4: 1.0, 5: 1.0}
    samples: dict[int, list[float]] = {n: [] for n in caps}
    rng = random.Random(1)
    for _ in range(400):
        b = RetryBudget(
            RetryPolicy(attempts=10, base_s=0.1, max_backoff_s=1.0), clock=FakeClock(), rng=rng
        )
        for n in caps:
            decision = b.decide(server_error())
            assert decision.action == "retry"
            samples[n].append(decision.delay_s)
    for n, cap in caps.items():
        assert all(0.0 <= d <= cap for d in samples[n])
        # full jitter: spread over the whole range, not clustered at the cap
        assert min(samples[n]) < cap * 0.1
        assert max(samples[n]) > cap * 0.9


def test_attempts_per_route_then_fail_over_and_the_next_route_starts_fresh() -> None:
    b = budget(attempts=3)
    assert b.decide(server_error()).action == "retry"
    assert b.decide(server_error()).action == "retry"
    third = b.decide(server_error())
    assert (third.action, third.reason) == ("fail_over", "attempts_exhausted")
    b.begin_route()
    assert b.decide(server_error()).action == "retry"
    assert b.failures == 4


def test_attempts_one_means_no_retry_on_the_route() -> None:
    assert budget(attempts=1).decide(server_error()).action == "fail_over"


def test_total_time_bounds_the_call() -> None:
    clock = FakeClock()
    b = budget(clock, total_s=5.0, attempts=100)
    assert b.decide(server_error()).action == "retry"
    clock.now += 4.99
    assert b.remaining_s == pytest.approx(0.01)
    # the backoff (up to 0.2 s now) would overrun what is left: move on without waiting
    decisions = {b.decide(server_error()).reason for _ in range(20)}
    assert "backoff_exceeds_budget" in decisions
    clock.now += 0.02
    final = b.decide(server_error())
    assert (final.action, final.reason) == ("give_up", "time_budget_exhausted")


def test_a_budget_made_after_the_call_began_counts_from_its_start() -> None:
    clock = FakeClock()
    policy = RetryPolicy.model_validate({"total_s": 5.0})
    late = RetryBudget(policy, clock=clock, rng=random.Random(1), started=clock.now - 4.0)
    assert late.remaining_s == pytest.approx(1.0)
    assert budget(clock, total_s=5.0).remaining_s == pytest.approx(5.0)  # default: now


def test_retry_after_is_honoured_with_a_little_jitter() -> None:
    delays = [budget(seed=s).decide(server_error(429, retry_after_s=2.0)) for s in range(50)]
    assert {d.action for d in delays} == {"retry"}
    assert {d.reason for d in delays} == {"retry_after"}
    assert all(2.0 <= d.delay_s <= 2.2 for d in delays)
    assert len({d.delay_s for d in delays}) > 1


def test_a_long_retry_after_fails_over_instead_of_waiting() -> None:
    d = budget(max_retry_after_s=10.0).decide(server_error(503, retry_after_s=30.0))
    assert (d.action, d.delay_s, d.reason) == ("fail_over", 0.0, "retry_after_too_long")


def test_a_retry_after_beyond_the_budget_fails_over() -> None:
    clock = FakeClock()
    b = budget(clock, total_s=5.0, max_retry_after_s=10.0)
    d = b.decide(server_error(429, retry_after_s=6.0))
    assert (d.action, d.reason) == ("fail_over", "retry_after_exceeds_budget")


def test_decisions_are_deterministic_with_a_seeded_random_source() -> None:
    first = [budget(seed=3, attempts=5).decide(server_error()).delay_s for _ in range(3)]
    again = [budget(seed=3, attempts=5).decide(server_error()).delay_s for _ in range(3)]
    assert first == again


async def test_sleep_uses_the_injected_sleep() -> None:
    slept: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        slept.append(seconds)

    b = RetryBudget(RetryPolicy(), sleep=fake_sleep)
    await b.sleep(1.5)
    assert slept == [1.5]


async def test_fast_test_mode_does_not_sleep() -> None:
    retry.set_testing(True)
    try:
        assert retry.is_testing()
        b = RetryBudget(RetryPolicy())
        before = b.remaining_s
        await b.sleep(3600.0)  # would time the test out if it slept
        assert b.remaining_s <= before
    finally:
        retry.set_testing(False)
    assert not retry.is_testing()
