"""Retrieval quality on a slice of pyfaq, through the real ingestion path and model.

Fails when quality drops below the floors recorded here (measured when this test
was written, minus a margin for the slice's variance). The slice lives in
tests/fixtures/pyfaq-slice, so this runs everywhere; the full benchmark is
`ragplane bench retrieval --dataset ../shared/eval/pyfaq` (docs/benchmarks.md).
"""

from __future__ import annotations

import statistics
from pathlib import Path

from ragplane.control.namespaces import upsert_namespace
from ragplane.data import Database
from ragplane.evals.bench_retrieval import load_beir
from ragplane.evals.metrics import ndcg_at_k
from ragplane.knowledge.embedder import LocalEmbedder
from ragplane.knowledge.fusion import SearchMode
from ragplane.knowledge.ingest import Ingestor
from ragplane.knowledge.parsers import parse
from ragplane.knowledge.search import Retriever
from tests.conftest import PgCluster

# tests/fixtures/pyfaq-slice: the first 40 pyfaq queries, their relevant sections and 80
# other FAQ sections as distractors (its README says how it was cut)
PYFAQ_SLICE = Path(__file__).resolve().parents[1] / "fixtures" / "pyfaq-slice"
# measured on this slice when recorded: hybrid 0.906, dense 0.815, BM25 (SQL) 0.814
FLOORS: dict[SearchMode, float] = {"hybrid": 0.86, "dense": 0.77, "lexical": 0.77}


async def test_retrieval_quality_floor_on_a_pyfaq_slice(clean_db: PgCluster) -> None:
    data = load_beir(PYFAQ_SLICE)
    qids = sorted(data.qrels, key=lambda q: int(q.lstrip("q")))
    assert len(qids) == 40
    lines = data.corpus_path.read_text().splitlines()
    assert len(lines) == 120
    docs = parse("file://pyfaq/corpus.jsonl", "\n".join(lines).encode())
    embedder = LocalEmbedder()
    owner = Database(clean_db.owner, max_size=1, name="owner")
    async with owner, owner.control() as s:
        config = await upsert_namespace(s, "tnt_gamma", "pyfaq", embedding_model=embedder.model_id)
    scores: dict[SearchMode, float] = {}
    async with Database(clean_db.app, max_size=2) as db:
        await Ingestor(db, embedder).ingest(config, docs)
        retriever = Retriever(db, embedder)
        for mode in FLOORS:
            ndcgs = []
            for q in qids:
                result = await retriever.search(config, data.queries[q], mode=mode)
                ranked = [str(d.best.metadata["id"]) for d in result.documents]
                ndcgs.append(ndcg_at_k(ranked, data.qrels[q], 10))
            scores[mode] = statistics.fmean(ndcgs)
    print(f"pyfaq slice nDCG@10: {scores}")
    for mode, floor in FLOORS.items():
        assert scores[mode] >= floor, f"{mode} nDCG@10 {scores[mode]:.3f} fell below {floor}"
    # fusion earns its place: better than either retriever alone
    assert scores["hybrid"] > max(scores["dense"], scores["lexical"])
