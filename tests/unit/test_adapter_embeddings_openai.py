"""/v1/embeddings → OpenAI-compatible upstream: model rewritten, usage as input tokens."""

from __future__ import annotations

import orjson
import pytest
from openai.types import CreateEmbeddingResponse

from ragplane.errors import BadRequest, UpstreamError, UpstreamProtocolError
from ragplane.gateway.providers import EmbeddingsToOpenAI, adapter_for, embeddings_adapter
from ragplane.gateway.types import Usage
from tests.unit.adapter_support import make_route, openai_sdk

ADAPTER = EmbeddingsToOpenAI()
ROUTE = make_route(upstream="text-embedding-3-small")
BODY = {
    "model": "kb-embed",
    "input": ["alpha", "beta"],
    "encoding_format": "float",
    "dimensions": 8,
}
RESPONSE = {
    "object": "list",
    "data": [
        {"object": "embedding", "index": 0, "embedding": [0.0023064255, -0.009327292]},
        {"object": "embedding", "index": 1, "embedding": [0.0152, 0.0071]},
    ],
    "model": "text-embedding-3-small",
    "usage": {"prompt_tokens": 8, "total_tokens": 8},
}


def test_lookup() -> None:
    assert embeddings_adapter(ROUTE) is adapter_for("openai", ROUTE, endpoint="embeddings")
    assert type(embeddings_adapter(ROUTE)) is EmbeddingsToOpenAI
    with pytest.raises(BadRequest, match="does not serve embeddings"):
        embeddings_adapter(make_route("anthropic"))


def test_request() -> None:
    request = ADAPTER.build_request(BODY, ROUTE)
    assert orjson.loads(request.body) == {**BODY, "model": "text-embedding-3-small"}
    assert request.url == "https://api.example.test/v1/embeddings"
    assert request.headers["authorization"] == "Bearer sk-test-key"
    assert not request.stream
    local = make_route("local-extractive", base_url=None, api_key=None)
    assert ADAPTER.build_request(BODY, local).url == "local:/v1/embeddings"


def test_response_and_usage() -> None:
    result, usage = ADAPTER.parse_response(orjson.dumps(RESPONSE), ROUTE)
    assert usage == Usage(input_tokens=8)
    assert result == RESPONSE
    assert ADAPTER.passes_through  # so the caller may get the provider's bytes as they came
    CreateEmbeddingResponse.model_validate(result)
    sdk = openai_sdk(orjson.dumps(result)).embeddings.create(model="kb-embed", input=["a", "b"])
    assert len(sdk.data) == 2
    no_usage = {k: v for k, v in RESPONSE.items() if k != "usage"}
    assert ADAPTER.parse_response(orjson.dumps(no_usage), ROUTE)[1] == Usage()


def test_errors() -> None:
    with pytest.raises(UpstreamProtocolError):
        ADAPTER.parse_response(b"<html>", ROUTE)
    with pytest.raises(UpstreamError):
        ADAPTER.parse_response(b'{"error": "model not loaded"}', ROUTE)
    with pytest.raises(BadRequest):
        ADAPTER.stream_translator(ROUTE, include_usage=False)
