"""Provider errors parsed once; gateway errors rendered so each official SDK raises its
# ruff: noqa: E501  (one table row per case reads better than wrapped rows)
usual exception type, with the request id and Retry-After."""

from __future__ import annotations

from email.utils import formatdate
from functools import partial

import anthropic
import openai
import orjson
import pytest

from ragplane.errors import (
    BadRequest,
    BulkheadFull,
    Forbidden,
    NoHealthyRoute,
    PayloadTooLarge,
    Unauthorized,
    UnknownAlias,
    UpstreamError,
    UpstreamTimeout,
)
from ragplane.gateway.apierrors import (
    render_error,
    retry_after_seconds,
    stream_error_frame,
    upstream_error,
)
from tests.unit.adapter_support import anthropic_sdk, frames_to_events, openai_sdk

OPENAI_429 = (
    b'{"error": {"message": "Rate limit reached for gpt-4o-mini in organization org-x on '
    b'requests per min (RPM): Limit 500, Used 500, Requested 1.", "type": "requests", '
    b'"param": null, "code": "rate_limit_exceeded"}}'
)
ANTHROPIC_529 = (
    b'{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"},'
    b'"request_id":"req_011CSHoEeqs5C35K2UUqR7Fy"}'
)


def test_an_openai_rate_limit() -> None:
    err = upstream_error(
        "openai",
        429,
        {"retry-after": "2", "x-request-id": "req_abc"},
        OPENAI_429,
        provider="openai-main",
        route="fast/gpt",
        attempt=2,
    )
    assert err.status == 429
    assert err.retryable
    assert err.retry_after_s == 2.0
    assert err.code == "rate_limited"
    assert err.message.startswith("openai-main answered 429 (requests): Rate limit reached")
    assert "req_abc" in err.message
    assert (err.provider, err.route, err.attempt) == ("openai-main", "fast/gpt", 2)
    assert err.body == OPENAI_429.decode()


def test_an_anthropic_overload_prefers_retry_after_ms() -> None:
    headers = {"retry-after-ms": "1500", "retry-after": "9", "request-id": "req_011"}
    err = upstream_error("anthropic", 529, headers, ANTHROPIC_529)
    assert err.retry_after_s == 1.5
    assert err.retryable
    assert "(overloaded_error): Overloaded" in err.message
    assert "req_011" in err.message


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            b'{"error":"model \\"llama3\\" not found, try pulling it first"}',
            'model "llama3" not found',
        ),
        (
            b'{"object":"error","message":"max_tokens is too large","type":"BadRequestError"}',
            "max_tokens is too large",
        ),
        (b'{"detail":"Not Found"}', "Not Found"),
        (b"<html><body>502 Bad Gateway</body></html>", "502 Bad Gateway"),
        (b"", "no error body"),
    ],
)
def test_other_servers_error_shapes(body: bytes, message: str) -> None:
    err = upstream_error("openai", 400, {}, body)
    assert message in err.message
    assert not err.retryable
    assert err.retry_after_s is None


def test_x_should_retry_overrides_the_status_rule() -> None:
    assert not upstream_error("openai", 500, {"x-should-retry": "false"}, b"").retryable
    assert upstream_error("anthropic", 409, {"X-Should-Retry": "true"}, b"").retryable


def test_retry_after_forms() -> None:
    now = 1_800_000_000.0
    assert retry_after_seconds({"retry-after": formatdate(now + 30, usegmt=True)}, now=now) == 30.0
    assert retry_after_seconds({"retry-after": formatdate(now - 30, usegmt=True)}, now=now) == 0.0
    assert retry_after_seconds({"Retry-After": "0.25"}) == 0.25
    assert retry_after_seconds({"retry-after": "soon"}) is None
    assert retry_after_seconds({"retry-after-ms": "nan", "retry-after": "3"}) == 3.0
    assert retry_after_seconds({"retry-after": "-5"}) == 0.0
    assert retry_after_seconds({}) is None


CASES = [
    (
        BadRequest("messages: required"),
        400,
        openai.BadRequestError,
        anthropic.BadRequestError,
        "invalid_request_error",
    ),
    (
        Unauthorized("bad key"),
        401,
        openai.AuthenticationError,
        anthropic.AuthenticationError,
        "authentication_error",
    ),
    (
        Forbidden("no gateway scope"),
        403,
        openai.PermissionDeniedError,
        anthropic.PermissionDeniedError,
        "permission_error",
    ),
    (
        UnknownAlias("no alias x"),
        404,
        openai.NotFoundError,
        anthropic.NotFoundError,
        "not_found_error",
    ),
    (PayloadTooLarge("too big"), 413, openai.APIStatusError, anthropic.APIStatusError, None),
    (
        BulkheadFull("busy", retry_after_s=2),
        429,
        openai.RateLimitError,
        anthropic.RateLimitError,
        "rate_limit_error",
    ),
    (
        UpstreamError("slow down", status=429, retry_after_s=0.2),
        429,
        openai.RateLimitError,
        anthropic.RateLimitError,
        "rate_limit_error",
    ),
    (
        UpstreamError("provider key rejected", status=401),
        502,
        openai.InternalServerError,
        anthropic.InternalServerError,
        None,
    ),
    (
        UpstreamTimeout("no first token", phase="ttft"),
        504,
        openai.InternalServerError,
        anthropic.InternalServerError,
        None,
    ),
    (
        RuntimeError("secret detail"),
        500,
        openai.InternalServerError,
        anthropic.InternalServerError,
        None,
    ),
]


@pytest.mark.parametrize(("exc", "status", "openai_type", "anthropic_type", "kind"), CASES)
def test_each_sdk_raises_its_usual_exception(
    exc: Exception,
    status: int,
    openai_type: type[Exception],
    anthropic_type: type[Exception],
    kind: str | None,
) -> None:
    for api, sdk, expected in (
        ("openai", openai_sdk, openai_type),
        ("anthropic", anthropic_sdk, anthropic_type),
    ):
        rendered = render_error(api, exc, "req_42")  # type: ignore[arg-type]
        assert rendered.status == status
        client = sdk(rendered.body, status=rendered.status, headers=rendered.headers)
        if api == "openai":
            call = partial(client.chat.completions.create, model="a", messages=[])
        else:
            call = partial(client.messages.create, model="a", max_tokens=1, messages=[])
        with pytest.raises(expected) as info:  # type: ignore[call-overload]
            call()
        body = orjson.loads(rendered.body)
        error = body["error"]
        assert "req_42" in error["message"]
        assert "secret detail" not in error["message"]
        if kind is not None:
            assert error["type"] == kind
        if api == "anthropic":
            assert body["type"] == "error"
            assert body["request_id"] == "req_42"
            assert rendered.headers["request-id"] == "req_42"
        else:
            assert set(error) == {"message", "type", "param", "code"}
            assert rendered.headers["x-request-id"] == "req_42"
            assert info.value.code == error["code"]  # type: ignore[attr-defined]
        assert ("retry-after" in rendered.headers) == (status == 429)


def test_retry_after_header_values() -> None:
    assert (
        render_error("openai", BulkheadFull("busy", retry_after_s=2), "r").headers["retry-after"]
        == "2"
    )
    limited = UpstreamError("x", status=429, retry_after_s=2.1)
    assert render_error("anthropic", limited, "r").headers["retry-after"] == "3"
    assert render_error("openai", UpstreamError("x", status=429), "r").headers["retry-after"] == "1"
    assert render_error("openai", Unauthorized("x"), "r").headers["WWW-Authenticate"] == "Bearer"


def test_no_healthy_route_is_an_overload_for_anthropic_and_a_503_for_openai() -> None:
    exc = NoHealthyRoute("every route of support-quality is open")
    assert render_error("openai", exc, "r").status == 503
    rendered = render_error("anthropic", exc, "r")
    assert rendered.status == 529
    assert orjson.loads(rendered.body)["error"]["type"] == "overloaded_error"
    with pytest.raises(anthropic.OverloadedError):
        anthropic_sdk(rendered.body, status=529).messages.create(
            model="a", max_tokens=1, messages=[]
        )
    upstream = render_error("anthropic", UpstreamError("Overloaded", status=529), "r")
    assert upstream.status == 529


def test_stream_error_frames() -> None:
    [openai_event] = frames_to_events(
        stream_error_frame("openai", "rate_limited", "quota", "req_1")
    )
    assert openai_event.event is None
    assert orjson.loads(openai_event.data) == {
        "error": {
            "message": "quota (request id req_1)",
            "type": "rate_limit_error",
            "param": None,
            "code": "rate_limited",
        }
    }
    [event] = frames_to_events(
        stream_error_frame("anthropic", "stream_interrupted", "reset", "req_2")
    )
    assert event.event == "error"
    assert orjson.loads(event.data) == {
        "type": "error",
        "error": {"type": "api_error", "message": "reset (request id req_2)"},
        "request_id": "req_2",
    }
