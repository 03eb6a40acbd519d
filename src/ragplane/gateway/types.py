"""The gateway's shared vocabulary: what adapters, transports, breakers, bulkheads and
the ledger exchange. Each backend is a ``Protocol``; see docs/gateway.md for the flow::

    caller (OpenAI or Anthropic API body)
      → Router: alias → routes (order, weights, health)        gateway/router.py
        → Bulkhead.acquire(tenant, route, pool)                gateway/bulkhead.py
        → Breaker.acquire(route)                               gateway/breaker.py
        → ChatAdapter.build_request(body, route)               gateway/providers/<api>_<provider>.py
        → Transport.send(UpstreamRequest) → UpstreamResponse   gateway/transport.py, local providers
        → ChatAdapter.parse_response | StreamTranslator        (pure translation)
        → Breaker.record(...)  retries with full jitter before the first byte
      → LedgerSink.submit(LedgerEntry)                         gateway/ledger.py (never blocks)
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from ragplane.config import AliasSettings, ModelSettings, ProviderSettings

__all__ = [
    "Admission",
    "Api",
    "Breaker",
    "BreakerState",
    "ChatAdapter",
    "LedgerEntry",
    "Pool",
    "Route",
    "RouteHealth",
    "SseEvent",
    "StreamTranslator",
    "Transport",
    "UpstreamRequest",
    "UpstreamResponse",
    "Usage",
]

Api = Literal["openai", "anthropic"]
"""The wire protocol a caller speaks to the gateway, or the gateway to a provider."""

Pool = Literal["interactive", "batch"]


@dataclass(frozen=True, slots=True)
class Usage:
    """Tokens of one call, normalised across providers.

    ``input_tokens`` are the input tokens billed at the plain input price: OpenAI's
    ``prompt_tokens`` minus ``cached_tokens``; Anthropic's ``input_tokens`` as reported
    (it already excludes cache reads and writes). ``reasoning_tokens`` are part of
    ``output_tokens`` (priced as output) and recorded separately.
    """

    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0


@dataclass(frozen=True, slots=True)
class Route:
    """One way to serve an alias: a model on a provider, with the alias's policies."""

    alias: str
    name: str  # "<alias>/<model key>": the breaker, bulkhead and ledger key
    model_key: str
    model: ModelSettings
    provider_name: str
    provider: ProviderSettings
    policy: AliasSettings

    @property
    def upstream_api(self) -> Api:
        """The wire protocol spoken to this provider (local providers speak OpenAI's)."""
        return "anthropic" if self.provider.type == "anthropic" else "openai"


@dataclass(slots=True)
class UpstreamRequest:
    """What an adapter built for one attempt. Not frozen: it is made per attempt on the
    hot path (a frozen dataclass pays an ``object.__setattr__`` per field), and its
    ``headers`` are its own dict, to which the router adds the caller's trace."""

    method: str
    url: str  # absolute for HTTP providers; "local:/v1/chat/completions" for local ones
    headers: dict[str, str]
    body: bytes
    stream: bool


class UpstreamResponse(Protocol):
    """A provider's answer; the body is read at most once, whole or as chunks.

    The first body bytes must arrive within what is left of the ``ttft_s`` given to
    ``send`` (else ``UpstreamTimeout`` phase "ttft"); after that, a gap longer than
    ``idle_s`` (``None``: no limit) raises ``UpstreamTimeout`` phase "idle". A connection
    that breaks mid-body raises ``UpstreamUnavailable`` or ``UpstreamProtocolError``: the
    transport does not know whether bytes reached the caller, the router decides (and
    turns it into ``StreamInterrupted`` after the first byte). ``aclose`` releases the
    connection (idempotent; reading to the end releases it too).
    """

    status: int
    headers: Mapping[str, str]  # looked up by lower-case name (may be case-insensitive)

    async def read(self, *, idle_s: float | None = None) -> bytes: ...

    def iter_chunks(self, *, idle_s: float | None = None) -> AsyncIterator[bytes]: ...

    async def aclose(self) -> None: ...


class Transport(Protocol):
    """The one I/O seam under every provider call. Tests swap it; local providers are
    transports that answer OpenAI-protocol requests in-process.

    ``send`` returns once the status line and headers arrived (or raises
    ``UpstreamUnavailable``/``UpstreamTimeout`` with ``phase`` "connect" or "ttft").
    With ``total_s`` the whole exchange, body included, must be done within it
    (``UpstreamTimeout`` with ``phase`` "total"); without, the caller bounds it.
    """

    async def send(
        self,
        request: UpstreamRequest,
        *,
        connect_s: float,
        ttft_s: float,
        total_s: float | None = None,
    ) -> UpstreamResponse: ...

    async def aclose(self) -> None: ...


@dataclass(frozen=True, slots=True)
class SseEvent:
    event: str | None  # None when the server sent no "event:" line (OpenAI)
    data: str


class StreamTranslator(Protocol):
    """Turns a provider's stream into the caller's API, one event at a time (pure)."""

    def feed(self, event: SseEvent) -> list[bytes]:
        """Encoded SSE frames to send to the caller for one upstream event (maybe none)."""
        ...

    @property
    def usage(self) -> Usage | None:
        """Usage seen so far (final once the upstream stream completed)."""
        ...

    @property
    def finished(self) -> bool:
        """The upstream sent its proper end (``[DONE]`` / ``message_stop``)."""
        ...

    def error_frames(self, code: str, message: str, request_id: str) -> list[bytes]:
        """Frames that end the caller's stream with an explicit error event."""
        ...


class ChatAdapter(Protocol):
    """Pure translation for one (caller API, provider API) pair: no I/O, no retries."""

    api: Api
    upstream_api: Api
    # parse_response returns the provider's answer unchanged: the caller then gets the
    # provider's bytes as they came, not parsed and serialised again
    passes_through: bool

    def build_request(
        self, body: dict[str, Any], route: Route, *, headers: Mapping[str, str] | None = None
    ) -> UpstreamRequest:
        """``headers``: the caller's request headers; only Anthropic's ``anthropic-version``
        and ``anthropic-beta`` are read (by the Anthropic-upstream adapters)."""
        ...

    def parse_response(self, body: bytes, route: Route) -> tuple[dict[str, Any], Usage]: ...

    def stream_translator(self, route: Route, *, include_usage: bool) -> StreamTranslator: ...


class BreakerState(enum.StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"
    DEGRADED = "degraded"  # closed, but p95 latency breaks the route's SLO


@dataclass(frozen=True, slots=True)
class Admission:
    """The breaker's answer for one attempt; a probe must be recorded (it holds a lease)."""

    allowed: bool
    state: BreakerState
    probe: bool = False
    lease: str | None = None  # the probe's lease id (it expires, so a lost probe frees)


@dataclass(frozen=True, slots=True)
class RouteHealth:
    route: str
    state: BreakerState
    calls: int
    error_rate: float
    p50_ms: float | None
    p95_ms: float | None


class Breaker(Protocol):
    """Circuit breaker per route with its state in a store (memory or Redis)."""

    async def acquire(self, route: Route) -> Admission: ...

    async def record(
        self, route: Route, admission: Admission, *, ok: bool, latency_ms: float
    ) -> BreakerState: ...

    async def release(self, route: Route, admission: Admission) -> None:
        """Give a probe's lease back without an outcome (the call was cancelled)."""
        ...

    async def health(self, route: Route) -> RouteHealth: ...


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    """One ledger row: one caller-visible call (all its attempts)."""

    request_id: str
    tenant_id: str
    alias: str
    route: str | None
    provider: str | None
    model: str | None
    api: Api
    stream: bool
    status: str  # "ok" or an error code
    http_status: int
    attempts: int
    usage: Usage
    cost_usd: float
    latency_ms: float
    ttft_ms: float | None
    feature_id: str | None = None
    trace_id: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)
