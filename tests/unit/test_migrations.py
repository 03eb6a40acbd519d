"""The migrations shipped with ragplane: ordered, contiguous, named, valid UTF-8."""

from __future__ import annotations

import hashlib
import re
from importlib import resources

from ragplane.data import migrate

SQL_FILE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


def _sql_resources() -> list[str]:
    return sorted(
        e.name
        for e in resources.files("ragplane.data.migrations").iterdir()
        if e.name.endswith(".sql")
    )


def test_there_are_migrations() -> None:
    ms = migrate.available()
    assert len(ms) >= 3
    assert ms[0].version == 1
    assert ms[0].name == "roles_and_schemas"


def test_every_sql_file_is_picked_up() -> None:
    # a misnamed file (0004-foo.sql, 4_foo.sql, 0004_Foo.sql) would be silently skipped
    files = _sql_resources()
    assert files, "no .sql files in ragplane.data.migrations"
    for name in files:
        assert SQL_FILE.match(name), f"{name} does not follow NNNN_lowercase_name.sql"
    shipped = [f"{m.version:04d}_{m.name}.sql" for m in migrate.available()]
    assert shipped == files


def test_versions_are_ordered_unique_and_contiguous_from_one() -> None:
    versions = [m.version for m in migrate.available()]
    assert versions == sorted(versions)
    assert len(set(versions)) == len(versions)
    assert versions == list(range(1, len(versions) + 1))


def test_every_migration_has_a_name_and_sql_in_utf8() -> None:
    root = resources.files("ragplane.data.migrations")
    for m in migrate.available():
        assert re.fullmatch(r"[a-z0-9_]+", m.name), m
        assert not m.name.startswith("_")
        assert not m.name.endswith("_")
        raw = root.joinpath(f"{m.version:04d}_{m.name}.sql").read_bytes()
        assert raw.decode("utf-8") == m.sql  # strict decoding: raises on invalid UTF-8
        assert m.sql.strip(), f"{m.version:04d}_{m.name} is empty"
        assert "\ufeff" not in m.sql, f"{m.version:04d}_{m.name} has a byte-order mark"


def test_checksum_is_sha256_of_the_sql_and_differs_between_migrations() -> None:
    ms = migrate.available()
    for m in ms:
        assert m.checksum == hashlib.sha256(m.sql.encode("utf-8")).hexdigest()
        assert len(m.checksum) == 64
    assert len({m.checksum for m in ms}) == len(ms)


def test_migrations_do_not_manage_their_own_transactions() -> None:
    # each file runs inside a transaction the runner opens; COMMIT/ROLLBACK in a file would
    # break the all-or-nothing application of that migration
    for m in migrate.available():
        code = re.sub(r"--[^\n]*", "", m.sql)
        assert not re.search(r"(?im)^\s*(BEGIN|COMMIT|ROLLBACK)\s*;", code), m.name


def test_status_without_a_database_lists_everything_pending() -> None:
    st = migrate._compare(())
    assert st.applied == ()
    assert [m.version for m in st.pending] == [m.version for m in migrate.available()]
    assert st.current == 0
    assert st.latest == len(migrate.available())
    assert not st.is_current
