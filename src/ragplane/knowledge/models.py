"""Embedding models by id: which embedders this process can run, and the switch error.

A namespace is pinned to one model (``control.kb_namespaces.embedding_model``) and its
data plane says which model queries are answered with (``kb_state.active_model``). Both
change together only at the end of a model switch (``ragplane.knowledge.switch``), so a
process that ingests or searches picks the embedder *per namespace* from an
:class:`EmbedderRegistry` instead of holding one embedder.

:class:`ModelSwitched` is the :class:`~ragplane.errors.ModelMismatch` of a namespace
whose model was switched while a run was under way, to a model this process can run:
the run's remaining work belongs to the new model, and a rerun does it (the ingest job
treats it as transient).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from ragplane.errors import ModelMismatch
from ragplane.knowledge.types import Embedder

if TYPE_CHECKING:
    from ragplane.knowledge.embedder import LocalEmbedder

__all__ = ["EmbedderRegistry", "MemoisedEmbedder", "ModelSwitched"]


class ModelSwitched(ModelMismatch):
    """The namespace now answers with another model, which a rerun can embed with."""

    def __init__(self, message: str, *, namespace: str, active_model: str) -> None:
        super().__init__(message)
        self.namespace = namespace
        self.active_model = active_model


class EmbedderRegistry:
    """The embedders one process can run, by model id (the first is the default)."""

    def __init__(self, embedders: Iterable[Embedder]) -> None:
        self._by_id: dict[str, Embedder] = {}
        for e in embedders:
            if e.model_id in self._by_id:
                raise ValueError(f"two embedders for model {e.model_id!r}")
            self._by_id[e.model_id] = e
        if not self._by_id:
            raise ValueError("an embedder registry needs at least one embedder")

    @classmethod
    def of(cls, source: Embedder | EmbedderRegistry) -> EmbedderRegistry:
        """``source`` itself, or a registry of that one embedder."""
        return source if isinstance(source, EmbedderRegistry) else cls([source])

    @classmethod
    def local(cls, base: LocalEmbedder | None = None) -> EmbedderRegistry:
        """Both local models (mean and CLS pooling of the bundled network), one session.

        ``base`` (default: a new mean-pooling :class:`LocalEmbedder`) is the default
        embedder; nothing is loaded until first use.
        """
        from ragplane.knowledge.embedder import LocalEmbedder

        first = base or LocalEmbedder()
        others = [first.variant(p) for p in ("mean", "cls") if p != first.pooling]
        return cls([first, *others])

    @property
    def default(self) -> Embedder:
        return next(iter(self._by_id.values()))

    @property
    def model_ids(self) -> tuple[str, ...]:
        return tuple(self._by_id)

    def find(self, model_id: str) -> Embedder | None:
        return self._by_id.get(model_id)

    def __contains__(self, model_id: object) -> bool:
        return model_id in self._by_id

    def describe(self) -> str:
        """For error messages: ``'a'`` or ``'a', 'b'``."""
        return ", ".join(repr(m) for m in self._by_id)


class MemoisedEmbedder:
    """An embedder that embeds each distinct text once (the same documents ingested into
    several namespaces, e.g. the demo knowledge base into each demo tenant)."""

    def __init__(self, base: Embedder) -> None:
        self._base = base
        self._vectors: dict[str, npt.NDArray[np.float32]] = {}

    @property
    def model_id(self) -> str:
        return self._base.model_id

    @property
    def dimensions(self) -> int:
        return self._base.dimensions

    @property
    def max_tokens(self) -> int:
        return self._base.max_tokens

    def count_tokens(self, text: str) -> int:
        return self._base.count_tokens(text)

    async def embed(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        missing = list(dict.fromkeys(t for t in texts if t not in self._vectors))
        if missing:
            for text, vector in zip(missing, await self._base.embed(missing), strict=True):
                self._vectors[text] = vector
        if not texts:
            return np.zeros((0, self.dimensions), dtype=np.float32)
        return np.stack([self._vectors[t] for t in texts])
