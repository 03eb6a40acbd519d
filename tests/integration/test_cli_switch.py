"""``ragplane kb switch-model`` and ``ragplane kb status`` with a real worker process."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from ragplane.knowledge.embedder import LOCAL_MODEL_IDS
from tests.conftest import PgCluster
from tests.integration.test_cli import cli_env, flat, invoke, run, table_rows
from tests.integration.test_cli_ingest import TENANT, folder, ingest
from tests.integration.test_worker import worker_env, worker_process

__all__ = ["cli_env", "folder"]  # fixtures, used by name

MEAN = LOCAL_MODEL_IDS["mean"]
CLS = LOCAL_MODEL_IDS["cls"]

pytestmark = pytest.mark.timeout(240)  # a worker process and two switches


def status(env: dict[str, str | None]) -> tuple[list[str], str]:
    result = invoke(["kb", "status", "--tenant", TENANT, "--kb", "handbook"], env)
    return table_rows(result.stdout)[0], flat(result.stdout)


def test_switch_model_queues_a_switch_a_worker_runs_and_wait_shows_it_through(
    clean_db: PgCluster, cli_env: dict[str, str | None], folder: Path, tmp_path: Path
) -> None:
    invoke(["kb", "create", "handbook", "--tenant", TENANT], cli_env)
    (folder / "notes.txt").unlink()
    assert ingest(cli_env, str(folder), "--tenant", TENANT, "--kb", "handbook")[0] == 0
    row, _ = status(cli_env)
    assert row == ["handbook", MEAN, MEAN, "1", "-"]

    args = ["kb", "switch-model", "--tenant", TENANT, "--kb", "handbook"]
    queued = invoke([*args, "--model", CLS], cli_env)
    job_id = queued.stdout.strip()
    assert f"switches from {MEAN} to {CLS} (2 documents) as job {job_id}" in flat(queued.output)
    row, text = status(cli_env)
    assert row == ["handbook", MEAN, MEAN, "1", CLS]
    assert f"latest switch: job {job_id} {MEAN} -> {CLS}: queued" in text

    refused = run([*args, "--model", CLS], cli_env)
    assert refused.returncode == 2, refused.stderr
    assert f"already switching to '{CLS}' (job {job_id})" in flat(refused.stderr)
    unknown = run([*args, "--model", "text-embedding-3-small"], cli_env)
    assert unknown.returncode == 2, unknown.stderr
    assert "no embedding model 'text-embedding-3-small'" in flat(unknown.stderr)

    log = tmp_path / "worker.log"
    with worker_process(worker_env(clean_db, tmp_path / "worker-data"), log) as worker:
        deadline = time.monotonic() + 120
        while status(cli_env)[0][2] != CLS:
            assert time.monotonic() < deadline, log.read_text()[-4000:]
            time.sleep(0.2)
        row, text = status(cli_env)
        assert row == ["handbook", CLS, CLS, "2", "-"]
        assert f"job {job_id} {MEAN} -> {CLS}: succeeded, phase done, 2/2 documents" in text
        # ingestion follows the namespace's new model
        (folder / "shipping.md").write_bytes(b"# Shipping\n\nParcels now leave from Lyon.\n")
        code, output = ingest(cli_env, str(folder), "--tenant", TENANT, "--kb", "handbook")
        assert code == 0, output
        assert "0 documents added, 1 updated, 1 unchanged" in flat(output)
        assert status(cli_env)[0] == ["handbook", CLS, CLS, "3", "-"]

        # back again, watching it through
        back = invoke([*args, "--model", MEAN, "--wait"], cli_env)
        assert "succeeded, phase done, 2/2 documents" in flat(back.output)
        assert status(cli_env)[0] == ["handbook", MEAN, MEAN, "4", "-"]
        worker.terminate()
        assert worker.wait(timeout=60) == 0
    same = run([*args, "--model", MEAN], cli_env)
    assert same.returncode == 2
    assert f"already answers with '{MEAN}'" in flat(same.stderr)
