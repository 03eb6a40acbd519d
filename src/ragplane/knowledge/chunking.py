"""Structure-aware chunking of a :class:`~ragplane.knowledge.types.ParsedDocument`.

A chunk never spans two sections, with one exception: a section that is a single line
(in practice a bare heading, such as ``# Guide`` directly followed by ``## Install``) is
merged into the next section when that section lies under it (its heading path extends
the single line's path). A chunk carries the heading path of the last section it reaches
into, so a merged heading travels with the text under it. Nothing else is merged.

Within a section the text is cut, coarsest first, at:

1. paragraphs (blank lines). A paragraph that fits in ``policy.max_tokens`` is one unit,
   unless a chunk that is less than half full would otherwise have to be closed: then it
   is split into its sentences to fill that chunk;
2. sentences (:func:`sentence_spans`);
3. for a sentence longer than ``max_tokens``, the longest run of whole words that fits,
   found by bisection with ``count_tokens`` (a line break in the second half of that run
   is preferred). Only a single "word" (a run without whitespace) that alone exceeds
   ``max_tokens`` is cut between characters, so that no chunk is over the limit.

Units are packed greedily up to ``max_tokens``. Each next chunk of the same section starts
with the trailing sentences of the previous chunk whose tokens together are at most
``policy.overlap_tokens`` (never the whole previous chunk, and fewer if the first new unit
would not fit otherwise). Sentences are not cut for the overlap, so a chunk that ends in a
sentence longer than ``overlap_tokens`` is followed by one without overlap; the one
exception is the last run of words of an over-long sentence, which counts as a sentence.

Guarantees: ``chunk.text == doc.text[chunk.start:chunk.end]`` with no surrounding
whitespace, ``token_count == count_tokens(chunk.text) <= max_tokens`` (for a monotone
``count_tokens``), ordinals 0..n-1 in document order, no empty chunk, every non-whitespace
character of every section in some chunk, and the same chunks for the same input.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from ragplane.knowledge.types import ChunkDraft, ChunkingPolicy, ParsedDocument, Section

__all__ = ["ABBREVIATIONS", "CHUNKER_VERSION", "chunk", "paragraph_spans", "sentence_spans"]

CHUNKER_VERSION = 1
"""Bumped whenever the same document and policy would be cut differently, so idempotent
ingestion can fold it into the content hash that decides whether to re-chunk."""

ABBREVIATIONS = frozenset(
    {"e.g", "i.e", "cf", "vs", "viz", "al", "approx", "ca", "resp", "fig", "figs"}
    | {"eq", "eqs", "no", "nos", "vol", "p", "pp", "ch", "sec", "ed", "eds", "ref", "refs"}
    | {"mr", "mrs", "ms", "dr", "prof", "sr", "jr", "st", "mt", "inc", "ltd", "co", "corp"}
    | {"jan", "feb", "mar", "apr", "jun", "jul", "aug", "sep", "sept", "oct", "nov", "dec"}
)
"""Words (lower case, without the final dot) after which a period does not end a sentence."""

_BLANK_LINE = re.compile(r"\n[^\S\n]*\n\s*")
# end punctuation, closing quotes or brackets, then whitespace
_CLOSERS = "\"'\u201d\u2019\u00bb)]"
_SENTENCE_END = re.compile(rf"[.!?\u2026]+[{re.escape(_CLOSERS)}]*\s+")
# a line that starts a list item or a table row also starts a unit
_LINE_ITEM = re.compile(r"\n(?=[^\S\n]*(?:[-*+•]|\d{1,3}[.)]|\|)[^\S\n])")
_OPENERS = "\"'\u201c\u2018\u00ab(["
_WORD = re.compile(r"\S+")


def paragraph_spans(text: str, start: int = 0, end: int | None = None) -> list[tuple[int, int]]:
    """(start, end) of each paragraph of ``text[start:end]``: runs separated by blank lines,
    without surrounding whitespace."""
    end = len(text) if end is None else end
    cuts = [(m.start(), m.end()) for m in _BLANK_LINE.finditer(text, start, end)]
    return _between(text, start, end, cuts)


def sentence_spans(text: str, start: int = 0, end: int | None = None) -> list[tuple[int, int]]:
    """(start, end) of each sentence of ``text[start:end]``, without surrounding whitespace.

    A sentence ends at ``.``, ``!``, ``?`` or ``…`` (and any closing quotes or brackets)
    followed by whitespace and then an upper-case letter or a digit, optionally behind an
    opening quote or bracket. A period does not end a sentence after a word in
    :data:`ABBREVIATIONS` (``e.g.``, ``Mr.``), after a single letter (an initial, as in
    ``J. Smith``) or after a number that starts its line (``1. First``); decimals
    (``3.14``) have no whitespace after the period. A line that starts a list item (``-``,
    ``*``, ``+``, ``1.``) or a table row (``|``) also starts a sentence.
    """
    end = len(text) if end is None else end
    cuts = [(m.start(), m.start() + 1) for m in _LINE_ITEM.finditer(text, start, end)]
    for m in _SENTENCE_END.finditer(text, start, end):
        after = m.end()
        if after < end and text[after] in _OPENERS:
            after += 1
        if after >= end or not (text[after].isupper() or text[after].isdigit()):
            continue
        if text[m.start()] == "." and m.group().count(".") == 1 and _abbreviation(text, m.start()):
            continue
        cuts.append((m.start() + len(m.group().rstrip()), m.end()))
    cuts.sort()
    return _between(text, start, end, cuts)


def _abbreviation(text: str, dot: int) -> bool:
    """Whether the period at ``dot`` ends an abbreviation, an initial or the number of an
    ordered-list item (a number first on its line)."""
    begin = dot
    while begin > 0 and not text[begin - 1].isspace():
        begin -= 1
    word = text[begin:dot].lstrip(_OPENERS).lower()
    if word.isdigit():
        return not text[text.rfind("\n", 0, begin) + 1 : begin].strip()
    return word in ABBREVIATIONS or (len(word) == 1 and word.isalpha())


def _between(text: str, start: int, end: int, cuts: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The non-blank spans of ``text[start:end]`` between ascending ``cuts``, trimmed."""
    spans = []
    position = start
    for cut_start, cut_end in [*cuts, (end, end)]:
        if cut_start < position:
            continue
        s, e = _trim(text, position, cut_start)
        if s < e:
            spans.append((s, e))
        position = cut_end
    return spans


def _trim(text: str, start: int, end: int) -> tuple[int, int]:
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


@dataclass(frozen=True)
class _Unit:
    start: int
    end: int
    tokens: int
    paragraph: bool  # a whole paragraph, which may still be split into its sentences


class _Chunker:
    def __init__(
        self, text: str, policy: ChunkingPolicy, count_tokens: Callable[[str], int]
    ) -> None:
        self.text = text
        self.max = policy.max_tokens
        self.overlap = policy.overlap_tokens
        self._count = count_tokens
        self._counted: dict[tuple[int, int], int] = {}

    def tokens(self, start: int, end: int) -> int:
        key = (start, end)
        if key not in self._counted:
            self._counted[key] = self._count(self.text[start:end])
        return self._counted[key]

    # -- units -----------------------------------------------------------------------------

    def units(self, start: int, end: int) -> list[_Unit]:
        units = []
        for p_start, p_end in paragraph_spans(self.text, start, end):
            tokens = self.tokens(p_start, p_end)
            if tokens <= self.max:
                units.append(_Unit(p_start, p_end, tokens, paragraph=True))
            else:
                units.extend(self.sentences(p_start, p_end))
        return units

    def sentences(self, start: int, end: int) -> list[_Unit]:
        """The sentences of a paragraph, over-long ones split into runs of words."""
        units = []
        for s_start, s_end in sentence_spans(self.text, start, end):
            tokens = self.tokens(s_start, s_end)
            if tokens <= self.max:
                units.append(_Unit(s_start, s_end, tokens, paragraph=False))
            else:
                units.extend(self.split_long(s_start, s_end))
        return units

    def split_long(self, start: int, end: int) -> Iterator[_Unit]:
        words = [(m.start(), m.end()) for m in _WORD.finditer(self.text, start, end)]
        word_ends = [e for _, e in words]
        i = 0
        while i < len(words):
            first_start = words[i][0]
            if self.tokens(*words[i]) > self.max:
                yield from self.split_word(*words[i])
                i += 1
                continue
            j = self.longest(first_start, word_ends, i, len(words) - 1) + 1
            if j < len(words):  # prefer to end at a line break in the second half of the run
                for k in range(j - 1, i + max(1, (j - i + 1) // 2) - 1, -1):
                    if "\n" in self.text[words[k - 1][1] : words[k][0]]:
                        j = k
                        break
            piece_end = words[j - 1][1]
            yield _Unit(
                first_start, piece_end, self.tokens(first_start, piece_end), paragraph=False
            )
            i = j

    def split_word(self, start: int, end: int) -> Iterator[_Unit]:
        """Last resort for a run without whitespace that alone exceeds max_tokens."""
        while start < end:
            cut = start + 1 + self.longest(start, range(start + 1, end + 1), 0, end - start - 1)
            yield _Unit(start, cut, self.tokens(start, cut), paragraph=False)
            start = cut

    def longest(self, start: int, ends: Sequence[int], low: int, high: int) -> int:
        """The largest x in [low, high] with ``text[start:ends[x]]`` within max_tokens
        (``low`` even if that is over). Gallops from ``low``, then bisects, so the cost
        grows with the answer rather than with ``high``."""
        good, step = low, 1
        while good < high:
            probe = min(good + step, high)
            if self.tokens(start, ends[probe]) > self.max:
                high = probe - 1
                break
            good, step = probe, step * 2
        while good < high:
            middle = (good + high + 1) // 2
            if self.tokens(start, ends[middle]) <= self.max:
                good = middle
            else:
                high = middle - 1
        return good

    # -- packing ---------------------------------------------------------------------------

    def pack(self, start: int, end: int) -> Iterator[tuple[int, int, int]]:
        """(start, end, tokens) of the chunks of one section.

        Packing adds up the units' counts; ``count_tokens`` need not be additive, so each
        chunk is then counted once as a whole and shrunk while it is over the limit.
        """
        units = self.units(start, end)
        i = 0
        previous_end = -1
        overlap: list[int] = []
        while i < len(units):
            overlap_tokens = self.tokens(overlap[0], previous_end) if overlap else 0
            while overlap and overlap_tokens + units[i].tokens > self.max:
                overlap.pop(0)
                overlap_tokens = self.tokens(overlap[0], previous_end) if overlap else 0
            used = overlap_tokens + units[i].tokens
            j = i + 1
            while j < len(units):
                if used + units[j].tokens <= self.max:
                    used += units[j].tokens
                    j += 1
                elif units[j].paragraph and 2 * used < self.max:
                    units[j : j + 1] = self.sentences(units[j].start, units[j].end)
                else:
                    break
            while True:
                begin = overlap[0] if overlap else units[i].start
                used = self.tokens(begin, units[j - 1].end)
                if used <= self.max:
                    break
                if j - 1 > i:
                    j -= 1
                elif overlap:
                    overlap.pop(0)
                else:  # one unit over the limit: only with a count_tokens that is not monotone
                    break
            yield begin, units[j - 1].end, used
            previous_end = units[j - 1].end
            overlap = self.overlap_starts(begin, previous_end) if j < len(units) else []
            i = j

    def overlap_starts(self, start: int, end: int) -> list[int]:
        """Start offsets of the trailing sentences of ``text[start:end]``, longest overlap
        first, that fit in overlap_tokens; the first sentence is never included."""
        if self.overlap <= 0:
            return []
        sentences = [
            s_start
            for p_start, p_end in paragraph_spans(self.text, start, end)
            for s_start, _ in sentence_spans(self.text, p_start, p_end)
        ]
        starts: list[int] = []
        for s_start in reversed(sentences[1:]):
            if self.tokens(s_start, end) > self.overlap:
                break
            starts.insert(0, s_start)
        return starts


def _groups(sections: tuple[Section, ...]) -> Iterator[list[Section]]:
    """The chunking regions: each a section, or a run of single-line sections followed by
    the section they are merged into (each nested under the one before)."""
    group: list[Section] = []
    for section, following in zip(sections, [*sections[1:], None], strict=True):
        group.append(section)
        nested = (
            following is not None
            and len(following.heading_path) > len(section.heading_path) > 0
            and following.heading_path[: len(section.heading_path)] == section.heading_path
        )
        if not (nested and "\n" not in section.text.strip()):
            yield group
            group = []


def chunk(
    doc: ParsedDocument, policy: ChunkingPolicy, count_tokens: Callable[[str], int]
) -> list[ChunkDraft]:
    """Cut ``doc`` into chunks of at most ``policy.max_tokens`` tokens (see the module doc).

    ``doc.sections`` must be ordered and non-overlapping; a document without sections is
    chunked as one section with the empty heading path. A chunk's heading path is that of
    the last section it reaches into.
    """
    sections = doc.sections or (Section((), doc.text, 0, len(doc.text)),)
    chunker = _Chunker(doc.text, policy, count_tokens)
    drafts: list[ChunkDraft] = []
    for group in _groups(sections):
        for start, end, tokens in chunker.pack(group[0].start, group[-1].end):
            path = next(s.heading_path for s in reversed(group) if s.start < end)
            drafts.append(
                ChunkDraft(
                    ordinal=len(drafts),
                    text=doc.text[start:end],
                    heading_path=path,
                    start=start,
                    end=end,
                    token_count=tokens,
                )
            )
    return drafts
