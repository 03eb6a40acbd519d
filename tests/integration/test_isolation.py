"""Adversarial tenant isolation against the real database (no mocks).

Every table with a ``tenant_id`` column is discovered from the catalog. The
tenant tables are seeded for several tenants through ``Database.tenant`` as the
application role (so the policies' WITH CHECK is exercised), then read well
over a thousand times at random -- through the data layer and through raw SQL
as the application role -- with correct, wrong, missing and forged tenant
contexts and many query shapes. A foreign tenant's row must never come back;
without a valid tenant nothing comes back; with the right tenant exactly that
tenant's seeded rows come back.

The random choices come from one seed, printed at the start of each randomized
test and part of every assertion message. Reproduce a failure with
``ISOLATION_SEED=<seed> bash scripts/test.sh tests/integration/test_isolation.py``.

Role capabilities (what the application, reporting and owner roles can and
cannot do) are in ``test_isolation_roles.py``.
"""

from __future__ import annotations

import os
import random
import re
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import psycopg
import pytest
from psycopg import sql

from ragplane.data import Database
from ragplane.errors import TenantScopeError
from tests.conftest import TENANT_TABLES, PgCluster

APP_ROLE = "ragplane_app"
OWNER_ROLE = "ragplane_owner"
REPORTING_ROLE = "ragplane_reporting"

SEEDED_TENANTS = ("tnt_alpha", "tnt_beta", "tnt_gamma", "tnt_acme_eu")
EMPTY_TENANT = "tnt_globex_us"  # registered in control.tenants, owns no rows
KNOWN_TENANTS = (*SEEDED_TENANTS, EMPTY_TENANT)
GHOST_TENANT = "tnt_nobody"  # well formed, not registered
TARGETS = (*KNOWN_TENANTS, GHOST_TENANT)

# Control-plane tables carry tenant_id but are not tenant-scoped: the edge reads
# them before a tenant is known (ARCHITECTURE.md), and the application role may
# only read them. A reviewed exemption, by exact name: any other table with a
# tenant_id column must be row-level secured.
CONTROL_PLANE_TABLES = frozenset({"control.api_keys", "control.kb_namespaces"})

# How the suite seeds each tenant table: primary key and a text column that
# carries a per-row marker. A new tenant table fails the suite until it is
# added here (and to TENANT_TABLES in conftest, so clean_db truncates it).
TABLE_SHAPES: dict[str, tuple[str, str]] = {
    "public.kb_state": ("namespace", "active_model"),
    "public.kb_terms": ("lexeme", "namespace"),
    "public.kb_postings": ("lexeme", "namespace"),
    "public.kb_text_stats": ("namespace", "embedding_model"),
    "public.documents": ("id", "title"),
    "public.chunks": ("id", "text"),
    "public.chat_sessions": ("id", "subject"),
    "public.chat_messages": ("id", "content"),
    "public.request_log": ("request_id", "route"),
    "public.ingest_jobs": ("id", "namespace"),
    "public.ingest_uploads": ("id", "source_uri"),
    "public.llm_ledger": ("id", "request_id"),
    "public.semantic_cache": ("id", "answer"),
    "public.eval_samples": ("request_id", "answer"),
}

# Tables the application role may only insert into and read (no UPDATE, no DELETE):
# the role suite expects every change to their rows to be refused outright.
APPEND_ONLY_TABLES = frozenset({"public.llm_ledger"})

# Forged tenant contexts. Malformed ones are refused by Database.tenant
# (TenantScopeError); the well-formed ones name no tenant that owns rows. Raw
# SQL gets all of them, and NULL.
FORGED_MALFORMED: tuple[str, ...] = (
    "",
    " ",
    " tnt_alpha",
    "tnt_alpha ",
    "\ttnt_alpha",
    "tnt_alpha\n",
    "TNT_ALPHA",
    "Tnt_Alpha",
    "tnt_alpha%",
    "%",
    "_",
    "tnt_%",
    "tnt_alpha' OR '1'='1",
    "' OR 1=1 --",
    "tnt_alpha'; RESET app.tenant_id; --",
    "tnt_alpha,tnt_beta",
    "tnt_alpha;tnt_beta",
    "{tnt_alpha,tnt_beta}",
    "tnt_alpha|tnt_beta",
    "*",
    ".*",
    "tnt-alpha",
    "tnt_alph\u0430",  # Cyrillic a
    "\uff54nt_alpha",  # fullwidth t
    "NULL",
    "'tnt_alpha'",
    '"tnt_alpha"',
    "tnt_alpha--",
    "\\x74nt_alpha",
    "t" * 64,
    "tnt_alpha" * 1200,  # ~10 kB
)
FORGED_WELL_FORMED: tuple[str, ...] = (
    GHOST_TENANT,
    "tnt_alph_",
    "tnt_alpha_",
    "tnt_alphaa",
    "null",
    "true",
    "all",
    "t" + "a" * 62,
)
FORGED_RAW: tuple[str | None, ...] = (*FORGED_MALFORMED, *FORGED_WELL_FORMED, None)
FORGED_NON_STR: tuple[object, ...] = (None, 0, b"tnt_alpha", ["tnt_alpha"], ("tnt_alpha",))

MIN_READS = 1000
RAW_ITERATIONS = 3000
DATA_LAYER_ITERATIONS = 3000

# The whole expression of a permissive policy the application role is subject
# to: tenant_id equals the setting, nothing more (no OR, no function around it).
# (The setting may be wrapped in a scalar subquery, the usual RLS plan-caching idiom.)
POLICY_EXPR = re.compile(
    r"\(*\s*tenant_id\s*=\s*(?P<sub>\(\s*SELECT\s+)?"
    r"current_setting\('app\.tenant_id'(::text)?,\s*true\)"
    r"(?(sub)(\s+AS\s+current_setting)?\s*\))\s*\)*",
    re.IGNORECASE,
)


def is_tenant_expr(expr: str | None) -> bool:
    return expr is not None and POLICY_EXPR.fullmatch(expr.strip()) is not None


# --------------------------------------------------------------------------- catalog


@dataclass(frozen=True)
class TenantRelation:
    name: str  # schema-qualified
    relkind: str
    rls: bool
    force_rls: bool
    owner: str
    tenant_not_null: bool
    tenant_indexed: bool


@dataclass(frozen=True)
class ForeignKey:
    name: str
    child: str
    parent: str
    child_cols: tuple[str, ...]  # without tenant_id
    parent_cols: tuple[str, ...]


def ident(qualified: str) -> sql.Identifier:
    schema, rel = qualified.split(".", 1)
    return sql.Identifier(schema, rel)


async def discover_tenant_relations(conn: psycopg.AsyncConnection[Any]) -> list[TenantRelation]:
    """Every relation outside the system schemas that has a tenant_id column."""
    cur = await conn.execute(
        """
        SELECT n.nspname || '.' || c.relname, c.relkind::text, c.relrowsecurity,
               c.relforcerowsecurity, pg_get_userbyid(c.relowner), a.attnotnull,
               EXISTS (SELECT 1 FROM pg_index i
                       WHERE i.indrelid = c.oid AND i.indkey[0] = a.attnum)
        FROM pg_attribute a
        JOIN pg_class c ON c.oid = a.attrelid
        JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE a.attname = 'tenant_id' AND a.attnum > 0 AND NOT a.attisdropped
          AND c.relkind IN ('r', 'p', 'v', 'm', 'f')
          AND n.nspname NOT IN ('pg_catalog', 'information_schema')
          AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp%'
        ORDER BY 1
        """
    )
    return [TenantRelation(*row) for row in await cur.fetchall()]


async def discover_tenant_tables(conn: psycopg.AsyncConnection[Any]) -> list[str]:
    """The tables under test: every table with tenant_id that is not a reviewed exemption."""
    return [
        r.name
        for r in await discover_tenant_relations(conn)
        if r.relkind in ("r", "p") and r.name not in CONTROL_PLANE_TABLES
    ]


async def discover_foreign_keys(
    conn: psycopg.AsyncConnection[Any], tables: Sequence[str]
) -> list[ForeignKey]:
    cur = await conn.execute(
        """
        SELECT con.conname, cn.nspname || '.' || cc.relname, pn.nspname || '.' || pc.relname,
               array(SELECT a.attname FROM unnest(con.conkey) WITH ORDINALITY AS k(attnum, i)
                     JOIN pg_attribute a ON a.attrelid = con.conrelid AND a.attnum = k.attnum
                     ORDER BY k.i),
               array(SELECT a.attname FROM unnest(con.confkey) WITH ORDINALITY AS k(attnum, i)
                     JOIN pg_attribute a ON a.attrelid = con.confrelid AND a.attnum = k.attnum
                     ORDER BY k.i)
        FROM pg_constraint con
        JOIN pg_class cc ON cc.oid = con.conrelid
        JOIN pg_namespace cn ON cn.oid = cc.relnamespace
        JOIN pg_class pc ON pc.oid = con.confrelid
        JOIN pg_namespace pn ON pn.oid = pc.relnamespace
        WHERE con.contype = 'f'
        ORDER BY 1
        """
    )
    fks = []
    for name, child, parent, ccols, pcols in await cur.fetchall():
        if child in tables and parent in tables:
            pairs = [(c, p) for c, p in zip(ccols, pcols, strict=True) if c != "tenant_id"]
            fks.append(
                ForeignKey(
                    name=name,
                    child=child,
                    parent=parent,
                    child_cols=tuple(c for c, _ in pairs),
                    parent_cols=tuple(p for _, p in pairs),
                )
            )
    return fks


async def policies_for(conn: psycopg.AsyncConnection[Any], table: str) -> list[dict[str, Any]]:
    schema, rel = table.split(".", 1)
    cur = await conn.execute(
        "SELECT policyname, permissive, roles::text[] AS roles, cmd, qual, with_check "
        "FROM pg_policies WHERE schemaname = %s AND tablename = %s ORDER BY policyname",
        (schema, rel),
    )
    cols = [d.name for d in cur.description or ()]
    return [dict(zip(cols, row, strict=True)) for row in await cur.fetchall()]


# --------------------------------------------------------------------------- seeding


@dataclass(frozen=True)
class Row:
    table: str
    pk: str
    tenant: str
    marker: str

    @property
    def triple(self) -> tuple[str, str, str]:
        return (self.table, self.pk, self.tenant)


@dataclass(frozen=True)
class TableInfo:
    name: str
    pk: str
    marker: str
    vector: str | None


@dataclass
class World:
    tables: dict[str, TableInfo]
    fks: list[ForeignKey]
    rows: list[Row] = field(default_factory=list)

    def of(self, table: str, tenant: str | None = None) -> list[Row]:
        return [r for r in self.rows if r.table == table and (tenant is None or r.tenant == tenant)]

    def parent_fk(self, table: str) -> ForeignKey | None:
        fks = [fk for fk in self.fks if fk.child == table]
        assert len(fks) <= 1, f"{table}: more than one parent table; extend the seeding"
        return fks[0] if fks else None


def insert_statement(
    table: str, tenant: str, n: int, parent: str | None
) -> tuple[str, tuple[Any, ...], str]:
    """An INSERT ... RETURNING <pk>::text for one row of ``table``, and the row's marker."""
    marker = f"{tenant}|{table}|{parent or '-'}|{n}"
    if table == "public.documents":
        return (
            "INSERT INTO documents (tenant_id, namespace, source_uri, title, content_hash) "
            "VALUES (%s, 'default', %s, %s, %s) RETURNING id::text",
            (tenant, f"s3://{tenant}/doc-{n}.md", marker, f"sha256:{tenant}:{n}"),
            marker,
        )
    if table == "public.kb_state":
        return (
            "INSERT INTO kb_state (tenant_id, namespace, active_model, kb_version) "
            "VALUES (%s, %s, %s, %s) RETURNING namespace",
            (tenant, f"{tenant}-ns-{n}", marker, n),
            marker,
        )
    if table == "public.kb_terms":
        return (
            "INSERT INTO kb_terms (tenant_id, namespace, embedding_model, lexeme, df) "
            "VALUES (%s, %s, 'test-3d', %s, %s) RETURNING lexeme",
            (tenant, marker, f"{tenant}-lex-{n}", n + 1),
            marker,
        )
    if table == "public.kb_postings":
        return (
            "INSERT INTO kb_postings (tenant_id, namespace, embedding_model, lexeme, chunk_id, "
            "tf, dl) VALUES (%s, %s, 'test-3d', %s, gen_random_uuid(), 1, %s) RETURNING lexeme",
            (tenant, marker, f"{tenant}-lex-{n}", n + 1),
            marker,
        )
    if table == "public.kb_text_stats":
        return (
            "INSERT INTO kb_text_stats (tenant_id, namespace, embedding_model, chunks, "
            "tsv_length_total) VALUES (%s, %s, %s, %s, %s) RETURNING namespace",
            (tenant, f"{tenant}-stats-{n}", marker, n + 1, 10 * n),
            marker,
        )
    if table == "public.chunks":
        # a model without an HNSW index: 3-dimensional test vectors are valid for it
        return (
            "INSERT INTO chunks (tenant_id, document_id, namespace, ordinal, text, "
            "embedding_model, embedding) VALUES (%s, %s, 'default', %s, %s, 'test-3d', "
            "%s::vector) RETURNING id::text",
            (tenant, parent, n, marker, f"[{n + 1},{len(tenant)},0.5]"),
            marker,
        )
    if table == "public.chat_sessions":
        return (
            "INSERT INTO chat_sessions (tenant_id, subject) VALUES (%s, %s) RETURNING id::text",
            (tenant, marker),
            marker,
        )
    if table == "public.chat_messages":
        return (
            "INSERT INTO chat_messages (tenant_id, session_id, role, content) "
            "VALUES (%s, %s, %s, %s) RETURNING id::text",
            (tenant, parent, ("user", "assistant")[n % 2], marker),
            marker,
        )
    if table == "public.request_log":
        return (
            "INSERT INTO request_log (request_id, tenant_id, route, status, latency_ms) "
            "VALUES (%s, %s, %s, %s, %s) RETURNING request_id",
            (f"req_{tenant}_{n:04d}", tenant, marker, 200 + n % 3, 1.5 * n),
            marker,
        )
    if table == "public.ingest_jobs":
        return (
            "INSERT INTO ingest_jobs (tenant_id, namespace, documents_total) "
            "VALUES (%s, %s, %s) RETURNING id::text",
            (tenant, marker, n),
            marker,
        )
    if table == "public.ingest_uploads":
        return (
            "INSERT INTO ingest_uploads (tenant_id, job_id, ordinal, source_uri, size, data) "
            "VALUES (%s, %s, %s, %s, 4, %s) RETURNING id::text",
            (tenant, parent, n, marker, marker.encode()[:4]),
            marker,
        )
    if table == "public.llm_ledger":
        return (
            "INSERT INTO llm_ledger (tenant_id, id, created_at, request_id, alias, api, stream, "
            "status, http_status, attempts, latency_ms, input_tokens) VALUES (%s, "
            "gen_random_uuid(), now(), %s, 'support-quality', 'openai', false, 'ok', 200, 1, "
            "12.5, %s) RETURNING id::text",
            (tenant, marker, n),
            marker,
        )
    if table == "public.semantic_cache":
        # a 3-dimensional vector: the column takes any dimension (each scope has one model)
        return (
            "INSERT INTO semantic_cache (tenant_id, scope, query_key, query, embedding_model, "
            "embedding, answer, model_alias, namespace, kb_version, expires_at) VALUES (%s, "
            "'scope', %s, %s, 'test-3d', %s::vector, %s, 'support-quality', 'default', 1, "
            "now() + interval '1 hour') RETURNING id::text",
            (tenant, f"key-{n}", f"question {n}", f"[{n + 1},{len(tenant)},0.5]", marker),
            marker,
        )
    if table == "public.eval_samples":
        return (
            "INSERT INTO eval_samples (tenant_id, request_id, query, answer) "
            "VALUES (%s, %s, %s, %s) RETURNING request_id",
            (tenant, f"req_{tenant}_{n:04d}", f"question {n}", marker),
            marker,
        )
    raise AssertionError(f"no insert statement for {table}; add it to the isolation suite")


async def load_world(conn: psycopg.AsyncConnection[Any]) -> World:
    tables = await discover_tenant_tables(conn)
    assert set(tables) == set(TABLE_SHAPES), (
        "tenant tables in the catalog differ from the ones this suite seeds and reads: "
        f"catalog={sorted(tables)} suite={sorted(TABLE_SHAPES)}; cover the new table here"
    )
    assert {f"public.{t}" for t in TENANT_TABLES} == set(tables), (
        "tests/conftest.py TENANT_TABLES must list every tenant table (clean_db truncates them)"
    )
    cur = await conn.execute(
        "SELECT n.nspname || '.' || c.relname, a.attname FROM pg_attribute a "
        "JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE a.atttypid = 'vector'::regtype AND NOT a.attisdropped"
    )
    vectors = dict(await cur.fetchall())
    infos = {
        t: TableInfo(t, TABLE_SHAPES[t][0], TABLE_SHAPES[t][1], vectors.get(t)) for t in tables
    }
    return World(tables=infos, fks=await discover_foreign_keys(conn, tables))


async def seed_world(db: Database, pg: PgCluster, rng: random.Random) -> World:
    """Seed every tenant table for SEEDED_TENANTS through Database.tenant (app role).

    Returns the rows written, checked against what the reporting role (which
    sees every tenant) finds in the database afterwards.
    """
    async with await psycopg.AsyncConnection.connect(pg.app, autocommit=True) as conn:
        world = await load_world(conn)
    roots = [t for t in world.tables if world.parent_fk(t) is None]
    children = [t for t in world.tables if world.parent_fk(t) is not None]
    for fk in world.fks:
        assert fk.parent in roots, f"{fk.child} -> {fk.parent}: nested parents; extend seeding"
    for tenant in SEEDED_TENANTS:
        async with db.tenant(tenant) as s:
            conn = s.connection
            for table in roots:
                for n in range(rng.randint(2, 4)):
                    query, params, marker = insert_statement(table, s.tenant_id, n, None)
                    row = await (await conn.execute(query, params)).fetchone()  # type: ignore[arg-type]
                    assert row is not None
                    world.rows.append(Row(table, next(iter(row.values())), tenant, marker))
            for table in children:
                fk = world.parent_fk(table)
                assert fk is not None
                for parent in world.of(fk.parent, tenant):
                    for n in range(rng.randint(1, 3)):
                        query, params, marker = insert_statement(table, tenant, n, parent.pk)
                        row = await (await conn.execute(query, params)).fetchone()  # type: ignore[arg-type]
                        assert row is not None
                        world.rows.append(Row(table, next(iter(row.values())), tenant, marker))
    # ground truth, independently of the application role's policy
    async with await psycopg.AsyncConnection.connect(pg.reporting, autocommit=True) as rep:
        for table, info in world.tables.items():
            cur = await rep.execute(
                sql.SQL("SELECT {}::text, tenant_id, {} FROM {}").format(
                    sql.Identifier(info.pk), sql.Identifier(info.marker), ident(table)
                )
            )
            stored = sorted(await cur.fetchall())
            seeded = sorted((r.pk, r.tenant, r.marker) for r in world.of(table))
            assert stored == seeded, f"{table}: stored rows differ from the seeded rows"
            assert {t for _, t, _ in stored} == set(SEEDED_TENANTS), table
    return world


# --------------------------------------------------------------------------- query shapes


@dataclass
class Query:
    shape: str
    table: str
    text: sql.Composable
    params: Any  # a tuple, or a dict for named placeholders
    expected: list[tuple[Any, ...]]
    ordered: bool = False
    tenant_cols: tuple[int, ...] = ()  # result columns holding a tenant table's tenant_id
    rowset: bool = False  # rows of tenant tables: nothing at all without a valid tenant


def triple(t: TableInfo, alias: str = "x") -> sql.Composed:
    return sql.SQL("{lbl}::text AS tbl, {a}.{pk}::text AS pk, {a}.tenant_id").format(
        lbl=sql.Literal(t.name), a=sql.Identifier(alias), pk=sql.Identifier(t.pk)
    )


def rel(t: TableInfo | str, alias: str = "x") -> sql.Composed:
    name = t.name if isinstance(t, TableInfo) else t
    return sql.SQL("{} AS {}").format(ident(name), sql.Identifier(alias))


def pk_text(t: TableInfo, alias: str = "x") -> sql.Composed:
    return sql.SQL("{}.{}::text").format(sql.Identifier(alias), sql.Identifier(t.pk))


def in_table(v: list[Row], t: TableInfo) -> list[Row]:
    return [r for r in v if r.table == t.name]


Shape = Callable[[random.Random, World, TableInfo, str, list[Row]], Query]
Q = sql.SQL


def s_all_rows(rng: random.Random, w: World, t: TableInfo, f: str, v: list[Row]) -> Query:
    text = Q("SELECT {} FROM {}").format(triple(t), rel(t))
    return Query(
        "all_rows", t.name, text, (), [r.triple for r in in_table(v, t)], False, (2,), True
    )


def s_where_target(rng: random.Random, w: World, t: TableInfo, f: str, v: list[Row]) -> Query:
    text = Q("SELECT {} FROM {} WHERE x.tenant_id = %s").format(triple(t), rel(t))
    exp = [r.triple for r in in_table(v, t) if r.tenant == f]
    return Query("where_tenant", t.name, text, (f,), exp, False, (2,), True)


def s_where_or_true(rng: random.Random, w: World, t: TableInfo, f: str, v: list[Row]) -> Query:
    text = Q("SELECT {} FROM {} WHERE x.tenant_id = %s OR 1 = 1").format(triple(t), rel(t))
    return Query(
        "where_or_true", t.name, text, (f,), [r.triple for r in in_table(v, t)], False, (2,), True
    )


def s_where_any(rng: random.Random, w: World, t: TableInfo, f: str, v: list[Row]) -> Query:
    text = Q("SELECT {} FROM {} WHERE x.tenant_id = ANY(%s)").format(triple(t), rel(t))
    exp = [r.triple for r in in_table(v, t)]
    return Query("where_any_tenant", t.name, text, (list(TARGETS),), exp, False, (2,), True)


def s_where_like(rng: random.Random, w: World, t: TableInfo, f: str, v: list[Row]) -> Query:
    pattern = rng.choice(["%", "tnt_%", f + "%", "%" + f[-3:]])
    text = Q("SELECT {} FROM {} WHERE x.tenant_id LIKE %s").format(triple(t), rel(t))
    regex = re.compile(re.escape(pattern).replace("%", ".*").replace("_", "."), re.DOTALL)
    exp = [r.triple for r in in_table(v, t) if regex.fullmatch(r.tenant)]
    return Query("where_like", t.name, text, (pattern,), exp, False, (2,), True)


def s_not_ctx(rng: random.Random, w: World, t: TableInfo, f: str, v: list[Row]) -> Query:
    text = Q(
        "SELECT {} FROM {} "
        "WHERE x.tenant_id IS DISTINCT FROM current_setting('app.tenant_id', true)"
    ).format(triple(t), rel(t))
    return Query("other_than_context", t.name, text, (), [], False, (2,), True)


def s_known_pks(rng: random.Random, w: World, t: TableInfo, f: str, v: list[Row]) -> Query:
    # the attacker knows another tenant's primary keys
    victim = f if w.of(t.name, f) else rng.choice(SEEDED_TENANTS)
    pks = [r.pk for r in w.of(t.name, victim)]
    text = Q("SELECT {} FROM {} WHERE {} = ANY(%s)").format(triple(t), rel(t), pk_text(t))
    exp = [r.triple for r in in_table(v, t) if r.pk in pks]
    return Query("known_primary_keys", t.name, text, (pks,), exp, False, (2,), True)


def s_order_limit(rng: random.Random, w: World, t: TableInfo, f: str, v: list[Row]) -> Query:
    n, desc = rng.randint(1, 6), rng.random() < 0.5
    text = Q('SELECT {} FROM {} ORDER BY {} COLLATE "C" {} LIMIT %s').format(
        triple(t), rel(t), pk_text(t), Q("DESC" if desc else "ASC")
    )
    exp = sorted(in_table(v, t), key=lambda r: r.pk, reverse=desc)[:n]
    return Query("order_by_limit", t.name, text, (n,), [r.triple for r in exp], True, (2,), True)


def s_limit_offset(rng: random.Random, w: World, t: TableInfo, f: str, v: list[Row]) -> Query:
    n, k = rng.randint(1, 5), rng.randint(0, 4)
    text = Q('SELECT {} FROM {} ORDER BY {} COLLATE "C" LIMIT %s OFFSET %s').format(
        triple(t), rel(t), pk_text(t)
    )
    exp = sorted(in_table(v, t), key=lambda r: r.pk)[k : k + n]
    return Query("limit_offset", t.name, text, (n, k), [r.triple for r in exp], True, (2,), True)


def s_count(rng: random.Random, w: World, t: TableInfo, f: str, v: list[Row]) -> Query:
    if rng.random() < 0.5:
        text = Q("SELECT count(*) FROM {}").format(rel(t))
        return Query("count", t.name, text, (), [(len(in_table(v, t)),)])
    text = Q("SELECT count(*) FROM {} WHERE x.tenant_id = %s").format(rel(t))
    n = len([r for r in in_table(v, t) if r.tenant == f])
    return Query("count_where", t.name, text, (f,), [(n,)])


def s_group_by(rng: random.Random, w: World, t: TableInfo, f: str, v: list[Row]) -> Query:
    text = Q("SELECT x.tenant_id, count(*) FROM {} GROUP BY x.tenant_id").format(rel(t))
    exp = list(Counter(r.tenant for r in in_table(v, t)).items())
    return Query("group_by_tenant", t.name, text, (), exp, False, (0,))


def s_aggregates(rng: random.Random, w: World, t: TableInfo, f: str, v: list[Row]) -> Query:
    text = Q(
        "SELECT count(*) AS n, count(DISTINCT x.tenant_id) AS nt, min(x.tenant_id) AS lo, "
        "max(x.tenant_id) AS hi, string_agg(DISTINCT x.tenant_id, ',') AS tenants, "
        "coalesce(array_agg({pk} ORDER BY {pk} COLLATE \"C\"), '{{}}'::text[]) AS pks "
        "FROM {rel}"
    ).format(pk=pk_text(t), rel=rel(t))
    vt = in_table(v, t)
    tenants = sorted({r.tenant for r in vt})
    exp = (
        len(vt),
        len(tenants),
        min(tenants, default=None),
        max(tenants, default=None),
        ",".join(tenants) or None,
        sorted(r.pk for r in vt),
    )
    return Query("aggregates", t.name, text, (), [exp], False, (2, 3, 4))


def s_exists(rng: random.Random, w: World, t: TableInfo, f: str, v: list[Row]) -> Query:
    text = Q("SELECT EXISTS (SELECT 1 FROM {} WHERE x.tenant_id = %s)").format(rel(t))
    return Query("exists", t.name, text, (f,), [(any(r.tenant == f for r in in_table(v, t)),)])


def s_scalar_subqueries(rng: random.Random, w: World, t: TableInfo, f: str, v: list[Row]) -> Query:
    text = Q(
        "SELECT (SELECT count(*) FROM {} WHERE x.tenant_id = %s) AS n_target, "
        "(SELECT count(*) FROM {}) AS n_all"
    ).format(rel(t), rel(t, "y"))
    vt = in_table(v, t)
    return Query(
        "scalar_subqueries", t.name, text, (f,), [(len([r for r in vt if r.tenant == f]), len(vt))]
    )


def s_in_subquery(rng: random.Random, w: World, t: TableInfo, f: str, v: list[Row]) -> Query:
    text = Q("SELECT {} FROM {} WHERE x.{pk} IN (SELECT y.{pk} FROM {} WHERE y.tenant_id = %s)")
    text = text.format(triple(t), rel(t), rel(t, "y"), pk=sql.Identifier(t.pk))
    exp = [r.triple for r in in_table(v, t) if r.tenant == f]
    return Query("in_subquery", t.name, text, (f,), exp, False, (2,), True)


def s_cte(rng: random.Random, w: World, t: TableInfo, f: str, v: list[Row]) -> Query:
    subset = [f, *rng.sample(TARGETS, rng.randint(0, 3))]
    mat = Q(rng.choice(["", "MATERIALIZED", "NOT MATERIALIZED"]))
    text = Q("WITH c AS {} (SELECT {} FROM {}) SELECT * FROM c WHERE c.tenant_id = ANY(%s)")
    text = text.format(mat, triple(t), rel(t))
    exp = [r.triple for r in in_table(v, t) if r.tenant in subset]
    return Query("cte", t.name, text, (subset,), exp, False, (2,), True)


def s_recursive_cte(rng: random.Random, w: World, t: TableInfo, f: str, v: list[Row]) -> Query:
    text = Q(
        "WITH RECURSIVE r(pk, tenant_id, depth) AS ("
        " SELECT {pk}, x.tenant_id, 0 FROM {rel}"
        " UNION ALL SELECT r.pk, r.tenant_id, r.depth + 1 FROM r WHERE r.depth < 1)"
        " SELECT pk, tenant_id, count(*) FROM r GROUP BY pk, tenant_id"
    ).format(pk=pk_text(t), rel=rel(t))
    exp = [(r.pk, r.tenant, 2) for r in in_table(v, t)]
    return Query("recursive_cte", t.name, text, (), exp, False, (1,), True)


def s_window(rng: random.Random, w: World, t: TableInfo, f: str, v: list[Row]) -> Query:
    text = Q(
        "SELECT {}, count(*) OVER () AS n_all, "
        "count(*) OVER (PARTITION BY x.tenant_id) AS n_t FROM {}"
    )
    text = text.format(triple(t), rel(t))
    vt = in_table(v, t)
    per = Counter(r.tenant for r in vt)
    exp = [(*r.triple, len(vt), per[r.tenant]) for r in vt]
    return Query("window", t.name, text, (), exp, False, (2,), True)


def s_row_json(rng: random.Random, w: World, t: TableInfo, f: str, v: list[Row]) -> Query:
    text = Q("SELECT to_jsonb(x) ->> 'tenant_id' AS t, to_jsonb(x) ->> {} AS pk FROM {}").format(
        sql.Literal(t.pk), rel(t)
    )
    exp = [(r.tenant, r.pk) for r in in_table(v, t)]
    return Query("whole_row_json", t.name, text, (), exp, False, (0,), True)


def s_distinct(rng: random.Random, w: World, t: TableInfo, f: str, v: list[Row]) -> Query:
    text = Q("SELECT DISTINCT x.tenant_id FROM {}").format(rel(t))
    exp = [(x,) for x in {r.tenant for r in in_table(v, t)}]
    return Query("distinct_tenant", t.name, text, (), exp, False, (0,), True)


def s_marker(rng: random.Random, w: World, t: TableInfo, f: str, v: list[Row]) -> Query:
    text = Q("SELECT {} FROM {} WHERE strpos(x.{}, %s) > 0").format(
        triple(t), rel(t), sql.Identifier(t.marker)
    )
    exp = [r.triple for r in in_table(v, t) if f in r.marker]
    return Query("content_search", t.name, text, (f,), exp, False, (2,), True)


def s_control_join(rng: random.Random, w: World, t: TableInfo, f: str, v: list[Row]) -> Query:
    text = Q(
        "SELECT {} FROM control.tenants AS c JOIN {} ON x.tenant_id = c.id WHERE c.id = %s"
    ).format(triple(t), rel(t))
    exp = [r.triple for r in in_table(v, t) if r.tenant == f]
    return Query("join_control_tenants", t.name, text, (f,), exp, False, (2,), True)


def s_control_counts(rng: random.Random, w: World, t: TableInfo, f: str, v: list[Row]) -> Query:
    if rng.random() < 0.5:
        text = Q(
            "SELECT c.id, count(x.tenant_id) FROM control.tenants AS c "
            "LEFT JOIN {} ON x.tenant_id = c.id WHERE c.id = ANY(%s) GROUP BY c.id"
        ).format(rel(t))
        name = "left_join_counts"
    else:
        text = Q(
            "SELECT c.id, l.n FROM control.tenants AS c CROSS JOIN LATERAL "
            "(SELECT count(*) AS n FROM {} WHERE x.tenant_id = c.id) AS l WHERE c.id = ANY(%s)"
        ).format(rel(t))
        name = "lateral_counts"
    per = Counter(r.tenant for r in in_table(v, t))
    exp = [(tid, per[tid]) for tid in KNOWN_TENANTS]
    return Query(name, t.name, text, (list(KNOWN_TENANTS),), exp)


def s_self_cross_join(rng: random.Random, w: World, t: TableInfo, f: str, v: list[Row]) -> Query:
    text = Q(
        "SELECT count(*) AS pairs, count(*) FILTER (WHERE x.tenant_id <> y.tenant_id) AS mixed "
        "FROM {} CROSS JOIN {}"
    ).format(rel(t), rel(t, "y"))
    n = len(in_table(v, t))
    return Query("self_cross_join", t.name, text, (), [(n * n, 0)])


def s_vector(rng: random.Random, w: World, t: TableInfo, f: str, v: list[Row]) -> Query:
    assert t.vector is not None
    probe = f"[{rng.randint(1, 5)},{rng.randint(5, 15)},0.5]"
    text = Q(
        "SELECT {} FROM {} WHERE x.{col} IS NOT NULL ORDER BY x.{col} <-> %s::vector LIMIT 1000"
    ).format(triple(t), rel(t), col=sql.Identifier(t.vector))
    exp = [r.triple for r in in_table(v, t)]
    return Query("vector_nearest", t.name, text, (probe,), exp, False, (2,), True)


def s_fk_join(rng: random.Random, w: World, t: TableInfo, f: str, v: list[Row]) -> Query:
    fk = w.parent_fk(t.name)
    assert fk is not None
    on = Q(" AND ").join(
        Q("x.{} = p.{}").format(sql.Identifier(c), sql.Identifier(p))
        for c, p in zip(fk.child_cols, fk.parent_cols, strict=True)
    )
    kind = rng.choice(["join", "mismatch", "orphans"])
    if kind == "join":  # joined on the parent id alone, without tenant_id
        text = Q("SELECT {}, p.tenant_id AS parent_tenant FROM {} JOIN {} ON {}").format(
            triple(t), rel(t), rel(fk.parent, "p"), on
        )
        exp = [(*r.triple, r.tenant) for r in in_table(v, t)]
        return Query("fk_join", t.name, text, (), exp, False, (2, 3), True)
    if kind == "mismatch":
        text = Q("SELECT count(*) FROM {} JOIN {} ON {} AND x.tenant_id <> p.tenant_id").format(
            rel(t), rel(fk.parent, "p"), on
        )
        return Query("fk_join_other_tenant", t.name, text, (), [(0,)])
    # every visible child's parent is visible too (same tenant): no orphans
    text = Q("SELECT count(*) FROM {} WHERE NOT EXISTS (SELECT 1 FROM {} WHERE {})").format(
        rel(t), rel(fk.parent, "p"), on
    )
    return Query("fk_orphans", t.name, text, (), [(0,)])


def union_of(w: World, select: Callable[[TableInfo], sql.Composable], op: str) -> sql.Composed:
    return Q(f" {op} ").join(select(t) for t in w.tables.values())


def s_union_all(rng: random.Random, w: World, t: TableInfo, f: str, v: list[Row]) -> Query:
    if rng.random() < 0.5:
        text = union_of(
            w, lambda ti: Q("SELECT {} FROM {}").format(triple(ti), rel(ti)), "UNION ALL"
        )
        return Query("union_all_tables", "*", text, (), [r.triple for r in v], False, (2,), True)
    text = union_of(
        w,
        lambda ti: Q("SELECT {} FROM {} WHERE x.tenant_id = %(t)s").format(triple(ti), rel(ti)),
        "UNION ALL",
    )
    exp = [r.triple for r in v if r.tenant == f]
    return Query("union_all_where", "*", text, {"t": f}, exp, False, (2,), True)


def s_union_tenants(rng: random.Random, w: World, t: TableInfo, f: str, v: list[Row]) -> Query:
    text = union_of(w, lambda ti: Q("SELECT x.tenant_id FROM {}").format(rel(ti)), "UNION")
    return Query(
        "union_tenants", "*", text, (), [(x,) for x in {r.tenant for r in v}], False, (0,), True
    )


def s_union_counts(rng: random.Random, w: World, t: TableInfo, f: str, v: list[Row]) -> Query:
    text = union_of(
        w,
        lambda ti: Q("SELECT {}::text AS tbl, count(*) AS n FROM {}").format(
            sql.Literal(ti.name), rel(ti)
        ),
        "UNION ALL",
    )
    exp = [(name, len([r for r in v if r.table == name])) for name in w.tables]
    return Query("union_counts", "*", text, (), exp)


TABLE_SHAPES_FNS: tuple[Shape, ...] = (
    s_all_rows,
    s_where_target,
    s_where_or_true,
    s_where_any,
    s_where_like,
    s_not_ctx,
    s_known_pks,
    s_order_limit,
    s_limit_offset,
    s_count,
    s_group_by,
    s_aggregates,
    s_exists,
    s_scalar_subqueries,
    s_in_subquery,
    s_cte,
    s_recursive_cte,
    s_window,
    s_row_json,
    s_distinct,
    s_marker,
    s_control_join,
    s_control_counts,
    s_self_cross_join,
)
ALL_TABLES_SHAPES: tuple[Shape, ...] = (s_union_all, s_union_tenants, s_union_counts)


def random_query(rng: random.Random, w: World, target: str, visible: list[Row]) -> Query:
    t = rng.choice(list(w.tables.values()))
    pool: list[Shape] = list(TABLE_SHAPES_FNS)
    if t.vector:
        pool.append(s_vector)
    if w.parent_fk(t.name):
        pool += [s_fk_join, s_fk_join]
    if rng.random() < 0.12:
        pool = list(ALL_TABLES_SHAPES)
    return rng.choice(pool)(rng, w, t, target, visible)


# --------------------------------------------------------------------------- checking


@dataclass(frozen=True)
class Context:
    kind: str  # correct | wrong | missing | forged
    value: str | None  # what app.tenant_id is set to (None: not set / NULL)
    target: str  # the tenant whose rows the query asks for

    @property
    def tenant(self) -> str | None:
        """The tenant whose rows may be visible: only a real tenant, set exactly."""
        return self.value if self.kind in ("correct", "wrong") else None


def random_context(rng: random.Random, forged: Sequence[str | None]) -> Context:
    kind = rng.choices(["correct", "wrong", "missing", "forged"], weights=[3, 3, 2, 3])[0]
    if kind == "correct":
        t = rng.choice(KNOWN_TENANTS)
        return Context(kind, t, t)
    if kind == "wrong":
        t = rng.choice(KNOWN_TENANTS)
        return Context(kind, t, rng.choice([x for x in TARGETS if x != t]))
    if kind == "missing":
        return Context(kind, None, rng.choice(KNOWN_TENANTS))
    return Context(kind, rng.choice(forged), rng.choice(SEEDED_TENANTS))


def visible_rows(w: World, ctx: Context) -> list[Row]:
    return [r for r in w.rows if ctx.tenant is not None and r.tenant == ctx.tenant]


@dataclass
class ReadLog:
    seed: int
    reads: int = 0
    kinds: Counter[str] = field(default_factory=Counter)
    shapes: Counter[str] = field(default_factory=Counter)
    tables: Counter[str] = field(default_factory=Counter)
    paths: Counter[str] = field(default_factory=Counter)
    refused: int = 0

    def summary(self) -> str:
        return (
            f"seed={self.seed} reads={self.reads} refused={self.refused} "
            f"kinds={dict(self.kinds)} paths={dict(self.paths)}"
        )


def check(
    log: ReadLog, i: int, path: str, ctx: Context, q: Query, rows: Sequence[Sequence[Any]]
) -> None:
    got = [tuple(r) for r in rows]
    where = (
        f"seed={log.seed} read#{i} path={path} ctx={ctx.kind}:{ctx.value!r:.60} "
        f"target={ctx.target} shape={q.shape} table={q.table}"
    )
    seen = {row[c] for row in got for c in q.tenant_cols if row[c] is not None}
    allowed = {ctx.tenant} if ctx.tenant else set()
    assert seen <= allowed, f"CROSS-TENANT LEAK: saw tenants {seen - allowed} ({where})"
    if ctx.tenant is None and q.rowset:
        assert got == [], f"rows without a valid tenant context: {got[:3]} ({where})"
    if q.ordered:
        assert got == q.expected, f"{where}: got {got} expected {q.expected}"
    else:
        assert sorted(got, key=repr) == sorted(q.expected, key=repr), (
            f"{where}: got {got} expected {q.expected}"
        )
    log.reads += 1
    log.kinds[ctx.kind] += 1
    log.shapes[q.shape] += 1
    log.tables[q.table] += 1
    log.paths[path] += 1


def assert_coverage(log: ReadLog, w: World, paths: set[str]) -> None:
    assert log.reads >= MIN_READS, log.summary()
    assert set(log.kinds) == {"correct", "wrong", "missing", "forged"}, log.summary()
    assert set(log.tables) == {*w.tables, "*"}, dict(log.tables)
    assert set(log.paths) == paths, dict(log.paths)
    expected_shapes = {
        "all_rows", "where_tenant", "known_primary_keys", "order_by_limit", "count",
        "count_where", "group_by_tenant", "aggregates", "exists", "in_subquery", "cte",
        "window", "join_control_tenants", "fk_join", "fk_orphans", "vector_nearest",
        "union_all_tables", "union_all_where", "union_tenants", "union_counts",
    }  # fmt: skip
    assert expected_shapes <= set(log.shapes), expected_shapes - set(log.shapes)


@pytest.fixture
def isolation_seed(record_property: Callable[[str, object], None]) -> int:
    env = os.environ.get("ISOLATION_SEED")
    seed = int(env) if env else random.SystemRandom().randrange(2**32)
    record_property("isolation_seed", seed)
    print(f"isolation seed: {seed} (rerun with ISOLATION_SEED={seed})")
    return seed


@asynccontextmanager
async def connect(url: str) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
    conn = await psycopg.AsyncConnection.connect(url, autocommit=True)
    try:
        yield conn
    finally:
        await conn.close()


async def current_tenant_setting(conn: psycopg.AsyncConnection[Any]) -> str | None:
    cur = await conn.execute("SELECT current_setting('app.tenant_id', true)")
    row = await cur.fetchone()
    assert row is not None
    value: str | None = row[0]
    return value


# --------------------------------------------------------------------------- tests


async def isolation_problems(conn: psycopg.AsyncConnection[Any]) -> list[str]:
    """Every way a relation with tenant_id falls short of the isolation rules, in words."""
    relations = await discover_tenant_relations(conn)
    problems: list[str] = []
    for r in relations:
        if r.relkind not in ("r", "p"):
            problems.append(
                f"{r.name}: relkind {r.relkind!r} with tenant_id (views, materialized views "
                "and foreign tables are not covered by the tables' row-level security)"
            )
            continue
        if r.name in CONTROL_PLANE_TABLES:
            assert r.name.startswith("control."), r.name
            for priv in ("INSERT", "UPDATE", "DELETE", "TRUNCATE"):
                cur = await conn.execute(
                    "SELECT has_table_privilege(%s, %s, %s)", (APP_ROLE, r.name, priv)
                )
                if (await cur.fetchone()) != (False,):
                    problems.append(f"{r.name}: application role has {priv}")
            continue
        if not r.rls:
            problems.append(f"{r.name}: row level security is not enabled")
        if not r.force_rls:
            problems.append(f"{r.name}: row level security is not forced")
        if r.owner != OWNER_ROLE:
            problems.append(f"{r.name}: owned by {r.owner}, not {OWNER_ROLE}")
        if not r.tenant_not_null:
            problems.append(f"{r.name}: tenant_id is nullable")
        if not r.tenant_indexed:
            problems.append(f"{r.name}: no index has tenant_id as its first column")
        policies = await policies_for(conn, r.name)
        guarding = [
            p
            for p in policies
            if p["permissive"] == "PERMISSIVE"
            and p["cmd"] == "ALL"
            and APP_ROLE in p["roles"]
            and is_tenant_expr(p["qual"])
            and (p["with_check"] is None or is_tenant_expr(p["with_check"]))
        ]
        if not guarding:
            problems.append(f"{r.name}: no ALL policy for {APP_ROLE} on app.tenant_id")
        for p in policies:
            applies = APP_ROLE in p["roles"] or "public" in p["roles"]
            if not applies or p["permissive"] != "PERMISSIVE":
                continue  # restrictive policies can only narrow what is visible
            for expr in ("qual", "with_check"):
                if p[expr] is not None and not is_tenant_expr(p[expr]):
                    problems.append(
                        f"{r.name}: policy {p['policyname']} for {p['roles']} has {expr} "
                        f"{p[expr]!r}, not on app.tenant_id"
                    )
            if p["qual"] is None and p["cmd"] in ("ALL", "SELECT", "UPDATE", "DELETE"):
                problems.append(f"{r.name}: policy {p['policyname']} has no USING")
        for priv in ("TRUNCATE", "REFERENCES", "TRIGGER", "MAINTAIN"):
            cur = await conn.execute(
                "SELECT has_table_privilege(%s, %s, %s)", (APP_ROLE, r.name, priv)
            )
            if (await cur.fetchone()) != (False,):
                problems.append(f"{r.name}: application role has {priv}")
        for priv in ("INSERT", "UPDATE", "DELETE", "TRUNCATE"):
            cur = await conn.execute(
                "SELECT has_table_privilege(%s, %s, %s)", (REPORTING_ROLE, r.name, priv)
            )
            if (await cur.fetchone()) != (False,):
                problems.append(f"{r.name}: reporting role has {priv}")
    return problems


async def test_every_tenant_table_is_row_level_secured(pg: PgCluster) -> None:
    """Catalog-wide: any table with tenant_id (bar the reviewed control-plane ones) is
    RLS-enabled and forced, owned by the owner role, tenant_id NOT NULL and leading an
    index, and every permissive policy the application role is subject to is exactly
    ``tenant_id = current_setting('app.tenant_id', true)``."""
    async with connect(pg.app) as conn:
        names = {r.name for r in await discover_tenant_relations(conn)}
        assert {f"public.{t}" for t in TENANT_TABLES} <= names, "catalog discovery is broken"
        assert names >= CONTROL_PLANE_TABLES, "stale exemption in CONTROL_PLANE_TABLES"
        problems = await isolation_problems(conn)
    assert not problems, "tenant tables without proper isolation:\n" + "\n".join(problems)


async def test_catalog_check_catches_unprotected_relations(pg: PgCluster) -> None:
    """The catalog check is not vacuous: a new table with tenant_id and no RLS, and a
    view over a tenant table, are both reported (created and rolled back as the owner)."""
    async with connect(pg.owner) as conn, conn.transaction():
        assert await isolation_problems(conn) == []
        await conn.execute("CREATE TABLE public.isolation_probe (tenant_id text NOT NULL)")
        await conn.execute("CREATE VIEW public.isolation_probe_v AS SELECT * FROM documents")
        assert "public.isolation_probe" in await discover_tenant_tables(conn)
        problems = await isolation_problems(conn)
        assert sorted(problems) == sorted(
            [
                "public.isolation_probe: row level security is not enabled",
                "public.isolation_probe: row level security is not forced",
                "public.isolation_probe: no index has tenant_id as its first column",
                f"public.isolation_probe: no ALL policy for {APP_ROLE} on app.tenant_id",
                "public.isolation_probe_v: relkind 'v' with tenant_id (views, materialized "
                "views and foreign tables are not covered by the tables' row-level security)",
            ]
        ), problems
        raise psycopg.Rollback
    async with connect(pg.app) as conn:
        assert "public.isolation_probe" not in await discover_tenant_tables(conn)


async def test_seeding_writes_each_tenants_rows_through_the_data_layer(
    clean_db: PgCluster, app_db: Database
) -> None:
    world = await seed_world(app_db, clean_db, random.Random(7))
    for table in world.tables:
        for tenant in SEEDED_TENANTS:
            mine = sorted(r.pk for r in world.of(table, tenant))
            assert mine, (table, tenant)
            async with app_db.tenant(tenant) as s:
                rows = await s.fetch_all(
                    Q("SELECT {}::text AS pk, tenant_id FROM {}").format(  # type: ignore[arg-type]
                        sql.Identifier(world.tables[table].pk), ident(table)
                    )
                )
            assert sorted(r["pk"] for r in rows) == mine
            assert {r["tenant_id"] for r in rows} == {tenant}
    fk_names = {(fk.child, fk.parent, fk.child_cols) for fk in world.fks}
    assert ("public.chunks", "public.documents", ("document_id",)) in fk_names
    assert ("public.chat_messages", "public.chat_sessions", ("session_id",)) in fk_names


async def test_randomized_reads_through_the_data_layer(
    clean_db: PgCluster, app_db: Database, isolation_seed: int
) -> None:
    """Database.tenant / Database.control with correct, wrong, missing and forged tenants."""
    rng = random.Random(isolation_seed)
    world = await seed_world(app_db, clean_db, rng)
    log = ReadLog(isolation_seed)
    forged: list[str | None] = [*FORGED_MALFORMED, *FORGED_WELL_FORMED]
    for i in range(DATA_LAYER_ITERATIONS):
        ctx = random_context(rng, forged)
        q = random_query(rng, world, ctx.target, visible_rows(world, ctx))
        if ctx.kind == "missing":
            async with app_db.control() as s:
                assert await s.fetch_one("SELECT current_setting('app.tenant_id', true) AS v") in (
                    {"v": None},
                    {"v": ""},
                )
                rows = await s.fetch_all(q.text, q.params)  # type: ignore[arg-type]
            check(log, i, "Database.control", ctx, q, [tuple(r.values()) for r in rows])
            continue
        assert ctx.value is not None
        if ctx.value in FORGED_MALFORMED:
            with pytest.raises(TenantScopeError, match="not a valid tenant id"):
                await enter_tenant(app_db, ctx.value)
            log.refused += 1
            continue
        async with app_db.tenant(ctx.value) as s:
            assert s.tenant_id == ctx.value
            setting = await s.fetch_one("SELECT current_setting('app.tenant_id', true) AS v")
            assert setting == {"v": ctx.value}, f"seed={isolation_seed} read#{i}"
            rows = await s.fetch_all(q.text, q.params)  # type: ignore[arg-type]
        check(log, i, "Database.tenant", ctx, q, [tuple(r.values()) for r in rows])
    for bad in FORGED_NON_STR:
        with pytest.raises(TenantScopeError):
            await enter_tenant(app_db, bad)
        log.refused += 1
    print(log.summary())
    assert log.refused >= 100, log.summary()
    assert_coverage(log, world, {"Database.tenant", "Database.control"})


async def enter_tenant(db: Database, tenant_id: Any) -> None:
    async with db.tenant(tenant_id):
        pytest.fail(f"Database.tenant accepted {tenant_id!r}")


RAW_SET_MECHANISMS = ("set_config_local", "set_local", "set_config_session", "set_session")
RAW_NONE_MECHANISMS = ("none_fresh_connection", "none_after_reset_all", "none_in_transaction")


async def test_randomized_reads_raw_sql_as_the_application_role(
    clean_db: PgCluster, app_db: Database, isolation_seed: int
) -> None:
    """psycopg connected as ragplane_app, tenant set every way SQL allows (or not at all)."""
    rng = random.Random(isolation_seed)
    world = await seed_world(app_db, clean_db, rng)
    log = ReadLog(isolation_seed)
    async with connect(clean_db.app) as conn, connect(clean_db.app) as fresh:
        for i in range(RAW_ITERATIONS):
            ctx = random_context(rng, FORGED_RAW)
            q = random_query(rng, world, ctx.target, visible_rows(world, ctx))
            prepare = rng.random() < 0.3
            if ctx.kind == "missing":
                mech = rng.choice(RAW_NONE_MECHANISMS)
            elif ctx.value is None:  # NULL: only set_config takes it
                mech = rng.choice(RAW_SET_MECHANISMS[::2])
            else:
                mech = rng.choice(RAW_SET_MECHANISMS)
            rows = await raw_read(conn, fresh, mech, ctx.value, q, prepare)
            check(log, i, f"raw:{mech}", ctx, q, rows)
        # nothing was ever set on `fresh`
        assert await current_tenant_setting(fresh) is None
    print(log.summary())
    assert_coverage(log, world, {f"raw:{m}" for m in (*RAW_SET_MECHANISMS, *RAW_NONE_MECHANISMS)})


async def raw_read(
    conn: psycopg.AsyncConnection[Any],
    fresh: psycopg.AsyncConnection[Any],
    mech: str,
    value: str | None,
    q: Query,
    prepare: bool,
) -> list[tuple[Any, ...]]:
    async def fetch(c: psycopg.AsyncConnection[Any]) -> list[tuple[Any, ...]]:
        cur = await c.execute(q.text, q.params, prepare=prepare)
        return await cur.fetchall()

    expect_setting = "" if value is None else value
    if mech == "none_fresh_connection":
        assert await current_tenant_setting(fresh) is None
        return await fetch(fresh)
    if mech == "none_after_reset_all":
        await conn.execute("RESET ALL")
        assert await current_tenant_setting(conn) in (None, "")
        return await fetch(conn)
    if mech in ("none_in_transaction", "set_config_local", "set_local"):
        async with conn.transaction():
            if mech == "set_config_local":
                await conn.execute("SELECT set_config('app.tenant_id', %s, true)", (value,))
            elif mech == "set_local":
                await conn.execute(
                    sql.SQL("SET LOCAL app.tenant_id = {}").format(sql.Literal(value))
                )
            else:
                expect_setting = ""
            assert (await current_tenant_setting(conn) or "") == expect_setting
            return await fetch(conn)
    try:
        if mech == "set_config_session":
            await conn.execute("SELECT set_config('app.tenant_id', %s, false)", (value,))
        else:
            assert mech == "set_session", mech
            await conn.execute(sql.SQL("SET app.tenant_id = {}").format(sql.Literal(value)))
        assert await current_tenant_setting(conn) == expect_setting
        return await fetch(conn)
    finally:
        await conn.execute("RESET app.tenant_id")
