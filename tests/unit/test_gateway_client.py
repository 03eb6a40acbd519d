"""The AI service's gateway client: OpenAI SSE parsing at the transport seam
(httpx.MockTransport), error translation, and the in-process ASGI transport's streaming."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import orjson
import pytest
from starlette.types import Receive, Scope, Send

from ragplane.service.llm import GatewayClient, InProcessTransport, LlmCallError, LlmDelta, LlmUsage

IDS = {
    "tenant_id": "tnt_alpha",
    "request_id": "req_1",
    "traceparent": "00-" + "a" * 32 + "-" + "b" * 16 + "-01",
}


def _frame(payload: Any) -> bytes:
    return b"data: " + (payload if isinstance(payload, bytes) else orjson.dumps(payload)) + b"\n\n"


def _chunk(text: str) -> dict[str, Any]:
    return {"choices": [{"index": 0, "delta": {"content": text}}], "model": "m"}


def _client(handler: Any) -> GatewayClient:
    http = httpx.AsyncClient(transport=httpx.MockTransport(handler), base_url="http://gw")
    return GatewayClient(http, service_key="svc")


async def _collect(client: GatewayClient) -> list[Any]:
    return [p async for p in client.stream("alias", [{"role": "user", "content": "q"}], **IDS)]


async def test_a_stream_yields_deltas_then_usage_and_sends_the_ids() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        body = (
            _frame(_chunk("Hello "))
            + b"data: "
            + orjson.dumps(_chunk("world"))
            + b"\r\n\r\n"  # CRLF framing too
            + _frame(
                {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 2}, "model": "m"}
            )
            + _frame(b"[DONE]")
        )
        return httpx.Response(200, content=body, headers={"content-type": "text/event-stream"})

    pieces = await _collect(_client(handler))
    assert pieces == [LlmDelta("Hello "), LlmDelta("world"), LlmUsage(7, 2, "m")]
    (r,) = seen
    assert r.headers["authorization"] == "Bearer svc"
    assert r.headers["x-tenant-id"] == "tnt_alpha"
    assert r.headers["x-request-id"] == "req_1"
    assert r.headers["traceparent"] == IDS["traceparent"]
    body = orjson.loads(r.content)
    assert body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}


async def test_an_error_event_after_text_says_the_stream_had_started() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        body = _frame(_chunk("partial")) + _frame(
            {"error": {"code": "stream_interrupted", "message": "cut (request id r)"}}
        )
        return httpx.Response(200, content=body)

    with pytest.raises(LlmCallError) as err:
        await _collect(_client(handler))
    assert err.value.code == "stream_interrupted"
    assert err.value.started is True


async def test_a_stream_without_its_end_marker_is_interrupted() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=_frame(_chunk("partial")))

    with pytest.raises(LlmCallError) as err:
        await _collect(_client(handler))
    assert (err.value.code, err.value.started) == ("stream_interrupted", True)


async def test_an_error_status_carries_the_gateways_code() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(503, json={"error": {"code": "no_healthy_route", "message": "down"}})

    with pytest.raises(LlmCallError) as err:
        await _collect(_client(handler))
    assert (err.value.code, err.value.status, err.value.started) == ("no_healthy_route", 503, False)
    with pytest.raises(LlmCallError) as err2:
        await _client(handler).complete("alias", [{"role": "user", "content": "q"}], **IDS)
    assert err2.value.code == "no_healthy_route"


async def test_in_process_transport_streams_before_the_app_finishes() -> None:
    release = asyncio.Event()
    disconnected = asyncio.Event()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        assert scope["path"] == "/gateway/v1/x"
        assert (await receive())["body"] == b"ping"
        await send({"type": "http.response.start", "status": 200, "headers": [(b"x-a", b"1")]})
        await send({"type": "http.response.body", "body": b"first", "more_body": True})
        await release.wait()
        await send({"type": "http.response.body", "body": b"second", "more_body": False})
        if (await receive())["type"] == "http.disconnect":
            disconnected.set()

    transport = InProcessTransport(app, root_path="/gateway")
    async with (
        httpx.AsyncClient(transport=transport, base_url="http://gw") as client,
        client.stream("POST", "/v1/x", content=b"ping") as r,
    ):
        assert r.status_code == 200
        assert r.headers["x-a"] == "1"
        chunks = r.aiter_bytes()
        assert await anext(chunks) == b"first"  # the app is still waiting
        release.set()
        assert await anext(chunks) == b"second"
    await asyncio.wait_for(disconnected.wait(), 1)
