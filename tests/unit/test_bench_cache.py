"""``ragplane bench cache`` scoring on a tiny in-test dataset with a stub embedder whose
cosines are chosen per pair."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt

from ragplane.evals.bench_cache import CachePair, load_pairs, run_cache_bench
from ragplane.service.cache_policy import CachePolicy

# (id, category, cached, new, same answer, cosine the stub gives the pair)
ROWS = [
    ("r1", "near_repeat", "How do I reset my router?", "how do i reset my router", True, 0.99),
    ("r2", "near_repeat", "How do I renew my passport?", "How do I renew my pasport?", True, 0.70),
    (
        "p1",
        "paraphrase",
        "Who painted the Mona Lisa?",
        "Which artist made the Mona Lisa?",
        True,
        0.92,
    ),
    ("p2", "paraphrase", "How do I quit the app?", "What closes the program?", True, 0.60),
    ("n1", "negation", "Is the pool open?", "Is the pool closed?", False, 0.97),
    ("d1", "number_date", "Wake me at 6am", "Wake me at 6pm", False, 0.93),
    ("e1", "entity_swap", "Visa fee for Norway?", "Visa fee for Sweden?", False, 0.85),
]


class StubEmbedder:
    """Unit vectors whose pairwise cosine is the one given for each pair (each pair on
    its own two axes, so pairs do not interfere)."""

    def __init__(self, rows: Sequence[tuple[str, str, str, str, bool, float]]) -> None:
        self.vectors: dict[str, npt.NDArray[np.float32]] = {}
        dims = 2 * len(rows)
        for i, (_, _, a, b, _, cosine) in enumerate(rows):
            va = np.zeros(dims, np.float32)
            va[2 * i] = 1.0
            vb = np.zeros(dims, np.float32)
            vb[2 * i] = cosine
            vb[2 * i + 1] = np.sqrt(1 - cosine**2)
            self.vectors[a], self.vectors[b] = va, vb
        self.calls = 0

    async def embed(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        self.calls += 1
        return np.stack([self.vectors[t] for t in texts])


def _pairs() -> list[CachePair]:
    return [CachePair(i, c, a, b, s) for i, c, a, b, s, _ in ROWS]


async def test_scores_baselines_and_policy() -> None:
    stub = StubEmbedder(ROWS)
    result = await run_cache_bench(_pairs(), stub, thresholds=(0.80, 0.95))
    assert stub.calls == 1
    assert result.texts == 14
    loose = result.methods["cosine >= 0.80"].overall
    assert (loose.hits, loose.false_hits, loose.should_hit) == (5, 3, 4)
    assert loose.precision == 1 - 3 / 5
    assert loose.recall == 2 / 4
    strict = result.methods["cosine >= 0.95"].overall
    assert (strict.hits, strict.false_hits) == (2, 1)
    policy = result.methods["ragplane policy"]
    assert (policy.overall.hits, policy.overall.false_hits) == (3, 0)
    assert policy.overall.recall == 3 / 4
    assert policy.by_category["near_repeat"].recall == 1.0
    assert policy.by_category["negation"].false_hits == 0
    assert list(policy.by_category)[:2] == ["near_repeat", "paraphrase"]  # hits before traps
    assert sum(f.pairs for f in policy.folds) == len(ROWS)
    assert result.reasons["negation"] == {"content_edit": 1}
    assert result.reasons["number_date"] == {"anchor_mismatch": 1}
    assert result.verify_us["p50"] > 0


async def test_two_fold_tunes_on_one_half_and_scores_the_other() -> None:
    result = await run_cache_bench(_pairs(), StubEmbedder(ROWS), policy=CachePolicy())
    first, second = result.two_fold
    assert (first.tuned_on, second.tuned_on) == (0, 1)
    pairs = _pairs()
    assert first.held_out.pairs == sum(p.fold == 1 for p in pairs)
    assert second.held_out.pairs == sum(p.fold == 0 for p in pairs)
    for fold in result.two_fold:
        assert 0.75 <= fold.paraphrase_similarity <= 0.95
    report = result.as_json()
    assert json.loads(json.dumps(report)) == report
    assert set(report["methods"]) == {
        "cosine >= 0.80",
        "cosine >= 0.90",
        "cosine >= 0.95",
        "ragplane policy",
        "ragplane policy without thesaurus",  # side by side: what WordNet adds
    }


def test_load_pairs_reads_json_lines(tmp_path: Path) -> None:
    path = tmp_path / "pairs.jsonl"
    path.write_text(
        json.dumps({"id": "x", "category": "scope", "a": "A?", "b": "B?", "same_answer": False})
        + "\n\n",
        encoding="utf-8",
    )
    assert load_pairs(path) == [CachePair("x", "scope", "A?", "B?", False, "")]
