"""Background ingestion jobs: uploads in, a durable job out, progress on a row.

A job is two tenant tables and one queue entry (migration 0004):

* ``ingest_jobs`` -- status (queued → running → succeeded | partial | failed), the
  document and chunk counts, per-document errors ``[{source_uri, code, message}]``;
* ``ingest_uploads`` -- the submitted files, kept until the job finishes so that a
  rerun has them;
* a procrastinate job (``ragplane.data.queue``) whose arguments are only the tenant id
  and the job id.

:meth:`IngestQueue.enqueue` writes all three in one tenant unit of work: procrastinate
defers the job on that unit of work's own connection, so the upload is either stored
and queued, or (on any error) neither. A worker runs the job with
:class:`~ragplane.knowledge.jobrunner.IngestRunner`; a file over the size limit is kept
as a refusal (no data) and becomes that document's ``too_large`` error.

A job of kind ``switch_model`` (an embedding-model switch, ``ragplane.knowledge.switch``)
is an ``ingest_jobs`` row too, so its status and progress read the same way (``GET
/v1/jobs/{id}``); it runs as its own task (``ragplane.switch_model``) with its own
lock, so ingest jobs of the namespace keep running while it does.

Rerun safety: every run claims the job by incrementing ``attempts`` and writes progress
and the final status only while ``attempts`` still holds its number, so a run that a
retry superseded changes nothing; ingestion itself is idempotent (unchanged documents
write and embed nothing), so a rerun after a crash creates no duplicates.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, cast

import procrastinate
from procrastinate import exceptions as pexc
from procrastinate.jobs import Job

from ragplane.control.namespaces import NamespaceConfig
from ragplane.data import Database, TenantSession
from ragplane.data.queue import ENQUEUE_SETTINGS
from ragplane.errors import DatabaseUnavailable, EmbeddingError
from ragplane.knowledge.ingest import DocumentError
from ragplane.knowledge.models import ModelSwitched
from ragplane.observe.logging import get_logger

__all__ = [
    "FINAL_STATUSES",
    "INGEST_QUEUE",
    "INGEST_TASK",
    "RUNNER_KEY",
    "SWITCHER_KEY",
    "SWITCH_TASK",
    "TRANSIENT",
    "IngestJob",
    "IngestQueue",
    "JobKind",
    "JobStatus",
    "Upload",
    "errors_json",
    "get_job",
]

log = get_logger("ragplane.knowledge.jobs")

JobStatus = Literal["queued", "running", "succeeded", "failed", "partial"]
FINAL_STATUSES: frozenset[str] = frozenset({"succeeded", "failed", "partial"})
INGEST_TASK = "ragplane.ingest"
INGEST_QUEUE = "ingest"
RUNNER_KEY = "ragplane.ingest_runner"
"""Key of the :class:`IngestRunner` in the worker's ``additional_context``."""
SWITCH_TASK = "ragplane.switch_model"
SWITCHER_KEY = "ragplane.model_switcher"
"""Key of the :class:`~ragplane.knowledge.switch.ModelSwitcher` in ``additional_context``."""
JobKind = Literal["ingest", "switch_model"]

# Errors worth another run of the whole job; anything else fails it at once. A namespace
# switched to another model mid-job: the rerun embeds with the new model.
TRANSIENT: tuple[type[BaseException], ...] = (DatabaseUnavailable, EmbeddingError, ModelSwitched)


@dataclass(frozen=True)
class Upload:
    """One submitted file. ``media_type`` empty: the extension of ``source_uri`` decides."""

    source_uri: str
    data: bytes
    media_type: str = ""


@dataclass(frozen=True)
class IngestJob:
    id: str
    tenant_id: str
    namespace: str
    status: JobStatus
    documents_total: int
    documents_done: int
    chunks_written: int
    tokens_embedded: int
    errors: tuple[DocumentError, ...]
    attempts: int
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    procrastinate_job_id: int | None
    kind: JobKind = "ingest"
    source_model: str | None = None  # a switch: from this model
    target_model: str | None = None  # a switch: to this model
    phase: str | None = None  # a switch: embedding, catching_up, swapping, cleanup, done

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> IngestJob:
        return cls(
            id=str(row["id"]),
            tenant_id=row["tenant_id"],
            namespace=row["namespace"],
            status=row["status"],
            documents_total=row["documents_total"],
            documents_done=row["documents_done"],
            chunks_written=row["chunks_written"],
            tokens_embedded=row["tokens_embedded"],
            errors=tuple(DocumentError(**e) for e in row["errors"]),
            attempts=row["attempts"],
            created_at=row["created_at"],
            started_at=row["started_at"],
            finished_at=row["finished_at"],
            procrastinate_job_id=row["procrastinate_job_id"],
            kind=row.get("kind", "ingest"),
            source_model=row.get("source_model"),
            target_model=row.get("target_model"),
            phase=row.get("phase"),
        )

    @property
    def finished(self) -> bool:
        return self.status in FINAL_STATUSES


def errors_json(errors: Sequence[DocumentError]) -> str:
    return json.dumps(
        [{"source_uri": e.source_uri, "code": e.code, "message": e.message} for e in errors]
    )


def _job_uuid(job_id: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(job_id)
    except (ValueError, TypeError):
        return None


async def get_job(db: Database, tenant_id: str, job_id: str) -> IngestJob | None:
    """The tenant's job, or None (also for a malformed id or another tenant's job)."""
    key = _job_uuid(job_id)
    if key is None:
        return None
    async with db.tenant(tenant_id) as s:
        row = await s.fetch_one("SELECT * FROM ingest_jobs WHERE id = %s", (key,))
    return IngestJob.from_row(row) if row is not None else None


class _RetryPolicy(procrastinate.BaseRetryStrategy):
    """Retry a job that failed transiently, or that a worker shutdown interrupted.

    ``max_attempts`` counts runs (procrastinate's ``job.attempts`` counts the earlier
    ones); the wait doubles from ``wait_s``, capped at five minutes.
    """

    def __init__(self, max_attempts: int, wait_s: int) -> None:
        self.max_attempts = max_attempts
        self.wait_s = wait_s

    def get_retry_decision(
        self, *, exception: BaseException, job: Job
    ) -> procrastinate.RetryDecision | None:
        if job.attempts + 1 >= self.max_attempts:
            return None
        if isinstance(exception, asyncio.CancelledError | pexc.JobAborted):
            # the worker only gets here for an abort on shutdown: run it again at once
            return procrastinate.RetryDecision(retry_in={"seconds": 0})
        if isinstance(exception, TRANSIENT):
            wait = min(300, self.wait_s * 2**job.attempts)
            return procrastinate.RetryDecision(retry_in={"seconds": wait})
        return None


class IngestQueue:
    """The ingest task registered on one procrastinate app, and the enqueue side."""

    def __init__(self, app: procrastinate.App, *, max_attempts: int, retry_wait_s: int) -> None:
        self.app = app
        self.retry = _RetryPolicy(max_attempts, retry_wait_s)
        self._task = app.task(
            name=INGEST_TASK, queue=INGEST_QUEUE, pass_context=True, retry=self.retry
        )(_run_ingest_job)
        self.switch_task = app.task(
            name=SWITCH_TASK, queue=INGEST_QUEUE, pass_context=True, retry=self.retry
        )(_run_switch_job)

    async def enqueue(
        self,
        db: Database,
        config: NamespaceConfig,
        uploads: Sequence[Upload],
        *,
        max_upload_bytes: int,
    ) -> IngestJob:
        """Store the job, its uploads and its queue entry in one transaction.

        A file larger than ``max_upload_bytes`` is stored without its data, as a refusal
        that becomes its document's ``too_large`` error when the job runs.
        """
        async with db.tenant(config.tenant_id, settings=ENQUEUE_SETTINGS) as s:
            row = await s.fetch_one(
                "INSERT INTO ingest_jobs (tenant_id, namespace, documents_total) "
                "VALUES (%s, %s, %s) RETURNING id",
                (config.tenant_id, config.name, len(uploads)),
            )
            assert row is not None
            job_id = row["id"]
            await _store_uploads(s, job_id, uploads, max_upload_bytes)
            job = await self.defer_tracked(s, "ingest", config, job_id)
        log.info(
            "ingest_job_queued",
            job_id=job.id,
            namespace=config.name,
            uploads=len(uploads),
            queue_job_id=job.procrastinate_job_id,
        )
        return job

    async def defer_tracked(
        self, s: TenantSession, kind: JobKind, config: NamespaceConfig, job_id: uuid.UUID
    ) -> IngestJob:
        """Queue job ``job_id``'s task in ``s``'s transaction and record the queue's id on it.

        Jobs of one kind run one at a time per namespace (the queueing lock): ingest jobs
        would contend on the BM25 statistics rows (and could deadlock); two switches of
        one namespace must not overlap. Ingest jobs and a switch have separate locks.
        """
        task, name = (
            (self._task, INGEST_TASK) if kind == "ingest" else (self.switch_task, SWITCH_TASK)
        )
        queued = await task.configure(
            connection=s.connection, lock=f"{name}:{config.tenant_id}:{config.name}"
        ).defer_async(tenant_id=config.tenant_id, job_id=str(job_id))
        row = await s.fetch_one(
            "UPDATE ingest_jobs SET procrastinate_job_id = %s WHERE id = %s RETURNING *",
            (queued, job_id),
        )
        assert row is not None
        return IngestJob.from_row(row)


async def _store_uploads(
    s: TenantSession, job_id: uuid.UUID, uploads: Sequence[Upload], max_bytes: int
) -> None:
    rows: list[tuple[object, ...]] = []
    for n, u in enumerate(uploads):
        size = len(u.data)
        if size > max_bytes:
            refusal = ("too_large", f"{size} bytes exceeds the limit of {max_bytes} bytes")
            rows.append((s.tenant_id, job_id, n, u.source_uri, u.media_type, size, None, *refusal))
        else:
            rows.append(
                (s.tenant_id, job_id, n, u.source_uri, u.media_type, size, u.data, None, None)
            )
    async with s.connection.cursor() as cur:
        await cur.executemany(
            "INSERT INTO ingest_uploads (tenant_id, job_id, ordinal, source_uri, media_type, "
            "size, data, error_code, error_message) VALUES (%s, %s, %s, %s, %s, %s, %b, %s, %s)",
            rows,
        )


async def _run_switch_job(
    context: procrastinate.JobContext, *, tenant_id: str, job_id: str
) -> None:
    """The procrastinate task: run one embedding-model switch (see ``switchrunner``)."""
    from ragplane.knowledge.switchrunner import ModelSwitcher

    switcher = cast(ModelSwitcher, context.additional_context[SWITCHER_KEY])
    try:
        await switcher.run(tenant_id, job_id)
    except (Exception, asyncio.CancelledError) as exc:
        policy = cast(_RetryPolicy, context.app.tasks[SWITCH_TASK].retry_strategy)
        if policy.get_retry_decision(exception=exc, job=context.job) is None:
            await switcher.fail(tenant_id, job_id, exc)
        raise


async def _run_ingest_job(
    context: procrastinate.JobContext, *, tenant_id: str, job_id: str
) -> None:
    """The procrastinate task: run one ingest job (see ``jobrunner``)."""
    from ragplane.knowledge.jobrunner import IngestRunner

    runner = cast(IngestRunner, context.additional_context[RUNNER_KEY])
    try:
        await runner.run(tenant_id, job_id)
    except (Exception, asyncio.CancelledError) as exc:
        # the last run of the job (no retry follows): its row must not stay "running".
        # A cancelled task may still await once it has caught the cancellation.
        policy = cast(_RetryPolicy, context.app.tasks[INGEST_TASK].retry_strategy)
        if policy.get_retry_decision(exception=exc, job=context.job) is None:
            await runner.fail(tenant_id, job_id, exc)
        raise
