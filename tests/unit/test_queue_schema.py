"""Migration 0004 carries procrastinate's schema.sql verbatim, for the installed version.

When procrastinate is upgraded this fails: do not edit 0004 (applied migrations are
checksummed); add a migration that applies procrastinate's own ``sql/migrations`` files
for the versions in between, and point this test at the new pin.
"""

from __future__ import annotations

import importlib.metadata
import re

from procrastinate.schema import SchemaManager

from ragplane.data import migrate

PINNED = "3.10.0"
BLOCK = re.compile(
    r"^-- BEGIN procrastinate (?P<version>\S+) sql/schema\.sql\n"
    r"(?P<sql>.*)"
    r"^-- END procrastinate (?P=version) sql/schema\.sql\n",
    re.MULTILINE | re.DOTALL,
)


def _copied() -> tuple[str, str]:
    (m,) = [m for m in migrate.available() if m.version == 4]
    found = BLOCK.search(m.sql)
    assert found, "0004 has no BEGIN/END procrastinate schema block"
    return found["version"], found["sql"]


def test_the_installed_procrastinate_is_the_pinned_one() -> None:
    installed = importlib.metadata.version("procrastinate")
    assert installed == PINNED, (
        f"procrastinate {installed} is installed, the queue schema is {PINNED}'s: add a "
        "migration with procrastinate's sql/migrations for the versions in between"
    )


def test_the_migration_carries_the_installed_schema_verbatim() -> None:
    version, sql = _copied()
    assert version == PINNED
    assert sql == SchemaManager.get_schema(), (
        "procrastinate's schema.sql differs from the copy in 0004_ingest_jobs.sql"
    )


def test_the_schema_is_created_in_its_own_schema() -> None:
    (m,) = [m for m in migrate.available() if m.version == 4]
    head = m.sql.split("-- BEGIN procrastinate", 1)[0]
    assert "CREATE SCHEMA procrastinate;" in head
    assert head.rstrip().endswith("SET LOCAL search_path TO procrastinate;")
