"""Running an embedding-model switch on a worker (the phases: ``ragplane.knowledge.switch``).

Crash safety: the job claims its row like an ingest job (``attempts += 1``, a fencing
token) and every write checks, in its own transaction, that the run still owns the job
and that the namespace is still switching with this job. Each batch's chunks and the
job's progress commit together, so ``documents_done`` is exact across runs, and a rerun
(a worker killed with SIGKILL, then the stalled-job check) starts from the documents
that have no target chunks yet: nothing is embedded or written twice, and the unique
key (document, model, ordinal) would refuse it anyway. A rerun after the swap goes
straight to the cleanup.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import anyio.to_thread

from ragplane.data import Database, TenantSession
from ragplane.errors import EmbeddingError, KnowledgeError
from ragplane.knowledge.ingest import (
    DEFAULT_BATCH_DOCUMENTS,
    DocumentError,
    embedding_input,
    model_tokens,
)
from ragplane.knowledge.jobs import errors_json
from ragplane.knowledge.models import EmbedderRegistry
from ragplane.knowledge.types import Embedder
from ragplane.observe.logging import get_logger

__all__ = ["ModelSwitcher", "SwitchProgress"]

log = get_logger("ragplane.knowledge.switchrunner")

# documents with chunks of the source model and none of the target model
_PENDING = """
SELECT c.id, c.document_id, c.text, c.heading_path, d.title
FROM documents d
JOIN chunks c ON c.tenant_id = d.tenant_id AND c.document_id = d.id
WHERE d.id IN (
    SELECT d2.id FROM documents d2
    WHERE d2.namespace = %(ns)s AND d2.id > %(after)s
      AND EXISTS (SELECT 1 FROM chunks s WHERE s.document_id = d2.id
                  AND s.embedding_model = %(source)s)
      AND NOT EXISTS (SELECT 1 FROM chunks t WHERE t.document_id = d2.id
                      AND t.embedding_model = %(target)s)
    ORDER BY d2.id LIMIT %(limit)s
) AND c.embedding_model = %(source)s
ORDER BY d.id, c.ordinal
"""

# the target model's copy of each chunk, unless its document has target chunks already
_INSERT = """
INSERT INTO chunks (tenant_id, document_id, namespace, embedding_model, ordinal, text,
                    heading_path, char_start, char_end, token_count, embedding, tsv,
                    tsv_length, metadata)
SELECT c.tenant_id, c.document_id, c.namespace, %(target)s, c.ordinal, c.text,
       c.heading_path, c.char_start, c.char_end, u.tc, u.emb, c.tsv, c.tsv_length, c.metadata
FROM unnest(%(ids)s::uuid[], %(tc)s::int[], %(emb)s::vector[]) AS u(id, tc, emb)
JOIN chunks c ON c.id = u.id
WHERE NOT EXISTS (SELECT 1 FROM chunks t WHERE t.document_id = c.document_id
                  AND t.embedding_model = %(target)s)
RETURNING document_id
"""

_NIL = uuid.UUID(int=0)


@dataclass(frozen=True)
class SwitchProgress:
    """After each committed batch (what the job row says)."""

    job_id: str
    phase: str
    documents_done: int
    chunks_written: int


@dataclass(frozen=True)
class _Claim:
    job_id: uuid.UUID
    attempt: int
    namespace: str
    source: str
    target: str


class _Superseded(Exception):
    """A newer run owns the job, or the namespace is no longer switching with it."""


class _Lost(KnowledgeError):
    """The switch cannot go on (for good)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class _Batch:
    """The source chunks of some pending documents (all chunks of each), in order."""

    ids: list[uuid.UUID]
    texts: list[str]  # embedding inputs
    last: uuid.UUID  # the last document's id (the next batch starts after it)
    token_counts: list[int] | None = None  # per chunk text, in the target model's tokens
    tokens: int = 0  # what the model processes (as ingestion counts it)


class ModelSwitcher:
    """Runs switch jobs for a worker; held in the worker's ``additional_context``.

    ``on_batch`` is awaited after each committed batch of the embedding and catch-up
    phases (progress reporting; tests pause a switch there). ``catch_up_rounds``: how
    many times documents changed during the switch are embedded before the swap, which
    embeds the rest while it holds the namespace lock.
    """

    def __init__(
        self,
        db: Database,
        embedders: EmbedderRegistry,
        *,
        batch_documents: int = DEFAULT_BATCH_DOCUMENTS,
        max_attempts: int = 5,
        catch_up_rounds: int = 3,
        cleanup_batch: int = 1000,
        on_batch: Callable[[SwitchProgress], Awaitable[None]] | None = None,
    ) -> None:
        self._db = db
        self._embedders = embedders
        self._batch = batch_documents
        self._max_attempts = max_attempts
        self._rounds = catch_up_rounds
        self._cleanup_batch = cleanup_batch
        self.on_batch = on_batch

    async def run(self, tenant_id: str, job_id: str) -> str | None:
        """Run the switch; its final status, or None when there was nothing to do
        (finished, unknown, or superseded by a newer run)."""
        claim = await self._claim(tenant_id, job_id)
        if claim is None:
            log.info("model_switch_skipped", job_id=job_id, reason="finished or unknown")
            return None
        bound = log.bind(
            job_id=job_id, attempt=claim.attempt, namespace=claim.namespace, target=claim.target
        )
        try:
            embedder = self._target(claim)
            swapped = await self._check_state(tenant_id, claim)
            if not swapped:
                bound.info("model_switch_started")
                await self._embed_pending(tenant_id, claim, embedder, "embedding")
                for _ in range(self._rounds):
                    if not await self._embed_pending(tenant_id, claim, embedder, "catching_up"):
                        break
                version = await self._swap(tenant_id, claim, embedder)
                bound.info("model_switch_swapped", kb_version=version)
            deleted = await self._cleanup(tenant_id, claim)
            await self._finish(tenant_id, claim)
        except _Superseded:
            bound.info("model_switch_superseded")
            return None
        except _Lost as exc:
            await self._finish_failed(tenant_id, claim, DocumentError("", exc.code, str(exc)))
            return "failed"
        bound.info("model_switch_finished", old_chunks_deleted=deleted)
        return "succeeded"

    async def fail(self, tenant_id: str, job_id: str, exc: BaseException) -> None:
        """Record a failure that will not be retried (best effort): the job fails and the
        namespace stops switching (it keeps answering with its current model)."""
        message = f"{type(exc).__name__}: {exc}"
        log.error("model_switch_failed", job_id=job_id, error=message)
        try:
            async with self._db.tenant(tenant_id) as s:
                await self._release(s, uuid.UUID(job_id), None, "internal_error", message)
        except Exception as write_exc:  # noqa: BLE001 -- the original error is what matters
            log.error(  # noqa: TRY400
                "model_switch_failure_not_recorded", job_id=job_id, error=str(write_exc)
            )

    # -- steps ---------------------------------------------------------------------------

    async def _claim(self, tenant_id: str, job_id: str) -> _Claim | None:
        key = uuid.UUID(job_id)
        async with self._db.tenant(tenant_id) as s:
            row = await s.fetch_one(
                "UPDATE ingest_jobs SET status = 'running', attempts = attempts + 1, "
                "started_at = coalesce(started_at, now()) WHERE id = %s "
                "AND kind = 'switch_model' AND status IN ('queued', 'running') "
                "RETURNING attempts, namespace, source_model, target_model",
                (key,),
            )
        if row is None:
            return None
        return _Claim(
            key, row["attempts"], row["namespace"], row["source_model"], row["target_model"]
        )

    def _target(self, claim: _Claim) -> Embedder:
        """The target model's embedder; _Lost if this run must not go on."""
        if claim.attempt > self._max_attempts:
            raise _Lost(
                "gave_up",
                f"the switch was started {claim.attempt - 1} times without finishing "
                "(did its worker keep crashing?)",
            )
        embedder = self._embedders.find(claim.target)
        if embedder is None:
            raise _Lost(
                "unknown_embedding_model",
                f"this worker cannot embed with {claim.target!r} "
                f"(it has {self._embedders.describe()})",
            )
        return embedder

    async def _check_state(self, tenant_id: str, claim: _Claim) -> bool:
        """Whether the swap is done already (a rerun after it); _Lost if the namespace is
        neither switching with this job nor switched by it."""
        async with self._db.tenant(tenant_id) as s:
            state = await s.fetch_one(
                "SELECT active_model, switching_to, switch_job_id FROM kb_state "
                "WHERE namespace = %s",
                (claim.namespace,),
            )
            if state is not None and state["switch_job_id"] == claim.job_id:
                pending = await s.fetch_one(
                    "SELECT count(*) AS n FROM documents d WHERE namespace = %s "
                    "AND EXISTS (SELECT 1 FROM chunks c WHERE c.document_id = d.id "
                    "AND c.embedding_model = %s) AND NOT EXISTS (SELECT 1 FROM chunks t "
                    "WHERE t.document_id = d.id AND t.embedding_model = %s)",
                    (claim.namespace, claim.source, claim.target),
                )
                assert pending is not None
                await self._progress(s, claim, "embedding", pending=int(pending["n"]))
                return False
        phase = await self._phase(tenant_id, claim)
        if state is not None and state["active_model"] == claim.target and phase == "cleanup":
            return True
        raise _Lost(
            "switch_cancelled",
            f"namespace {claim.namespace!r} is no longer switching to {claim.target!r} "
            "with this job",
        )

    async def _phase(self, tenant_id: str, claim: _Claim) -> str | None:
        async with self._db.tenant(tenant_id) as s:
            row = await s.fetch_one("SELECT phase FROM ingest_jobs WHERE id = %s", (claim.job_id,))
        return row["phase"] if row else None

    async def _embed_pending(
        self, tenant_id: str, claim: _Claim, embedder: Embedder, phase: str
    ) -> int:
        """Embed every pending document in batches; how many documents were written."""
        after, written = _NIL, 0
        while True:
            async with self._db.tenant(tenant_id) as s:
                batch = await self._pending(s, claim, after, self._batch)
            if batch is None:
                return written
            after = batch.last
            vectors = await self._embed(embedder, batch)
            async with self._db.tenant(tenant_id) as s:
                await self._lock(s, claim)
                docs, chunks = await self._insert(s, claim, batch, vectors)
                row = await self._progress(s, claim, phase, docs=docs, chunks=chunks, batch=batch)
            written += docs
            if self.on_batch is not None:
                await self.on_batch(
                    SwitchProgress(str(claim.job_id), phase, row["documents_done"], row["chunks"])
                )

    async def _swap(self, tenant_id: str, claim: _Claim, embedder: Embedder) -> int:
        """Embed what is still missing and make the target the active model, holding the
        namespace lock (no write to the namespace is in flight or can start meanwhile)."""
        async with self._db.tenant(tenant_id) as s:
            await self._lock(s, claim)
            after = _NIL
            while (batch := await self._pending(s, claim, after, self._batch)) is not None:
                after = batch.last
                vectors = await self._embed(embedder, batch)
                docs, chunks = await self._insert(s, claim, batch, vectors)
                await self._progress(s, claim, "swapping", docs=docs, chunks=chunks, batch=batch)
            if await self._pending(s, claim, _NIL, 1) is not None:  # cannot happen: locked
                raise _Lost("swap_check_failed", "documents without target chunks remain")
            row = await s.fetch_one(
                "UPDATE kb_state SET active_model = %s, switching_to = NULL, "
                "switch_job_id = NULL, kb_version = kb_version + 1, updated_at = now() "
                "WHERE namespace = %s RETURNING kb_version",
                (claim.target, claim.namespace),
            )
            assert row is not None
            await s.fetch_one(
                "SELECT ragplane_meta.set_namespace_model(%s, %s)", (claim.namespace, claim.target)
            )
            await self._progress(s, claim, "cleanup")
        return int(row["kb_version"])

    async def _cleanup(self, tenant_id: str, claim: _Claim) -> int:
        """Delete chunks of models the namespace neither answers with nor is switching to,
        a batch per transaction, each under the namespace lock (an ingest that replaces a
        document deletes its chunks of every model: the BM25 statistics rows they both
        update are then never updated by both at once)."""
        deleted = 0
        while True:
            async with self._db.tenant(tenant_id) as s:
                await s.execute(
                    "SELECT 1 FROM kb_state WHERE namespace = %s FOR UPDATE", (claim.namespace,)
                )
                n = await s.execute(
                    "DELETE FROM chunks WHERE id IN (SELECT c.id FROM chunks c "
                    "JOIN kb_state k ON k.tenant_id = c.tenant_id AND k.namespace = c.namespace "
                    "WHERE c.namespace = %s AND c.embedding_model <> k.active_model "
                    "AND c.embedding_model IS DISTINCT FROM k.switching_to LIMIT %s)",
                    (claim.namespace, self._cleanup_batch),
                )
            deleted += n
            if n < self._cleanup_batch:
                return deleted

    async def _finish(self, tenant_id: str, claim: _Claim) -> None:
        async with self._db.tenant(tenant_id) as s:
            n = await s.execute(
                "UPDATE ingest_jobs SET status = 'succeeded', phase = 'done', finished_at = now() "
                "WHERE id = %s AND attempts = %s AND status = 'running'",
                (claim.job_id, claim.attempt),
            )
        if n == 0:
            raise _Superseded

    async def _finish_failed(self, tenant_id: str, claim: _Claim, error: DocumentError) -> None:
        async with self._db.tenant(tenant_id) as s:
            await self._release(s, claim.job_id, claim.attempt, error.code, error.message)
        log.warning(
            "model_switch_failed", job_id=str(claim.job_id), code=error.code, error=error.message
        )

    # -- statements ----------------------------------------------------------------------

    async def _lock(self, s: TenantSession, claim: _Claim) -> None:
        """Lock the namespace (as every write does); _Superseded unless it is switching
        with this job."""
        row = await s.fetch_one(
            "SELECT switch_job_id FROM kb_state WHERE namespace = %s FOR UPDATE",
            (claim.namespace,),
        )
        if row is None or row["switch_job_id"] != claim.job_id:
            raise _Superseded

    async def _pending(
        self, s: TenantSession, claim: _Claim, after: uuid.UUID, limit: int
    ) -> _Batch | None:
        rows = await s.fetch_all(
            _PENDING,
            {
                "ns": claim.namespace,
                "after": after,
                "source": claim.source,
                "target": claim.target,
                "limit": limit,
            },
        )
        if not rows:
            return None
        return _Batch(
            ids=[r["id"] for r in rows],
            texts=[embedding_input(r["title"], tuple(r["heading_path"]), r["text"]) for r in rows],
            last=rows[-1]["document_id"],
        )

    async def _embed(self, embedder: Embedder, batch: _Batch) -> Any:
        """The batch's vectors; its token counts too (in a worker thread)."""

        def count() -> None:
            batch.token_counts = [embedder.count_tokens(t) for t in batch.texts]
            batch.tokens = sum(model_tokens(embedder, t) for t in batch.texts)

        await anyio.to_thread.run_sync(count)
        vectors = await embedder.embed(batch.texts)
        if vectors.shape != (len(batch.texts), embedder.dimensions):
            raise EmbeddingError(
                f"the embedder returned an array of shape {vectors.shape} for "
                f"{len(batch.texts)} texts of {embedder.dimensions} dimensions"
            )
        return vectors

    async def _insert(
        self, s: TenantSession, claim: _Claim, batch: _Batch, vectors: Any
    ) -> tuple[int, int]:
        """(documents, chunks) written: documents changed since they were read (their
        chunks replaced) write nothing and stay pending."""
        rows = await s.fetch_all(
            _INSERT,
            {
                "target": claim.target,
                "ids": batch.ids,
                "tc": batch.token_counts,
                "emb": list(vectors),
            },
        )
        return len({r["document_id"] for r in rows}), len(rows)

    async def _progress(
        self,
        s: TenantSession,
        claim: _Claim,
        phase: str,
        *,
        docs: int = 0,
        chunks: int = 0,
        batch: _Batch | None = None,
        pending: int | None = None,
    ) -> Any:
        """Add a batch to the job's counts in the batch's transaction; _Superseded if a
        newer run owns the job (the transaction then rolls back). ``pending``: documents
        still to embed (the total becomes done + pending)."""
        row = await s.fetch_one(
            "UPDATE ingest_jobs SET phase = %(phase)s, "
            "documents_total = CASE WHEN %(pending)s::int IS NULL "
            "THEN greatest(documents_total, documents_done + %(docs)s) "
            "ELSE documents_done + %(pending)s::int END, "
            "documents_done = documents_done + %(docs)s, "
            "chunks_written = chunks_written + %(chunks)s, "
            "tokens_embedded = tokens_embedded + %(tokens)s "
            "WHERE id = %(id)s AND attempts = %(attempt)s AND status = 'running' "
            "RETURNING documents_done, chunks_written AS chunks",
            {
                "phase": phase,
                "pending": pending,
                "docs": docs,
                "chunks": chunks,
                "tokens": batch.tokens if batch is not None else 0,
                "id": claim.job_id,
                "attempt": claim.attempt,
            },
        )
        if row is None:
            raise _Superseded
        return row

    async def _release(
        self, s: TenantSession, job_id: uuid.UUID, attempt: int | None, code: str, message: str
    ) -> None:
        """Fail the job (this run's; any run's with ``attempt`` None) and stop the
        namespace switching with it."""
        n = await s.execute(
            "UPDATE ingest_jobs SET status = 'failed', finished_at = now(), errors = errors || "
            "%(errors)s::jsonb WHERE id = %(id)s AND status IN ('queued', 'running') "
            "AND (%(attempt)s::int IS NULL OR attempts = %(attempt)s::int)",
            {
                "errors": errors_json([DocumentError("", code, message)]),
                "id": job_id,
                "attempt": attempt,
            },
        )
        if n:
            await s.execute(
                "UPDATE kb_state SET switching_to = NULL, switch_job_id = NULL "
                "WHERE switch_job_id = %s",
                (job_id,),
            )
