"""Running one ingest job on a worker: claim, parse, ingest, finish.

1. **Claim**: ``attempts += 1`` and status ``running``, unless the job already has a
   final status (then there is nothing to do: a rerun after the job was finished).
   A job started more than ``max_attempts`` times (a worker that keeps dying on it)
   fails instead.
2. **Parse** every upload (in a thread; ``parse_many`` never raises): documents, and
   one error per document that could not be parsed. Refused uploads (too large at
   upload time) become ``too_large`` errors.
3. **Ingest** through :class:`~ragplane.knowledge.ingest.Ingestor`; each committed
   batch updates the job's progress.
4. **Finish**: the final status, counts and errors, and the deletion of the uploads,
   in one unit of work. ``succeeded`` without errors, ``partial`` when some documents
   failed, ``failed`` when none was ingested.

Every write after the claim is conditional on ``attempts`` still being this run's
number: a run that was superseded (its worker was taken for dead and the job retried)
stops writing and leaves the job to its successor.

Counts across runs: ``chunks_written`` and ``tokens_embedded`` add up every run's work
(a killed run's last batch, committed but not yet recorded, is not counted);
``documents_done`` and ``errors`` describe the last run, which saw every document.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import anyio.to_thread

from ragplane.control.namespaces import NamespaceNotFound, get_namespace
from ragplane.data import Database
from ragplane.errors import ModelMismatch
from ragplane.knowledge.ingest import DocumentError, Ingestor, IngestProgress, IngestReport
from ragplane.knowledge.jobs import errors_json
from ragplane.knowledge.models import ModelSwitched
from ragplane.knowledge.parsers import parse_many
from ragplane.knowledge.types import ParsedDocument
from ragplane.observe.logging import get_logger

__all__ = ["IngestRunner", "final_status"]

log = get_logger("ragplane.knowledge.jobrunner")


def final_status(documents_ok: int, errors: int) -> str:
    if not errors:
        return "succeeded"
    return "partial" if documents_ok else "failed"


@dataclass(frozen=True)
class _Claim:
    job_id: uuid.UUID
    attempt: int
    namespace: str
    base_chunks: int
    base_tokens: int


class _Superseded(Exception):
    """A newer run of the job owns it now."""


class _Progress:
    """Writes the latest progress of a run to its job row, one write at a time.

    ``update`` is the Ingestor's (synchronous) ``on_progress`` callback; the writes run
    in a task beside the ingestion. A failed write is logged and skipped: progress is
    informational, the final status is written separately.
    """

    def __init__(self, db: Database, tenant_id: str, claim: _Claim, total: int) -> None:
        self._db = db
        self._tenant = tenant_id
        self._claim = claim
        self._total = total
        self._latest: IngestProgress | None = None
        self._changed = asyncio.Event()
        self._closed = False
        self.superseded = False
        self._task = asyncio.create_task(self._run(), name=f"ingest progress {claim.job_id}")

    def update(self, progress: IngestProgress) -> None:
        self._latest = progress
        self._changed.set()

    async def close(self) -> None:
        self._closed = True
        self._changed.set()
        await self._task

    async def _run(self) -> None:
        while True:
            await self._changed.wait()
            self._changed.clear()
            if self._closed or self._latest is None:
                return
            p, c = self._latest, self._claim
            try:
                async with self._db.tenant(self._tenant) as s:
                    n = await s.execute(
                        "UPDATE ingest_jobs SET documents_done = %s, chunks_written = %s, "
                        "tokens_embedded = %s WHERE id = %s AND attempts = %s "
                        "AND status = 'running'",
                        (
                            min(self._total, p.documents_done),
                            c.base_chunks + p.chunks_written,
                            c.base_tokens + p.tokens_embedded,
                            c.job_id,
                            c.attempt,
                        ),
                    )
            except Exception as exc:  # noqa: BLE001 -- progress is best effort
                log.warning("ingest_progress_not_written", job_id=str(c.job_id), error=str(exc))
                continue
            if n == 0:
                self.superseded = True
                return


class IngestRunner:
    """Runs ingest jobs for a worker; held in the worker's ``additional_context``."""

    def __init__(
        self, db: Database, ingestor: Ingestor, *, max_upload_bytes: int, max_attempts: int
    ) -> None:
        self._db = db
        self._ingestor = ingestor
        self._max_bytes = max_upload_bytes
        self._max_attempts = max_attempts

    async def run(self, tenant_id: str, job_id: str) -> str | None:
        """Run the job; its final status, or None when there was nothing to do (already
        finished, unknown, or superseded by a newer run)."""
        claim = await self._claim(tenant_id, job_id)
        if claim is None:
            log.info("ingest_job_skipped", job_id=job_id, reason="finished or unknown")
            return None
        bound = log.bind(job_id=job_id, attempt=claim.attempt, namespace=claim.namespace)
        if claim.attempt > self._max_attempts:
            error = DocumentError(
                "",
                "gave_up",
                f"the job was started {claim.attempt - 1} times without finishing "
                "(did its worker keep crashing?)",
            )
            return await self._finish_failed(tenant_id, claim, error)
        try:
            async with self._db.control() as s:
                config = await get_namespace(s, tenant_id, claim.namespace)
        except NamespaceNotFound as exc:
            return await self._finish_failed(
                tenant_id, claim, DocumentError("", "namespace_not_found", str(exc))
            )
        documents, errors = await self._parse(tenant_id, claim)
        total = len(documents) + len(errors)
        if not await self._start(tenant_id, claim, total, errors):
            bound.info("ingest_job_superseded")
            return None
        bound.info("ingest_job_started", documents=total, parse_errors=len(errors))
        progress = _Progress(self._db, tenant_id, claim, total)
        try:
            report = await self._ingestor.ingest(
                config, documents, errors=errors, on_progress=progress.update
            )
        except ModelSwitched:
            # the namespace was switched to another model mid-job: batches committed so far
            # were part of the switch's swap; the retry embeds the rest with the new model
            bound.info("ingest_job_model_switched")
            raise
        except ModelMismatch as exc:
            return await self._finish_failed(
                tenant_id, claim, DocumentError("", "model_mismatch", str(exc))
            )
        finally:
            await progress.close()
        try:
            status = await self._finish(tenant_id, claim, total, report)
        except _Superseded:
            bound.info("ingest_job_superseded")
            return None
        bound.info(
            "ingest_job_finished",
            status=status,
            documents=report.documents,
            errors=len(report.errors),
            chunks=report.chunks_written,
            tokens=report.tokens_embedded,
            elapsed_s=round(report.elapsed_s, 3),
        )
        return status

    async def fail(self, tenant_id: str, job_id: str, exc: BaseException) -> None:
        """Record an unexpected failure that will not be retried (best effort)."""
        key = uuid.UUID(job_id)
        message = f"{type(exc).__name__}: {exc}"
        log.error("ingest_job_failed", job_id=job_id, error=message)
        try:
            async with self._db.tenant(tenant_id) as s:
                if await s.execute(
                    "UPDATE ingest_jobs SET status = 'failed', finished_at = now(), "
                    "errors = errors || %s::jsonb WHERE id = %s AND status IN ('queued', "
                    "'running')",
                    (errors_json([DocumentError("", "internal_error", message)]), key),
                ):
                    await s.execute("DELETE FROM ingest_uploads WHERE job_id = %s", (key,))
        except Exception as write_exc:  # noqa: BLE001 -- the original error is what matters
            log.error(  # noqa: TRY400
                "ingest_job_failure_not_recorded", job_id=job_id, error=str(write_exc)
            )

    # -- steps ---------------------------------------------------------------------------

    async def _claim(self, tenant_id: str, job_id: str) -> _Claim | None:
        key = uuid.UUID(job_id)
        async with self._db.tenant(tenant_id) as s:
            row = await s.fetch_one(
                "UPDATE ingest_jobs SET status = 'running', attempts = attempts + 1, "
                "started_at = coalesce(started_at, now()) "
                "WHERE id = %s AND status IN ('queued', 'running') "
                "RETURNING attempts, namespace, chunks_written, tokens_embedded",
                (key,),
            )
        if row is None:
            return None
        return _Claim(
            key, row["attempts"], row["namespace"], row["chunks_written"], row["tokens_embedded"]
        )

    async def _parse(
        self, tenant_id: str, claim: _Claim
    ) -> tuple[list[ParsedDocument], list[DocumentError]]:
        async with self._db.tenant(tenant_id) as s:
            uploads = await s.fetch_all(
                "SELECT source_uri, media_type, data, error_code, error_message "
                "FROM ingest_uploads WHERE job_id = %s ORDER BY ordinal",
                (claim.job_id,),
            )
        documents: dict[str, ParsedDocument] = {}  # a repeated source_uri: the last one wins
        errors: list[DocumentError] = []
        for u in uploads:
            if u["data"] is None:
                errors.append(DocumentError(u["source_uri"], u["error_code"], u["error_message"]))
                continue
            result = await anyio.to_thread.run_sync(
                _parse_upload, u["source_uri"], bytes(u["data"]), u["media_type"], self._max_bytes
            )
            for doc in result[0]:
                documents.pop(doc.source_uri, None)
                documents[doc.source_uri] = doc
            errors.extend(result[1])
        return list(documents.values()), errors

    async def _start(
        self, tenant_id: str, claim: _Claim, total: int, errors: Sequence[DocumentError]
    ) -> bool:
        async with self._db.tenant(tenant_id) as s:
            n = await s.execute(
                "UPDATE ingest_jobs SET documents_total = %s, documents_done = 0, "
                "errors = %s::jsonb WHERE id = %s AND attempts = %s AND status = 'running'",
                (total, errors_json(errors), claim.job_id, claim.attempt),
            )
        return n == 1

    async def _finish(self, tenant_id: str, claim: _Claim, total: int, report: IngestReport) -> str:
        status = final_status(report.documents, len(report.errors))
        async with self._db.tenant(tenant_id) as s:
            n = await s.execute(
                "UPDATE ingest_jobs SET status = %s, finished_at = now(), documents_total = %s, "
                "documents_done = %s, chunks_written = %s, tokens_embedded = %s, "
                "errors = %s::jsonb WHERE id = %s AND attempts = %s AND status = 'running'",
                (
                    status,
                    total,
                    report.documents + len(report.errors),
                    claim.base_chunks + report.chunks_written,
                    claim.base_tokens + report.tokens_embedded,
                    errors_json(report.errors),
                    claim.job_id,
                    claim.attempt,
                ),
            )
            if n == 0:
                raise _Superseded
            await s.execute("DELETE FROM ingest_uploads WHERE job_id = %s", (claim.job_id,))
        return status

    async def _finish_failed(self, tenant_id: str, claim: _Claim, error: DocumentError) -> str:
        async with self._db.tenant(tenant_id) as s:
            n = await s.execute(
                "UPDATE ingest_jobs SET status = 'failed', finished_at = now(), "
                "errors = errors || %s::jsonb WHERE id = %s AND attempts = %s "
                "AND status = 'running'",
                (errors_json([error]), claim.job_id, claim.attempt),
            )
            if n:
                await s.execute("DELETE FROM ingest_uploads WHERE job_id = %s", (claim.job_id,))
        log.warning(
            "ingest_job_failed", job_id=str(claim.job_id), code=error.code, error=error.message
        )
        return "failed"


def _parse_upload(
    source_uri: str, data: bytes, media_type: str, max_bytes: int
) -> tuple[tuple[ParsedDocument, ...], list[DocumentError]]:
    result = parse_many(source_uri, data, media_type=media_type or None, max_bytes=max_bytes)
    errors = [DocumentError(e.source_uri or source_uri, e.code, e.message) for e in result.errors]
    return result.documents, errors
