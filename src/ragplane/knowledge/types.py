"""Values passed between the stages of ingestion: parse → chunk → embed → store."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

__all__ = [
    "ChunkDraft",
    "ChunkingPolicy",
    "Embedder",
    "ParsedDocument",
    "Section",
]


@dataclass(frozen=True)
class Section:
    """A structural unit of a document: the text under one heading path.

    ``start``/``end`` are character offsets into :attr:`ParsedDocument.text`, and
    ``text == document.text[start:end]``.
    """

    heading_path: tuple[str, ...]
    text: str
    start: int
    end: int


@dataclass(frozen=True)
class ParsedDocument:
    """One document as extracted from its source.

    ``text`` is the document's full extracted text; every offset (of sections and
    chunks) refers to it. For plain text and Markdown it is the source itself.
    """

    source_uri: str
    title: str
    text: str
    sections: tuple[Section, ...]
    media_type: str
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ChunkingPolicy:
    """Per knowledge-base namespace: chunk size and overlap, in embedding-model tokens."""

    max_tokens: int = 256
    overlap_tokens: int = 32

    def __post_init__(self) -> None:
        if self.max_tokens < 16:
            raise ValueError(f"max_tokens must be at least 16, got {self.max_tokens}")
        if not 0 <= self.overlap_tokens < self.max_tokens // 2:
            raise ValueError(
                f"overlap_tokens must be in [0, max_tokens/2), got {self.overlap_tokens}"
            )


@dataclass(frozen=True)
class ChunkDraft:
    """A chunk before it is embedded and stored; ``text == document.text[start:end]``."""

    ordinal: int
    text: str
    heading_path: tuple[str, ...]
    start: int
    end: int
    token_count: int


class Embedder(Protocol):
    """Turns texts into L2-normalised float32 vectors of one model."""

    @property
    def model_id(self) -> str:
        """The pinned model name stored on every chunk (e.g. ``all-minilm-l6-v2``)."""
        ...

    @property
    def dimensions(self) -> int: ...

    @property
    def max_tokens(self) -> int:
        """Inputs longer than this many tokens are truncated by the model."""
        ...

    def count_tokens(self, text: str) -> int:
        """Tokens the model sees for ``text`` (without special tokens)."""
        ...

    async def embed(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        """Shape ``(len(texts), dimensions)``, each row of unit length, in input order."""
        ...
