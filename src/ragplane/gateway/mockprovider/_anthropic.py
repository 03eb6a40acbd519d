"""The Anthropic Messages protocol: ``/v1/messages`` (plain, streamed with the real event
sequence, tool use), prompt-cache accounting at ``cache_control`` breakpoints, and
Anthropic's error shape and types."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import orjson
from aiohttp import web

from ragplane.gateway.mockprovider._text import (
    answer_pieces,
    json_pieces,
    sample_for_schema,
    wants_tool,
)
from ragplane.gateway.mockprovider._wire import Call, send_events, send_json, sse

__all__ = ["check_auth", "error", "messages", "models"]

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    529: "overloaded_error",
}
_MESSAGES = {429: "Number of requests has exceeded your rate limit (mock).", 529: "Overloaded"}
_BAD_LINE = b'event: content_block_delta\ndata: {"type": "content_block_delta", "index": \n\n'


def error(
    status: int, message: str | None = None, *, headers: Mapping[str, str] | None = None
) -> web.Response:
    """A response in Anthropic's shape ``{"type": "error", "error": {type, message}}``."""
    kind = _TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    body = {
        "type": "error",
        "error": {"type": kind, "message": message or _MESSAGES.get(status, f"mock {kind}")},
    }
    return web.Response(
        body=orjson.dumps(body),
        status=status,
        reason="Overloaded" if status == 529 else None,
        content_type="application/json",
        headers=headers,
    )


def check_auth(request: web.Request, key: str) -> web.Response | None:
    headers = request.headers
    if headers.get("x-api-key") != key and headers.get("Authorization") != f"Bearer {key}":
        return error(401, "invalid x-api-key")
    if "anthropic-version" not in headers:
        return error(400, "anthropic-version: header is required")
    return None


class _Prompt:
    """Input tokens and prompt-cache breakpoints, in Anthropic's prefix order: tools,
    system, messages. A breakpoint hashes everything before it (markers left out)."""

    def __init__(self, model: str) -> None:
        self.tokens = 0
        self.breakpoints: list[tuple[bytes, int]] = []
        self._hash = hashlib.sha256(model.encode())

    def add(self, block: Any) -> None:
        marked = isinstance(block, dict) and "cache_control" in block
        if marked:
            block = {k: v for k, v in block.items() if k != "cache_control"}
        data = orjson.dumps(block)
        self._hash.update(data)
        self.tokens += (len(data) + 3) // 4
        if marked:
            self.mark()

    def add_role(self, role: Any) -> None:
        self._hash.update(b"\x00" + str(role).encode())
        self.tokens += 3

    def mark(self) -> None:
        self.breakpoints.append((self._hash.copy().digest(), self.tokens))


def _read_prompt(body: dict[str, Any], model: str, messages: list[Any]) -> _Prompt:
    prompt = _Prompt(model)
    for tool in body.get("tools") or []:
        prompt.add(tool)
    system = body.get("system")
    for block in [{"type": "text", "text": system}] if isinstance(system, str) else system or []:
        prompt.add(block)
    for m in messages:
        prompt.add_role(m.get("role"))
        content = m.get("content")
        for block in [{"type": "text", "text": content}] if isinstance(content, str) else content:
            prompt.add(block)
    if isinstance(body.get("cache_control"), dict):  # automatic caching: the whole prompt
        prompt.mark()
    return prompt


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    return " ".join(b.get("text", "") for b in content if b.get("type") == "text")


def _tool_to_use(call: Call, messages: list[Any], last_user: str) -> dict[str, Any] | None:
    tools = {
        t["name"]: t for t in call.body.get("tools") or [] if isinstance(t, dict) and "name" in t
    }
    choice = call.body.get("tool_choice")
    choice = choice if isinstance(choice, dict) else {}
    forced = call.request.headers.get("x-mock-tool-call")
    if forced is None and choice.get("type") == "tool":
        forced = choice.get("name")
    elif forced is None and choice.get("type") == "any" and tools:
        forced = next(iter(tools))
    elif forced is None and choice.get("type") != "none" and tools:
        content = messages[-1].get("content")
        asks = messages[-1].get("role") == "user" and not any(
            isinstance(b, dict) and b.get("type") == "tool_result"
            for b in (content if isinstance(content, list) else ())
        )
        forced = wants_tool(tools, last_user) if asks else None
    if forced is None:
        return None
    return tools.get(forced, {"name": forced})


async def messages(call: Call) -> web.StreamResponse:
    body = call.body
    model, msgs, cap = body.get("model"), body.get("messages"), body.get("max_tokens")
    if not isinstance(model, str) or not isinstance(cap, int) or cap < 1:
        return error(400, "'model' and 'max_tokens' (a positive integer) are required")
    if not isinstance(msgs, list) or not msgs:
        return error(400, "messages: at least one message is required")
    for m in msgs:
        if not isinstance(m, dict) or not isinstance(m.get("content"), str | list):
            return error(400, "messages: each message needs a role and content")
        if isinstance(m["content"], list) and not all(isinstance(b, dict) for b in m["content"]):
            return error(400, "messages: content blocks must be objects")
    prompt = _read_prompt(body, model, msgs)
    cache_read, cache_write = call.state.prompt_cache.account(prompt.breakpoints)
    last_user = next((_text(m["content"]) for m in reversed(msgs) if m.get("role") == "user"), "")
    wanted = call.header_int("x-mock-output-tokens", call.state.config.output_tokens)
    n = min(wanted, cap)
    stop_reason = "max_tokens" if n < wanted else "end_turn"
    tool = _tool_to_use(call, msgs, last_user)
    block: dict[str, Any]
    if tool is not None:
        args = sample_for_schema(tool.get("input_schema", {"type": "object"}), last_user.split())
        pieces = json_pieces(args)
        stop_reason = "tool_use"
        block = {"type": "tool_use", "id": f"toolu_mock{call.number}", "name": tool["name"]}
    else:
        pieces = answer_pieces(last_user, n)
        block = {"type": "text", "text": ""}
    usage: dict[str, Any] = {
        "input_tokens": prompt.tokens - cache_read - cache_write,
        "output_tokens": len(pieces),
        "cache_creation_input_tokens": cache_write,
        "cache_read_input_tokens": cache_read,
        "cache_creation": {
            "ephemeral_5m_input_tokens": cache_write,
            "ephemeral_1h_input_tokens": 0,
        },
        "service_tier": "standard",
    }
    message: dict[str, Any] = {
        "id": f"msg_mock{call.number}",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": usage,
    }
    headers = {"request-id": call.request_id}
    if not body.get("stream"):
        if tool is not None:
            block["input"] = args
        else:
            block["text"] = "".join(pieces)
        message |= {"content": [block], "stop_reason": stop_reason}
        return await send_json(call, message, tokens=len(pieces), headers=headers)

    if tool is not None:
        block["input"] = {}
        delta_type, field = "input_json_delta", "partial_json"
    else:
        delta_type, field = "text_delta", "text"
    lead = [
        sse(
            {
                "type": "message_start",
                "message": {**message, "usage": {**usage, "output_tokens": 1}},
            },
            b"message_start",
        ),
        sse(
            {"type": "content_block_start", "index": 0, "content_block": block},
            b"content_block_start",
        ),
        sse({"type": "ping"}, b"ping"),
    ]
    tokens = [
        sse(
            {"type": "content_block_delta", "index": 0, "delta": {"type": delta_type, field: p}},
            b"content_block_delta",
        )
        for p in pieces
    ]
    tail = [
        sse({"type": "content_block_stop", "index": 0}, b"content_block_stop"),
        sse(
            {
                "type": "message_delta",
                "delta": {"stop_reason": stop_reason, "stop_sequence": None},
                "usage": {"output_tokens": len(pieces)},
            },
            b"message_delta",
        ),
        sse({"type": "message_stop"}, b"message_stop"),
    ]
    return await send_events(
        call, lead, tokens, tail, lead_with_first_token=False, bad_line=_BAD_LINE, headers=headers
    )


async def models(call: Call) -> web.StreamResponse:
    data = [
        {"type": "model", "id": m, "display_name": m, "created_at": "2025-01-01T00:00:00Z"}
        for m in call.state.config.models
    ]
    page = {
        "data": data,
        "has_more": False,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
    }
    return await send_json(call, page, tokens=0)
