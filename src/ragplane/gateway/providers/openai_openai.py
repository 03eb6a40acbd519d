"""OpenAI Chat Completions API → an OpenAI-compatible upstream (OpenAI, Azure, vLLM,
Ollama, llama.cpp server, the in-process local providers): nearly a pass-through.

Request: the caller's body with ``model`` replaced by the route's upstream id and, for
streams, ``stream_options.include_usage`` forced on (the ledger needs usage); every
other field (tools, tool_choice, response_format, ...) is untouched.

Stream: each upstream event is forwarded as the same data, without parsing, unless it
may carry usage (a cheap regex on ``"usage": {``) or an error. The usage-only chunk the
gateway asked for is dropped when the caller did not ask for usage itself. The response
``model`` is the upstream's (the model that actually served the call).

Auth is ``Authorization: Bearer <api_key>`` when the provider has a key, then the
provider's ``headers`` (Azure OpenAI keys: leave ``api_key`` unset and put ``api-key`` in
``headers``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from ragplane.gateway.apierrors import stream_error_frame, stream_upstream_error
from ragplane.gateway.providers._common import (
    StreamState,
    dumps,
    loads_object,
    openai_headers,
    openai_url,
    usage_from_openai,
)
from ragplane.gateway.sse import encode_event
from ragplane.gateway.types import Api, Route, SseEvent, UpstreamRequest, Usage

__all__ = ["DONE_FRAME", "OpenAIToOpenAI", "OpenAIToOpenAIStream"]

DONE_FRAME = b"data: [DONE]\n\n"
_USAGE = re.compile(r'"usage"\s*:\s*\{')  # a JSON key: a string value would be escaped
_ERROR = re.compile(r'^\{\s*"(?:error"|object"\s*:\s*"error")')


def _with_usage_requested(body: dict[str, Any]) -> dict[str, Any]:
    options = body.get("stream_options")
    if isinstance(options, dict):
        if options.get("include_usage") is True:
            return body
        return {**body, "stream_options": {**options, "include_usage": True}}
    return {**body, "stream_options": {"include_usage": True}}


class OpenAIToOpenAI:
    """Pass-through adapter; stateless, one instance serves every route."""

    api: Api = "openai"
    upstream_api: Api = "openai"
    passes_through: bool = True

    def build_request(
        self, body: dict[str, Any], route: Route, *, headers: Mapping[str, str] | None = None
    ) -> UpstreamRequest:
        out = {**body, "model": route.model.upstream}
        stream = body.get("stream") is True
        if stream:
            out = _with_usage_requested(out)
        return UpstreamRequest(
            method="POST",
            url=openai_url(route, "/chat/completions"),
            headers=openai_headers(route),
            body=dumps(out),
            stream=stream,
        )

    def parse_response(self, body: bytes, route: Route) -> tuple[dict[str, Any], Usage]:
        completion = loads_object(body, route, "a chat completion")
        if "error" in completion and "choices" not in completion:
            raise stream_upstream_error(
                "openai", completion, provider=route.provider_name, route=route.name
            )
        usage = completion.get("usage")
        return completion, usage_from_openai(usage) if isinstance(usage, dict) else Usage()

    def stream_translator(self, route: Route, *, include_usage: bool) -> OpenAIToOpenAIStream:
        return OpenAIToOpenAIStream(route, include_usage=include_usage)


class OpenAIToOpenAIStream(StreamState):
    """Forwards chunks as they came; reads usage; drops the usage chunk if unwanted."""

    __slots__ = ("_include_usage", "_route")

    def __init__(self, route: Route, *, include_usage: bool) -> None:
        super().__init__()
        self._route = route
        self._include_usage = include_usage

    def feed(self, event: SseEvent) -> list[bytes]:
        data = event.data
        if data == "[DONE]":
            self._finished = True
            return [DONE_FRAME]
        # every chunk is parsed (a few µs): a malformed one must end the caller's stream
        # with an error event, not reach the caller's SDK as bytes it cannot read
        chunk = loads_object(data, self._route, "a stream chunk")
        if _USAGE.search(data) is None:
            if event.event == "error" or _ERROR.match(data):
                self._raise(data)
            return [encode_event(data)]
        usage = chunk.get("usage")
        if not isinstance(usage, dict):
            return [encode_event(data)]
        self._usage = usage_from_openai(usage)
        if self._include_usage:
            return [encode_event(data)]
        if not chunk.get("choices"):
            return []  # the usage chunk only the gateway asked for
        del chunk["usage"]  # usage riding on a content chunk (some servers)
        return [encode_event(dumps(chunk))]

    def _raise(self, data: str) -> None:
        payload = loads_object(data, self._route, "a stream error event")
        raise stream_upstream_error(
            "openai", payload, provider=self._route.provider_name, route=self._route.name
        )

    def error_frames(self, code: str, message: str, request_id: str) -> list[bytes]:
        return [stream_error_frame("openai", code, message, request_id)]
