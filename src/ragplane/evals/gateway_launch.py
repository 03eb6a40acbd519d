"""Starting the gateway benchmark's processes, each configured for the bench.

- :func:`start_mock`: ``ragplane mock-provider`` on a free port, fixed latency;
- :func:`start_floor`: ``python -m ragplane.evals.floor_proxy`` in front of it;
- :func:`start_ragplane`: ``ragplane serve gateway`` from a YAML file
  (:func:`ragplane_config`: one service key, one alias routed to the mock, the ledger
  in the given database, where the bench's tenant is registered first), per-tenant
  bulkheads raised to 1,024 (the default 32 would refuse c=64 from one tenant);
- :func:`start_litellm`: the LiteLLM proxy from its own venv, one model pointing at the
  mock as an OpenAI-compatible provider, a strong random master key (LiteLLM refuses a
  weak one), no network look-ups (``LITELLM_LOCAL_MODEL_COST_MAP``), bound to 127.0.0.1.

Each returns once the process is ready (its URL printed, or ``GET`` health answered).
Children get this process's environment without ``RAGPLANE_*`` and ``DATABASE_URL``.
"""

from __future__ import annotations

import asyncio
import secrets
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from ragplane.config import child_process_env
from ragplane.data import DatabaseUrls
from ragplane.evals.gateway_targets import (
    TargetProcess,
    free_port,
    start_process,
    wait_http,
    wait_log_url,
)

__all__ = ["ragplane_config", "start_floor", "start_litellm", "start_mock", "start_ragplane"]

_RAGPLANE = [sys.executable, "-c", "from ragplane.cli import main; main()"]
_PROVIDER_KEY = "sk-mock"


def start_mock(work_dir: Path, latency_ms: float) -> TargetProcess:
    argv = [*_RAGPLANE, "mock-provider", "--port", "0", "--latency-ms", str(latency_ms)]
    mock = start_process("mock", argv, work_dir / "mock.log", env=child_process_env())
    wait_log_url(mock)
    return mock


def start_floor(work_dir: Path, upstream: str) -> TargetProcess:
    argv = [sys.executable, "-m", "ragplane.evals.floor_proxy", "--upstream", upstream]
    floor = start_process("floor", argv, work_dir / "floor.log", env=child_process_env())
    wait_log_url(floor)
    return floor


def _register_tenant(urls: DatabaseUrls, tenant: str) -> None:
    from ragplane.control.tenants import add_tenant
    from ragplane.data import Database

    async def go() -> None:
        db = Database(urls.owner or urls.app, max_size=1, name="owner")
        async with db, db.control() as s:
            await add_tenant(s, tenant, name="Bench", home_region="eu", exist_ok=True)

    asyncio.run(go())


def ragplane_config(
    data_dir: Path,
    upstream: str,
    database_url: str,
    *,
    port: int,
    service_key: str,
    alias: str,
    provider_key: str = _PROVIDER_KEY,
    bulkheads: dict[str, int] | None = None,
) -> dict[str, Any]:
    """A ``ragplane serve gateway`` configuration: one service key, one alias routed to
    an OpenAI-compatible upstream (``mock-gpt``), the ledger in ``database_url``."""
    gateway: dict[str, Any] = {
        "service_keys": [service_key],
        "providers": {
            "mock": {"type": "openai", "base_url": f"{upstream}/v1", "api_key": provider_key}
        },
        "models": {
            "gpt": {
                "provider": "mock",
                "upstream": "mock-gpt",
                "input_per_mtok": 0.15,
                "output_per_mtok": 0.6,
            }
        },
        "aliases": {alias: {"routes": [{"model": "gpt"}]}},
    }
    if bulkheads is not None:
        gateway["bulkheads"] = bulkheads
    return {
        "data_dir": str(data_dir),
        "host": "127.0.0.1",
        "port": port,
        "log_level": "warning",
        "database": {"url": database_url},
        "gateway": gateway,
    }


def start_ragplane(
    work_dir: Path,
    upstream: str,
    urls: DatabaseUrls,
    *,
    tenant: str,
    service_key: str,
    alias: str,
) -> TargetProcess:
    _register_tenant(urls, tenant)
    port = free_port()
    config = ragplane_config(
        work_dir / "ragplane-data",
        upstream,
        urls.app,
        port=port,
        service_key=service_key,
        alias=alias,
        bulkheads={"per_tenant_interactive": 1024, "per_route_interactive": 1024},
    )
    file = work_dir / "ragplane.yaml"
    file.write_text(yaml.safe_dump(config))
    argv = [*_RAGPLANE, "serve", "gateway", "--config", str(file)]
    gw = start_process("ragplane", argv, work_dir / "ragplane.log", env=child_process_env())
    gw.url = f"http://127.0.0.1:{port}"
    wait_http(gw, f"{gw.url}/health", timeout_s=120)
    return gw


def start_litellm(
    work_dir: Path, exe: Path, upstream: str, *, alias: str, workers: int
) -> TargetProcess:
    """``notes``: ``master_key`` (the caller's bearer token) and ``version``."""
    master_key = "sk-" + secrets.token_hex(24)
    config = {
        "model_list": [
            {
                "model_name": alias,
                "litellm_params": {
                    "model": "openai/mock-gpt",
                    "api_base": f"{upstream}/v1",
                    "api_key": _PROVIDER_KEY,
                },
            }
        ],
        "general_settings": {"master_key": master_key},
    }
    file = work_dir / "litellm.yaml"
    file.write_text(yaml.safe_dump(config))
    port = free_port()
    argv = [str(exe), "--config", str(file), "--host", "127.0.0.1", "--port", str(port)]
    argv += ["--num_workers", str(workers)]
    env = child_process_env(LITELLM_LOCAL_MODEL_COST_MAP="True", LITELLM_LOG="ERROR")
    proxy = start_process("litellm", argv, work_dir / "litellm.log", env=env)
    proxy.url = f"http://127.0.0.1:{port}"
    proxy.notes["master_key"] = master_key
    proxy.notes["version"] = _litellm_version(exe)
    wait_http(proxy, f"{proxy.url}/health/liveliness", timeout_s=300)
    return proxy


def _litellm_version(exe: Path) -> str:
    python = exe.with_name("python")
    code = "import importlib.metadata as m; print(m.version('litellm'))"
    try:
        done = subprocess.run(  # noqa: S603 (our own venv's python)
            [str(python), "-c", code], capture_output=True, text=True, timeout=60, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return done.stdout.strip()
