"""W3C Trace Context (``traceparent``): parse, continue and mint.

https://www.w3.org/TR/trace-context/ - version 00 only; any malformed header is
treated as absent, never as an error.
"""

from __future__ import annotations

import os
import random
import re
from dataclasses import dataclass

__all__ = ["TraceContext", "random_hex"]

_TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")
_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16


_rng = random.Random()  # noqa: S311 -- ids, not secrets; our own: no random.seed() touches it
os.register_at_fork(after_in_child=_rng.seed)


def random_hex(chars: int) -> str:
    """``chars`` random lowercase hex digits, never all zero, for ids that must be unique
    but need not be secret (trace, span and request ids): a generator seeded from the OS
    (again in a forked child), no system call per id, where ``secrets`` makes one
    (measurable on the gateway's hot path, docs/benchmarks.md)."""
    while True:
        value = _rng.getrandbits(4 * chars)
        if value:  # bytes.hex, not a format spec: half the cost with cold caches
            return value.to_bytes((chars + 1) // 2, "big").hex()[-chars:]


@dataclass(frozen=True, slots=True)
class TraceContext:
    trace_id: str
    span_id: str
    parent_span_id: str | None = None
    sampled: bool = True

    @classmethod
    def mint(cls) -> TraceContext:
        ids = random_hex(48)  # one draw for both (on the gateway's hot path)
        trace_id, span_id = ids[:32], ids[32:]
        if trace_id == _ZERO_TRACE or span_id == _ZERO_SPAN:  # W3C: invalid; 1 in 2**64
            return cls.mint()
        return cls(trace_id=trace_id, span_id=span_id)

    @classmethod
    def continue_from(cls, traceparent: str | None) -> TraceContext | None:
        """A new span of the caller's trace, or None if the header is absent or malformed."""
        if not traceparent:
            return None
        m = _TRACEPARENT.fullmatch(traceparent.strip())  # uppercase hex is invalid (W3C)
        if m is None or m.group(1) == _ZERO_TRACE or m.group(2) == _ZERO_SPAN:
            return None
        return cls(
            trace_id=m.group(1),
            span_id=random_hex(16),
            parent_span_id=m.group(2),
            sampled=bool(int(m.group(3), 16) & 1),
        )

    @property
    def traceparent(self) -> str:
        return f"00-{self.trace_id}-{self.span_id}-{'01' if self.sampled else '00'}"
