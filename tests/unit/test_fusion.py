"""Fusion in arrays ranks exactly as its plain definition (reference code below) does."""

from __future__ import annotations

import math
import uuid
from dataclasses import replace
from typing import Any

import numpy as np
import pytest

from ragplane.knowledge.fusion import FusionConfig, SearchMode, rank_candidates, rank_documents

# --- the definition, written plainly (the code that shipped before fusion used numpy) ---


def _scale(values: list[float], how: str) -> tuple[float, float]:
    if how == "dbsf":
        mean = sum(values) / len(values)
        sd = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values)) or 1.0
        return mean - 3 * sd, 6 * sd
    return min(values), (max(values) - min(values)) or 1.0


def _fuse(rows: list[dict[str, Any]], c: FusionConfig, mode: SearchMode) -> list[Any]:
    dense = sorted((r for r in rows if r["sim"] is not None), key=lambda r: -r["sim"])
    lexical = sorted((r for r in rows if r["lex"] is not None), key=lambda r: -r["lex"])
    d_rank = {r["id"]: i + 1 for i, r in enumerate(dense)}
    l_rank = {r["id"]: i + 1 for i, r in enumerate(lexical)}
    if mode == "dense":
        return [(r["sim"], r, d_rank[r["id"]], None) for r in dense]
    if mode == "lexical":
        return [(r["lex"], r, None, l_rank[r["id"]]) for r in lexical]
    dl, ds = _scale([r["sim"] for r in dense], c.normalization) if dense else (0.0, 1.0)
    ll, ls = _scale([r["lex"] for r in lexical], c.normalization) if lexical else (0.0, 1.0)
    scored = []
    for r in rows:
        dr, lr = d_rank.get(r["id"]), l_rank.get(r["id"])
        if c.method == "rrf":
            score = (c.dense_weight / (c.rrf_k + dr) if dr else 0.0) + (
                c.lexical_weight / (c.rrf_k + lr) if lr else 0.0
            )
        else:
            score = (c.dense_weight * (r["sim"] - dl) / ds if dr else 0.0) + (
                c.lexical_weight * (r["lex"] - ll) / ls if lr else 0.0
            )
            score += c.lead_bonus if r["ordinal"] == 0 else 0.0
        scored.append((score, r, dr, lr))
    scored.sort(key=lambda t: (-t[0], t[1]["id"]))
    return scored


def _documents(rows: list[dict[str, Any]], c: FusionConfig) -> dict[str, float]:
    scores: dict[str, float] = {}
    for column, weight in (
        ("first_sim", c.first_weight),
        ("sim", c.dense_weight),
        ("lex", c.lexical_weight),
    ):
        values = [r for r in rows if r[column] is not None]
        if not weight or not values:
            continue
        lo, span = _scale([r[column] for r in values], c.normalization)
        best: dict[str, float] = {}
        for r in values:
            best[r["document_id"]] = max(best.get(r["document_id"], -math.inf), r[column])
        for rank, doc in enumerate(sorted(best, key=lambda d: -best[d]), start=1):
            part = (
                weight / (c.rrf_k + rank) if c.method == "rrf" else weight * (best[doc] - lo) / span
            )
            scores[doc] = scores.get(doc, 0.0) + part
    return scores


# --- the comparison ---


def _rows(seed: int, n: int = 240, docs: int = 70) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    doc_ids = [str(uuid.UUID(bytes=rng.bytes(16))) for _ in range(docs)]
    rows = []
    for _ in range(n):
        lists = rng.random(3) < (0.5, 0.3, 0.5)
        if not lists.any():
            lists[rng.integers(3)] = True
        rows.append(
            {
                "id": str(uuid.UUID(bytes=rng.bytes(16))),
                "document_id": doc_ids[int(rng.integers(docs))],
                "ordinal": int(rng.integers(0, 4)),
                "sim": float(rng.uniform(0.1, 0.9)) if lists[0] else None,
                "first_sim": float(rng.uniform(0.1, 0.9)) if lists[1] else None,
                "lex": float(rng.uniform(0.5, 30)) if lists[2] else None,
            }
        )
    return rows


CONFIGS = [
    FusionConfig(),
    replace(FusionConfig(), normalization="minmax", lead_bonus=0.05),
    replace(FusionConfig(), method="rrf"),
    replace(FusionConfig(), first_weight=0.0, dense_weight=0.7),
    replace(FusionConfig(), lexical_weight=0.0, dense_weight=0.5),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c.method}-{c.normalization}")
@pytest.mark.parametrize("mode", ["hybrid", "dense", "lexical"])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_fusion_matches_its_definition(config: FusionConfig, mode: SearchMode, seed: int) -> None:
    rows = _rows(seed)
    chunks, documents = rank_candidates(rows, config, mode)
    expected = _fuse(rows, config, mode)
    assert [r["id"] for _, r, _, _ in chunks] == [r["id"] for _, r, _, _ in expected]
    assert [(dr, lr) for _, _, dr, lr in chunks] == [(dr, lr) for _, _, dr, lr in expected]
    assert [s for s, *_ in chunks] == pytest.approx([s for s, *_ in expected], abs=1e-12)

    best: dict[str, tuple[float, dict[str, Any]]] = {}
    for score, r, _, _ in expected:
        best.setdefault(r["document_id"], (score, r))
    if mode == "hybrid":
        doc_scores = _documents(rows, config)
        assert rank_documents(rows, config) == pytest.approx(doc_scores, abs=1e-12)
        best = {d: (doc_scores.get(d, 0.0), r) for d, (_, r) in best.items()}
    ranked = sorted(((d, s, r) for d, (s, r) in best.items()), key=lambda t: (-t[1], t[0]))
    assert [(d, r["id"]) for d, _, r in documents] == [(d, r["id"]) for d, _, r in ranked]
    assert [s for _, s, _ in documents] == pytest.approx([s for _, s, _ in ranked], abs=1e-12)


@pytest.mark.parametrize("mode", ["hybrid", "dense", "lexical"])
def test_a_limit_keeps_the_head_of_both_rankings(mode: SearchMode) -> None:
    rows = _rows(4)
    chunks, documents = rank_candidates(rows, FusionConfig(), mode)
    assert rank_candidates(rows, FusionConfig(), mode, 10) == (chunks[:10], documents[:10])


def test_no_candidates_rank_nothing() -> None:
    assert rank_candidates([], FusionConfig(), "hybrid") == ([], [])
    assert rank_documents([], FusionConfig()) == {}
