"""Control-plane changes pushed by Postgres (LISTEN/NOTIFY, migration 0008): the
listener, what it tells its caches, how it survives a lost connection, and a gateway
whose caches hold entries for a minute refusing a suspended tenant within a second."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import httpx
import psycopg
import pytest

from ragplane.config import EdgeSettings
from ragplane.control.changes import ControlChanges
from ragplane.control.tenants import Tenant, TenantRegistry
from ragplane.data.db import Database
from tests.conftest import PgCluster, make_settings
from tests.integration.gateway_harness import SERVICE_KEY, gateway_settings, running_gateway

TENANT = "tnt_alpha"


async def _until(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    for _ in range(int(timeout_s / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"not within {timeout_s} s")


def _owner_sql(pg: PgCluster, statement: str) -> None:
    with psycopg.connect(pg.owner, autocommit=True) as conn:
        conn.execute(statement)


async def test_changes_to_a_tenant_its_namespaces_and_keys_are_pushed(
    clean_db: PgCluster, app_db: Database
) -> None:
    told: list[str | None] = []
    changes = ControlChanges(app_db)
    changes.subscribe(told.append)
    await changes.start()
    try:
        assert changes.listening
        assert told == [None]  # connected: whatever changed before is unknown
        _owner_sql(clean_db, f"UPDATE control.tenants SET name = 'Alpha 2' WHERE id = '{TENANT}'")
        await _until(lambda: told[-1:] == [TENANT])
        _owner_sql(
            clean_db,
            "INSERT INTO control.kb_namespaces (tenant_id, name, embedding_model) "
            "VALUES ('tnt_beta', 'pushed', 'all-minilm-l6-v2')",
        )
        await _until(lambda: told[-1:] == ["tnt_beta"])
        _owner_sql(clean_db, "DELETE FROM control.kb_namespaces WHERE name = 'pushed'")
        await _until(lambda: told.count("tnt_beta") == 2)
        _owner_sql(
            clean_db,
            "INSERT INTO control.api_keys (id, tenant_id, key_hash, scopes) "
            "VALUES ('key_pushed', 'tnt_gamma', '\\x01', '{gateway}')",
        )
        _owner_sql(
            clean_db, "UPDATE control.api_keys SET revoked_at = now() WHERE id = 'key_pushed'"
        )
        await _until(lambda: told[-1:] == ["tnt_gamma"])
    finally:
        await changes.stop()
    assert not changes.listening


async def test_a_lost_listener_says_forget_everything_and_comes_back(
    clean_db: PgCluster, app_db: Database
) -> None:
    told: list[str | None] = []
    changes = ControlChanges(app_db, retry_s=0.05)
    changes.subscribe(told.append)
    await changes.start()
    try:
        with psycopg.connect(clean_db.superuser_url, autocommit=True) as conn:
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE application_name = 'ragplane-app-listen'"
            )
        # lost (None), then connected again (None): nothing pushed meanwhile is trusted
        await _until(lambda: told.count(None) >= 3 and changes.listening)
        _owner_sql(clean_db, f"UPDATE control.tenants SET name = 'Alpha 3' WHERE id = '{TENANT}'")
        await _until(lambda: told[-1:] == [TENANT])
    finally:
        await changes.stop()


class _SlowControl:
    """A database whose registry read waits for ``release``."""

    def __init__(self, rows: list[dict[str, object]]) -> None:
        self.rows = rows
        self.reads = 0
        self.release = asyncio.Event()

    async def control_fetch(self, query: str, params: object = None) -> list[dict[str, object]]:
        self.reads += 1
        await self.release.wait()
        return self.rows


async def test_a_read_under_way_when_its_tenant_is_forgotten_is_not_cached(
    clean_db: PgCluster, app_db: Database
) -> None:
    rows = await app_db.control_fetch(
        "SELECT id, name, home_region, data_class, embedding_model, status, created_at, "
        "'{}'::text[] AS kb_namespaces FROM control.tenants WHERE id = %s",
        (TENANT,),
    )
    slow = _SlowControl([dict(r) for r in rows])
    registry = TenantRegistry(slow, ttl_s=60)  # type: ignore[arg-type]
    read = asyncio.create_task(registry.get(TENANT))
    await _until(lambda: slow.reads == 1)
    registry.forget(TENANT)  # the change lands while the old row is on its way
    slow.release.set()
    tenant = await read
    assert isinstance(tenant, Tenant)
    await registry.get(TENANT)
    assert slow.reads == 2  # read again: the stale answer was not kept


async def test_a_gateway_refuses_a_suspended_tenant_at_once_despite_a_long_cache(
    clean_db: PgCluster, app_db: Database, tmp_path: Path
) -> None:
    settings = make_settings(
        clean_db,
        tmp_path,
        gateway=gateway_settings("http://127.0.0.1:9"),
        edge=EdgeSettings(tenant_cache_s=60, tenant_cache_listening_s=60),
    )
    headers = {"authorization": f"Bearer {SERVICE_KEY}", "x-tenant-id": TENANT}
    async with running_gateway(settings, app_db) as (gw, url), httpx.AsyncClient() as c:
        assert gw.changes is not None
        assert gw.changes.listening

        async def status() -> int:
            return (await c.get(f"{url}/v1/models", headers=headers)).status_code

        async def becomes(code: int) -> None:
            for _ in range(100):  # 2 s; the cache alone would keep the answer a minute
                if await status() == code:
                    return
                await asyncio.sleep(0.02)
            raise AssertionError(f"still not {code} after 2 s")

        assert await status() == 200  # cached for a minute from here
        _owner_sql(
            clean_db, f"UPDATE control.tenants SET status = 'suspended' WHERE id = '{TENANT}'"
        )
        try:
            await becomes(403)
        finally:
            _owner_sql(
                clean_db, f"UPDATE control.tenants SET status = 'active' WHERE id = '{TENANT}'"
            )
        await becomes(200)


async def test_flag_changes_go_to_flag_subscribers_and_namespaces_are_forgotten(
    clean_db: PgCluster, app_db: Database
) -> None:
    from ragplane.control.flags import FlagStore
    from ragplane.control.namespaces import NamespaceNotFound, NamespaceRegistry

    tenants: list[str | None] = []
    flags: list[str | None] = []
    changes = ControlChanges(app_db)
    changes.subscribe(tenants.append)
    changes.subscribe_flags(flags.append)
    store = FlagStore(app_db, changes=changes, ttl_s=60, listening_ttl_s=600)
    namespaces = NamespaceRegistry(app_db, changes=changes, ttl_s=60, listening_ttl_s=600)
    await changes.start()
    try:
        assert await store.is_on("ai-inference-enabled")
        _owner_sql(clean_db, "UPDATE control.flags SET enabled = false, updated_by = 't'")
        await _until(lambda: flags[-1:] == ["ai-inference-enabled"])
        assert tenants == [None]  # a flag is not a tenant
        assert not await store.is_on("ai-inference-enabled")  # forgotten, read again
        _owner_sql(
            clean_db,
            "INSERT INTO control.kb_namespaces (tenant_id, name, embedding_model) "
            f"VALUES ('{TENANT}', 'cached', 'all-minilm-l6-v2')",
        )
        await _until(lambda: tenants[-1:] == [TENANT])
        assert (await namespaces.get((TENANT, "cached"))).chunking.max_tokens == 256
        _owner_sql(
            clean_db,
            "UPDATE control.kb_namespaces SET chunk_max_tokens = 512 WHERE name = 'cached'",
        )
        await _until(lambda: tenants.count(TENANT) == 2)
        assert (await namespaces.get((TENANT, "cached"))).chunking.max_tokens == 512
        _owner_sql(clean_db, "DELETE FROM control.kb_namespaces WHERE name = 'cached'")
        await _until(lambda: tenants.count(TENANT) == 3)
        with pytest.raises(NamespaceNotFound):
            await namespaces.get((TENANT, "cached"))
    finally:
        await changes.stop()
        _owner_sql(clean_db, "UPDATE control.flags SET enabled = true, updated_by = 't'")
