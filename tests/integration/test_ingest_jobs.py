"""Background ingestion jobs on the real queue (procrastinate on the session's Postgres),
run by an in-process worker with the real embedding model."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import psycopg
import pytest
from pypdf import PdfWriter

from ragplane.config import KnowledgeSettings, WorkerSettings
from ragplane.control.namespaces import NamespaceConfig, upsert_namespace
from ragplane.data import Database
from ragplane.knowledge.jobrunner import IngestRunner
from ragplane.knowledge.jobs import IngestJob, Upload, get_job
from ragplane.knowledge.search import Retriever
from ragplane.platform import Platform
from tests.conftest import PgCluster, make_settings

TENANT = "tnt_alpha"
KB = "handbook"

REFUND = b"# Refund policy\n\nCustomers in the European Union may cancel within 14 days.\n"
SHIPPING = b"# Shipping\n\nWe ship from Rotterdam; express delivery costs 12 euros.\n"


async def make_namespace(pg: PgCluster, tenant: str = TENANT, name: str = KB) -> NamespaceConfig:
    async with Database(pg.owner, max_size=1, name="owner") as owner, owner.control() as s:
        return await upsert_namespace(s, tenant, name, embedding_model="all-minilm-l6-v2")


@pytest.fixture
async def platform(clean_db: PgCluster, tmp_path: Path) -> AsyncIterator[Platform]:
    settings = make_settings(
        clean_db,
        tmp_path,
        knowledge=KnowledgeSettings(max_upload_bytes=4096),
        worker=WorkerSettings(poll_s=0.2, batch_documents=8),
    )
    p = Platform(settings)
    await p.start()
    try:
        yield p
    finally:
        await p.stop()


@pytest.fixture
async def ns(clean_db: PgCluster) -> NamespaceConfig:
    return await make_namespace(clean_db)


async def enqueue(platform: Platform, config: NamespaceConfig, *uploads: Upload) -> IngestJob:
    assert platform.ingest_queue is not None
    assert platform.db is not None
    return await platform.ingest_queue.enqueue(
        platform.db,
        config,
        list(uploads),
        max_upload_bytes=platform.settings.knowledge.max_upload_bytes,
    )


async def drain(platform: Platform) -> None:
    """Run the worker until the queue has no job left (bounded)."""
    with anyio.fail_after(60):
        await platform.run_worker(install_signal_handlers=False, wait=False)


async def job_of(platform: Platform, job: IngestJob, tenant: str = TENANT) -> IngestJob:
    assert platform.db is not None
    found = await get_job(platform.db, tenant, job.id)
    assert found is not None, f"job {job.id} not found for {tenant}"
    return found


async def tenant_rows(db: Database, query: Any, tenant: str = TENANT) -> list[dict[str, Any]]:
    async with db.tenant(tenant) as s:
        return [dict(r) for r in await s.fetch_all(query)]


def queue_rows(pg: PgCluster, query: str, params: tuple[object, ...] = ()) -> list[Any]:
    with psycopg.connect(pg.owner, autocommit=True) as conn:
        return conn.execute(query, params).fetchall()


def blank_pdf() -> bytes:
    writer = PdfWriter()
    writer.add_blank_page(612, 792)
    buffer = io.BytesIO()
    writer.write(buffer)
    return buffer.getvalue()


async def test_enqueued_documents_are_ingested_by_the_worker_and_searchable(
    platform: Platform, ns: NamespaceConfig, clean_db: PgCluster
) -> None:
    job = await enqueue(
        platform,
        ns,
        Upload("kb://docs/refund.md", REFUND),
        Upload("kb://docs/shipping.md", SHIPPING),
    )
    assert (job.status, job.documents_total, job.attempts) == ("queued", 2, 0)
    assert job.procrastinate_job_id is not None
    args = queue_rows(
        clean_db,
        "SELECT args, status::text FROM procrastinate.procrastinate_jobs WHERE id = %s",
        (job.procrastinate_job_id,),
    )
    # the queue carries ids only, never content
    assert args == [({"tenant_id": TENANT, "job_id": job.id}, "todo")]

    await drain(platform)

    done = await job_of(platform, job)
    assert done.status == "succeeded", done.errors
    assert (done.documents_total, done.documents_done, done.errors) == (2, 2, ())
    assert done.chunks_written >= 2
    assert done.tokens_embedded > 0
    assert done.attempts == 1
    assert done.started_at is not None
    assert done.finished_at is not None
    assert platform.db is not None
    assert await tenant_rows(platform.db, "SELECT id FROM ingest_uploads") == []
    assert platform.embedder is not None
    result = await Retriever(platform.db, platform.embedder).search(ns, "EU cancellation refund")
    assert result.chunks[0].source_uri == "kb://docs/refund.md"
    status = queue_rows(
        clean_db,
        "SELECT status::text FROM procrastinate.procrastinate_jobs WHERE id = %s",
        (job.procrastinate_job_id,),
    )
    assert status == [("succeeded",)]


async def test_enqueue_is_one_transaction(
    platform: Platform, ns: NamespaceConfig, clean_db: PgCluster
) -> None:
    """An upload Postgres cannot store (a NUL in its source URI) fails the enqueue after
    the job row was written: nothing of it remains, and nothing was queued."""
    with pytest.raises(psycopg.DataError):
        await enqueue(
            platform, ns, Upload("kb://docs/good.md", REFUND), Upload("kb://docs/bad\x00.md", b"x")
        )
    assert platform.db is not None
    assert await tenant_rows(platform.db, "SELECT id FROM ingest_jobs") == []
    assert await tenant_rows(platform.db, "SELECT id FROM ingest_uploads") == []
    assert queue_rows(clean_db, "SELECT id FROM procrastinate.procrastinate_jobs") == []


async def test_bad_documents_are_errors_of_the_job_and_the_good_ones_are_ingested(
    platform: Platform, ns: NamespaceConfig
) -> None:
    job = await enqueue(
        platform,
        ns,
        Upload("kb://docs/refund.md", REFUND),
        Upload("kb://docs/photo.png", b"\x89PNG\r\n\x1a\n"),
        Upload("kb://docs/empty.txt", b" \n\t\n"),
        Upload("kb://docs/latin1.txt", "café crème".encode("latin-1")),
        Upload("kb://docs/huge.txt", b"a" * 5000),  # over max_upload_bytes (4096)
        Upload("kb://docs/scan.pdf", blank_pdf()),
        Upload("kb://docs/records.jsonl", b'{"_id": "a", "text": "Alpha record."}\n{"_id": "b"}\n'),
    )
    await drain(platform)
    done = await job_of(platform, job)
    assert done.status == "partial"
    assert {(e.source_uri, e.code) for e in done.errors} == {
        ("kb://docs/photo.png", "unsupported_type"),
        ("kb://docs/empty.txt", "empty_document"),
        ("kb://docs/latin1.txt", "invalid_utf8"),
        ("kb://docs/huge.txt", "too_large"),
        ("kb://docs/scan.pdf", "no_text_layer"),
        ("kb://docs/records.jsonl", "invalid_record"),
    }
    assert all(e.message for e in done.errors)
    # refund.md and records.jsonl#a were ingested; 6 documents failed
    assert (done.documents_total, done.documents_done) == (8, 8)
    assert platform.db is not None
    uris = await tenant_rows(platform.db, "SELECT source_uri FROM documents ORDER BY 1")
    assert [r["source_uri"] for r in uris] == ["kb://docs/records.jsonl#a", "kb://docs/refund.md"]
    # the refused upload's bytes were never stored
    assert await tenant_rows(platform.db, "SELECT id FROM ingest_uploads") == []


async def test_a_job_where_every_document_fails_has_failed(
    platform: Platform, ns: NamespaceConfig
) -> None:
    job = await enqueue(platform, ns, Upload("kb://docs/empty.md", b""))
    await drain(platform)
    done = await job_of(platform, job)
    assert done.status == "failed"
    assert [(e.source_uri, e.code) for e in done.errors] == [
        ("kb://docs/empty.md", "empty_document")
    ]


async def test_job_status_is_visible_only_to_its_tenant(
    platform: Platform, ns: NamespaceConfig, clean_db: PgCluster
) -> None:
    beta = await make_namespace(clean_db, "tnt_beta", KB)
    mine = await enqueue(platform, ns, Upload("kb://docs/refund.md", REFUND))
    theirs = await enqueue(platform, beta, Upload("kb://docs/shipping.md", SHIPPING))
    await drain(platform)
    assert platform.db is not None
    assert await get_job(platform.db, "tnt_beta", mine.id) is None
    assert await get_job(platform.db, TENANT, theirs.id) is None
    assert await get_job(platform.db, TENANT, "not-a-uuid") is None
    assert (await job_of(platform, theirs, "tnt_beta")).status == "succeeded"
    docs = await tenant_rows(platform.db, "SELECT source_uri FROM documents", "tnt_beta")
    assert docs == [{"source_uri": "kb://docs/shipping.md"}]


async def test_a_rerun_of_a_finished_job_changes_nothing(
    platform: Platform, ns: NamespaceConfig
) -> None:
    job = await enqueue(platform, ns, Upload("kb://docs/refund.md", REFUND))
    await drain(platform)
    before = await job_of(platform, job)
    assert platform.db is not None
    assert platform.ingestor is not None
    runner = IngestRunner(platform.db, platform.ingestor, max_upload_bytes=4096, max_attempts=3)
    assert await runner.run(TENANT, job.id) is None
    assert await job_of(platform, job) == before


async def test_a_job_that_keeps_crashing_its_worker_fails_after_max_attempts(
    platform: Platform, ns: NamespaceConfig
) -> None:
    job = await enqueue(platform, ns, Upload("kb://docs/refund.md", REFUND))
    assert platform.db is not None
    assert platform.ingestor is not None
    async with platform.db.tenant(TENANT) as s:  # three runs started and never finished
        await s.execute("UPDATE ingest_jobs SET attempts = 3, status = 'running'")
    runner = IngestRunner(platform.db, platform.ingestor, max_upload_bytes=4096, max_attempts=3)
    assert await runner.run(TENANT, job.id) == "failed"
    done = await job_of(platform, job)
    assert done.status == "failed"
    assert [e.code for e in done.errors] == ["gave_up"]
    assert await tenant_rows(platform.db, "SELECT id FROM ingest_uploads") == []
    assert await tenant_rows(platform.db, "SELECT id FROM documents") == []


async def test_a_job_for_a_namespace_pinned_to_another_model_fails_with_the_reason(
    platform: Platform, clean_db: PgCluster
) -> None:
    async with Database(clean_db.owner, max_size=1, name="owner") as owner, owner.control() as s:
        other = await upsert_namespace(s, TENANT, "legacy", embedding_model="text-embedding-3")
    job = await enqueue(platform, other, Upload("kb://docs/refund.md", REFUND))
    await drain(platform)
    done = await job_of(platform, job)
    assert done.status == "failed"
    assert [e.code for e in done.errors] == ["model_mismatch"]
    assert "text-embedding-3" in done.errors[0].message
