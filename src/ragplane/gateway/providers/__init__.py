"""Provider adapters (pure translation, one file per caller API x provider) and local providers.

``adapter_for(api, route)`` is the router's one lookup: the caller's API and the route's
upstream API pick one of four stateless chat adapters; ``endpoint="embeddings"`` picks
the embeddings adapter (OpenAI-compatible upstreams only).
"""

from __future__ import annotations

from typing import Any, Literal

from ragplane.errors import BadRequest
from ragplane.gateway.providers.anthropic_anthropic import AnthropicToAnthropic
from ragplane.gateway.providers.anthropic_openai import AnthropicToOpenAI
from ragplane.gateway.providers.embeddings_openai import EmbeddingsToOpenAI
from ragplane.gateway.providers.openai_anthropic import OpenAIToAnthropic
from ragplane.gateway.providers.openai_openai import OpenAIToOpenAI
from ragplane.gateway.types import Api, ChatAdapter, Route

__all__ = [
    "AnthropicToAnthropic",
    "AnthropicToOpenAI",
    "EmbeddingsToOpenAI",
    "OpenAIToAnthropic",
    "OpenAIToOpenAI",
    "adapter_for",
    "caller_wants_usage",
    "embeddings_adapter",
]

_CHAT: dict[tuple[Api, Api], ChatAdapter] = {
    ("openai", "openai"): OpenAIToOpenAI(),
    ("openai", "anthropic"): OpenAIToAnthropic(),
    ("anthropic", "anthropic"): AnthropicToAnthropic(),
    ("anthropic", "openai"): AnthropicToOpenAI(),
}
_EMBEDDINGS = EmbeddingsToOpenAI()


def adapter_for(
    api: Api, route: Route, *, endpoint: Literal["chat", "embeddings"] = "chat"
) -> ChatAdapter:
    """The adapter translating ``api`` (what the caller speaks) for ``route``'s provider."""
    if endpoint == "embeddings":
        if route.upstream_api != "openai":
            raise BadRequest(f"{route.provider_name} does not serve embeddings")
        return _EMBEDDINGS
    return _CHAT[api, route.upstream_api]


def embeddings_adapter(route: Route) -> ChatAdapter:
    """The ``/v1/embeddings`` adapter for ``route`` (OpenAI-compatible upstreams only)."""
    return adapter_for("openai", route, endpoint="embeddings")


def caller_wants_usage(api: Api, body: dict[str, Any]) -> bool:
    """Whether the caller's stream must carry usage: OpenAI only when it set
    ``stream_options.include_usage``; Anthropic streams always carry it."""
    if api == "anthropic":
        return True
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True
