"""What one mock provider remembers: fault rules in force, request and fault counts,
and the Anthropic prompt-cache prefixes it has seen."""

from __future__ import annotations

import asyncio
import itertools
import random
from collections import Counter, OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ragplane.gateway.mockprovider._config import (
    Fault,
    FaultRule,
    MockProviderConfig,
    parse_fault,
)

__all__ = ["MockState", "MockStats", "PromptCache"]


@dataclass(frozen=True, slots=True)
class MockStats:
    """A snapshot: requests per route (path), injected faults per kind, concurrency."""

    requests: Mapping[str, int]
    faults: Mapping[str, int]
    in_flight: int
    max_in_flight: int

    @property
    def total(self) -> int:
        return sum(self.requests.values())

    def as_json(self) -> dict[str, Any]:
        return {
            "requests": dict(self.requests),
            "faults": dict(self.faults),
            "total": self.total,
            "in_flight": self.in_flight,
            "max_in_flight": self.max_in_flight,
        }


class PromptCache:
    """Prefix hashes seen at ``cache_control`` breakpoints, least recently used evicted."""

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._seen: OrderedDict[bytes, None] = OrderedDict()

    def account(self, breakpoints: list[tuple[bytes, int]]) -> tuple[int, int]:
        """(cache read, cache write) tokens for a request's breakpoints (digest, tokens
        up to it), in order: the longest prefix seen before is read, the rest written."""
        if not breakpoints:
            return 0, 0
        read = 0
        for digest, tokens in reversed(breakpoints):
            if digest in self._seen:
                read = tokens
                break
        for digest, _ in breakpoints:
            self._seen[digest] = None
            self._seen.move_to_end(digest)
        while len(self._seen) > self._capacity:
            self._seen.popitem(last=False)
        return read, breakpoints[-1][1] - read

    def clear(self) -> None:
        self._seen.clear()


class _LiveRule:
    __slots__ = ("remaining", "rule")

    def __init__(self, rule: FaultRule) -> None:
        self.rule = rule
        self.remaining = rule.count


class MockState:
    """Counters and fault rules of one server; one event loop, so no locks."""

    def __init__(self, config: MockProviderConfig) -> None:
        self.config = config
        self.stopping = asyncio.Event()
        self.prompt_cache = PromptCache(config.prompt_cache_entries)
        self._rng = random.Random(config.seed)  # noqa: S311 - fault sampling, not security
        self._ids = itertools.count(1)
        self._rules = [_LiveRule(r) for r in config.faults]
        self._requests: Counter[str] = Counter()
        self._faults: Counter[str] = Counter()
        self._in_flight = 0
        self._max_in_flight = 0

    def begin(self, route: str) -> int:
        """Count a request; returns its sequence number."""
        self._requests[route] += 1
        self._in_flight += 1
        self._max_in_flight = max(self._max_in_flight, self._in_flight)
        return next(self._ids)

    def end(self) -> None:
        self._in_flight -= 1

    def fault_for(self, header: str | None) -> Fault | None:
        """The fault of this request: the ``x-mock-fault`` header's, else the first rule
        that fires (the header ``none``: no fault at all). Raises ``ConfigError`` for a
        header that does not parse."""
        if header is not None and header.strip().lower() == "none":
            return None
        fault = parse_fault(header) if header else None
        if fault is None:
            for live in self._rules:
                if live.remaining == 0:
                    continue
                if live.rule.rate >= 1.0 or self._rng.random() < live.rule.rate:
                    if live.remaining is not None:
                        live.remaining -= 1
                    fault = live.rule.fault
                    break
        if fault is not None:
            self._faults[fault.label] += 1
        return fault

    def set_faults(self, rules: Iterable[FaultRule]) -> None:
        self._rules = [_LiveRule(r) for r in rules]

    def rules_json(self) -> list[dict[str, Any]]:
        return [
            {"spec": live.rule.spec, "rate": live.rule.rate, "remaining": live.remaining}
            for live in self._rules
        ]

    def reset(self) -> None:
        """Counters to zero, the configured fault rules back, the prompt cache emptied."""
        self._requests.clear()
        self._faults.clear()
        self._max_in_flight = self._in_flight
        self._rules = [_LiveRule(r) for r in self.config.faults]
        self.prompt_cache.clear()

    def stats(self) -> MockStats:
        return MockStats(
            requests=dict(self._requests),
            faults=dict(self._faults),
            in_flight=self._in_flight,
            max_in_flight=self._max_in_flight,
        )
