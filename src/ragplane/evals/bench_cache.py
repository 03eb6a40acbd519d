"""How often a semantic cache serves the wrong answer: plain cosine thresholds (the
GPTCache / RedisVL way) against ragplane's :class:`~ragplane.service.cache_policy.CachePolicy`.

The data are question pairs ``(a, b, same_answer, category)``: ``a`` is the cached
question, ``b`` the new one; ``same_answer`` says whether one reply is right for both.
The bundled set is fow-cache's 600 pairs (``pip install 'ragplane[bench]'``): 300 that
should hit (``paraphrase``, ``near_repeat``) and 300 traps (``negation``,
``entity_swap``, ``number_date``, ``scope``). Each distinct text is embedded once, in
memory, with the given embedder (the bundled all-MiniLM-L6-v2 from the CLI).

For every method the bench counts **hits** (pairs it would serve), **false hits** (hits
on a trap), **precision** = 1 - false hits / hits and **recall** = true hits / pairs that
should hit, overall and per category, and on the two halves of a fixed split by pair id
(``crc32(id) % 2``). It then shows that the policy's one cosine tunable is not fitted to
the data: for each half it picks the lowest ``paraphrase_similarity`` on a grid whose
false hits stay within 1% on that half, and reports the other half with it. It also
times :meth:`CachePolicy.verify` on every pair.
"""

from __future__ import annotations

import gc
import json
import time
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from ragplane.service.cache_policy import CachePolicy, CacheVerdict

__all__ = [
    "BASELINE_THRESHOLDS",
    "CacheBenchResult",
    "CachePair",
    "MethodScore",
    "Score",
    "TunedFold",
    "load_pairs",
    "run_cache_bench",
]

BASELINE_THRESHOLDS = (0.80, 0.90, 0.95)
"""Plain cosine cut-offs compared with the policy."""
POLICY = "ragplane policy"
TUNING_GRID = tuple(round(0.75 + 0.01 * i, 2) for i in range(21))  # 0.75 .. 0.95
"""The ``paraphrase_similarity`` values the two-fold check chooses from."""
MAX_FALSE_SHARE = 0.01


class _Embeds(Protocol):
    async def embed(self, texts: Sequence[str]) -> npt.NDArray[np.float32]: ...


@dataclass(frozen=True)
class CachePair:
    id: str
    category: str
    a: str  # the cached question
    b: str  # the new question
    same_answer: bool
    style: str = ""

    @property
    def fold(self) -> int:
        """0 or 1: the half of the fixed split this pair belongs to."""
        return zlib.crc32(self.id.encode()) % 2


def load_pairs(path: Path | None = None) -> list[CachePair]:
    """Pairs from a JSON-lines file (default: fow-cache's bundled ``pairs.jsonl``)."""
    if path is None:
        from importlib import resources

        path = Path(str(resources.files("fow_cache") / "data" / "pairs.jsonl"))
    pairs = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                pairs.append(
                    CachePair(
                        id=str(row["id"]),
                        category=str(row["category"]),
                        a=str(row["a"]),
                        b=str(row["b"]),
                        same_answer=bool(row["same_answer"]),
                        style=str(row.get("style", "")),
                    )
                )
    return pairs


@dataclass(frozen=True)
class Score:
    pairs: int
    should_hit: int
    hits: int
    false_hits: int

    @property
    def true_hits(self) -> int:
        return self.hits - self.false_hits

    @property
    def precision(self) -> float:
        """1 - false hits / hits (1.0 when nothing was served)."""
        return 1.0 - self.false_hits / self.hits if self.hits else 1.0

    @property
    def recall(self) -> float:
        return self.true_hits / self.should_hit if self.should_hit else 0.0

    def as_json(self) -> dict[str, Any]:
        return {
            "pairs": self.pairs,
            "should_hit": self.should_hit,
            "hits": self.hits,
            "false_hits": self.false_hits,
            "precision": round(self.precision, 4),
            "recall": round(self.recall, 4),
        }


def _score(pairs: Iterable[CachePair], hit: Callable[[CachePair], bool]) -> Score:
    listed = list(pairs)
    served = [p for p in listed if hit(p)]
    return Score(
        pairs=len(listed),
        should_hit=sum(p.same_answer for p in listed),
        hits=len(served),
        false_hits=sum(not p.same_answer for p in served),
    )


@dataclass(frozen=True)
class MethodScore:
    overall: Score
    by_category: dict[str, Score]
    folds: tuple[Score, Score]

    def as_json(self) -> dict[str, Any]:
        return {
            **self.overall.as_json(),
            "by_category": {c: s.as_json() for c, s in self.by_category.items()},
            "folds": [f.as_json() for f in self.folds],
        }


@dataclass(frozen=True)
class TunedFold:
    """``paraphrase_similarity`` chosen on half ``tuned_on``, scored on the other half."""

    tuned_on: int
    paraphrase_similarity: float
    tuning: Score
    held_out: Score

    def as_json(self) -> dict[str, Any]:
        return {
            "tuned_on_fold": self.tuned_on,
            "paraphrase_similarity": self.paraphrase_similarity,
            "tuning": self.tuning.as_json(),
            "held_out": self.held_out.as_json(),
        }


@dataclass(frozen=True)
class CacheBenchResult:
    pairs: int
    texts: int
    embed_s: float
    policy: dict[str, Any]  # the policy's tunables
    methods: dict[str, MethodScore]
    reasons: dict[str, dict[str, int]]  # category -> verdict reason -> count
    two_fold: tuple[TunedFold, TunedFold]
    verify_us: dict[str, float]  # p50, p95, p99, max over one pass, each pair once

    def as_json(self) -> dict[str, Any]:
        return {
            "pairs": self.pairs,
            "texts_embedded": self.texts,
            "embed_s": round(self.embed_s, 3),
            "policy": self.policy,
            "methods": {name: m.as_json() for name, m in self.methods.items()},
            "policy_reasons": self.reasons,
            "two_fold": [f.as_json() for f in self.two_fold],
            "verify_us": {k: round(v, 1) for k, v in self.verify_us.items()},
        }


def _method(pairs: Sequence[CachePair], hit: Callable[[CachePair], bool]) -> MethodScore:
    categories = sorted({p.category for p in pairs}, key=lambda c: (_is_trap(pairs, c), c))
    return MethodScore(
        overall=_score(pairs, hit),
        by_category={c: _score((p for p in pairs if p.category == c), hit) for c in categories},
        folds=(
            _score((p for p in pairs if p.fold == 0), hit),
            _score((p for p in pairs if p.fold == 1), hit),
        ),
    )


def _is_trap(pairs: Sequence[CachePair], category: str) -> bool:
    return not any(p.same_answer for p in pairs if p.category == category)


def _two_fold(
    pairs: Sequence[CachePair], cosine: dict[str, float], policy: CachePolicy
) -> tuple[TunedFold, TunedFold]:
    tunables = _tunables(policy)
    out = []
    for tuned_on in (0, 1):
        tuning = [p for p in pairs if p.fold == tuned_on]
        held = [p for p in pairs if p.fold != tuned_on]
        chosen: tuple[float, Score] | None = None
        for threshold in TUNING_GRID:
            score = _score(tuning, _policy_hits(_with(policy, tunables, threshold), cosine))
            if score.hits and score.false_hits <= MAX_FALSE_SHARE * score.hits:
                chosen = (threshold, score)
                break
        threshold, tuning_score = chosen or (
            TUNING_GRID[-1],
            _score(tuning, lambda p: False),
        )
        held_score = _score(held, _policy_hits(_with(policy, tunables, threshold), cosine))
        out.append(TunedFold(tuned_on, threshold, tuning_score, held_score))
    return out[0], out[1]


def _policy_hits(policy: CachePolicy, cosine: dict[str, float]) -> Callable[[CachePair], bool]:
    def hit(p: CachePair) -> bool:
        return policy.verify(p.b, p.a, cosine[p.id]).hit

    return hit


def _cosine_hits(threshold: float, cosine: dict[str, float]) -> Callable[[CachePair], bool]:
    def hit(p: CachePair) -> bool:
        return cosine[p.id] >= threshold

    return hit


def _tunables(policy: CachePolicy) -> dict[str, Any]:
    return {
        "min_similarity": policy.min_similarity,
        "paraphrase_similarity": policy.paraphrase_similarity,
        "reworded_overlap": policy.reworded_overlap,
        "typo_min_length": policy.typo_min_length,
        "typo_two_edit_length": policy.typo_two_edit_length,
    }


def _with(policy: CachePolicy, tunables: dict[str, Any], threshold: float) -> CachePolicy:
    changed = {**tunables, "paraphrase_similarity": threshold}
    changed["min_similarity"] = min(changed["min_similarity"], threshold)
    return CachePolicy(**changed, vocabulary=policy.vocabulary, thesaurus=policy.thesaurus)


async def run_cache_bench(
    pairs: Sequence[CachePair],
    embedder: _Embeds,
    *,
    policy: CachePolicy | None = None,
    thresholds: Sequence[float] = BASELINE_THRESHOLDS,
    progress: Callable[[str], None] = lambda _: None,
) -> CacheBenchResult:
    """Score the cosine baselines and the policy on ``pairs`` (see the module notes)."""
    policy = policy or CachePolicy()
    texts = sorted({p.a for p in pairs} | {p.b for p in pairs})
    progress(f"embedding {len(texts)} texts")
    started = time.perf_counter()
    vectors = await embedder.embed(texts) if texts else np.zeros((0, 1), np.float32)
    embed_s = time.perf_counter() - started
    row = {t: i for i, t in enumerate(texts)}
    cosine = {p.id: float(np.dot(vectors[row[p.a]], vectors[row[p.b]])) for p in pairs}

    progress("scoring")
    verdicts: dict[str, CacheVerdict] = {}
    timings: list[float] = []
    gc.collect()
    gc.disable()  # time verify(), not the collector's pauses
    try:
        for p in pairs:  # first sight of every question: nothing memoised yet
            t0 = time.perf_counter_ns()
            verdicts[p.id] = policy.verify(p.b, p.a, cosine[p.id])
            timings.append((time.perf_counter_ns() - t0) / 1000)
    finally:
        gc.enable()
    methods = {f"cosine >= {t:.2f}": _method(pairs, _cosine_hits(t, cosine)) for t in thresholds}
    methods[POLICY] = _method(pairs, lambda p: verdicts[p.id].hit)
    if policy.thesaurus is not None:  # what the thesaurus adds, side by side
        plain = CachePolicy(**_tunables(policy), vocabulary=policy.vocabulary, thesaurus=None)
        methods[f"{POLICY} without thesaurus"] = _method(
            pairs, lambda p: plain.verify(p.b, p.a, cosine[p.id]).hit
        )
    reasons: dict[str, dict[str, int]] = {}
    for p in pairs:
        by_reason = reasons.setdefault(p.category, {})
        reason = verdicts[p.id].reason
        by_reason[reason] = by_reason.get(reason, 0) + 1

    progress("two-fold check")
    two_fold = _two_fold(pairs, cosine, policy)
    ordered = sorted(timings) or [0.0]
    return CacheBenchResult(
        pairs=len(pairs),
        texts=len(texts),
        embed_s=embed_s,
        policy=_tunables(policy),
        methods=methods,
        reasons=reasons,
        two_fold=two_fold,
        verify_us={
            "p50": ordered[len(ordered) // 2],
            "p95": ordered[min(len(ordered) - 1, int(len(ordered) * 0.95))],
            "p99": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))],
            "max": ordered[-1],
        },
    )
