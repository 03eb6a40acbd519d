"""The learned prompt-injection classifier: logistic regression on the query's embedding.

The heuristics in :mod:`ragplane.service._injection` read the words; this model reads
the sentence embedding the lifecycle already computes for the semantic cache and
retrieval, so it costs one dot product (a few microseconds), not a second network.
It scores ``sigmoid(w · v + b)`` for a unit vector ``v`` of the embedding model it was
trained for (``embedding_model``); a query embedded by any other model is not scored —
its vector means something else.

The weights ship in ``injection_model.json`` beside this module, written by
``python -m ragplane.evals.train_injection`` from a public labelled set that is not the
one ``ragplane bench guard`` evaluates on; the file records where its data came from,
the regularisation and threshold chosen on that set's validation split, and the scores
on its test split (docs/guardrails.md).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from ragplane.errors import ConfigError

__all__ = ["DEFAULT_MODEL_PATH", "InjectionModel"]

DEFAULT_MODEL_PATH = Path(__file__).with_name("injection_model.json")


@dataclass(frozen=True)
class InjectionModel:
    """A linear classifier over one embedding model's unit vectors."""

    id: str
    embedding_model: str
    weights: npt.NDArray[np.float32]
    bias: float
    threshold: float  # a score at or above it is an injection
    about: dict[str, Any]  # provenance and measurements, as written by the trainer

    def score(self, vector: npt.NDArray[np.float32]) -> float:
        if vector.shape != self.weights.shape:
            raise ValueError(
                f"{self.id}: expected a vector of {self.weights.shape[0]} dimensions, "
                f"got shape {vector.shape}"
            )
        z = float(np.dot(self.weights, vector)) + self.bias
        return 1.0 / (1.0 + math.exp(-z)) if z > -500 else 0.0

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "embedding_model": self.embedding_model,
            "threshold": self.threshold,
            "bias": self.bias,
            "weights": [float(f"{w:.7g}") for w in self.weights.tolist()],
            **self.about,
        }

    @classmethod
    def load(cls, path: Path = DEFAULT_MODEL_PATH) -> InjectionModel:
        """Read a model file; a missing or malformed one is a :class:`ConfigError` naming it."""
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            weights = np.asarray(data["weights"], dtype=np.float32)
            model = cls(
                id=str(data["id"]),
                embedding_model=str(data["embedding_model"]),
                weights=weights,
                bias=float(data["bias"]),
                threshold=float(data["threshold"]),
                about={
                    k: v
                    for k, v in data.items()
                    if k not in {"id", "embedding_model", "weights", "bias", "threshold"}
                },
            )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"injection model {path}: {type(exc).__name__}: {exc}") from exc
        if weights.ndim != 1 or not weights.size or not np.isfinite(weights).all():
            raise ConfigError(f"injection model {path}: weights must be a list of finite numbers")
        if not 0.0 < model.threshold < 1.0:
            raise ConfigError(f"injection model {path}: threshold must be between 0 and 1")
        return model
