"""Context assembly (lifecycle step 6): retrieved chunks into a numbered, budgeted prompt.

The budget is the alias's context window less the output it reserves and the prompt's
own text (instructions, history, question). Chunks are taken in rank order; a chunk
whose text is already in the context (the same chunk, or the same words under another
id — a document ingested twice, an overlap) is skipped; a chunk that does not fit is
skipped (a smaller one after it may). Each passage gets a marker ``[n]``, numbered in
the order they appear, and a title line, in the format every provider adapter and the
no-model ``local-extractive`` provider read::

    Sources:
    [1] Refund policy for EU customers
    EU customers can return any item within 30 days ...

    Question: What is our refund policy for EU customers?

Token counts are an estimate (4/3 of the whitespace-separated words, the same rule
the no-model provider reports usage with); the budget keeps a margin for the error.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from ragplane.knowledge.search import ChunkHit

__all__ = [
    "PROMPT_VERSION",
    "SYSTEM_PROMPT",
    "AssembledContext",
    "Passage",
    "assemble",
    "estimate_tokens",
    "excerpt",
    "prompt_messages",
]

PROMPT_VERSION = "rag-v1"
SYSTEM_PROMPT = (
    "Answer the question using only the sources below. After each sentence, cite the "
    "source it comes from with its marker, like [1]. Prefer the sources' own words. If "
    "the sources do not answer the question, say that you could not find it."
)
BUDGET_MARGIN = 0.9  # of the estimated room: the estimate is not the model's tokenizer
_SPACE = re.compile(r"\s+")
_HEADING = re.compile(r"^\s{0,3}#{1,6}\s")


def estimate_tokens(text: str) -> int:
    words = len(text.split())
    return words + words // 3


@dataclass(frozen=True)
class Passage:
    number: int
    chunk: ChunkHit

    @property
    def marker(self) -> str:
        return f"[{self.number}]"


@dataclass(frozen=True)
class AssembledContext:
    passages: tuple[Passage, ...]
    tokens: int  # the estimated prompt size
    budget: int  # the room the passages had
    skipped_duplicates: int
    skipped_over_budget: int

    def by_number(self, number: int) -> Passage | None:
        if 1 <= number <= len(self.passages):
            return self.passages[number - 1]
        return None


def _passage_text(number: int, chunk: ChunkHit) -> str:
    """The passage as the prompt shows it: the document's title and the chunk's section
    on the marker's line, then the chunk's text without its Markdown heading lines (the
    title line says where it is; a heading is not a sentence to quote)."""
    title = chunk.title.strip() or chunk.source_uri
    section = chunk.heading_path[-1].strip() if chunk.heading_path else ""
    if section and section.lower() != title.lower():
        title = f"{title} - {section}"
    body = "\n".join(line for line in chunk.text.strip().splitlines() if not _HEADING.match(line))
    return f"[{number}] {title}\n{body.strip()}"


def _question(query: str) -> str:
    return f"Question: {query.strip()}"


def assemble(
    chunks: Sequence[ChunkHit],
    query: str,
    *,
    context_window: int,
    reserved_output: int,
    history: Sequence[dict[str, str]] = (),
) -> AssembledContext:
    """The passages that fit, numbered in rank order (module docstring)."""
    fixed = (
        estimate_tokens(SYSTEM_PROMPT)
        + estimate_tokens(_question(query))
        + sum(estimate_tokens(m["content"]) + 4 for m in history)
        + 16  # role and framing overhead
    )
    budget = max(0, int((context_window - reserved_output - fixed) * BUDGET_MARGIN))
    used = 0
    seen: set[str] = set()
    passages: list[Passage] = []
    duplicates = over = 0
    for chunk in chunks:
        key = _SPACE.sub(" ", chunk.text).strip().lower()
        if chunk.chunk_id in seen or key in seen:
            duplicates += 1
            continue
        cost = estimate_tokens(_passage_text(len(passages) + 1, chunk)) + 2
        if used + cost > budget:
            over += 1
            continue
        seen.update((chunk.chunk_id, key))
        passages.append(Passage(len(passages) + 1, chunk))
        used += cost
    return AssembledContext(tuple(passages), fixed + used, budget, duplicates, over)


def prompt_messages(
    context: AssembledContext, query: str, history: Sequence[dict[str, str]] = ()
) -> list[dict[str, str]]:
    """System instructions, the conversation so far, then sources and question."""
    sources = "\n\n".join(_passage_text(p.number, p.chunk) for p in context.passages)
    user = (f"Sources:\n{sources}\n\n" if sources else "") + _question(query)
    return [
        {"role": "system", "content": SYSTEM_PROMPT},
        *({"role": m["role"], "content": m["content"]} for m in history),
        {"role": "user", "content": user},
    ]


_FIRST_SENTENCE = re.compile(r"(?<=[.!?])\s+")


def excerpt(context: AssembledContext, *, passages: int = 2) -> str:
    """The opening sentence of the first ``passages`` passages, each followed by its
    marker: an answer in the knowledge base's own words, for when no model can be asked
    (offline mode)."""
    parts = []
    for passage in context.passages[:passages]:
        lines = [
            ln for ln in passage.chunk.text.splitlines() if ln.strip() and not _HEADING.match(ln)
        ]
        first = _FIRST_SENTENCE.split(" ".join(lines).strip(), maxsplit=1)[0]
        if len(first.split()) >= 3:
            parts.append(f"{first} {passage.marker}")
    return " ".join(parts)
