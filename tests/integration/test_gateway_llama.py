"""The gateway over real open-source model servers: the official SDKs → gateway →
``llama-cpp-python[server]`` serving SmolLM2-135M, and → the in-process llama.cpp
provider (the ``llama`` extra)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest

from ragplane.config import GatewaySettings
from ragplane.data.db import Database
from tests.conftest import PgCluster, make_settings
from tests.integration.gateway_harness import SERVICE_KEY, running_gateway
from tests.integration.test_local_llamacpp import llama_server

pytestmark = pytest.mark.llama

__all__ = ["llama_server"]  # a fixture, imported to be shared

TENANT = "tnt_alpha"
QUESTION = [{"role": "user", "content": "Name a colour."}]


@pytest.fixture
async def gateway(
    clean_db: PgCluster, app_db: Database, tmp_path: Path, llama_server: str
) -> AsyncIterator[str]:
    gs = GatewaySettings.model_validate(
        {
            "service_keys": [SERVICE_KEY],
            "providers": {
                "llama-server": {"type": "openai", "base_url": f"{llama_server}/v1"},
                "llama-local": {"type": "llamacpp"},
            },
            "models": {
                "smol-server": {
                    "provider": "llama-server",
                    "upstream": "smollm2",
                    "context_window": 512,
                },
                "smol-local": {
                    "provider": "llama-local",
                    "upstream": "smollm2",
                    "context_window": 512,
                },
            },
            "aliases": {
                "smol": {"routes": [{"model": "smol-server"}], "timeouts": {"ttft_s": 60}},
                "smol-inproc": {"routes": [{"model": "smol-local"}], "timeouts": {"ttft_s": 60}},
            },
        }
    )
    settings = make_settings(clean_db, tmp_path, gateway=gs)
    async with running_gateway(settings, app_db) as (_, url):
        yield url


def _openai(url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=f"{url}/v1",
        api_key=SERVICE_KEY,
        default_headers={"X-Tenant-Id": TENANT},
        max_retries=0,
        timeout=120,
    )


@pytest.mark.parametrize("alias", ["smol", "smol-inproc"])
async def test_openai_sdk_through_the_gateway_to_llama_cpp(gateway: str, alias: str) -> None:
    async with _openai(gateway) as client:
        completion = await client.chat.completions.create(
            model=alias, messages=QUESTION, max_tokens=8, temperature=0
        )
        stream = await client.chat.completions.create(
            model=alias,
            messages=QUESTION,
            max_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [c async for c in stream]
    assert completion.choices[0].message.content
    assert completion.usage is not None
    assert 0 < completion.usage.completion_tokens <= 8
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed.strip()
    if alias == "smol-inproc":
        # llama_cpp.server does not report usage in streams (stream_options is ignored);
        # the in-process provider does
        usage: Any = chunks[-1].usage
        assert usage is not None
        assert usage.completion_tokens > 0


async def test_anthropic_sdk_through_the_gateway_to_the_llama_cpp_server(gateway: str) -> None:
    client = anthropic.AsyncAnthropic(
        base_url=gateway,
        api_key=SERVICE_KEY,
        default_headers={"X-Tenant-Id": TENANT},
        max_retries=0,
        timeout=120,
    )
    async with client:
        message = await client.messages.create(model="smol", max_tokens=8, messages=QUESTION)  # type: ignore[arg-type]
        async with client.messages.stream(
            model="smol",
            max_tokens=8,
            messages=QUESTION,  # type: ignore[arg-type]
        ) as stream:
            text = "".join([t async for t in stream.text_stream])
    assert message.content[0].type == "text"
    assert message.usage.output_tokens > 0
    assert text.strip()
