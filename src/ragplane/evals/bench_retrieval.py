"""Retrieval quality and speed on a BEIR-format dataset, side by side in one run.

The corpus goes through the real ingestion path (JSONL parser, chunker,
embedder, tenant-scoped writes) into a throwaway tenant. Then every query runs
against:

- ``bm25``: bm25s over whole documents (title + text; English stopwords,
  Snowball stemmer) — the classic lexical baseline;
- ``dense``: ragplane's pgvector HNSW over chunks, best chunk per document;
- ``lexical``: ragplane's Postgres full-text side alone (for reference);
- ``hybrid``: ragplane's fusion with the namespace's settings (the shipped
  defaults unless ``fusion`` overrides them);
- optionally a sweep of fusion settings over the same candidates.

Quality: nDCG@10, recall@10, recall@100 at document level. Speed: p50/p95 of
retrieval alone and including query embedding; ingestion documents/s and
tokens/s next to the raw embedder's tokens/s.

Ingestion against the raw embedder compares like with like: the raw side runs
:func:`~ragplane.knowledge.embedder.measure_throughput` on the texts ingestion
itself sent to the embedder (recorded during the run; all of them, or a fixed
random sample of ``raw_sample``), at the embedder's own batch size, after the
ingestion. Both sides count the tokens the model processes: word pieces of the
embedding input (title and heading path, then the chunk text) plus
``[CLS]``/``[SEP]``, truncated to the model's 256
(:func:`~ragplane.knowledge.ingest.model_tokens`). Ingestion's time is the whole
run: look-ups, chunking, embedding and writes.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from ragplane.control.namespaces import NamespaceConfig, upsert_namespace
from ragplane.data import Database, DatabaseUrls
from ragplane.evals.metrics import ndcg_at_k, recall_at_k
from ragplane.knowledge.embedder import LocalEmbedder, measure_throughput
from ragplane.knowledge.fusion import FusionConfig, SearchMode, rank_candidates
from ragplane.knowledge.ingest import Ingestor, IngestProgress
from ragplane.knowledge.parsers import parse
from ragplane.knowledge.search import Retriever

__all__ = ["BeirDataset", "RetrievalBenchResult", "load_beir", "run_retrieval_bench"]

BENCH_TENANT = "bench_retrieval"
BENCH_NAMESPACE = "bench"
RAW_SAMPLE_TEXTS = 2048


@dataclass(frozen=True)
class BeirDataset:
    corpus_path: Path
    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]


def load_beir(directory: Path, split: str = "test") -> BeirDataset:
    corpus = directory / "corpus.jsonl"
    queries_path = directory / "queries.jsonl"
    qrels_path = directory / "qrels" / f"{split}.tsv"
    for p in (corpus, queries_path, qrels_path):
        if not p.is_file():
            raise FileNotFoundError(f"not a BEIR dataset: {p} is missing")
    qrels: dict[str, dict[str, int]] = {}
    for i, line in enumerate(qrels_path.read_text().splitlines()):
        parts = line.split("\t")
        if i == 0 and parts[0] == "query-id":
            continue
        if len(parts) >= 3 and int(parts[2]) > 0:
            qrels.setdefault(parts[0], {})[parts[1]] = int(parts[2])
    queries = {}
    for line in queries_path.read_text().splitlines():
        if line.strip():
            q = json.loads(line)
            if q["_id"] in qrels:
                queries[q["_id"]] = q["text"]
    return BeirDataset(corpus, queries, qrels)


@dataclass(frozen=True)
class RetrieverScores:
    ndcg_10: float
    recall_10: float
    recall_100: float
    p50_ms: float
    p95_ms: float
    p50_with_embed_ms: float | None = None
    p95_with_embed_ms: float | None = None

    def as_json(self) -> dict[str, float | None]:
        return {
            "ndcg@10": round(self.ndcg_10, 4),
            "recall@10": round(self.recall_10, 4),
            "recall@100": round(self.recall_100, 4),
            "p50_ms": round(self.p50_ms, 3),
            "p95_ms": round(self.p95_ms, 3),
            "p50_with_embedding_ms": _r(self.p50_with_embed_ms),
            "p95_with_embedding_ms": _r(self.p95_with_embed_ms),
        }


@dataclass
class RetrievalBenchResult:
    documents: int
    chunks: int
    queries: int
    ingest_docs_per_s: float
    ingest_tokens_per_s: float
    raw_embed_tokens_per_s: float
    ingest_s: float
    reingest_new_chunks: int
    reingest_embedding_calls: int
    ingest_tokens: int = 0
    raw_embed_texts: int = 0
    embedding_inputs: int = 0
    raw_embed_batch_size: int = 0
    retrievers: dict[str, RetrieverScores] = field(default_factory=dict)
    fusion: dict[str, Any] = field(default_factory=dict)
    sweep: list[tuple[dict[str, Any], float]] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {
            "documents": self.documents,
            "chunks": self.chunks,
            "queries": self.queries,
            "ingest": {
                "seconds": round(self.ingest_s, 2),
                "docs_per_s": round(self.ingest_docs_per_s, 2),
                "tokens_per_s": round(self.ingest_tokens_per_s, 1),
                "raw_embedder_tokens_per_s": round(self.raw_embed_tokens_per_s, 1),
                "ratio_to_raw_embedder": round(
                    self.ingest_tokens_per_s / self.raw_embed_tokens_per_s, 3
                )
                if self.raw_embed_tokens_per_s
                else None,
                "reingest_new_chunks": self.reingest_new_chunks,
                "reingest_embedding_calls": self.reingest_embedding_calls,
                "tokens": self.ingest_tokens,
                "embedding_inputs": self.embedding_inputs,
                "raw_embedder_texts": self.raw_embed_texts,
                "raw_embedder_batch_size": self.raw_embed_batch_size,
            },
            "fusion": self.fusion,
            **{name: s.as_json() for name, s in self.retrievers.items()},
            "sweep": [{"fusion": f, "ndcg@10": round(n, 4)} for f, n in self.sweep],
        }


def _r(v: float | None) -> float | None:
    return None if v is None else round(v, 3)


def _pct(values: Sequence[float], q: int) -> float:
    if len(values) < 2:
        return values[0] if values else math.nan
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def _scores(
    runs: dict[str, list[str]],
    qrels: dict[str, dict[str, int]],
    latencies: list[float],
    with_embed: list[float] | None = None,
) -> RetrieverScores:
    qids = list(qrels)
    return RetrieverScores(
        ndcg_10=statistics.fmean(ndcg_at_k(runs.get(q, []), qrels[q], 10) for q in qids),
        recall_10=statistics.fmean(recall_at_k(runs.get(q, []), qrels[q], 10) for q in qids),
        recall_100=statistics.fmean(recall_at_k(runs.get(q, []), qrels[q], 100) for q in qids),
        p50_ms=_pct(latencies, 50),
        p95_ms=_pct(latencies, 95),
        p50_with_embed_ms=_pct(with_embed, 50) if with_embed else None,
        p95_with_embed_ms=_pct(with_embed, 95) if with_embed else None,
    )


def _bm25(
    dataset: BeirDataset, progress: Callable[[str], None]
) -> tuple[dict[str, list[str]], list[float]]:
    import bm25s
    import Stemmer

    ids, texts = [], []
    for line in dataset.corpus_path.read_text().splitlines():
        if line.strip():
            d = json.loads(line)
            ids.append(d["_id"])
            texts.append(f"{d.get('title', '')}\n{d['text']}")
    progress(f"bm25: indexing {len(ids)} documents")
    stemmer = Stemmer.Stemmer("english")
    index = bm25s.BM25()
    index.index(
        bm25s.tokenize(texts, stopwords="en", stemmer=stemmer, show_progress=False),
        show_progress=False,
    )
    runs: dict[str, list[str]] = {}
    latencies = []
    for qid, text in dataset.queries.items():
        t0 = time.perf_counter()
        tokens = bm25s.tokenize([text], stopwords="en", stemmer=stemmer, show_progress=False)
        docs, _ = index.retrieve(tokens, k=100, show_progress=False)
        latencies.append((time.perf_counter() - t0) * 1000)
        runs[qid] = [ids[i] for i in docs[0]]
    return runs, latencies


class _Recording:
    """The embedder as ingestion uses it, keeping every text it was asked to embed."""

    def __init__(self, inner: LocalEmbedder) -> None:
        self.inner = inner
        self.texts: list[str] = []

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
        self.texts.extend(texts)
        return await self.inner.embed(texts)


def _raw_sample(texts: list[str], size: int) -> list[str]:
    """All of ``texts``, or a fixed random sample of ``size`` of them (same seed, same
    sample), in their original order."""
    if len(texts) <= size:
        return texts
    picked = np.random.default_rng(0).choice(len(texts), size=size, replace=False)
    return [texts[i] for i in sorted(picked.tolist())]


async def run_retrieval_bench(
    urls: DatabaseUrls,
    dataset: BeirDataset,
    *,
    embedder: LocalEmbedder | None = None,
    fusion: FusionConfig | None = None,
    sweep: Iterable[FusionConfig] = (),
    limit_documents: int | None = None,
    raw_sample: int = RAW_SAMPLE_TEXTS,
    progress: Callable[[str], None] = lambda _m: None,
) -> RetrievalBenchResult:
    """Ingest ``dataset`` into a throwaway tenant and score every retriever on it."""
    assert urls.owner is not None
    embedder = embedder or LocalEmbedder()
    owner = Database(urls.owner, max_size=1, name="owner")
    async with owner, owner.control() as s:
        await s.execute(
            "INSERT INTO control.tenants (id, name, home_region) VALUES (%s, 'benchmark', 'eu') "
            "ON CONFLICT DO NOTHING",
            (BENCH_TENANT,),
        )
        config = await upsert_namespace(
            s,
            BENCH_TENANT,
            BENCH_NAMESPACE,
            embedding_model=embedder.model_id,
            retrieval={} if fusion is None else _fusion_dict(fusion),
        )
    data = dataset.corpus_path.read_bytes()
    if limit_documents is not None:
        data = b"\n".join(data.splitlines()[:limit_documents]) + b"\n"
    async with Database(urls.app, max_size=2) as db:
        recording = _Recording(embedder)
        ingestor = Ingestor(db, recording)
        parsed = parse(f"file://{dataset.corpus_path}", data)

        def report(p: IngestProgress) -> None:
            progress(
                f"ingest: {p.documents_done} documents, {p.chunks_written} chunks, "
                f"{p.tokens_per_s:,.0f} tokens/s"
            )

        first = await ingestor.ingest(config, parsed, on_progress=report)
        inputs = list(recording.texts)
        progress("re-ingesting the unchanged corpus")
        again = await ingestor.ingest(config, parsed)
        sample = _raw_sample(inputs, raw_sample)
        progress(
            f"raw embedder throughput on {len(sample)} of ingestion's {len(inputs)} "
            "embedding inputs"
        )
        # a kept database (``--db-dir``) may have had nothing to embed
        raw = measure_throughput(embedder, sample, batch_size=embedder.batch_size) if sample else {}
        async with db.tenant(BENCH_TENANT) as s:
            stored = await s.fetch_one(
                "SELECT count(*) AS n FROM chunks WHERE namespace = %s", (BENCH_NAMESPACE,)
            )
        result = RetrievalBenchResult(
            documents=first.documents,
            chunks=int(stored["n"]) if stored else first.chunks_written,
            queries=len(dataset.queries),
            ingest_docs_per_s=first.documents / first.elapsed_s,
            ingest_tokens_per_s=first.tokens_embedded / first.elapsed_s,
            raw_embed_tokens_per_s=float(raw.get("tokens_per_s", 0.0)),
            ingest_s=first.elapsed_s,
            reingest_new_chunks=again.chunks_written,
            reingest_embedding_calls=again.embedding_calls,
            ingest_tokens=first.tokens_embedded,
            raw_embed_texts=len(sample),
            embedding_inputs=len(inputs),
            raw_embed_batch_size=embedder.batch_size,
        )
        progress("bm25 baseline")
        runs, latencies = _bm25(dataset, progress)
        result.retrievers["bm25"] = _scores(runs, dataset.qrels, latencies)
        retriever = Retriever(db, embedder)
        shipped = fusion or FusionConfig.from_mapping(config.retrieval)
        result.fusion = _fusion_dict(shipped)
        await _score_ragplane(db, retriever, config, dataset, shipped, sweep, result, progress)
    return result


async def _score_ragplane(
    db: Database,
    retriever: Retriever,
    config: NamespaceConfig,
    dataset: BeirDataset,
    shipped: FusionConfig,
    sweep: Iterable[FusionConfig],
    result: RetrievalBenchResult,
    progress: Callable[[str], None],
) -> None:
    """nDCG@10, recall@10 and latency from the search as served (top 10 over the shipped
    number of candidates; latency: the whole ``search`` call, the query already embedded);
    recall@100 from deeper lists (500 candidates per retriever)."""
    async with db.tenant(config.tenant_id) as s:
        rows = await s.fetch_all(
            "SELECT id, source_uri, metadata FROM documents WHERE namespace = %s", (config.name,)
        )
    corpus_ids = {str(r["id"]): _corpus_id(r["metadata"], r["source_uri"]) for r in rows}
    vectors = {}
    embed_ms: dict[str, float] = {}
    for qid, text in dataset.queries.items():
        t0 = time.perf_counter()
        vectors[qid] = await retriever.embed_query(text)
        embed_ms[qid] = (time.perf_counter() - t0) * 1000
    hybrid_candidates = {}
    modes: tuple[SearchMode, ...] = ("dense", "lexical", "hybrid")
    for mode in modes:
        progress(f"ragplane {mode}: {len(dataset.queries)} queries")
        top10: dict[str, list[str]] = {}
        deep: dict[str, list[str]] = {}
        latencies, with_embed = [], []
        for qid, text in dataset.queries.items():
            t0 = time.perf_counter()
            served = await retriever.search(
                config, text, top_k=10, mode=mode, query_vector=vectors[qid], fusion=shipped
            )
            elapsed = (time.perf_counter() - t0) * 1000
            top10[qid] = [_corpus_id(d.best.metadata, d.source_uri) for d in served.documents]
            latencies.append(elapsed)
            with_embed.append(elapsed + embed_ms[qid])
            found = await retriever.candidates(
                config, text, k=500, mode=mode, query_vector=vectors[qid], fusion=shipped
            )
            _, documents = rank_candidates(found.rows, shipped, mode)
            deep[qid] = [corpus_ids[d] for d, _, _ in documents[:100]]
            if mode == "hybrid":
                hybrid_candidates[qid] = (
                    text,
                    await retriever.candidates(
                        config,
                        text,
                        k=shipped.candidates,
                        mode=mode,
                        query_vector=vectors[qid],
                        fusion=shipped,
                    ),
                )
        name = {"dense": "dense", "lexical": "bm25_sql", "hybrid": "hybrid"}[mode]
        scores = _scores(top10, dataset.qrels, latencies, with_embed)
        deep_scores = _scores(deep, dataset.qrels, latencies)
        result.retrievers[name] = replace(scores, recall_100=deep_scores.recall_100)
    for candidate in sweep:
        runs = {}
        for qid, (_text, found) in hybrid_candidates.items():
            _, documents = rank_candidates(found.rows, candidate, "hybrid")
            runs[qid] = [corpus_ids[d] for d, _, _ in documents[:10]]
        score = statistics.fmean(
            ndcg_at_k(runs.get(q, []), dataset.qrels[q], 10) for q in dataset.qrels
        )
        result.sweep.append((_fusion_dict(candidate), score))
    result.sweep.sort(key=lambda t: -t[1])


def _corpus_id(metadata: dict[str, Any], source_uri: str) -> str:
    return str(metadata.get("id") or source_uri.rsplit("#", 1)[-1])


def _fusion_dict(f: FusionConfig) -> dict[str, Any]:
    return asdict(f)


def default_sweep() -> list[FusionConfig]:
    """Blend (both normalisations) and RRF over a grid of first-chunk and lexical weights
    (the best-chunk dense weight is the rest of 1)."""
    out = []
    for fw in (0.0, 0.3, 0.4, 0.5, 0.6, 0.7):
        for lw in (0.0, 0.1, 0.2, 0.3, 0.4):
            if fw + lw > 1:
                continue
            base = replace(
                FusionConfig(),
                first_weight=fw,
                dense_weight=round(1 - fw - lw, 2),
                lexical_weight=lw,
            )
            out.append(replace(base, method="rrf"))
            for norm in ("dbsf", "minmax"):
                out.append(replace(base, method="blend", normalization=norm))
    return out
