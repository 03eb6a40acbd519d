"""Idempotent, versioned ingestion: parsed documents → chunks with embeddings.

Documents are keyed by (tenant, namespace, source_uri). A content hash over
what determines the chunks (text, title, media type, metadata, chunking policy)
decides whether anything changes:

- unchanged: nothing is written and nothing is embedded;
- new or changed: the document is chunked and embedded *outside* any
  transaction, then its row is upserted and all its chunks replaced in one
  transaction, so readers see the old chunks or the new ones, never a mix;
- gone (``prune_prefix``): the document's chunks, then its row, are deleted in
  one transaction, leaving no orphans.

Every batch that changes something bumps the namespace's ``kb_version`` (the
semantic cache keys on it) in the same transaction as the change.

**The model.** A run embeds with the namespace's pinned model, taken from the
ingestor's :class:`~ragplane.knowledge.models.EmbedderRegistry`. Every write
transaction *starts* by locking the namespace's ``kb_state`` row (the bump of
``kb_version``) and checking that the namespace is still answered with that model, so
writes of one namespace are serialised against each other and against the swap of a
model switch (``ragplane.knowledge.switch``): the swap sees every write that committed
before it, and a write after it finds the new model and is refused
(:class:`~ragplane.knowledge.models.ModelSwitched`: rerun with the new model) instead of
adding chunks of the old one.

**Batches and the pipeline.** Documents go through in batches of
``batch_documents``. A batch is *looked up* (stored hashes, one short
transaction), its new and changed documents are *chunked* (in a worker thread)
and all their chunks *embedded* in one call, and the batch is *written* in one
transaction: one statement upserts its documents, at most one deletes the stale
chunks of the documents it replaces, one inserts all its chunks, then
``kb_version`` is bumped. Batches are pipelined one deep: batch N is written
while batch N+1 is chunked and embedded, so the embedder does not wait for the
database. Batch N+1 is read and looked up *before* the write of batch N starts,
so the ingestor holds at most one database connection at a time and at most two
batches in memory; a document that batch N is about to write is judged against
the hash being written. A batch's results (report counters, ``on_progress``) are
accounted only once it has committed, in order, so ``documents_done`` never
counts a document that is not durable yet.

If chunking or embedding batch N+1 fails, the write of batch N (a whole batch)
finishes before the error propagates; if the run is cancelled, the write in
flight is cancelled and rolls back. Either way no batch is half written, and a
rerun skips every committed document.

**Tokens.** ``tokens_embedded`` counts what the model processes: each embedding
input (:func:`embedding_input`: title and heading path, then the chunk text) in
tokens plus the two special tokens, truncated to the model's ``max_tokens``
(:func:`model_tokens`) — the count
:func:`~ragplane.knowledge.embedder.measure_throughput` uses for the raw
embedder, so ingestion's tokens/s and the raw embedder's are comparable.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
import uuid
from collections.abc import AsyncIterable, Callable, Iterable
from dataclasses import dataclass, field

import anyio.to_thread
import numpy as np
import numpy.typing as npt

from ragplane.control.namespaces import NamespaceConfig
from ragplane.data import Database, TenantSession
from ragplane.errors import EmbeddingError, IngestError, ModelMismatch
from ragplane.knowledge.chunking import chunk
from ragplane.knowledge.models import EmbedderRegistry, ModelSwitched
from ragplane.knowledge.types import ChunkDraft, Embedder, ParsedDocument

__all__ = [
    "DEFAULT_BATCH_DOCUMENTS",
    "DocumentError",
    "IngestProgress",
    "IngestReport",
    "Ingestor",
    "content_hash",
    "embedding_input",
    "lock_namespace",
    "model_tokens",
]

DEFAULT_BATCH_DOCUMENTS = 256

_HEADING_SEP = "\x1f"
_SPECIAL_TOKENS = 2  # [CLS] and [SEP], as measure_throughput counts them


@dataclass(frozen=True)
class DocumentError:
    source_uri: str
    code: str
    message: str


@dataclass(frozen=True)
class IngestProgress:
    """After each committed batch: totals so far (``tokens_embedded`` as in the report)."""

    documents_done: int
    chunks_written: int
    tokens_embedded: int
    elapsed_s: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_embedded / self.elapsed_s if self.elapsed_s > 0 else 0.0


@dataclass
class IngestReport:
    """What a run did. ``tokens_embedded``: tokens the model processed (:func:`model_tokens`
    of every embedding input), not just those of the chunk texts."""

    added: int = 0
    updated: int = 0
    unchanged: int = 0
    deleted: int = 0
    chunks_written: int = 0
    embedding_calls: int = 0
    texts_embedded: int = 0
    tokens_embedded: int = 0
    kb_version: int | None = None
    elapsed_s: float = 0.0
    errors: list[DocumentError] = field(default_factory=list)

    @property
    def documents(self) -> int:
        return self.added + self.updated + self.unchanged

    @property
    def changed(self) -> bool:
        return bool(self.added or self.updated or self.deleted)


def content_hash(doc: ParsedDocument, config: NamespaceConfig) -> str:
    """What decides a document's chunks: its content and the namespace's chunking policy."""
    h = hashlib.sha256()
    for part in (
        doc.media_type,
        doc.title,
        json.dumps(doc.metadata, sort_keys=True, default=str),
        f"{config.chunking.max_tokens}/{config.chunking.overlap_tokens}",
        doc.text,
    ):
        h.update(part.encode())
        h.update(b"\x00")
    return "sha256:" + h.hexdigest()


def embedding_input(title: str, heading_path: tuple[str, ...], text: str) -> str:
    """The text the model embeds for a chunk: where it sits, then what it says."""
    context: list[str] = []
    for part in (title, *heading_path):
        part = part.strip()
        if part and part not in context:
            context.append(part)
    return (" > ".join(context) + "\n" + text) if context else text


def model_tokens(embedder: Embedder, text: str) -> int:
    """Tokens the model processes for one input: ``count_tokens`` plus the two special
    tokens, truncated to ``max_tokens`` (as :func:`~ragplane.knowledge.embedder.measure_throughput`
    counts them)."""
    return min(embedder.count_tokens(text) + _SPECIAL_TOKENS, embedder.max_tokens)


@dataclass
class _Planned:
    doc: ParsedDocument
    hash: str
    drafts: list[ChunkDraft] = field(default_factory=list)


@dataclass
class _Batch:
    """One batch of documents on its way through look-up → chunk and embed → write."""

    planned: list[_Planned] = field(default_factory=list)  # new or changed documents
    unchanged: int = 0
    errors: list[DocumentError] = field(default_factory=list)
    texts: int = 0
    tokens: int = 0
    vectors: npt.NDArray[np.float32] | None = None
    added: int = 0
    updated: int = 0
    chunks: int = 0
    kb_version: int | None = None


class Ingestor:
    """Writes documents into one tenant's namespace through the tenant unit of work.

    ``batch_documents`` documents are embedded in one call and committed in one
    transaction. The default, 256, is about the smallest batch at which the embedder's
    length sorting (within a call) pads little: on pyfaq, 64-document batches ran the
    model ~6% slower than 256-document ones (docs/benchmarks.md). The embedder's
    ``count_tokens`` is called from a worker thread.

    ``embedder``: one embedder, or a registry of them; each namespace is embedded with
    the model it is pinned to.
    """

    def __init__(
        self,
        db: Database,
        embedder: Embedder | EmbedderRegistry,
        *,
        batch_documents: int = DEFAULT_BATCH_DOCUMENTS,
    ) -> None:
        if batch_documents < 1:
            raise ValueError(f"batch_documents must be at least 1, got {batch_documents}")
        self._db = db
        self._embedders = EmbedderRegistry.of(embedder)
        self._batch = batch_documents

    @property
    def embedders(self) -> EmbedderRegistry:
        return self._embedders

    def _embedder(self, config: NamespaceConfig) -> Embedder:
        embedder = self._embedders.find(config.embedding_model)
        if embedder is None:
            raise ModelMismatch(
                f"namespace {config.name!r} is pinned to {config.embedding_model!r}; "
                f"this ingestor embeds with {self._embedders.describe()}"
            )
        return embedder

    def _answered_with(self, config: NamespaceConfig, active: str) -> ModelMismatch:
        """The error for a namespace answered with ``active``, not with its run's model."""
        message = (
            f"namespace {config.name!r} is answered with {active!r}; this run embeds with "
            f"{config.embedding_model!r}"
        )
        if active in self._embedders:
            return ModelSwitched(
                message + " (the namespace was switched to another model: run it again)",
                namespace=config.name,
                active_model=active,
            )
        return ModelMismatch(
            message + " (a model switch is in progress or the embedder is misconfigured)"
        )

    async def ingest(
        self,
        config: NamespaceConfig,
        documents: Iterable[ParsedDocument] | AsyncIterable[ParsedDocument],
        *,
        prune_prefix: str | None = None,
        errors: Iterable[DocumentError] = (),
        on_progress: Callable[[IngestProgress], None] | None = None,
    ) -> IngestReport:
        """Ingest ``documents``; with ``prune_prefix``, delete the namespace's documents
        under that source prefix that were not in this run (a folder re-ingest)."""
        self._embedder(config)  # refuses a namespace pinned to a model not here
        report = IngestReport(errors=list(errors))
        started = time.perf_counter()
        seen: set[str] = set()
        batch: dict[str, ParsedDocument] = {}
        embedded: _Batch | None = None  # embedded, waiting for its write

        def account(b: _Batch) -> None:
            """A batch has committed (or had nothing to write): count it, in order."""
            report.unchanged += b.unchanged
            report.errors.extend(b.errors)
            report.added += b.added
            report.updated += b.updated
            report.chunks_written += b.chunks
            if b.texts:
                report.embedding_calls += 1
                report.texts_embedded += b.texts
                report.tokens_embedded += b.tokens
            if b.kb_version is not None:
                report.kb_version = b.kb_version
            if on_progress is not None:
                on_progress(
                    IngestProgress(
                        documents_done=report.documents + len(report.errors),
                        chunks_written=report.chunks_written,
                        tokens_embedded=report.tokens_embedded,
                        elapsed_s=time.perf_counter() - started,
                    )
                )

        async def step(docs: list[ParsedDocument] | None) -> None:
            """Write the embedded batch while the next one (``docs``) is chunked and
            embedded; ``None``: write the last batch."""
            nonlocal embedded
            upcoming = await self._look_up(config, docs, embedded) if docs else None
            ready, embedded = embedded, None
            write = None
            if ready is not None:
                write = asyncio.create_task(
                    self._write(config, ready),
                    name=f"ingest write {config.tenant_id}/{config.name}",
                )
            try:
                if upcoming is not None and upcoming.planned:
                    await self._prepare(config, upcoming)
            except BaseException as exc:
                if write is not None and ready is not None and await _settle(write, exc):
                    account(ready)
                raise
            if write is not None and ready is not None:
                await write  # cancelling the run cancels the write: it rolls back
                account(ready)
            if upcoming is not None:
                if upcoming.planned:
                    embedded = upcoming
                else:
                    account(upcoming)

        try:
            async for doc in _aiter(documents):
                seen.add(doc.source_uri)
                batch[doc.source_uri] = doc  # a repeated source_uri: the last one wins
                if len(batch) >= self._batch:
                    await step(list(batch.values()))
                    batch.clear()
            if batch:
                await step(list(batch.values()))
            await step(None)
        except Exception as exc:
            # reading or looking up the next batch failed: still write the one embedded
            if embedded is not None:
                ready, embedded = embedded, None
                try:
                    await self._write(config, ready)
                except Exception as write_exc:  # noqa: BLE001 -- exc is what propagates
                    exc.add_note(f"the embedded batch could not be written either: {write_exc!r}")
                else:
                    account(ready)
            raise
        if prune_prefix is not None:
            await self._prune(config, prune_prefix, seen, report)
        report.elapsed_s = time.perf_counter() - started
        return report

    async def _look_up(
        self, config: NamespaceConfig, docs: list[ParsedDocument], writing: _Batch | None
    ) -> _Batch:
        """Which of ``docs`` are new or changed, given the stored hashes and those of the
        batch about to be written (``writing``, committed before this batch is)."""
        hashes = {d.source_uri: content_hash(d, config) for d in docs}
        async with self._db.tenant(config.tenant_id) as s:
            await self._check_active_model(s, config)
            rows = await s.fetch_all(
                "SELECT source_uri, content_hash FROM documents "
                "WHERE namespace = %s AND source_uri = ANY(%s)",
                (config.name, list(hashes)),
            )
        stored = {r["source_uri"]: r["content_hash"] for r in rows}
        if writing is not None:
            stored.update((p.doc.source_uri, p.hash) for p in writing.planned)
        batch = _Batch()
        for doc in docs:
            if stored.get(doc.source_uri) == hashes[doc.source_uri]:
                batch.unchanged += 1
            else:
                batch.planned.append(_Planned(doc, hashes[doc.source_uri]))
        return batch

    async def _prepare(self, config: NamespaceConfig, batch: _Batch) -> None:
        """Chunk the batch's documents (in a worker thread), then embed all its chunks in
        one call."""
        texts = await anyio.to_thread.run_sync(self._chunk, config, batch)
        if not texts:
            return
        embedder = self._embedder(config)
        vectors = await embedder.embed(texts)
        if vectors.shape != (len(texts), embedder.dimensions):
            raise EmbeddingError(
                f"the embedder returned an array of shape {vectors.shape} for {len(texts)} "
                f"texts of {embedder.dimensions} dimensions"
            )
        batch.vectors = vectors
        batch.texts = len(texts)

    def _chunk(self, config: NamespaceConfig, batch: _Batch) -> list[str]:
        """Chunk each planned document (one that cannot be chunked becomes an error);
        return the embedding inputs and count their tokens."""
        embedder = self._embedder(config)
        kept: list[_Planned] = []
        texts: list[str] = []
        for p in batch.planned:
            try:
                p.drafts = chunk(p.doc, config.chunking, embedder.count_tokens)
            except IngestError as exc:
                batch.errors.append(DocumentError(p.doc.source_uri, exc.code, exc.message))
                continue
            kept.append(p)
            texts.extend(embedding_input(p.doc.title, d.heading_path, d.text) for d in p.drafts)
        batch.planned = kept
        batch.tokens = sum(model_tokens(embedder, t) for t in texts)
        return texts

    async def _write(self, config: NamespaceConfig, batch: _Batch) -> None:
        """Upsert the batch's documents and replace their chunks, in one transaction that
        first locks the namespace (and bumps its version) and checks its model."""
        docs = [p.doc for p in batch.planned]
        async with self._db.tenant(config.tenant_id) as s:
            version, active = await lock_namespace(s, config, bump=True)
            if active != config.embedding_model:
                raise self._answered_with(config, active)
            # xmax = 0: the row was inserted by this statement, not updated
            rows = await s.fetch_all(
                "INSERT INTO documents (tenant_id, namespace, source_uri, title, media_type, "
                "content_hash, body, metadata) "
                "SELECT %(tenant)s, %(ns)s, u.uri, u.title, u.mt, u.hash, u.body, u.meta::jsonb "
                "FROM unnest(%(uri)s::text[], %(title)s::text[], %(mt)s::text[], "
                "%(hash)s::text[], %(body)s::text[], %(meta)s::text[]) "
                "AS u(uri, title, mt, hash, body, meta) "
                "ON CONFLICT (tenant_id, namespace, source_uri) DO UPDATE SET "
                "title = EXCLUDED.title, media_type = EXCLUDED.media_type, "
                "content_hash = EXCLUDED.content_hash, body = EXCLUDED.body, "
                "metadata = EXCLUDED.metadata, updated_at = now() "
                "RETURNING id, source_uri, xmax = 0 AS inserted",
                {
                    "tenant": config.tenant_id,
                    "ns": config.name,
                    "uri": [d.source_uri for d in docs],
                    "title": [d.title for d in docs],
                    "mt": [d.media_type for d in docs],
                    "hash": [p.hash for p in batch.planned],
                    "body": [d.text for d in docs],
                    "meta": [json.dumps(d.metadata, default=str) for d in docs],
                },
            )
            ids = {r["source_uri"]: r["id"] for r in rows}
            replaced = [r["id"] for r in rows if not r["inserted"]]
            if replaced:
                # every model's chunks of these documents are stale now; one statement, so
                # the BM25 statistics trigger runs once per batch (and not at all for new ones)
                await s.execute("DELETE FROM chunks WHERE document_id = ANY(%s)", (replaced,))
            if batch.vectors is not None:
                await self._insert_chunks(s, config, batch, ids, batch.vectors)
        batch.kb_version = version
        batch.updated = len(replaced)
        batch.added = len(rows) - len(replaced)
        batch.chunks = batch.texts

    async def _insert_chunks(
        self,
        s: TenantSession,
        config: NamespaceConfig,
        batch: _Batch,
        ids: dict[str, uuid.UUID],
        vectors: npt.NDArray[np.float32],
    ) -> None:
        pairs = [(p, d) for p in batch.planned for d in p.drafts]
        meta = {p.doc.source_uri: json.dumps(p.doc.metadata, default=str) for p in batch.planned}
        await s.execute(
            "INSERT INTO chunks (tenant_id, document_id, namespace, embedding_model, ordinal, "
            "text, heading_path, char_start, char_end, token_count, embedding, tsv, tsv_length, "
            "metadata) "
            "SELECT %(tenant)s, u.doc, %(ns)s, %(model)s, u.ordinal, u.text, "
            "string_to_array(u.hp, E'\\x1f'), u.cs, u.ce, u.tc, u.emb, v.tsv, l.n, "
            "u.meta::jsonb "
            "FROM unnest(%(doc)s::uuid[], %(ord)s::int[], %(text)s::text[], %(hp)s::text[], "
            "%(cs)s::int[], %(ce)s::int[], %(tc)s::int[], %(emb)s::vector[], %(title)s::text[], "
            "%(meta)s::text[]) AS u(doc, ordinal, text, hp, cs, ce, tc, emb, title, meta), "
            "LATERAL (SELECT setweight(to_tsvector('english', u.title || ' ' || "
            "replace(u.hp, E'\\x1f', ' ')), 'A') || setweight(to_tsvector('english', u.text), "
            "'B') AS tsv) AS v, "
            "LATERAL (SELECT coalesce(sum(array_length(x.positions, 1)), 0)::int AS n "
            "FROM unnest(v.tsv) AS x) AS l",
            {
                "tenant": config.tenant_id,
                "ns": config.name,
                "model": config.embedding_model,
                "doc": [ids[p.doc.source_uri] for p, _ in pairs],
                "ord": [d.ordinal for _, d in pairs],
                "text": [d.text for _, d in pairs],
                "hp": [_HEADING_SEP.join(d.heading_path) for _, d in pairs],
                "cs": [d.start for _, d in pairs],
                "ce": [d.end for _, d in pairs],
                "tc": [d.token_count for _, d in pairs],
                "emb": list(vectors),
                "title": [p.doc.title for p, _ in pairs],
                "meta": [meta[p.doc.source_uri] for p, _ in pairs],
            },
        )

    async def _check_active_model(self, s: TenantSession, config: NamespaceConfig) -> None:
        row = await s.fetch_one(
            "SELECT active_model FROM kb_state WHERE namespace = %s", (config.name,)
        )
        if row is not None and row["active_model"] != config.embedding_model:
            raise self._answered_with(config, row["active_model"])

    async def _prune(
        self, config: NamespaceConfig, prefix: str, seen: set[str], report: IngestReport
    ) -> None:
        async with self._db.tenant(config.tenant_id) as s:
            await lock_namespace(s, config)
            params = (config.name, prefix, list(seen))
            # chunks first, in this unit of work, so the BM25 statistics triggers see them
            await s.execute(
                "DELETE FROM chunks WHERE document_id IN (SELECT id FROM documents WHERE "
                "namespace = %s AND starts_with(source_uri, %s) AND NOT (source_uri = ANY(%s)))",
                params,
            )
            deleted = await s.execute(
                "DELETE FROM documents WHERE namespace = %s AND starts_with(source_uri, %s) "
                "AND NOT (source_uri = ANY(%s))",
                params,
            )
            if deleted:
                report.deleted += deleted
                report.kb_version = await _bump_version(s, config)

    async def delete_document(self, config: NamespaceConfig, document_id: str) -> bool:
        """Delete one document and its chunks; False if the tenant has no such document."""
        try:
            doc_uuid = uuid.UUID(document_id)
        except ValueError:
            return False
        async with self._db.tenant(config.tenant_id) as s:
            await lock_namespace(s, config)
            await s.execute(
                "DELETE FROM chunks WHERE document_id = %s AND namespace = %s",
                (doc_uuid, config.name),
            )
            deleted = await s.execute(
                "DELETE FROM documents WHERE namespace = %s AND id = %s",
                (config.name, doc_uuid),
            )
            if deleted:
                await _bump_version(s, config)
        return bool(deleted)


async def lock_namespace(
    s: TenantSession, config: NamespaceConfig, *, bump: bool = False
) -> tuple[int, str]:
    """Lock the namespace's ``kb_state`` row for this unit of work (creating it, answered
    with the namespace's pinned model, if it does not exist); with ``bump``, also bump
    ``kb_version``. (kb_version, active model).

    Every write to a namespace's documents and chunks takes this lock first, so writes
    and a model switch's swap serialise on one row.
    """
    step = 1 if bump else 0
    row = await s.fetch_one(
        "INSERT INTO kb_state AS k (tenant_id, namespace, kb_version, active_model) "
        "VALUES (%s, %s, %s, %s) ON CONFLICT (tenant_id, namespace) DO UPDATE SET "
        "kb_version = k.kb_version + %s, "
        "updated_at = CASE WHEN %s THEN now() ELSE k.updated_at END "
        "RETURNING kb_version, active_model",
        (config.tenant_id, config.name, step, config.embedding_model, step, bump),
    )
    assert row is not None
    return int(row["kb_version"]), str(row["active_model"])


async def _bump_version(s: TenantSession, config: NamespaceConfig) -> int:
    row = await s.fetch_one(
        "INSERT INTO kb_state (tenant_id, namespace, kb_version, active_model) "
        "VALUES (%s, %s, 1, %s) ON CONFLICT (tenant_id, namespace) DO UPDATE SET "
        "kb_version = kb_state.kb_version + 1, updated_at = now() RETURNING kb_version",
        (config.tenant_id, config.name, config.embedding_model),
    )
    assert row is not None
    return int(row["kb_version"])


async def _settle(write: asyncio.Task[None], exc: BaseException) -> bool:
    """``exc`` stopped the run while ``write`` was in flight: let the write finish after
    an error (it is a whole batch), cancel it (it rolls back) after a cancellation.
    Whether it committed."""
    if not isinstance(exc, Exception):
        write.cancel()
    try:
        await write
    except asyncio.CancelledError:
        if isinstance(exc, Exception):
            raise  # this run was cancelled while it waited: the cancellation wins
        return False
    except Exception as write_exc:  # noqa: BLE001 -- exc is what propagates
        exc.add_note(f"the write of the batch before failed as well: {write_exc!r}")
        return False
    return True


async def _aiter(
    docs: Iterable[ParsedDocument] | AsyncIterable[ParsedDocument],
) -> AsyncIterable[ParsedDocument]:
    if isinstance(docs, AsyncIterable):
        async for d in docs:
            yield d
    else:
        for d in docs:
            yield d
