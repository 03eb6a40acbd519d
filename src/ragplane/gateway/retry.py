"""Retry decisions for one gateway call: full-jitter backoff bounded by attempts and time.

A :class:`RetryBudget` is created when a call starts and consulted by the router after
each failed attempt::

    budget = RetryBudget(route.policy.retry)
    for route in routes:
        budget.begin_route()
        while True:
            try:
                return await attempt(route)
            except GatewayError as exc:
                decision = budget.decide(exc)
                if decision.action == "retry":
                    await budget.sleep(decision.delay_s)
                    continue
                if decision.action == "fail_over":
                    break
                raise

What is retried: only our own errors whose ``retryable`` flag is set
(:class:`~ragplane.errors.UpstreamError` with 408/429/5xx/529,
:class:`~ragplane.errors.UpstreamTimeout`, :class:`~ragplane.errors.UpstreamUnavailable`,
:class:`~ragplane.errors.UpstreamProtocolError`). Anything else, and above all
:class:`~ragplane.errors.StreamInterrupted` (bytes already reached the caller) or a
non-gateway exception, gives up at once.

Backoff: the n-th retry on a route (n = 0, 1, …) waits ``uniform(0, min(max_backoff_s,
base_s * 2**n))``; ``attempts`` bounds the tries per route (the first included),
``total_s`` bounds the whole call. An upstream ``Retry-After`` is honoured (that long,
plus up to 10 % jitter) when it is at most ``max_retry_after_s`` and fits in the budget;
otherwise the answer is "fail over now" rather than a long wait.

Tests use :func:`set_testing` (like stamina's) so that :meth:`RetryBudget.sleep` does not
wait, or inject ``sleep``, ``clock`` and ``rng`` directly.
"""

from __future__ import annotations

import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal

import anyio

from ragplane.config import RetryPolicy
from ragplane.errors import GatewayError, UpstreamError

__all__ = ["RetryAction", "RetryBudget", "RetryDecision", "is_testing", "set_testing"]

RetryAction = Literal["retry", "fail_over", "give_up"]

_RETRY_AFTER_JITTER = 0.1  # Retry-After waits up to 10 % longer, so replicas do not align
_testing = False


def set_testing(on: bool) -> None:
    """Fast test mode: :meth:`RetryBudget.sleep` returns at once (decisions are unchanged)."""
    global _testing  # one process-wide switch, as in stamina
    _testing = on


def is_testing() -> bool:
    return _testing


@dataclass(frozen=True, slots=True)
class RetryDecision:
    """What to do after a failed attempt.

    ``retry``: wait ``delay_s`` and try the same route again; ``fail_over``: go to the
    next route now (retryable, but this route is out of tries or asked for too long a
    wait); ``give_up``: raise the error to the caller (not retryable or no time left).
    """

    action: RetryAction
    delay_s: float
    reason: str


class RetryBudget:
    """The remaining tries and time of one call; not shared between calls."""

    __slots__ = ("_clock", "_deadline", "_policy", "_rng", "_route_tries", "_sleep", "failures")

    def __init__(
        self,
        policy: RetryPolicy,
        *,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        sleep: Callable[[float], Awaitable[None]] | None = None,
        started: float | None = None,
    ) -> None:
        """``started``: when the call began, on ``clock`` (default: now)."""
        self._policy = policy
        self._clock = clock
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not a secret
        self._sleep = sleep
        self._deadline = (clock() if started is None else started) + policy.total_s
        self._route_tries = 0
        self.failures = 0  # failed attempts of the whole call, every route

    @property
    def remaining_s(self) -> float:
        return max(0.0, self._deadline - self._clock())

    def begin_route(self) -> None:
        """The router moves to a (new) route: its tries start from zero."""
        self._route_tries = 0

    def decide(self, error: BaseException) -> RetryDecision:
        """What to do after ``error`` ended an attempt on the current route (counts it)."""
        self._route_tries += 1
        self.failures += 1
        if not isinstance(error, GatewayError) or not error.retryable:
            return RetryDecision("give_up", 0.0, "not_retryable")
        remaining = self.remaining_s
        if remaining <= 0.0:
            return RetryDecision("give_up", 0.0, "time_budget_exhausted")
        retry_after = error.retry_after_s if isinstance(error, UpstreamError) else None
        if retry_after is not None and retry_after > self._policy.max_retry_after_s:
            return RetryDecision("fail_over", 0.0, "retry_after_too_long")
        if self._route_tries >= self._policy.attempts:
            return RetryDecision("fail_over", 0.0, "attempts_exhausted")
        if retry_after is not None:
            delay = retry_after * (1.0 + self._rng.uniform(0.0, _RETRY_AFTER_JITTER))
            if delay >= remaining:
                return RetryDecision("fail_over", 0.0, "retry_after_exceeds_budget")
            return RetryDecision("retry", delay, "retry_after")
        cap = min(self._policy.max_backoff_s, self._policy.base_s * 2 ** (self._route_tries - 1))
        delay = self._rng.uniform(0.0, cap)
        if delay >= remaining:
            return RetryDecision("fail_over", 0.0, "backoff_exceeds_budget")
        return RetryDecision("retry", delay, "backoff")

    def next_delay(self, error: BaseException) -> float | None:
        """Seconds to wait before trying the same route again; ``None``: no retry here
        (use :meth:`decide` to tell "fail over" from "give up")."""
        decision = self.decide(error)
        return decision.delay_s if decision.action == "retry" else None

    async def sleep(self, delay_s: float) -> None:
        """Wait ``delay_s`` (no wait in fast test mode; a checkpoint either way)."""
        if self._sleep is not None:
            await self._sleep(delay_s)
        elif _testing:
            await anyio.lowlevel.checkpoint()
        else:
            await anyio.sleep(delay_s)
