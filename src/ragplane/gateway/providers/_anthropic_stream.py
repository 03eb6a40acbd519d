"""Writes the Anthropic stream event sequence for a stream translated from another API::

message_start (content_block_start content_block_delta* content_block_stop)*
message_delta message_stop
"""

from __future__ import annotations

from typing import Any

from ragplane.gateway.apierrors import stream_error_frame
from ragplane.gateway.providers._common import dumps
from ragplane.gateway.sse import encode_event

__all__ = ["AnthropicEventWriter"]


def _event(name: str, payload: dict[str, Any]) -> bytes:
    return encode_event(dumps(payload), name)


class AnthropicEventWriter:
    """One per stream; keeps which content block is open and the next block index."""

    __slots__ = ("_id", "_kind", "_model", "_next", "_open", "_started")

    def __init__(self, model: str) -> None:
        self._id = "msg_gateway"
        self._model = model
        self._started = False
        self._open: int | None = None
        self._kind: str | None = None
        self._next = 0

    @property
    def current_index(self) -> int:
        """The index of the block opened last."""
        return self._next - 1

    def start(self, message_id: Any, model: Any) -> list[bytes]:
        """``message_start`` the first time, nothing after."""
        if self._started:
            return []
        self._started = True
        if isinstance(message_id, str) and message_id:
            self._id = message_id
        if isinstance(model, str) and model:
            self._model = model
        message: dict[str, Any] = {
            "id": self._id,
            "type": "message",
            "role": "assistant",
            "model": self._model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": 0, "output_tokens": 0},
        }
        return [_event("message_start", {"type": "message_start", "message": message})]

    def close_block(self) -> list[bytes]:
        if self._open is None:
            return []
        index, self._open, self._kind = self._open, None, None
        return [_event("content_block_stop", {"type": "content_block_stop", "index": index})]

    def _open_block(self, kind: str, block: dict[str, Any]) -> list[bytes]:
        frames = self.close_block()
        self._open, self._kind = self._next, kind
        self._next += 1
        payload = {"type": "content_block_start", "index": self._open, "content_block": block}
        frames.append(_event("content_block_start", payload))
        return frames

    def text(self, text: str) -> list[bytes]:
        frames = (
            [] if self._kind == "text" else self._open_block("text", {"type": "text", "text": ""})
        )
        delta = {
            "type": "content_block_delta",
            "index": self._open,
            "delta": {"type": "text_delta", "text": text},
        }
        frames.append(_event("content_block_delta", delta))
        return frames

    def open_tool(self, tool_id: Any, name: Any) -> list[bytes]:
        block = {"type": "tool_use", "id": tool_id, "name": name, "input": {}}
        return self._open_block("tool_use", block)

    @staticmethod
    def tool_arguments(index: int, partial_json: str) -> bytes:
        delta = {
            "type": "content_block_delta",
            "index": index,
            "delta": {"type": "input_json_delta", "partial_json": partial_json},
        }
        return _event("content_block_delta", delta)

    @staticmethod
    def message_delta(stop_reason: str, usage: dict[str, Any]) -> bytes:
        payload = {
            "type": "message_delta",
            "delta": {"stop_reason": stop_reason, "stop_sequence": None},
            "usage": usage,
        }
        return _event("message_delta", payload)

    @staticmethod
    def message_stop() -> bytes:
        return _event("message_stop", {"type": "message_stop"})

    @staticmethod
    def error_frames(code: str, message: str, request_id: str) -> list[bytes]:
        return [stream_error_frame("anthropic", code, message, request_id)]
