"""`ragplane ask`, `ragplane smoke` against a served platform, and `ragplane flags`."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ragplane.cli import app as cli
from ragplane.data import Database
from ragplane.platform import create_app
from tests.conftest import PgCluster, make_settings
from tests.integration.gateway_harness import serve_asgi
from tests.integration.test_chat import _reset_policies, _seed
from tests.integration.test_cli import _base_env, owner_sql, table_rows

pytestmark = pytest.mark.integration


@pytest.fixture
async def served(pg: PgCluster, owner_db: Database, tmp_path: Path) -> AsyncIterator[str]:
    _reset_policies(pg)
    app = create_app(make_settings(pg, tmp_path, dev_mode=True))
    async with app.router.lifespan_context(app), serve_asgi(app) as url:
        await _seed(app.state.platform, owner_db, "tnt_alpha")
        yield url
    _reset_policies(pg)


def _admin_env(pg: PgCluster, tmp_path: Path) -> dict[str, str | None]:
    return {
        **_base_env(),
        "DATABASE_URL": pg.app,
        "RAGPLANE_DATABASE__OWNER_URL": pg.owner,
        "RAGPLANE_DATA_DIR": str(tmp_path),
        "COLUMNS": "250",
    }


async def _cli(*args: str) -> tuple[int, str]:
    """Exit code, and output with the error a failed command raised (``main`` prints it)."""
    env = {**_base_env(), "COLUMNS": "250"}
    result = await asyncio.to_thread(CliRunner().invoke, cli, list(args), env=env)
    error = "" if isinstance(result.exception, SystemExit | None) else str(result.exception)
    return result.exit_code, result.output + error


async def test_smoke_passes_against_a_served_platform(served: str) -> None:
    code, output = await _cli("smoke", served, "--tenant", "tnt_alpha")
    assert code == 0, output
    assert "ok   GET /ready: 200" in output
    assert "ok   citations present" in output
    assert "ok   same request again is a cache hit" in output
    code, output = await _cli("smoke", served, "--tenant", "tnt_alpha", "--query", "   ")
    assert code == 1
    assert "FAIL POST /v1/chat (first): 400 empty_query" in output


async def test_ask_streams_the_answer_and_its_sources(served: str) -> None:
    code, output = await _cli(
        "ask", "What is the EU refund window?", "--url", served, "--tenant", "tnt_alpha"
    )
    assert code == 0, output
    assert "[1]" in output
    assert "refund-policy-eu.md" in output
    code, output = await _cli("ask", "x", "--url", served, "--tenant", "tnt_alpha", "--kb", "no")
    assert code != 0
    assert "namespace_not_found" in output


def test_flags_set_and_list_are_audited(pg: PgCluster, tmp_path: Path) -> None:
    env = _admin_env(pg, tmp_path)
    runner = CliRunner()
    try:
        r = runner.invoke(
            cli,
            [
                "flags",
                "set",
                "new-ranker",
                "--on",
                "--rollout",
                "25",
                "--tenant",
                "tnt_beta",
                "--by",
                "alice",
            ],
            env=env,
        )
        assert r.exit_code == 0, r.output
        assert "new-ranker: on for 25% of tenants and tnt_beta" in r.output
        r = runner.invoke(cli, ["flags", "list"], env=env)
        rows = {row[0]: row for row in table_rows(r.output)}
        assert rows["new-ranker"][1:4] == ["on", "25", "tnt_beta"]
        assert rows["ai-inference-enabled"][1] == "on"
        audit = owner_sql(
            pg,
            "SELECT enabled, rollout_percent, changed_by FROM control.flag_audit "
            "WHERE name = 'new-ranker' ORDER BY id",
        )
        assert audit == [(True, 25, "alice")]
        r = runner.invoke(cli, ["flags", "set", "new-ranker", "--on", "--rollout", "101"], env=env)
        assert r.exit_code == 2
    finally:
        owner_sql(pg, "DELETE FROM control.flags WHERE name = 'new-ranker'")
        owner_sql(pg, "DELETE FROM control.flag_audit WHERE name = 'new-ranker'")


def test_tenants_policy_sets_and_checks_the_guard_policy(pg: PgCluster, tmp_path: Path) -> None:
    env = _admin_env(pg, tmp_path)
    runner = CliRunner()
    try:
        r = runner.invoke(
            cli,
            [
                "tenants",
                "policy",
                "tnt_beta",
                "--guard",
                '{"actions": {"email": "block"}}',
                "--output-mode",
                "buffered",
            ],
            env=env,
        )
        assert r.exit_code == 0, r.output
        assert "tnt_beta: output_mode buffered" in r.output
        assert owner_sql(
            pg, "SELECT guard_policy, output_mode FROM control.tenants WHERE id = 'tnt_beta'"
        ) == [({"actions": {"email": "block"}}, "buffered")]
        r = runner.invoke(cli, ["tenants", "policy", "tnt_beta", "--guard", "{nope"], env=env)
        assert r.exit_code == 2
        r = runner.invoke(
            cli,
            ["tenants", "policy", "tnt_beta", "--guard", '{"actions": {"email": "shout"}}'],
            env=env,
        )
        assert r.exit_code != 0
        assert "actions.email: unknown action 'shout'" in str(r.exception)
        r = runner.invoke(
            cli, ["tenants", "policy", "tnt_nobody", "--output-mode", "stream"], env=env
        )
        assert "not registered" in str(r.exception)
    finally:
        owner_sql(pg, "UPDATE control.tenants SET guard_policy = '{}', output_mode = 'stream'")
