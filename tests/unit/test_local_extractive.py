"""The no-model provider: sentence selection, citation markers, verbatim quotes, budgets,
and its OpenAI wire output checked with the official SDK's types."""

from __future__ import annotations

import re
from typing import Any

import orjson
import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from ragplane.gateway.providers.local_extractive import (
    NOT_FOUND,
    LocalExtractiveTransport,
    approx_tokens,
    compose_answer,
    parse_passages,
)
from ragplane.gateway.types import UpstreamRequest

SOURCES = """Answer only from the sources below and cite them as [n].

Sources:
[1] Installing packages
Use pip to install packages from the Python Package Index. The installer resolves
dependencies before it downloads anything. Wheels are preferred over source archives.

[2] Virtual environments
The venv module creates lightweight virtual environments. Each virtual environment has
its own Python binary and its own set of installed packages. Activate it before running pip.

[3] Bananas
Bananas are yellow when they are ripe. They grow in tropical climates around the world.
"""


def chat(question: str, system: str = SOURCES) -> list[dict[str, Any]]:
    return [{"role": "system", "content": system}, {"role": "user", "content": question}]


def cited(text: str) -> list[tuple[str, str]]:
    """(sentence, marker) pairs of an answer."""
    return re.findall(r"\s*(.+?) (\[\d+\])", text)


def test_passages_and_question_are_parsed() -> None:
    passages, question = parse_passages(chat("How do I create a virtual environment?"))
    assert [(p.marker, p.title) for p in passages] == [
        ("[1]", "Installing packages"),
        ("[2]", "Virtual environments"),
        ("[3]", "Bananas"),
    ]
    assert passages[2].text == (
        "Bananas are yellow when they are ripe. They grow in tropical climates around the world."
    )
    assert question == "How do I create a virtual environment?"


def test_the_relevant_sentences_are_picked_and_cited_from_their_passage() -> None:
    answer = compose_answer(chat("How do I create a virtual environment?"), 256)
    assert answer.finish_reason == "stop"
    pairs = cited(answer.text)
    assert ("The venv module creates lightweight virtual environments.", "[2]") in pairs
    assert all(marker != "[3]" for _, marker in pairs)  # bananas are not about venvs
    passages = {p.marker: p.text for p in parse_passages(chat("x"))[0]}
    for sentence, marker in pairs:
        assert sentence in passages[marker]  # verbatim, from the passage it cites
    assert answer.citations == tuple(marker for _, marker in pairs)


def test_sentences_keep_prompt_order() -> None:
    answer = compose_answer(chat("Which packages does pip install, and which environment?"), 512)
    positions = [SOURCES.index(sentence) for sentence, _ in cited(answer.text)]
    assert len(positions) >= 2
    assert positions == sorted(positions)


def test_a_sentence_spanning_lines_is_quoted_verbatim() -> None:
    answer = compose_answer(chat("What does the installer resolve before downloading?"), 256)
    assert "The installer resolves\ndependencies before it downloads anything. [1]" in answer.text


def test_nothing_relevant_gives_the_honest_answer() -> None:
    answer = compose_answer(chat("What is the capital of France?"), 256)
    assert answer.text == NOT_FOUND
    assert answer.citations == ()


def test_no_passages_gives_the_honest_answer() -> None:
    answer = compose_answer([{"role": "user", "content": "How do I install pip packages?"}], 256)
    assert answer.text == NOT_FOUND


def test_max_tokens_bounds_the_answer() -> None:
    question = "How do virtual environments and pip install packages?"
    full = compose_answer(chat(question), 512)
    assert len(full.citations) >= 2
    budget = approx_tokens(full.text) - 1
    bounded = compose_answer(chat(question), budget)
    assert approx_tokens(bounded.text) <= budget
    assert 1 <= len(bounded.citations) < len(full.citations)
    tiny = compose_answer(chat(question), 3)
    assert tiny.finish_reason == "length"
    assert approx_tokens(tiny.text) <= 3
    assert tiny.text
    assert any(tiny.text in p.text for p in parse_passages(chat(question))[0])


@pytest.mark.parametrize(
    "messages",
    [
        # everything in one user message, question after a label
        [
            {
                "role": "user",
                "content": SOURCES + "\nQuestion: How do I create a virtual environment?",
            }
        ],
        # question first, context after
        [
            {
                "role": "user",
                "content": "How do I create a virtual environment?\n\nContext:\n"
                + SOURCES.split("Sources:\n", 1)[1],
            }
        ],
        # markers only, text on the marker line, content as parts
        [
            {
                "role": "system",
                "content": [
                    {
                        "type": "text",
                        "text": "[7] The venv module creates lightweight virtual "
                        "environments.\n[8] Bananas are yellow when they are ripe.",
                    }
                ],
            },
            {"role": "user", "content": "earlier question"},
            {"role": "assistant", "content": "earlier answer"},
            {
                "role": "user",
                "content": [{"type": "text", "text": "How to create a venv environment?"}],
            },
        ],
    ],
    ids=["question-label", "question-first", "parts-and-history"],
)
def test_prompt_layouts(messages: list[dict[str, Any]]) -> None:
    answer = compose_answer(messages, 256)
    assert "The venv module creates lightweight virtual environments." in answer.text
    assert "Bananas" not in answer.text


def test_deterministic() -> None:
    messages = chat("How do I create a virtual environment?")
    assert len({compose_answer(messages, 256) for _ in range(5)}) == 1


def request(body: dict[str, Any]) -> UpstreamRequest:
    return UpstreamRequest(
        "POST", "local:/v1/chat/completions", {}, orjson.dumps(body), bool(body.get("stream"))
    )


async def call(body: dict[str, Any]) -> tuple[int, dict[str, str], bytes]:
    transport = LocalExtractiveTransport()
    response = await transport.send(request(body), connect_s=1, ttft_s=1)
    data = await response.read()
    await response.aclose()
    return response.status, dict(response.headers), data


async def test_non_stream_is_an_openai_chat_completion() -> None:
    body = {"model": "local-extractive", "messages": chat("How do I create a venv?")}
    status, headers, data = await call(body)
    assert status == 200
    assert headers["content-type"] == "application/json"
    completion = ChatCompletion.model_validate_json(data)
    assert completion.model == "local-extractive"
    assert completion.choices[0].finish_reason == "stop"
    content = completion.choices[0].message.content
    assert content == compose_answer(body["messages"], 256).text
    assert completion.usage is not None
    assert completion.usage.completion_tokens == approx_tokens(content)
    assert completion.usage.prompt_tokens == approx_tokens(SOURCES) + approx_tokens(
        "How do I create a venv?"
    )
    assert completion.usage.total_tokens == (
        completion.usage.prompt_tokens + completion.usage.completion_tokens
    )


def sse_payloads(data: bytes) -> list[str]:
    frames = data.decode().split("\n\n")
    assert frames[-1] == ""
    assert all(frame.startswith("data: ") for frame in frames[:-1])
    return [frame.removeprefix("data: ") for frame in frames[:-1]]


@pytest.mark.parametrize("include_usage", [True, False])
async def test_stream_reassembles_to_the_non_stream_answer(include_usage: bool) -> None:
    messages = chat("How do I create a virtual environment?")
    body: dict[str, Any] = {"model": "m", "messages": messages, "stream": True}
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    status, headers, data = await call(body)
    assert status == 200
    assert headers["content-type"] == "text/event-stream"
    payloads = sse_payloads(data)
    assert payloads[-1] == "[DONE]"
    chunks = [ChatCompletionChunk.model_validate_json(p) for p in payloads[:-1]]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len({c.id for c in chunks}) == 1
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    _, _, whole = await call({"model": "m", "messages": messages})
    non_stream = ChatCompletion.model_validate_json(whole)
    assert text == non_stream.choices[0].message.content
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert [c.choices[0].finish_reason for c in finals] == ["stop"]
    usage_chunks = [c for c in chunks if c.usage is not None]
    if include_usage:
        assert chunks[-1].choices == []
        assert usage_chunks == [chunks[-1]]
        assert chunks[-1].usage == non_stream.usage
    else:
        assert usage_chunks == []


async def test_stream_with_length_finish() -> None:
    body = {"model": "m", "messages": chat("How do I create a venv?"), "stream": True}
    body["max_tokens"] = 2
    _, _, data = await call(body)
    chunks = [ChatCompletionChunk.model_validate_json(p) for p in sse_payloads(data)[:-1]]
    assert chunks[-1].choices[0].finish_reason == "length"


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"not json", 400),
        (b"[]", 400),
        (b'{"messages": []}', 400),
        (b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}', 400),
    ],
)
async def test_invalid_bodies_are_400s_in_openai_shape(raw: bytes, status: int) -> None:
    transport = LocalExtractiveTransport()
    req = UpstreamRequest("POST", "local:/v1/chat/completions", {}, raw, False)
    response = await transport.send(req, connect_s=1, ttft_s=1)
    assert response.status == status
    assert set(orjson.loads(await response.read())["error"]) >= {"message", "type"}


async def test_other_paths_are_404() -> None:
    transport = LocalExtractiveTransport()
    req = UpstreamRequest("POST", "local:/v1/embeddings", {}, b"{}", False)
    response = await transport.send(req, connect_s=1, ttft_s=1)
    assert response.status == 404
