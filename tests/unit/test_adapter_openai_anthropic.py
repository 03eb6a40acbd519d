"""OpenAI API → Anthropic upstream: request, response and stream translation, checked
against the official SDKs' types and clients."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from ragplane.errors import BadRequest, UpstreamError, UpstreamProtocolError
from ragplane.gateway.providers import OpenAIToAnthropic, adapter_for
from ragplane.gateway.types import SseEvent, Usage
from tests.unit.adapter_support import (
    frames_to_events,
    make_route,
    openai_sdk,
    run_stream,
    sse_bytes,
)

ADAPTER = OpenAIToAnthropic()
ROUTE = make_route(
    "anthropic",
    base_url="https://api.anthropic.com",
    api_key="sk-ant-test",
    upstream="claude-sonnet-4-5-20250929",
    max_output_tokens=2048,
)
TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}


def translate(body: dict[str, Any]) -> dict[str, Any]:
    return orjson.loads(ADAPTER.build_request(body, ROUTE).body)  # type: ignore[no-any-return]


def test_it_is_the_adapter_for_openai_callers_on_anthropic_routes() -> None:
    assert adapter_for("openai", ROUTE) is not adapter_for("openai", make_route())
    assert type(adapter_for("openai", ROUTE)) is OpenAIToAnthropic


def test_url_and_headers() -> None:
    request = ADAPTER.build_request({"messages": [{"role": "user", "content": "hi"}]}, ROUTE)
    assert request.url == "https://api.anthropic.com/v1/messages"
    assert request.headers["x-api-key"] == "sk-ant-test"
    assert request.headers["anthropic-version"] == "2023-06-01"
    assert "authorization" not in request.headers
    with_v1 = make_route("anthropic", base_url="https://proxy.test/anthropic/v1/")
    assert ADAPTER.build_request({"messages": [{"role": "user", "content": "x"}]}, with_v1).url == (
        "https://proxy.test/anthropic/v1/messages"
    )


def test_a_conversation_with_tools_translates_block_by_block() -> None:
    body = {
        "model": "support-quality",
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "developer", "content": [{"type": "text", "text": "Use tools."}]},
            {"role": "user", "content": "Weather in Paris and Rome?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                    },
                    {
                        "id": "call_2",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city":"Rome"}'},
                    },
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
            {
                "role": "tool",
                "tool_call_id": "call_2",
                "content": [{"type": "text", "text": "24C"}],
            },
            {"role": "user", "content": "Which is warmer?"},
        ],
        "tools": [TOOL],
        "tool_choice": "required",
        "parallel_tool_calls": False,
        "stop": "END",
        "temperature": 1.6,
        "top_p": 0.9,
        "max_completion_tokens": 300,
        "user": "user-42",
        "seed": 7,
    }
    assert translate(body) == {
        "model": "claude-sonnet-4-5-20250929",
        "max_tokens": 300,
        "system": "You are terse.\n\nUse tools.",
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "Weather in Paris and Rome?"}]},
            {
                "role": "assistant",
                "content": [
                    {
                        "type": "tool_use",
                        "id": "call_1",
                        "name": "get_weather",
                        "input": {"city": "Paris"},
                    },
                    {
                        "type": "tool_use",
                        "id": "call_2",
                        "name": "get_weather",
                        "input": {"city": "Rome"},
                    },
                ],
            },
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": "call_1", "content": "18C"},
                    {"type": "tool_result", "tool_use_id": "call_2", "content": "24C"},
                    {"type": "text", "text": "Which is warmer?"},
                ],
            },
        ],
        "stop_sequences": ["END"],
        "temperature": 1.0,
        "top_p": 0.9,
        "tools": [
            {
                "name": "get_weather",
                "description": "Current weather",
                "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
            }
        ],
        "tool_choice": {"type": "any", "disable_parallel_tool_use": True},
        "metadata": {"user_id": "user-42"},
    }


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        ("auto", {"type": "auto"}),
        ("none", {"type": "none"}),
        (
            {"type": "function", "function": {"name": "get_weather"}},
            {"type": "tool", "name": "get_weather"},
        ),
    ],
)
def test_tool_choice(choice: Any, expected: dict[str, Any]) -> None:
    body = {"messages": [{"role": "user", "content": "x"}], "tools": [TOOL], "tool_choice": choice}
    assert translate(body)["tool_choice"] == expected


def test_defaults_images_json_mode_and_streaming() -> None:
    body = {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Describe both"},
                    {
                        "type": "image_url",
                        "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="},
                    },
                    {"type": "image_url", "image_url": {"url": "https://example.test/cat.jpg"}},
                ],
            }
        ],
        "response_format": {"type": "json_object"},
        "stop": ["a", "b"],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    sent = translate(body)
    assert sent["max_tokens"] == 2048  # the route model's max_output_tokens
    assert sent["messages"][0]["content"][1:] == [
        {
            "type": "image",
            "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="},
        },
        {"type": "image", "source": {"type": "url", "url": "https://example.test/cat.jpg"}},
    ]
    assert "valid JSON object" in sent["system"]
    assert sent["stop_sequences"] == ["a", "b"]
    assert sent["stream"] is True
    assert "stream_options" not in sent
    assert ADAPTER.build_request(body, ROUTE).stream


def test_json_schema_response_format_puts_the_schema_in_the_system_prompt() -> None:
    schema = {"type": "object", "properties": {"answer": {"type": "string"}}}
    body = {
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "x"}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": schema}},
    }
    system = translate(body)["system"]
    assert system.startswith("Be brief.\n\n")
    assert orjson.dumps(schema).decode() in system


@pytest.mark.parametrize(
    ("body", "names"),
    [
        ({"n": 2, "messages": [{"role": "user", "content": "x"}]}, "n"),
        ({"temperature": "hot", "messages": [{"role": "user", "content": "x"}]}, "temperature"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "function", "name": "f", "content": "x"}]}, "messages[0]"),
        (
            {
                "messages": [
                    {"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}
                ]
            },
            "input_audio",
        ),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": {"url": "ftp://x"}}],
                    }
                ]
            },
            "messages[0][0]",
        ),
        (
            {
                "messages": [
                    {
                        "role": "assistant",
                        "tool_calls": [
                            {
                                "id": "c",
                                "type": "function",
                                "function": {"name": "f", "arguments": "{oops"},
                            }
                        ],
                    }
                ]
            },
            "arguments",
        ),
        (
            {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "web_search"}]},
            "tools[0]",
        ),
    ],
)
def test_what_cannot_be_translated_is_a_clear_400(body: dict[str, Any], names: str) -> None:
    with pytest.raises(BadRequest, match=names.replace("[", r"\[").replace("]", r"\]")):
        ADAPTER.build_request(body, ROUTE)


MESSAGE = {
    "id": "msg_01XFDUDYJgAACzvnptvVoYEL",
    "type": "message",
    "role": "assistant",
    "model": "claude-sonnet-4-5-20250929",
    "content": [
        {"type": "thinking", "thinking": "The user wants weather.", "signature": "EqQB"},
        {"type": "text", "text": "Let me check."},
        {"type": "tool_use", "id": "toolu_01A", "name": "get_weather", "input": {"city": "Paris"}},
    ],
    "stop_reason": "tool_use",
    "stop_sequence": None,
    "usage": {
        "input_tokens": 20,
        "cache_creation_input_tokens": 100,
        "cache_read_input_tokens": 4096,
        "output_tokens": 150,
    },
}


def test_a_message_becomes_a_chat_completion() -> None:
    completion, usage = ADAPTER.parse_response(orjson.dumps(MESSAGE), ROUTE)
    assert usage == Usage(
        input_tokens=20, output_tokens=150, cache_read_tokens=4096, cache_write_tokens=100
    )
    parsed = ChatCompletion.model_validate(completion)
    choice = parsed.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Let me check."
    assert choice.message.tool_calls is not None
    call = choice.message.tool_calls[0]
    assert (call.id, call.function.name, orjson.loads(call.function.arguments)) == (
        "toolu_01A",
        "get_weather",
        {"city": "Paris"},
    )
    assert parsed.usage is not None
    assert (parsed.usage.prompt_tokens, parsed.usage.completion_tokens) == (4216, 150)
    assert parsed.usage.prompt_tokens_details is not None
    assert parsed.usage.prompt_tokens_details.cached_tokens == 4096


@pytest.mark.parametrize(
    ("stop", "finish"),
    [
        ("end_turn", "stop"),
        ("stop_sequence", "stop"),
        ("max_tokens", "length"),
        ("refusal", "content_filter"),
    ],
)
def test_finish_reasons(stop: str, finish: str) -> None:
    message = {**MESSAGE, "content": [{"type": "text", "text": "ok"}], "stop_reason": stop}
    completion, _ = ADAPTER.parse_response(orjson.dumps(message), ROUTE)
    assert completion["choices"][0]["finish_reason"] == finish
    assert "tool_calls" not in completion["choices"][0]["message"]


def test_the_sdk_reads_a_translated_completion() -> None:
    completion, _ = ADAPTER.parse_response(orjson.dumps(MESSAGE), ROUTE)
    client = openai_sdk(orjson.dumps(completion))
    result = client.chat.completions.create(model="a", messages=[])
    assert result.choices[0].message.tool_calls[0].function.name == "get_weather"


def test_garbage_is_a_protocol_error() -> None:
    with pytest.raises(UpstreamProtocolError):
        ADAPTER.parse_response(b"upstream exploded", ROUTE)


STREAM = sse_bytes(
    [
        (
            "message_start",
            {
                "type": "message_start",
                "message": {
                    "id": "msg_01Stream",
                    "type": "message",
                    "role": "assistant",
                    "content": [],
                    "model": "claude-sonnet-4-5-20250929",
                    "stop_reason": None,
                    "stop_sequence": None,
                    "usage": {
                        "input_tokens": 472,
                        "cache_creation_input_tokens": 0,
                        "cache_read_input_tokens": 2048,
                        "output_tokens": 2,
                    },
                },
            },
        ),
        (
            "content_block_start",
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "text", "text": ""},
            },
        ),
        ("ping", {"type": "ping"}),
        (
            "content_block_delta",
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "text_delta", "text": "Let me "},
            },
        ),
        (
            "content_block_delta",
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "text_delta", "text": "check."},
            },
        ),
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        (
            "content_block_start",
            {
                "type": "content_block_start",
                "index": 1,
                "content_block": {
                    "type": "tool_use",
                    "id": "toolu_01T1",
                    "name": "get_weather",
                    "input": {},
                },
            },
        ),
        (
            "content_block_delta",
            {
                "type": "content_block_delta",
                "index": 1,
                "delta": {"type": "input_json_delta", "partial_json": ""},
            },
        ),
        (
            "content_block_delta",
            {
                "type": "content_block_delta",
                "index": 1,
                "delta": {"type": "input_json_delta", "partial_json": '{"city": "Par'},
            },
        ),
        (
            "content_block_delta",
            {
                "type": "content_block_delta",
                "index": 1,
                "delta": {"type": "input_json_delta", "partial_json": 'is"}'},
            },
        ),
        ("content_block_stop", {"type": "content_block_stop", "index": 1}),
        (
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": "tool_use", "stop_sequence": None},
                "usage": {"output_tokens": 89},
            },
        ),
        ("message_stop", {"type": "message_stop"}),
    ]
)
STREAM_USAGE = Usage(input_tokens=472, output_tokens=89, cache_read_tokens=2048)


def test_stream_becomes_openai_chunks_role_first_then_content_tools_finish_usage() -> None:
    translator = ADAPTER.stream_translator(ROUTE, include_usage=True)
    out = run_stream(translator, STREAM)
    events = frames_to_events(out)
    assert events[-1].data == "[DONE]"
    chunks = [ChatCompletionChunk.model_validate_json(e.data) for e in events[:-1]]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert {c.id for c in chunks} == {"msg_01Stream"}
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Let me check."
    calls = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or ()]
    assert calls[0].id == "toolu_01T1"
    assert calls[0].function is not None
    assert calls[0].function.name == "get_weather"
    assert (
        "".join(tc.function.arguments or "" for tc in calls if tc.function) == '{"city": "Paris"}'
    )
    assert {tc.index for tc in calls} == {0}
    finishes = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finishes == ["tool_calls"]
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (2520, 89)
    assert translator.usage == STREAM_USAGE
    assert translator.finished


def test_stream_without_caller_usage_has_no_usage_chunk() -> None:
    translator = ADAPTER.stream_translator(ROUTE, include_usage=False)
    events = frames_to_events(run_stream(translator, STREAM, split=1))
    chunks = [ChatCompletionChunk.model_validate_json(e.data) for e in events[:-1]]
    assert all(c.usage is None and c.choices for c in chunks)
    assert translator.usage == STREAM_USAGE  # the ledger still gets it


def test_the_sdk_accumulates_the_translated_stream() -> None:
    out = run_stream(ADAPTER.stream_translator(ROUTE, include_usage=True), STREAM)
    client = openai_sdk(out, stream=True)
    with client.chat.completions.stream(model="a", messages=[]) as stream:
        final = stream.get_final_completion()
    message = final.choices[0].message
    assert message.content == "Let me check."
    assert message.tool_calls is not None
    assert message.tool_calls[0].function.arguments == '{"city": "Paris"}'
    assert final.choices[0].finish_reason == "tool_calls"


def test_an_overloaded_error_event_raises_with_status_529() -> None:
    translator = ADAPTER.stream_translator(ROUTE, include_usage=False)
    error = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
    with pytest.raises(UpstreamError, match="Overloaded") as info:
        translator.feed(SseEvent("error", orjson.dumps(error).decode()))
    assert info.value.status == 529
    assert info.value.retryable


def test_unfinished_stream_and_error_frames() -> None:
    import openai

    translator = ADAPTER.stream_translator(ROUTE, include_usage=False)
    cut = STREAM.index(b"event: content_block_stop")
    out = run_stream(translator, STREAM[:cut])
    assert not translator.finished
    out += b"".join(translator.error_frames("stream_interrupted", "connection reset", "req_9"))
    with pytest.raises(openai.APIError, match="connection reset"):
        list(
            openai_sdk(out, stream=True).chat.completions.create(
                model="a", messages=[], stream=True
            )
        )
