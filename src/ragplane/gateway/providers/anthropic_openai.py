"""Anthropic Messages API → an OpenAI-compatible upstream (also how the in-process
local providers serve ``/v1/messages``).

Request mapping::

    system (string or text blocks)  → a leading system message
    text / image blocks             → text / image_url parts (base64 → data: URL)
    assistant tool_use blocks       → tool_calls (input serialised as JSON)
    user tool_result blocks         → tool messages, placed before the user's other content
    max_tokens, stop_sequences → stop, temperature, top_p, metadata.user_id → user
    tools → function tools; tool_choice auto/any/tool/none → auto/required/named/none;
    disable_parallel_tool_use → parallel_tool_calls=false
    streams request stream_options.include_usage (the ledger and message_delta need it)

``cache_control``, ``thinking`` and ``top_k`` have no OpenAI counterpart and are dropped;
documents, server tools and images inside tool results are refused with a 400.

The stream is the full Anthropic event sequence: ``message_start``, for each block
``content_block_start`` / ``content_block_delta``... / ``content_block_stop``, then
``message_delta`` (stop reason and usage, sent once the upstream's usage chunk and
``[DONE]`` arrived) and ``message_stop``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from ragplane.errors import BadRequest, UpstreamProtocolError
from ragplane.gateway.apierrors import stream_upstream_error
from ragplane.gateway.providers._anthropic_stream import AnthropicEventWriter
from ragplane.gateway.providers._common import (
    StreamState,
    dumps,
    loads_object,
    openai_headers,
    openai_url,
    usage_from_openai,
)
from ragplane.gateway.types import Api, Route, SseEvent, UpstreamRequest, Usage

__all__ = ["STOP_REASONS", "AnthropicToOpenAI", "AnthropicToOpenAIStream", "to_chat_body"]

STOP_REASONS = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "refusal",
}


def _text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for block in content:
            if not isinstance(block, dict) or block.get("type") != "text":
                raise BadRequest(f"{where}: only text blocks are supported here")
            parts.append(str(block.get("text", "")))
        return "\n".join(parts)
    if content is None:
        return ""
    raise BadRequest(f"{where}: content must be a string or a list of blocks")


def _image_part(block: Mapping[str, Any], where: str) -> dict[str, Any]:
    source = block.get("source") or {}
    if source.get("type") == "base64":
        url = f"data:{source.get('media_type')};base64,{source.get('data')}"
    elif source.get("type") == "url":
        url = str(source.get("url"))
    else:
        raise BadRequest(f"{where}: image sources must be base64 or url")
    return {"type": "image_url", "image_url": {"url": url}}


def _user(content: Any, where: str) -> list[dict[str, Any]]:
    """A user turn → tool messages first, then one user message with the rest."""
    if isinstance(content, str):
        return [{"role": "user", "content": content}]
    if not isinstance(content, list):
        raise BadRequest(f"{where}: content must be a string or a list of blocks")
    tools: list[dict[str, Any]] = []
    parts: list[dict[str, Any]] = []
    for j, block in enumerate(content):
        kind = block.get("type") if isinstance(block, dict) else None
        at = f"{where}.content[{j}]"
        if kind == "text":
            parts.append({"type": "text", "text": str(block.get("text", ""))})
        elif kind == "image":
            parts.append(_image_part(block, at))
        elif kind == "tool_result":
            text = _text(block.get("content"), at)
            if block.get("is_error"):
                text = "Error: " + text
            tools.append(
                {"role": "tool", "tool_call_id": block.get("tool_use_id"), "content": text}
            )
        else:
            raise BadRequest(f"{at}: blocks of type {kind!r} are not supported by this model")
    if parts:
        only_text = all(p["type"] == "text" for p in parts)
        user = "\n".join(p["text"] for p in parts) if only_text else parts
        tools.append({"role": "user", "content": user})
    return tools


def _assistant(content: Any, where: str) -> dict[str, Any]:
    if isinstance(content, str):
        return {"role": "assistant", "content": content}
    if not isinstance(content, list):
        raise BadRequest(f"{where}: content must be a string or a list of blocks")
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for j, block in enumerate(content):
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            texts.append(str(block.get("text", "")))
        elif kind == "tool_use":
            arguments = dumps(block.get("input") or {}).decode()
            calls.append(
                {
                    "id": block.get("id"),
                    "type": "function",
                    "function": {"name": block.get("name"), "arguments": arguments},
                }
            )
        elif kind not in ("thinking", "redacted_thinking"):
            raise BadRequest(f"{where}.content[{j}]: blocks of type {kind!r} are not supported")
    message: dict[str, Any] = {"role": "assistant", "content": "".join(texts) if texts else None}
    if calls:
        message["tool_calls"] = calls
    return message


def _tools(tools: Any) -> list[dict[str, Any]]:
    out = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or "input_schema" not in tool:
            raise BadRequest(f"tools[{i}]: only custom tools with an input_schema are supported")
        function: dict[str, Any] = {"name": tool.get("name"), "parameters": tool["input_schema"]}
        if tool.get("description"):
            function["description"] = tool["description"]
        out.append({"type": "function", "function": function})
    return out


def to_chat_body(body: Mapping[str, Any], route: Route) -> dict[str, Any]:
    """The OpenAI chat completion request for an Anthropic Messages request."""
    messages: list[dict[str, Any]] = []
    if body.get("system"):
        messages.append({"role": "system", "content": _text(body["system"], "system")})
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise BadRequest("messages: a non-empty list is required")
    for i, message in enumerate(raw):
        role = message.get("role") if isinstance(message, dict) else None
        if role == "user":
            messages.extend(_user(message.get("content"), f"messages[{i}]"))
        elif role == "assistant":
            messages.append(_assistant(message.get("content"), f"messages[{i}]"))
        else:
            raise BadRequest(f"messages[{i}]: role {role!r} is not supported")
    out: dict[str, Any] = {
        "model": route.model.upstream,
        "messages": messages,
        "max_tokens": body.get("max_tokens") or route.model.max_output_tokens,
    }
    for key in ("temperature", "top_p"):
        if body.get(key) is not None:
            out[key] = body[key]
    if body.get("stop_sequences"):
        out["stop"] = list(body["stop_sequences"])
    if body.get("tools"):
        out["tools"] = _tools(body["tools"])
    choice = body.get("tool_choice")
    if isinstance(choice, dict):
        kind = choice.get("type")
        if kind == "tool":
            out["tool_choice"] = {"type": "function", "function": {"name": choice.get("name")}}
        elif kind in ("auto", "none", "any"):
            out["tool_choice"] = "required" if kind == "any" else kind
        if choice.get("disable_parallel_tool_use") and body.get("tools"):
            out["parallel_tool_calls"] = False
    metadata = body.get("metadata")
    if isinstance(metadata, dict) and isinstance(metadata.get("user_id"), str):
        out["user"] = metadata["user_id"]
    if body.get("stream") is True:
        out["stream"] = True
        out["stream_options"] = {"include_usage": True}
    return out


def to_anthropic_usage(usage: Usage) -> dict[str, Any]:
    return {
        "input_tokens": usage.input_tokens,
        "output_tokens": usage.output_tokens,
        "cache_creation_input_tokens": usage.cache_write_tokens,
        "cache_read_input_tokens": usage.cache_read_tokens,
    }


def _tool_input(arguments: Any, route: Route) -> dict[str, Any]:
    if not arguments:
        return {}
    try:
        value = orjson.loads(arguments)
    except orjson.JSONDecodeError as exc:
        raise UpstreamProtocolError(
            f"{route.provider_name} returned tool call arguments that are not JSON",
            provider=route.provider_name,
            route=route.name,
        ) from exc
    return value if isinstance(value, dict) else {"value": value}


class AnthropicToOpenAI:
    """Stateless; one instance serves every route."""

    api: Api = "anthropic"
    upstream_api: Api = "openai"
    passes_through: bool = False

    def build_request(
        self, body: dict[str, Any], route: Route, *, headers: Mapping[str, str] | None = None
    ) -> UpstreamRequest:
        return UpstreamRequest(
            method="POST",
            url=openai_url(route, "/chat/completions"),
            headers=openai_headers(route),
            body=dumps(to_chat_body(body, route)),
            stream=body.get("stream") is True,
        )

    def parse_response(self, body: bytes, route: Route) -> tuple[dict[str, Any], Usage]:
        completion = loads_object(body, route, "a chat completion")
        choices = completion.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            if "error" in completion:
                raise stream_upstream_error(
                    "openai", completion, provider=route.provider_name, route=route.name
                )
            raise UpstreamProtocolError(
                f"{route.provider_name} sent a chat completion without choices",
                provider=route.provider_name,
                route=route.name,
            )
        raw_usage = completion.get("usage")
        usage = usage_from_openai(raw_usage) if isinstance(raw_usage, dict) else Usage()
        reply = choices[0].get("message") or {}
        content: list[dict[str, Any]] = []
        text = reply.get("content") or reply.get("refusal")
        if text:
            content.append({"type": "text", "text": text})
        for call in reply.get("tool_calls") or ():
            function = call.get("function") or {}
            content.append(
                {
                    "type": "tool_use",
                    "id": call.get("id"),
                    "name": function.get("name"),
                    "input": _tool_input(function.get("arguments"), route),
                }
            )
        message = {
            "id": completion.get("id") or "msg_gateway",
            "type": "message",
            "role": "assistant",
            "model": completion.get("model") or route.model.upstream,
            "content": content,
            "stop_reason": STOP_REASONS.get(str(choices[0].get("finish_reason")), "end_turn"),
            "stop_sequence": None,
            "usage": to_anthropic_usage(usage),
        }
        return message, usage

    def stream_translator(
        self, route: Route, *, include_usage: bool = True
    ) -> AnthropicToOpenAIStream:
        return AnthropicToOpenAIStream(route)


class AnthropicToOpenAIStream(StreamState):
    """OpenAI chunks → the Anthropic event sequence (usage is always part of it)."""

    def __init__(self, route: Route) -> None:
        super().__init__()
        self._route = route
        self._out = AnthropicEventWriter(route.model.upstream)
        self._stop = "end_turn"
        self._tool_blocks: dict[int, int] = {}  # OpenAI tool call index → block index

    def feed(self, event: SseEvent) -> list[bytes]:
        out = self._out
        frames: list[bytes] = []
        if event.data == "[DONE]":
            self._finished = True
            frames += out.start(None, None)
            frames += out.close_block()
            frames.append(out.message_delta(self._stop, to_anthropic_usage(self._usage or Usage())))
            frames.append(out.message_stop())
            return frames
        chunk = loads_object(event.data, self._route, "a stream chunk")
        if "error" in chunk or chunk.get("object") == "error":
            raise stream_upstream_error(
                "openai", chunk, provider=self._route.provider_name, route=self._route.name
            )
        frames += out.start(chunk.get("id"), chunk.get("model"))
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            self._usage = usage_from_openai(usage)
        for choice in chunk.get("choices") or ():
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") or {}
            text = delta.get("content") or delta.get("refusal")
            if text:
                frames += out.text(text)
            for call in delta.get("tool_calls") or ():
                index = call.get("index", 0)
                function = call.get("function") or {}
                block = self._tool_blocks.get(index)
                if block is None:
                    frames += out.open_tool(call.get("id"), function.get("name"))
                    block = self._tool_blocks[index] = out.current_index
                if function.get("arguments"):
                    frames.append(out.tool_arguments(block, function["arguments"]))
            reason = choice.get("finish_reason")
            if reason:
                self._stop = STOP_REASONS.get(reason, "end_turn")
        return frames

    def error_frames(self, code: str, message: str, request_id: str) -> list[bytes]:
        return self._out.error_frames(code, message, request_id)
