"""The mock provider's settings and its fault language.

A fault spec is ``KIND[:N][:key=value]...``:

========================  =====================================================
``429``, ``500``, ...     answer with that status in the API's error shape (any
                          400-599); ``429`` carries ``Retry-After``
``429:2``,                the same with ``Retry-After: 2`` (seconds)
``429:retry-after=2``
``529``                   Anthropic ``overloaded_error``; plain 529 on OpenAI routes
``refuse``                close the connection without any response
``hang``                  read the request, never answer (until the client gives up)
``cut``, ``cut:3``        streams: send N events then close the connection without
                          the terminal event; non-streams: half the body, then close
``stall``, ``stall:3``    streams: send N events, then nothing more until the client
                          gives up (an idle timeout); non-streams: half the body
``malformed:1``           streams: one data line that is not JSON after N events;
                          non-streams: a 200 whose body is not JSON
``none``                  (header only) no fault, and no rule is drawn
========================  =====================================================
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ragplane.errors import ConfigError

__all__ = ["Fault", "FaultKind", "FaultRule", "MockProviderConfig", "parse_fault"]

FaultKind = Literal["status", "refuse", "hang", "cut", "stall", "malformed"]
_NAMED: dict[str, FaultKind] = {
    "refuse": "refuse",
    "hang": "hang",
    "cut": "cut",
    "stall": "stall",
    "malformed": "malformed",
}
_AFTER_KINDS = ("cut", "stall", "malformed")


@dataclass(frozen=True, slots=True)
class Fault:
    """One parsed fault. ``None`` parameters take the server's configured defaults."""

    kind: FaultKind
    label: str  # what the stats count it as: "429", "cut", ...
    status: int = 0
    retry_after_s: float | None = None
    after: int | None = None  # cut / stall / malformed: events sent before the fault


def parse_fault(spec: str) -> Fault:
    """Parse ``KIND[:N][:key=value]...``; raises ``ConfigError`` naming what is wrong."""
    head, *params = spec.strip().lower().split(":")
    if head.isdigit():
        status = int(head)
        if not 400 <= status <= 599:
            raise ConfigError(f"fault {spec!r}: a status fault must be 400-599")
        kind: FaultKind = "status"
    elif head in _NAMED:
        kind, status = _NAMED[head], 0
    else:
        raise ConfigError(
            f"fault {spec!r}: unknown kind {head!r} (a status 400-599, refuse, hang, cut, "
            "stall, malformed)"
        )
    retry_after: float | None = None
    after: int | None = None
    for param in params:
        key, sep, value = param.partition("=")
        if not sep:  # a bare number: the kind's main parameter
            key, value = ("retry-after" if kind == "status" else "after"), key
        try:
            if key == "retry-after" and kind == "status":
                retry_after = float(value)
            elif key == "after" and kind in _AFTER_KINDS:
                after = int(value)
            else:
                raise ConfigError(f"fault {spec!r}: {head} takes no parameter {key!r}")
        except ValueError:
            raise ConfigError(f"fault {spec!r}: {key} must be a number, not {value!r}") from None
        if (retry_after or 0) < 0 or (after or 0) < 0:
            raise ConfigError(f"fault {spec!r}: {key} must not be negative")
    return Fault(kind, head, status, retry_after, after)


@dataclass(frozen=True, slots=True)
class FaultRule:
    """Inject ``spec`` into a share ``rate`` of requests; ``count``: only the next N times.

    ``FaultRule("503", count=2)`` fails the next two requests; ``FaultRule("429", rate=0.1)``
    one request in ten, for ever. Rules are tried in order; the first that fires wins.
    """

    spec: str
    rate: float = 1.0
    count: int | None = None
    fault: Fault = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not 0.0 <= self.rate <= 1.0:
            raise ConfigError(f"fault {self.spec!r}: rate must be within 0..1")
        if self.count is not None and self.count < 0:
            raise ConfigError(f"fault {self.spec!r}: count must not be negative")
        object.__setattr__(self, "fault", parse_fault(self.spec))


@dataclass(frozen=True, slots=True)
class MockProviderConfig:
    """How the mock provider behaves when a request does not say otherwise (headers).

    Timing: ``latency_ms`` passes before the response headers; streams send their first
    content token ``ttft_ms`` after the headers, then ``tokens_per_s`` (0: no pacing).
    A non-stream response waits for all of it before its headers.
    """

    api_key: str | None = None  # None: no authentication
    latency_ms: float = 0.0
    ttft_ms: float = 0.0
    tokens_per_s: float = 0.0
    output_tokens: int = 16  # answer length when max_tokens does not cap it
    grounded: bool = False  # answer RAG prompts by quoting their passages (grounded_pieces)
    embedding_dimensions: int = 384
    cached_tokens: int = 0  # OpenAI prompt_tokens_details.cached_tokens
    reasoning_tokens: int = 0  # OpenAI completion_tokens_details.reasoning_tokens
    retry_after_s: float = 1.0  # Retry-After of a 429 whose spec gives none
    cut_after: int = 3  # events before a cut / stall / malformed line if the spec gives none
    faults: tuple[FaultRule, ...] = ()
    seed: int | None = None  # of the fault-rate draws
    models: tuple[str, ...] = ("mock-gpt", "mock-claude", "mock-embedding")
    prompt_cache_entries: int = 10_000  # Anthropic prefix hashes remembered

    def __post_init__(self) -> None:
        for name in ("latency_ms", "ttft_ms", "tokens_per_s", "retry_after_s"):
            if getattr(self, name) < 0:
                raise ConfigError(f"mock provider: {name} must not be negative")
        if self.output_tokens < 1 or self.embedding_dimensions < 1:
            raise ConfigError("mock provider: output_tokens and dimensions must be >= 1")
        if min(self.cached_tokens, self.reasoning_tokens, self.cut_after) < 0:
            raise ConfigError("mock provider: token counts must not be negative")
