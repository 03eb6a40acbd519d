"""Switching a namespace's embedding model: the request side and the namespace state.

A switch is asked for with :func:`request_switch`; it runs in the background as a job
of kind ``switch_model`` (:class:`~ragplane.knowledge.switchrunner.ModelSwitcher`):

1. **embedding** -- every document that has chunks of the current model and none of the
   target model gets new chunk rows (``embedding_model`` = target) beside the old ones:
   the same text, offsets, heading path and full-text vector, embedded with the target
   model, in batches. A document counts as done once it has target chunks: any change to
   a document replaces the chunks of *every* model in one transaction, so target chunks
   that exist are always those of the document's current content.
2. **catching_up** -- the same again, a few rounds, for documents added or changed
   while the job ran (ingestion goes on during a switch, with the current model).
3. **swapping** -- one transaction: lock the namespace's ``kb_state`` row (every write
   to the namespace takes that lock first, so no write is in flight and none can start),
   embed whatever is still missing, check that nothing is, then make the target the
   active model, re-pin the namespace (``control.kb_namespaces``) and bump
   ``kb_version``. Queries before the commit use the old model, after it the new one.
4. **cleanup** -- delete the chunks of every model other than the active one (and a
   switch in progress), in batches. The old chunks are *not* kept for a rollback: they
   would double the index for a rare need, and switching back is another switch.

While a switch is under way, ``kb_state.switching_to`` and ``switch_job_id`` name it;
a second switch of the namespace is refused until the first has finished. A switch
that fails for good clears them (the namespace keeps answering with its old model);
the target chunks it wrote stay, and a later switch to that model reuses them, while
a completed switch to any model removes them.

Chunk boundaries are kept: the target model embeds the current model's chunks (the
source document's structure is not stored, so re-chunking needs a re-ingest). Chunk
sizes were measured in the current model's tokens; with another tokenizer a chunk may
be a little over the target model's budget, and is then truncated by that model.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from ragplane.control.namespaces import NamespaceConfig
from ragplane.data import Database
from ragplane.data.queue import ENQUEUE_SETTINGS
from ragplane.errors import KnowledgeError
from ragplane.knowledge.ingest import lock_namespace
from ragplane.knowledge.jobs import IngestJob, IngestQueue
from ragplane.knowledge.models import EmbedderRegistry
from ragplane.observe.logging import get_logger

__all__ = ["NamespaceState", "SwitchRefused", "namespace_state", "request_switch"]

log = get_logger("ragplane.knowledge.switch")


class SwitchRefused(KnowledgeError):
    """A switch that cannot start; ``code``: ``unknown_embedding_model``,
    ``model_already_active`` or ``switch_in_progress``."""

    def __init__(self, message: str, *, code: str, job_id: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.job_id = job_id


@dataclass(frozen=True)
class NamespaceState:
    """A namespace's data-plane state (``kb_state``)."""

    namespace: str
    kb_version: int
    active_model: str
    switching_to: str | None
    switch_job_id: str | None


async def namespace_state(db: Database, tenant_id: str, namespace: str) -> NamespaceState | None:
    """The namespace's state, or None before anything was written to it."""
    async with db.tenant(tenant_id) as s:
        row = await s.fetch_one(
            "SELECT namespace, kb_version, active_model, switching_to, switch_job_id "
            "FROM kb_state WHERE namespace = %s",
            (namespace,),
        )
    if row is None:
        return None
    return NamespaceState(
        namespace=row["namespace"],
        kb_version=int(row["kb_version"]),
        active_model=row["active_model"],
        switching_to=row["switching_to"],
        switch_job_id=str(row["switch_job_id"]) if row["switch_job_id"] else None,
    )


async def request_switch(
    queue: IngestQueue,
    db: Database,
    config: NamespaceConfig,
    target_model: str,
    embedders: EmbedderRegistry,
) -> IngestJob:
    """Queue a switch of ``config``'s namespace to ``target_model``: the job row, the
    namespace's ``switching_to`` and the queue entry, in one transaction.

    Refused (:class:`SwitchRefused`) for a model ``embedders`` cannot run, the model the
    namespace already answers with, or while another switch of the namespace is queued
    or running (its cleanup included).
    """
    if target_model not in embedders:
        raise SwitchRefused(
            f"no embedding model {target_model!r} here; available: {embedders.describe()}",
            code="unknown_embedding_model",
        )
    async with db.tenant(config.tenant_id, settings=ENQUEUE_SETTINGS) as s:
        _, active = await lock_namespace(s, config)
        busy = await s.fetch_one(
            "SELECT id, target_model FROM ingest_jobs WHERE namespace = %s "
            "AND kind = 'switch_model' AND status IN ('queued', 'running') "
            "ORDER BY created_at LIMIT 1",
            (config.name,),
        )
        if busy is not None:
            raise SwitchRefused(
                f"namespace {config.name!r} is already switching to {busy['target_model']!r} "
                f"(job {busy['id']}); wait for that job to finish",
                code="switch_in_progress",
                job_id=str(busy["id"]),
            )
        if active == target_model:
            raise SwitchRefused(
                f"namespace {config.name!r} already answers with {target_model!r}",
                code="model_already_active",
            )
        row = await s.fetch_one(
            "INSERT INTO ingest_jobs (tenant_id, namespace, kind, source_model, target_model, "
            "phase, documents_total) SELECT %s, %s, 'switch_model', %s, %s, 'embedding', "
            "count(*) FROM documents WHERE namespace = %s RETURNING id",
            (config.tenant_id, config.name, active, target_model, config.name),
        )
        assert row is not None
        job_id: uuid.UUID = row["id"]
        await s.execute(
            "UPDATE kb_state SET switching_to = %s, switch_job_id = %s WHERE namespace = %s",
            (target_model, job_id, config.name),
        )
        job = await queue.defer_tracked(s, "switch_model", config, job_id)
    log.info(
        "model_switch_queued",
        job_id=job.id,
        namespace=config.name,
        source_model=active,
        target_model=target_model,
        documents=job.documents_total,
        queue_job_id=job.procrastinate_job_id,
    )
    return job
