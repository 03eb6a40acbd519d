"""Writes OpenAI ``chat.completion.chunk`` frames for a stream translated from another API."""

from __future__ import annotations

import time
from typing import Any

from ragplane.gateway.apierrors import stream_error_frame
from ragplane.gateway.providers._common import dumps
from ragplane.gateway.sse import encode_event

__all__ = ["OpenAIChunkWriter"]


class OpenAIChunkWriter:
    """One per stream: every chunk repeats the stream's id, created time and model."""

    __slots__ = ("_created", "_id", "_model")

    def __init__(self, model: str) -> None:
        self._id = "chatcmpl-gateway"
        self._model = model
        self._created = int(time.time())

    def start(self, message_id: Any, model: Any) -> None:
        if isinstance(message_id, str) and message_id:
            self._id = message_id
        if isinstance(model, str) and model:
            self._model = model

    def _frame(self, choices: list[dict[str, Any]], **extra: Any) -> bytes:
        chunk = {
            "id": self._id,
            "object": "chat.completion.chunk",
            "created": self._created,
            "model": self._model,
            "choices": choices,
            **extra,
        }
        return encode_event(dumps(chunk))

    def chunk(self, delta: dict[str, Any], *, finish_reason: str | None = None) -> bytes:
        return self._frame(
            [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]
        )

    def usage_chunk(self, usage: dict[str, Any]) -> bytes:
        return self._frame([], usage=usage)

    @staticmethod
    def done() -> bytes:
        return b"data: [DONE]\n\n"

    @staticmethod
    def error_frames(code: str, message: str, request_id: str) -> list[bytes]:
        return [stream_error_frame("openai", code, message, request_id)]
