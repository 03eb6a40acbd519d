"""OpenAI API → OpenAI-compatible upstream: a pass-through that asks for usage."""
# ruff: noqa: E501  (upstream chunks are kept as the wire sends them, one line each)

from __future__ import annotations

import copy
from typing import Any

import orjson
import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from ragplane.errors import UpstreamError, UpstreamProtocolError
from ragplane.gateway.providers import OpenAIToOpenAI, adapter_for, caller_wants_usage
from ragplane.gateway.types import ChatAdapter, SseEvent, Usage
from tests.unit.adapter_support import frames_to_events, make_route, openai_sdk, run_stream

ADAPTER = OpenAIToOpenAI()
ROUTE = make_route(upstream="gpt-4o-mini", headers={"OpenAI-Organization": "org-1"})
BODY: dict[str, Any] = {
    "model": "support-quality",
    "messages": [{"role": "user", "content": "What's the weather in Paris?"}],
    "tools": [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        }
    ],
    "tool_choice": "auto",
    "response_format": {"type": "text"},
    "temperature": 0.2,
}

HEAD = '{"id":"chatcmpl-B9M","object":"chat.completion.chunk","created":1741569952,"model":"gpt-4o-mini-2024-07-18","system_fingerprint":"fp_06737a9306","choices":'
STREAM = [
    HEAD
    + '[{"index":0,"delta":{"role":"assistant","content":"","refusal":null},"logprobs":null,"finish_reason":null}],"usage":null}',
    HEAD
    + '[{"index":0,"delta":{"content":"Sunny"},"logprobs":null,"finish_reason":null}],"usage":null}',
    HEAD
    + '[{"index":0,"delta":{"content":", \\"usage\\": {} 21C"},"logprobs":null,"finish_reason":null}],"usage":null}',
    HEAD + '[{"index":0,"delta":{},"logprobs":null,"finish_reason":"stop"}],"usage":null}',
    HEAD
    + '[],"usage":{"prompt_tokens":2006,"completion_tokens":300,"total_tokens":2306,"prompt_tokens_details":{"cached_tokens":1920,"audio_tokens":0},"completion_tokens_details":{"reasoning_tokens":0,"audio_tokens":0,"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}}}',
    "[DONE]",
]
RAW_STREAM = b"".join(b"data: " + line.encode() + b"\n\n" for line in STREAM)
USAGE = Usage(input_tokens=86, output_tokens=300, cache_read_tokens=1920)


def test_it_is_the_adapter_for_openai_callers_on_openai_compatible_routes() -> None:
    adapter: ChatAdapter = adapter_for("openai", ROUTE)
    assert adapter is adapter_for("openai", make_route("llamacpp", base_url=None, api_key=None))
    assert (adapter.api, adapter.upstream_api) == ("openai", "openai")


def test_request_rewrites_only_the_model() -> None:
    original = copy.deepcopy(BODY)
    request = ADAPTER.build_request(BODY, ROUTE)
    sent = orjson.loads(request.body)
    assert sent == {**BODY, "model": "gpt-4o-mini"}
    assert original == BODY  # the caller's dict is not changed
    assert request.url == "https://api.example.test/v1/chat/completions"
    assert request.method == "POST"
    assert not request.stream
    assert request.headers["authorization"] == "Bearer sk-test-key"
    assert request.headers["OpenAI-Organization"] == "org-1"
    assert request.headers["content-type"] == "application/json"


def test_streams_ask_the_upstream_for_usage_and_keep_other_stream_options() -> None:
    body = {**BODY, "stream": True, "stream_options": {"include_obfuscation": False}}
    request = ADAPTER.build_request(body, ROUTE)
    sent = orjson.loads(request.body)
    assert request.stream
    assert sent["stream_options"] == {"include_obfuscation": False, "include_usage": True}
    assert body["stream_options"] == {"include_obfuscation": False}
    assert not caller_wants_usage("openai", body)
    assert caller_wants_usage("openai", {"stream_options": {"include_usage": True}})
    assert caller_wants_usage("anthropic", {})


def test_local_and_keyless_providers() -> None:
    local = make_route("local-extractive", base_url=None, api_key=None)
    request = ADAPTER.build_request(BODY, local)
    assert request.url == "local:/v1/chat/completions"
    assert "authorization" not in request.headers
    ollama = make_route(base_url="http://127.0.0.1:11434/v1/", api_key=None)
    assert ADAPTER.build_request(BODY, ollama).url == "http://127.0.0.1:11434/v1/chat/completions"


def test_response_usage_subtracts_cached_tokens_and_keeps_reasoning() -> None:
    body = {
        "id": "chatcmpl-abc",
        "object": "chat.completion",
        "created": 1741569952,
        "model": "o4-mini-2025-04-16",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "42", "refusal": None},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {
            "prompt_tokens": 1200,
            "completion_tokens": 900,
            "total_tokens": 2100,
            "prompt_tokens_details": {"cached_tokens": 1024, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 832, "audio_tokens": 0},
        },
    }
    completion, usage = ADAPTER.parse_response(orjson.dumps(body), ROUTE)
    assert usage == Usage(
        input_tokens=176, output_tokens=900, cache_read_tokens=1024, reasoning_tokens=832
    )
    assert completion == body
    assert ADAPTER.passes_through  # so the caller may get the provider's bytes as they came
    ChatCompletion.model_validate(completion)


def test_a_response_without_usage_counts_zero() -> None:
    body = {"id": "x", "object": "chat.completion", "created": 1, "model": "m", "choices": []}
    assert ADAPTER.parse_response(orjson.dumps(body), ROUTE)[1] == Usage()


@pytest.mark.parametrize("raw", [b"<html>bad gateway</html>", b"[1, 2]", b""])
def test_unparseable_responses_are_protocol_errors(raw: bytes) -> None:
    with pytest.raises(UpstreamProtocolError) as info:
        ADAPTER.parse_response(raw, ROUTE)
    assert info.value.provider == "p"
    assert info.value.route == "alias/m"


def test_stream_without_caller_usage_forwards_bytes_and_drops_the_usage_chunk() -> None:
    translator = ADAPTER.stream_translator(ROUTE, include_usage=False)
    out = run_stream(translator, RAW_STREAM)
    kept = [line for line in STREAM if '"usage":{' not in line]
    assert out == b"".join(b"data: " + line.encode() + b"\n\n" for line in kept)
    assert translator.usage == USAGE
    assert translator.finished
    chunks = [ChatCompletionChunk.model_validate_json(e.data) for e in frames_to_events(out)[:-1]]
    assert [c.usage for c in chunks] == [None] * 4


def test_stream_with_caller_usage_is_byte_identical() -> None:
    translator = ADAPTER.stream_translator(ROUTE, include_usage=True)
    assert run_stream(translator, RAW_STREAM, split=3) == RAW_STREAM
    assert translator.usage == USAGE


def test_the_official_sdk_reads_the_forwarded_stream() -> None:
    out = run_stream(ADAPTER.stream_translator(ROUTE, include_usage=True), RAW_STREAM)
    client = openai_sdk(out, stream=True)
    chunks = list(client.chat.completions.create(model="a", messages=[], stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == 'Sunny, "usage": {} 21C'
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == 1920


def test_usage_riding_on_a_content_chunk_is_read_and_hidden() -> None:
    line = (
        HEAD
        + '[{"index":0,"delta":{"content":"x"},"finish_reason":"stop"}],"usage": {"prompt_tokens":5,"completion_tokens":1,"total_tokens":6}}'
    )
    translator = ADAPTER.stream_translator(ROUTE, include_usage=False)
    frames = translator.feed(SseEvent(None, line))
    assert translator.usage == Usage(input_tokens=5, output_tokens=1)
    chunk = orjson.loads(frames_to_events(b"".join(frames))[0].data)
    assert "usage" not in chunk
    assert chunk["choices"][0]["delta"] == {"content": "x"}


def test_a_stream_without_done_is_not_finished() -> None:
    translator = ADAPTER.stream_translator(ROUTE, include_usage=False)
    run_stream(translator, b"".join(b"data: " + s.encode() + b"\n\n" for s in STREAM[:4]))
    assert not translator.finished
    assert translator.usage is None


@pytest.mark.parametrize(
    ("data", "status"),
    [
        ('{"error":{"message":"overloaded","type":"server_error","code":null}}', 500),
        ('{"error":{"object":"error","message":"bad","type":"BadRequestError","code":400}}', 400),
        ('{"object":"error","message":"model crashed","type":"InternalServerError"}', 500),
    ],
)
def test_an_error_event_in_the_stream_raises_upstream_error(data: str, status: int) -> None:
    translator = ADAPTER.stream_translator(ROUTE, include_usage=False)
    with pytest.raises(UpstreamError) as info:
        translator.feed(SseEvent(None, data))
    assert info.value.status == status
    assert info.value.provider == "p"


def test_a_broken_chunk_carrying_usage_is_a_protocol_error() -> None:
    translator = ADAPTER.stream_translator(ROUTE, include_usage=False)
    with pytest.raises(UpstreamProtocolError):
        translator.feed(SseEvent(None, '{"choices":[],"usage":{"prompt_tokens":'))


def test_error_frames_make_the_sdk_raise() -> None:
    import openai

    translator = ADAPTER.stream_translator(ROUTE, include_usage=False)
    frames = run_stream(translator, RAW_STREAM[: RAW_STREAM.index(b"data: ", 10)])
    frames += b"".join(translator.error_frames("stream_interrupted", "upstream reset", "req_1"))
    client = openai_sdk(frames, stream=True)
    with pytest.raises(openai.APIError, match="upstream reset") as info:
        list(client.chat.completions.create(model="a", messages=[], stream=True))
    assert isinstance(info.value.body, dict)
    assert info.value.body["code"] == "stream_interrupted"
    assert "req_1" in info.value.message
