"""``ragplane worker`` as a real process: a worker killed with SIGKILL mid-job loses
nothing -- another worker takes the job over and finishes it without a duplicate."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import psycopg
import pytest

from ragplane.data import Database
from ragplane.data.queue import create_queue
from ragplane.knowledge.jobs import IngestJob, IngestQueue, Upload, get_job
from tests.conftest import PgCluster
from tests.integration.test_ingest_jobs import TENANT, make_namespace

RAGPLANE = str(Path(sys.executable).with_name("ragplane"))
RECORDS = 400
BATCH = 4

pytestmark = pytest.mark.timeout(300)  # two worker processes; the waits below are bounded


def worker_env(pg: PgCluster, data_dir: Path) -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("RAGPLANE_") and k != "DATABASE_URL"
    }
    env.update(
        DATABASE_URL=pg.app,
        RAGPLANE_DATA_DIR=str(data_dir),
        RAGPLANE_LOG_LEVEL="info",
        # fast failure detection for the test; defaults are 10 s / 30 s / 15 s / 5 s
        RAGPLANE_WORKER__HEARTBEAT_S="0.2",
        RAGPLANE_WORKER__STALLED_AFTER_S="1.5",
        RAGPLANE_WORKER__STALLED_CHECK_S="0.3",
        RAGPLANE_WORKER__POLL_S="0.2",
        RAGPLANE_WORKER__BATCH_DOCUMENTS=str(BATCH),
    )
    return env


@contextmanager
def worker_process(env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("ab") as out:
        proc = subprocess.Popen([RAGPLANE, "worker"], env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


async def wait_for(
    check: Callable[[], Awaitable[bool]], timeout_s: float, what: str, log: Path
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if await check():
            return
        await anyio.sleep(0.02)
    text = await anyio.Path(log).read_text()
    raise AssertionError(f"{what} within {timeout_s:g}s; worker log:\n{text[-4000:]}")


def corpus() -> bytes:
    lines = [
        json.dumps(
            {
                "_id": f"r{i:04d}",
                "title": f"Record {i}",
                "text": f"Record {i} is about topic number {i}, which matters to team {i % 7}.",
            }
        )
        for i in range(RECORDS)
    ]
    return "\n".join(lines).encode()


def owner_rows(pg: PgCluster, query: str, params: tuple[Any, ...] = ()) -> list[Any]:
    with psycopg.connect(pg.owner, autocommit=True) as conn:
        return conn.execute(query, params).fetchall()


async def test_a_worker_killed_mid_job_is_replaced_without_duplicates(
    clean_db: PgCluster, tmp_path: Path
) -> None:
    ns = await make_namespace(clean_db)
    log = tmp_path / "workers.log"
    env = worker_env(clean_db, tmp_path / "data")
    async with Database(clean_db.app, max_size=2) as db:
        queue = IngestQueue(create_queue(clean_db.app), max_attempts=5, retry_wait_s=0)
        job = await queue.enqueue(
            db, ns, [Upload("kb://corpus/records.jsonl", corpus())], max_upload_bytes=1 << 20
        )

        async def current() -> IngestJob:
            found = await get_job(db, TENANT, job.id)
            assert found is not None
            return found

        async def mid_job() -> bool:
            j = await current()
            return j.status == "running" and j.documents_done >= 2 * BATCH

        async def finished() -> bool:
            return (await current()).finished

        with worker_process(env, log) as first:
            await wait_for(mid_job, 90, "the first worker made no progress", log)
            first.send_signal(signal.SIGKILL)
            assert first.wait(timeout=30) == -signal.SIGKILL
        killed = await current()
        assert killed.status == "running"
        assert killed.documents_done < RECORDS, "the job finished before the kill; make it bigger"
        with worker_process(env, log) as second:
            await wait_for(finished, 120, "the job did not finish after the restart", log)
            second.send_signal(signal.SIGTERM)
            assert second.wait(timeout=60) == 0, "the second worker did not stop cleanly"
        done = await current()
        async with db.tenant(TENANT) as s:
            docs = await s.fetch_one(
                "SELECT count(*) AS n, count(DISTINCT source_uri) AS uris FROM documents"
            )
            chunks = await s.fetch_one(
                "SELECT count(*) AS n, count(DISTINCT (document_id, ordinal)) AS distinct_n "
                "FROM chunks"
            )
            per_uri = await s.fetch_one(
                "SELECT max(n) AS most FROM (SELECT d.source_uri, count(*) AS n FROM chunks c "
                "JOIN documents d ON d.id = c.document_id GROUP BY 1) AS x"
            )
            uploads = await s.fetch_all("SELECT id FROM ingest_uploads")

    assert done.status == "succeeded", done.errors
    assert done.attempts == 2
    assert (done.documents_total, done.documents_done, done.errors) == (RECORDS, RECORDS, ())
    assert docs == {"n": RECORDS, "uris": RECORDS}
    assert chunks is not None
    assert chunks["n"] == chunks["distinct_n"] == RECORDS  # one short chunk per record
    assert per_uri == {"most": 1}
    # every chunk was written once; a batch committed just before the kill may be uncounted
    assert RECORDS - BATCH <= done.chunks_written <= RECORDS
    assert uploads == []
    # exactly one final status, on the queue too: started twice, succeeded once
    events = owner_rows(
        clean_db,
        "SELECT type::text, count(*) FROM procrastinate.procrastinate_events "
        "WHERE job_id = %s GROUP BY 1 ORDER BY 1",
        (done.procrastinate_job_id,),
    )
    assert dict(events) == {
        "deferred": 1,
        "started": 2,
        "deferred_for_retry": 1,  # by the stalled-job check, after the kill
        "scheduled": 1,
        "succeeded": 1,
    }
