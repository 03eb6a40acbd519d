"""Migrations against the real embedded Postgres: status, idempotence, drift detection."""

from __future__ import annotations

import urllib.parse
from collections.abc import Iterator

import psycopg
import pytest
from psycopg import sql

from ragplane.data import migrate
from ragplane.errors import MigrationError
from tests.conftest import PgCluster

SCRATCH_DB = "ragplane_migration_test"


def _with_database(url: str, name: str) -> str:
    return urllib.parse.urlsplit(url)._replace(path=f"/{name}").geturl()


def test_status_is_current(pg: PgCluster) -> None:
    st = migrate.status(pg.app)  # the application role may read the bookkeeping
    shipped = migrate.available()
    assert st.pending == ()
    assert st.is_current
    assert st.current == st.latest == shipped[-1].version
    assert [(a.version, a.name, a.checksum) for a in st.applied] == [
        (m.version, m.name, m.checksum) for m in shipped
    ]


def test_migrate_again_applies_nothing(pg: PgCluster) -> None:
    with psycopg.connect(pg.owner) as conn:
        before = conn.execute(
            "SELECT version, applied_at FROM ragplane_meta.schema_migrations ORDER BY version"
        ).fetchall()
    assert migrate.migrate(pg.owner) == []
    assert migrate.migrate(pg.owner) == []
    with psycopg.connect(pg.owner) as conn:
        after = conn.execute(
            "SELECT version, applied_at FROM ragplane_meta.schema_migrations ORDER BY version"
        ).fetchall()
    assert after == before
    assert migrate.status(pg.app).is_current


def test_edited_migration_is_refused(pg: PgCluster) -> None:
    target = migrate.available()[1]
    label = f"{target.version:04d}_{target.name}"
    with psycopg.connect(pg.owner, autocommit=True) as conn:
        conn.execute(
            "UPDATE ragplane_meta.schema_migrations SET checksum = %s WHERE version = %s",
            ("0" * 64, target.version),
        )
        try:
            with pytest.raises(MigrationError) as from_status:
                migrate.status(pg.app)
            with pytest.raises(MigrationError) as from_migrate:
                migrate.migrate(pg.owner)
        finally:
            conn.execute(
                "UPDATE ragplane_meta.schema_migrations SET checksum = %s WHERE version = %s",
                (target.checksum, target.version),
            )
    for exc in (from_status.value, from_migrate.value):
        assert label in str(exc)
        assert "checksum differs" in str(exc)
    assert migrate.status(pg.app).is_current


def test_migration_from_a_newer_version_is_refused(pg: PgCluster) -> None:
    future = migrate.available()[-1].version + 1
    with psycopg.connect(pg.owner, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO ragplane_meta.schema_migrations (version, name, checksum) "
            "VALUES (%s, 'from_the_future', %s)",
            (future, "f" * 64),
        )
        try:
            with pytest.raises(MigrationError) as from_status:
                migrate.status(pg.app)
            with pytest.raises(MigrationError) as from_migrate:
                migrate.migrate(pg.owner)
        finally:
            conn.execute(
                "DELETE FROM ragplane_meta.schema_migrations WHERE version = %s", (future,)
            )
    for exc in (from_status.value, from_migrate.value):
        assert f"{future:04d}_from_the_future" in str(exc)
        assert "does not ship" in str(exc)
    assert migrate.status(pg.app).is_current


@pytest.fixture
def scratch_db(pg: PgCluster) -> Iterator[str]:
    """An empty database in the session's cluster, owned by the owner role; its owner URL."""
    with psycopg.connect(pg.superuser_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(SCRATCH_DB)))
        conn.execute(
            sql.SQL("CREATE DATABASE {} OWNER ragplane_owner").format(sql.Identifier(SCRATCH_DB))
        )
    try:
        yield _with_database(pg.owner, SCRATCH_DB)
    finally:
        with psycopg.connect(pg.superuser_url, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                    sql.Identifier(SCRATCH_DB)
                )
            )


def _install_pgvector(pg: PgCluster) -> None:
    with psycopg.connect(_with_database(pg.superuser_url, SCRATCH_DB), autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS vector")


def test_fresh_database_gets_every_migration_in_order(pg: PgCluster, scratch_db: str) -> None:
    _install_pgvector(pg)
    before = migrate.status(scratch_db)
    assert before.applied == ()
    assert before.current == 0
    assert [m.version for m in before.pending] == [m.version for m in migrate.available()]

    applied = migrate.migrate(scratch_db)
    assert [m.version for m in applied] == [m.version for m in migrate.available()]
    after = migrate.status(_with_database(pg.app, SCRATCH_DB))
    assert after.is_current
    assert after.current == after.latest
    assert migrate.migrate(scratch_db) == []
    with psycopg.connect(scratch_db) as conn:
        row = conn.execute("SELECT to_regclass('control.tenants')").fetchone()
    assert row is not None
    assert row[0] is not None


def test_migrate_without_pgvector_says_so(scratch_db: str) -> None:
    with pytest.raises(MigrationError, match=r"pgvector extension is not installed"):
        migrate.migrate(scratch_db)
    assert migrate.status(scratch_db).applied == ()


def test_failing_migration_is_rolled_back_and_named(
    pg: PgCluster, scratch_db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    _install_pgvector(pg)
    shipped = migrate.available()
    broken = migrate.Migration(
        shipped[-1].version + 1,
        "broken",
        "CREATE TABLE control.half_done (id int);\nSELECT 1 / 0;\n",
    )
    monkeypatch.setattr(migrate, "available", lambda: [*shipped, broken])
    with pytest.raises(MigrationError) as info:
        migrate.migrate(scratch_db)
    msg = str(info.value)
    assert f"{broken.version:04d}_broken failed and was rolled back" in msg
    assert "division by zero" in msg
    st = migrate.status(scratch_db)
    assert [a.version for a in st.applied] == [m.version for m in shipped]
    assert [m.name for m in st.pending] == ["broken"]
    with psycopg.connect(scratch_db) as conn:
        row = conn.execute("SELECT to_regclass('control.half_done')").fetchone()
    assert row == (None,)
