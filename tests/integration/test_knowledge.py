"""Ingestion and hybrid retrieval on a real Postgres with the real embedding model."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest

from ragplane.control.namespaces import NamespaceConfig, upsert_namespace
from ragplane.data import Database
from ragplane.errors import EmbeddingError, IngestError, ModelMismatch
from ragplane.knowledge.chunking import chunk
from ragplane.knowledge.embedder import LocalEmbedder
from ragplane.knowledge.ingest import Ingestor, IngestProgress, embedding_input, model_tokens
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
    """kb_terms / kb_postings / kb_text_stats equal what the chunks say, recomputed from
    scratch."""
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
        postings = await s.fetch_all(
            "SELECT namespace, embedding_model, lexeme, chunk_id, tf, dl FROM kb_postings "
            "ORDER BY 1, 2, 3, 4"
        )
        true_postings = await s.fetch_all(
            "SELECT namespace, embedding_model, u.lexeme, id AS chunk_id, "
            "coalesce(array_length(u.positions, 1), 1) AS tf, tsv_length AS dl "
            "FROM chunks, unnest(tsv) AS u ORDER BY 1, 2, 3, 4"
        )
    assert kept == truth
    assert kept_totals == true_totals
    assert postings == true_postings


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


async def test_deleting_chunks_touches_only_their_terms(kb: Kb) -> None:
    """The statistics trigger updates the deleted chunks' lexemes by key; it does not
    sweep the vocabulary (a stray zero row of another lexeme is left alone)."""
    await kb.ingestor.ingest(kb.config, docs(refund=REFUND, shipping=SHIPPING))
    async with kb.db.tenant("tnt_alpha") as s:
        await s.execute(
            "INSERT INTO kb_terms (tenant_id, namespace, embedding_model, lexeme, df) "
            "VALUES ('tnt_alpha', 'elsewhere', 'all-minilm-l6-v2', 'stray', 0)"
        )
    result = await kb.retriever.search(kb.config, "Rotterdam warehouses")
    shipping = next(d for d in result.documents if d.source_uri.endswith("shipping.md"))
    assert await kb.ingestor.delete_document(kb.config, shipping.document_id)
    async with kb.db.tenant("tnt_alpha") as s:
        stray = await s.fetch_one("SELECT df FROM kb_terms WHERE lexeme = 'stray'")
        gone = await s.fetch_one("SELECT count(*) AS n FROM kb_terms WHERE lexeme = 'rotterdam'")
        await s.execute("DELETE FROM kb_terms WHERE lexeme = 'stray'")
    assert stray == {"df": 0}
    assert gone == {"n": 0}
    await _stats_are_exact(kb.db, "tnt_alpha")


# -- batches, the write pipeline and failures in the middle of a run -----------------------

SMALL = ChunkingPolicy(max_tokens=24, overlap_tokens=4)


def notes(
    n: int, *, edited: int | None = None, poisoned: int | None = None
) -> list[ParsedDocument]:
    """``n`` small Markdown documents, several chunks each under SMALL."""
    out = []
    for i in range(n):
        body = (
            f"# Note {i}\n\nNote {i} records how warehouse {i} ships parcels. "
            f"Orders placed before noon leave the same day from dock {i * 3}. "
            f"Returns to warehouse {i} take up to {i + 5} working days to process."
        )
        if i == edited:
            body += " This paragraph was edited."
        if i == poisoned:
            body += " POISON"
        out.extend(parse(f"kb://notes/{i:02d}.md", body.encode()))
    return out


class RefusingEmbedder(CountingEmbedder):
    """Its tokenizer refuses any text containing POISON, so that document cannot be chunked."""

    def count_tokens(self, text: str) -> int:
        if "POISON" in text:
            raise IngestError("invalid_record", "the tokenizer refused it")
        return super().count_tokens(text)


class FailingEmbedder(CountingEmbedder):
    """The real model, except that embedding call number ``fail_on`` fails."""

    def __init__(self, inner: LocalEmbedder, fail_on: int) -> None:
        super().__init__(inner)
        self.fail_on = fail_on

    async def embed(self, texts: Any) -> Any:
        if self.calls + 1 == self.fail_on:
            self.calls += 1
            raise EmbeddingError("injected failure")
        return await super().embed(texts)


class StallingEmbedder(CountingEmbedder):
    """Embeds once; the second call announces itself and never returns."""

    def __init__(self, inner: LocalEmbedder) -> None:
        super().__init__(inner)
        self.stalled = asyncio.Event()

    async def embed(self, texts: Any) -> Any:
        if self.calls == 1:
            self.calls += 1
            self.stalled.set()
            await asyncio.Event().wait()
        return await super().embed(texts)


def committed_documents(pg: PgCluster, tenant: str) -> int:
    """Documents visible to another connection, i.e. committed."""
    with psycopg.connect(pg.app, autocommit=True) as conn:
        conn.execute("SELECT set_config('app.tenant_id', %s, false)", (tenant,))
        row = conn.execute("SELECT count(*) FROM documents").fetchone()
    assert row is not None
    return int(row[0])


async def _whole_documents(db: Database, tenant: str, embedder: CountingEmbedder) -> set[str]:
    """The stored documents, after checking that each has exactly the chunks its text
    gives (none missing, none extra, none from an older version)."""
    async with db.tenant(tenant) as s:
        documents = await s.fetch_all("SELECT id, source_uri, body FROM documents")
        chunks = await s.fetch_all("SELECT document_id, ordinal, text FROM chunks")
    by_doc: dict[Any, list[tuple[int, str]]] = {}
    for c in chunks:
        by_doc.setdefault(c["document_id"], []).append((c["ordinal"], c["text"]))
    assert set(by_doc) <= {d["id"] for d in documents}  # no orphans
    for d in documents:
        (doc,) = parse(d["source_uri"], d["body"].encode())
        expected = [(c.ordinal, c.text) for c in chunk(doc, SMALL, embedder.count_tokens)]
        assert sorted(by_doc.get(d["id"], [])) == expected, d["source_uri"]
    return {d["source_uri"] for d in documents}


async def test_batches_commit_in_order_and_progress_counts_only_committed_documents(
    clean_db: PgCluster, embedder: CountingEmbedder
) -> None:
    config = await _namespace(clean_db, "tnt_alpha", "notes", chunking=SMALL)
    progress: list[tuple[IngestProgress, int]] = []
    # one connection is enough: the ingestor never holds two at once
    async with Database(clean_db.app, max_size=1) as db:
        ingestor = Ingestor(db, embedder, batch_documents=3)
        report = await ingestor.ingest(
            config,
            notes(10),
            on_progress=lambda p: progress.append((p, committed_documents(clean_db, "tnt_alpha"))),
        )
        assert (report.added, report.updated, report.unchanged, report.errors) == (10, 0, 0, [])
        assert report.embedding_calls == embedder.calls == 4
        assert report.kb_version == 4
        assert [p.documents_done for p, _ in progress] == [3, 6, 9, 10]
        assert all(p.documents_done == committed for p, committed in progress)
        assert progress[-1][0].chunks_written == report.chunks_written > 10
        assert await _whole_documents(db, "tnt_alpha", embedder) == {
            f"kb://notes/{i:02d}.md" for i in range(10)
        }
        await _stats_are_exact(db, "tnt_alpha")

        # tokens: what the model processed, i.e. title and heading path too, and the
        # special tokens, not just the chunk text
        async with db.tenant("tnt_alpha") as s:
            rows = await s.fetch_all(
                "SELECT d.title, c.heading_path, c.text, c.token_count FROM chunks c "
                "JOIN documents d ON d.id = c.document_id"
            )
        assert report.texts_embedded == len(rows) == report.chunks_written
        assert report.tokens_embedded == sum(
            model_tokens(embedder, embedding_input(r["title"], tuple(r["heading_path"]), r["text"]))
            for r in rows
        )
        assert report.tokens_embedded > sum(r["token_count"] for r in rows)

        calls = embedder.calls
        again = await ingestor.ingest(config, notes(10, edited=4))
        assert (again.added, again.updated, again.unchanged) == (0, 1, 9)
        assert embedder.calls == calls + 1
        assert again.kb_version == 5
        await _whole_documents(db, "tnt_alpha", embedder)
        await _stats_are_exact(db, "tnt_alpha")


async def test_a_document_repeated_in_the_next_batch_is_judged_against_the_one_before(
    clean_db: PgCluster, embedder: CountingEmbedder
) -> None:
    config = await _namespace(clean_db, "tnt_alpha", "notes", chunking=SMALL)
    first, second = notes(2)
    (edited,) = notes(2, edited=0)[:1]
    async with Database(clean_db.app, max_size=2) as db:
        ingestor = Ingestor(db, embedder, batch_documents=2)
        same = await ingestor.ingest(config, [first, second, first])
        assert (same.added, same.updated, same.unchanged) == (2, 0, 1)
        assert same.embedding_calls == 1
        changed = await ingestor.ingest(config, [second, first, edited])
        assert (changed.added, changed.updated, changed.unchanged) == (0, 1, 2)
        async with db.tenant("tnt_alpha") as s:
            row = await s.fetch_one(
                "SELECT body FROM documents WHERE source_uri = %s", (first.source_uri,)
            )
        assert row is not None
        assert row["body"].endswith("This paragraph was edited.")
        await _whole_documents(db, "tnt_alpha", embedder)
        await _stats_are_exact(db, "tnt_alpha")


async def test_a_document_that_cannot_be_chunked_fails_alone(
    clean_db: PgCluster, local_embedder: LocalEmbedder
) -> None:
    config = await _namespace(clean_db, "tnt_alpha", "notes", chunking=SMALL)
    refusing = RefusingEmbedder(local_embedder)
    progress: list[int] = []
    async with Database(clean_db.app, max_size=2) as db:
        ingestor = Ingestor(db, refusing, batch_documents=2)
        report = await ingestor.ingest(
            config, notes(7, poisoned=3), on_progress=lambda p: progress.append(p.documents_done)
        )
        assert [(e.source_uri, e.code) for e in report.errors] == [
            ("kb://notes/03.md", "invalid_record")
        ]
        assert (report.added, report.unchanged) == (6, 0)
        assert progress == [2, 4, 6, 7]
        uris = await _whole_documents(db, "tnt_alpha", refusing)
    assert uris == {f"kb://notes/{i:02d}.md" for i in range(7) if i != 3}


async def test_an_embedder_failure_mid_run_leaves_whole_batches_and_a_rerun_finishes(
    clean_db: PgCluster, local_embedder: LocalEmbedder
) -> None:
    config = await _namespace(clean_db, "tnt_alpha", "notes", chunking=SMALL)
    failing = FailingEmbedder(local_embedder, fail_on=3)
    progress: list[int] = []
    async with Database(clean_db.app, max_size=2) as db:
        ingestor = Ingestor(db, failing, batch_documents=2)
        with pytest.raises(EmbeddingError, match="injected failure"):
            await ingestor.ingest(
                config, notes(8), on_progress=lambda p: progress.append(p.documents_done)
            )
        # the batch being written when the third call failed was finished, and reported
        assert progress == [2, 4]
        assert await _whole_documents(db, "tnt_alpha", failing) == {
            f"kb://notes/{i:02d}.md" for i in range(4)
        }
        await _stats_are_exact(db, "tnt_alpha")
        async with db.tenant("tnt_alpha") as s:
            version = await s.fetch_one("SELECT kb_version FROM kb_state")
        assert version == {"kb_version": 2}

        counting = CountingEmbedder(local_embedder)
        rerun = await Ingestor(db, counting, batch_documents=2).ingest(config, notes(8))
        assert (rerun.added, rerun.updated, rerun.unchanged) == (4, 0, 4)
        assert counting.calls == 2
        assert len(await _whole_documents(db, "tnt_alpha", counting)) == 8
        await _stats_are_exact(db, "tnt_alpha")


async def test_a_failing_source_still_commits_the_batch_already_embedded(
    clean_db: PgCluster, embedder: CountingEmbedder
) -> None:
    config = await _namespace(clean_db, "tnt_alpha", "notes", chunking=SMALL)

    async def source() -> AsyncIterator[ParsedDocument]:
        for doc in notes(5):
            yield doc
        raise RuntimeError("the source broke")

    progress: list[int] = []
    async with Database(clean_db.app, max_size=2) as db:
        ingestor = Ingestor(db, embedder, batch_documents=2)
        with pytest.raises(RuntimeError, match="the source broke"):
            await ingestor.ingest(
                config, source(), on_progress=lambda p: progress.append(p.documents_done)
            )
        assert progress == [2, 4]
        assert len(await _whole_documents(db, "tnt_alpha", embedder)) == 4
        await _stats_are_exact(db, "tnt_alpha")


async def test_cancelling_a_run_while_a_batch_is_written_leaves_no_half_batch(
    clean_db: PgCluster, local_embedder: LocalEmbedder
) -> None:
    config = await _namespace(clean_db, "tnt_alpha", "notes", chunking=SMALL)
    stalling = StallingEmbedder(local_embedder)
    async with Database(clean_db.app, max_size=2) as db:
        ingestor = Ingestor(db, stalling, batch_documents=2)
        run = asyncio.create_task(ingestor.ingest(config, notes(6)))
        await stalling.stalled.wait()  # batch 1 is being (or has been) written
        run.cancel()
        with pytest.raises(asyncio.CancelledError):
            await run
        assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("ingest write")]
        uris = await _whole_documents(db, "tnt_alpha", stalling)
        assert uris in (set(), {"kb://notes/00.md", "kb://notes/01.md"})
        await _stats_are_exact(db, "tnt_alpha")


async def test_search_reads_a_small_share_exactly_and_walks_the_index_for_a_large_one(
    kb: Kb,
) -> None:
    """The statement chooses by the namespace's chunk count against the table's. An index
    scan that may return a single row (``ef_search`` 1, iterative scans off) finds one
    chunk, exact search under the same settings finds every chunk; both paths rank alike
    otherwise."""
    await kb.ingestor.ingest(kb.config, docs(refund=REFUND, shipping=SHIPPING, security=SECURITY))
    async with kb.db.tenant("tnt_alpha") as s:
        row = await s.fetch_one("SELECT count(*) AS n FROM chunks")
    assert row is not None
    total = int(row["n"])
    assert total >= 4
    one_row = {"hnsw.ef_search": "1", "hnsw.iterative_scan": "off"}
    # exact when n^2 < cost * k * N (N: the table's rows, at least n)
    exact = Retriever(kb.db, kb.embedder, hnsw_visit_cost=total / 50 + 0.01)
    exact._settings |= one_row
    on_index = Retriever(kb.db, kb.embedder, hnsw_visit_cost=0)
    # a table this small is cheaper to sort than to walk: make the planner take the index
    on_index._settings |= one_row | {"enable_seqscan": "off", "enable_sort": "off"}
    query = "How long does express delivery take?"
    found = await exact.candidates(kb.config, query, k=50, mode="dense")
    assert len(found.rows) == total
    found = await on_index.candidates(kb.config, query, k=50, mode="dense")
    assert len(found.rows) == 1
    # as shipped, both paths return the same ranking on a corpus this small
    served = [
        await Retriever(kb.db, kb.embedder, hnsw_visit_cost=cost).search(kb.config, query)
        for cost in (0, 1e9)
    ]
    assert [h.chunk_id for h in served[0].chunks] == [h.chunk_id for h in served[1].chunks]
    assert [d.document_id for d in served[0].documents] == [
        d.document_id for d in served[1].documents
    ]
    assert served[0].documents[0].source_uri == "kb://docs/shipping.md"
