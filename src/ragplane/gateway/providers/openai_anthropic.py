"""OpenAI Chat Completions API → an Anthropic upstream (Messages API).

Request mapping::

    system/developer messages     → system (joined by blank lines)
    user text / image_url parts   → text / image blocks (data: URLs → base64, http(s) → url)
    assistant tool_calls          → tool_use blocks (arguments parsed as JSON)
    tool messages                 → tool_result blocks in the next user turn
    max_completion_tokens | max_tokens | model.max_output_tokens → max_tokens
    stop → stop_sequences; temperature (clamped to 1); top_p; user → metadata.user_id
    tools (function) → {name, description, input_schema}; tool_choice auto/none/required/
    named → auto/none/any/tool; parallel_tool_calls=false → disable_parallel_tool_use
    response_format json_object/json_schema → an instruction appended to the system prompt

``n`` > 1, audio and file parts are refused with a 400 naming the field. Response and
stream: ``end_turn``/``stop_sequence`` → ``stop``, ``max_tokens`` → ``length``,
``tool_use`` → ``tool_calls``, ``refusal`` → ``content_filter``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import orjson

from ragplane.errors import BadRequest
from ragplane.gateway.apierrors import stream_upstream_error
from ragplane.gateway.providers._common import (
    StreamState,
    anthropic_headers,
    anthropic_url,
    dumps,
    loads_object,
    usage_from_anthropic,
)
from ragplane.gateway.providers._openai_stream import OpenAIChunkWriter
from ragplane.gateway.types import Api, Route, SseEvent, UpstreamRequest, Usage

__all__ = ["FINISH_REASONS", "OpenAIToAnthropic", "OpenAIToAnthropicStream", "to_messages_body"]

FINISH_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}
_JSON_OBJECT = "Respond with one valid JSON object and nothing else: no prose, no code fence."


def _text(content: Any, where: str) -> str:
    """A string, or the text of a list of text parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text":
                raise BadRequest(f"{where}: only text parts are supported here")
            parts.append(str(part.get("text", "")))
        return "\n".join(parts)
    raise BadRequest(f"{where}: content must be a string or a list of parts")


def _image(part: Mapping[str, Any], where: str) -> dict[str, Any]:
    image = part.get("image_url")
    url = image.get("url") if isinstance(image, dict) else image
    if not isinstance(url, str):
        raise BadRequest(f"{where}: image_url.url is missing")
    if url.startswith("data:"):
        header, sep, data = url[5:].partition(",")
        media_type, _, encoding = header.partition(";")
        if not sep or encoding != "base64":
            raise BadRequest(f"{where}: an image data URL must be base64-encoded")
        return {
            "type": "image",
            "source": {"type": "base64", "media_type": media_type, "data": data},
        }
    if url.startswith(("https://", "http://")):
        return {"type": "image", "source": {"type": "url", "url": url}}
    raise BadRequest(f"{where}: image URLs must be data: or http(s): URLs")


def _user_blocks(content: Any, where: str) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise BadRequest(f"{where}: content must be a string or a list of parts")
    blocks = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            blocks.append({"type": "text", "text": str(part.get("text", ""))})
        elif kind == "image_url":
            blocks.append(_image(part, f"{where}[{j}]"))
        else:
            raise BadRequest(f"{where}[{j}]: content parts of type {kind!r} are not supported")
    return blocks


def _tool_use(call: Any, where: str) -> dict[str, Any]:
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or call.get("type", "function") != "function":
        raise BadRequest(f"{where}: only function tool calls are supported")
    arguments = function.get("arguments") or "{}"
    try:
        parsed = orjson.loads(arguments)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"{where}: function.arguments is not valid JSON") from exc
    if not isinstance(parsed, dict):
        raise BadRequest(f"{where}: function.arguments must be a JSON object")
    return {"type": "tool_use", "id": call.get("id"), "name": function.get("name"), "input": parsed}


def _convert_messages(messages: Any) -> tuple[list[str], list[dict[str, Any]]]:
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages: a non-empty list is required")
    system: list[str] = []
    out: list[dict[str, Any]] = []

    def add(role: str, blocks: list[dict[str, Any]]) -> None:
        if out and out[-1]["role"] == role:
            out[-1]["content"].extend(blocks)
        else:
            out.append({"role": role, "content": blocks})

    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        role = message.get("role") if isinstance(message, dict) else None
        if role in ("system", "developer"):
            system.append(_text(message.get("content"), where))
        elif role == "user":
            add("user", _user_blocks(message.get("content"), where))
        elif role == "assistant":
            blocks: list[dict[str, Any]] = []
            text = _text(message.get("content"), where)
            if text:
                blocks.append({"type": "text", "text": text})
            for j, call in enumerate(message.get("tool_calls") or ()):
                blocks.append(_tool_use(call, f"{where}.tool_calls[{j}]"))
            if blocks:
                add("assistant", blocks)
        elif role == "tool":
            result = {
                "type": "tool_result",
                "tool_use_id": message.get("tool_call_id"),
                "content": _text(message.get("content"), where),
            }
            add("user", [result])
        else:
            raise BadRequest(f"{where}: role {role!r} is not supported")
    return system, out


def _tools(tools: Any) -> list[dict[str, Any]]:
    out = []
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if tool.get("type") != "function" or not isinstance(function, dict):
            raise BadRequest(f"tools[{i}]: only function tools are supported")
        spec: dict[str, Any] = {
            "name": function.get("name"),
            "input_schema": function.get("parameters") or {"type": "object", "properties": {}},
        }
        if function.get("description"):
            spec["description"] = function["description"]
        out.append(spec)
    return out


def _tool_choice(choice: Any, parallel: Any) -> dict[str, Any] | None:
    if choice is None:
        result: dict[str, Any] | None = None
    elif choice == "auto":
        result = {"type": "auto"}
    elif choice == "none":
        result = {"type": "none"}
    elif choice == "required":
        result = {"type": "any"}
    elif isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        result = {"type": "tool", "name": choice["function"].get("name")}
    else:
        raise BadRequest("tool_choice: expected auto, none, required or a named function")
    if parallel is False:
        result = {**(result or {"type": "auto"}), "disable_parallel_tool_use": True}
    return result


def _format_instruction(response_format: Any) -> str | None:
    if not isinstance(response_format, dict):
        return None
    kind = response_format.get("type")
    if kind == "json_object":
        return _JSON_OBJECT
    if kind == "json_schema":
        schema = response_format.get("json_schema") or {}
        return (
            _JSON_OBJECT
            + " It must validate against this JSON schema: "
            + dumps(schema.get("schema", {})).decode()
        )
    return None


def to_messages_body(body: Mapping[str, Any], route: Route) -> dict[str, Any]:
    """The Anthropic Messages request for an OpenAI chat completion request."""
    if (body.get("n") or 1) != 1:
        raise BadRequest("n: only one choice per request is supported by this model")
    system, messages = _convert_messages(body.get("messages"))
    instruction = _format_instruction(body.get("response_format"))
    if instruction:
        system.append(instruction)
    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
    out: dict[str, Any] = {
        "model": route.model.upstream,
        "max_tokens": max_tokens or route.model.max_output_tokens,
        "messages": messages,
    }
    if system:
        out["system"] = "\n\n".join(system)
    stop = body.get("stop")
    if stop:
        out["stop_sequences"] = [stop] if isinstance(stop, str) else list(stop)
    temperature = body.get("temperature")
    if temperature is not None:
        if not isinstance(temperature, int | float) or isinstance(temperature, bool):
            raise BadRequest("temperature: a number is required")
        out["temperature"] = min(float(temperature), 1.0)
    if body.get("top_p") is not None:
        out["top_p"] = body["top_p"]
    if body.get("tools"):
        out["tools"] = _tools(body["tools"])
    choice = _tool_choice(body.get("tool_choice"), body.get("parallel_tool_calls"))
    if choice is not None:
        out["tool_choice"] = choice
    if isinstance(body.get("user"), str):
        out["metadata"] = {"user_id": body["user"]}
    if body.get("stream") is True:
        out["stream"] = True
    return out


def to_openai_usage(usage: Usage) -> dict[str, Any]:
    prompt = usage.input_tokens + usage.cache_read_tokens + usage.cache_write_tokens
    return {
        "prompt_tokens": prompt,
        "completion_tokens": usage.output_tokens,
        "total_tokens": prompt + usage.output_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cache_read_tokens},
        "completion_tokens_details": {"reasoning_tokens": usage.reasoning_tokens},
    }


class OpenAIToAnthropic:
    """Stateless; one instance serves every route."""

    api: Api = "openai"
    upstream_api: Api = "anthropic"
    passes_through: bool = False

    def build_request(
        self, body: dict[str, Any], route: Route, *, headers: Mapping[str, str] | None = None
    ) -> UpstreamRequest:
        return UpstreamRequest(
            method="POST",
            url=anthropic_url(route),
            headers=anthropic_headers(route),
            body=dumps(to_messages_body(body, route)),
            stream=body.get("stream") is True,
        )

    def parse_response(self, body: bytes, route: Route) -> tuple[dict[str, Any], Usage]:
        message = loads_object(body, route, "a message")
        if message.get("type") == "error":
            raise stream_upstream_error(
                "anthropic", message, provider=route.provider_name, route=route.name
            )
        raw_usage = message.get("usage")
        usage = usage_from_anthropic(raw_usage) if isinstance(raw_usage, dict) else Usage()
        texts: list[str] = []
        calls: list[dict[str, Any]] = []
        for block in message.get("content") or ():
            kind = block.get("type") if isinstance(block, dict) else None
            if kind == "text":
                texts.append(block.get("text", ""))
            elif kind == "tool_use":
                calls.append(
                    {
                        "id": block.get("id"),
                        "type": "function",
                        "function": {
                            "name": block.get("name"),
                            "arguments": dumps(block.get("input") or {}).decode(),
                        },
                    }
                )
        reply: dict[str, Any] = {
            "role": "assistant",
            "content": "".join(texts) if texts or not calls else None,
            "refusal": None,
        }
        if calls:
            reply["tool_calls"] = calls
        completion = {
            "id": message.get("id") or "chatcmpl-anthropic",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": message.get("model") or route.model.upstream,
            "choices": [
                {
                    "index": 0,
                    "message": reply,
                    "finish_reason": FINISH_REASONS.get(str(message.get("stop_reason")), "stop"),
                    "logprobs": None,
                }
            ],
            "usage": to_openai_usage(usage),
        }
        return completion, usage

    def stream_translator(self, route: Route, *, include_usage: bool) -> OpenAIToAnthropicStream:
        return OpenAIToAnthropicStream(route, include_usage=include_usage)


class OpenAIToAnthropicStream(StreamState):
    """Anthropic stream events → OpenAI ``chat.completion.chunk`` frames."""

    def __init__(self, route: Route, *, include_usage: bool) -> None:
        super().__init__()
        self._route = route
        self._include_usage = include_usage
        self._out = OpenAIChunkWriter(route.model.upstream)
        self._tool_index: dict[int, int] = {}  # Anthropic block index → OpenAI tool index
        self._finish: str | None = None

    def feed(self, event: SseEvent) -> list[bytes]:
        name = event.event
        if name in ("ping", "content_block_stop"):
            return []
        data = loads_object(event.data, self._route, "a stream event")
        name = name or str(data.get("type"))
        out = self._out
        if name == "content_block_delta":
            delta = data.get("delta") or {}
            kind = delta.get("type")
            if kind == "text_delta":
                return [out.chunk({"content": delta.get("text", "")})]
            if kind == "input_json_delta":
                index = self._tool_index.get(data.get("index", -1))
                if index is None:
                    return []
                call = {"index": index, "function": {"arguments": delta.get("partial_json", "")}}
                return [out.chunk({"tool_calls": [call]})]
            return []  # thinking and signature deltas have no OpenAI counterpart
        if name == "content_block_start":
            block = data.get("content_block") or {}
            if block.get("type") == "tool_use":
                index = len(self._tool_index)
                self._tool_index[data.get("index", index)] = index
                call = {
                    "index": index,
                    "id": block.get("id"),
                    "type": "function",
                    "function": {"name": block.get("name"), "arguments": ""},
                }
                return [out.chunk({"tool_calls": [call]})]
            if block.get("type") == "text" and block.get("text"):
                return [out.chunk({"content": block["text"]})]
            return []
        if name == "message_start":
            message = data.get("message") or {}
            out.start(message.get("id"), message.get("model"))
            if isinstance(message.get("usage"), dict):
                self._usage = usage_from_anthropic(message["usage"])
            return [out.chunk({"role": "assistant", "content": ""})]
        if name == "message_delta":
            if isinstance(data.get("usage"), dict):
                self._usage = usage_from_anthropic(data["usage"], self._usage)
            reason = (data.get("delta") or {}).get("stop_reason")
            self._finish = FINISH_REASONS.get(str(reason), "stop")
            return [out.chunk({}, finish_reason=self._finish)]
        if name == "message_stop":
            self._finished = True
            frames = []
            if self._include_usage:
                frames.append(out.usage_chunk(to_openai_usage(self._usage or Usage())))
            frames.append(out.done())
            return frames
        if name == "error":
            raise stream_upstream_error(
                "anthropic", data, provider=self._route.provider_name, route=self._route.name
            )
        return []

    def error_frames(self, code: str, message: str, request_id: str) -> list[bytes]:
        return self._out.error_frames(code, message, request_id)
