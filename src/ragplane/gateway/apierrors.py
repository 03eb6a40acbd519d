"""Errors across the gateway's two edges, in each API's own shape.

Inbound (provider → gateway): ``upstream_error`` turns an error status and body from an
OpenAI-compatible or Anthropic upstream into one ``UpstreamError`` with the provider's
message, its request id and ``retry_after_s`` (``retry-after-ms``, ``Retry-After`` in
seconds or as an HTTP date). ``stream_upstream_error`` does the same for an error that
arrives as an event inside a 200 stream.

Outbound (gateway → caller): ``render_error`` gives the status, headers and body that
make the official SDKs raise their usual exception types::

    OpenAI     {"error": {"message", "type", "param", "code"}}
    Anthropic  {"type": "error", "error": {"type", "message"}, "request_id"}

and ``stream_error_frame`` the event that ends a stream explicitly (OpenAI: a ``data:``
frame holding ``{"error": {...}}``; Anthropic: ``event: error``).

An upstream 401/403/404 is the gateway's configuration problem (its key, its model
id), not the caller's: it is rendered as 502 so the caller's SDK does not report a bad
caller key.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any

import orjson

from ragplane.errors import ApiError, BulkheadFull, GatewayError, UpstreamError
from ragplane.gateway.sse import encode_event
from ragplane.gateway.types import Api

__all__ = [
    "RenderedError",
    "error_type",
    "render_error",
    "retry_after_seconds",
    "stream_error_frame",
    "stream_upstream_error",
    "upstream_error",
]

_MAX_BODY_CHARS = 2000

_OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
}
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}
# our stable codes → the HTTP status they stand for (for stream error events)
_CODE_STATUS = {
    "rate_limited": 429,
    "concurrency_limit": 429,
    "no_healthy_route": 503,
    "upstream_timeout": 504,
    "invalid_request": 400,
    "model_not_found": 404,
}
# an Anthropic-shaped upstream error type → the status it is sent with
_ANTHROPIC_TYPE_STATUS = {v: k for k, v in _ANTHROPIC_TYPES.items()}


def error_type(api: Api, status: int) -> str:
    """The ``error.type`` each API uses for an HTTP status."""
    if api == "anthropic":
        if status == 503:
            return "overloaded_error"
        return _ANTHROPIC_TYPES.get(
            status, "api_error" if status >= 500 else "invalid_request_error"
        )
    if status >= 500:
        return "server_error"
    return _OPENAI_TYPES.get(status, "invalid_request_error")


def _header(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(name)
    if value is not None:
        return value
    for key, val in headers.items():
        if key.lower() == name:
            return val
    return None


def retry_after_seconds(headers: Mapping[str, str], *, now: float | None = None) -> float | None:
    """``retry-after-ms``, else ``Retry-After`` (delta seconds or an HTTP date), never < 0."""
    raw_ms = _header(headers, "retry-after-ms")
    if raw_ms is not None:
        try:
            ms = float(raw_ms)
        except ValueError:
            ms = math.nan
        if math.isfinite(ms):
            return max(ms / 1000.0, 0.0)
    raw = _header(headers, "retry-after")
    if raw is None:
        return None
    try:
        seconds = float(raw)
    except ValueError:
        try:
            when = parsedate_to_datetime(raw).timestamp()
        except (TypeError, ValueError, IndexError):
            return None
        seconds = when - (time.time() if now is None else now)
    return max(seconds, 0.0) if math.isfinite(seconds) else None


def _message_and_type(payload: Any) -> tuple[str | None, str | None]:
    if not isinstance(payload, dict):
        return None, None
    err = payload.get("error")
    if isinstance(err, dict):  # OpenAI, Anthropic, vLLM (new)
        kind = err.get("type") or err.get("code")
        return _str(err.get("message")), _str(kind)
    if isinstance(err, str):  # Ollama, llama.cpp (old)
        return err, None
    if "message" in payload:  # vLLM (old): {"object": "error", "message", "type"}
        return _str(payload.get("message")), _str(payload.get("type"))
    if "detail" in payload:  # FastAPI-based servers
        return _str(payload.get("detail")), None
    return None, None


def _str(value: Any) -> str | None:
    if value is None:
        return None
    return value if isinstance(value, str) else str(value)


def upstream_error(
    api: Api,
    status: int,
    headers: Mapping[str, str],
    body: bytes,
    *,
    provider: str | None = None,
    route: str | None = None,
    attempt: int | None = None,
    request_id: str | None = None,
) -> UpstreamError:
    """An error status from a provider speaking ``api``, as one ``UpstreamError``."""
    text = body[: _MAX_BODY_CHARS * 4].decode("utf-8", "replace")[:_MAX_BODY_CHARS]
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        payload = None
    message, kind = _message_and_type(payload)
    if message is None:
        message = text.strip() or "no error body"
    label = f"{provider or api} answered {status}"
    if kind:
        label += f" ({kind})"
    upstream_id = _header(headers, "x-request-id") or _header(headers, "request-id")
    if upstream_id:
        message = f"{message} [upstream request id {upstream_id}]"
    err = UpstreamError(
        f"{label}: {message}",
        status=status,
        retry_after_s=retry_after_seconds(headers),
        body=text,
        provider=provider,
        route=route,
        attempt=attempt,
        request_id=request_id,
    )
    should_retry = _header(headers, "x-should-retry")
    if should_retry in ("true", "false"):  # both vendors' explicit verdict wins
        err.retryable = should_retry == "true"
    return err


def stream_upstream_error(
    api: Api, payload: Mapping[str, Any], *, provider: str | None, route: str | None
) -> UpstreamError:
    """An error event inside an upstream stream (``{"error": {...}}`` / ``event: error``)."""
    message, kind = _message_and_type(dict(payload))
    status = 500
    if api == "anthropic" and kind in _ANTHROPIC_TYPE_STATUS:
        status = _ANTHROPIC_TYPE_STATUS[kind]
    elif kind in ("rate_limit_error", "rate_limit_exceeded"):
        status = 429
    err = payload.get("error")
    if isinstance(err, dict) and isinstance(err.get("code"), int):  # vLLM puts the status here
        status = err["code"]
    body = orjson.dumps(payload).decode()[:_MAX_BODY_CHARS]
    label = f"{provider or api} sent an error event" + (f" ({kind})" if kind else "")
    return UpstreamError(
        f"{label}: {message or 'no message'}",
        status=status,
        body=body,
        provider=provider,
        route=route,
    )


@dataclass(frozen=True, slots=True)
class RenderedError:
    """An error response ready to send: status, headers, JSON body."""

    status: int
    headers: dict[str, str]
    body: bytes


def _classify(exc: BaseException) -> tuple[int, str, str, float | None]:
    """(caller status, stable code, message, retry-after seconds) of any exception."""
    if isinstance(exc, UpstreamError):
        status = exc.status_code
        if exc.status in (401, 403, 404):
            status = 502
        elif exc.status == 529:
            status = 529
        return status, exc.code, exc.message, exc.retry_after_s
    if isinstance(exc, BulkheadFull):
        return exc.status_code, exc.code, exc.message, exc.retry_after_s
    if isinstance(exc, GatewayError):
        return exc.status_code, exc.code, exc.message, None
    if isinstance(exc, ApiError):
        return exc.status_code, exc.code, exc.message, None
    return 500, "internal_error", "internal error", None


def render_error(api: Api, exc: BaseException, request_id: str) -> RenderedError:
    """The caller-facing response for ``exc`` in ``api``'s error shape."""
    status, code, message, retry_after = _classify(exc)
    if api == "openai" and status == 529:
        status = 503
    if api == "anthropic" and status == 503:
        status = 529  # the SDK's OverloadedError; it retries it
    headers = {"content-type": "application/json"}
    if isinstance(exc, ApiError):
        headers.update(exc.headers)
    if status in (429, 503, 529) and (retry_after is not None or status == 429):
        headers["retry-after"] = str(max(math.ceil(retry_after or 1.0), 1))
    text = f"{message} (request id {request_id})"
    payload: dict[str, Any]
    if api == "anthropic":
        headers["request-id"] = request_id
        payload = {
            "type": "error",
            "error": {"type": error_type(api, status), "message": text},
            "request_id": request_id,
        }
    else:
        headers["x-request-id"] = request_id
        payload = {
            "error": {"message": text, "type": error_type(api, status), "param": None, "code": code}
        }
    return RenderedError(status, headers, orjson.dumps(payload))


def stream_error_frame(api: Api, code: str, message: str, request_id: str) -> bytes:
    """The SSE frame that ends a caller's stream with an explicit error."""
    status = _CODE_STATUS.get(code, 500)
    kind = error_type(api, status)
    text = f"{message} (request id {request_id})"
    if api == "anthropic":
        payload: dict[str, Any] = {
            "type": "error",
            "error": {"type": kind, "message": text},
            "request_id": request_id,
        }
        return encode_event(orjson.dumps(payload), "error")
    payload = {"error": {"message": text, "type": kind, "param": None, "code": code}}
    return encode_event(orjson.dumps(payload))
