"""Helpers for gateway tests: a real HTTP server on loopback for an ASGI app, and
gateway settings over a mock provider."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import uvicorn
from pydantic import SecretStr
from starlette.types import ASGIApp

from ragplane.config import GatewaySettings, Settings
from ragplane.data.db import Database
from ragplane.gateway.runtime import Gateway

__all__ = ["SERVICE_KEY", "closed_port", "gateway_settings", "running_gateway", "serve_asgi"]

SERVICE_KEY = "svc-test-key-0123456789"
PROVIDER_KEY = "sk-mock-provider"

# prices per 1M tokens, like gpt-4o-mini and a Claude Sonnet
PRICES = {
    "openai": {"input_per_mtok": 0.15, "output_per_mtok": 0.60, "cache_read_per_mtok": 0.075},
    "anthropic": {
        "input_per_mtok": 3.0,
        "output_per_mtok": 15.0,
        "cache_read_per_mtok": 0.30,
        "cache_write_per_mtok": 3.75,
    },
}


def closed_port() -> int:
    """A loopback port nothing listens on (connections are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@asynccontextmanager
async def serve_asgi(app: ASGIApp) -> AsyncIterator[str]:
    """Serve ``app`` with uvicorn on a free loopback port; yields its base URL."""
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off")
    )
    server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


def gateway_settings(mock_url: str, **aliases: Any) -> GatewaySettings:
    """Providers ``mock-openai`` and ``mock-anthropic`` on the mock, a dead provider,
    models with prices, and aliases: ``fast`` (OpenAI), ``claude`` (Anthropic),
    ``failover`` (dead route first, then ``fast``'s model), ``emb`` (embeddings),
    ``claude-cached`` (automatic prompt-cache breakpoint after a long system prompt),
    ``us-only`` (a provider pinned to region us) and ``us-first`` (then a regionless one)."""
    providers = {
        "mock-openai": {"type": "openai", "base_url": f"{mock_url}/v1", "api_key": PROVIDER_KEY},
        "mock-anthropic": {"type": "anthropic", "base_url": mock_url, "api_key": PROVIDER_KEY},
        "dead": {"type": "openai", "base_url": f"http://127.0.0.1:{closed_port()}/v1"},
        "mock-us": {
            "type": "openai",
            "base_url": f"{mock_url}/v1",
            "api_key": PROVIDER_KEY,
            "region": "us",
        },
    }
    models = {
        "gpt": {"provider": "mock-openai", "upstream": "mock-gpt", **PRICES["openai"]},
        "claude": {
            "provider": "mock-anthropic",
            "upstream": "mock-claude",
            **PRICES["anthropic"],
        },
        "dead-gpt": {"provider": "dead", "upstream": "mock-gpt"},
        "embed": {"provider": "mock-openai", "upstream": "mock-embedding", "kind": "embedding"},
        "gpt-us": {"provider": "mock-us", "upstream": "mock-gpt"},
    }
    fast_retry = {"attempts": 2, "base_s": 0.0, "max_backoff_s": 0.0}
    all_aliases: dict[str, Any] = {
        "fast": {"routes": [{"model": "gpt"}], "retry": fast_retry},
        "claude": {"routes": [{"model": "claude"}], "retry": fast_retry},
        "claude-cached": {
            "routes": [{"model": "claude"}],
            "prompt_cache": True,
            "prompt_cache_min_chars": 1000,
        },
        "failover": {
            "routes": [{"model": "dead-gpt"}, {"model": "gpt"}],
            "retry": fast_retry,
            "timeouts": {"connect_s": 1.0},
        },
        "emb": {"routes": [{"model": "embed"}]},
        "us-only": {"routes": [{"model": "gpt-us"}]},
        "us-first": {"routes": [{"model": "gpt-us"}, {"model": "gpt"}]},
    }
    all_aliases.update(aliases)
    return GatewaySettings.model_validate(
        {
            "providers": providers,
            "models": models,
            "aliases": all_aliases,
            "service_keys": [SecretStr(SERVICE_KEY)],
        }
    )


@asynccontextmanager
async def running_gateway(
    settings: Settings, db: Database | None
) -> AsyncIterator[tuple[Gateway, str]]:
    """A started :class:`Gateway` served over HTTP; yields it and its base URL."""
    gateway = Gateway(settings, db)
    await gateway.start()
    try:
        async with serve_asgi(gateway.app) as url:
            yield gateway, url
    finally:
        await gateway.stop()
