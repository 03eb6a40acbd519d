"""The ``ragplane`` command line against the session's database (external-database mode).

Happy paths run in-process through typer's CliRunner; what a user sees when a command
fails (message on stderr, exit status of ``cli.main``) is checked on the installed
``ragplane`` executable in a subprocess.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

import jwt
import psycopg
import pytest
from typer.testing import CliRunner, Result

from ragplane.cli import app
from ragplane.data import migrate
from ragplane.edge.devkeys import load_or_create_dev_keys
from tests.conftest import PgCluster

RAGPLANE = Path(sys.executable).with_name("ragplane")
CLI_TENANT = "tnt_cli_test"
JWT_SHAPE = re.compile(r"^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+$")
KEY_SHAPE = re.compile(r"^rpk_([0-9a-f]{12})_[A-Za-z0-9_-]{20,}$")


def _base_env() -> dict[str, str | None]:
    """Unset every RAGPLANE_* / DATABASE_URL of the outer environment; plain output as in a
    log file (not a terminal: no colour, and rich's default width of 80 columns)."""
    env: dict[str, str | None] = {
        name: None
        for name in os.environ
        if name.startswith("RAGPLANE_") or name in ("DATABASE_URL", "FORCE_COLOR", "COLUMNS")
    }
    env["NO_COLOR"] = "1"
    return env


@pytest.fixture
def cli_env(pg: PgCluster, tmp_path: Path) -> dict[str, str | None]:
    env = _base_env()
    env["DATABASE_URL"] = pg.app
    env["RAGPLANE_DATABASE__OWNER_URL"] = pg.owner
    env["RAGPLANE_DATA_DIR"] = str(tmp_path / "data")
    return env


def invoke(args: list[str], env: Mapping[str, str | None]) -> Result:
    """Run a command in-process; it must succeed. Tables are read at a terminal's width."""
    result = CliRunner().invoke(app, args, env={**env, "COLUMNS": "250"}, catch_exceptions=True)
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        f"ragplane {' '.join(args)} raised {result.exception!r}\n{result.output}"
    )
    assert result.exit_code == 0, f"ragplane {' '.join(args)}:\n{result.output}"
    return result


def run(args: list[str], env: Mapping[str, str | None]) -> subprocess.CompletedProcess[str]:
    """Run the installed executable, exactly as a user would."""
    full = {k: v for k, v in os.environ.items() if env.get(k, "") is not None}
    full.update({k: v for k, v in env.items() if v is not None})
    return subprocess.run(
        [str(RAGPLANE), *args],
        env=full,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    assert lines, "no output"
    return lines[-1].strip()


def flat(text: str) -> str:
    """Text with rich's panel borders and line wrapping undone (typer boxes usage errors)."""
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", text).split())


def owner_sql(
    pg: PgCluster, query: str, params: tuple[object, ...] = ()
) -> list[tuple[object, ...]]:
    with psycopg.connect(pg.owner, autocommit=True) as conn:
        cur = conn.execute(query, params)
        return cur.fetchall() if cur.description else []


def table_rows(output: str) -> list[list[str]]:
    """The body cells of a rich table (box-drawing borders stripped)."""
    rows = []
    for line in output.splitlines():
        if line.startswith("│"):
            rows.append([cell.strip() for cell in line.strip("│").split("│")])
    return rows


# --- token --------------------------------------------------------------------------------


def test_token_is_a_verifiable_dev_jwt(tmp_path: Path) -> None:
    data_dir = tmp_path / "keys"
    env = _base_env()
    result = invoke(["token", "--tenant", "tnt_alpha", "--data-dir", str(data_dir)], env)
    token = last_line(result.stdout)
    assert JWT_SHAPE.match(token), result.stdout
    assert "dev token for tnt_alpha" in result.stderr

    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["tenant_id"] == "tnt_alpha"
    assert claims["iss"] == "ragplane"
    assert claims["aud"] == "ragplane"
    assert claims["roles"] == ["admin"]
    assert claims["exp"] - claims["iat"] == 24 * 3600

    keys = load_or_create_dev_keys(data_dir)
    header = jwt.get_unverified_header(token)
    assert header["alg"] == "ES256"
    assert header["kid"] == keys.kid
    jwk = jwt.PyJWKSet.from_dict(keys.public_jwks())[header["kid"]]
    verified = jwt.decode(
        token, key=jwk.key, algorithms=["ES256"], audience="ragplane", issuer="ragplane"
    )
    assert verified == claims

    # signed with the key of that data directory, not just any key
    other = load_or_create_dev_keys(tmp_path / "other-keys")
    other_jwk = jwt.PyJWKSet.from_dict(other.public_jwks())[other.kid]
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(token, key=other_jwk.key, algorithms=["ES256"], audience="ragplane")

    key_file = data_dir / "dev-keys.json"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600


def test_token_honours_roles_ttl_and_auth_settings(tmp_path: Path) -> None:
    env = _base_env()
    env["RAGPLANE_AUTH__ISSUER"] = "https://issuer.test"
    env["RAGPLANE_AUTH__AUDIENCE"] = "api.test"
    env["RAGPLANE_AUTH__TENANT_CLAIM"] = "org"
    args = ["token", "-t", "tnt_beta", "--data-dir", str(tmp_path), "--ttl", "120"]
    result = invoke([*args, "--role", "reader", "--role", "writer"], env)
    claims = jwt.decode(last_line(result.stdout), options={"verify_signature": False})
    assert claims["org"] == "tnt_beta"
    assert "tenant_id" not in claims
    assert claims["iss"] == "https://issuer.test"
    assert claims["aud"] == "api.test"
    assert claims["roles"] == ["reader", "writer"]
    assert claims["exp"] - claims["iat"] == 120


def test_token_reuses_the_data_directory_key(tmp_path: Path) -> None:
    env = _base_env()
    first = last_line(invoke(["token", "-t", "tnt_alpha", "--data-dir", str(tmp_path)], env).stdout)
    second = last_line(invoke(["token", "-t", "tnt_beta", "--data-dir", str(tmp_path)], env).stdout)
    assert jwt.get_unverified_header(first)["kid"] == jwt.get_unverified_header(second)["kid"]


def test_token_refuses_a_malformed_tenant_id(tmp_path: Path) -> None:
    proc = run(["token", "--tenant", "Not-A-Tenant", "--data-dir", str(tmp_path)], _base_env())
    assert proc.returncode == 2
    assert "not a valid tenant id: 'Not-A-Tenant'" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""


# --- tenants ------------------------------------------------------------------------------


@pytest.fixture
def cli_tenant(pg: PgCluster) -> Iterator[str]:
    owner_sql(pg, "DELETE FROM control.tenants WHERE id = %s", (CLI_TENANT,))
    try:
        yield CLI_TENANT
    finally:
        owner_sql(pg, "DELETE FROM control.tenants WHERE id = %s", (CLI_TENANT,))


def test_tenants_add_list_show(
    pg: PgCluster, cli_env: dict[str, str | None], cli_tenant: str
) -> None:
    added = invoke(
        [
            "tenants",
            "add",
            cli_tenant,
            "--name",
            "CLI Test Corp",
            "--region",
            "us",
            "--data-class",
            "confidential",
            "--kb",
            "handbook",
            "--kb",
            "support",
        ],
        cli_env,
    )
    assert f"added tenant {cli_tenant} (CLI Test Corp, home region us)" in added.stdout
    assert owner_sql(
        pg, "SELECT name, home_region, data_class FROM control.tenants WHERE id = %s", (cli_tenant,)
    ) == [("CLI Test Corp", "us", "confidential")]

    listed = table_rows(invoke(["tenants", "list"], cli_env).stdout)
    ids = [row[0] for row in listed]
    assert cli_tenant in ids
    assert "tnt_alpha" in ids  # the session's fixtures tenants are listed too
    assert ids == sorted(ids)
    row = listed[ids.index(cli_tenant)]
    assert row[:4] == [cli_tenant, "CLI Test Corp", "us", "confidential"]
    assert row[5] == "handbook, support"
    assert row[6] == "active"

    shown = table_rows(invoke(["tenants", "show", cli_tenant], cli_env).stdout)
    assert len(shown) == 1
    assert shown[0][:3] == [cli_tenant, "CLI Test Corp", "us"]


def test_tenants_add_twice_fails_clearly(cli_env: dict[str, str | None], cli_tenant: str) -> None:
    args = ["tenants", "add", cli_tenant, "--name", "Once", "--region", "eu"]
    first = run(args, cli_env)
    assert first.returncode == 0, first.stderr
    again = run([*args[:-3], "Twice", "--region", "us"], cli_env)
    assert again.returncode == 2
    assert f"error: tenant '{cli_tenant}' already exists" in again.stderr
    assert "Traceback" not in again.stderr
    shown = table_rows(invoke(["tenants", "show", cli_tenant], cli_env).stdout)
    assert shown[0][:3] == [cli_tenant, "Once", "eu"]  # the first registration is untouched


def test_tenants_show_unknown_tenant(cli_env: dict[str, str | None]) -> None:
    proc = run(["tenants", "show", "tnt_never_registered"], cli_env)
    assert proc.returncode == 2
    assert "error: tenant 'tnt_never_registered' is not registered" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_tenants_add_rejects_bad_region_and_data_class(
    pg: PgCluster, cli_env: dict[str, str | None], cli_tenant: str
) -> None:
    bad_region = run(["tenants", "add", cli_tenant, "--name", "X", "--region", "mars"], cli_env)
    assert bad_region.returncode == 2
    assert "Invalid value for --region: region must be 'eu' or 'us'" in flat(bad_region.stderr)
    bad_class = run(
        ["tenants", "add", cli_tenant, "--name", "X", "--data-class", "secret"], cli_env
    )
    assert bad_class.returncode == 2
    assert (
        "Invalid value for --data-class: data class must be one of: "
        "public, standard, confidential, restricted"
    ) in flat(bad_class.stderr)
    assert "Traceback" not in bad_class.stderr
    assert owner_sql(pg, "SELECT 1 FROM control.tenants WHERE id = %s", (cli_tenant,)) == []


def test_tenants_add_with_a_bad_namespace_is_refused_whole(
    pg: PgCluster, cli_env: dict[str, str | None], cli_tenant: str
) -> None:
    proc = run(["tenants", "add", cli_tenant, "--name", "X", "--kb", "Not A Namespace!"], cli_env)
    assert proc.returncode == 2
    assert "error: the database refused the change" in proc.stderr
    assert "kb_namespaces_name_check" in proc.stderr
    assert "Traceback" not in proc.stderr
    # the tenant row and its namespaces are one transaction
    assert owner_sql(pg, "SELECT 1 FROM control.tenants WHERE id = %s", (cli_tenant,)) == []


def test_admin_commands_need_the_owner_url(pg: PgCluster, cli_env: dict[str, str | None]) -> None:
    env = {**cli_env, "RAGPLANE_DATABASE__OWNER_URL": None}
    proc = run(["tenants", "add", "tnt_no_owner", "--name", "X"], env)
    assert proc.returncode == 2
    assert "needs the owner role" in proc.stderr
    assert "RAGPLANE_DATABASE__OWNER_URL" in proc.stderr
    assert owner_sql(pg, "SELECT 1 FROM control.tenants WHERE id = 'tnt_no_owner'") == []


# --- keys ---------------------------------------------------------------------------------


def test_keys_create_list_revoke(pg: PgCluster, cli_env: dict[str, str | None]) -> None:
    created = invoke(
        ["keys", "create", "--tenant", "tnt_alpha", "--name", "cli-key", "--scope", "rag:read"],
        cli_env,
    )
    plaintext = last_line(created.stdout)
    m = KEY_SHAPE.match(plaintext)
    assert m, created.stdout
    key_id = m.group(1)
    try:
        assert f"created key {key_id} for tnt_alpha" in created.stderr
        assert plaintext not in created.stderr
        # stored as a hash only, bound to the tenant
        stored = owner_sql(
            pg,
            "SELECT tenant_id, name, scopes, key_hash FROM control.api_keys WHERE id = %s",
            (key_id,),
        )
        assert len(stored) == 1
        tenant_id, name, scopes, key_hash = stored[0]
        assert (tenant_id, name, scopes) == ("tnt_alpha", "cli-key", ["rag:read"])
        assert key_hash == hashlib.sha256(plaintext.encode()).digest()

        rows = table_rows(invoke(["keys", "list", "--tenant", "tnt_alpha"], cli_env).stdout)
        mine = [r for r in rows if r[0] == key_id]
        assert len(mine) == 1
        assert mine[0][1:3] == ["cli-key", "rag:read"]
        assert mine[0][4] == ""  # not revoked
        other = table_rows(invoke(["keys", "list", "--tenant", "tnt_beta"], cli_env).stdout)
        assert key_id not in [r[0] for r in other]

        revoked = invoke(["keys", "revoke", key_id], cli_env)
        assert f"revoked {key_id}" in revoked.stdout
        rows = table_rows(invoke(["keys", "list", "--tenant", "tnt_alpha"], cli_env).stdout)
        assert [r[4] for r in rows if r[0] == key_id] != [""]
        assert owner_sql(
            pg, "SELECT revoked_at IS NOT NULL FROM control.api_keys WHERE id = %s", (key_id,)
        ) == [(True,)]

        again = run(["keys", "revoke", key_id], cli_env)
        assert again.returncode == 2
        assert f"error: no active API key with id '{key_id}'" in again.stderr
        assert f"revoked {key_id}" not in again.stdout
    finally:
        owner_sql(pg, "DELETE FROM control.api_keys WHERE id = %s", (key_id,))


def test_keys_create_for_an_unregistered_tenant(
    pg: PgCluster, cli_env: dict[str, str | None]
) -> None:
    proc = run(["keys", "create", "--tenant", "tnt_never_registered"], cli_env)
    assert proc.returncode == 2
    assert "error: tenant 'tnt_never_registered' is not registered" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert "rpk_" not in proc.stdout
    assert (
        owner_sql(pg, "SELECT 1 FROM control.api_keys WHERE tenant_id = 'tnt_never_registered'")
        == []
    )


def test_keys_revoke_unknown_id(cli_env: dict[str, str | None]) -> None:
    proc = run(["keys", "revoke", "000000000000"], cli_env)
    assert proc.returncode == 2
    assert "error: no active API key with id '000000000000'" in proc.stderr


# --- db -----------------------------------------------------------------------------------


def test_db_status_shows_every_migration_applied(cli_env: dict[str, str | None]) -> None:
    result = invoke(["db", "status"], cli_env)
    rows = table_rows(result.stdout)
    shipped = migrate.available()
    assert [(r[0], r[1], r[2]) for r in rows] == [
        (f"{m.version:04d}", m.name, "applied") for m in shipped
    ]
    assert f"schema version {shipped[-1].version} of {shipped[-1].version}" in result.stdout
    assert "pending" not in result.stdout


def test_db_migrate_is_up_to_date(cli_env: dict[str, str | None]) -> None:
    result = invoke(["db", "migrate"], cli_env)
    assert "database is up to date" in result.stdout
    assert "applied" not in result.stdout


def test_db_status_reports_an_edited_migration(
    pg: PgCluster, cli_env: dict[str, str | None]
) -> None:
    first = migrate.available()[0]
    owner_sql(
        pg,
        "UPDATE ragplane_meta.schema_migrations SET checksum = 'tampered' WHERE version = %s",
        (first.version,),
    )
    try:
        proc = run(["db", "status"], cli_env)
    finally:
        owner_sql(
            pg,
            "UPDATE ragplane_meta.schema_migrations SET checksum = %s WHERE version = %s",
            (first.checksum, first.version),
        )
    assert proc.returncode == 2
    assert f"migration {first.version:04d}_{first.name} was changed after it was applied" in (
        proc.stderr
    )


# --- configuration errors -----------------------------------------------------------------


def test_invalid_env_setting_exits_with_the_config_error(cli_env: dict[str, str | None]) -> None:
    proc = run(["db", "status"], {**cli_env, "RAGPLANE_PORT": "abc"})
    assert proc.returncode == 2
    assert "error: invalid configuration:" in proc.stderr
    assert "port in environment variable RAGPLANE_PORT" in proc.stderr
    assert "valid integer" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""


def test_invalid_config_file_exits_with_the_config_error(
    tmp_path: Path, cli_env: dict[str, str | None]
) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("database:\n  pool_max_size: 0\n", encoding="utf-8")
    proc = run(["tenants", "list", "--config", str(cfg)], cli_env)
    assert proc.returncode == 2
    assert f"database.pool_max_size in config file {cfg}" in proc.stderr
    assert "greater than or equal to 1" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_invalid_config_in_process_raises_config_error(cli_env: dict[str, str | None]) -> None:
    from ragplane.errors import ConfigError

    result = CliRunner().invoke(app, ["tenants", "list"], env={**cli_env, "RAGPLANE_PORT": "abc"})
    assert isinstance(result.exception, ConfigError)
    assert "port in environment variable RAGPLANE_PORT" in str(result.exception)
