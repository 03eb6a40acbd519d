"""RemoteEmbedder against an OpenAI-compatible /v1/embeddings served by httpx.MockTransport."""

from __future__ import annotations

import json
import zlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np
import pytest

from ragplane.errors import EmbeddingError
from ragplane.knowledge.embedder import RemoteEmbedder
from ragplane.knowledge.types import Embedder

BASE_URL = "http://gateway.test/v1"
DIMS = 8


def vector_for(text: str, dims: int = DIMS) -> list[float]:
    """A deterministic, not normalised vector per text (so normalisation is visible)."""
    rng = np.random.default_rng(zlib.crc32(text.encode()))
    return [float(x) for x in rng.normal(size=dims) * 3.0]


@dataclass
class FakeGateway:
    """Speaks the OpenAI embeddings wire format; records every request."""

    dims: int = DIMS
    reverse: bool = True
    requests: list[httpx.Request] = field(default_factory=list)
    respond: Callable[[httpx.Request], httpx.Response] | None = None

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if self.respond is not None:
            return self.respond(request)
        body = json.loads(request.content)
        inputs = body["input"]
        data = [
            {"object": "embedding", "index": i, "embedding": vector_for(text, self.dims)}
            for i, text in enumerate(inputs)
        ]
        if self.reverse:  # the index field, not the position, says which input it is
            data.reverse()
        return httpx.Response(
            200,
            json={
                "object": "list",
                "data": data,
                "model": body["model"],
                "usage": {"prompt_tokens": 3 * len(inputs), "total_tokens": 3 * len(inputs)},
            },
        )

    def bodies(self) -> list[dict[str, Any]]:
        return [json.loads(r.content) for r in self.requests]


@pytest.fixture
def gateway() -> FakeGateway:
    return FakeGateway()


@pytest.fixture
async def client(gateway: FakeGateway) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=httpx.MockTransport(gateway)) as c:
        yield c


def make(client: httpx.AsyncClient, **kwargs: Any) -> RemoteEmbedder:
    return RemoteEmbedder(BASE_URL, "minilm", DIMS, client, **kwargs)


def expected(texts: list[str]) -> np.ndarray:
    raw = np.array([vector_for(t) for t in texts], dtype=np.float32)
    return raw / np.linalg.norm(raw, axis=1, keepdims=True)


async def test_request_wire_format_and_headers(
    client: httpx.AsyncClient, gateway: FakeGateway
) -> None:
    embedder = make(client, api_key="sk-test", headers={"X-Tenant-Id": "tnt_alpha"})
    await embedder.embed(["a", "b"])
    (request,) = gateway.requests
    assert request.method == "POST"
    assert str(request.url) == "http://gateway.test/v1/embeddings"
    assert request.headers["authorization"] == "Bearer sk-test"
    assert request.headers["x-tenant-id"] == "tnt_alpha"
    assert request.headers["content-type"] == "application/json"
    assert json.loads(request.content) == {
        "model": "minilm",
        "input": ["a", "b"],
        "encoding_format": "float",
    }


async def test_no_api_key_sends_no_authorization(
    client: httpx.AsyncClient, gateway: FakeGateway
) -> None:
    await make(client).embed(["a"])
    assert "authorization" not in gateway.requests[0].headers


async def test_results_are_reordered_by_index_and_normalised(client: httpx.AsyncClient) -> None:
    texts = ["first", "second", "third", "fourth"]
    vectors = await make(client).embed(texts)
    assert vectors.shape == (4, DIMS)
    assert vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(vectors, expected(texts), atol=1e-6)


async def test_batches_into_several_requests(
    client: httpx.AsyncClient, gateway: FakeGateway
) -> None:
    texts = [f"text {i}" for i in range(7)]
    vectors = await make(client, max_inputs_per_request=3).embed(texts)
    assert [b["input"] for b in gateway.bodies()] == [texts[0:3], texts[3:6], texts[6:7]]
    np.testing.assert_allclose(vectors, expected(texts), atol=1e-6)


async def test_empty_list_sends_nothing(client: httpx.AsyncClient, gateway: FakeGateway) -> None:
    vectors = await make(client).embed([])
    assert vectors.shape == (0, DIMS)
    assert gateway.requests == []


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (429, {"error": {"message": "Rate limit reached for minilm", "type": "rate_limit"}}),
        (500, {"error": {"message": "upstream exploded", "type": "server_error"}}),
        (401, {"error": {"message": "Incorrect API key provided", "type": "auth"}}),
    ],
)
async def test_http_errors_become_embedding_errors(
    client: httpx.AsyncClient, gateway: FakeGateway, status: int, body: dict[str, Any]
) -> None:
    gateway.respond = lambda _request: httpx.Response(status, json=body)
    with pytest.raises(EmbeddingError, match=f"HTTP {status}") as info:
        await make(client).embed(["a"])
    assert body["error"]["message"] in str(info.value)
    assert isinstance(info.value.__cause__, httpx.HTTPStatusError)


async def test_long_error_bodies_are_cut(client: httpx.AsyncClient, gateway: FakeGateway) -> None:
    gateway.respond = lambda _request: httpx.Response(502, text="<html>" + "x" * 5000)
    with pytest.raises(EmbeddingError, match="HTTP 502") as info:
        await make(client).embed(["a"])
    assert len(str(info.value)) < 400


async def test_transport_errors_become_embedding_errors(gateway: FakeGateway) -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    gateway.respond = refuse
    async with httpx.AsyncClient(transport=httpx.MockTransport(gateway)) as c:
        with pytest.raises(EmbeddingError, match="ConnectError") as info:
            await make(c).embed(["a"])
    assert isinstance(info.value.__cause__, httpx.ConnectError)


async def test_wrong_dimensions_raise(client: httpx.AsyncClient, gateway: FakeGateway) -> None:
    gateway.dims = DIMS + 1
    with pytest.raises(EmbeddingError, match=f"returned {DIMS + 1} dimensions, expected {DIMS}"):
        await make(client).embed(["a", "b"])


@pytest.mark.parametrize(
    "payload",
    [
        {"object": "list"},
        {"data": [{"index": 0, "embedding": [1.0] * DIMS}]},  # one result for two inputs
        {"data": [{"index": 0, "embedding": [1.0] * DIMS}] * 2},  # repeated index
        {
            "data": [
                {"index": 0, "embedding": [1.0] * DIMS},
                {"index": 5, "embedding": [1.0] * DIMS},
            ]
        },
        {"data": [{"index": 0, "embedding": "AAAA"}, {"index": 1, "embedding": "AAAA"}]},
        {
            "data": [
                {"index": 0, "embedding": [0.0] * DIMS},
                {"index": 1, "embedding": [1.0] * DIMS},
            ]
        },
    ],
)
async def test_malformed_responses_raise(
    client: httpx.AsyncClient, gateway: FakeGateway, payload: dict[str, Any]
) -> None:
    gateway.respond = lambda _request: httpx.Response(200, json=payload)
    with pytest.raises(EmbeddingError, match="malformed"):
        await make(client).embed(["a", "b"])


async def test_non_json_response_raises(client: httpx.AsyncClient, gateway: FakeGateway) -> None:
    gateway.respond = lambda _request: httpx.Response(200, text="not json")
    with pytest.raises(EmbeddingError, match="not JSON"):
        await make(client).embed(["a"])


async def test_protocol_properties(client: httpx.AsyncClient) -> None:
    embedder: Embedder = make(client, max_tokens=512)
    assert embedder.model_id == "minilm"
    assert embedder.dimensions == DIMS
    assert embedder.max_tokens == 512


async def test_count_tokens_is_an_approximation_without_a_tokenizer(
    client: httpx.AsyncClient,
) -> None:
    embedder = make(client)
    assert embedder.exact_token_counts is False
    assert embedder.count_tokens("") == 0
    assert embedder.count_tokens("abcd") == 1
    assert embedder.count_tokens("abcde") == 2


async def test_count_tokens_uses_the_given_tokenizer(client: httpx.AsyncClient) -> None:
    embedder = make(client, token_counter=lambda text: len(text.split()))
    assert embedder.exact_token_counts is True
    assert embedder.count_tokens("one two three") == 3


async def test_invalid_settings_are_rejected(client: httpx.AsyncClient) -> None:
    with pytest.raises(ValueError, match="max_inputs_per_request"):
        make(client, max_inputs_per_request=0)
    with pytest.raises(ValueError, match="dimensions"):
        RemoteEmbedder(BASE_URL, "minilm", 0, client)
