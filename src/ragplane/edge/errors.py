"""Every error leaves the edge as ``{"error": {"code", "message", "request_id"}}``."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse

from ragplane.edge.context import RequestContext
from ragplane.edge.middleware import new_request_id
from ragplane.errors import ApiError, DatabaseUnavailable
from ragplane.observe.logging import get_logger
from ragplane.observe.tracecontext import TraceContext

__all__ = ["error_response", "install_error_handlers"]

log = get_logger("ragplane.edge")

_HTTP_CODES = {
    400: "invalid_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
    429: "rate_limited",
}


def _ids(request: Request) -> tuple[str, str]:
    """(request id, traceparent) of this request."""
    ctx: RequestContext | None = getattr(request.state, "request_context", None)
    if ctx is None:
        return new_request_id(), TraceContext.mint().traceparent
    return ctx.request_id, ctx.trace.traceparent


def error_response(
    request: Request,
    status: int,
    code: str,
    message: str,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    rid, traceparent = _ids(request)
    # both ids here too: a 500 is sent from outside RequestContextMiddleware, which adds them
    # to every other response
    return JSONResponse(
        {"error": {"code": code, "message": message, "request_id": rid}},
        status_code=status,
        headers={**(headers or {}), "x-request-id": rid, "traceparent": traceparent},
    )


async def _api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return error_response(request, exc.status_code, exc.code, exc.message, exc.headers)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    return error_response(
        request,
        exc.status_code,
        _HTTP_CODES.get(exc.status_code, "http_error"),
        str(exc.detail),
        dict(exc.headers or {}),
    )


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
    return error_response(request, 422, "invalid_request", problems or "invalid request")


async def _unavailable(request: Request, exc: Exception) -> JSONResponse:
    log.error("database_unavailable", error=str(exc))
    return error_response(
        request, 503, "unavailable", "the data plane is unavailable", {"Retry-After": "1"}
    )


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled_error", error_type=type(exc).__name__)
    return error_response(request, 500, "internal_error", "internal error")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(DatabaseUnavailable, _unavailable)
    app.add_exception_handler(Exception, _unexpected)
