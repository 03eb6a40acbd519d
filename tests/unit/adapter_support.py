"""Routes, SSE helpers and SDK validation shared by the provider adapter tests."""

from __future__ import annotations

from typing import Any

from ragplane.config import AliasSettings, ModelSettings, ProviderSettings, RouteSettings
from ragplane.gateway.sse import SseDecoder
from ragplane.gateway.types import Route, SseEvent, StreamTranslator

__all__ = [
    "anthropic_sdk",
    "frames_to_events",
    "make_route",
    "openai_sdk",
    "run_stream",
    "sse_bytes",
]


def make_route(
    provider_type: str = "openai",
    *,
    base_url: str | None = "https://api.example.test/v1",
    api_key: str | None = "sk-test-key",
    upstream: str = "up-model",
    max_output_tokens: int = 1024,
    prompt_cache: bool = False,
    prompt_cache_min_chars: int = 4096,
    headers: dict[str, str] | None = None,
    prices: dict[str, float] | None = None,
) -> Route:
    provider = ProviderSettings.model_validate(
        {
            "type": provider_type,
            "base_url": base_url,
            "api_key": api_key,
            "headers": headers or {},
        }
    )
    model = ModelSettings(
        provider="p", upstream=upstream, max_output_tokens=max_output_tokens, **(prices or {})
    )
    policy = AliasSettings(
        routes=(RouteSettings(model="m"),),
        prompt_cache=prompt_cache,
        prompt_cache_min_chars=prompt_cache_min_chars,
    )
    return Route(
        alias="alias",
        name="alias/m",
        model_key="m",
        model=model,
        provider_name="p",
        provider=provider,
        policy=policy,
    )


def sse_bytes(events: list[tuple[str | None, Any]]) -> bytes:
    """An upstream stream from (event name, JSON-able data or raw str) pairs."""
    import orjson

    out = b""
    for name, data in events:
        raw = data.encode() if isinstance(data, str) else orjson.dumps(data)
        if name is not None:
            out += b"event: " + name.encode() + b"\n"
        out += b"data: " + raw + b"\n\n"
    return out


def run_stream(translator: StreamTranslator, raw: bytes, *, split: int = 7) -> bytes:
    """Feed an upstream stream through a decoder (in ``split``-byte pieces) and a translator."""
    decoder = SseDecoder()
    out = b""
    for i in range(0, len(raw), split):
        for event in decoder.feed(raw[i : i + split]):
            out += b"".join(translator.feed(event))
    for event in decoder.flush():
        out += b"".join(translator.feed(event))
    return out


def frames_to_events(raw: bytes) -> list[SseEvent]:
    decoder = SseDecoder()
    return decoder.feed(raw) + decoder.flush()


def _responder(status: int, body: bytes, headers: dict[str, str] | None, stream: bool) -> Any:
    import httpx2

    def respond(request: httpx2.Request) -> httpx2.Response:
        kind = "text/event-stream" if stream else "application/json"
        return httpx2.Response(
            status, headers={"content-type": kind, **(headers or {})}, content=body
        )

    return httpx2.Client(transport=httpx2.MockTransport(respond))


def openai_sdk(
    body: bytes, *, status: int = 200, headers: dict[str, str] | None = None, stream: bool = False
) -> Any:
    """The official OpenAI client reading ``body`` as the gateway's answer."""
    import openai

    return openai.OpenAI(
        api_key="sk-caller",
        base_url="http://gateway.test/v1",
        http_client=_responder(status, body, headers, stream),
        max_retries=0,
    )


def anthropic_sdk(
    body: bytes, *, status: int = 200, headers: dict[str, str] | None = None, stream: bool = False
) -> Any:
    """The official Anthropic client reading ``body`` as the gateway's answer."""
    import anthropic

    return anthropic.Anthropic(
        api_key="sk-ant-caller",
        base_url="http://gateway.test",
        http_client=_responder(status, body, headers, stream),
        max_retries=0,
    )
