"""Fusion of the hybrid candidate lists (pure array arithmetic; the SQL is in ``search``).

Fusion is chosen by evaluation (``ragplane bench retrieval``), not by habit, and
ranks *documents*: each list is aggregated per document (its best chunk), then

- ``blend``: ``w_f * first' + w_d * dense' + w_l * lexical'``, each score normalised
  over its own candidate list (distribution-based: mean ± 3 standard deviations →
  [0, 1]; or min-max), absent → 0;
- ``rrf``: weighted reciprocal rank fusion of the per-document ranks,
  ``sum(w / (k + rank))``.

A document's citation span is its best chunk by the chunk-level blend of the dense
and lexical scores. Ranking a document by its best chunk alone favours long
documents (more chunks, more chances of one close match); the first-chunk list is
what balances that on pyfaq (docs/benchmarks.md).

Each namespace may override the defaults (``control.kb_namespaces.retrieval``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

__all__ = [
    "FusionConfig",
    "Scored",
    "SearchMode",
    "fuse",
    "rank_candidates",
    "rank_documents",
]

SearchMode = Literal["hybrid", "dense", "lexical"]


@dataclass(frozen=True)
class FusionConfig:
    method: Literal["rrf", "blend"] = "blend"
    dense_weight: float = 0.2  # nearest chunks, best per document
    lexical_weight: float = 0.3  # BM25 chunks, best per document
    first_weight: float = 0.5  # nearest first chunks (0: the list is not searched)
    rrf_k: int = 60
    candidates: int = 300  # per list, before fusion
    normalization: Literal["dbsf", "minmax"] = "dbsf"  # how blend puts scores on one scale
    lead_bonus: float = 0.0  # added to first chunks in the chunk-level blend (citations)
    bm25_k1: float = 1.2
    bm25_b: float = 0.75
    max_df: float = 0.1  # terms in more chunks than this share do not select candidates

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> FusionConfig:
        known = set(cls.__dataclass_fields__)
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown retrieval settings: {sorted(unknown)}")
        return replace(cls(), **values)


Scored = tuple[float, dict[str, Any], int | None, int | None]
"""(fused score, candidate row, dense rank, lexical rank)."""


def _scale(values: npt.NDArray[np.float64], how: str) -> tuple[float, float]:
    """(low, span) that map one retriever's scores onto a common scale for blending:
    ``dbsf``, mean ± 3 standard deviations span [0, 1]; ``minmax``, the list's range."""
    if how == "dbsf":
        mean, sd = float(values.mean()), float(values.std()) or 1.0
        return mean - 3 * sd, 6 * sd
    lo = float(values.min())
    return lo, (float(values.max()) - lo) or 1.0


class _Columns:
    """Candidate rows as arrays: one pass over the rows, then fusion is array arithmetic
    (scores NaN where a list did not return the chunk)."""

    def __init__(self, rows: list[dict[str, Any]]) -> None:
        self.rows = rows
        n = len(rows)
        self.ids = np.array([str(r["id"]) for r in rows], dtype=np.str_)
        docs: dict[str, int] = {}
        self.doc = np.fromiter(
            (docs.setdefault(str(r["document_id"]), len(docs)) for r in rows), np.intp, n
        )
        self.doc_ids = np.array(list(docs), dtype=np.str_)
        self.first_chunk = np.fromiter((r["ordinal"] == 0 for r in rows), np.bool_, n)
        self.score = {
            column: np.fromiter(
                (np.nan if r[column] is None else r[column] for r in rows), np.float64, n
            )
            for column in ("sim", "first_sim", "lex")
        }

    def ranks(self, column: str) -> npt.NDArray[np.intp]:
        """1-based rank of each row by ``column``, best first (0: not in that list)."""
        values = self.score[column]
        present = np.flatnonzero(~np.isnan(values))
        order = present[np.argsort(-values[present], kind="stable")]
        ranks = np.zeros(len(values), dtype=np.intp)
        ranks[order] = np.arange(1, len(order) + 1)
        return ranks


def _scored(
    cols: _Columns,
    order: npt.NDArray[np.intp],
    score: npt.NDArray[np.float64],
    d_rank: npt.NDArray[np.intp] | None,
    l_rank: npt.NDArray[np.intp] | None,
) -> list[Scored]:
    return [
        (
            float(score[i]),
            cols.rows[i],
            int(d_rank[i]) or None if d_rank is not None else None,
            int(l_rank[i]) or None if l_rank is not None else None,
        )
        for i in order.tolist()
    ]


def _fuse(
    cols: _Columns, config: FusionConfig, mode: SearchMode, limit: int | None = None
) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.float64], list[Scored]]:
    if mode != "hybrid":
        column = "sim" if mode == "dense" else "lex"
        ranks = cols.ranks(column)
        order = np.argsort(np.where(ranks > 0, ranks, len(ranks) + 1), kind="stable")
        order = order[: int(np.count_nonzero(ranks))]
        score = cols.score[column]
        return (
            order,
            score,
            _scored(
                cols,
                order[:limit],
                score,
                ranks if mode == "dense" else None,
                ranks if mode == "lexical" else None,
            ),
        )
    d_rank, l_rank = cols.ranks("sim"), cols.ranks("lex")
    wd, wl = config.dense_weight, config.lexical_weight
    if config.method == "rrf":
        score = np.where(d_rank > 0, wd / (config.rrf_k + d_rank), 0.0) + np.where(
            l_rank > 0, wl / (config.rrf_k + l_rank), 0.0
        )
    else:
        score = np.zeros(len(cols.rows))
        for column, weight, ranks in (("sim", wd, d_rank), ("lex", wl, l_rank)):
            present = ranks > 0
            if present.any():
                values = cols.score[column][present]
                lo, span = _scale(values, config.normalization)
                score[present] += weight * (values - lo) / span
        score += config.lead_bonus * cols.first_chunk
    order = np.lexsort((cols.ids, -score))
    return order, score, _scored(cols, order[:limit], score, d_rank, l_rank)


def fuse(rows: list[dict[str, Any]], config: FusionConfig, mode: SearchMode) -> list[Scored]:
    """(fused score, row, dense rank, lexical rank) for every candidate, best first.

    ``dense`` and ``lexical`` modes rank by that retriever's score alone; ``hybrid``
    fuses both and adds ``lead_bonus`` to a document's first chunk (its title and
    opening: a position prior), in units of the normalised scale.
    """
    return _fuse(_Columns(rows), config, mode)[2]


_LISTS = (("first_sim", "first_weight"), ("sim", "dense_weight"), ("lex", "lexical_weight"))


def _document_scores(cols: _Columns, config: FusionConfig) -> npt.NDArray[np.float64]:
    scores = np.zeros(len(cols.doc_ids))
    for column, weight_name in _LISTS:
        weight = float(getattr(config, weight_name))
        values = cols.score[column]
        present = ~np.isnan(values)
        if not weight or not present.any():
            continue
        best = np.full(len(cols.doc_ids), -np.inf)
        np.maximum.at(best, cols.doc[present], values[present])
        listed = np.flatnonzero(best > -np.inf)
        if config.method == "rrf":
            order = listed[np.argsort(-best[listed], kind="stable")]
            scores[order] += weight / (config.rrf_k + np.arange(1, len(order) + 1))
        else:
            # the list's scale (over its chunks), applied to each document's best chunk
            lo, span = _scale(values[present], config.normalization)
            scores[listed] += weight * (best[listed] - lo) / span
    return scores


def rank_documents(rows: list[dict[str, Any]], config: FusionConfig) -> dict[str, float]:
    """Hybrid document scores: each list (``first_sim``, ``sim``, ``lex`` of the rows)
    aggregated per document (its best chunk in that list), then blended or RRF-fused."""
    cols = _Columns(rows)
    scores = _document_scores(cols, config)
    listed = np.zeros(len(cols.doc_ids), dtype=np.bool_)
    for column, weight_name in _LISTS:
        if getattr(config, weight_name):
            listed[cols.doc[~np.isnan(cols.score[column])]] = True
    return {str(d): float(v) for d, v, on in zip(cols.doc_ids, scores, listed, strict=True) if on}


def rank_candidates(
    rows: list[dict[str, Any]], config: FusionConfig, mode: SearchMode, limit: int | None = None
) -> tuple[list[Scored], list[tuple[str, float, dict[str, Any]]]]:
    """Chunks, best first (:func:`fuse`), and documents as (document id, score, best
    chunk's row), best first: in ``hybrid`` mode scored by :func:`rank_documents`, else by
    their best chunk; the first ``limit`` of each (default: all)."""
    cols = _Columns(rows)
    order, score, chunks = _fuse(cols, config, mode, limit)
    # each document's best chunk: its first place in the chunk order
    docs_in_order = cols.doc[order]
    seen, first_at = np.unique(docs_in_order, return_index=True)
    best_row = order[first_at]
    doc_score = _document_scores(cols, config)[seen] if mode == "hybrid" else score[best_row]
    ranked = np.lexsort((cols.doc_ids[seen], -doc_score))
    documents = [
        (str(cols.doc_ids[seen[i]]), float(doc_score[i]), cols.rows[best_row[i]])
        for i in ranked[:limit].tolist()
    ]
    return chunks, documents
