"""``Database.tenant_fetch``: one read in a tenant unit of work, sent as one pipeline;
``Database.control_fetch``: one read of control-plane tables, one statement."""

from __future__ import annotations

import psycopg
import pytest

from ragplane.data import Database
from ragplane.errors import TenantScopeError
from tests.conftest import PgCluster

STATE = "SELECT namespace, active_model FROM kb_state ORDER BY namespace"


async def _seed(db: Database) -> None:
    for tenant in ("tnt_alpha", "tnt_beta"):
        async with db.tenant(tenant) as s:
            await s.execute(
                "INSERT INTO kb_state (tenant_id, namespace, active_model) VALUES (%s, %s, 'm')",
                (tenant, f"{tenant}_ns"),
            )


async def test_it_sees_only_its_tenants_rows_with_its_settings_for_that_transaction(
    clean_db: PgCluster,
) -> None:
    async with Database(clean_db.app, max_size=1) as db:
        await _seed(db)
        rows = await db.tenant_fetch("tnt_alpha", STATE)
        assert [r["namespace"] for r in rows] == ["tnt_alpha_ns"]
        rows = await db.tenant_fetch(
            "tnt_beta",
            "SELECT current_setting('app.tenant_id') AS tenant, "
            "current_setting('hnsw.ef_search', true) AS ef, %s::int AS param",
            (7,),
            settings={"hnsw.ef_search": "42"},
        )
        assert [dict(r) for r in rows] == [{"tenant": "tnt_beta", "ef": "42", "param": 7}]
        # transaction-local: the one pooled connection carries neither afterwards
        async with db.control() as s:
            row = await s.fetch_one(
                "SELECT current_setting('app.tenant_id', true) AS tenant, "
                "current_setting('hnsw.ef_search', true) AS ef"
            )
        assert row is not None
        assert row["tenant"] in (None, "")
        assert row["ef"] != "42"


async def test_a_failing_statement_raises_and_leaves_the_connection_usable(
    clean_db: PgCluster,
) -> None:
    async with Database(clean_db.app, max_size=1) as db:
        await _seed(db)
        with pytest.raises(psycopg.errors.DivisionByZero):
            await db.tenant_fetch("tnt_alpha", "SELECT 1 / 0")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            await db.tenant_fetch("tnt_alpha", "DELETE FROM control.tenants")
        rows = await db.tenant_fetch("tnt_beta", STATE)
        assert [r["namespace"] for r in rows] == ["tnt_beta_ns"]


async def test_it_refuses_a_bad_tenant_or_setting(clean_db: PgCluster) -> None:
    async with Database(clean_db.app, max_size=1) as db:
        with pytest.raises(TenantScopeError):
            await db.tenant_fetch("Robert'); --", STATE)
        with pytest.raises(ValueError, match="not a setting"):
            await db.tenant_fetch("tnt_alpha", STATE, settings={"app.tenant_id": "tnt_beta"})


async def test_control_fetch_reads_control_tables_and_sees_no_tenant_rows(
    clean_db: PgCluster,
) -> None:
    async with Database(clean_db.app, max_size=1) as db:
        await _seed(db)
        rows = await db.control_fetch(
            "SELECT id FROM control.tenants WHERE id = ANY(%s) ORDER BY id",
            (["tnt_alpha", "tnt_beta"],),
        )
        assert [r["id"] for r in rows] == ["tnt_alpha", "tnt_beta"]
        assert await db.control_fetch(STATE) == []  # no tenant set: RLS shows nothing
        with pytest.raises(psycopg.errors.DivisionByZero):
            await db.control_fetch("SELECT 1 / 0")
        # the failed statement was its own transaction: the connection is usable
        assert [r["one"] for r in await db.control_fetch("SELECT 1 AS one")] == [1]
