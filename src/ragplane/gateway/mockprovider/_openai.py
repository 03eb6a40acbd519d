"""The OpenAI wire protocol: chat completions (plain, streamed, tools, JSON mode),
embeddings and the model list, with OpenAI's error shape and usage details."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from ragplane.gateway.mockprovider._text import (
    answer_pieces,
    embedding,
    embedding_base64,
    grounded_pieces,
    json_pieces,
    sample_for_schema,
    text_tokens,
    wants_tool,
)
from ragplane.gateway.mockprovider._wire import Call, send_events, send_json, sse

__all__ = ["chat_completions", "check_auth", "embeddings", "error", "models"]

_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 403: "permission_error"}
_TYPES |= {404: "invalid_request_error", 429: "requests", 529: "overloaded_error"}
_CODES = {401: "invalid_api_key", 404: "model_not_found", 429: "rate_limit_exceeded"}
_MESSAGES = {
    429: "Rate limit reached for requests (mock).",
    500: "The server had an error while processing your request (mock).",
    503: "The server is overloaded or not ready yet (mock).",
    529: "The server is overloaded (mock).",
}
_BAD_LINE = b'data: {"id": "chatcmpl-mock", "choices": [{"delta": \n\n'
_DONE = b"data: [DONE]\n\n"


def error(
    status: int, message: str | None = None, *, headers: Mapping[str, str] | None = None
) -> web.Response:
    """A response in OpenAI's error shape ``{"error": {message, type, param, code}}``."""
    body = {
        "error": {
            "message": message or _MESSAGES.get(status, f"mock error {status}"),
            "type": _TYPES.get(status, "server_error" if status >= 500 else "invalid_request"),
            "param": None,
            "code": _CODES.get(status),
        }
    }
    return web.Response(
        body=orjson.dumps(body),
        status=status,
        reason="Overloaded" if status == 529 else None,
        content_type="application/json",
        headers=headers,
    )


def check_auth(request: web.Request, key: str) -> web.Response | None:
    if request.headers.get("Authorization") == f"Bearer {key}":
        return None
    return error(401, "Incorrect API key provided (mock).")


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


def _tool_to_call(call: Call, tools: list[Any], messages: list[Any]) -> dict[str, Any] | None:
    """The function tool this request calls, or None for a text answer."""
    by_name = {
        t["function"]["name"]: t["function"]
        for t in tools
        if isinstance(t, dict) and isinstance(t.get("function"), dict) and "name" in t["function"]
    }
    forced = call.request.headers.get("x-mock-tool-call")
    choice = call.body.get("tool_choice")
    if forced is None and isinstance(choice, dict):
        forced = (choice.get("function") or {}).get("name")
    elif forced is None and choice == "required" and by_name:
        forced = next(iter(by_name))
    elif forced is None and choice != "none" and messages[-1].get("role") == "user":
        forced = wants_tool(by_name, _text(messages[-1].get("content")))
    if forced is None:
        return None
    tool: dict[str, Any] = by_name.get(forced, {"name": forced})
    return tool


def _usage(call: Call, prompt: int, completion: int) -> dict[str, Any]:
    cfg = call.state.config
    cached = min(call.header_int("x-mock-cached-tokens", cfg.cached_tokens), prompt)
    reasoning = call.header_int("x-mock-reasoning-tokens", cfg.reasoning_tokens)
    completion += reasoning
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": reasoning,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


@dataclass(frozen=True, slots=True)
class _Answer:
    id: str
    created: int
    model: str
    pieces: list[str]  # content, or the tool call's arguments
    tool_call: dict[str, Any] | None
    finish: str
    usage: dict[str, Any]


async def chat_completions(call: Call) -> web.StreamResponse:
    body = call.body
    model, messages = body.get("model"), body.get("messages")
    if not isinstance(model, str) or not isinstance(messages, list) or not messages:
        return error(400, "'model' and a non-empty 'messages' list are required.")
    if not all(isinstance(m, dict) for m in messages):
        return error(400, "Each message must be an object.")
    tools = body.get("tools") or []
    prompt = sum(
        4 + text_tokens(m["content"])
        if isinstance(m.get("content"), str)
        else (len(orjson.dumps(m)) + 3) // 4
        for m in messages
    )
    if tools:
        prompt += (len(orjson.dumps(tools)) + 3) // 4
    last_user = next(
        (_text(m.get("content")) for m in reversed(messages) if m.get("role") == "user"), ""
    )
    cap = body.get("max_completion_tokens") or body.get("max_tokens")
    wanted = call.header_int("x-mock-output-tokens", call.state.config.output_tokens)
    n = max(1, min(wanted, cap)) if isinstance(cap, int) else wanted
    finish = "length" if n < wanted else "stop"

    forced = "x-mock-tool-call" in call.request.headers
    tool = _tool_to_call(call, tools, messages) if tools or forced else None
    tool_call: dict[str, Any] | None = None
    if tool is not None:
        args = sample_for_schema(tool.get("parameters", {"type": "object"}), last_user.split())
        pieces = json_pieces(args)
        finish = "tool_calls"
        tool_call = {
            "id": f"call_mock{call.number}",
            "type": "function",
            "function": {"name": tool["name"], "arguments": "".join(pieces)},
        }
    else:
        pieces = _content_pieces(
            body.get("response_format"), last_user, n, grounded=call.state.config.grounded
        )
    answer = _Answer(
        id=f"chatcmpl-mock{call.number}",
        created=int(time.time()),
        model=model,
        pieces=pieces,
        tool_call=tool_call,
        finish=finish,
        usage=_usage(call, prompt, len(pieces)),
    )
    return await (_stream(call, answer) if body.get("stream") else _reply(call, answer))


async def _reply(call: Call, a: _Answer) -> web.StreamResponse:
    message: dict[str, Any] = {
        "role": "assistant",
        "content": None if a.tool_call else "".join(a.pieces),
        "refusal": None,
        "annotations": [],
    }
    if a.tool_call:
        message["tool_calls"] = [a.tool_call]
    response = {
        "id": a.id,
        "object": "chat.completion",
        "created": a.created,
        "model": a.model,
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": a.finish}],
        "usage": a.usage,
        "service_tier": "default",
        "system_fingerprint": "fp_mock",
    }
    headers = {"x-request-id": call.request_id}
    return await send_json(call, response, tokens=len(a.pieces), headers=headers)


async def _stream(call: Call, a: _Answer) -> web.StreamResponse:
    """Role chunk with the first token, one chunk per piece, the finish chunk, the usage
    chunk (``stream_options.include_usage``; every other chunk then has ``usage: null``),
    ``[DONE]``."""
    options = call.body.get("stream_options")
    include_usage = isinstance(options, dict) and bool(options.get("include_usage"))
    base: dict[str, Any] = {
        "id": a.id,
        "object": "chat.completion.chunk",
        "created": a.created,
        "model": a.model,
        "service_tier": "default",
        "system_fingerprint": "fp_mock",
    }
    if include_usage:
        base["usage"] = None

    def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return sse({**base, "choices": [choice]})

    if a.tool_call:
        call_head = {
            "index": 0,
            "id": a.tool_call["id"],
            "type": "function",
            "function": {"name": a.tool_call["function"]["name"], "arguments": ""},
        }
        lead = [chunk({"role": "assistant", "content": None, "tool_calls": [call_head]})]
        tokens = [
            chunk({"tool_calls": [{"index": 0, "function": {"arguments": p}}]}) for p in a.pieces
        ]
    else:
        lead = [chunk({"role": "assistant", "content": "", "refusal": None})]
        tokens = [chunk({"content": p}) for p in a.pieces]
    tail = [chunk({}, a.finish)]
    if include_usage:
        tail.append(sse({**base, "choices": [], "usage": a.usage}))
    tail.append(_DONE)
    return await send_events(
        call,
        lead,
        tokens,
        tail,
        lead_with_first_token=True,
        bad_line=_BAD_LINE,
        headers={"x-request-id": call.request_id},
    )


def _content_pieces(
    response_format: Any, prompt: str, n: int, *, grounded: bool = False
) -> list[str]:
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind == "json_schema":
        schema = (response_format.get("json_schema") or {}).get("schema")
        return json_pieces(sample_for_schema(schema or {"type": "object"}, prompt.split()))
    if kind == "json_object":  # '{"answer": "' + escaped words + '"}', valid when joined
        words = answer_pieces(prompt, max(1, n - 2))
        return ['{"answer": "', *(orjson.dumps(w).decode()[1:-1] for w in words), '"}']
    return grounded_pieces(prompt, n) if grounded else answer_pieces(prompt, n)


async def embeddings(call: Call) -> web.StreamResponse:
    body = call.body
    items = body.get("input")
    model = body.get("model")
    if isinstance(items, str) or (isinstance(items, list) and items and isinstance(items[0], int)):
        items = [items]
    if not isinstance(model, str) or not isinstance(items, list) or not items:
        return error(400, "'model' and a non-empty 'input' are required.")
    dims = body.get("dimensions") or call.state.config.embedding_dimensions
    if not isinstance(dims, int) or dims < 1:
        return error(400, "'dimensions' must be a positive integer.")
    as_base64 = body.get("encoding_format") == "base64"
    data = []
    tokens = 0
    for i, item in enumerate(items):
        if not isinstance(item, str | list):
            return error(400, f"input[{i}] must be a string or a list of token ids.")
        tokens += text_tokens(item) if isinstance(item, str) else len(item)
        vector = embedding(item, dims)
        data.append(
            {
                "object": "embedding",
                "index": i,
                "embedding": embedding_base64(vector) if as_base64 else vector,
            }
        )
    response = {
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }
    return await send_json(call, response, tokens=1, headers={"x-request-id": call.request_id})


async def models(call: Call) -> web.StreamResponse:
    data = [
        {"id": m, "object": "model", "created": 0, "owned_by": "ragplane-mock"}
        for m in call.state.config.models
    ]
    return await send_json(call, {"object": "list", "data": data}, tokens=0)
