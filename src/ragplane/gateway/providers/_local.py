"""What the in-process providers share: reading an OpenAI chat request off an
``UpstreamRequest`` the way an HTTP server would (404 for another path, 400 for a body
that is not a chat request), SSE framing, and an answer that is already complete."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Any

import orjson

from ragplane.gateway.types import UpstreamRequest

__all__ = [
    "JSON_HEADERS",
    "SSE_DONE",
    "SSE_HEADERS",
    "MemoryResponse",
    "error_response",
    "message_text",
    "parse_chat_request",
    "sse_frame",
    "wants_usage",
]

JSON_HEADERS: Mapping[str, str] = {"content-type": "application/json"}
SSE_HEADERS: Mapping[str, str] = {"content-type": "text/event-stream", "cache-control": "no-cache"}
SSE_DONE = b"data: [DONE]\n\n"
CHAT_PATH = "/v1/chat/completions"


def sse_frame(payload: Mapping[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


class MemoryResponse:
    """A complete in-process answer, handed out as the chunks it was built from."""

    __slots__ = ("_chunks", "headers", "status")

    def __init__(self, status: int, headers: Mapping[str, str], chunks: list[bytes]) -> None:
        self.status = status
        self.headers = headers
        self._chunks = chunks

    async def read(self, *, idle_s: float | None = None) -> bytes:
        return b"".join(self._chunks)

    async def iter_chunks(self, *, idle_s: float | None = None) -> AsyncIterator[bytes]:
        for chunk in self._chunks:
            yield chunk

    async def aclose(self) -> None:
        return None


def error_response(
    status: int, message: str, kind: str = "invalid_request_error"
) -> MemoryResponse:
    """An OpenAI-shaped error body, as an OpenAI-compatible server would send it."""
    body = {"error": {"message": message, "type": kind, "param": None, "code": None}}
    return MemoryResponse(status, JSON_HEADERS, [orjson.dumps(body)])


def wants_usage(body: Mapping[str, Any]) -> bool:
    """Whether a streamed answer ends with a usage chunk (``stream_options.include_usage``)."""
    options = body.get("stream_options")
    return isinstance(options, dict) and bool(options.get("include_usage"))


def parse_chat_request(request: UpstreamRequest) -> dict[str, Any] | MemoryResponse:
    """The chat-completions body, or the error response a server would give instead."""
    path = request.url.partition(":")[2] if request.url.startswith("local:") else request.url
    if not path.endswith(CHAT_PATH) or request.method.upper() != "POST":
        return error_response(404, f"{request.method} {request.url} is not served here")
    try:
        body = orjson.loads(request.body)
    except orjson.JSONDecodeError as exc:
        return error_response(400, f"the body is not JSON: {exc}")
    if not isinstance(body, dict):
        return error_response(400, "the body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return error_response(400, "messages must be a non-empty array")
    if not all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages):
        return error_response(400, "each message must be an object with a role")
    for key in ("max_tokens", "max_completion_tokens"):
        value = body.get(key)
        if value is not None and (not isinstance(value, int) or value < 1):
            return error_response(400, f"{key} must be a positive integer")
    return body


def message_text(message: Mapping[str, Any]) -> str:
    """A message's text: a string content, or its text parts joined by newlines."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(
            part["text"]
            for part in content
            if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    return ""
