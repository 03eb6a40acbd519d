"""W3C Trace Context (``traceparent``): parse, continue and mint.

https://www.w3.org/TR/trace-context/ - version 00 only; any malformed header is
treated as absent, never as an error.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass

__all__ = ["TraceContext"]

_TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")
_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16


@dataclass(frozen=True)
class TraceContext:
    trace_id: str
    span_id: str
    parent_span_id: str | None = None
    sampled: bool = True

    @classmethod
    def mint(cls) -> TraceContext:
        return cls(trace_id=secrets.token_hex(16), span_id=secrets.token_hex(8))

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
            span_id=secrets.token_hex(8),
            parent_span_id=m.group(2),
            sampled=bool(int(m.group(3), 16) & 1),
        )

    @property
    def traceparent(self) -> str:
        return f"00-{self.trace_id}-{self.span_id}-{'01' if self.sampled else '00'}"
