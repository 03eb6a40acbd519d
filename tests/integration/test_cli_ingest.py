"""``ragplane kb create`` and ``ragplane ingest`` against the session's database."""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest
from typer.testing import CliRunner

from ragplane.cli import app
from tests.conftest import PgCluster
from tests.integration.test_cli import cli_env, flat, invoke, run, table_rows
from tests.integration.test_ingest_jobs import REFUND, SHIPPING

__all__ = ["cli_env"]  # the fixture, used by name

TENANT = "tnt_alpha"


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "handbook"
    (root / "policies").mkdir(parents=True)
    (root / "policies" / "refund.md").write_bytes(REFUND)
    (root / "shipping.md").write_bytes(SHIPPING)
    (root / "notes.txt").write_bytes("caf\xe9".encode("latin-1"))  # not UTF-8
    (root / "logo.png").write_bytes(b"\x89PNG")  # skipped: unsupported extension
    (root / ".hidden.md").write_bytes(b"# secret")  # skipped: hidden
    return root


def ingest(env: dict[str, str | None], *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["ingest", *args], env={**env, "COLUMNS": "250"})
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    return result.exit_code, result.output


def documents(pg: PgCluster, kb: str) -> list[str]:
    with psycopg.connect(pg.app, autocommit=True) as conn, conn.transaction():
        conn.execute("SELECT set_config('app.tenant_id', %s, true)", (TENANT,))
        rows = conn.execute(
            "SELECT source_uri FROM documents WHERE namespace = %s ORDER BY 1", (kb,)
        ).fetchall()
    return [r[0] for r in rows]


def test_ingest_a_folder_with_a_bad_file_exits_1_and_names_it(
    clean_db: PgCluster, cli_env: dict[str, str | None], folder: Path
) -> None:
    invoke(["kb", "create", "handbook", "--tenant", TENANT, "--max-tokens", "128"], cli_env)
    code, output = ingest(cli_env, str(folder), "--tenant", TENANT, "--kb", "handbook")
    assert code == 1, output
    errors = [row for row in table_rows(output) if len(row) == 3]
    assert errors == [[(folder / "notes.txt").resolve().as_uri(), "invalid_utf8", errors[0][2]]], (
        output
    )
    assert "not valid UTF-8" in errors[0][2]
    assert "3 files: 2 documents added" in flat(output)
    assert "skipped 1 files with an unsupported extension" in output
    assert documents(clean_db, "handbook") == [
        (folder / "policies" / "refund.md").resolve().as_uri(),
        (folder / "shipping.md").resolve().as_uri(),
    ]


def test_reingest_is_free_and_prune_deletes_what_is_gone(
    clean_db: PgCluster, cli_env: dict[str, str | None], folder: Path
) -> None:
    invoke(["kb", "create", "handbook", "--tenant", TENANT], cli_env)
    (folder / "notes.txt").unlink()
    code, output = ingest(cli_env, str(folder), "--tenant", TENANT, "--kb", "handbook")
    assert code == 0, output
    (folder / "shipping.md").unlink()
    code, output = ingest(cli_env, str(folder), "--tenant", TENANT, "--kb", "handbook", "--prune")
    assert code == 0, output
    assert "0 documents added, 0 updated, 1 unchanged, 1 deleted, 0 failed" in flat(output)
    assert "0 chunks" in output
    assert documents(clean_db, "handbook") == [
        (folder / "policies" / "refund.md").resolve().as_uri()
    ]


def test_prune_is_skipped_when_a_file_failed(
    clean_db: PgCluster, cli_env: dict[str, str | None], folder: Path
) -> None:
    invoke(["kb", "create", "handbook", "--tenant", TENANT], cli_env)
    (folder / "policies" / "refund.md").unlink()
    ingest(cli_env, str(folder), "--tenant", TENANT, "--kb", "handbook")
    code, output = ingest(cli_env, str(folder), "--tenant", TENANT, "--kb", "handbook", "--prune")
    assert code == 1, output
    assert "not pruned" in output


def test_ingest_into_a_missing_knowledge_base_says_how_to_create_it(
    clean_db: PgCluster, cli_env: dict[str, str | None], folder: Path
) -> None:
    result = run(["ingest", str(folder), "--tenant", TENANT, "--kb", "nope"], cli_env)
    assert result.returncode == 2, result.stderr
    assert "ragplane kb create nope --tenant tnt_alpha" in flat(result.stderr)
    result = run(["ingest", str(folder / "missing"), "--tenant", TENANT], cli_env)
    assert result.returncode == 2
    assert "does not exist" in flat(result.stderr)


def test_kb_create_refuses_an_existing_namespace_and_a_bad_policy(
    clean_db: PgCluster, cli_env: dict[str, str | None]
) -> None:
    result = invoke(["kb", "create", "faq", "--tenant", TENANT, "--overlap", "8"], cli_env)
    assert "created knowledge base faq for tnt_alpha" in flat(result.stdout)
    assert "overlap 8" in result.stdout
    again = run(["kb", "create", "faq", "--tenant", TENANT], cli_env)
    assert again.returncode == 2
    assert "already has a knowledge base 'faq'" in flat(again.stderr)
    bad = run(["kb", "create", "wide", "--tenant", TENANT, "--overlap", "200"], cli_env)
    assert bad.returncode == 2
    assert "overlap_tokens" in flat(bad.stderr)
    unknown = run(["kb", "create", "faq", "--tenant", "tnt_nobody"], cli_env)
    assert unknown.returncode == 2
    assert "tnt_nobody" in unknown.stderr


def test_ingest_help_documents_the_exit_codes(cli_env: dict[str, str | None]) -> None:
    result = invoke(["ingest", "--help"], cli_env)
    text = flat(result.stdout)
    assert "0 when every document was ingested, 1 when some documents failed" in text
