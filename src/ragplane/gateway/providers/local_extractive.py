"""The no-model provider: answers an OpenAI chat-completions request by selecting
sentences from the context passages in its prompt, quoting them verbatim and keeping
their citation markers, so the embedded default answers faithfully with no API key and
no model download. It is a :class:`~ragplane.gateway.types.Transport` for
``local:/v1/chat/completions`` and speaks the OpenAI wire protocol (JSON, or an SSE
stream of ``chat.completion.chunk`` frames ending in ``data: [DONE]``).

Prompt format (what the RAG service sends; any system, developer, user or tool message
may hold passages)::

    Answer from the sources below and cite them as [n].   (instructions: ignored)

    Sources:                    (optional label: Context, Sources, Passages, Documents)
    [1] Installing packages     (a short first line without end punctuation is a title)
    Use pip to install packages from PyPI. It resolves dependencies.

    [2] The first line may also be text. A passage runs to the next [n] marker, a
    label line (Question:, Instructions:, Answer:, ...) or the end of the message.

    Question: How do I install a package?

The question is the text after a ``Question:``/``Query:``/``Q:`` label in the last user
message; else that message's text outside its passages (all of it when it has none).

Selection: sentences (at least three words) are scored against the question's content
words (lower-cased, stop words dropped, light suffix stemming) with BM25, IDF taken over
the passages. A sentence is a candidate when it covers at least a quarter of the
question's IDF mass and scores at least half the best; the best of them (at most four,
within ``max_tokens``) are kept in prompt order, each quoted verbatim and followed by its
passage's marker: ``Use pip to install packages from PyPI. [1]``. No passages or no
candidate → :data:`NOT_FOUND`, with no citation. When not even the best sentence fits
``max_tokens``, a verbatim prefix of it is returned with ``finish_reason: "length"``.

Usage is an approximation, consistent everywhere: ``tokens = words + words // 3``
(about 4/3 token per whitespace-separated word); prompt tokens count every message's
text. The answer is deterministic (ids and ``created`` are not).
"""

from __future__ import annotations

import functools
import math
import re
import time
import uuid
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from ragplane.gateway.providers._local import (
    JSON_HEADERS,
    SSE_DONE,
    SSE_HEADERS,
    MemoryResponse,
    message_text,
    parse_chat_request,
    sse_frame,
    wants_usage,
)
from ragplane.gateway.types import UpstreamRequest

__all__ = [
    "NOT_FOUND",
    "Answer",
    "LocalExtractiveTransport",
    "Passage",
    "approx_tokens",
    "compose_answer",
    "parse_passages",
]

NOT_FOUND = "I could not find this in the provided sources."
DEFAULT_MAX_TOKENS = 256
MAX_SENTENCES = 4
MIN_COVERAGE = 0.25
RELATIVE_SCORE = 0.5
_K1, _B = 1.2, 0.75

_MARKER = re.compile(r"^[ \t]*\[(\d{1,3})\][ \t]*(.*)$")
_LABEL = re.compile(r"^[ \t]*(?:#{1,6}[ \t]*)?\**([A-Za-z][A-Za-z ]{0,24}?)\**:[ \t]*(.*)$")
_QUESTION_LABELS = frozenset({"question", "query", "q", "user question"})
_SECTION_LABELS = frozenset(
    {"context", "sources", "passages", "documents", "references", "instructions", "answer"}
)
_SPLIT = re.compile(
    r"\n[ \t]*\n\s*"  # paragraph
    r"|\n(?=[ \t]*(?:[-*\u2022]|\d+[.)]|#+)[ \t])"  # list item or heading
    r"|(?:(?<=[.!?])|(?<=[.!?][\"')\]]))\s+(?=[\"'(\[]?[A-Z0-9])"  # sentence end
)
_WORD = re.compile(r"[a-z0-9]+")
_PIECE = re.compile(r"\s*\S+")
_STOP_WORDS = (
    "a about above after again all also am an and any are as at be because been before "
    "being below between both but by can could did do does doing down during each few for "
    "from further had has have having he her here hers him his how i if in into is it its "
    "itself just me more most my no nor not of off on once only or other our out over own "
    "same she should so some such than that the their them then there these they this "
    "those through to too under until up very was we were what when where which while who "
    "whom why will with would you your yours please tell explain give show know want need"
)
_STOP = frozenset(_STOP_WORDS.split())
_SUFFIXES = (
    *("ations", "ation", "ments", "ment", "ings", "ing", "ies", "ied", "ers", "er", "ed"),
    *("ly", "s"),
)


def approx_tokens(text: str) -> int:
    """The token count this provider reports: ``words + words // 3``."""
    return _word_tokens(len(text.split()))


def _word_tokens(words: int) -> int:
    return words + words // 3


@functools.lru_cache(maxsize=1 << 16)
def _stem(word: str) -> str:
    for suffix in _SUFFIXES:
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            word = word[: -len(suffix)] + ("y" if suffix in ("ies", "ied") else "")
            break
    return word[:-1] if word.endswith("e") and len(word) > 3 else word


def _terms(text: str) -> list[str]:
    return _content_terms(_WORD.findall(text.lower()))


def _content_terms(words: list[str]) -> list[str]:
    return [_stem(w) for w in words if w not in _STOP and len(w) > 1]


@dataclass(frozen=True, slots=True)
class Passage:
    marker: str  # "[2]"
    title: str
    text: str  # verbatim from the prompt


@dataclass(frozen=True, slots=True)
class Answer:
    text: str
    finish_reason: str  # "stop" | "length"
    citations: tuple[str, ...]  # markers, in answer order


@dataclass(slots=True)
class _Parsed:
    passages: list[Passage]
    outside: list[str]
    question: str | None


def _passage(number: str, lines: list[str]) -> Passage:
    first, body = lines[0].strip(), lines[1:]
    has_body = any(line.strip() for line in body)
    if has_body and first and len(first.split()) <= 12 and first[-1] not in ".!?":
        return Passage(f"[{number}]", first, "\n".join(body).strip())
    return Passage(f"[{number}]", "", "\n".join(lines).strip())


def _parse(text: str) -> _Parsed:
    passages: list[Passage] = []
    outside: list[str] = []
    question: list[str] | None = None
    current: tuple[str, list[str]] | None = None
    for line in text.splitlines():
        if question is not None:
            question.append(line)
            continue
        marker = _MARKER.match(line)
        label = None if marker else _LABEL.match(line)
        name = label[1].strip().lower() if label else ""
        if (
            marker
            or name in _QUESTION_LABELS
            or (name in _SECTION_LABELS and label and not label[2])
        ):
            if current is not None:
                passages.append(_passage(*current))
                current = None
            if marker:
                current = (marker[1], [marker[2]])
            elif name in _QUESTION_LABELS and label:
                question = [label[2]]
        elif current is not None:
            current[1].append(line)
        else:
            outside.append(line)
    if current is not None:
        passages.append(_passage(*current))
    return _Parsed(
        [p for p in passages if p.text],
        outside,
        "\n".join(question).strip() if question is not None else None,
    )


def parse_passages(messages: Sequence[Mapping[str, Any]]) -> tuple[list[Passage], str]:
    """The numbered passages of a chat (first occurrence of a marker wins) and the question."""
    passages: dict[str, Passage] = {}
    question = ""
    last_user = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=-1)
    for i, message in enumerate(messages):
        if message.get("role") not in ("system", "developer", "user", "tool"):
            continue
        parsed = _parse(message_text(message))
        for passage in parsed.passages:
            passages.setdefault(passage.marker, passage)
        if i == last_user:
            if parsed.question is not None:
                question = parsed.question
            else:
                question = "\n".join(parsed.outside).strip()
    return list(passages.values()), question


def _truncate(text: str, max_tokens: int) -> str:
    keep = 0
    while _word_tokens(keep + 1) <= max_tokens:
        keep += 1
    pieces = _PIECE.findall(text)
    return "".join(pieces[:keep]).strip()


def compose_answer(messages: Sequence[Mapping[str, Any]], max_tokens: int) -> Answer:
    """Select, order and cite the passages' sentences that answer the last question."""
    passages, question = parse_passages(messages)
    q_terms = set(_terms(question))
    sentences: list[tuple[int, str, str, Counter[str]]] = []  # (order, marker, text, tf)
    doc_freq: Counter[str] = Counter()
    for passage in passages:
        seen: set[str] = set()
        for piece in _SPLIT.split(passage.text):
            sentence = piece.strip()
            words = _WORD.findall(sentence.lower())
            terms = _content_terms(words)
            seen.update(terms)
            if terms and len(words) >= 3:
                sentences.append((len(sentences), passage.marker, sentence, Counter(terms)))
        doc_freq.update(seen)
    if not q_terms or not sentences:
        return _not_found(max_tokens)
    n = len(passages)
    idf = {t: math.log(1 + (n - doc_freq[t] + 0.5) / (doc_freq[t] + 0.5)) for t in q_terms}
    mass = sum(idf.values())
    avg_len = sum(sum(tf.values()) for *_, tf in sentences) / len(sentences)
    scored: list[tuple[float, int, str, str]] = []
    for order, marker, sentence, tf in sentences:
        matched = q_terms.intersection(tf)
        if sum(idf[t] for t in matched) < MIN_COVERAGE * mass:
            continue
        norm = _K1 * (1 - _B + _B * sum(tf.values()) / avg_len)
        score = sum(idf[t] * tf[t] * (_K1 + 1) / (tf[t] + norm) for t in matched)
        scored.append((score, order, marker, sentence))
    if not scored:
        return _not_found(max_tokens)
    scored.sort(key=lambda s: (-s[0], s[1]))
    best = scored[0][0]
    chosen: list[tuple[int, str, str]] = []
    used = 0  # words of the answer so far
    for score, order, marker, sentence in scored[:MAX_SENTENCES]:
        more = len(sentence.split()) + 1  # the marker is a word too
        if score >= RELATIVE_SCORE * best and _word_tokens(used + more) <= max_tokens:
            chosen.append((order, marker, sentence))
            used += more
    if not chosen:
        _, _, marker, sentence = scored[0]
        return Answer(_truncate(f"{sentence} {marker}", max_tokens), "length", (marker,))
    chosen.sort()
    text = " ".join(f"{sentence} {marker}" for _, marker, sentence in chosen)
    return Answer(text, "stop", tuple(marker for _, marker, _ in chosen))


def _not_found(max_tokens: int) -> Answer:
    if approx_tokens(NOT_FOUND) <= max_tokens:
        return Answer(NOT_FOUND, "stop", ())
    return Answer(_truncate(NOT_FOUND, max_tokens), "length", ())


class LocalExtractiveTransport:
    """``local:/v1/chat/completions`` answered in-process by :func:`compose_answer`."""

    async def send(
        self,
        request: UpstreamRequest,
        *,
        connect_s: float,
        ttft_s: float,
        total_s: float | None = None,
    ) -> MemoryResponse:
        """The whole answer at once (no timeout can run out: nothing is awaited)."""
        body = parse_chat_request(request)
        if isinstance(body, MemoryResponse):
            return body
        messages = body["messages"]
        max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
        answer = compose_answer(messages, max_tokens or DEFAULT_MAX_TOKENS)
        prompt_tokens = sum(approx_tokens(message_text(m)) for m in messages)
        completion_tokens = approx_tokens(answer.text)
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }
        head = {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "created": int(time.time()),
            "model": str(body.get("model") or "local-extractive"),
        }
        if not body.get("stream"):
            completion = {
                **head,
                "object": "chat.completion",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": answer.text, "refusal": None},
                        "logprobs": None,
                        "finish_reason": answer.finish_reason,
                    }
                ],
                "usage": usage,
            }
            return MemoryResponse(200, JSON_HEADERS, [orjson.dumps(completion)])
        return MemoryResponse(200, SSE_HEADERS, _stream(head, answer, usage, wants_usage(body)))

    async def aclose(self) -> None:
        return None


def _stream(
    head: Mapping[str, Any], answer: Answer, usage: Mapping[str, int], include_usage: bool
) -> list[bytes]:
    base = {**head, "object": "chat.completion.chunk"}
    if include_usage:
        base["usage"] = None

    def chunk(delta: Mapping[str, Any], finish_reason: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return sse_frame({**base, "choices": [choice]})

    frames = [chunk({"role": "assistant", "content": ""})]
    frames.extend(chunk({"content": piece}) for piece in _PIECE.findall(answer.text))
    frames.append(chunk({}, answer.finish_reason))
    if include_usage:
        frames.append(sse_frame({**base, "choices": [], "usage": usage}))
    frames.append(SSE_DONE)
    return frames
