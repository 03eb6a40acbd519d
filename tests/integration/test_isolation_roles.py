"""Adversarial role capabilities around tenant isolation, against the real database.

What the application role (``ragplane_app``) cannot do to get around row-level
security, what the reporting role can and cannot do, that the owner is bound by
FORCE ROW LEVEL SECURITY, that referential integrity reveals nothing about
another tenant's rows, and that a tenant setting never outlives its unit of
work on a pooled connection. The randomized read suite is ``test_isolation.py``.
"""

from __future__ import annotations

import random
import re
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import psycopg
import pytest
from psycopg import sql

from ragplane.data import Database
from tests.conftest import PgCluster
from tests.integration.test_isolation import (
    APP_ROLE,
    APPEND_ONLY_TABLES,
    OWNER_ROLE,
    REPORTING_ROLE,
    SEEDED_TENANTS,
    World,
    connect,
    current_tenant_setting,
    discover_tenant_relations,
    discover_tenant_tables,
    ident,
    insert_statement,
    policies_for,
    seed_world,
)

ALPHA, BETA = "tnt_alpha", "tnt_beta"
INSUFFICIENT_PRIVILEGE = "42501"
FOREIGN_KEY_VIOLATION = "23503"
UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


async def in_transaction(
    conn: psycopg.AsyncConnection[Any],
    query: Any,
    params: Any = None,
    tenant: str | None = None,
) -> int:
    """Run one statement in its own transaction (tenant set first, if given); rowcount."""
    async with conn.transaction():
        if tenant is not None:
            await conn.execute("SELECT set_config('app.tenant_id', %s, true)", (tenant,))
        cur = await conn.execute(query, params)
        return cur.rowcount


async def refused(
    conn: psycopg.AsyncConnection[Any],
    query: Any,
    params: Any = None,
    tenant: str | None = None,
    sqlstate: str = INSUFFICIENT_PRIVILEGE,
) -> psycopg.Error:
    with pytest.raises(psycopg.Error) as info:
        await in_transaction(conn, query, params, tenant)
    assert info.value.sqlstate == sqlstate, f"{query!r}: {info.value.sqlstate} {info.value}"
    return info.value


async def fetch(conn: psycopg.AsyncConnection[Any], query: Any, params: Any = None) -> list[Any]:
    cur = await conn.execute(query, params)
    return await cur.fetchall()


async def scalar(conn: psycopg.AsyncConnection[Any], query: Any, params: Any = None) -> Any:
    cur = await conn.execute(query, params)
    row = await cur.fetchone()
    assert row is not None
    return row[0]


async def stored_rows(pg: PgCluster, world: World) -> dict[str, list[tuple[str, str, str]]]:
    """Every row of every tenant table as (pk, tenant, marker), read as the reporting role."""
    out = {}
    async with connect(pg.reporting) as rep:
        for table, info in world.tables.items():
            rows = await fetch(
                rep,
                sql.SQL("SELECT {}::text, tenant_id, {} FROM {}").format(
                    sql.Identifier(info.pk), sql.Identifier(info.marker), ident(table)
                ),
            )
            out[table] = sorted(rows)
    return out


def seeded_rows(world: World) -> dict[str, list[tuple[str, str, str]]]:
    return {t: sorted((r.pk, r.tenant, r.marker) for r in world.of(t)) for t in world.tables}


async def seed(pg: PgCluster, app_db: Database) -> World:
    return await seed_world(app_db, pg, random.Random(20240601))


async def role_attributes(conn: psycopg.AsyncConnection[Any], role: str) -> tuple[Any, ...]:
    cur = await conn.execute(
        "SELECT rolsuper, rolbypassrls, rolcreaterole, rolcreatedb, rolreplication, rolinherit "
        "FROM pg_roles WHERE rolname = %s",
        (role,),
    )
    row = await cur.fetchone()
    assert row is not None, role
    return tuple(row)


# --------------------------------------------------------------------------- identity


async def test_application_role_is_unprivileged_and_owns_nothing(pg: PgCluster) -> None:
    async with connect(pg.app) as conn:
        assert await scalar(conn, "SELECT current_user") == APP_ROLE
        assert await scalar(conn, "SELECT session_user") == APP_ROLE
        # super, bypassrls, createrole, createdb, replication, inherit
        assert await role_attributes(conn, APP_ROLE) == (False,) * 6
        assert await role_attributes(conn, REPORTING_ROLE) == (False,) * 6
        for catalog, owner_col in (
            ("pg_class", "relowner"),
            ("pg_namespace", "nspowner"),
            ("pg_proc", "proowner"),
            ("pg_type", "typowner"),
            ("pg_database", "datdba"),
        ):
            n = await scalar(
                conn,
                sql.SQL("SELECT count(*) FROM {} WHERE {} = %s::regrole").format(
                    sql.Identifier("pg_catalog", catalog), sql.Identifier(owner_col)
                ),
                (APP_ROLE,),
            )
            assert n == 0, f"{APP_ROLE} owns {n} objects in {catalog}"
        # member of no other role at all (owner, reporting, superusers, pg_read_all_data, ...)
        others = await fetch(
            conn,
            "SELECT rolname FROM pg_roles WHERE rolname <> %s AND pg_has_role(%s, oid, 'MEMBER')",
            (APP_ROLE, APP_ROLE),
        )
        assert others == []
        owned = await scalar(
            conn,
            "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = 'public' AND pg_get_userbyid(c.relowner) = %s",
            (OWNER_ROLE,),
        )
        assert owned >= len(await discover_tenant_tables(conn))


async def test_application_role_cannot_become_another_role(pg: PgCluster) -> None:
    async with connect(pg.app) as conn:
        superusers = [
            r for (r,) in await fetch(conn, "SELECT rolname FROM pg_roles WHERE rolsuper")
        ]
        assert superusers, "the cluster has a superuser"
        for role in (OWNER_ROLE, REPORTING_ROLE, *superusers):
            for stmt in ("SET ROLE {}", "SET SESSION AUTHORIZATION {}", "SET LOCAL ROLE {}"):
                err = await refused(conn, sql.SQL(stmt).format(sql.Identifier(role)))
                assert "permission denied" in str(err)
            await refused(
                conn,
                sql.SQL("GRANT {} TO {}").format(sql.Identifier(role), sql.Identifier(APP_ROLE)),
            )
        for attr in ("SUPERUSER", "BYPASSRLS", "CREATEROLE", "INHERIT", "REPLICATION"):
            await refused(conn, f"ALTER ROLE ragplane_app {attr}")
        # cannot pin a default tenant for every future connection of the role
        await refused(conn, "ALTER ROLE ragplane_app SET app.tenant_id = 'tnt_alpha'")
        await refused(
            conn, "ALTER ROLE ragplane_app IN DATABASE ragplane SET app.tenant_id = 'tnt_alpha'"
        )
        await refused(conn, "ALTER DATABASE ragplane SET app.tenant_id = 'tnt_alpha'")
        await refused(conn, "CREATE ROLE ragplane_evil LOGIN BYPASSRLS")
        assert await scalar(conn, "SELECT current_user") == APP_ROLE
        assert await role_attributes(conn, APP_ROLE) == (False,) * 6
    async with connect(pg.app) as conn:  # a new session starts with no tenant
        assert await current_tenant_setting(conn) is None


async def test_application_role_cannot_weaken_row_level_security(pg: PgCluster) -> None:
    async with connect(pg.app) as conn:
        tables = await discover_tenant_tables(conn)
        before = {t: await policies_for(conn, t) for t in tables}
        for t in tables:
            tbl = ident(t)
            for stmt in (
                "ALTER TABLE {t} DISABLE ROW LEVEL SECURITY",
                "ALTER TABLE {t} NO FORCE ROW LEVEL SECURITY",
                "DROP POLICY tenant_isolation ON {t}",
                "ALTER POLICY tenant_isolation ON {t} USING (true) WITH CHECK (true)",
                "ALTER POLICY tenant_isolation ON {t} TO PUBLIC",
                "CREATE POLICY pwn ON {t} FOR SELECT TO ragplane_app USING (true)",
                "ALTER TABLE {t} OWNER TO ragplane_app",
                "ALTER TABLE {t} ALTER COLUMN tenant_id DROP NOT NULL",
                "ALTER TABLE {t} RENAME TO pwned",
                "DROP TABLE {t}",
                "CREATE INDEX ON {t} (tenant_id)",
                "CREATE TABLE public.pwned_copy AS SELECT * FROM {t}",
                "CREATE VIEW public.pwned_view AS SELECT * FROM {t}",
                "CREATE TEMP VIEW pwned_view AS SELECT * FROM {t}",
            ):
                await refused(conn, sql.SQL(stmt).format(t=tbl))
            # GRANT without grant option is a no-op (with a warning), not a new privilege
            await in_transaction(conn, sql.SQL("GRANT ALL ON {} TO ragplane_app").format(tbl))
            assert not await scalar(
                conn, "SELECT has_table_privilege(%s, %s, 'TRUNCATE')", (APP_ROLE, t)
            )
        for stmt in (
            "CREATE TABLE public.pwned (tenant_id text)",
            "CREATE TABLE control.pwned (tenant_id text)",
            "CREATE TABLE ragplane_meta.pwned (tenant_id text)",
            "CREATE TEMP TABLE pwned (tenant_id text)",
            "CREATE SCHEMA pwned",
            "CREATE FUNCTION public.pwned() RETURNS int LANGUAGE sql AS 'SELECT 1'",
            "SELECT ragplane_meta.enable_tenant_rls('documents'::regclass)",
            "SELECT lo_import('/etc/passwd')",
            "SELECT pg_read_file('postgresql.conf')",
            "COPY documents TO PROGRAM 'true'",
        ):
            await refused(conn, stmt)
        flags = await fetch(
            conn,
            "SELECT n.nspname || '.' || c.relname, c.relrowsecurity, c.relforcerowsecurity "
            "FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname || '.' || c.relname = ANY(%s)",
            (tables,),
        )
        assert sorted(flags) == sorted((t, True, True) for t in tables)
        assert {t: await policies_for(conn, t) for t in tables} == before


# --------------------------------------------------------------------------- the queue

# procrastinate's tables (migration 0004): what the application role needs to enqueue
# and run jobs, and nothing more; the reporting role gets nothing.
QUEUE_GRANTS: dict[str, set[str]] = {
    "procrastinate.procrastinate_jobs": {"SELECT", "INSERT", "UPDATE", "DELETE"},
    "procrastinate.procrastinate_workers": {"SELECT", "INSERT", "UPDATE", "DELETE"},
    "procrastinate.procrastinate_periodic_defers": {"SELECT", "INSERT", "UPDATE", "DELETE"},
    "procrastinate.procrastinate_events": {"SELECT", "INSERT"},
}
TABLE_PRIVILEGES = ("SELECT", "INSERT", "UPDATE", "DELETE", "TRUNCATE", "REFERENCES", "TRIGGER")


async def test_queue_tables_are_not_tenant_tables_and_grant_only_what_workers_need(
    pg: PgCluster,
) -> None:
    async with connect(pg.app) as conn:
        tables = {
            name
            for (name,) in await fetch(
                conn,
                "SELECT n.nspname || '.' || c.relname FROM pg_class c "
                "JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE n.nspname = 'procrastinate' AND c.relkind IN ('r', 'p')",
            )
        }
        assert tables == set(QUEUE_GRANTS)
        # no tenant_id: the catalog discovery of tenant tables leaves them out for that
        # reason alone (a tenant_id column would put them under the isolation checks)
        tenant_relations = {r.name for r in await discover_tenant_relations(conn)}
        assert not tables & tenant_relations
        for table, granted in QUEUE_GRANTS.items():
            for priv in TABLE_PRIVILEGES:
                for role, expected in ((APP_ROLE, priv in granted), (REPORTING_ROLE, False)):
                    has = await scalar(
                        conn, "SELECT has_table_privilege(%s, %s, %s)", (role, table, priv)
                    )
                    assert has is expected, (role, table, priv)
        owners = await fetch(
            conn,
            "SELECT DISTINCT pg_get_userbyid(c.relowner) FROM pg_class c "
            "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = 'procrastinate'",
        )
        assert owners == [(OWNER_ROLE,)]
        executable = await fetch(
            conn,
            "SELECT p.proname, has_function_privilege(%s, p.oid, 'EXECUTE'), "
            "has_function_privilege(%s, p.oid, 'EXECUTE') FROM pg_proc p "
            "JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = 'procrastinate'",
            (APP_ROLE, REPORTING_ROLE),
        )
        assert executable
        assert {(app, rep) for _, app, rep in executable} == {(True, False)}
        for stmt in (
            "CREATE TABLE procrastinate.pwned (tenant_id text)",
            "CREATE FUNCTION procrastinate.pwned() RETURNS int LANGUAGE sql AS 'SELECT 1'",
            "TRUNCATE procrastinate.procrastinate_jobs",
            "ALTER TABLE procrastinate.procrastinate_jobs ADD COLUMN pwned text",
        ):
            await refused(conn, stmt)
    async with connect(pg.reporting) as rep:
        await refused(rep, "SELECT count(*) FROM procrastinate.procrastinate_jobs")


# --------------------------------------------------------------------------- no tenant


async def test_no_tenant_rows_without_a_tenant_setting(
    clean_db: PgCluster, app_db: Database
) -> None:
    world = await seed(clean_db, app_db)
    async with connect(clean_db.app) as conn:
        assert await current_tenant_setting(conn) is None
        for table, info in world.tables.items():
            select_all = sql.SQL("SELECT {}::text, tenant_id FROM {}").format(
                sql.Identifier(info.pk), ident(table)
            )
            count = sql.SQL("SELECT count(*) FROM {}").format(ident(table))
            assert await fetch(conn, select_all) == []
            assert await scalar(conn, count) == 0
            for tenant in SEEDED_TENANTS:  # asking by name does not help
                where = sql.SQL("SELECT count(*) FROM {} WHERE tenant_id = %s").format(ident(table))
                assert await scalar(conn, where, (tenant,)) == 0
            async with conn.transaction():
                assert await fetch(conn, select_all) == []
        async with app_db.control() as s:
            for table in world.tables:
                row = await s.fetch_one(
                    sql.SQL("SELECT count(*) AS n FROM {}").format(ident(table))  # type: ignore[arg-type]
                )
                assert row == {"n": 0}, table
        # the same data layer with a tenant does see rows: the zeros above are real
        async with app_db.tenant(ALPHA) as s:
            row = await s.fetch_one("SELECT count(*) AS n FROM documents")
            assert row == {"n": len(world.of("public.documents", ALPHA))}


async def test_planner_statistics_do_not_reveal_tenant_rows(
    clean_db: PgCluster, app_db: Database
) -> None:
    """pg_stats hides column statistics of tables whose row-level security applies."""
    world = await seed(clean_db, app_db)
    names = [t.split(".", 1)[1] for t in world.tables]
    async with connect(clean_db.owner) as owner:
        for table in world.tables:
            await owner.execute(sql.SQL("ANALYZE {}").format(ident(table)))
    stats = "SELECT count(*) FROM pg_stats WHERE schemaname = 'public' AND tablename = ANY(%s)"
    async with connect(clean_db.superuser_url) as su:
        assert await scalar(su, stats, (names,)) > 0  # statistics exist
    async with connect(clean_db.app) as conn:
        assert await scalar(conn, stats, (names,)) == 0
        async with conn.transaction():
            await conn.execute("SELECT set_config('app.tenant_id', %s, true)", (ALPHA,))
            assert await scalar(conn, stats, (names,)) == 0


# --------------------------------------------------------------------------- writes


async def test_application_role_cannot_truncate_tenant_tables(
    clean_db: PgCluster, app_db: Database
) -> None:
    world = await seed(clean_db, app_db)
    async with connect(clean_db.app) as conn:
        for table in world.tables:
            for stmt in ("TRUNCATE {}", "TRUNCATE {} CASCADE", "TRUNCATE ONLY {}"):
                err = await refused(conn, sql.SQL(stmt).format(ident(table)), tenant=ALPHA)
                assert "permission denied" in str(err)
                await refused(conn, sql.SQL(stmt).format(ident(table)))
    assert await stored_rows(clean_db, world) == seeded_rows(world)


async def test_application_role_cannot_write_control_plane_tables(pg: PgCluster) -> None:
    async with connect(pg.app) as conn:
        tables = await fetch(
            conn,
            "SELECT n.nspname, c.relname, (SELECT a.attname FROM pg_attribute a "
            "  WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped "
            "  ORDER BY a.attnum LIMIT 1) "
            "FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname IN ('control', 'ragplane_meta') AND c.relkind IN ('r', 'p') "
            "ORDER BY 1, 2",
        )
        names = {f"{s}.{r}" for s, r, _ in tables}
        assert {"control.tenants", "control.api_keys", "ragplane_meta.schema_migrations"} <= names
        before = await fetch(conn, "SELECT id, name, home_region, status FROM control.tenants")
        assert before, "the app role can read control.tenants"
        for schema, relname, col in tables:
            t, c = sql.Identifier(schema, relname), sql.Identifier(col)
            for stmt in (
                sql.SQL("INSERT INTO {} DEFAULT VALUES").format(t),
                sql.SQL("UPDATE {} SET {} = {}").format(t, c, c),
                sql.SQL("DELETE FROM {}").format(t),
                sql.SQL("TRUNCATE {}").format(t),
            ):
                await refused(conn, stmt)
                await refused(conn, stmt, tenant=ALPHA)
        await refused(
            conn,
            "INSERT INTO control.tenants (id, name, home_region) VALUES ('tnt_evil', 'x', 'eu')",
        )
        await refused(conn, "UPDATE control.tenants SET home_region = 'us' WHERE id = %s", (ALPHA,))
        await refused(
            conn,
            "INSERT INTO control.api_keys (id, tenant_id, key_hash) VALUES ('k', %s, '\\x00')",
            (ALPHA,),
        )
        assert await fetch(conn, "SELECT id, name, home_region, status FROM control.tenants") == (
            before
        )


async def test_rows_for_another_tenant_are_refused_by_with_check(
    clean_db: PgCluster, app_db: Database
) -> None:
    world = await seed(clean_db, app_db)
    seeded = seeded_rows(world)
    parents = {fk.child: fk.parent for fk in world.fks}
    async with connect(clean_db.app) as conn:
        for n, table in enumerate(world.tables, start=900):
            parent = parents.get(table)
            for row_tenant, ctx in ((BETA, ALPHA), (ALPHA, None), (ALPHA, BETA), (ALPHA, "")):
                # the parent (if any) belongs to the row's tenant: only the policy stands in the way
                parent_pk = world.of(parent, row_tenant)[0].pk if parent else None
                query, params, _ = insert_statement(table, row_tenant, n, parent_pk)
                err = await refused(conn, query, params, tenant=ctx)
                assert "row-level security" in str(err), err
            # moving one's own row to another tenant
            update = sql.SQL("UPDATE {} SET tenant_id = %s").format(ident(table))
            err = await refused(conn, update, (BETA,), tenant=ALPHA)
            refusal = "permission denied" if table in APPEND_ONLY_TABLES else "row-level security"
            assert refusal in str(err), err
            # upsert onto another tenant's primary key does not touch that row: keys are
            # (tenant_id, id), so it cannot conflict with it and inserts alpha's own row
            if table == "public.documents":
                victim = world.of(table, BETA)[0].pk
                async with conn.transaction(force_rollback=True):
                    await conn.execute("SELECT set_config('app.tenant_id', %s, true)", (ALPHA,))
                    cur = await conn.execute(
                        "INSERT INTO documents (id, tenant_id, namespace, source_uri, title, "
                        "content_hash) VALUES (%s, %s, 'default', 'x', 'pwned', 'h') "
                        "ON CONFLICT (tenant_id, id) DO UPDATE SET title = 'pwned' "
                        "RETURNING tenant_id",
                        (victim, ALPHA),
                    )
                    assert await cur.fetchall() == [(ALPHA,)]
                    cur = await conn.execute("SELECT count(*) FROM documents WHERE title = 'pwned'")
                    assert await cur.fetchone() == (1,)  # alpha's new row, nothing else
    # the same through the data layer
    async with app_db.tenant(ALPHA) as s:
        for table in world.tables:
            parent = parents.get(table)
            parent_pk = world.of(parent, BETA)[0].pk if parent else None
            query, params, _ = insert_statement(table, BETA, 950, parent_pk)
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="row-level security"):
                await savepoint_execute(s.connection, query, params)
    assert await stored_rows(clean_db, world) == seeded


async def savepoint_execute(conn: psycopg.AsyncConnection[Any], query: Any, params: Any) -> None:
    async with conn.transaction():  # a savepoint inside the unit of work
        await conn.execute(query, params)


async def test_updates_and_deletes_of_another_tenants_rows_touch_nothing(
    clean_db: PgCluster, app_db: Database
) -> None:
    world = await seed(clean_db, app_db)
    seeded = seeded_rows(world)
    async with app_db.tenant(ALPHA) as s:
        for table, info in world.tables.items():
            if table in APPEND_ONLY_TABLES:
                continue  # no UPDATE or DELETE at all: refused below
            t, pk, marker = ident(table), sql.Identifier(info.pk), sql.Identifier(info.marker)
            beta_pks = [r.pk for r in world.of(table, BETA)]
            for stmt, params in (
                (
                    sql.SQL("UPDATE {} SET {} = 'pwned' WHERE tenant_id = %s").format(t, marker),
                    (BETA,),
                ),
                (
                    sql.SQL("UPDATE {} SET {} = 'pwned' WHERE tenant_id <> %s").format(t, marker),
                    (ALPHA,),
                ),
                (
                    sql.SQL("UPDATE {} SET {} = 'pwned' WHERE {}::text = ANY(%s)").format(
                        t, marker, pk
                    ),
                    (beta_pks,),
                ),
                (sql.SQL("DELETE FROM {} WHERE tenant_id = %s").format(t), (BETA,)),
                (sql.SQL("DELETE FROM {} WHERE {}::text = ANY(%s)").format(t, pk), (beta_pks,)),
                (
                    sql.SQL(
                        "DELETE FROM {} AS x USING control.tenants AS c "
                        "WHERE x.tenant_id = c.id AND c.id <> %s"
                    ).format(t),
                    (ALPHA,),
                ),
            ):
                assert await s.execute(stmt, params) == 0, (table, stmt.as_string())  # type: ignore[arg-type]
            # the same statements do reach the tenant's own rows: the zeros above are real
            own = sql.SQL("UPDATE {} SET {} = {}").format(t, marker, marker)
            assert await s.execute(own) == len(world.of(table, ALPHA))  # type: ignore[arg-type]
    async with connect(clean_db.app) as conn:
        for table, info in world.tables.items():
            t, marker = ident(table), sql.Identifier(info.marker)
            if table in APPEND_ONLY_TABLES:
                for stmt in (
                    sql.SQL("UPDATE {} SET {} = {}").format(t, marker, marker),
                    sql.SQL("DELETE FROM {}").format(t),
                ):
                    for tenant in (None, ALPHA, BETA):
                        await refused(conn, stmt, tenant=tenant)
                continue
            assert await in_transaction(conn, sql.SQL("DELETE FROM {}").format(t)) == 0
            assert (
                await in_transaction(conn, sql.SQL("UPDATE {} SET {} = 'x'").format(t, marker)) == 0
            )
            for forged in ("", " tnt_beta", "TNT_BETA", "tnt_beta%", "%"):
                n = await in_transaction(conn, sql.SQL("DELETE FROM {}").format(t), tenant=forged)
                assert n == 0, (table, forged)
    assert await stored_rows(clean_db, world) == seeded


# --------------------------------------------------------------------------- references


def normalized(err: psycopg.Error, *secrets: str) -> tuple[Any, ...]:
    """What an error tells its receiver, with the ids the caller supplied blanked out."""
    text = str(err)
    for s in secrets:
        text = text.replace(s, "<id>")
    text = UUID_RE.sub("<id>", text)
    diag = err.diag
    return (err.sqlstate, diag.constraint_name, diag.table_name, text)


async def test_a_parent_of_another_tenant_cannot_be_referenced_and_reveals_nothing(
    clean_db: PgCluster, app_db: Database
) -> None:
    """Pointing a row at another tenant's parent fails exactly as pointing at no parent.

    Every foreign key between tenant tables is found in the catalog. Each child
    row is tried with each of another tenant's parent ids and with random ids
    that exist nowhere; the errors must be indistinguishable, so a tenant cannot
    learn whether an id exists elsewhere (or, for chunks, which ordinals it has).
    """
    world = await seed(clean_db, app_db)
    seeded = seeded_rows(world)
    assert world.fks, "there are foreign keys between tenant tables"
    async with connect(clean_db.app) as conn:
        for fk in world.fks:
            own_child = world.of(fk.child, ALPHA)[0]
            child = world.tables[fk.child]
            (parent_col,) = fk.child_cols
            for victim in world.of(fk.parent, BETA):
                for n in range(4):  # collide with every ordinal the victim's children use
                    fresh = str(uuid.uuid4())
                    outcomes = []
                    for parent_pk in (victim.pk, fresh):
                        query, params, _ = insert_statement(fk.child, ALPHA, n, parent_pk)
                        err = await refused(
                            conn, query, params, tenant=ALPHA, sqlstate=FOREIGN_KEY_VIOLATION
                        )
                        outcomes.append(normalized(err, parent_pk))
                    assert outcomes[0] == outcomes[1], (fk.name, n, outcomes)
                outcomes = []
                for parent_pk in (victim.pk, str(uuid.uuid4())):
                    update = sql.SQL("UPDATE {} SET {} = %s WHERE {}::text = %s").format(
                        ident(fk.child), sql.Identifier(parent_col), sql.Identifier(child.pk)
                    )
                    err = await refused(
                        conn,
                        update,
                        (parent_pk, own_child.pk),
                        tenant=ALPHA,
                        sqlstate=FOREIGN_KEY_VIOLATION,
                    )
                    outcomes.append(normalized(err, parent_pk))
                assert outcomes[0] == outcomes[1], (fk.name, outcomes)
    assert await stored_rows(clean_db, world) == seeded


# For each tenant table: an INSERT naming its primary key explicitly, and a fresh key.
PK_PROBES: dict[str, tuple[str, Any]] = {
    "public.documents": (
        "INSERT INTO documents (id, tenant_id, namespace, source_uri, content_hash) "
        "VALUES (%(pk)s, %(tenant)s, 'default', %(uri)s, 'h')",
        lambda: str(uuid.uuid4()),
    ),
    "public.kb_state": (
        "INSERT INTO kb_state (tenant_id, namespace, active_model) "
        "VALUES (%(tenant)s, %(pk)s, 'probe')",
        lambda: f"ns-probe-{uuid.uuid4().hex}",
    ),
    "public.kb_terms": (
        "INSERT INTO kb_terms (tenant_id, namespace, embedding_model, lexeme, df) "
        "VALUES (%(tenant)s, 'probe', 'test-3d', %(pk)s, 1)",
        lambda: f"lex-probe-{uuid.uuid4().hex}",
    ),
    "public.kb_postings": (
        "INSERT INTO kb_postings (tenant_id, namespace, embedding_model, lexeme, chunk_id, tf, "
        "dl) VALUES (%(tenant)s, 'probe', 'test-3d', %(pk)s, gen_random_uuid(), 1, 1)",
        lambda: f"lex-probe-{uuid.uuid4().hex}",
    ),
    "public.kb_text_stats": (
        "INSERT INTO kb_text_stats (tenant_id, namespace, embedding_model, chunks, "
        "tsv_length_total) VALUES (%(tenant)s, %(pk)s, 'test-3d', 1, 1)",
        lambda: f"ns-probe-{uuid.uuid4().hex}",
    ),
    "public.chunks": (
        "INSERT INTO chunks (id, tenant_id, document_id, namespace, ordinal, text, "
        "embedding_model) VALUES (%(pk)s, %(tenant)s, %(parent)s, 'default', 1000 + %(i)s, "
        "'probe', 'm')",
        lambda: str(uuid.uuid4()),
    ),
    "public.chat_sessions": (
        "INSERT INTO chat_sessions (id, tenant_id) VALUES (%(pk)s, %(tenant)s)",
        lambda: str(uuid.uuid4()),
    ),
    "public.chat_messages": (
        # an identity column, but OVERRIDING SYSTEM VALUE lets any writer choose the id
        "INSERT INTO chat_messages (id, tenant_id, session_id, role, content) "
        "OVERRIDING SYSTEM VALUE VALUES (%(pk)s, %(tenant)s, %(parent)s, 'user', 'probe')",
        lambda: str(random.randrange(10**12, 10**13)),
    ),
    "public.request_log": (
        "INSERT INTO request_log (request_id, tenant_id, route, status, latency_ms) "
        "VALUES (%(pk)s, %(tenant)s, 'probe', 200, 1)",
        lambda: f"req_probe_{uuid.uuid4().hex}",
    ),
    "public.ingest_jobs": (
        "INSERT INTO ingest_jobs (id, tenant_id, namespace) VALUES (%(pk)s, %(tenant)s, 'probe')",
        lambda: str(uuid.uuid4()),
    ),
    "public.ingest_uploads": (
        "INSERT INTO ingest_uploads (id, tenant_id, job_id, ordinal, source_uri, size, data) "
        "VALUES (%(pk)s, %(tenant)s, %(parent)s, %(i)s, 'probe', 0, '')",
        lambda: str(uuid.uuid4()),
    ),
    "public.llm_ledger": (
        "INSERT INTO llm_ledger (id, tenant_id, created_at, request_id, alias, api, stream, "
        "status, http_status, attempts, latency_ms) VALUES (%(pk)s, %(tenant)s, now(), "
        "'probe', 'probe', 'openai', false, 'ok', 200, 1, 1)",
        lambda: str(uuid.uuid4()),
    ),
    "public.semantic_cache": (
        "INSERT INTO semantic_cache (id, tenant_id, scope, query_key, query, embedding_model, "
        "embedding, answer, model_alias, namespace, kb_version, expires_at) VALUES (%(pk)s, "
        "%(tenant)s, 'probe', %(uri)s, 'probe', 'test-3d', '[1,2,3]', 'probe', 'probe', "
        "'default', 1, now())",
        lambda: str(uuid.uuid4()),
    ),
    "public.eval_samples": (
        "INSERT INTO eval_samples (request_id, tenant_id, query, answer) "
        "VALUES (%(pk)s, %(tenant)s, 'probe', 'probe')",
        lambda: f"req_probe_{uuid.uuid4().hex}",
    ),
}


async def test_reusing_another_tenants_primary_key_reveals_nothing(
    clean_db: PgCluster, app_db: Database
) -> None:
    """Primary keys are (tenant_id, id): inserting a row with another tenant's id behaves
    exactly like inserting one with a fresh id, so it cannot confirm the id exists."""
    world = await seed(clean_db, app_db)
    assert set(PK_PROBES) == set(world.tables), "add a primary-key probe for the new table"
    async with connect(clean_db.app) as conn:
        for i, (table, (insert, fresh)) in enumerate(sorted(PK_PROBES.items())):
            fk = world.parent_fk(table)
            parent = world.of(fk.parent, ALPHA)[0].pk if fk else None
            outcomes = []
            for n, pk in enumerate((fresh(), world.of(table, BETA)[0].pk)):
                params = {
                    "pk": pk,
                    "tenant": ALPHA,
                    "parent": parent,
                    "uri": f"probe-{i}-{n}",
                    "i": 2 * i + n,
                }
                try:
                    await in_transaction(conn, insert, params, tenant=ALPHA)
                    outcomes.append("inserted")
                except psycopg.Error as exc:
                    outcomes.append(str(exc.sqlstate))
            assert outcomes == ["inserted", "inserted"], (table, outcomes)


# --------------------------------------------------------------------------- pooling


@asynccontextmanager
async def single_connection_db(url: str) -> AsyncIterator[Database]:
    async with Database(url, min_size=1, max_size=1, name="isolation") as db:
        yield db


async def backend_pid_and_visible(db: Database, world: World) -> tuple[int, str | None, int]:
    """In a Database.control() unit: backend pid, the tenant setting, tenant rows visible."""
    async with db.control() as s:
        pid = await s.fetch_one("SELECT pg_backend_pid() AS pid")
        setting = await s.fetch_one("SELECT current_setting('app.tenant_id', true) AS v")
        total = 0
        for table in world.tables:
            row = await s.fetch_one(
                sql.SQL("SELECT count(*) AS n FROM {}").format(ident(table))  # type: ignore[arg-type]
            )
            assert row is not None
            total += row["n"]
    assert pid is not None
    assert setting is not None
    return pid["pid"], setting["v"], total


async def test_tenant_unit_of_work_leaves_nothing_on_the_pooled_connection(
    clean_db: PgCluster, app_db: Database
) -> None:
    world = await seed(clean_db, app_db)
    async with single_connection_db(clean_db.app) as db:
        pid0, setting, visible = await backend_pid_and_visible(db, world)
        assert (setting or "", visible) == ("", 0)
        for tenant in (ALPHA, BETA, ALPHA):
            async with db.tenant(tenant) as s:
                pid = await s.fetch_one("SELECT pg_backend_pid() AS pid")
                assert pid == {"pid": pid0}
                for table, info in world.tables.items():
                    rows = await s.fetch_all(
                        sql.SQL("SELECT {}::text AS pk, tenant_id FROM {}").format(  # type: ignore[arg-type]
                            sql.Identifier(info.pk), ident(table)
                        )
                    )
                    assert sorted((r["pk"], r["tenant_id"]) for r in rows) == sorted(
                        (r.pk, r.tenant) for r in world.of(table, tenant)
                    )
            pid, setting, visible = await backend_pid_and_visible(db, world)
            assert pid == pid0, "the pool should have handed back the same connection"
            assert (setting or "", visible) == ("", 0), tenant


async def test_session_level_setting_does_not_leak_into_the_next_unit_of_work(
    clean_db: PgCluster, app_db: Database
) -> None:
    """A session-level set_config/SET left on a pooled connection is reset before reuse."""
    world = await seed(clean_db, app_db)
    n_beta = len([r for r in world.rows if r.tenant == BETA])
    n_gamma_docs = len(world.of("public.documents", "tnt_gamma"))
    leaks = (
        "SELECT set_config('app.tenant_id', 'tnt_beta', false)",
        "SET app.tenant_id = 'tnt_beta'",
        "SET SESSION app.tenant_id = 'tnt_beta'",
    )
    async with single_connection_db(clean_db.app) as db:
        pid0, _, _ = await backend_pid_and_visible(db, world)
        for stmt in leaks:
            for unit in ("control", "tenant"):
                cm = db.control() if unit == "control" else db.tenant(ALPHA)
                async with cm as s:
                    await s.execute(stmt)  # type: ignore[arg-type]
                    # the leak is real while it lasts: beta's rows are visible now
                    total = 0
                    for table in world.tables:
                        q = sql.SQL("SELECT count(*) AS n FROM {}").format(ident(table))
                        row = await s.fetch_one(q)  # type: ignore[arg-type]
                        assert row is not None
                        total += row["n"]
                    assert total == n_beta, (stmt, unit)
                pid, setting, visible = await backend_pid_and_visible(db, world)
                assert pid == pid0
                assert (setting or "", visible) == ("", 0), (stmt, unit)
                async with db.tenant("tnt_gamma") as s:
                    row = await s.fetch_one("SELECT count(*) AS n FROM documents")
                    assert row == {"n": n_gamma_docs}
                    beta = await s.fetch_one(
                        "SELECT count(*) AS n FROM documents WHERE tenant_id = 'tnt_beta'"
                    )
                    assert beta == {"n": 0}
        # a unit of work that fails after leaking the setting leaves nothing either
        with pytest.raises(psycopg.errors.DivisionByZero):
            await leak_then_fail(db)
        pid, setting, visible = await backend_pid_and_visible(db, world)
        assert (setting or "", visible) == ("", 0)


async def leak_then_fail(db: Database) -> None:
    async with db.control() as s:
        await s.execute("SELECT set_config('app.tenant_id', 'tnt_beta', false)")
        await s.execute("SELECT 1 / 0")


# --------------------------------------------------------------------------- other roles


async def test_reporting_role_reads_every_tenant_and_writes_nothing(
    clean_db: PgCluster, app_db: Database
) -> None:
    world = await seed(clean_db, app_db)
    seeded = seeded_rows(world)
    async with connect(clean_db.reporting) as rep:
        assert await scalar(rep, "SELECT current_user") == REPORTING_ROLE
        assert await stored_rows(clean_db, world) == seeded  # all tenants, without a tenant
        for table, info in world.tables.items():
            t, pk = ident(table), sql.Identifier(info.pk)
            async with rep.transaction():  # a tenant setting does not narrow it
                await rep.execute("SELECT set_config('app.tenant_id', %s, true)", (ALPHA,))
                rows = await fetch(rep, sql.SQL("SELECT {}::text, tenant_id FROM {}").format(pk, t))
            assert sorted(rows) == sorted((r.pk, r.tenant) for r in world.of(table))
            tenants = await fetch(rep, sql.SQL("SELECT DISTINCT tenant_id FROM {}").format(t))
            assert {x for (x,) in tenants} == set(SEEDED_TENANTS)
            for stmt in (
                sql.SQL("INSERT INTO {} DEFAULT VALUES").format(t),
                sql.SQL("UPDATE {} SET tenant_id = tenant_id").format(t),
                sql.SQL("DELETE FROM {}").format(t),
                sql.SQL("TRUNCATE {}").format(t),
            ):
                await refused(rep, stmt)
                await refused(rep, stmt, tenant=ALPHA)
            parent = next((fk.parent for fk in world.fks if fk.child == table), None)
            parent_pk = world.of(parent, ALPHA)[0].pk if parent else None
            query, params, _ = insert_statement(table, ALPHA, 990, parent_pk)
            await refused(rep, query, params, tenant=ALPHA)
        await refused(rep, "UPDATE control.tenants SET name = 'x'")
        await refused(rep, "DELETE FROM control.api_keys")
        for role in (APP_ROLE, OWNER_ROLE):
            await refused(rep, sql.SQL("SET ROLE {}").format(sql.Identifier(role)))
    assert await stored_rows(clean_db, world) == seeded


async def test_owner_is_bound_by_forced_row_level_security(
    clean_db: PgCluster, app_db: Database, owner_db: Database
) -> None:
    world = await seed(clean_db, app_db)
    async with connect(clean_db.owner) as owner:
        assert await scalar(owner, "SELECT current_user") == OWNER_ROLE
        assert await role_attributes(owner, OWNER_ROLE) == (
            False,  # not superuser
            False,  # no BYPASSRLS
            True,  # CREATEROLE (it creates the app and reporting roles)
            False,
            False,
            True,
        )
        for table in world.tables:
            count = sql.SQL("SELECT count(*) FROM {}").format(ident(table))
            assert await scalar(owner, count) == 0, table
            async with owner.transaction():  # the tenant policy is for the app role only
                await owner.execute("SELECT set_config('app.tenant_id', %s, true)", (ALPHA,))
                assert await scalar(owner, count) == 0, table
    async with owner_db.control() as s:
        row = await s.fetch_one("SELECT count(*) AS n FROM documents")
        assert row == {"n": 0}
    async with owner_db.tenant(ALPHA) as s:
        row = await s.fetch_one("SELECT count(*) AS n FROM chunks")
        assert row == {"n": 0}
    assert world.of("public.chunks", ALPHA)
