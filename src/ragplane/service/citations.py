"""Citation verification (lifecycle steps 8-9): every marker must point at a retrieved
chunk, and what the answer says there must be in that chunk.

An answer is read as segments, each ending where one or more markers ``[n]`` follow
text (or, for a marker that opens a line, the text after it). For each (segment, marker):

- a marker that numbers no passage of the context is **unsupported**;
- text in quotation marks inside the segment must occur in the chunk, verbatim up to
  case and spacing; if any does not, the citation is unsupported;
- otherwise the quoted span is the segment itself when the chunk holds it verbatim (an
  extractive answer), else the chunk's sentence that shares the most content words with
  the segment, if it holds at least half of them; else unsupported.

A supported citation carries the chunk's document, title, source, chunk id, the quoted
span and its character offsets in the document's text (the chunk's offsets plus the
span's place in the chunk). Unsupported markers are removed from the answer text and
counted; repeated citations of one span are reported once.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

from ragplane.service.context import AssembledContext

__all__ = ["Citation", "VerifiedAnswer", "verify_citations"]

_MARKERS = re.compile(r"(?:\s*\[\d{1,3}\])+")
_MARKER = re.compile(r"\[(\d{1,3})\]")
_QUOTED = re.compile(r"[\"\u201c\u201d]([^\"\u201c\u201d]{8,})[\"\u201c\u201d]")
_SENTENCE = re.compile(r"(?<=[.!?])\s+|\s*\n\s*")  # sentences and lines
_WORD = re.compile(r"[a-z0-9]+(?:['\u2019][a-z]+)?")
_SPACE = re.compile(r"\s+")
_STOP = frozenset(
    [
        "a",
        "an",
        "the",
        "and",
        "or",
        "but",
        "if",
        "of",
        "to",
        "in",
        "on",
        "at",
        "by",
        "for",
        "with",
        "from",
        "as",
        "is",
        "are",
        "was",
        "were",
        "be",
        "been",
        "it",
        "its",
        "this",
        "that",
        "these",
        "those",
        "you",
        "your",
        "we",
        "our",
        "they",
        "their",
        "he",
        "she",
        "his",
        "her",
        "i",
        "my",
        "me",
        "do",
        "does",
        "did",
        "can",
        "could",
        "will",
        "would",
        "should",
        "may",
        "might",
        "must",
        "not",
        "no",
        "so",
        "than",
        "then",
        "there",
    ]
)


@dataclass(frozen=True)
class Citation:
    marker: str
    document_id: str
    title: str
    source_uri: str
    chunk_id: str
    char_start: int
    char_end: int
    quote: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class VerifiedAnswer:
    text: str  # the answer without its unsupported markers
    citations: tuple[Citation, ...]
    dropped: int  # unsupported citations removed


def _fold(text: str) -> str:
    return _SPACE.sub(" ", text).strip().lower()


def _content(text: str) -> set[str]:
    return {w for w in _WORD.findall(text.lower()) if w not in _STOP}


def _find(haystack: str, needle: str) -> tuple[int, int] | None:
    """``needle``'s place in ``haystack``, matching case- and space-insensitively."""
    words = needle.split()
    if not words:
        return None
    pattern = r"\s+".join(re.escape(w) for w in words)
    m = re.search(pattern, haystack, re.IGNORECASE)
    return (m.start(), m.end()) if m else None


def _segments(answer: str) -> list[tuple[str, list[tuple[int, int, int]]]]:
    """(segment text, [(marker number, start, end) in ``answer``]). A marker group with
    no text before it on its line (``[1] The policy says …``) cites the text after it,
    up to the next marker or line."""
    groups = list(_MARKERS.finditer(answer))
    out: list[tuple[str, list[tuple[int, int, int]]]] = []
    last = 0
    for i, group in enumerate(groups):
        text = answer[last : group.start()]
        if not text.strip() or text.endswith("\n"):
            end = groups[i + 1].start() if i + 1 < len(groups) else len(answer)
            text = answer[group.end() : end].split("\n\n")[0]
        markers = [
            (int(m.group(1)), group.start() + m.start(), group.start() + m.end())
            for m in _MARKER.finditer(group.group())
        ]
        out.append((text, markers))
        last = group.end()
    return out


def _span(segment: str, chunk_text: str) -> tuple[int, int] | None:
    segment = segment.strip().strip('"“”')
    # only the segment's last sentence belongs to this marker when several precede it
    tail = _SENTENCE.split(segment.strip())[-1] if segment else ""
    for candidate in (segment, tail):
        found = _find(chunk_text, candidate)
        if found is not None and len(candidate.split()) >= 3:
            return found
    words = _content(tail or segment)
    if not words:
        return None
    best: tuple[int, tuple[int, int]] | None = None
    pos = 0
    for sentence in _SENTENCE.split(chunk_text):
        start = chunk_text.find(sentence, pos)
        pos = start + len(sentence)
        if not sentence or sentence.lstrip().startswith("#"):  # a heading is not a claim
            continue
        shared = len(words & _content(sentence))
        if shared and (best is None or shared > best[0]):
            best = (shared, (start, start + len(sentence)))
    if best is None or best[0] * 2 < len(words):
        return None
    return best[1]


def verify_citations(answer: str, context: AssembledContext) -> VerifiedAnswer:
    citations: dict[tuple[str, int, int], Citation] = {}
    remove: list[tuple[int, int]] = []
    for segment, markers in _segments(answer):
        quotes = [q.strip() for q in _QUOTED.findall(segment)]
        for number, start, end in markers:
            passage = context.by_number(number)
            span = None
            if passage is not None:
                text = passage.chunk.text
                if all(_find(text, q) is not None for q in quotes):
                    span = _find(text, quotes[0]) if quotes else _span(segment, text)
            if passage is None or span is None:
                remove.append((start, end))
                continue
            chunk = passage.chunk
            key = (chunk.chunk_id, span[0], span[1])
            citations.setdefault(
                key,
                Citation(
                    marker=passage.marker,
                    document_id=chunk.document_id,
                    title=chunk.title,
                    source_uri=chunk.source_uri,
                    chunk_id=chunk.chunk_id,
                    char_start=chunk.char_start + span[0],
                    char_end=chunk.char_start + span[1],
                    quote=chunk.text[span[0] : span[1]],
                ),
            )
    text = answer
    for start, end in sorted(remove, reverse=True):
        text = text[:start] + text[end:]
    if remove:
        text = re.sub(r"[ \t]+([.,;:!?])", r"\1", re.sub(r"[ \t]{2,}", " ", text)).rstrip()
    return VerifiedAnswer(text, tuple(citations.values()), len(remove))
