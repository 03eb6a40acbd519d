"""BEIR-style ranking metrics, checked against hand-computed values."""

from __future__ import annotations

import math

import pytest

from ragplane.evals.metrics import ndcg_at_k, recall_at_k


def test_ndcg_of_a_perfect_ranking_is_one() -> None:
    assert ndcg_at_k(["a", "b", "c"], {"a": 1}, 10) == 1.0


def test_ndcg_discounts_by_log2_of_the_rank() -> None:
    # one relevant document at rank 3: 1/log2(4) over an ideal of 1
    assert ndcg_at_k(["x", "y", "a"], {"a": 1}, 10) == pytest.approx(1 / math.log2(4))


def test_ndcg_with_graded_relevance() -> None:
    ranked = ["b", "a"]
    qrels = {"a": 2, "b": 1}
    dcg = 1 / math.log2(2) + 2 / math.log2(3)
    idcg = 2 / math.log2(2) + 1 / math.log2(3)
    assert ndcg_at_k(ranked, qrels, 10) == pytest.approx(dcg / idcg)


def test_ndcg_ignores_hits_beyond_k_and_duplicates() -> None:
    assert ndcg_at_k(["x"] * 10 + ["a"], {"a": 1}, 10) == 0.0
    assert ndcg_at_k(["a", "a"], {"a": 1, "b": 1}, 10) == pytest.approx(1 / (1 + 1 / math.log2(3)))


def test_recall_at_k() -> None:
    qrels = {"a": 1, "b": 1, "c": 0}
    assert recall_at_k(["a", "x", "b"], qrels, 2) == 0.5
    assert recall_at_k(["a", "x", "b"], qrels, 3) == 1.0
    assert recall_at_k([], qrels, 10) == 0.0
    assert recall_at_k(["a"], {}, 10) == 0.0
