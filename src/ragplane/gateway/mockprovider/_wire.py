"""Writing answers on the wire: paced SSE streams, JSON bodies, and the connection-level
faults (refuse, hang, cut, malformed) that a real provider or network produces."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from ragplane.gateway.mockprovider._config import Fault

if TYPE_CHECKING:
    from ragplane.gateway.mockprovider._state import MockState

__all__ = [
    "Call",
    "Timing",
    "close_connection",
    "hang",
    "send_events",
    "send_json",
    "sse",
]

_SSE_HEADERS = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"}
_BATCH_S = 0.001  # events due within this much of now go out in one write


def sse(data: Any, event: bytes | None = None) -> bytes:
    """One SSE frame; ``data`` is JSON-encoded unless it is bytes already."""
    payload = data if isinstance(data, bytes) else orjson.dumps(data)
    if event is None:
        return b"data: " + payload + b"\n\n"
    return b"event: " + event + b"\ndata: " + payload + b"\n\n"


@dataclass(frozen=True, slots=True)
class Timing:
    latency_s: float  # before the response headers
    ttft_s: float  # headers → first content token
    tokens_per_s: float  # 0: no pacing

    def generation_s(self, tokens: int) -> float:
        """Time from the first token to the last one."""
        return max(tokens - 1, 0) / self.tokens_per_s if self.tokens_per_s > 0 else 0.0


@dataclass(frozen=True, slots=True)
class Call:
    """One model request as the API handlers see it."""

    request: web.Request
    state: MockState
    body: dict[str, Any]
    timing: Timing
    fault: Fault | None
    number: int  # request sequence number, for response ids
    request_id: str

    def header_int(self, name: str, default: int) -> int:
        value = self.request.headers.get(name)
        return default if value is None else int(value)  # validated in the prelude

    def fault_after(self) -> int:
        assert self.fault is not None
        after = self.fault.after
        return self.state.config.cut_after if after is None else after


def close_connection(request: web.Request) -> web.StreamResponse:
    """Close the connection with nothing (more) sent; returns a response that is never
    written (aiohttp's attempt to finish it meets the closed transport and stops)."""
    transport = request.transport
    if transport is not None:
        transport.close()
    return web.Response()


async def _until_gone(request: web.Request, stopping: asyncio.Event) -> None:
    """Wait until the client closed the connection (or the server stops)."""
    while not stopping.is_set():
        transport = request.transport
        if transport is None or transport.is_closing():
            return
        await asyncio.sleep(0.05)


async def hang(request: web.Request, stopping: asyncio.Event) -> web.StreamResponse:
    """Answer nothing until the client goes away (or the server stops)."""
    await _until_gone(request, stopping)
    return close_connection(request)


async def send_json(
    call: Call,
    obj: Any,
    *,
    tokens: int,
    status: int = 200,
    headers: Mapping[str, str] | None = None,
) -> web.StreamResponse:
    """A JSON answer, sent once ``tokens`` would have been generated; ``cut`` sends half
    the body and closes the connection, ``stall`` sends half the body and waits,
    ``malformed`` sends a body that is not JSON."""
    t = call.timing
    wait = t.ttft_s + t.generation_s(tokens)
    if wait > 0:
        await asyncio.sleep(wait)
    body = orjson.dumps(obj)
    kind = call.fault.kind if call.fault is not None else None
    if kind == "malformed":
        body = body[: len(body) // 2]
    all_headers = {"Content-Type": "application/json", **(headers or {})}
    if kind not in ("cut", "stall"):
        return web.Response(body=body, status=status, headers=all_headers)
    resp = web.StreamResponse(status=status, headers=all_headers)
    resp.content_length = len(body)
    try:
        await resp.prepare(call.request)
        await resp.write(body[: len(body) // 2])
    except ConnectionError:
        return resp
    if kind == "stall":
        await _until_gone(call.request, call.state.stopping)
    close_connection(call.request)
    return resp


async def send_events(
    call: Call,
    lead: list[bytes],
    tokens: list[bytes],
    tail: list[bytes],
    *,
    lead_with_first_token: bool,
    bad_line: bytes,
    headers: Mapping[str, str] | None = None,
) -> web.StreamResponse:
    """Stream ``lead`` (at once, or with the first token), ``tokens`` (the first after
    the TTFT, then paced) and ``tail`` (right after the last token).

    Faults: ``cut`` stops after N events and closes the connection; ``stall`` stops
    after N events and waits for the client to give up; ``malformed`` inserts
    ``bad_line`` after N events.
    """
    t = call.timing
    step = 1.0 / t.tokens_per_s if t.tokens_per_s > 0 else 0.0
    last = t.ttft_s + step * max(len(tokens) - 1, 0)
    first = t.ttft_s if lead_with_first_token else 0.0
    events = [(first, e) for e in lead]
    events += [(t.ttft_s + step * i, e) for i, e in enumerate(tokens)]
    events += [(last, e) for e in tail]
    stop = None
    if call.fault is not None and call.fault.kind in ("cut", "stall", "malformed"):
        after = min(call.fault_after(), len(events))
        if call.fault.kind != "malformed":
            del events[after:]
            stop = call.fault.kind
        else:
            events.insert(after, (events[after - 1][0] if after else 0.0, bad_line))

    resp = web.StreamResponse(headers={**_SSE_HEADERS, **(headers or {})})
    loop = asyncio.get_running_loop()
    try:
        await resp.prepare(call.request)
        start = loop.time()
        batch: list[bytes] = []
        for due, frame in events:
            wait = start + due - loop.time()
            if wait > _BATCH_S:
                if batch:
                    await resp.write(b"".join(batch))
                    batch.clear()
                await asyncio.sleep(wait)
            batch.append(frame)
        if batch:
            await resp.write(b"".join(batch))
        if stop == "stall":
            await _until_gone(call.request, call.state.stopping)
    except ConnectionError:  # the client went away mid-stream
        return resp
    if stop is not None:
        close_connection(call.request)
    return resp
