"""The AI service's one way to the LLM gateway: OpenAI chat completions over HTTP.

:class:`GatewayClient` sends ``POST /v1/chat/completions`` with a logical alias as the
model, a service key, ``X-Tenant-Id``, ``X-Feature-Id``, ``X-Request-Id`` and the
request's ``traceparent`` — whether the gateway is another process (``base_url``) or
the one mounted in this process: there the client's transport is
:class:`InProcessTransport`, which hands the request to the gateway's ASGI app and
streams its response back chunk by chunk, so the call takes the gateway's whole code
path (auth, routing, retries, breakers, bulkheads, ledger) exactly as over HTTP.
(httpx's own ASGI transport reads the whole response before returning it, which would
turn a stream into one late chunk.)

Errors: :class:`LlmCallError` with the gateway's error code, its HTTP status and
whether any text had reached us before it (``started``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
import orjson
from starlette.types import ASGIApp, Message

from ragplane.errors import RagplaneError

__all__ = [
    "ChatMessage",
    "GatewayClient",
    "InProcessTransport",
    "LlmCallError",
    "LlmDelta",
    "LlmUsage",
]

ChatMessage = dict[str, str]


class LlmCallError(RagplaneError):
    """A gateway call failed: ``code`` and ``status`` are the gateway's."""

    def __init__(self, code: str, message: str, *, status: int, started: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.status = status
        self.started = started


@dataclass(frozen=True)
class LlmUsage:
    input_tokens: int = 0
    output_tokens: int = 0
    model: str = ""


@dataclass(frozen=True)
class LlmDelta:
    text: str


class GatewayClient:
    def __init__(self, http: httpx.AsyncClient, *, service_key: str, timeout_s: float = 120.0):
        self._http = http
        self._key = service_key
        self._timeout = httpx.Timeout(timeout_s, connect=5.0)

    def _headers(
        self, tenant_id: str, request_id: str, traceparent: str, feature: str | None
    ) -> dict[str, str]:
        headers = {
            "authorization": f"Bearer {self._key}",
            "x-tenant-id": tenant_id,
            "x-request-id": request_id,
            "traceparent": traceparent,
            "content-type": "application/json",
        }
        if feature:
            headers["x-feature-id"] = feature
        return headers

    async def complete(
        self,
        alias: str,
        messages: Sequence[ChatMessage],
        *,
        tenant_id: str,
        request_id: str,
        traceparent: str,
        feature: str | None = None,
        max_tokens: int | None = None,
    ) -> tuple[str, LlmUsage]:
        try:
            r = await self._http.post(
                "/v1/chat/completions",
                content=_body(alias, messages, max_tokens, stream=False),
                headers=self._headers(tenant_id, request_id, traceparent, feature),
                timeout=self._timeout,
            )
        except httpx.HTTPError as exc:
            raise LlmCallError("gateway_unreachable", str(exc), status=502) from exc
        if r.status_code != 200:
            raise _error(r.status_code, r.content)
        data = orjson.loads(r.content)
        text = data["choices"][0]["message"].get("content") or ""
        return text, _usage(data)

    async def stream(
        self,
        alias: str,
        messages: Sequence[ChatMessage],
        *,
        tenant_id: str,
        request_id: str,
        traceparent: str,
        feature: str | None = None,
        max_tokens: int | None = None,
    ) -> AsyncIterator[LlmDelta | LlmUsage]:
        """Text deltas as they come, then the usage; an error after the first delta is an
        :class:`LlmCallError` with ``started`` set."""
        headers = self._headers(tenant_id, request_id, traceparent, feature)
        headers["accept"] = "text/event-stream"
        started = False
        usage = LlmUsage()
        try:
            async with self._http.stream(
                "POST",
                "/v1/chat/completions",
                content=_body(alias, messages, max_tokens, stream=True),
                headers=headers,
                timeout=self._timeout,
            ) as r:
                if r.status_code != 200:
                    raise _error(r.status_code, await r.aread())
                async for data in _sse_data(r.aiter_bytes()):
                    if data == b"[DONE]":
                        yield usage
                        return
                    event = orjson.loads(data)
                    if "error" in event:
                        err = event["error"]
                        raise LlmCallError(
                            str(err.get("code") or "upstream_error"),
                            str(err.get("message") or "the model's stream failed"),
                            status=502,
                            started=started,
                        )
                    if event.get("usage"):
                        usage = _usage(event)
                    for choice in event.get("choices") or ():
                        text = (choice.get("delta") or {}).get("content")
                        if text:
                            started = True
                            yield LlmDelta(text)
        except httpx.HTTPError as exc:
            raise LlmCallError(
                "gateway_unreachable",
                f"the gateway call failed: {exc}",
                status=502,
                started=started,
            ) from exc
        raise LlmCallError(
            "stream_interrupted",
            "the model's stream ended without its end marker",
            status=502,
            started=started,
        )


def _body(
    alias: str, messages: Sequence[ChatMessage], max_tokens: int | None, *, stream: bool
) -> bytes:
    """The chat-completions request: the alias as the model; a stream asks for usage."""
    body: dict[str, Any] = {"model": alias, "messages": list(messages)}
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    return orjson.dumps(body)


def _usage(data: dict[str, Any]) -> LlmUsage:
    u = data.get("usage") or {}
    return LlmUsage(
        input_tokens=int(u.get("prompt_tokens") or 0),
        output_tokens=int(u.get("completion_tokens") or 0),
        model=str(data.get("model") or ""),
    )


def _error(status: int, content: bytes) -> LlmCallError:
    try:
        err = orjson.loads(content)["error"]
        code, message = str(err.get("code") or err.get("type")), str(err.get("message"))
    except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
        code, message = "upstream_error", content[:200].decode("utf-8", "replace")
    return LlmCallError(code, message, status=status)


async def _sse_data(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """The ``data`` of each server-sent event (multi-line data joined by newlines)."""
    buffer = b""
    async for chunk in chunks:
        buffer += chunk
        while True:
            end = _event_end(buffer)
            if end is None:
                break
            raw, buffer = buffer[: end[0]], buffer[end[1] :]
            lines = [
                line[5:].removeprefix(b" ")
                for line in raw.replace(b"\r\n", b"\n").split(b"\n")
                if line.startswith(b"data:")
            ]
            if lines:
                yield b"\n".join(lines)


def _event_end(buffer: bytes) -> tuple[int, int] | None:
    ends = [(i, i + len(sep)) for sep in (b"\n\n", b"\r\n\r\n") if (i := buffer.find(sep)) >= 0]
    return min(ends) if ends else None


class InProcessTransport(httpx.AsyncBaseTransport):
    """httpx requests answered by an ASGI app in this process, streamed as it sends."""

    def __init__(self, app: ASGIApp, *, root_path: str = "") -> None:
        self._app = app
        self._root = root_path

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        body = await request.aread()
        path = request.url.path
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": request.method,
            "scheme": request.url.scheme,
            "path": self._root + path,
            "raw_path": (self._root + path).encode(),
            "root_path": self._root,
            "query_string": request.url.query,
            "headers": [(k.lower(), v) for k, v in request.headers.raw],
            "server": ("127.0.0.1", 0),
            "client": ("127.0.0.1", 0),
        }
        chunks: asyncio.Queue[bytes | None] = asyncio.Queue()
        started: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        disconnected = asyncio.Event()
        sent_body = False

        async def receive() -> Message:
            nonlocal sent_body
            if not sent_body:
                sent_body = True
                return {"type": "http.request", "body": body, "more_body": False}
            await disconnected.wait()
            return {"type": "http.disconnect"}

        async def send(message: Message) -> None:
            if message["type"] == "http.response.start":
                if not started.done():
                    started.set_result(message)
            elif message["type"] == "http.response.body":
                if message.get("body"):
                    chunks.put_nowait(message["body"])
                if not message.get("more_body", False):
                    chunks.put_nowait(None)

        async def run() -> None:
            try:
                await self._app(scope, receive, send)
            except BaseException as exc:
                if not started.done():
                    started.set_exception(exc)
                raise
            finally:
                chunks.put_nowait(None)

        task = asyncio.create_task(run())
        try:
            start = await started
        except BaseException:
            with contextlib.suppress(BaseException):
                await task
            raise
        return httpx.Response(
            start["status"],
            headers=[(k, v) for k, v in start.get("headers", [])],
            stream=_Body(chunks, task, disconnected),
            request=request,
        )


class _Body(httpx.AsyncByteStream):
    def __init__(
        self, chunks: asyncio.Queue[bytes | None], task: asyncio.Task[None], gone: asyncio.Event
    ) -> None:
        self._chunks = chunks
        self._task = task
        self._gone = gone

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while (chunk := await self._chunks.get()) is not None:
            yield chunk

    async def aclose(self) -> None:
        self._gone.set()  # the app sees http.disconnect
        await asyncio.sleep(0)  # and may end on its own
        if not self._task.done():
            self._task.cancel()
        with contextlib.suppress(BaseException):
            await self._task
