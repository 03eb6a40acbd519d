"""An embedding-model switch on real ``ragplane worker`` processes: a worker killed with
SIGKILL mid-switch is replaced, and the switch completes with no duplicate chunk."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from ragplane.control.namespaces import get_namespace
from ragplane.data import Database
from ragplane.data.queue import create_queue
from ragplane.knowledge.embedder import LocalEmbedder
from ragplane.knowledge.ingest import Ingestor
from ragplane.knowledge.jobs import IngestJob, IngestQueue, get_job
from ragplane.knowledge.models import EmbedderRegistry
from ragplane.knowledge.parsers import parse
from ragplane.knowledge.switch import namespace_state, request_switch
from tests.conftest import PgCluster
from tests.integration.test_ingest_jobs import KB, TENANT, make_namespace
from tests.integration.test_worker import (
    BATCH,
    RECORDS,
    corpus,
    owner_rows,
    wait_for,
    worker_env,
    worker_process,
)

CLS = "all-minilm-l6-v2-int8-cls"

pytestmark = pytest.mark.timeout(300)  # two worker processes; the waits below are bounded


async def test_a_worker_killed_mid_switch_is_replaced_and_the_switch_completes_once(
    clean_db: PgCluster, tmp_path: Path
) -> None:
    ns = await make_namespace(clean_db)
    log = tmp_path / "workers.log"
    env = worker_env(clean_db, tmp_path / "data")
    embedders = EmbedderRegistry.local(LocalEmbedder())
    async with Database(clean_db.app, max_size=2) as db:
        report = await Ingestor(db, embedders).ingest(
            ns, parse("kb://corpus/records.jsonl", corpus())
        )
        assert report.added == report.chunks_written == RECORDS
        queue = IngestQueue(create_queue(clean_db.app), max_attempts=5, retry_wait_s=0)
        job = await request_switch(queue, db, ns, CLS, embedders)

        async def current() -> IngestJob:
            found = await get_job(db, TENANT, job.id)
            assert found is not None
            return found

        async def mid_switch() -> bool:
            j = await current()
            return j.status == "running" and j.documents_done >= 2 * BATCH

        async def finished() -> bool:
            return (await current()).finished

        with worker_process(env, log) as first:
            await wait_for(mid_switch, 90, "the first worker made no progress", log)
            first.send_signal(signal.SIGKILL)
            assert first.wait(timeout=30) == -signal.SIGKILL
        killed = await current()
        assert (killed.status, killed.phase) == ("running", "embedding")
        assert killed.documents_done < RECORDS, "the switch finished before the kill"
        state = await namespace_state(db, TENANT, KB)
        assert state is not None
        assert (state.active_model, state.switching_to) == (ns.embedding_model, CLS)

        with worker_process(env, log) as second:
            await wait_for(finished, 120, "the switch did not finish after the restart", log)
            second.send_signal(signal.SIGTERM)
            assert second.wait(timeout=60) == 0, "the second worker did not stop cleanly"
        done = await current()
        state = await namespace_state(db, TENANT, KB)
        async with db.tenant(TENANT) as s:
            chunks = await s.fetch_all(
                "SELECT embedding_model, count(*) AS n, "
                "count(DISTINCT (document_id, ordinal)) AS distinct_n FROM chunks GROUP BY 1"
            )
        async with db.control() as s:
            pin = (await get_namespace(s, TENANT, KB)).embedding_model

    assert done.status == "succeeded", done.errors
    assert (done.attempts, done.phase) == (2, "done")
    # progress commits with each batch's chunks: exact across the kill
    assert (done.documents_total, done.documents_done, done.chunks_written) == (
        RECORDS,
        RECORDS,
        RECORDS,
    )
    assert chunks == [{"embedding_model": CLS, "n": RECORDS, "distinct_n": RECORDS}]
    assert state is not None
    assert (state.active_model, state.switching_to, state.switch_job_id) == (CLS, None, None)
    assert pin == CLS
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
