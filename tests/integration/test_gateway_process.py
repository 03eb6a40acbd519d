"""`ragplane serve gateway` as its own process: configured from YAML, served over
HTTP, and stopped with SIGTERM under load without losing a ledger row."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psycopg
import yaml

from ragplane.evals.gateway_launch import ragplane_config
from ragplane.gateway.mockprovider import MockProviderConfig, run_mock_provider
from tests.conftest import PgCluster
from tests.integration.gateway_harness import PROVIDER_KEY, SERVICE_KEY, closed_port

RAGPLANE = str(Path(sys.executable).with_name("ragplane"))
HEADERS = {"authorization": f"Bearer {SERVICE_KEY}", "x-tenant-id": "tnt_alpha"}


def _config(path: Path, pg: PgCluster, mock_url: str, port: int) -> Path:
    config = ragplane_config(
        path / "data",
        mock_url,
        pg.app,
        port=port,
        service_key=SERVICE_KEY,
        alias="fast",
        provider_key=PROVIDER_KEY,
    )
    file = path / "ragplane.yaml"
    file.write_text(yaml.safe_dump(config))
    return file


async def _wait_healthy(base: str, proc: asyncio.subprocess.Process) -> None:
    deadline = time.monotonic() + 60
    async with httpx.AsyncClient() as client:
        while time.monotonic() < deadline:
            if proc.returncode is not None:
                raise AssertionError(f"serve gateway exited early with {proc.returncode}")
            try:
                if (await client.get(f"{base}/health", timeout=1)).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.1)
    raise AssertionError("serve gateway did not answer /health")


async def test_sigterm_under_load_loses_no_ledger_row(clean_db: PgCluster, tmp_path: Path) -> None:
    port = closed_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAGPLANE_")}
    env.pop("DATABASE_URL", None)
    async with run_mock_provider(MockProviderConfig(api_key=PROVIDER_KEY, latency_ms=50)) as mock:
        config = _config(tmp_path, clean_db, mock.url, port)
        log = tmp_path / "gateway.log"
        with log.open("wb") as log_file:
            proc = await asyncio.create_subprocess_exec(
                RAGPLANE,
                "serve",
                "gateway",
                "--config",
                str(config),
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=log_file,
            )
        base = f"http://127.0.0.1:{port}"
        try:
            await _wait_healthy(base, proc)
            async with httpx.AsyncClient(timeout=30) as client:
                models = await client.get(f"{base}/v1/models", headers=HEADERS)
                assert [m["id"] for m in models.json()["data"]] == ["fast"]
                ok: list[str] = []
                enough = asyncio.Event()
                body = {"model": "fast", "messages": [{"role": "user", "content": "count me"}]}

                async def worker() -> None:
                    while True:
                        try:
                            r = await client.post(
                                f"{base}/v1/chat/completions", json=body, headers=HEADERS
                            )
                        except httpx.TransportError:
                            return  # the server is gone
                        if r.status_code != 200:
                            return  # refused while shutting down
                        ok.append(r.headers["x-request-id"])
                        if len(ok) >= 150:
                            enough.set()

                workers = [asyncio.create_task(worker()) for _ in range(16)]
                await enough.wait()
                proc.send_signal(signal.SIGTERM)  # requests are in flight right now
                await asyncio.gather(*workers)
            returncode = await asyncio.wait_for(proc.wait(), 60)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    assert returncode == 0, log.read_text()
    with psycopg.connect(clean_db.superuser_url) as conn:
        logged = {r for (r,) in conn.execute("SELECT request_id FROM llm_ledger")}
    assert len(ok) >= 150
    missing = set(ok) - logged
    assert not missing, f"{len(missing)} answered calls have no ledger row"
