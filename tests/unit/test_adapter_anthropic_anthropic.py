"""Anthropic API → Anthropic upstream: pass-through, headers, the automatic cache
breakpoint and usage read from the stream."""

# ruff: noqa: E501  (upstream events are kept as the wire sends them, one line each)

from __future__ import annotations

import copy
from typing import Any

import orjson
import pytest
from anthropic.types import Message, RawMessageStreamEvent
from pydantic import TypeAdapter

from ragplane.errors import UpstreamError, UpstreamProtocolError
from ragplane.gateway.providers import AnthropicToAnthropic, adapter_for
from ragplane.gateway.providers.anthropic_anthropic import with_cache_breakpoint
from ragplane.gateway.types import SseEvent, Usage
from tests.unit.adapter_support import anthropic_sdk, frames_to_events, make_route, run_stream

ADAPTER = AnthropicToAnthropic()
ROUTE = make_route(
    "anthropic",
    base_url="https://api.anthropic.com/v1",
    api_key="sk-ant-test",
    upstream="claude-sonnet-4-5-20250929",
)
CACHING = make_route(
    "anthropic",
    base_url="https://api.anthropic.com",
    upstream="claude-sonnet-4-5-20250929",
    prompt_cache=True,
    prompt_cache_min_chars=100,
)
LONG = "You answer questions about the Python standard library. " * 4  # 228 chars
BODY: dict[str, Any] = {
    "model": "support-quality",
    "max_tokens": 512,
    "messages": [
        {
            "role": "user",
            "content": [
                {
                    "type": "text",
                    "text": "doc",
                    "cache_control": {"type": "ephemeral", "ttl": "1h"},
                },
                {"type": "text", "text": "question"},
            ],
        }
    ],
    "thinking": {"type": "enabled", "budget_tokens": 1024},
}
EVENTS = TypeAdapter(RawMessageStreamEvent)


def sent(body: dict[str, Any], route: Any = ROUTE, **kw: Any) -> dict[str, Any]:
    return orjson.loads(ADAPTER.build_request(body, route, **kw).body)  # type: ignore[no-any-return]


def test_lookup_and_pass_through() -> None:
    assert adapter_for("anthropic", ROUTE) is adapter_for("anthropic", CACHING)
    assert type(adapter_for("anthropic", ROUTE)) is AnthropicToAnthropic
    original = copy.deepcopy(BODY)
    assert sent(BODY) == {**BODY, "model": "claude-sonnet-4-5-20250929"}
    assert original == BODY
    request = ADAPTER.build_request({**BODY, "stream": True}, ROUTE)
    assert request.stream
    assert request.url == "https://api.anthropic.com/v1/messages"


def test_headers_default_and_from_the_caller() -> None:
    headers = ADAPTER.build_request(BODY, ROUTE).headers
    assert headers["x-api-key"] == "sk-ant-test"
    assert headers["anthropic-version"] == "2023-06-01"
    assert "anthropic-beta" not in headers
    caller = {
        "Anthropic-Version": "2024-01-01",
        "anthropic-beta": "context-1m-2025-08-07",
        "Authorization": "x",
    }
    headers = ADAPTER.build_request(BODY, ROUTE, headers=caller).headers
    assert headers["anthropic-version"] == "2024-01-01"
    assert headers["anthropic-beta"] == "context-1m-2025-08-07"
    assert "Authorization" not in headers
    assert "authorization" not in headers


def test_provider_betas_are_merged_with_the_callers() -> None:
    route = make_route(
        "anthropic", headers={"anthropic-beta": "files-api-2025-04-14", "x-team": "a"}
    )
    headers = ADAPTER.build_request(BODY, route, headers={"anthropic-beta": "b1"}).headers
    assert headers["anthropic-beta"] == "b1,files-api-2025-04-14"
    assert headers["x-team"] == "a"
    assert ADAPTER.build_request(BODY, route).headers["anthropic-beta"] == "files-api-2025-04-14"


def test_a_long_string_system_prompt_gets_a_breakpoint_when_the_alias_asks() -> None:
    body = {**BODY, "system": LONG}
    assert sent(body)["system"] == LONG  # policy off
    assert sent(body, CACHING)["system"] == [
        {"type": "text", "text": LONG, "cache_control": {"type": "ephemeral"}}
    ]
    assert body["system"] == LONG
    assert sent({**BODY, "system": "short"}, CACHING)["system"] == "short"


def test_the_breakpoint_goes_on_the_last_block_of_a_long_block_list() -> None:
    system = [{"type": "text", "text": LONG}, {"type": "text", "text": "Today is Friday."}]
    out = sent({**BODY, "system": system}, CACHING)["system"]
    assert out == [system[0], {**system[1], "cache_control": {"type": "ephemeral"}}]
    assert "cache_control" not in system[1]


def test_no_breakpoint_when_the_system_has_one_or_four_are_used() -> None:
    own = [{"type": "text", "text": LONG, "cache_control": {"type": "ephemeral", "ttl": "1h"}}]
    assert with_cache_breakpoint({"system": own}, 100) == {"system": own}
    marked = {"type": "text", "text": "x", "cache_control": {"type": "ephemeral"}}
    full = {
        "system": LONG,
        "tools": [{"name": "t", "input_schema": {}, "cache_control": {"type": "ephemeral"}}],
        "messages": [{"role": "user", "content": [marked, marked, marked]}],
    }
    assert with_cache_breakpoint(full, 100) is full
    three = {**full, "messages": [{"role": "user", "content": [marked, marked]}]}
    assert with_cache_breakpoint(three, 100)["system"][0]["cache_control"] == {"type": "ephemeral"}


MESSAGE = {
    "id": "msg_013Zva2CMHLNnXjNJJKqJ2EF",
    "type": "message",
    "role": "assistant",
    "model": "claude-sonnet-4-5-20250929",
    "content": [{"type": "text", "text": "Hi! My name is Claude."}],
    "stop_reason": "end_turn",
    "stop_sequence": None,
    "usage": {
        "input_tokens": 15,
        "cache_creation_input_tokens": 1200,
        "cache_read_input_tokens": 6000,
        "cache_creation": {"ephemeral_5m_input_tokens": 1200, "ephemeral_1h_input_tokens": 0},
        "output_tokens": 310,
        "service_tier": "standard",
    },
}


def test_a_message_passes_through_with_usage() -> None:
    message, usage = ADAPTER.parse_response(orjson.dumps(MESSAGE), ROUTE)
    assert message == MESSAGE
    assert ADAPTER.passes_through  # so the caller may get the provider's bytes as they came
    assert usage == Usage(
        input_tokens=15, output_tokens=310, cache_read_tokens=6000, cache_write_tokens=1200
    )
    Message.model_validate(message)


def test_errors_in_the_body() -> None:
    with pytest.raises(UpstreamProtocolError):
        ADAPTER.parse_response(b"\x00\x01", ROUTE)
    error = {"type": "error", "error": {"type": "rate_limit_error", "message": "slow down"}}
    with pytest.raises(UpstreamError) as info:
        ADAPTER.parse_response(orjson.dumps(error), ROUTE)
    assert info.value.status == 429


STREAM = (
    b'event: message_start\ndata: {"type":"message_start","message":{"id":"msg_1nZdL29xx5MUA1yADyHTEsnR8uuvGzszyY","type":"message","role":"assistant","content":[],"model":"claude-sonnet-4-5-20250929","stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":3,"cache_creation_input_tokens":0,"cache_read_input_tokens":14000,"output_tokens":1}}}\n\n'
    b'event: content_block_start\ndata: {"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}\n\n'
    b'event: ping\ndata: {"type": "ping"}\n\n'
    b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hello"}}\n\n'
    b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"!"}}\n\n'
    b'event: content_block_stop\ndata: {"type":"content_block_stop","index":0}\n\n'
    b'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":"end_turn","stop_sequence":null},"usage":{"input_tokens":3,"cache_creation_input_tokens":0,"cache_read_input_tokens":14000,"output_tokens":612}}\n\n'
    b'event: message_stop\ndata: {"type":"message_stop"}\n\n'
)


def test_the_stream_is_forwarded_byte_for_byte_and_usage_is_read() -> None:
    translator = ADAPTER.stream_translator(ROUTE, include_usage=False)
    assert run_stream(translator, STREAM, split=5) == STREAM
    assert translator.usage == Usage(input_tokens=3, output_tokens=612, cache_read_tokens=14000)
    assert translator.finished
    for event in frames_to_events(STREAM):
        if event.event != "ping":
            EVENTS.validate_json(event.data)


def test_message_delta_updates_only_what_it_carries() -> None:
    translator = ADAPTER.stream_translator(ROUTE)
    start = STREAM.split(b"\n\n")[0].split(b"data: ", 1)[1].decode()
    translator.feed(SseEvent("message_start", start))
    translator.feed(
        SseEvent(
            "message_delta", '{"type":"message_delta","delta":{},"usage":{"output_tokens":40}}'
        )
    )
    assert translator.usage == Usage(input_tokens=3, output_tokens=40, cache_read_tokens=14000)
    assert not translator.finished


def test_the_sdk_reads_the_forwarded_stream() -> None:
    out = run_stream(ADAPTER.stream_translator(ROUTE), STREAM)
    client = anthropic_sdk(out, stream=True)
    with client.messages.stream(model="a", max_tokens=5, messages=[]) as stream:
        final = stream.get_final_message()
    assert final.content[0].text == "Hello!"  # type: ignore[union-attr]
    assert final.usage.output_tokens == 612
    assert final.usage.cache_read_input_tokens == 14000


def test_an_error_event_raises_and_error_frames_reach_the_sdk() -> None:
    import anthropic

    translator = ADAPTER.stream_translator(ROUTE)
    error = '{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}'
    with pytest.raises(UpstreamError) as info:
        translator.feed(SseEvent("error", error))
    assert info.value.status == 529
    out = run_stream(translator, STREAM[: STREAM.index(b"event: content_block_stop")])
    out += b"".join(translator.error_frames("no_healthy_route", "all routes down", "req_7"))
    client = anthropic_sdk(out, stream=True)
    with pytest.raises(anthropic.APIStatusError) as caught:
        list(client.messages.create(model="a", max_tokens=5, messages=[], stream=True))
    assert caught.value.body["error"]["type"] == "overloaded_error"
    assert "req_7" in caught.value.body["error"]["message"]
