"""Idempotent, versioned ingestion: parsed documents → chunks with embeddings.

Documents are keyed by (tenant, namespace, source_uri). A content hash over
what determines the chunks (text, title, media type, metadata, chunking policy)
decides whether anything changes:

- unchanged: nothing is written and nothing is embedded;
- new or changed: the document is chunked and embedded *outside* any
  transaction, then its row is upserted and all its chunks replaced in one
  transaction, so readers see the old chunks or the new ones, never a mix;
- gone (``prune_prefix``): the document row is deleted; its chunks go with it
  (foreign key ``ON DELETE CASCADE``), leaving no orphans.

Every batch that changes something bumps the namespace's ``kb_version`` (the
semantic cache keys on it) in the same transaction as the change.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import AsyncIterable, Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from ragplane.control.namespaces import NamespaceConfig
from ragplane.data import Database, TenantSession
from ragplane.errors import IngestError, ModelMismatch
from ragplane.knowledge.chunking import chunk
from ragplane.knowledge.types import ChunkDraft, Embedder, ParsedDocument

__all__ = [
    "DocumentError",
    "IngestProgress",
    "IngestReport",
    "Ingestor",
    "content_hash",
    "embedding_input",
]

_HEADING_SEP = "\x1f"


@dataclass(frozen=True)
class DocumentError:
    source_uri: str
    code: str
    message: str


@dataclass(frozen=True)
class IngestProgress:
    documents_done: int
    chunks_written: int
    tokens_embedded: int
    elapsed_s: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_embedded / self.elapsed_s if self.elapsed_s > 0 else 0.0


@dataclass
class IngestReport:
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


@dataclass
class _Planned:
    doc: ParsedDocument
    hash: str
    drafts: list[ChunkDraft]
    existing: bool


class Ingestor:
    """Writes documents into one tenant's namespace through the tenant unit of work."""

    def __init__(self, db: Database, embedder: Embedder, *, batch_documents: int = 64) -> None:
        self._db = db
        self._embedder = embedder
        self._batch = batch_documents

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
        if config.embedding_model != self._embedder.model_id:
            raise ModelMismatch(
                f"namespace {config.name!r} is pinned to {config.embedding_model!r}; "
                f"this ingestor embeds with {self._embedder.model_id!r}"
            )
        report = IngestReport(errors=list(errors))
        started = time.perf_counter()
        seen: set[str] = set()
        batch: dict[str, ParsedDocument] = {}

        async def flush() -> None:
            await self._ingest_batch(config, list(batch.values()), report)
            batch.clear()
            if on_progress is not None:
                on_progress(
                    IngestProgress(
                        documents_done=report.documents + len(report.errors),
                        chunks_written=report.chunks_written,
                        tokens_embedded=report.tokens_embedded,
                        elapsed_s=time.perf_counter() - started,
                    )
                )

        async for doc in _aiter(documents):
            seen.add(doc.source_uri)
            batch[doc.source_uri] = doc  # a repeated source_uri: the last one wins
            if len(batch) >= self._batch:
                await flush()
        if batch:
            await flush()
        if prune_prefix is not None:
            await self._prune(config, prune_prefix, seen, report)
        report.elapsed_s = time.perf_counter() - started
        return report

    async def _ingest_batch(
        self, config: NamespaceConfig, docs: list[ParsedDocument], report: IngestReport
    ) -> None:
        hashes = {d.source_uri: content_hash(d, config) for d in docs}
        async with self._db.tenant(config.tenant_id) as s:
            await self._check_active_model(s, config)
            rows = await s.fetch_all(
                "SELECT source_uri, content_hash FROM documents "
                "WHERE namespace = %s AND source_uri = ANY(%s)",
                (config.name, list(hashes)),
            )
        stored = {r["source_uri"]: r["content_hash"] for r in rows}
        planned: list[_Planned] = []
        for doc in docs:
            if stored.get(doc.source_uri) == hashes[doc.source_uri]:
                report.unchanged += 1
                continue
            try:
                drafts = chunk(doc, config.chunking, self._embedder.count_tokens)
            except IngestError as exc:
                report.errors.append(DocumentError(doc.source_uri, exc.code, exc.message))
                continue
            planned.append(_Planned(doc, hashes[doc.source_uri], drafts, doc.source_uri in stored))
        if not planned:
            return
        texts = [
            embedding_input(p.doc.title, d.heading_path, d.text) for p in planned for d in p.drafts
        ]
        vectors = await self._embedder.embed(texts) if texts else _empty(self._embedder)
        if texts:
            report.embedding_calls += 1
            report.texts_embedded += len(texts)
            report.tokens_embedded += sum(d.token_count for p in planned for d in p.drafts)
        async with self._db.tenant(config.tenant_id) as s:
            offset = 0
            for p in planned:
                n = len(p.drafts)
                await self._replace(s, config, p, vectors[offset : offset + n])
                offset += n
                report.chunks_written += n
                if p.existing:
                    report.updated += 1
                else:
                    report.added += 1
            report.kb_version = await _bump_version(s, config)

    async def _check_active_model(self, s: TenantSession, config: NamespaceConfig) -> None:
        row = await s.fetch_one(
            "SELECT active_model FROM kb_state WHERE namespace = %s", (config.name,)
        )
        if row is not None and row["active_model"] != self._embedder.model_id:
            raise ModelMismatch(
                f"namespace {config.name!r} is answered with {row['active_model']!r}; "
                f"this ingestor embeds with {self._embedder.model_id!r} (a model switch is "
                "in progress or the embedder is misconfigured)"
            )

    async def _replace(
        self,
        s: TenantSession,
        config: NamespaceConfig,
        p: _Planned,
        vectors: npt.NDArray[np.float32],
    ) -> None:
        doc = p.doc
        row = await s.fetch_one(
            "INSERT INTO documents (tenant_id, namespace, source_uri, title, media_type, "
            "content_hash, body, metadata) VALUES (%s, %s, %s, %s, %s, %s, %s, %s::jsonb) "
            "ON CONFLICT (tenant_id, namespace, source_uri) DO UPDATE SET "
            "title = EXCLUDED.title, media_type = EXCLUDED.media_type, "
            "content_hash = EXCLUDED.content_hash, body = EXCLUDED.body, "
            "metadata = EXCLUDED.metadata, updated_at = now() RETURNING id",
            (
                config.tenant_id,
                config.name,
                doc.source_uri,
                doc.title,
                doc.media_type,
                p.hash,
                doc.text,
                json.dumps(doc.metadata, default=str),
            ),
        )
        assert row is not None
        doc_id = row["id"]
        # every model's chunks of this document are stale now
        await s.execute("DELETE FROM chunks WHERE document_id = %s", (doc_id,))
        if not p.drafts:
            return
        await s.execute(
            "INSERT INTO chunks (tenant_id, document_id, namespace, embedding_model, ordinal, "
            "text, heading_path, char_start, char_end, token_count, embedding, tsv, tsv_length, "
            "metadata) "
            "SELECT %(tenant)s, %(doc)s, %(ns)s, %(model)s, u.ordinal, u.text, "
            "string_to_array(u.hp, E'\\x1f'), u.cs, u.ce, u.tc, u.emb, v.tsv, l.n, "
            "%(meta)s::jsonb "
            "FROM unnest(%(ord)s::int[], %(text)s::text[], %(hp)s::text[], %(cs)s::int[], "
            "%(ce)s::int[], %(tc)s::int[], %(emb)s::vector[]) AS u(ordinal, text, hp, cs, ce, "
            "tc, emb), "
            "LATERAL (SELECT setweight(to_tsvector('english', %(title)s || ' ' || "
            "replace(u.hp, E'\\x1f', ' ')), 'A') || setweight(to_tsvector('english', u.text), "
            "'B') AS tsv) AS v, "
            "LATERAL (SELECT coalesce(sum(array_length(x.positions, 1)), 0)::int AS n "
            "FROM unnest(v.tsv) AS x) AS l",
            {
                "tenant": config.tenant_id,
                "doc": doc_id,
                "ns": config.name,
                "model": self._embedder.model_id,
                "title": doc.title,
                "meta": json.dumps(doc.metadata, default=str),
                "ord": [d.ordinal for d in p.drafts],
                "text": [d.text for d in p.drafts],
                "hp": [_HEADING_SEP.join(d.heading_path) for d in p.drafts],
                "cs": [d.start for d in p.drafts],
                "ce": [d.end for d in p.drafts],
                "tc": [d.token_count for d in p.drafts],
                "emb": list(vectors),
            },
        )

    async def _prune(
        self, config: NamespaceConfig, prefix: str, seen: set[str], report: IngestReport
    ) -> None:
        async with self._db.tenant(config.tenant_id) as s:
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


async def _bump_version(s: TenantSession, config: NamespaceConfig) -> int:
    row = await s.fetch_one(
        "INSERT INTO kb_state (tenant_id, namespace, kb_version, active_model) "
        "VALUES (%s, %s, 1, %s) ON CONFLICT (tenant_id, namespace) DO UPDATE SET "
        "kb_version = kb_state.kb_version + 1, updated_at = now() RETURNING kb_version",
        (config.tenant_id, config.name, config.embedding_model),
    )
    assert row is not None
    return int(row["kb_version"])


def _empty(embedder: Embedder) -> npt.NDArray[np.float32]:
    return np.zeros((0, embedder.dimensions), dtype=np.float32)


async def _aiter(
    docs: Iterable[ParsedDocument] | AsyncIterable[ParsedDocument],
) -> AsyncIterable[ParsedDocument]:
    if isinstance(docs, AsyncIterable):
        async for d in docs:
            yield d
    else:
        for d in docs:
            yield d
