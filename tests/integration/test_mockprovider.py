"""The provider test server against the official OpenAI and Anthropic SDKs on loopback.

Every behaviour a gateway test relies on is checked the way a client sees it: answers,
streams and usage through the SDKs; each fault as the exception the SDK raises for it
(``max_retries=0``); raw wire details (SSE ``event:`` lines, error bodies, headers)
with a plain aiohttp client; and the ``ragplane mock-provider`` process.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import httpx2
import openai
import pytest

from ragplane.errors import ConfigError
from ragplane.gateway.mockprovider import (
    FaultRule,
    MockProvider,
    MockProviderConfig,
    parse_fault,
    run_mock_provider,
)

KEY = "sk-mock-test"
RAGPLANE = Path(sys.executable).with_name("ragplane")
HELLO = [{"role": "user", "content": "Hello there, what is the weather in Paris?"}]
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather of a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city", "days"],
        },
    },
}
CLAUDE_TOOL = {
    "name": "get_weather",
    "description": "Weather of a city",
    "input_schema": WEATHER_TOOL["function"]["parameters"],  # type: ignore[index]
}


@pytest.fixture
async def mock() -> AsyncIterator[MockProvider]:
    async with run_mock_provider(MockProviderConfig(api_key=KEY, output_tokens=12)) as m:
        yield m


@pytest.fixture
async def oai(mock: MockProvider) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(
        base_url=mock.openai_base_url, api_key=KEY, max_retries=0, timeout=10
    ) as client:
        yield client


@pytest.fixture
async def claude(mock: MockProvider) -> AsyncIterator[anthropic.AsyncAnthropic]:
    async with anthropic.AsyncAnthropic(
        base_url=mock.url, api_key=KEY, max_retries=0, timeout=10
    ) as client:
        yield client


async def raw(
    method: str, url: str, body: Any = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    async with (
        aiohttp.ClientSession() as s,
        s.request(method, url, json=body, headers=headers) as r,
    ):
        return r.status, dict(r.headers), await r.read()


# --- OpenAI protocol -------------------------------------------------------------------


async def test_openai_chat_is_deterministic_with_full_usage(oai: openai.AsyncOpenAI) -> None:
    first = await oai.chat.completions.create(model="mock-gpt", messages=HELLO)  # type: ignore[arg-type]
    again = await oai.chat.completions.create(model="mock-gpt", messages=HELLO)  # type: ignore[arg-type]
    content = first.choices[0].message.content
    assert content is not None
    assert content.startswith("Hello there, what is the weather")
    assert content == again.choices[0].message.content
    assert first.choices[0].finish_reason == "stop"
    u = first.usage
    assert u is not None
    assert u.completion_tokens == 12 == len(content.split())
    assert u.prompt_tokens > 0
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    assert u.prompt_tokens_details is not None
    assert u.prompt_tokens_details.cached_tokens == 0
    assert u.completion_tokens_details is not None
    assert u.completion_tokens_details.reasoning_tokens == 0


async def test_openai_usage_headers_and_max_tokens(oai: openai.AsyncOpenAI) -> None:
    r = await oai.chat.completions.create(
        model="mock-gpt",
        messages=HELLO,  # type: ignore[arg-type]
        max_tokens=5,
        extra_headers={"x-mock-cached-tokens": "4", "x-mock-reasoning-tokens": "3"},
    )
    assert r.choices[0].finish_reason == "length"
    assert r.usage is not None
    assert r.usage.prompt_tokens_details is not None
    assert r.usage.completion_tokens_details is not None
    assert r.usage.prompt_tokens_details.cached_tokens == 4
    assert r.usage.completion_tokens_details.reasoning_tokens == 3
    assert r.usage.completion_tokens == 5 + 3  # reasoning is part of the output


async def test_openai_stream_matches_non_stream(oai: openai.AsyncOpenAI) -> None:
    plain = await oai.chat.completions.create(model="mock-gpt", messages=HELLO)  # type: ignore[arg-type]
    stream = await oai.chat.completions.create(
        model="mock-gpt",
        messages=HELLO,  # type: ignore[arg-type]
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [c async for c in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    finish = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finish == ["stop"]
    last = chunks[-1]
    assert last.choices == []
    assert last.usage == plain.usage
    assert all(c.usage is None for c in chunks[:-1])


async def test_openai_stream_without_usage_option_sends_none(oai: openai.AsyncOpenAI) -> None:
    stream = await oai.chat.completions.create(
        model="mock-gpt",
        messages=HELLO,  # type: ignore[arg-type]
        stream=True,
    )
    chunks = [c async for c in stream]
    assert all(c.choices and c.usage is None for c in chunks)


async def test_openai_tool_call_when_the_user_asks(oai: openai.AsyncOpenAI) -> None:
    messages: Any = [{"role": "user", "content": "Use get_weather for Paris"}]
    r = await oai.chat.completions.create(model="mock-gpt", messages=messages, tools=[WEATHER_TOOL])  # type: ignore[list-item]
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    assert choice.message.tool_calls is not None
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather"  # type: ignore[union-attr]
    args = json.loads(call.function.arguments)  # type: ignore[union-attr]
    assert set(args) == {"city", "days"}
    assert isinstance(args["days"], int)

    stream = await oai.chat.completions.create(
        model="mock-gpt",
        messages=messages,
        tools=[WEATHER_TOOL],  # type: ignore[list-item]
        stream=True,
    )
    chunks = [c async for c in stream]
    deltas = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert deltas[0].id is not None
    assert deltas[0].id.startswith("call_")
    assert deltas[0].function is not None
    assert deltas[0].function.name == "get_weather"
    assert "".join(d.function.arguments or "" for d in deltas if d.function) == (
        call.function.arguments  # type: ignore[union-attr]
    )
    assert chunks[-1].choices[0].finish_reason == "tool_calls"

    # a tool result as the last message gets a text answer
    messages += [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "sunny"},
    ]
    r = await oai.chat.completions.create(model="mock-gpt", messages=messages, tools=[WEATHER_TOOL])  # type: ignore[list-item]
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.content


async def test_openai_tool_call_forced_by_header_and_plain_without(
    oai: openai.AsyncOpenAI,
) -> None:
    r = await oai.chat.completions.create(
        model="mock-gpt",
        messages=HELLO,  # type: ignore[arg-type]
        tools=[WEATHER_TOOL],  # type: ignore[list-item]
        extra_headers={"x-mock-tool-call": "get_weather"},
    )
    assert r.choices[0].message.tool_calls is not None
    plain = await oai.chat.completions.create(
        model="mock-gpt",
        messages=[{"role": "user", "content": "Just chat"}],
        tools=[WEATHER_TOOL],  # type: ignore[list-item]
    )
    assert plain.choices[0].message.tool_calls is None


@pytest.mark.parametrize("stream", [False, True])
async def test_openai_json_mode_content_is_json(oai: openai.AsyncOpenAI, stream: bool) -> None:
    messages: Any = [{"role": "user", "content": 'Say "quoted" \\ things as JSON'}]
    if stream:
        s = await oai.chat.completions.create(
            model="mock-gpt",
            messages=messages,
            response_format={"type": "json_object"},
            stream=True,
        )
        text = "".join([c.choices[0].delta.content or "" async for c in s if c.choices])
    else:
        r = await oai.chat.completions.create(
            model="mock-gpt", messages=messages, response_format={"type": "json_object"}
        )
        text = r.choices[0].message.content or ""
    assert isinstance(json.loads(text), dict)


async def test_openai_json_schema_content_fits_the_schema(oai: openai.AsyncOpenAI) -> None:
    schema = {
        "type": "object",
        "properties": {"answer": {"type": "string"}, "score": {"type": "number"}},
        "required": ["answer", "score"],
    }
    r = await oai.chat.completions.create(
        model="mock-gpt",
        messages=HELLO,  # type: ignore[arg-type]
        response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema}},
    )
    value = json.loads(r.choices[0].message.content or "")
    assert isinstance(value["answer"], str)
    assert isinstance(value["score"], float)


async def test_embeddings_are_deterministic_unit_vectors(oai: openai.AsyncOpenAI) -> None:
    r = await oai.embeddings.create(model="mock-embedding", input=["alpha", "beta"])
    a, b = (d.embedding for d in r.data)
    assert len(a) == len(b) == 384
    assert math.isclose(sum(x * x for x in a), 1.0, rel_tol=1e-4)
    assert a != b
    assert r.usage.prompt_tokens > 0
    again = await oai.embeddings.create(
        model="mock-embedding", input="alpha", encoding_format="float"
    )
    assert again.data[0].embedding == pytest.approx(a, abs=1e-6)  # base64 float32 vs JSON
    small = await oai.embeddings.create(model="mock-embedding", input="alpha", dimensions=64)
    assert len(small.data[0].embedding) == 64
    assert math.isclose(sum(x * x for x in small.data[0].embedding), 1.0, rel_tol=1e-4)


async def test_models_in_both_shapes(
    oai: openai.AsyncOpenAI, claude: anthropic.AsyncAnthropic
) -> None:
    ids = [m.id async for m in oai.models.list()]
    assert "mock-gpt" in ids
    claude_ids = [m.id async for m in claude.models.list()]
    assert claude_ids == ids


async def test_openai_wrong_key_is_401_in_openai_shape(mock: MockProvider) -> None:
    async with openai.AsyncOpenAI(
        base_url=mock.openai_base_url, api_key="wrong", max_retries=0
    ) as client:
        with pytest.raises(openai.AuthenticationError) as err:
            await client.chat.completions.create(model="m", messages=HELLO)  # type: ignore[arg-type]
    assert err.value.status_code == 401
    assert err.value.code == "invalid_api_key"
    status, _, body = await raw("POST", mock.openai_base_url + "/chat/completions", {})
    assert status == 401
    assert set(json.loads(body)["error"]) == {"message", "type", "param", "code"}


# --- Anthropic protocol ----------------------------------------------------------------


async def test_anthropic_message_and_stream_agree(claude: anthropic.AsyncAnthropic) -> None:
    kwargs: Any = {"model": "mock-claude", "max_tokens": 100, "messages": HELLO}
    plain = await claude.messages.create(**kwargs)
    assert plain.stop_reason == "end_turn"
    assert plain.content[0].type == "text"
    assert plain.content[0].text.startswith("Hello there")
    assert plain.usage.output_tokens == 12
    assert plain.usage.input_tokens > 0
    assert plain.usage.cache_creation_input_tokens == 0
    assert plain.usage.cache_read_input_tokens == 0
    async with claude.messages.stream(**kwargs) as stream:
        final = await stream.get_final_message()
    assert final.content[0].type == "text"
    assert final.content[0].text == plain.content[0].text
    assert final.usage.output_tokens == plain.usage.output_tokens
    assert final.usage.input_tokens == plain.usage.input_tokens
    assert final.stop_reason == "end_turn"

    capped = await claude.messages.create(**{**kwargs, "max_tokens": 3})
    assert capped.stop_reason == "max_tokens"
    assert capped.usage.output_tokens == 3


async def test_anthropic_stream_has_the_real_event_sequence(mock: MockProvider) -> None:
    body = {"model": "mock-claude", "max_tokens": 4, "messages": HELLO, "stream": True}
    headers = {"x-api-key": KEY, "anthropic-version": "2023-06-01"}
    status, resp_headers, data = await raw("POST", mock.url + "/v1/messages", body, headers)
    assert status == 200
    assert resp_headers["Content-Type"].startswith("text/event-stream")
    frames = [f for f in data.decode().split("\n\n") if f]
    events = [f.split("\n")[0].removeprefix("event: ") for f in frames]
    assert events == [
        "message_start",
        "content_block_start",
        "ping",
        *["content_block_delta"] * 4,
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    for frame in frames:  # each event's data names the same type
        name, data_line = frame.split("\n")
        assert json.loads(data_line.removeprefix("data: "))["type"] == name.removeprefix("event: ")
    delta = json.loads(frames[-2].split("\n")[1].removeprefix("data: "))
    assert delta["delta"]["stop_reason"] == "max_tokens"
    assert delta["usage"]["output_tokens"] == 4


async def test_anthropic_tool_use(claude: anthropic.AsyncAnthropic) -> None:
    messages: Any = [{"role": "user", "content": "What is the weather? Use get_weather."}]
    kwargs: Any = {"model": "c", "max_tokens": 100, "messages": messages, "tools": [CLAUDE_TOOL]}
    plain = await claude.messages.create(**kwargs)
    assert plain.stop_reason == "tool_use"
    block = plain.content[0]
    assert block.type == "tool_use"
    assert block.name == "get_weather"
    assert set(block.input) == {"city", "days"}  # type: ignore[arg-type]
    async with claude.messages.stream(**kwargs) as stream:
        final = await stream.get_final_message()
    streamed = final.content[0]
    assert streamed.type == "tool_use"
    assert streamed.input == block.input
    assert final.stop_reason == "tool_use"

    messages += [
        {"role": "assistant", "content": [block.model_dump()]},
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": block.id, "content": "ok"}],
        },
    ]
    after = await claude.messages.create(**kwargs)
    assert after.stop_reason == "end_turn"
    forced = await claude.messages.create(
        **{**kwargs, "messages": HELLO, "tool_choice": {"type": "tool", "name": "get_weather"}}
    )
    assert forced.stop_reason == "tool_use"


async def test_anthropic_prompt_cache_write_then_read(claude: anthropic.AsyncAnthropic) -> None:
    system: Any = [
        {"type": "text", "text": "policy " * 400, "cache_control": {"type": "ephemeral"}}
    ]
    kwargs: Any = {"model": "c", "max_tokens": 5, "system": system, "messages": HELLO}
    first = await claude.messages.create(**kwargs)
    assert first.usage.cache_creation_input_tokens > 0
    assert first.usage.cache_read_input_tokens == 0
    second = await claude.messages.create(**kwargs)
    assert second.usage.cache_read_input_tokens == first.usage.cache_creation_input_tokens
    assert second.usage.cache_creation_input_tokens == 0
    assert second.usage.input_tokens == first.usage.input_tokens

    # a later breakpoint: the cached prefix is read, the part after it written
    longer: Any = [
        {"role": "user", "content": [{"type": "text", "text": "context " * 300}]},
        {"role": "assistant", "content": "ok"},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "question", "cache_control": {"type": "ephemeral"}}
            ],
        },
    ]
    third = await claude.messages.create(**{**kwargs, "messages": longer})
    assert third.usage.cache_read_input_tokens == first.usage.cache_creation_input_tokens
    assert third.usage.cache_creation_input_tokens > 0
    async with claude.messages.stream(**{**kwargs, "messages": longer}) as stream:
        fourth = await stream.get_final_message()
    total_third = third.usage.cache_read_input_tokens + third.usage.cache_creation_input_tokens
    assert fourth.usage.cache_read_input_tokens == total_third
    assert fourth.usage.cache_creation_input_tokens == 0


async def test_anthropic_auth_and_error_shape(mock: MockProvider) -> None:
    async with anthropic.AsyncAnthropic(base_url=mock.url, api_key="wrong", max_retries=0) as c:
        with pytest.raises(anthropic.AuthenticationError):
            await c.messages.create(model="c", max_tokens=5, messages=HELLO)  # type: ignore[arg-type]
    body = {"model": "c", "max_tokens": 5, "messages": HELLO}
    status, _, data = await raw("POST", mock.url + "/v1/messages", body, {"x-api-key": KEY})
    assert status == 400  # anthropic-version is required
    assert json.loads(data) == {
        "type": "error",
        "error": {
            "type": "invalid_request_error",
            "message": "anthropic-version: header is required",
        },
    }


# --- faults ----------------------------------------------------------------------------

OPENAI_FAULTS = [
    ("429", openai.RateLimitError),
    ("500", openai.InternalServerError),
    ("503", openai.InternalServerError),
    ("529", openai.InternalServerError),
    ("refuse", openai.APIConnectionError),
    ("cut", openai.APIConnectionError),
]
ANTHROPIC_FAULTS = [
    ("429", anthropic.RateLimitError),
    ("500", anthropic.InternalServerError),
    ("503", anthropic.ServiceUnavailableError),
    ("529", anthropic.OverloadedError),
    ("refuse", anthropic.APIConnectionError),
    ("cut", anthropic.APIConnectionError),
]


@pytest.mark.parametrize(("spec", "exc"), OPENAI_FAULTS)
async def test_openai_faults_raise_the_sdk_exception(
    oai: openai.AsyncOpenAI, mock: MockProvider, spec: str, exc: type[Exception]
) -> None:
    with pytest.raises(exc) as err:
        await oai.chat.completions.create(
            model="m",
            messages=HELLO,  # type: ignore[arg-type]
            extra_headers={"x-mock-fault": spec},
        )
    if isinstance(err.value, openai.APIStatusError):
        assert err.value.status_code == int(spec)
        assert err.value.response.json()["error"]["type"]
    assert mock.stats.faults == {spec: 1}
    # the next request is fine
    assert (await oai.chat.completions.create(model="m", messages=HELLO)).choices  # type: ignore[arg-type]


@pytest.mark.parametrize(("spec", "exc"), ANTHROPIC_FAULTS)
async def test_anthropic_faults_raise_the_sdk_exception(
    claude: anthropic.AsyncAnthropic, spec: str, exc: type[Exception]
) -> None:
    with pytest.raises(exc) as err:
        await claude.messages.create(
            model="c",
            max_tokens=5,
            messages=HELLO,  # type: ignore[arg-type]
            extra_headers={"x-mock-fault": spec},
        )
    if spec == "529":
        assert isinstance(err.value, anthropic.APIStatusError)
        assert err.value.response.json()["error"]["type"] == "overloaded_error"


async def test_429_carries_retry_after(mock: MockProvider) -> None:
    url = mock.openai_base_url + "/chat/completions"
    auth = {"Authorization": f"Bearer {KEY}"}
    body = {"model": "m", "messages": HELLO}
    status, headers, _ = await raw("POST", url, body, {**auth, "x-mock-fault": "429"})
    assert (status, headers["Retry-After"]) == (429, "1")
    _, headers, _ = await raw("POST", url, body, {**auth, "x-mock-fault": "429:retry-after=2.5"})
    assert headers["Retry-After"] == "2.5"
    status, _, data = await raw("POST", url, body, {**auth, "x-mock-fault": "bogus"})
    assert status == 400
    assert "bogus" in json.loads(data)["error"]["message"]


async def test_hang_until_the_client_times_out(mock: MockProvider) -> None:
    async with openai.AsyncOpenAI(
        base_url=mock.openai_base_url, api_key=KEY, max_retries=0, timeout=0.3
    ) as client:
        with pytest.raises(openai.APITimeoutError):
            await client.chat.completions.create(
                model="m",
                messages=HELLO,  # type: ignore[arg-type]
                extra_headers={"x-mock-fault": "hang"},
            )
    async with anthropic.AsyncAnthropic(
        base_url=mock.url, api_key=KEY, max_retries=0, timeout=0.3
    ) as c:
        with pytest.raises(anthropic.APITimeoutError):
            await c.messages.create(
                model="c",
                max_tokens=5,
                messages=HELLO,  # type: ignore[arg-type]
                extra_headers={"x-mock-fault": "hang"},
            )
    for _ in range(100):  # the server notices the clients left
        if mock.stats.in_flight == 0:
            break
        await asyncio.sleep(0.05)
    assert mock.stats.in_flight == 0


async def _drain(stream: Any, into: list[Any]) -> None:
    async for item in stream:
        into.append(item)


async def _anthropic_stream(client: anthropic.AsyncAnthropic, fault: str, into: list[str]) -> None:
    async with client.messages.stream(
        model="c",
        max_tokens=50,
        messages=HELLO,  # type: ignore[arg-type]
        extra_headers={"x-mock-fault": fault},
    ) as stream:
        async for event in stream:
            into.append(event.type)


async def test_openai_stream_cut_and_malformed(oai: openai.AsyncOpenAI) -> None:
    full = await oai.chat.completions.create(model="m", messages=HELLO, stream=True)  # type: ignore[arg-type]
    full_count = len([c async for c in full])
    for fault, exc, sent in [
        ("cut:2", openai.APIConnectionError, 2),
        ("malformed:4", json.JSONDecodeError, 4),
    ]:
        stream = await oai.chat.completions.create(
            model="m",
            messages=HELLO,  # type: ignore[arg-type]
            stream=True,
            extra_headers={"x-mock-fault": fault},
        )
        got: list[Any] = []
        with pytest.raises(exc):
            await _drain(stream, got)
        assert len(got) == sent < full_count


async def test_anthropic_stream_cut_and_malformed(claude: anthropic.AsyncAnthropic) -> None:
    events: list[str] = []
    # the SDK lets the transport's error through as it is (httpx2, under anthropic 2.x)
    with pytest.raises((anthropic.APIConnectionError, httpx2.RemoteProtocolError)):
        await _anthropic_stream(claude, "cut:5", events)
    assert events[0] == "message_start"
    assert "message_stop" not in events
    events = []
    with pytest.raises(json.JSONDecodeError):
        await _anthropic_stream(claude, "malformed:4", events)
    assert "message_stop" not in events


async def test_non_stream_malformed_body_is_not_json(mock: MockProvider) -> None:
    status, _, data = await raw(
        "POST",
        mock.openai_base_url + "/chat/completions",
        {"model": "m", "messages": HELLO},
        {"Authorization": f"Bearer {KEY}", "x-mock-fault": "malformed"},
    )
    assert status == 200
    with pytest.raises(json.JSONDecodeError):
        json.loads(data)


# --- fault rules, stats, admin ---------------------------------------------------------


async def test_fault_rules_next_n_and_stats(mock: MockProvider, oai: openai.AsyncOpenAI) -> None:
    mock.set_faults(FaultRule("503", count=2))
    for _ in range(2):
        with pytest.raises(openai.InternalServerError):
            await oai.chat.completions.create(model="m", messages=HELLO)  # type: ignore[arg-type]
    await oai.chat.completions.create(model="m", messages=HELLO)  # type: ignore[arg-type]
    await oai.embeddings.create(model="e", input="x")
    stats = mock.stats
    assert stats.requests == {"/v1/chat/completions": 3, "/v1/embeddings": 1}
    assert stats.faults == {"503": 2}
    assert stats.total == 4
    assert stats.in_flight == 0
    mock.reset()
    assert mock.stats.total == 0


async def test_fault_rate_is_seeded_and_roughly_honoured() -> None:
    config = MockProviderConfig(faults=(FaultRule("500", rate=0.3),), seed=7)
    outcomes = []
    for _ in range(2):
        async with run_mock_provider(config) as m:
            url = m.openai_base_url + "/embeddings"
            statuses = [
                (await raw("POST", url, {"model": "e", "input": "x"}))[0] for _ in range(60)
            ]
            outcomes.append(statuses)
            assert m.stats.faults["500"] == statuses.count(500)
    assert outcomes[0] == outcomes[1]  # same seed, same draws
    assert 5 <= outcomes[0].count(500) <= 35


async def test_admin_endpoints(mock: MockProvider) -> None:
    status, _, data = await raw(
        "POST", mock.url + "/_mock/faults", {"faults": [{"spec": "529", "count": 1}, "hang"]}
    )
    assert status == 200
    assert json.loads(data)["rules"] == [
        {"spec": "529", "rate": 1.0, "remaining": 1},
        {"spec": "hang", "rate": 1.0, "remaining": None},
    ]
    async with anthropic.AsyncAnthropic(base_url=mock.url, api_key=KEY, max_retries=0) as c:
        with pytest.raises(anthropic.OverloadedError):
            await c.messages.create(model="c", max_tokens=5, messages=HELLO)  # type: ignore[arg-type]
    status, _, _ = await raw("POST", mock.url + "/_mock/faults", {"faults": []})
    assert status == 200
    stats = json.loads((await raw("GET", mock.url + "/_mock/stats"))[2])
    assert stats["requests"] == {"/v1/messages": 1}
    assert stats["faults"] == {"529": 1}
    assert stats["rules"] == []
    bad = await raw("POST", mock.url + "/_mock/faults", {"faults": ["nope"]})
    assert bad[0] == 400
    reset = json.loads((await raw("POST", mock.url + "/_mock/reset"))[2])
    assert reset["total"] == 0


def test_fault_specs_parse_and_reject() -> None:
    assert parse_fault("429:retry-after=2").retry_after_s == 2.0
    assert parse_fault("429:3").retry_after_s == 3.0
    assert parse_fault("cut:3").after == 3
    assert parse_fault("stall:after=2").after == 2
    assert parse_fault("malformed").after is None
    assert parse_fault("529").status == 529
    for bad in ("teapot", "200", "cut:x", "hang:3", "refuse:after=1", "429:after=2"):
        with pytest.raises(ConfigError):
            parse_fault(bad)
    with pytest.raises(ConfigError):
        FaultRule("500", rate=1.5)


# --- timing (lower bounds only: a slow machine cannot make these fail) -----------------


async def test_latency_ttft_and_pace_are_at_least_as_configured(oai: openai.AsyncOpenAI) -> None:
    start = time.monotonic()
    stream = await oai.chat.completions.create(
        model="m",
        messages=HELLO,  # type: ignore[arg-type]
        stream=True,
        extra_headers={
            "x-mock-latency-ms": "100",
            "x-mock-ttft-ms": "150",
            "x-mock-tokens-per-s": "100",
            "x-mock-output-tokens": "11",
        },
    )
    headers_at = time.monotonic() - start
    first_at = None
    async for chunk in stream:
        if first_at is None and chunk.choices and chunk.choices[0].delta.content:
            first_at = time.monotonic() - start
    done_at = time.monotonic() - start
    assert headers_at >= 0.1
    assert first_at is not None
    assert first_at >= 0.25
    assert done_at >= 0.25 + 10 / 100


# --- the command -----------------------------------------------------------------------


def test_cli_serves_until_sigterm() -> None:
    proc = subprocess.Popen(
        [
            *(str(RAGPLANE), "mock-provider", "--port", "0", "--api-key", KEY),
            *("--fault", "503", "--fault-count", "1", "--output-tokens", "3"),
        ],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "NO_COLOR": "1"},
    )
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        match = re.search(r"listening on (http://\S+)", line)
        assert match, line
        client = openai.OpenAI(base_url=match[1] + "/v1", api_key=KEY, max_retries=0)
        with client, pytest.raises(openai.InternalServerError):
            client.chat.completions.create(model="m", messages=HELLO)  # type: ignore[arg-type]
        with openai.OpenAI(base_url=match[1] + "/v1", api_key=KEY, max_retries=0) as client:
            r = client.chat.completions.create(model="m", messages=HELLO)  # type: ignore[arg-type]
        assert r.usage is not None
        assert r.usage.completion_tokens == 3
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()


async def test_stall_trips_the_client_idle_timeout(mock: MockProvider) -> None:
    async with openai.AsyncOpenAI(
        base_url=mock.openai_base_url, api_key=KEY, max_retries=0, timeout=0.3
    ) as client:
        stream = await client.chat.completions.create(
            model="m",
            messages=HELLO,  # type: ignore[arg-type]
            stream=True,
            extra_headers={"x-mock-fault": "stall:2"},
        )
        got: list[Any] = []
        with pytest.raises(openai.APITimeoutError):
            await _drain(stream, got)
        assert len(got) == 2
        with pytest.raises(openai.APITimeoutError):
            await client.chat.completions.create(
                model="m",
                messages=HELLO,  # type: ignore[arg-type]
                extra_headers={"x-mock-fault": "stall"},
            )


async def test_header_none_skips_the_rules(mock: MockProvider, oai: openai.AsyncOpenAI) -> None:
    mock.set_faults("500")
    with pytest.raises(openai.InternalServerError):
        await oai.chat.completions.create(model="m", messages=HELLO)  # type: ignore[arg-type]
    ok = await oai.chat.completions.create(
        model="m",
        messages=HELLO,  # type: ignore[arg-type]
        extra_headers={"x-mock-fault": "none"},
    )
    assert ok.choices
    assert mock.stats.faults == {"500": 1}


async def test_stopping_releases_hanging_requests() -> None:
    async with aiohttp.ClientSession() as session:
        async with run_mock_provider() as m:
            pending = asyncio.ensure_future(
                session.post(
                    m.openai_base_url + "/chat/completions",
                    json={"model": "m", "messages": HELLO},
                    headers={"x-mock-fault": "hang"},
                )
            )
            while m.stats.in_flight == 0:  # noqa: ASYNC110 - the counter has no event
                await asyncio.sleep(0.01)
        # the server closed the connection instead of waiting for the shutdown timeout
        with pytest.raises(aiohttp.ServerDisconnectedError):
            await pending


async def test_bodies_of_the_wrong_shape_are_400_in_the_api_shape(mock: MockProvider) -> None:
    openai_auth = {"Authorization": f"Bearer {KEY}"}
    claude_auth = {"x-api-key": KEY, "anthropic-version": "2023-06-01"}
    cases = [
        ("/v1/chat/completions", openai_auth, {"model": "m"}),
        ("/v1/chat/completions", openai_auth, {"model": "m", "messages": ["hi"]}),
        ("/v1/chat/completions", openai_auth, [1, 2]),
        ("/v1/embeddings", openai_auth, {"model": "e", "input": [3.5]}),
        ("/v1/messages", claude_auth, {"model": "c", "messages": HELLO}),  # no max_tokens
        (
            "/v1/messages",
            claude_auth,
            {"model": "c", "max_tokens": 5, "messages": HELLO, "system": 7},
        ),
    ]
    for path, headers, body in cases:
        status, _, data = await raw("POST", mock.url + path, body, headers)
        assert status == 400, (path, body)
        error = json.loads(data)
        if path == "/v1/messages":
            assert error["type"] == "error"
            assert error["error"]["type"] == "invalid_request_error"
        else:
            assert error["error"]["type"] == "invalid_request_error"


async def test_unknown_routes_are_404_in_the_api_shape(mock: MockProvider) -> None:
    async with openai.AsyncOpenAI(
        base_url=mock.url + "/nowhere", api_key=KEY, max_retries=0
    ) as client:
        with pytest.raises(openai.NotFoundError):
            await client.chat.completions.create(model="m", messages=HELLO)  # type: ignore[arg-type]
    async with anthropic.AsyncAnthropic(
        base_url=mock.url + "/nowhere", api_key=KEY, max_retries=0
    ) as c:
        with pytest.raises(anthropic.NotFoundError) as err:
            await c.messages.create(model="c", max_tokens=5, messages=HELLO)  # type: ignore[arg-type]
    assert err.value.response.json()["error"]["type"] == "not_found_error"
