"""Switching a namespace's embedding model, on the real Postgres with the real model.

The second model is the bundled network with CLS pooling (``all-minilm-l6-v2-int8-cls``):
its vectors differ from mean pooling's, so a chunk's stored vector tells which model
embedded it. Switches run on the real queue (an in-process worker) or, to pause one
between batches, through :class:`ModelSwitcher` directly.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import numpy.typing as npt
import pytest

from ragplane.config import WorkerSettings
from ragplane.control.namespaces import NamespaceConfig, get_namespace
from ragplane.data import Database
from ragplane.errors import ModelMismatch
from ragplane.knowledge.ingest import Ingestor, embedding_input
from ragplane.knowledge.jobrunner import IngestRunner
from ragplane.knowledge.jobs import TRANSIENT, IngestJob, Upload, get_job
from ragplane.knowledge.models import EmbedderRegistry, ModelSwitched
from ragplane.knowledge.parsers import parse
from ragplane.knowledge.search import Retriever
from ragplane.knowledge.switch import SwitchRefused, namespace_state, request_switch
from ragplane.knowledge.switchrunner import ModelSwitcher, SwitchProgress
from ragplane.knowledge.types import Embedder, ParsedDocument
from ragplane.platform import Platform
from tests.conftest import PgCluster, make_settings
from tests.integration.test_ingest_jobs import KB, REFUND, SHIPPING, TENANT, drain, make_namespace

OTHER = "tnt_beta"
MEAN = "all-minilm-l6-v2"
CLS = "all-minilm-l6-v2-int8-cls"

SECURITY = (
    b"# Security\n\nCustomer data is encrypted at rest with AES-256 and in transit with TLS.\n"
)
CORPUS = {
    "refund": REFUND,
    "shipping": SHIPPING,
    "security": SECURITY,
    "warranty": b"# Warranty\n\nElectronics carry a two-year warranty against faults.\n",
    "payment": b"# Payment\n\nWe accept credit cards, PayPal and bank transfers in euros.\n",
    "privacy": b"# Privacy\n\nWe never sell personal data; you may request its deletion.\n",
    "support": b"# Support\n\nThe help desk answers chat messages from 8:00 to 20:00 CET.\n",
}
REFUND_V2 = (
    b"# Refund policy\n\nRefunds for damaged parcels are issued within 30 days, in vouchers.\n"
)


def docs(**files: bytes) -> list[ParsedDocument]:
    return [d for name, data in files.items() for d in parse(f"kb://docs/{name}.md", data)]


@pytest.fixture
async def platform(clean_db: PgCluster, tmp_path: Path) -> AsyncIterator[Platform]:
    settings = make_settings(
        clean_db, tmp_path, worker=WorkerSettings(poll_s=0.2, batch_documents=2)
    )
    p = Platform(settings)
    await p.start()
    try:
        yield p
    finally:
        await p.stop()


@pytest.fixture
async def ns(clean_db: PgCluster, platform: Platform) -> NamespaceConfig:
    config = await make_namespace(clean_db)
    assert platform.ingestor is not None
    await platform.ingestor.ingest(config, docs(**CORPUS))
    return config


def db_of(platform: Platform) -> Database:
    assert platform.db is not None
    return platform.db


def embedders_of(platform: Platform) -> EmbedderRegistry:
    assert platform.embedders is not None
    return platform.embedders


async def pinned(platform: Platform, tenant: str = TENANT, name: str = KB) -> NamespaceConfig:
    """The namespace as the control plane says now (a fresh read)."""
    async with db_of(platform).control() as s:
        return await get_namespace(s, tenant, name)


async def switch(platform: Platform, config: NamespaceConfig, model: str = CLS) -> IngestJob:
    assert platform.ingest_queue is not None
    return await request_switch(
        platform.ingest_queue, db_of(platform), config, model, embedders_of(platform)
    )


async def rows(platform: Platform, query: str, tenant: str = TENANT) -> list[dict[str, Any]]:
    async with db_of(platform).tenant(tenant) as s:
        return [dict(r) for r in await s.fetch_all(query)]


async def chunks_per_model(platform: Platform, tenant: str = TENANT) -> dict[str, int]:
    found = await rows(
        platform, "SELECT embedding_model, count(*) AS n FROM chunks GROUP BY 1", tenant
    )
    return {r["embedding_model"]: r["n"] for r in found}


async def job_of(platform: Platform, job: IngestJob, tenant: str = TENANT) -> IngestJob:
    found = await get_job(db_of(platform), tenant, job.id)
    assert found is not None
    return found


async def assert_every_document_embedded_with(platform: Platform, model: str) -> None:
    """Each document's chunks are of ``model`` only, one per ordinal, and their stored
    vectors are that model's embedding of the chunk (not another model's)."""
    found = await rows(
        platform,
        "SELECT d.title, c.heading_path, c.text, c.embedding_model, c.embedding, "
        "c.document_id, c.ordinal FROM chunks c JOIN documents d ON d.id = c.document_id "
        "ORDER BY c.document_id, c.ordinal",
    )
    assert found
    assert {r["embedding_model"] for r in found} == {model}
    assert len({(r["document_id"], r["ordinal"]) for r in found}) == len(found)
    embedders = embedders_of(platform)
    inputs = [embedding_input(r["title"], tuple(r["heading_path"]), r["text"]) for r in found]
    for other in embedders.model_ids:
        embedder = embedders.find(other)
        assert embedder is not None
        expected = await embedder.embed(inputs)
        stored = np.stack([r["embedding"].to_numpy() for r in found])
        same = np.allclose(stored, expected, atol=1e-4)
        assert same == (other == model), (other, model)
    documents = await rows(platform, "SELECT id FROM documents")
    assert {r["id"] for r in documents} == {r["document_id"] for r in found}


async def test_a_switch_reembeds_swaps_atomically_and_removes_the_old_chunks(
    platform: Platform, ns: NamespaceConfig
) -> None:
    before = await namespace_state(db_of(platform), TENANT, KB)
    assert before is not None
    assert (before.active_model, before.switching_to) == (MEAN, None)
    old_chunks = (await chunks_per_model(platform))[MEAN]

    job = await switch(platform, ns)
    assert (job.kind, job.status, job.source_model, job.target_model) == (
        "switch_model",
        "queued",
        MEAN,
        CLS,
    )
    assert job.documents_total == len(CORPUS)
    during = await namespace_state(db_of(platform), TENANT, KB)
    assert during is not None
    assert (during.active_model, during.switching_to, during.switch_job_id) == (MEAN, CLS, job.id)

    await drain(platform)

    done = await job_of(platform, job)
    assert done.status == "succeeded", done.errors
    assert done.phase == "done"
    assert (done.documents_total, done.documents_done) == (len(CORPUS), len(CORPUS))
    assert done.chunks_written == old_chunks
    assert done.tokens_embedded > 0
    after = await namespace_state(db_of(platform), TENANT, KB)
    assert after is not None
    assert (after.active_model, after.switching_to, after.switch_job_id) == (CLS, None, None)
    assert after.kb_version == before.kb_version + 1
    assert (await pinned(platform)).embedding_model == CLS
    assert await chunks_per_model(platform) == {CLS: old_chunks}
    await assert_every_document_embedded_with(platform, CLS)
    # BM25 statistics follow the chunks: only the new model's remain
    stats = await rows(platform, "SELECT embedding_model, chunks FROM kb_text_stats")
    assert {r["embedding_model"]: r["chunks"] for r in stats if r["chunks"]} == {CLS: old_chunks}
    assert {r["embedding_model"] for r in await rows(platform, "SELECT * FROM kb_terms")} == {CLS}

    # queries are answered with the new model, from the new pin or a stale one
    retriever = Retriever(db_of(platform), embedders_of(platform))
    for config in (await pinned(platform), ns):
        result = await retriever.search(config, "EU customers cancel their order refund")
        assert result.embedding_model == CLS
        assert result.kb_version == after.kb_version
        assert result.chunks
        assert "kb://docs/refund.md" in {d.source_uri for d in result.documents[:3]}
    # a retriever that cannot embed with the new model is refused, with the reason
    mean_only = Retriever(db_of(platform), embedders_of(platform).default)
    with pytest.raises(ModelMismatch, match=f"answered with '{CLS}', not '{MEAN}'"):
        await mean_only.search(ns, "refund")
    # ingestion after the swap embeds with the new model; a stale run is told to rerun
    assert platform.ingestor is not None
    with pytest.raises(ModelSwitched, match="run it again"):
        await platform.ingestor.ingest(ns, docs(returns=b"# Returns\n\nReturn labels are free.\n"))
    report = await platform.ingestor.ingest(
        await pinned(platform), docs(returns=b"# Returns\n\nReturn labels are free.\n")
    )
    assert report.added == 1
    await assert_every_document_embedded_with(platform, CLS)


class Pause:
    """An ``on_batch`` hook that holds the switch after its first committed batch."""

    def __init__(self) -> None:
        self.paused = asyncio.Event()
        self.resume = asyncio.Event()
        self.seen: list[SwitchProgress] = []

    async def __call__(self, progress: SwitchProgress) -> None:
        self.seen.append(progress)
        if len(self.seen) == 1:
            self.paused.set()
            await self.resume.wait()


def switcher(platform: Platform, pause: Pause, **kwargs: Any) -> ModelSwitcher:
    return ModelSwitcher(
        db_of(platform), embedders_of(platform), batch_documents=2, on_batch=pause, **kwargs
    )


async def test_queries_keep_working_and_changes_made_during_a_switch_are_carried_over(
    platform: Platform, ns: NamespaceConfig
) -> None:
    assert platform.ingestor is not None
    retriever = Retriever(db_of(platform), embedders_of(platform))
    pause = Pause()
    job = await switch(platform, ns)
    running = asyncio.create_task(switcher(platform, pause).run(TENANT, job.id))
    answers: list[tuple[str, bool]] = []
    stop = asyncio.Event()

    async def keep_searching() -> None:
        while not stop.is_set():
            result = await retriever.search(await pinned(platform), "encryption at rest AES")
            answers.append(
                (result.embedding_model, result.documents[0].source_uri.endswith("security.md"))
            )
            await asyncio.sleep(0)

    searching = asyncio.create_task(keep_searching())
    with anyio.fail_after(60):
        await pause.paused.wait()
    # mid-switch: the job has written chunks of the new model for some documents
    assert (await chunks_per_model(platform)).get(CLS, 0) > 0
    progress = await job_of(platform, job)
    assert (progress.status, progress.phase) == ("running", "embedding")
    assert 0 < progress.documents_done < len(CORPUS)
    # queries are answered with the old model
    result = await retriever.search(ns, "What is the refund policy for EU customers?")
    assert result.embedding_model == MEAN
    assert result.documents[0].source_uri == "kb://docs/refund.md"
    # the corpus changes while the switch runs: an update, an addition, a deletion
    report = await platform.ingestor.ingest(
        ns, docs(refund=REFUND_V2, returns=b"# Returns\n\nReturn labels are printed for free.\n")
    )
    assert (report.added, report.updated) == (1, 1)
    shipping = await rows(
        platform, "SELECT id::text FROM documents WHERE source_uri LIKE '%shipping%'"
    )
    assert await platform.ingestor.delete_document(ns, shipping[0]["id"])
    result = await retriever.search(ns, "damaged parcel vouchers")
    assert result.embedding_model == MEAN
    assert result.documents[0].source_uri == "kb://docs/refund.md"
    assert "vouchers" in result.documents[0].best.text

    pause.resume.set()
    with anyio.fail_after(60):
        assert await running == "succeeded"
    stop.set()
    await searching

    # every query during the switch had an answer, and the right one
    assert answers
    assert all(top for _, top in answers)
    assert {m for m, _ in answers} <= {MEAN, CLS}
    assert answers[-1][0] == CLS
    # after the swap: every current document, and only those, under the new model
    await assert_every_document_embedded_with(platform, CLS)
    uris = {r["source_uri"] for r in await rows(platform, "SELECT source_uri FROM documents")}
    assert uris == {f"kb://docs/{n}.md" for n in CORPUS if n != "shipping"} | {
        "kb://docs/returns.md"
    }
    refund = await rows(
        platform,
        "SELECT c.text FROM chunks c JOIN documents d ON d.id = c.document_id "
        "WHERE d.source_uri = 'kb://docs/refund.md'",
    )
    assert refund
    assert all("European Union" not in r["text"] for r in refund)
    assert any("vouchers" in r["text"] for r in refund)
    result = await retriever.search(await pinned(platform), "damaged parcel vouchers")
    assert (result.embedding_model, result.documents[0].source_uri) == (CLS, "kb://docs/refund.md")


async def test_a_document_changed_after_the_last_catch_up_is_embedded_by_the_swap(
    platform: Platform, ns: NamespaceConfig
) -> None:
    """No catch-up rounds: a document updated mid-switch (after the job embedded it) is
    found missing under the namespace lock and embedded in the swap's transaction."""
    assert platform.ingestor is not None
    pause = Pause()
    job = await switch(platform, ns)
    running = asyncio.create_task(switcher(platform, pause, catch_up_rounds=0).run(TENANT, job.id))
    with anyio.fail_after(60):
        await pause.paused.wait()
    embedded = await rows(
        platform,
        "SELECT DISTINCT d.source_uri FROM documents d JOIN chunks c ON c.document_id = d.id "
        f"WHERE c.embedding_model = '{CLS}'",
    )
    name = embedded[0]["source_uri"].removeprefix("kb://docs/").removesuffix(".md")
    changed = CORPUS[name] + b"\nThis paragraph was added while the model switch ran.\n"
    assert (await platform.ingestor.ingest(ns, docs(**{name: changed}))).updated == 1
    pause.resume.set()
    with anyio.fail_after(60):
        assert await running == "succeeded"
    done = await job_of(platform, job)
    assert done.documents_done == len(CORPUS) + 1  # the changed document, twice
    await assert_every_document_embedded_with(platform, CLS)
    texts = await rows(
        platform,
        "SELECT c.text FROM chunks c JOIN documents d ON d.id = c.document_id "
        f"WHERE d.source_uri = 'kb://docs/{name}.md'",
    )
    assert any("while the model switch ran" in r["text"] for r in texts)


async def test_switches_that_cannot_start_are_refused(
    platform: Platform, ns: NamespaceConfig
) -> None:
    with pytest.raises(SwitchRefused, match="no embedding model 'text-embedding-3-small'") as e:
        await switch(platform, ns, "text-embedding-3-small")
    assert e.value.code == "unknown_embedding_model"
    with pytest.raises(SwitchRefused, match="already answers with") as e:
        await switch(platform, ns, MEAN)
    assert e.value.code == "model_already_active"
    first = await switch(platform, ns)
    with pytest.raises(SwitchRefused, match="already switching") as e:
        await switch(platform, ns)
    assert (e.value.code, e.value.job_id) == ("switch_in_progress", first.id)
    # only one job was queued, and the namespace still answers with its model
    jobs = await rows(platform, "SELECT id::text FROM ingest_jobs")
    assert jobs == [{"id": first.id}]
    state = await namespace_state(db_of(platform), TENANT, KB)
    assert state is not None
    assert state.active_model == MEAN


async def test_the_model_pin_still_refuses_another_model(
    platform: Platform, ns: NamespaceConfig
) -> None:
    """A namespace pinned to a model this process cannot run is refused by ingestion and
    search alike, with the reason; the switch machinery changes nothing about that."""
    other = NamespaceConfig(ns.tenant_id, ns.name, "text-embedding-3-small", ns.chunking)
    retriever = Retriever(db_of(platform), embedders_of(platform))
    with pytest.raises(ModelMismatch, match="pinned to 'text-embedding-3-small'"):
        await retriever.search(other, "refund")
    assert platform.ingestor is not None
    with pytest.raises(ModelMismatch, match="pinned to 'text-embedding-3-small'"):
        await platform.ingestor.ingest(other, docs(refund=REFUND))
    # a config naming the other local model while the namespace answers with its pinned
    # one: refused, and nothing is written (a rerun reads the real pin)
    before = await chunks_per_model(platform)
    cls_config = NamespaceConfig(ns.tenant_id, ns.name, CLS, ns.chunking)
    with pytest.raises(ModelSwitched, match=f"answered with '{MEAN}'"):
        await platform.ingestor.ingest(cls_config, docs(refund=REFUND_V2))
    assert await chunks_per_model(platform) == before == {MEAN: before[MEAN]}


async def test_a_switch_of_one_tenant_leaves_another_tenant_untouched(
    platform: Platform, ns: NamespaceConfig, clean_db: PgCluster
) -> None:
    beta = await make_namespace(clean_db, OTHER, KB)  # same namespace name, other tenant
    assert platform.ingestor is not None
    await platform.ingestor.ingest(beta, docs(security=SECURITY, shipping=SHIPPING))
    beta_before = await namespace_state(db_of(platform), OTHER, KB)
    beta_chunks = await chunks_per_model(platform, OTHER)
    job = await switch(platform, ns)
    await drain(platform)
    assert (await job_of(platform, job)).status == "succeeded"
    assert await get_job(db_of(platform), OTHER, job.id) is None  # not visible to beta

    assert await namespace_state(db_of(platform), OTHER, KB) == beta_before
    assert await chunks_per_model(platform, OTHER) == beta_chunks == {MEAN: beta_chunks[MEAN]}
    assert (await pinned(platform, OTHER)).embedding_model == MEAN
    result = await Retriever(db_of(platform), embedders_of(platform)).search(
        await pinned(platform, OTHER), "encryption AES"
    )
    assert result.embedding_model == MEAN
    assert {d.source_uri for d in result.documents} <= {
        "kb://docs/security.md",
        "kb://docs/shipping.md",
    }
    assert (await pinned(platform)).embedding_model == CLS


class SwitchWhileEmbedding:
    """The old model's embedder, which runs a whole switch to the new model the first
    time it is asked to embed: the ingest run that called it meets the swap."""

    def __init__(self, inner: Embedder, switch: Callable[[], Awaitable[None]]) -> None:
        self.inner = inner
        self._switch: Callable[[], Awaitable[None]] | None = switch

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

    async def embed(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        if self._switch is not None:
            switch, self._switch = self._switch, None
            await switch()
        return await self.inner.embed(texts)


async def test_an_ingest_job_that_meets_the_swap_writes_nothing_old_and_its_retry_succeeds(
    platform: Platform, ns: NamespaceConfig
) -> None:
    registry = embedders_of(platform)
    mean, cls = registry.find(MEAN), registry.find(CLS)
    assert mean is not None
    assert cls is not None
    switch_job = await switch(platform, ns)

    async def run_switch() -> None:
        assert await ModelSwitcher(db_of(platform), registry).run(TENANT, switch_job.id) == (
            "succeeded"
        )

    ingestor = Ingestor(
        db_of(platform), EmbedderRegistry([SwitchWhileEmbedding(mean, run_switch), cls])
    )
    runner = IngestRunner(db_of(platform), ingestor, max_upload_bytes=4096, max_attempts=3)
    assert platform.ingest_queue is not None
    job = await platform.ingest_queue.enqueue(
        db_of(platform), ns, [Upload("kb://docs/refund.md", REFUND_V2)], max_upload_bytes=4096
    )
    with pytest.raises(ModelSwitched, match=f"answered with '{CLS}'") as raised:
        await runner.run(TENANT, job.id)
    # transient: the job stays running (its task is retried); nothing of the old model
    assert isinstance(raised.value, TRANSIENT)
    assert (await job_of(platform, job)).status == "running"
    assert set(await chunks_per_model(platform)) == {CLS}
    await assert_every_document_embedded_with(platform, CLS)
    # the retry reads the new pin and embeds with the new model
    assert await runner.run(TENANT, job.id) == "succeeded"
    await assert_every_document_embedded_with(platform, CLS)
    refund = await rows(
        platform,
        "SELECT c.text FROM chunks c JOIN documents d ON d.id = c.document_id "
        "WHERE d.source_uri = 'kb://docs/refund.md'",
    )
    assert any("vouchers" in r["text"] for r in refund)


async def test_a_switch_that_fails_for_good_leaves_the_namespace_on_its_model(
    platform: Platform, ns: NamespaceConfig
) -> None:
    registry = embedders_of(platform)
    retriever = Retriever(db_of(platform), registry)
    # a switch whose worker kept dying gives up ...
    job = await switch(platform, ns)
    async with db_of(platform).tenant(TENANT) as s:
        await s.execute(
            "UPDATE ingest_jobs SET attempts = 3, status = 'running' WHERE id = %s", (job.id,)
        )
    assert await ModelSwitcher(db_of(platform), registry, max_attempts=3).run(TENANT, job.id) == (
        "failed"
    )
    # ... and one that failed unexpectedly on its last attempt is recorded as failed
    assert await switch(platform, ns)  # allowed again: the namespace stopped switching
    state = await namespace_state(db_of(platform), TENANT, KB)
    assert state is not None
    assert state.switch_job_id is not None
    await ModelSwitcher(db_of(platform), registry).fail(
        TENANT, state.switch_job_id, RuntimeError("boom")
    )
    jobs = await rows(platform, "SELECT status, errors FROM ingest_jobs ORDER BY created_at")
    assert [(j["status"], [e["code"] for e in j["errors"]]) for j in jobs] == [
        ("failed", ["gave_up"]),
        ("failed", ["internal_error"]),
    ]
    assert "RuntimeError: boom" in jobs[1]["errors"][0]["message"]
    state = await namespace_state(db_of(platform), TENANT, KB)
    assert state is not None
    assert (state.active_model, state.switching_to, state.switch_job_id) == (MEAN, None, None)
    assert (await pinned(platform)).embedding_model == MEAN
    result = await retriever.search(ns, "What is the refund policy for EU customers?")
    assert (result.embedding_model, result.documents[0].source_uri) == (MEAN, "kb://docs/refund.md")
    # a later switch goes through
    again = await switch(platform, ns)
    await drain(platform)
    assert (await job_of(platform, again)).status == "succeeded"
    await assert_every_document_embedded_with(platform, CLS)


@pytest.mark.parametrize("model", [MEAN, CLS])
async def test_each_local_model_has_its_own_hnsw_index(
    platform: Platform, ns: NamespaceConfig, model: str
) -> None:
    """The dense query of the Retriever (the expression and filter of its ``dense`` CTE)
    can use the partial HNSW index of the model it filters on."""
    # a few rows: a sort of the tenant's rows would be cheapest; leave the planner only
    # index-ordered plans, so the assertion is about whether the HNSW index applies
    # (with table statistics from an autovacuum it once chose a bitmap scan and a sort)
    settings = {"enable_seqscan": "off", "enable_bitmapscan": "off", "enable_sort": "off"}
    async with db_of(platform).tenant(TENANT, settings=settings) as s:
        plan = await s.fetch_all(
            "EXPLAIN SELECT c.id FROM chunks c "
            "WHERE c.embedding_model = %(model)s AND c.namespace = %(ns)s "
            "ORDER BY c.embedding::vector(384) <=> %(qv)s::vector(384) LIMIT 10",
            {"model": model, "ns": KB, "qv": np.ones(384, dtype=np.float32)},
        )
    text = "\n".join(r["QUERY PLAN"] for r in plan)
    index = "chunks_embedding_" + model.replace("-", "_") + "_idx"
    assert f"Index Scan using {index}" in text, text
