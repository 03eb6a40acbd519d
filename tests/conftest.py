"""Shared fixtures: one real embedded Postgres + pgvector per test session.

The server runs in a temporary data directory and is migrated exactly as
``ragplane up`` does it; tests reach it through the real role URLs. Tenant
tables are truncated (as the owner, which TRUNCATE allows despite RLS) before
each test that asks for a clean database.
"""

from __future__ import annotations

import inspect
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import redis
from fastapi import FastAPI

from ragplane.config import AuthSettings, DatabaseSettings, EdgeSettings, Settings
from ragplane.control.tenants import add_tenant
from ragplane.data import Database, DatabaseUrls, EmbeddedPostgres
from ragplane.platform import create_app

TENANT_TABLES = (
    "kb_state",
    "documents",
    "chunks",
    "kb_terms",
    "kb_postings",
    "kb_text_stats",
    "chat_sessions",
    "chat_messages",
    "request_log",
    "ingest_jobs",
    "ingest_uploads",
    "llm_ledger",
    "semantic_cache",
    "eval_samples",
)
# procrastinate's tables (not tenant tables: no tenant_id; job arguments are ids only)
QUEUE_TABLES = (
    "procrastinate.procrastinate_jobs",
    "procrastinate.procrastinate_events",
    "procrastinate.procrastinate_periodic_defers",
    "procrastinate.procrastinate_workers",
)
TEST_TENANTS = {
    "tnt_alpha": "eu",
    "tnt_beta": "eu",
    "tnt_gamma": "us",
    "tnt_acme_eu": "eu",
    "tnt_globex_us": "us",
}


@pytest.hookimpl(tryfirst=True)
def pytest_pycollect_makeitem(collector: pytest.Collector, name: str, obj: object) -> None:
    """Run every ``async def`` test under anyio. Marking the function before the anyio
    plugin collects it (not the item afterwards) keeps parametrization intact."""
    if (
        isinstance(collector, pytest.Module | pytest.Class)
        and collector.istestfunction(obj, name)
        and inspect.iscoroutinefunction(obj)
    ):
        pytest.mark.anyio(obj)


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


@dataclass(frozen=True)
class PgCluster:
    urls: DatabaseUrls
    superuser_url: str
    data_dir: Path

    @property
    def app(self) -> str:
        return self.urls.app

    @property
    def owner(self) -> str:
        assert self.urls.owner is not None
        return self.urls.owner

    @property
    def reporting(self) -> str:
        assert self.urls.reporting is not None
        return self.urls.reporting


@pytest.fixture(scope="session")
def pg() -> Iterator[PgCluster]:
    # Not under pytest's basetemp: as root the server runs as the `pgserver` user, and
    # every new pytest session resets /tmp/pytest-of-root to 0700, which would lock a
    # concurrently running session's server out of its own data directory.
    data_dir = Path(tempfile.mkdtemp(prefix="ragplane-test-"))
    embedded = EmbeddedPostgres(data_dir)
    urls = embedded.start()
    superuser = embedded.superuser_url
    with psycopg.connect(urls.owner or "", autocommit=True) as conn:
        for tid, region in TEST_TENANTS.items():
            conn.execute(
                "INSERT INTO control.tenants (id, name, home_region) VALUES (%s, %s, %s) "
                "ON CONFLICT DO NOTHING",
                (tid, tid.replace("_", " ").title(), region),
            )
    try:
        yield PgCluster(urls=urls, superuser_url=superuser, data_dir=data_dir)
    finally:
        embedded.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture
def clean_db(pg: PgCluster) -> PgCluster:
    with psycopg.connect(pg.owner, autocommit=True) as conn:
        conn.execute("TRUNCATE " + ", ".join(TENANT_TABLES) + " CASCADE")
        conn.execute("TRUNCATE " + ", ".join(QUEUE_TABLES) + " CASCADE")
        conn.execute("DELETE FROM control.api_keys")
        conn.execute("DELETE FROM control.kb_namespaces")
    return pg


@pytest.fixture
async def app_db(pg: PgCluster) -> AsyncIterator[Database]:
    async with Database(pg.app, max_size=4) as db:
        yield db


@pytest.fixture
async def owner_db(pg: PgCluster) -> AsyncIterator[Database]:
    async with Database(pg.owner, max_size=2, name="owner") as db:
        yield db


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A private redis-server (Debian package ``redis-server``) on a free loopback port,
    without persistence, for the whole session."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed (apt-get install redis-server)")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    work_dir = tempfile.mkdtemp(prefix="ragplane-redis-")
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly"]
    argv += ["no", "--dir", work_dir, "--logfile", "", "--loglevel", "warning"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url, socket_connect_timeout=0.2)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    proc.kill()
                    err = proc.stderr.read().decode() if proc.stderr else ""
                    pytest.fail(f"redis-server did not start: {err}")
                time.sleep(0.02)
        yield url
    finally:
        client.close()
        proc.terminate()
        proc.wait(timeout=10)
        if proc.stderr:
            proc.stderr.close()
        shutil.rmtree(work_dir, ignore_errors=True)


@pytest.fixture
def clean_redis(redis_url: str) -> str:
    """The session's Redis, emptied before the test."""
    with redis.Redis.from_url(redis_url) as client:
        client.flushall()
    return redis_url


def make_settings(pg: PgCluster, tmp_path: Path, **overrides: Any) -> Settings:
    """Settings for an app over the session's database (external-database mode)."""
    values: dict[str, Any] = {
        "data_dir": tmp_path,
        "dev_mode": False,
        "database": DatabaseSettings(url=pg.app, owner_url=pg.owner, reporting_url=pg.reporting),
        "auth": AuthSettings(),
        "edge": EdgeSettings(tenant_cache_s=0, tenant_cache_listening_s=0),
        "log_level": "warning",
    }
    values.update(overrides)
    return Settings(**values)


@asynccontextmanager
async def running(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """Run the app's lifespan and give an HTTP client wired to it over ASGI."""
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, client=("203.0.113.9", 40000))
        async with httpx.AsyncClient(transport=transport, base_url="http://ragplane.test") as c:
            yield c


@pytest.fixture
async def dev_client(pg: PgCluster, tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(make_settings(pg, tmp_path, dev_mode=True))
    async with running(app) as client:
        client.app = app  # type: ignore[attr-defined]
        yield client


__all__ = [
    "QUEUE_TABLES",
    "TENANT_TABLES",
    "TEST_TENANTS",
    "PgCluster",
    "add_tenant",
    "make_settings",
    "running",
]
