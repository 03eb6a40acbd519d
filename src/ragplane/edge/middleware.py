"""Request id and W3C trace context for every request, minted at the edge.

Incoming ``X-Request-Id`` and ``traceparent`` headers are honoured only when the
TCP peer is a configured trusted proxy; from anyone else they are ignored and
fresh values are minted. Both go back on the response.
"""

from __future__ import annotations

import ipaddress
import re
import time
from collections.abc import Sequence

import structlog
from pydantic import IPvAnyNetwork
from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ragplane.edge.context import RequestContext
from ragplane.observe.logging import get_logger
from ragplane.observe.tracecontext import TraceContext, random_hex

__all__ = ["RequestContextMiddleware", "new_request_id"]

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
log = get_logger("ragplane.edge")


def new_request_id() -> str:
    return "req_" + random_hex(24)


class RequestContextMiddleware:
    def __init__(self, app: ASGIApp, trusted_proxies: Sequence[IPvAnyNetwork] = ()) -> None:
        self.app = app
        self.trusted_proxies = tuple(trusted_proxies)

    def _trusted(self, scope: Scope) -> bool:
        client = scope.get("client")
        if not client or not self.trusted_proxies:
            return False
        try:
            peer = ipaddress.ip_address(client[0])
        except ValueError:
            return False
        return any(peer in net for net in self.trusted_proxies)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id: str | None = None
        trace: TraceContext | None = None
        if self._trusted(scope):
            headers = Headers(scope=scope)
            incoming = headers.get("x-request-id")
            if incoming and _REQUEST_ID.fullmatch(incoming):
                request_id = incoming
            trace = TraceContext.continue_from(headers.get("traceparent"))
        ctx = RequestContext(
            request_id=request_id or new_request_id(), trace=trace or TraceContext.mint()
        )
        scope.setdefault("state", {})["request_context"] = ctx
        started = time.perf_counter()
        status = 500

        async def send_with_ids(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                out = MutableHeaders(scope=message)
                out["x-request-id"] = ctx.request_id
                out["traceparent"] = ctx.trace.traceparent
            await send(message)

        # uvicorn serves a keep-alive connection's requests in one task: start clean
        structlog.contextvars.clear_contextvars()
        with structlog.contextvars.bound_contextvars(
            request_id=ctx.request_id, trace_id=ctx.trace.trace_id
        ):
            try:
                await self.app(scope, receive, send_with_ids)
            finally:
                log.info(
                    "request",
                    method=scope["method"],
                    path=scope["path"],
                    status=status,
                    duration_ms=round((time.perf_counter() - started) * 1000, 2),
                )
