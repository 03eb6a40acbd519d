"""Anthropic Messages API → an Anthropic upstream: a pass-through.

Request: ``model`` rewritten; ``cache_control`` wherever the caller put it is untouched.
With ``prompt_cache`` on for the alias, a system prompt longer than
``prompt_cache_min_chars`` without a breakpoint of its own gets one (``ephemeral``) on
its last block — a string system prompt becomes one text block — unless the request
already uses all four breakpoints Anthropic allows.

Headers: ``x-api-key``, ``anthropic-version`` (the caller's if given, else 2023-06-01),
the caller's ``anthropic-beta``. The caller's headers reach the adapter as the optional
``headers`` argument of ``build_request``; the adapter only reads them.

Stream: every event is forwarded as it came; only ``message_start`` and
``message_delta`` are parsed, for usage.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ragplane.gateway.apierrors import stream_error_frame, stream_upstream_error
from ragplane.gateway.providers._common import (
    StreamState,
    anthropic_headers,
    anthropic_url,
    dumps,
    loads_object,
    usage_from_anthropic,
)
from ragplane.gateway.sse import encode_event
from ragplane.gateway.types import Api, Route, SseEvent, UpstreamRequest, Usage

__all__ = [
    "MAX_CACHE_BREAKPOINTS",
    "AnthropicToAnthropic",
    "AnthropicToAnthropicStream",
    "with_cache_breakpoint",
]

MAX_CACHE_BREAKPOINTS = 4


def _count_breakpoints(blocks: Any) -> int:
    if not isinstance(blocks, list):
        return 0
    return sum(1 for b in blocks if isinstance(b, dict) and b.get("cache_control") is not None)


def with_cache_breakpoint(body: dict[str, Any], min_chars: int) -> dict[str, Any]:
    """``body`` with an ephemeral breakpoint after a long system prompt (a new dict; the
    caller's is not changed), or ``body`` itself when none is due."""
    system = body.get("system")
    if isinstance(system, str):
        if len(system) <= min_chars:
            return body
        blocks: list[Any] = [{"type": "text", "text": system}]
    elif isinstance(system, list) and system:
        if _count_breakpoints(system):
            return body
        size = sum(
            len(b.get("text", ""))
            for b in system
            if isinstance(b, dict) and b.get("type") == "text"
        )
        if size <= min_chars or not isinstance(system[-1], dict):
            return body
        blocks = list(system)
    else:
        return body
    used = _count_breakpoints(body.get("tools"))
    for message in body.get("messages") or ():
        if isinstance(message, dict):
            used += _count_breakpoints(message.get("content"))
    if used >= MAX_CACHE_BREAKPOINTS:
        return body
    blocks[-1] = {**blocks[-1], "cache_control": {"type": "ephemeral"}}
    return {**body, "system": blocks}


class AnthropicToAnthropic:
    """Pass-through adapter; stateless, one instance serves every route."""

    api: Api = "anthropic"
    upstream_api: Api = "anthropic"
    passes_through: bool = True

    def build_request(
        self, body: dict[str, Any], route: Route, *, headers: Mapping[str, str] | None = None
    ) -> UpstreamRequest:
        out = {**body, "model": route.model.upstream}
        if route.policy.prompt_cache:
            out = with_cache_breakpoint(out, route.policy.prompt_cache_min_chars)
        return UpstreamRequest(
            method="POST",
            url=anthropic_url(route),
            headers=anthropic_headers(route, headers),
            body=dumps(out),
            stream=body.get("stream") is True,
        )

    def parse_response(self, body: bytes, route: Route) -> tuple[dict[str, Any], Usage]:
        message = loads_object(body, route, "a message")
        if message.get("type") == "error":
            raise stream_upstream_error(
                "anthropic", message, provider=route.provider_name, route=route.name
            )
        usage = message.get("usage")
        return message, usage_from_anthropic(usage) if isinstance(usage, dict) else Usage()

    def stream_translator(
        self, route: Route, *, include_usage: bool = True
    ) -> AnthropicToAnthropicStream:
        return AnthropicToAnthropicStream(route)


class AnthropicToAnthropicStream(StreamState):
    """Forwards events as they came; reads usage (Anthropic streams always carry it)."""

    __slots__ = ("_route",)

    def __init__(self, route: Route) -> None:
        super().__init__()
        self._route = route

    def feed(self, event: SseEvent) -> list[bytes]:
        # every event is parsed (a few µs): a malformed one must end the caller's stream
        # with an error event, not reach the caller's SDK as bytes it cannot read
        payload = loads_object(event.data, self._route, "a stream event")
        name = event.event
        if name is None:  # not sent by Anthropic itself; some proxies drop the event line
            name = str(payload.get("type"))
        if name == "message_start":
            message = payload.get("message")
            usage = message.get("usage") if isinstance(message, dict) else None
            if isinstance(usage, dict):
                self._usage = usage_from_anthropic(usage)
        elif name == "message_delta":
            usage = payload.get("usage")
            if isinstance(usage, dict):
                self._usage = usage_from_anthropic(usage, self._usage)
        elif name == "message_stop":
            self._finished = True
        elif name == "error":
            raise stream_upstream_error(
                "anthropic", payload, provider=self._route.provider_name, route=self._route.name
            )
        return [encode_event(event.data, name)]

    def error_frames(self, code: str, message: str, request_id: str) -> list[bytes]:
        return [stream_error_frame("anthropic", code, message, request_id)]
