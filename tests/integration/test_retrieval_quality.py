"""Retrieval quality on a slice of pyfaq, through the real ingestion path and model.

Fails when quality drops below the floors recorded here (measured when this test
was written, minus a margin for the slice's variance). The full benchmark is
`ragplane bench retrieval --dataset ../shared/eval/pyfaq` (docs/benchmarks.md).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from ragplane.control.namespaces import upsert_namespace
from ragplane.data import Database
from ragplane.evals.bench_retrieval import load_beir
from ragplane.evals.metrics import ndcg_at_k
from ragplane.knowledge.embedder import LocalEmbedder
from ragplane.knowledge.ingest import Ingestor
from ragplane.knowledge.parsers import parse
from ragplane.knowledge.search import Retriever, SearchMode
from tests.conftest import PgCluster

PYFAQ = Path(__file__).resolve().parents[3] / "shared" / "eval" / "pyfaq"
QUERIES = 40
DISTRACTORS = 80
# measured on this slice when recorded: hybrid 0.906, dense 0.815, BM25 (SQL) 0.814
FLOORS: dict[SearchMode, float] = {"hybrid": 0.86, "dense": 0.77, "lexical": 0.77}


@pytest.mark.skipif(not PYFAQ.is_dir(), reason="../shared/eval/pyfaq is not present")
async def test_retrieval_quality_floor_on_a_pyfaq_slice(clean_db: PgCluster) -> None:
    data = load_beir(PYFAQ)
    qids = sorted(data.qrels, key=lambda q: int(q.lstrip("q")))[:QUERIES]
    relevant = {d for q in qids for d in data.qrels[q]}
    lines, distractors = [], 0
    for line in data.corpus_path.read_text().splitlines():
        doc_id = json.loads(line)["_id"]
        if doc_id in relevant:
            lines.append(line)
        elif distractors < DISTRACTORS and doc_id.startswith("faq/"):
            lines.append(line)
            distractors += 1
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
