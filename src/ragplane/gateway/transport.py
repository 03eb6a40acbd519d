"""Transports: the one I/O seam under every provider call.

:class:`HttpTransport` sends every HTTP provider's requests over ONE shared
``aiohttp.ClientSession`` (a large keep-alive pool, no cookie jar, no redirects, no
environment proxies). aiohttp was chosen by measurement: httpx's async pool collapsed
at 64 concurrent streams on this hardware, aiohttp was the floor.

Timeouts and the errors they raise (``ragplane.errors``)::

    connect  pool slot + TCP (+ TLS) handshake > connect_s   UpstreamTimeout(phase="connect")
    ttft     status line + headers, and then the first body bytes, must arrive within
             connect_s + ttft_s of send() (the connect allowance is bounded by connect_s,
             so the time left after connecting is never less than ttft_s)
                                                             UpstreamTimeout(phase="ttft")
    idle     a gap between body chunks longer than idle_s    UpstreamTimeout(phase="idle")
    total    headers and body must be done within total_s of send() (when given; a
             stream's relay bounds its own total instead)   UpstreamTimeout(phase="total")

    refused / reset / DNS / disconnected                    UpstreamUnavailable
    body truncated or its framing malformed                 UpstreamProtocolError

The transport does not know whether bytes already reached the caller, so a connection
that breaks mid-body raises ``UpstreamUnavailable``/``UpstreamProtocolError`` like any
other failure; the router turns it into ``StreamInterrupted`` after the first byte.
Error statuses are answers, not errors: the adapter reads ``status``. Context fields
(provider, route, attempt, request id) are the router's to fill in.

A response holds its pooled connection until the body was read to the end or
``aclose()`` ran. A timeout, an error or a cancellation while sending or reading closes
the connection at once (a half-read HTTP/1.1 connection cannot be reused), so
cancelled calls never leak pool slots.

:func:`build_transports` maps each configured provider to its transport: the shared
HTTP transport, or an in-process local provider.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import aiohttp
from aiohttp.client_reqrep import ConnectionKey
from aiohttp.connector import Connection
from aiohttp.tracing import Trace
from yarl import URL

from ragplane.config import GatewaySettings
from ragplane.errors import UpstreamProtocolError, UpstreamTimeout, UpstreamUnavailable
from ragplane.gateway.providers.local_extractive import LocalExtractiveTransport
from ragplane.gateway.providers.local_llamacpp import LlamaCppTransport
from ragplane.gateway.types import Transport, UpstreamRequest
from ragplane.observe.logging import get_logger

__all__ = [
    "HttpResponse",
    "HttpTransport",
    "PoolStats",
    "build_transports",
    "close_transports",
]

log = get_logger(__name__)

DEFAULT_POOL_LIMIT = 1024
DEFAULT_KEEPALIVE_S = 30.0


@dataclass(frozen=True, slots=True)
class PoolStats:
    """The shared pool right now: connections checked out, idle keep-alive ones, and
    responses handed out and not yet released."""

    limit: int
    in_use: int
    idle: int
    open_responses: int


def _timeout(url: str, phase: str) -> UpstreamTimeout:
    if phase == "total":
        return UpstreamTimeout(f"{url}: no complete answer within the total timeout", phase=phase)
    what = "the first byte" if phase == "ttft" else "the next chunk"
    return UpstreamTimeout(f"{url}: no {what} within the {phase} timeout", phase=phase)


class _Watch:
    """The deadlines of one upstream exchange, kept by one lazily re-armed timer.

    Each wait (for the headers, for a body chunk) moves a deadline — never past the
    exchange's end — and names the waiting task; moving a float is all a chunk costs. The
    timer wakes at the (possibly stale) deadline and either re-arms or cancels the
    waiting task; one that fires while nobody waits is ignored (a slow consumer is not
    an idle upstream). Cheaper than an ``asyncio.timeout`` per wait: one ``call_at`` per
    exchange in the common case (docs/benchmarks.md, "Gateway").
    """

    __slots__ = ("_deadline", "_end", "_expired", "_loop", "_task", "_timer")

    def __init__(self, loop: asyncio.AbstractEventLoop, end: float) -> None:
        self._loop = loop
        self._end = end  # loop time by which the whole exchange is done (inf: no bound)
        self._deadline = math.inf
        self._timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[Any] | None = None
        self._expired = False

    def begin(self, deadline: float) -> asyncio.Task[Any] | None:
        """A wait that must be over by ``deadline`` starts in the current task."""
        deadline = min(deadline, self._end)
        self._deadline = deadline
        if deadline != math.inf and (self._timer is None or self._timer.when() > deadline):
            if self._timer is not None:
                self._timer.cancel()
            self._timer = self._loop.call_at(deadline, self._on_timer)
        self._expired = False
        task = self._task = asyncio.current_task(self._loop)  # no get_running_loop()
        return task

    def now(self) -> float:
        return self._loop.time()

    def done(self) -> None:
        self._task = None

    def failure(
        self, task: asyncio.Task[Any] | None, exc: BaseException, url: str, phase: str
    ) -> Exception | None:
        """Our error for what ended the wait ``task`` was in: this timer's timeout (its
        cancellation taken back; phase "total" when the exchange's end was the deadline),
        else :func:`_translate`'s; ``None`` if neither (a real cancellation)."""
        if self._expired and task is not None and task.uncancel() == 0:
            return _timeout(url, "total" if self._deadline >= self._end else phase)
        return _translate(exc, url, phase)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _on_timer(self) -> None:
        self._timer = None
        if self._task is None:
            return
        if self._loop.time() < self._deadline:
            self._timer = self._loop.call_at(self._deadline, self._on_timer)
            return
        self._expired = True
        self._task.cancel()


def _translate(exc: BaseException, url: str, phase: str) -> Exception | None:
    """Our error for an aiohttp/OS failure; ``None`` if it is not one (e.g. cancellation)."""
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return UpstreamTimeout(f"connecting to {url} timed out", phase="connect")
    if isinstance(exc, TimeoutError):  # aiohttp's own read timeout, if one is ever set
        return _timeout(url, phase)
    if isinstance(exc, aiohttp.ClientPayloadError):
        return UpstreamProtocolError(f"{url}: response body incomplete or malformed: {exc}")
    if isinstance(exc, aiohttp.ClientConnectionError | OSError):
        return UpstreamUnavailable(f"{url}: connection failed: {exc!r}")
    if isinstance(exc, aiohttp.ClientError):
        return UpstreamProtocolError(f"{url}: invalid response: {exc!r}")
    return None


class HttpResponse:
    """An upstream answer whose headers arrived; the body is read at most once. Its
    read deadlines (ttft for the first bytes, idle after, total throughout) are kept by
    the exchange's :class:`_Watch`."""

    __slots__ = (
        "_done",
        "_first_deadline",
        "_got_first",
        "_owner",
        "_resp",
        "_watch",
        "headers",
        "status",
    )

    def __init__(
        self,
        resp: aiohttp.ClientResponse,
        first_deadline: float,
        watch: _Watch,
        owner: HttpTransport,
    ) -> None:
        self.status = resp.status
        self.headers: Mapping[str, str] = resp.headers  # case-insensitive
        self._resp = resp
        self._first_deadline = first_deadline
        self._watch = watch
        self._got_first = False
        self._done = False
        self._owner = owner
        owner._open += 1

    def _finish(self, *, abort: bool) -> None:
        if self._done:
            return
        self._done = True
        self._owner._open -= 1
        self._watch.close()
        if abort:
            self._resp.close()  # drop the connection: it is mid-body
        else:
            self._resp.release()  # back to the pool if the body was read to the end

    async def next_chunk(self, idle_s: float | None = None) -> bytes:
        """The next body bytes as they arrive; ``b""`` at the end (the connection is then
        released)."""
        if self._done:
            return b""
        watch = self._watch
        if not self._got_first:
            task = watch.begin(self._first_deadline)
            phase = "ttft"
        else:
            task = watch.begin(math.inf if idle_s is None else watch.now() + idle_s)
            phase = "idle"
        try:
            chunk = await self._resp.content.readany()
        except BaseException as exc:
            self._finish(abort=True)
            error = watch.failure(task, exc, str(self._resp.url), phase)
            if error is None:
                raise
            raise error from exc
        finally:
            watch.done()
        if chunk:
            self._got_first = True
            if self._resp.content.at_eof():  # the whole body: no second wait for b""
                self._finish(abort=False)
        else:
            self._finish(abort=False)
        return chunk

    async def read(self, *, idle_s: float | None = None) -> bytes:
        parts = []
        while chunk := await self.next_chunk(idle_s):
            parts.append(chunk)
        return b"".join(parts)

    def iter_chunks(self, *, idle_s: float | None = None) -> AsyncIterator[bytes]:
        return _Chunks(self, idle_s)

    async def aclose(self) -> None:
        self._finish(abort=not self._resp.content.is_eof())

    async def __aenter__(self) -> HttpResponse:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()


class _Chunks:
    """An async iterator, not a generator: nothing to finalise if the caller stops early
    (``aclose()`` on the response releases the connection)."""

    __slots__ = ("_idle_s", "_response")

    def __init__(self, response: HttpResponse, idle_s: float | None) -> None:
        self._response = response
        self._idle_s = idle_s

    def __aiter__(self) -> _Chunks:
        return self

    async def __anext__(self) -> bytes:
        chunk = await self._response.next_chunk(self._idle_s)
        if not chunk:
            raise StopAsyncIteration
        return chunk


class _WarmestFirst(aiohttp.TCPConnector):
    """A connector that reuses the idle connection released last.

    aiohttp hands out its idle connections oldest first: after a burst of N concurrent
    calls, sequential calls cycle through all N, each on a connection whose protocol
    objects, buffers and socket have left the CPU caches (measured: +0.05-0.1 ms of CPU
    per call at one call at a time, docs/benchmarks.md, "Gateway"). Newest first, as
    urllib3 and Go's net/http do, keeps the working set small and lets a burst's
    surplus age out by the keep-alive timeout. aiohttp keeps the idle connections of a
    host in a deque it takes from the left; turning it by one puts the newest there
    (``test_transport`` fails if aiohttp stops working this way).
    """

    async def _get(self, key: ConnectionKey, traces: list[Trace]) -> Connection | None:
        idle = self._conns.get(key)
        if idle is not None and len(idle) > 1:
            idle.rotate(1)
        return await super()._get(key, traces)


class HttpTransport:
    """Every HTTP provider's calls over one shared aiohttp session (created on first use,
    inside the running event loop)."""

    def __init__(
        self,
        *,
        pool_limit: int = DEFAULT_POOL_LIMIT,
        keepalive_s: float = DEFAULT_KEEPALIVE_S,
    ) -> None:
        self._pool_limit = pool_limit
        self._keepalive_s = keepalive_s
        self._session: aiohttp.ClientSession | None = None
        self._closed = False
        self._open = 0
        # parsed once: a provider's few URLs, and the per-call timeout (by connect_s)
        self._urls: dict[str, URL] = {}
        self._timeouts: dict[float, aiohttp.ClientTimeout] = {}

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            if self._closed:
                raise UpstreamUnavailable("the HTTP transport is closed")
            connector = _WarmestFirst(
                limit=self._pool_limit,
                limit_per_host=0,
                keepalive_timeout=self._keepalive_s,
                ttl_dns_cache=300,
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                cookie_jar=aiohttp.DummyCookieJar(),
                timeout=aiohttp.ClientTimeout(total=None),
                trust_env=False,
                raise_for_status=False,
            )
        return self._session

    async def send(
        self,
        request: UpstreamRequest,
        *,
        connect_s: float,
        ttft_s: float,
        total_s: float | None = None,
    ) -> HttpResponse:
        session = self._get_session()
        loop = asyncio.get_running_loop()
        now = loop.time()
        watch = _Watch(loop, math.inf if total_s is None else now + total_s)
        first_deadline = now + connect_s + ttft_s
        timeout = self._timeouts.get(connect_s)
        if timeout is None:
            timeout = aiohttp.ClientTimeout(total=None, connect=connect_s, sock_connect=connect_s)
            self._timeouts[connect_s] = timeout
        url = self._urls.get(request.url)
        if url is None:
            url = self._urls[request.url] = URL(request.url)
        resp: aiohttp.ClientResponse | None = None
        task = watch.begin(first_deadline)
        try:
            resp = await session.request(
                request.method,
                url,
                headers=request.headers,
                data=request.body,
                timeout=timeout,
                allow_redirects=False,
            )
            watch.done()
            return HttpResponse(resp, first_deadline, watch, self)
        except BaseException as exc:
            watch.done()
            watch.close()
            if resp is not None:
                resp.close()
            error = watch.failure(task, exc, request.url, "ttft")
            if error is None:
                raise
            log.debug("upstream_send_failed", url=request.url, error=type(error).__name__)
            raise error from exc

    def pool_stats(self) -> PoolStats:
        connector = self._session.connector if self._session is not None else None
        if connector is None:
            return PoolStats(self._pool_limit, 0, 0, self._open)
        # aiohttp keeps these private; they are the only view of the pool it offers
        idle = sum(len(conns) for conns in connector._conns.values())
        return PoolStats(self._pool_limit, len(connector._acquired), idle, self._open)

    async def aclose(self) -> None:
        self._closed = True
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()


def build_transports(
    settings: GatewaySettings, *, http: HttpTransport | None = None
) -> dict[str, Transport]:
    """Provider name → transport. HTTP providers share one :class:`HttpTransport`;
    local providers are built (not loaded: a model loads on its first call)."""
    shared = http if http is not None else HttpTransport()
    transports: dict[str, Transport] = {}
    for name, provider in settings.providers.items():
        if provider.type in ("openai", "anthropic"):
            transports[name] = shared
        elif provider.type == "local-extractive":
            transports[name] = LocalExtractiveTransport()
        else:
            n_ctx = max(
                (m.context_window for m in settings.models.values() if m.provider == name),
                default=None,
            )
            transports[name] = LlamaCppTransport(model_path=provider.model_path, n_ctx=n_ctx)
    return transports


async def close_transports(transports: Iterable[Transport]) -> None:
    """Close each distinct transport once (HTTP providers share one)."""
    seen: set[int] = set()
    for transport in transports:
        if id(transport) not in seen:
            seen.add(id(transport))
            await transport.aclose()
