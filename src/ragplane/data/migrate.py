"""Versioned SQL migrations.

Files ``migrations/NNNN_name.sql`` are applied in order, each in its own
transaction, by the owner role, under an advisory lock so that two processes
starting at once do not race. Applied versions are recorded with a checksum in
``ragplane_meta.schema_migrations``; a file edited after it was applied is an
error rather than a silent drift.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from datetime import datetime
from importlib import resources

import psycopg
from psycopg import sql

from ragplane.data.db import Session
from ragplane.errors import DatabaseUnavailable, MigrationError

__all__ = ["Migration", "MigrationStatus", "available", "current_status", "migrate", "status"]

_FILE_RE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
_LOCK_KEY = 0x7261_6770  # "ragp"

_BOOKKEEPING = """
CREATE SCHEMA IF NOT EXISTS ragplane_meta;
CREATE TABLE IF NOT EXISTS ragplane_meta.schema_migrations (
    version     integer PRIMARY KEY,
    name        text NOT NULL,
    checksum    text NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
);
"""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


@dataclass(frozen=True)
class AppliedMigration:
    version: int
    name: str
    checksum: str
    applied_at: datetime


@dataclass(frozen=True)
class MigrationStatus:
    applied: tuple[AppliedMigration, ...]
    pending: tuple[Migration, ...]

    @property
    def current(self) -> int:
        return max((m.version for m in self.applied), default=0)

    @property
    def latest(self) -> int:
        return max([m.version for m in available()], default=0)

    @property
    def is_current(self) -> bool:
        return not self.pending


def available() -> list[Migration]:
    """Every migration shipped with this version of ragplane, in order."""
    found = []
    for entry in resources.files("ragplane.data.migrations").iterdir():
        m = _FILE_RE.match(entry.name)
        if m:
            found.append(Migration(int(m.group(1)), m.group(2), entry.read_text(encoding="utf-8")))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise MigrationError(f"two migration files share a version: {versions}")
    return found


def _connect(url: str) -> psycopg.Connection[tuple[object, ...]]:
    try:
        return psycopg.connect(url, autocommit=True, connect_timeout=10)
    except psycopg.OperationalError as exc:
        raise DatabaseUnavailable(f"cannot connect to run migrations: {exc}") from exc


def _applied(conn: psycopg.Connection[tuple[object, ...]]) -> tuple[AppliedMigration, ...]:
    exists = conn.execute("SELECT to_regclass('ragplane_meta.schema_migrations')").fetchone()
    if exists is None or exists[0] is None:
        return ()
    rows = conn.execute(
        "SELECT version, name, checksum, applied_at FROM ragplane_meta.schema_migrations "
        "ORDER BY version"
    ).fetchall()
    return tuple(AppliedMigration(*row) for row in rows)  # type: ignore[arg-type]


def _compare(applied: tuple[AppliedMigration, ...]) -> MigrationStatus:
    shipped = {m.version: m for m in available()}
    for a in applied:
        m = shipped.get(a.version)
        if m is None:
            raise MigrationError(
                f"the database has migration {a.version:04d}_{a.name}, which this version of "
                "ragplane does not ship (is the code older than the database?)"
            )
        if m.checksum != a.checksum:
            raise MigrationError(
                f"migration {a.version:04d}_{a.name} was changed after it was applied "
                "(checksum differs); add a new migration instead of editing an applied one"
            )
    done = {a.version for a in applied}
    pending = tuple(m for v, m in sorted(shipped.items()) if v not in done)
    return MigrationStatus(applied=applied, pending=pending)


def status(url: str) -> MigrationStatus:
    """What is applied and what is pending, read with any role that may read the bookkeeping."""
    with _connect(url) as conn:
        return _compare(_applied(conn))


def migrate(owner_url: str) -> list[Migration]:
    """Apply every pending migration as the owner; return what was applied."""
    with _connect(owner_url) as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (_LOCK_KEY,))
        try:
            if (
                conn.execute("SELECT 1 FROM pg_extension WHERE extname = 'vector'").fetchone()
                is None
            ):
                raise MigrationError(
                    "the pgvector extension is not installed in this database; a superuser must "
                    "run: CREATE EXTENSION vector;"
                )
            with conn.transaction():
                conn.execute(_BOOKKEEPING)
            pending = _compare(_applied(conn)).pending
            for m in pending:
                try:
                    with conn.transaction():
                        conn.execute(sql.SQL(m.sql))
                        conn.execute(
                            "INSERT INTO ragplane_meta.schema_migrations (version, name, checksum) "
                            "VALUES (%s, %s, %s)",
                            (m.version, m.name, m.checksum),
                        )
                except psycopg.Error as exc:
                    raise MigrationError(
                        f"migration {m.version:04d}_{m.name} failed and was rolled back: {exc}"
                    ) from exc
            return list(pending)
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (_LOCK_KEY,))


async def current_status(session: Session) -> MigrationStatus:
    """The same comparison as :func:`status`, over an open unit of work (for readiness checks)."""
    if (await session.fetch_one("SELECT to_regclass('ragplane_meta.schema_migrations') AS t")) in (
        None,
        {"t": None},
    ):
        return _compare(())
    rows = await session.fetch_all(
        "SELECT version, name, checksum, applied_at FROM ragplane_meta.schema_migrations "
        "ORDER BY version"
    )
    return _compare(tuple(AppliedMigration(**row) for row in rows))
