"""The gateway's HTTP API: OpenAI- and Anthropic-compatible, its own ASGI app.

``/v1/chat/completions``, ``/v1/embeddings`` and ``/v1/models`` speak OpenAI's wire
protocol, ``/v1/messages`` Anthropic's (``/v1/models`` answers in Anthropic's shape
when the caller sends ``anthropic-version``). ``/v1/health/routes`` shows each route's
breaker state and latency. Errors come in the caller's protocol's own shape, so the
official SDKs raise their usual exception types. Every response carries
``x-request-id`` and ``x-ragplane-overhead-ms``: the time spent inside the gateway,
that is the whole handling time minus the time spent waiting for the provider.

The app is a bare ASGI callable: no FastAPI, no routing table or middleware, headers
read once into a dict, JSON answers sent as two ASGI messages (Starlette only for the
streamed answers) and bodies parsed with orjson: this is the hot path of every LLM
call and its CPU budget is about a millisecond.
"""

from __future__ import annotations

import functools
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from types import MappingProxyType
from typing import Any

import orjson
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from ragplane.edge.middleware import new_request_id
from ragplane.errors import ApiError, BadRequest, GatewayError, NotFound
from ragplane.gateway.apierrors import render_error
from ragplane.gateway.auth import GatewayAuth, GatewayPrincipal
from ragplane.gateway.relay import StreamRelay
from ragplane.gateway.router import Call, Router
from ragplane.gateway.types import Api, Breaker, BreakerState
from ragplane.observe.logging import get_logger
from ragplane.observe.tracecontext import TraceContext

__all__ = ["GatewayApp"]

log = get_logger("ragplane.gateway")

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_PASS_HEADERS = ("anthropic-version", "anthropic-beta")
_JSON_TYPE = (b"content-type", b"application/json")


class Request:
    """What a handler reads of a request: its headers (lower-case names, as ASGI servers
    send them; the first of repeated ones) and its body."""

    __slots__ = ("_receive", "headers")

    def __init__(self, scope: Scope, receive: Receive) -> None:
        raw: list[tuple[bytes, bytes]] = scope["headers"]
        self.headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in reversed(raw)}
        self._receive = receive

    async def body(self) -> bytes:
        chunks = []
        while True:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                raise BadRequest("the caller disconnected before the body was read")
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                return b"".join(chunks)


class Response:
    """A whole answer: a status, headers and a body (JSON unless the headers name another
    type), sent in two ASGI messages."""

    __slots__ = ("body", "headers", "status")

    def __init__(
        self, body: bytes, status: int = 200, headers: dict[str, str] | None = None
    ) -> None:
        self.body = body
        self.status = status
        self.headers = headers or {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        raw = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in self.headers.items()]
        if "content-type" not in self.headers:
            raw.append(_JSON_TYPE)
        raw.append((b"content-length", str(len(self.body)).encode()))
        await send({"type": "http.response.start", "status": self.status, "headers": raw})
        await send({"type": "http.response.body", "body": self.body})


class _Begun:
    """What every handler knows after authentication."""

    __slots__ = ("principal", "request_id", "started", "trace")

    def __init__(self, started: float, request_id: str) -> None:
        self.started = started
        self.request_id = request_id
        self.principal: GatewayPrincipal | None = None
        self.trace: TraceContext | None = None


class GatewayApp:
    """Handlers over one :class:`Router`; the instance is the ASGI application.

    Dispatch is one dictionary look-up on (method, path): no routing table, no
    middleware stack — every exception is already turned into the caller protocol's
    error by the handlers.
    """

    def __init__(self, router: Router, auth: GatewayAuth, breaker: Breaker) -> None:
        self.router = router
        self.auth = auth
        self.breaker = breaker
        self._routes: dict[tuple[str, str], Callable[[Request], Awaitable[_Answer]]] = {
            # the call endpoints go straight to _call (no wrapper coroutine per request)
            ("POST", "/v1/chat/completions"): functools.partial(self._call, api="openai"),
            ("POST", "/v1/messages"): functools.partial(self._call, api="anthropic"),
            ("POST", "/v1/embeddings"): functools.partial(
                self._call, api="openai", kind="embeddings"
            ),
            ("GET", "/v1/models"): self.models,
            ("GET", "/v1/health/routes"): self.route_health,
            ("GET", "/health"): self.health,
        }
        self._paths = {path for _, path in self._routes}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # lifespan belongs to whoever serves the app
            return
        path = _route_path(scope)
        handler = self._routes.get((scope["method"], path))
        if handler is not None:
            response = await handler(Request(scope, receive))
        else:
            api: Api = "anthropic" if path == "/v1/messages" else "openai"
            begun = _Begun(time.perf_counter(), new_request_id())
            if path in self._paths:
                error: ApiError = _MethodNotAllowed(f"{scope['method']} is not allowed on {path}")
            else:
                error = NotFound(f"no such endpoint: {path}")
            response = _error(api, error, begun)
        await response(scope, receive, send)

    # -- handlers --------------------------------------------------------------------

    async def models(self, request: Request) -> Response:
        api: Api = "anthropic" if "anthropic-version" in request.headers else "openai"
        begun = _Begun(time.perf_counter(), new_request_id())
        try:
            await self._authenticate(request, begun, need_tenant=False)
        except (ApiError, GatewayError) as exc:
            return _error(api, exc, begun)
        names = sorted(self.router.aliases())
        payload: dict[str, Any]
        if api == "anthropic":
            data = [
                {
                    "type": "model",
                    "id": n,
                    "display_name": n,
                    "created_at": "1970-01-01T00:00:00Z",
                }
                for n in names
            ]
            payload = {
                "data": data,
                "has_more": False,
                "first_id": names[0] if names else None,
                "last_id": names[-1] if names else None,
            }
        else:
            payload = {
                "object": "list",
                "data": [
                    {"id": n, "object": "model", "created": 0, "owned_by": "ragplane"}
                    for n in names
                ],
            }
        return _json(payload, begun)

    async def health(self, request: Request) -> Response:
        """Liveness, unauthenticated: the process serves requests."""
        return Response(b'{"status":"ok"}')

    async def route_health(self, request: Request) -> Response:
        begun = _Begun(time.perf_counter(), new_request_id())
        try:
            await self._authenticate(request, begun, need_tenant=False)
        except (ApiError, GatewayError) as exc:
            return _error("openai", exc, begun)
        aliases = {}
        for alias, routes in self.router.aliases().items():
            healths = [await self.breaker.health(r) for r in routes]
            states = {h.state for h in healths}
            if states <= {BreakerState.OPEN}:
                status = "offline_cache"
            elif states == {BreakerState.CLOSED}:
                status = "ok"
            else:
                status = "degraded"
            aliases[alias] = {
                "status": status,
                "routes": [
                    {
                        "route": h.route,
                        "provider": r.provider_name,
                        "model": r.model.upstream,
                        "state": str(h.state),
                        "calls": h.calls,
                        "error_rate": h.error_rate,
                        "p50_ms": h.p50_ms,
                        "p95_ms": h.p95_ms,
                    }
                    for h, r in zip(healths, routes, strict=True)
                ],
            }
        return _json({"aliases": aliases}, begun)

    # -- the call path ---------------------------------------------------------------

    async def _authenticate(
        self, request: Request, begun: _Begun, *, need_tenant: bool = True
    ) -> GatewayPrincipal:
        headers = request.headers
        key = headers.get("x-api-key")
        if key is None:
            scheme, _, credential = headers.get("authorization", "").partition(" ")
            key = credential.strip() if scheme.lower() == "bearer" else None
        principal = await self.auth.authenticate(
            key, headers.get("x-tenant-id"), need_tenant=need_tenant
        )
        begun.principal = principal
        if principal.service:
            # a platform service continues its own request id and trace
            incoming = headers.get("x-request-id")
            if incoming and _REQUEST_ID.fullmatch(incoming):
                begun.request_id = incoming
            begun.trace = TraceContext.continue_from(headers.get("traceparent"))
        return principal

    async def _call(self, request: Request, *, api: Api, kind: str = "chat") -> _Answer:
        begun = _Begun(time.perf_counter(), new_request_id())
        try:
            principal = await self._authenticate(request, begun)
            body = _parse_body(await request.body())
            alias = _alias(body)
            headers = request.headers
            trace = begun.trace or TraceContext.mint()
            call = Call(
                api=api,
                alias=alias,
                body=body,
                tenant_id=principal.tenant_id,
                request_id=begun.request_id,
                stream=kind == "chat" and body.get("stream") is True,
                kind="embeddings" if kind == "embeddings" else "chat",
                feature_id=headers.get("x-feature-id"),
                trace_id=trace.trace_id,
                traceparent=trace.traceparent,
                region=principal.region,
                pool="batch" if headers.get("x-ragplane-pool") == "batch" else "interactive",
                headers=_passed_headers(headers),
            )
            if call.stream:
                result = await self.router.stream(call)
                return _SseResponse(
                    result.frames,
                    headers=_ids(begun, result.upstream_ms, result.route.name)
                    | {"cache-control": "no-cache"},
                )
            done = await self.router.complete(call)
            return Response(
                done.raw if done.raw is not None else orjson.dumps(done.body),
                headers=_ids(begun, done.upstream_ms, done.route.name),
            )
        except (ApiError, GatewayError) as exc:
            return _error(api, exc, begun)
        except Exception as exc:  # a bug: still the caller's error shape, with the request id
            log.exception("gateway_internal_error", request_id=begun.request_id)
            return _error(api, exc, begun)


class _MethodNotAllowed(ApiError):
    status_code = 405
    code = "method_not_allowed"


def _route_path(scope: Scope) -> str:
    """The path below the mount point (``/gateway`` inside the one-process platform)."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    if root and path.startswith(root) and path[len(root) : len(root) + 1] in ("", "/"):
        return path[len(root) :] or "/"
    return path


def _passed_headers(headers: dict[str, str]) -> Mapping[str, str]:
    """The caller's headers an adapter may forward (Anthropic's version and betas)."""
    if headers.keys().isdisjoint(_PASS_HEADERS):
        return _NONE_PASSED
    return {h: headers[h] for h in _PASS_HEADERS if h in headers}


_NONE_PASSED: Mapping[str, str] = MappingProxyType({})


def _parse_body(raw: bytes) -> dict[str, Any]:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"the request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    return body


def _alias(body: dict[str, Any]) -> str:
    alias = body.get("model")
    if not isinstance(alias, str) or not alias:
        raise BadRequest("'model' is required: the name of a gateway alias")
    return alias


class _SseResponse(StreamingResponse):
    """Streams a relay and always ends it: also when the caller left before the first
    frame was pulled (a generator that never started runs no ``finally``)."""

    def __init__(self, relay: StreamRelay, headers: dict[str, str]) -> None:
        super().__init__(relay, media_type="text/event-stream", headers=headers)
        self._relay = relay

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._relay.aclose()


_Answer = Response | _SseResponse


def _ids(begun: _Begun, upstream_ms: float = 0.0, route: str | None = None) -> dict[str, str]:
    """The request id, the time spent in the gateway so far (provider time excluded) and
    the route that answered, if one did."""
    overhead_ms = max(0.0, (time.perf_counter() - begun.started) * 1000 - upstream_ms)
    ids = {"x-request-id": begun.request_id, "x-ragplane-overhead-ms": f"{overhead_ms:.3f}"}
    if route is not None:
        ids["x-ragplane-route"] = route
    return ids


def _json(payload: dict[str, Any], begun: _Begun) -> Response:
    return Response(orjson.dumps(payload), headers=_ids(begun))


def _error(api: Api, exc: Exception, begun: _Begun) -> Response:
    if isinstance(exc, GatewayError) and exc.request_id is None:
        exc.request_id = begun.request_id
    rendered = render_error(api, exc, begun.request_id)
    if rendered.status >= 500:
        log.warning("gateway_error", status=rendered.status, error=str(exc))
    return Response(rendered.body, rendered.status, rendered.headers | _ids(begun))
