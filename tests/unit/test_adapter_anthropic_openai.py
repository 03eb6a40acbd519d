"""Anthropic API → OpenAI-compatible upstream (also how local providers serve
/v1/messages): request, response and the full Anthropic event sequence, checked against
the official Anthropic SDK's types and client."""

# ruff: noqa: E501  (upstream chunks are kept as the wire sends them, one line each)

from __future__ import annotations

from typing import Any

import orjson
import pytest
from anthropic.types import Message, RawMessageStreamEvent
from pydantic import TypeAdapter

from ragplane.errors import BadRequest, UpstreamError, UpstreamProtocolError
from ragplane.gateway.providers import AnthropicToOpenAI, adapter_for
from ragplane.gateway.types import SseEvent, Usage
from tests.unit.adapter_support import anthropic_sdk, frames_to_events, make_route, run_stream

ADAPTER = AnthropicToOpenAI()
ROUTE = make_route(upstream="gpt-4o-mini", max_output_tokens=777)
LOCAL = make_route("llamacpp", base_url=None, api_key=None, upstream="smollm2")
EVENTS = TypeAdapter(RawMessageStreamEvent)


def translate(body: dict[str, Any], route: Any = ROUTE) -> dict[str, Any]:
    return orjson.loads(ADAPTER.build_request(body, route).body)  # type: ignore[no-any-return]


def test_lookup_url_and_headers() -> None:
    assert type(adapter_for("anthropic", ROUTE)) is AnthropicToOpenAI
    assert adapter_for("anthropic", LOCAL) is adapter_for("anthropic", ROUTE)
    request = ADAPTER.build_request({"messages": [{"role": "user", "content": "hi"}]}, ROUTE)
    assert request.url == "https://api.example.test/v1/chat/completions"
    assert request.headers["authorization"] == "Bearer sk-test-key"
    local = ADAPTER.build_request({"messages": [{"role": "user", "content": "hi"}]}, LOCAL)
    assert local.url == "local:/v1/chat/completions"


def test_a_conversation_with_tools_translates() -> None:
    body = {
        "model": "support-quality",
        "max_tokens": 400,
        "system": [
            {"type": "text", "text": "You are terse.", "cache_control": {"type": "ephemeral"}},
            {"type": "text", "text": "Use tools."},
        ],
        "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "content": [
                    {"type": "thinking", "thinking": "need a tool", "signature": "sig"},
                    {"type": "text", "text": "Checking."},
                    {
                        "type": "tool_use",
                        "id": "toolu_1",
                        "name": "get_weather",
                        "input": {"city": "Paris"},
                    },
                ],
            },
            {
                "role": "user",
                "content": [
                    {
                        "type": "tool_result",
                        "tool_use_id": "toolu_1",
                        "content": [{"type": "text", "text": "18C"}],
                    },
                    {"type": "text", "text": "And tomorrow?"},
                ],
            },
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "See:"},
                    {
                        "type": "image",
                        "source": {"type": "base64", "media_type": "image/png", "data": "iVBO"},
                    },
                ],
            },
        ],
        "tools": [
            {
                "name": "get_weather",
                "description": "Current weather",
                "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
                "cache_control": {"type": "ephemeral"},
            }
        ],
        "tool_choice": {"type": "any", "disable_parallel_tool_use": True},
        "stop_sequences": ["END"],
        "temperature": 0.3,
        "top_p": 0.8,
        "top_k": 40,
        "metadata": {"user_id": "u-1"},
    }
    assert translate(body) == {
        "model": "gpt-4o-mini",
        "messages": [
            {"role": "system", "content": "You are terse.\nUse tools."},
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "content": "Checking.",
                "tool_calls": [
                    {
                        "id": "toolu_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "toolu_1", "content": "18C"},
            {"role": "user", "content": "And tomorrow?"},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "See:"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBO"}},
                ],
            },
        ],
        "max_tokens": 400,
        "temperature": 0.3,
        "top_p": 0.8,
        "stop": ["END"],
        "tools": [
            {
                "type": "function",
                "function": {
                    "name": "get_weather",
                    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
                    "description": "Current weather",
                },
            }
        ],
        "tool_choice": "required",
        "parallel_tool_calls": False,
        "user": "u-1",
    }


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        ({"type": "auto"}, "auto"),
        ({"type": "none"}, "none"),
        ({"type": "tool", "name": "f"}, {"type": "function", "function": {"name": "f"}}),
    ],
)
def test_tool_choice(choice: dict[str, Any], expected: Any) -> None:
    tools = [{"name": "f", "input_schema": {"type": "object"}}]
    body = {"messages": [{"role": "user", "content": "x"}], "tools": tools, "tool_choice": choice}
    assert translate(body)["tool_choice"] == expected


def test_defaults_and_streams_ask_for_usage() -> None:
    body = {"messages": [{"role": "user", "content": "x"}], "stream": True}
    out = translate(body)
    assert out["max_tokens"] == 777
    assert out["stream_options"] == {"include_usage": True}
    assert ADAPTER.build_request(body, ROUTE).stream
    error_result = {
        "role": "user",
        "content": [
            {"type": "tool_result", "tool_use_id": "t", "content": "boom", "is_error": True}
        ],
    }
    assert translate({"messages": [error_result]})["messages"] == [
        {"role": "tool", "tool_call_id": "t", "content": "Error: boom"}
    ]


@pytest.mark.parametrize(
    ("body", "names"),
    [
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "system", "content": "x"}]}, "messages[0]"),
        (
            {"messages": [{"role": "user", "content": [{"type": "document", "source": {}}]}]},
            "'document'",
        ),
        (
            {
                "messages": [{"role": "user", "content": "x"}],
                "tools": [{"type": "web_search_20250305", "name": "web_search"}],
            },
            "tools[0]",
        ),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image", "source": {"type": "file", "file_id": "f"}}],
                    }
                ]
            },
            "image sources",
        ),
    ],
)
def test_what_cannot_be_translated_is_a_clear_400(body: dict[str, Any], names: str) -> None:
    with pytest.raises(BadRequest, match=names.replace("[", r"\[").replace("]", r"\]")):
        ADAPTER.build_request(body, ROUTE)


COMPLETION = {
    "id": "chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG",
    "object": "chat.completion",
    "created": 1741570283,
    "model": "gpt-4o-mini-2024-07-18",
    "choices": [
        {
            "index": 0,
            "message": {
                "role": "assistant",
                "content": "Checking the weather.",
                "refusal": None,
                "tool_calls": [
                    {
                        "id": "call_abc",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                    }
                ],
            },
            "logprobs": None,
            "finish_reason": "tool_calls",
        }
    ],
    "usage": {
        "prompt_tokens": 900,
        "completion_tokens": 64,
        "total_tokens": 964,
        "prompt_tokens_details": {"cached_tokens": 512, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0},
    },
    "system_fingerprint": "fp_06737a9306",
}


def test_a_completion_becomes_a_message() -> None:
    message, usage = ADAPTER.parse_response(orjson.dumps(COMPLETION), ROUTE)
    assert usage == Usage(input_tokens=388, output_tokens=64, cache_read_tokens=512)
    parsed = Message.model_validate(message)
    assert parsed.stop_reason == "tool_use"
    assert parsed.content[0].type == "text"
    assert parsed.content[1].type == "tool_use"
    assert parsed.content[1].input == {"city": "Paris"}
    assert (parsed.usage.input_tokens, parsed.usage.cache_read_input_tokens) == (388, 512)


@pytest.mark.parametrize(
    ("finish", "stop"),
    [("stop", "end_turn"), ("length", "max_tokens"), ("content_filter", "refusal")],
)
def test_stop_reasons(finish: str, stop: str) -> None:
    choice = {
        "index": 0,
        "message": {"role": "assistant", "content": "ok"},
        "finish_reason": finish,
    }
    message, _ = ADAPTER.parse_response(orjson.dumps({**COMPLETION, "choices": [choice]}), ROUTE)
    assert message["stop_reason"] == stop
    assert message["content"] == [{"type": "text", "text": "ok"}]


def test_the_sdk_reads_a_translated_message() -> None:
    message, _ = ADAPTER.parse_response(orjson.dumps(COMPLETION), ROUTE)
    result = anthropic_sdk(orjson.dumps(message)).messages.create(
        model="a", max_tokens=5, messages=[]
    )
    assert result.content[1].name == "get_weather"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        orjson.dumps({**COMPLETION, "choices": []}),
        orjson.dumps(
            {
                **COMPLETION,
                "choices": [
                    {
                        "index": 0,
                        "finish_reason": "tool_calls",
                        "message": {
                            "role": "assistant",
                            "tool_calls": [
                                {"id": "c", "function": {"name": "f", "arguments": "{bad"}}
                            ],
                        },
                    }
                ],
            }
        ),
    ],
)
def test_unusable_completions_are_protocol_errors(body: bytes) -> None:
    with pytest.raises(UpstreamProtocolError):
        ADAPTER.parse_response(body, ROUTE)


HEAD = '{"id":"chatcmpl-S1","object":"chat.completion.chunk","created":1741570283,"model":"gpt-4o-2024-08-06","system_fingerprint":"fp_1","choices":'
CHUNKS = [
    HEAD
    + '[{"index":0,"delta":{"role":"assistant","content":"","refusal":null},"logprobs":null,"finish_reason":null}],"usage":null}',
    HEAD
    + '[{"index":0,"delta":{"content":"Let me"},"logprobs":null,"finish_reason":null}],"usage":null}',
    HEAD
    + '[{"index":0,"delta":{"content":" check."},"logprobs":null,"finish_reason":null}],"usage":null}',
    HEAD
    + '[{"index":0,"delta":{"tool_calls":[{"index":0,"id":"call_P","type":"function","function":{"name":"get_weather","arguments":""}}]},"logprobs":null,"finish_reason":null}],"usage":null}',
    HEAD
    + '[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{\\"city\\":"}}]},"logprobs":null,"finish_reason":null}],"usage":null}',
    HEAD
    + '[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"\\"Paris\\"}"}}]},"logprobs":null,"finish_reason":null}],"usage":null}',
    HEAD
    + '[{"index":0,"delta":{"tool_calls":[{"index":1,"id":"call_R","type":"function","function":{"name":"get_weather","arguments":"{\\"city\\":\\"Rome\\"}"}}]},"logprobs":null,"finish_reason":null}],"usage":null}',
    HEAD + '[{"index":0,"delta":{},"logprobs":null,"finish_reason":"tool_calls"}],"usage":null}',
    HEAD
    + '[],"usage":{"prompt_tokens":1500,"completion_tokens":200,"total_tokens":1700,"prompt_tokens_details":{"cached_tokens":1024,"audio_tokens":0},"completion_tokens_details":{"reasoning_tokens":0,"audio_tokens":0}}}',
    "[DONE]",
]
STREAM = b"".join(b"data: " + c.encode() + b"\n\n" for c in CHUNKS)
STREAM_USAGE = Usage(input_tokens=476, output_tokens=200, cache_read_tokens=1024)


def test_the_stream_becomes_the_full_anthropic_event_sequence() -> None:
    translator = ADAPTER.stream_translator(ROUTE)
    events = frames_to_events(run_stream(translator, STREAM, split=11))
    for event in events:
        parsed = EVENTS.validate_json(event.data)
        assert parsed.type == event.event
    assert [e.event for e in events] == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "content_block_start",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    delta = orjson.loads(events[-2].data)
    assert delta["delta"]["stop_reason"] == "tool_use"
    assert delta["usage"]["output_tokens"] == 200
    assert delta["usage"]["cache_read_input_tokens"] == 1024
    assert translator.usage == STREAM_USAGE
    assert translator.finished


def test_the_sdk_accumulates_the_translated_stream() -> None:
    out = run_stream(ADAPTER.stream_translator(ROUTE), STREAM)
    with anthropic_sdk(out, stream=True).messages.stream(
        model="a", max_tokens=5, messages=[]
    ) as stream:
        final = stream.get_final_message()
    assert [b.type for b in final.content] == ["text", "tool_use", "tool_use"]
    assert final.content[0].text == "Let me check."  # type: ignore[union-attr]
    assert final.content[1].input == {"city": "Paris"}  # type: ignore[union-attr]
    assert final.content[2].input == {"city": "Rome"}  # type: ignore[union-attr]
    assert final.stop_reason == "tool_use"
    assert final.usage.output_tokens == 200
    assert final.usage.input_tokens == 476
    assert final.id == "chatcmpl-S1"


def test_an_empty_answer_still_has_start_delta_and_stop() -> None:
    translator = ADAPTER.stream_translator(LOCAL)
    events = frames_to_events(run_stream(translator, b"data: [DONE]\n\n"))
    assert [e.event for e in events] == ["message_start", "message_delta", "message_stop"]
    assert orjson.loads(events[0].data)["message"]["model"] == "smollm2"


def test_errors_in_the_stream() -> None:
    import anthropic

    translator = ADAPTER.stream_translator(ROUTE)
    with pytest.raises(UpstreamError):
        translator.feed(
            SseEvent(None, '{"error":{"message":"model overloaded","type":"server_error"}}')
        )
    with pytest.raises(UpstreamProtocolError):
        translator.feed(SseEvent(None, "{truncated"))
    out = run_stream(translator, b"".join(b"data: " + c.encode() + b"\n\n" for c in CHUNKS[:3]))
    assert not translator.finished
    out += b"".join(translator.error_frames("upstream_timeout", "idle for 15s", "req_3"))
    client = anthropic_sdk(out, stream=True)
    with pytest.raises(anthropic.APIStatusError) as caught:
        list(client.messages.create(model="a", max_tokens=5, messages=[], stream=True))
    assert caught.value.body["error"]["type"] == "timeout_error"
