"""The cost ledger in Postgres: batched, idempotent writes across tenants, and reports.

:func:`write_ledger_rows` writes one batch (rows of any number of tenants) in one
transaction on one connection: per tenant group, ``set_config('app.tenant_id', …,
true)`` and then a single ``INSERT … SELECT FROM json_to_recordset(…) ON CONFLICT DO
NOTHING`` (the group's rows as one JSON parameter), all sent in one pipeline, so a
batch costs three round trips (BEGIN, the pipeline, COMMIT) however many tenants it
holds. Row-level security checks every row against
the tenant set for its group, as for any unit of work.

A row the database refuses (a tenant that is not registered, a value out of range)
must not hold the rest back: the batch is then written again row by row, each row
in a savepoint, and the refused rows come back in :class:`WriteResult` with the
reason. Rows already in the table (same tenant and id) are skipped, never doubled.
"""

from __future__ import annotations

import itertools
import operator
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any
from uuid import UUID

import orjson
import psycopg

from ragplane.data.db import Database, validate_tenant_id
from ragplane.errors import DataError, TenantScopeError

__all__ = [
    "CostLine",
    "LedgerRow",
    "WriteResult",
    "new_row_id",
    "tenant_costs",
    "write_ledger_rows",
]


def new_row_id() -> UUID:
    """A UUIDv7 (RFC 9562): 48-bit Unix milliseconds, then 74 random bits. Time-ordered,
    so new rows land at the right edge of the primary key's index."""
    value = ((time.time_ns() // 1_000_000) & ((1 << 48) - 1)) << 80
    value |= int.from_bytes(os.urandom(10), "big")
    value = (value & ~(0xF << 76)) | (0x7 << 76)  # version 7
    value = (value & ~(0x3 << 62)) | (0x2 << 62)  # RFC 4122 variant
    return UUID(int=value)


@dataclass(frozen=True, slots=True)
class LedgerRow:
    """One row of ``llm_ledger``; ``id`` (see :func:`new_row_id`) and ``created_at`` are
    set by whoever makes the row."""

    tenant_id: str
    id: UUID
    created_at: datetime
    request_id: str
    alias: str
    api: str
    stream: bool
    status: str
    http_status: int
    attempts: int
    latency_ms: float
    route: str | None = None
    provider: str | None = None
    model: str | None = None
    trace_id: str | None = None
    feature_id: str | None = None
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0
    cost_usd: float = 0.0
    ttft_ms: float | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class WriteResult:
    inserted: int  # new rows
    duplicates: int  # rows whose (tenant_id, id) was already in the table
    rejected: tuple[tuple[LedgerRow, str], ...] = ()  # refused rows and why


# (column, SQL type) in the order of LedgerRow's fields after tenant_id
_COLUMNS: tuple[tuple[str, str], ...] = (
    ("id", "uuid"),
    ("created_at", "timestamptz"),
    ("request_id", "text"),
    ("alias", "text"),
    ("api", "text"),
    ("stream", "boolean"),
    ("status", "text"),
    ("http_status", "integer"),
    ("attempts", "integer"),
    ("latency_ms", "double precision"),
    ("route", "text"),
    ("provider", "text"),
    ("model", "text"),
    ("trace_id", "text"),
    ("feature_id", "text"),
    ("input_tokens", "bigint"),
    ("output_tokens", "bigint"),
    ("cache_read_tokens", "bigint"),
    ("cache_write_tokens", "bigint"),
    ("reasoning_tokens", "bigint"),
    ("cost_usd", "numeric"),  # a JSON number in the float's shortest form: no binary noise
    ("ttft_ms", "double precision"),
    ("extra", "jsonb"),
)
_NAMES = ", ".join(c for c, _ in _COLUMNS)
# the group travels as one JSON array of row objects (orjson serialises the dataclasses
# directly): one parameter to encode instead of an array per column
_INSERT = (
    f"INSERT INTO llm_ledger (tenant_id, {_NAMES}) "  # noqa: S608 -- fixed column names
    f"SELECT current_setting('app.tenant_id', true), {_NAMES} "
    "FROM json_to_recordset(%s::json) AS r("
    + ", ".join(f"{c} {t}" for c, t in _COLUMNS)
    + ") ON CONFLICT (tenant_id, id) DO NOTHING"
)
_SET_TENANT = "SELECT set_config('app.tenant_id', %s, true)"


def _rows_json(rows: Sequence[LedgerRow]) -> str:
    return orjson.dumps(rows).decode()


def _by_tenant(rows: Iterable[LedgerRow]) -> list[tuple[str, list[LedgerRow]]]:
    key = operator.attrgetter("tenant_id")
    return [(t, list(g)) for t, g in itertools.groupby(sorted(rows, key=key), key=key)]


async def write_ledger_rows(db: Database, rows: Sequence[LedgerRow]) -> WriteResult:
    """Write a batch in one transaction (see the module docstring).

    Raises :class:`~ragplane.errors.DatabaseUnavailable` when the database cannot be
    reached and :class:`~ragplane.errors.DataError` on any other failure; in both
    cases nothing of the batch was committed.
    """
    valid: list[LedgerRow] = []
    rejected: list[tuple[LedgerRow, str]] = []
    for r in rows:
        try:
            validate_tenant_id(r.tenant_id)
        except TenantScopeError as exc:
            rejected.append((r, str(exc)))
        else:
            valid.append(r)
    if not valid:
        return WriteResult(0, 0, tuple(rejected))
    refused: list[tuple[LedgerRow, str]] = []
    try:
        inserted = await _write_batch(db, valid)
    except (psycopg.IntegrityError, psycopg.DataError):
        inserted, refused = await _write_one_by_one(db, valid)
    except psycopg.Error as exc:
        raise DataError(f"writing {len(valid)} ledger rows failed: {exc}") from exc
    return WriteResult(
        inserted=inserted,
        duplicates=len(valid) - inserted - len(refused),
        rejected=(*rejected, *refused),
    )


async def _write_batch(db: Database, rows: Sequence[LedgerRow]) -> int:
    async with db.control() as s:
        conn = s.connection
        cursors = []
        async with conn.pipeline():
            for tenant, group in _by_tenant(rows):
                await conn.execute(_SET_TENANT, (tenant,))
                cursors.append(await conn.execute(_INSERT, (_rows_json(group),)))
        return sum(max(c.rowcount, 0) for c in cursors)


async def _write_one_by_one(
    db: Database, rows: Sequence[LedgerRow]
) -> tuple[int, list[tuple[LedgerRow, str]]]:
    inserted = 0
    refused: list[tuple[LedgerRow, str]] = []
    try:
        async with db.control() as s:
            conn = s.connection
            for r in rows:
                try:
                    async with conn.transaction():  # a savepoint per row
                        await conn.execute(_SET_TENANT, (r.tenant_id,))
                        cur = await conn.execute(_INSERT, (_rows_json([r]),))
                        inserted += max(cur.rowcount, 0)
                except (psycopg.IntegrityError, psycopg.DataError) as exc:
                    refused.append((r, f"{type(exc).__name__}: {exc}"))
    except psycopg.Error as exc:
        raise DataError(f"writing {len(rows)} ledger rows one by one failed: {exc}") from exc
    return inserted, refused


@dataclass(frozen=True, slots=True)
class CostLine:
    """One tenant's spend for one alias and feature over a period."""

    alias: str
    feature_id: str | None
    calls: int
    errors: int
    input_tokens: int
    output_tokens: int
    cache_read_tokens: int
    cache_write_tokens: int
    reasoning_tokens: int
    cost_usd: Decimal


_COSTS = """
SELECT alias, feature_id, count(*) AS calls, count(*) FILTER (WHERE status <> 'ok') AS errors,
       sum(input_tokens)::bigint AS input_tokens, sum(output_tokens)::bigint AS output_tokens,
       sum(cache_read_tokens)::bigint AS cache_read_tokens,
       sum(cache_write_tokens)::bigint AS cache_write_tokens,
       sum(reasoning_tokens)::bigint AS reasoning_tokens, sum(cost_usd) AS cost_usd
FROM llm_ledger
WHERE tenant_id = %(tenant)s AND created_at >= %(since)s
  AND (%(until)s::timestamptz IS NULL OR created_at < %(until)s::timestamptz)
GROUP BY alias, feature_id
ORDER BY sum(cost_usd) DESC, alias, feature_id NULLS FIRST
"""


async def tenant_costs(
    db: Database, tenant_id: str, since: datetime, until: datetime | None = None
) -> list[CostLine]:
    """Spend and tokens of one tenant per (alias, feature) in ``[since, until)``, most
    expensive first; read in the tenant's unit of work, so RLS bounds it too."""
    async with db.tenant(tenant_id) as s:
        rows = await s.fetch_all(_COSTS, {"tenant": tenant_id, "since": since, "until": until})
    return [CostLine(**row) for row in rows]
