"""``/v1/embeddings`` → an OpenAI-compatible upstream: ``model`` rewritten, the rest as
sent; usage is ``prompt_tokens``, billed as input. Embeddings never stream."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ragplane.errors import BadRequest
from ragplane.gateway.apierrors import stream_upstream_error
from ragplane.gateway.providers._common import dumps, loads_object, openai_headers, openai_url
from ragplane.gateway.types import Api, Route, StreamTranslator, UpstreamRequest, Usage

__all__ = ["EmbeddingsToOpenAI"]


class EmbeddingsToOpenAI:
    """Stateless; one instance serves every route. Has the ``ChatAdapter`` shape so the
    router's attempt loop serves embeddings too; ``stream_translator`` refuses."""

    api: Api = "openai"
    upstream_api: Api = "openai"
    passes_through: bool = True

    def build_request(
        self, body: dict[str, Any], route: Route, *, headers: Mapping[str, str] | None = None
    ) -> UpstreamRequest:
        return UpstreamRequest(
            method="POST",
            url=openai_url(route, "/embeddings"),
            headers=openai_headers(route),
            body=dumps({**body, "model": route.model.upstream}),
            stream=False,
        )

    def parse_response(self, body: bytes, route: Route) -> tuple[dict[str, Any], Usage]:
        result = loads_object(body, route, "an embeddings response")
        if "error" in result and "data" not in result:
            raise stream_upstream_error(
                "openai", result, provider=route.provider_name, route=route.name
            )
        usage = result.get("usage")
        tokens = usage.get("prompt_tokens") if isinstance(usage, dict) else None
        return result, Usage(input_tokens=tokens if isinstance(tokens, int) else 0)

    def stream_translator(self, route: Route, *, include_usage: bool) -> StreamTranslator:
        raise BadRequest("embeddings do not stream")
