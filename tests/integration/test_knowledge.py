"""Ingestion and hybrid retrieval on a real Postgres with the real embedding model."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest

from ragplane.control.namespaces import NamespaceConfig, upsert_namespace
from ragplane.data import Database
from ragplane.errors import ModelMismatch
from ragplane.knowledge.embedder import LocalEmbedder
from ragplane.knowledge.ingest import Ingestor
from ragplane.knowledge.parsers import parse
from ragplane.knowledge.search import Retriever
from ragplane.knowledge.types import ChunkingPolicy, ParsedDocument
from tests.conftest import PgCluster

REFUND = b"""# Refund policy

## EU customers

Customers in the European Union may cancel any order within 14 days of delivery and
receive a full refund, including the original shipping cost. Refunds are paid to the
original payment method within 14 days of the cancellation.

## US customers

Customers in the United States may return unused items within 30 days for store credit.
"""

SHIPPING = b"""# Shipping

We ship from warehouses in Rotterdam and Reno. Standard delivery takes three to five
working days; express delivery takes one working day and costs 12 euros.
"""

SECURITY = b"""# Security

All customer data is encrypted at rest with AES-256 and in transit with TLS 1.3.
Access to production systems requires hardware security keys.
"""


class CountingEmbedder:
    """The real model, counting what it is asked to embed."""

    def __init__(self, inner: LocalEmbedder) -> None:
        self.inner = inner
        self.calls = 0
        self.texts = 0

    @property
    def model_id(self) -> str:
        return self.inner.model_id

    @property
    def dimensions(self) -> int:
        return self.inner.dimensions

    @property
    def max_tokens(self) -> int:
        return self.inner.max_tokens

    def count_tokens(self, text: str) -> int:
        return self.inner.count_tokens(text)

    async def embed(self, texts: Any) -> Any:
        self.calls += 1
        self.texts += len(texts)
        return await self.inner.embed(texts)


@pytest.fixture(scope="session")
def local_embedder() -> LocalEmbedder:
    return LocalEmbedder()


@pytest.fixture
def embedder(local_embedder: LocalEmbedder) -> CountingEmbedder:
    return CountingEmbedder(local_embedder)


@dataclass
class Kb:
    db: Database
    config: NamespaceConfig
    ingestor: Ingestor
    retriever: Retriever
    embedder: CountingEmbedder


async def _namespace(pg: PgCluster, tenant: str, name: str, **kwargs: Any) -> NamespaceConfig:
    owner = Database(pg.owner, max_size=1, name="owner")
    async with owner, owner.control() as s:
        return await upsert_namespace(s, tenant, name, embedding_model="all-minilm-l6-v2", **kwargs)


@pytest.fixture
async def kb(clean_db: PgCluster, embedder: CountingEmbedder) -> AsyncIterator[Kb]:
    config = await _namespace(clean_db, "tnt_alpha", "policies")
    async with Database(clean_db.app, max_size=2) as db:
        yield Kb(db, config, Ingestor(db, embedder), Retriever(db, embedder), embedder)


def docs(**files: bytes) -> list[ParsedDocument]:
    return [d for name, data in files.items() for d in parse(f"kb://docs/{name}.md", data)]


async def test_ingest_then_search_finds_the_right_section(kb: Kb) -> None:
    report = await kb.ingestor.ingest(kb.config, docs(refund=REFUND, shipping=SHIPPING))
    assert (report.added, report.updated, report.unchanged) == (2, 0, 0)
    assert report.chunks_written >= 2
    assert report.kb_version == 1
    result = await kb.retriever.search(kb.config, "What is the refund policy for EU customers?")
    top = result.chunks[0]
    assert top.source_uri == "kb://docs/refund.md"
    assert "European Union" in top.text
    assert top.heading_path[-1] == "EU customers"
    assert top.dense_score is not None
    assert top.lexical_score is not None
    # the span is the document's own text, so a citation can quote it
    async with kb.db.tenant("tnt_alpha") as s:
        row = await s.fetch_one("SELECT body FROM documents WHERE id = %s", (top.document_id,))
    assert row is not None
    assert row["body"][top.char_start : top.char_end] == top.text
    assert result.documents[0].source_uri == "kb://docs/refund.md"
    assert result.kb_version == 1


async def test_reingesting_an_unchanged_corpus_writes_and_embeds_nothing(kb: Kb) -> None:
    first = await kb.ingestor.ingest(kb.config, docs(refund=REFUND, shipping=SHIPPING))
    calls = kb.embedder.calls
    again = await kb.ingestor.ingest(kb.config, docs(refund=REFUND, shipping=SHIPPING))
    assert again.unchanged == 2
    assert (again.added, again.updated, again.chunks_written, again.embedding_calls) == (0, 0, 0, 0)
    assert kb.embedder.calls == calls
    assert again.kb_version is None  # nothing changed: the version stays
    async with kb.db.tenant("tnt_alpha") as s:
        n = await s.fetch_one("SELECT count(*) AS n FROM chunks")
        v = await s.fetch_one("SELECT kb_version FROM kb_state WHERE namespace = 'policies'")
    assert n == {"n": first.chunks_written}
    assert v == {"kb_version": first.kb_version}


async def test_a_changed_document_replaces_its_chunks(kb: Kb) -> None:
    await kb.ingestor.ingest(kb.config, docs(refund=REFUND, shipping=SHIPPING))
    changed = SHIPPING.replace(b"12 euros", b"15 euros")
    report = await kb.ingestor.ingest(kb.config, docs(refund=REFUND, shipping=changed))
    assert (report.updated, report.unchanged, report.added) == (1, 1, 0)
    assert report.kb_version == 2
    async with kb.db.tenant("tnt_alpha") as s:
        texts = [r["text"] for r in await s.fetch_all("SELECT text FROM chunks")]
    assert any("15 euros" in t for t in texts)
    assert not any("12 euros" in t for t in texts)


async def test_pruning_a_deleted_document_leaves_no_orphans(kb: Kb) -> None:
    await kb.ingestor.ingest(kb.config, docs(refund=REFUND, shipping=SHIPPING, security=SECURITY))
    report = await kb.ingestor.ingest(
        kb.config, docs(refund=REFUND, shipping=SHIPPING), prune_prefix="kb://docs/"
    )
    assert report.deleted == 1
    async with kb.db.tenant("tnt_alpha") as s:
        uris = {r["source_uri"] for r in await s.fetch_all("SELECT source_uri FROM documents")}
        orphans = await s.fetch_one(
            "SELECT count(*) AS n FROM chunks c WHERE NOT EXISTS "
            "(SELECT 1 FROM documents d WHERE d.id = c.document_id)"
        )
        security = await s.fetch_one("SELECT count(*) AS n FROM chunks WHERE text LIKE '%AES%'")
    assert uris == {"kb://docs/refund.md", "kb://docs/shipping.md"}
    assert orphans == {"n": 0}
    assert security == {"n": 0}


async def test_delete_document(kb: Kb) -> None:
    await kb.ingestor.ingest(kb.config, docs(refund=REFUND))
    result = await kb.retriever.search(kb.config, "refund")
    doc_id = result.documents[0].document_id
    assert await kb.ingestor.delete_document(kb.config, doc_id)
    assert not await kb.ingestor.delete_document(kb.config, doc_id)
    assert not await kb.ingestor.delete_document(kb.config, "not-a-uuid")
    after = await kb.retriever.search(kb.config, "refund")
    assert after.chunks == []


async def test_search_never_returns_another_tenants_chunks(kb: Kb, clean_db: PgCluster) -> None:
    beta = await _namespace(clean_db, "tnt_beta", "policies")
    await kb.ingestor.ingest(kb.config, docs(refund=REFUND))
    await kb.ingestor.ingest(beta, docs(security=SECURITY))
    alpha_hits = await kb.retriever.search(kb.config, "customer data encryption AES", top_k=50)
    beta_hits = await kb.retriever.search(beta, "refund within 14 days", top_k=50)
    assert {h.source_uri for h in alpha_hits.chunks} == {"kb://docs/refund.md"}
    assert {h.source_uri for h in beta_hits.chunks} == {"kb://docs/security.md"}


async def test_metadata_filters(kb: Kb) -> None:
    tagged = [
        ParsedDocument(d.source_uri, d.title, d.text, d.sections, d.media_type, {"team": team})
        for d, team in zip(
            docs(refund=REFUND, shipping=SHIPPING), ("billing", "logistics"), strict=True
        )
    ]
    await kb.ingestor.ingest(kb.config, tagged)
    result = await kb.retriever.search(kb.config, "refund", filters={"team": "logistics"})
    assert result.chunks
    assert {h.source_uri for h in result.chunks} == {"kb://docs/shipping.md"}


async def test_model_pin_refuses_another_model(kb: Kb, clean_db: PgCluster) -> None:
    other = await _namespace(clean_db, "tnt_alpha", "legacy")
    other = NamespaceConfig(other.tenant_id, other.name, "text-embedding-3-small", other.chunking)
    with pytest.raises(ModelMismatch, match="pinned to 'text-embedding-3-small'"):
        await kb.retriever.search(other, "refund")
    with pytest.raises(ModelMismatch):
        await kb.ingestor.ingest(other, docs(refund=REFUND))


async def test_chunking_policy_is_per_namespace(
    clean_db: PgCluster, embedder: CountingEmbedder
) -> None:
    small = await _namespace(
        clean_db, "tnt_alpha", "small", chunking=ChunkingPolicy(max_tokens=24, overlap_tokens=4)
    )
    big = await _namespace(clean_db, "tnt_alpha", "big")
    async with Database(clean_db.app, max_size=2) as db:
        ingestor = Ingestor(db, embedder)
        a = await ingestor.ingest(small, docs(refund=REFUND))
        b = await ingestor.ingest(big, docs(refund=REFUND))
    assert a.chunks_written > b.chunks_written


async def _stats_are_exact(db: Database, tenant: str) -> None:
    """kb_terms / kb_text_stats equal what the chunks say, recomputed from scratch."""
    async with db.tenant(tenant) as s:
        kept = await s.fetch_all(
            "SELECT namespace, embedding_model, lexeme, df FROM kb_terms ORDER BY 1, 2, 3"
        )
        truth = await s.fetch_all(
            "SELECT namespace, embedding_model, u.lexeme, count(*) AS df "
            "FROM chunks, unnest(tsv) AS u GROUP BY 1, 2, 3 ORDER BY 1, 2, 3"
        )
        kept_totals = await s.fetch_all(
            "SELECT namespace, embedding_model, chunks, tsv_length_total FROM kb_text_stats "
            "WHERE chunks > 0 ORDER BY 1, 2"
        )
        true_totals = await s.fetch_all(
            "SELECT namespace, embedding_model, count(*) AS chunks, "
            "sum(tsv_length) AS tsv_length_total FROM chunks WHERE tsv <> '' "
            "GROUP BY 1, 2 ORDER BY 1, 2"
        )
    assert kept == truth
    assert kept_totals == true_totals


async def test_bm25_statistics_stay_exact_through_every_change(kb: Kb) -> None:
    await kb.ingestor.ingest(kb.config, docs(refund=REFUND, shipping=SHIPPING, security=SECURITY))
    await _stats_are_exact(kb.db, "tnt_alpha")
    changed = SHIPPING.replace(b"Rotterdam", b"Antwerp")
    await kb.ingestor.ingest(
        kb.config, docs(refund=REFUND, shipping=changed), prune_prefix="kb://docs/"
    )
    await _stats_are_exact(kb.db, "tnt_alpha")
    result = await kb.retriever.search(kb.config, "refund")
    assert await kb.ingestor.delete_document(kb.config, result.documents[0].document_id)
    await _stats_are_exact(kb.db, "tnt_alpha")
    async with kb.db.tenant("tnt_alpha") as s:
        row = await s.fetch_one("SELECT count(*) AS n FROM kb_terms WHERE lexeme = 'rotterdam'")
        assert row == {"n": 0}
        row = await s.fetch_one("SELECT df FROM kb_terms WHERE lexeme = 'antwerp'")
        assert row == {"df": 1}
