"""Deterministic content for the mock provider: token counts, answer text, tool
arguments and embedding vectors, all derived from the request alone.

Token counting is an approximation used the same way by streams and non-streams:
input is about four characters a token; an answer is a list of *pieces* (a word, or
a few characters of JSON), one token each, and a stream sends one piece per event.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import math
import re
import struct
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import orjson

__all__ = [
    "LOREM",
    "answer_pieces",
    "embedding",
    "embedding_base64",
    "grounded_pieces",
    "json_pieces",
    "sample_for_schema",
    "text_tokens",
    "wants_tool",
]

_LOREM_TEXT = (
    "lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor "
    "incididunt ut labore et dolore magna aliqua ut enim ad minim veniam quis nostrud"
)
LOREM = tuple(_LOREM_TEXT.split())
_JSON_PIECE = 4  # characters of JSON per token
_TOOL_PHRASES = ("use a tool", "use the tool", "call a tool", "call the tool")


def text_tokens(text: str) -> int:
    """Approximate tokens of prompt text (four characters a token, at least one)."""
    return (len(text) + 3) // 4 or 1


def answer_pieces(prompt: str, n: int) -> list[str]:
    """``n`` word pieces echoing the prompt's words, then lorem ipsum, cycled."""
    words = [*prompt.split()[:64], *LOREM]
    pieces = [words[i % len(words)] for i in range(n)]
    return [pieces[0], *(" " + w for w in pieces[1:])] if pieces else []


_PASSAGE = re.compile(r"^\[(\d{1,3})\][^\n]*\n(.+?)(?=\n\s*\n|\Z)", re.MULTILINE | re.DOTALL)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def grounded_pieces(prompt: str, n: int) -> list[str]:
    """A RAG prompt answered the way a grounded model answers it: the first sentence of
    each numbered passage (``[1] Title`` then its text), verbatim and followed by its
    marker, while they fit in ``n`` word pieces; no passages: :func:`answer_pieces`."""
    words: list[str] = []
    for m in _PASSAGE.finditer(prompt):
        sentence = _SENTENCE_END.split(m.group(2).strip(), maxsplit=1)[0].split()
        cited = [*sentence, f"[{m.group(1)}]"]
        if words and len(words) + len(cited) > n:
            break
        words += cited
    if not words:
        return answer_pieces(prompt, n)
    return [words[0], *(" " + w for w in words[1:])]


def json_pieces(value: Any) -> list[str]:
    """A JSON value's text split into token-sized pieces (the pieces join to valid JSON)."""
    text = orjson.dumps(value).decode()
    return [text[i : i + _JSON_PIECE] for i in range(0, len(text), _JSON_PIECE)]


def sample_for_schema(schema: Any, words: Sequence[str], depth: int = 0) -> Any:
    """A small value that fits a JSON schema (required properties, enums, types)."""
    if not isinstance(schema, Mapping) or depth > 6:
        return words[0] if words else "mock"
    if schema.get("enum"):
        return schema["enum"][0]
    if "const" in schema:
        return schema["const"]
    for key in ("anyOf", "oneOf", "allOf"):
        if isinstance(schema.get(key), list) and schema[key]:
            return sample_for_schema(schema[key][0], words, depth + 1)
    kind = schema.get("type", "object" if "properties" in schema else "string")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object":
        props = schema.get("properties") or {}
        names = schema.get("required") or list(props)
        return {
            name: sample_for_schema(props.get(name, {}), words[i:] or words, depth + 1)
            for i, name in enumerate(names)
        }
    if kind == "array":
        return [sample_for_schema(schema.get("items", {}), words, depth + 1)]
    return {"integer": 1, "number": 1.5, "boolean": True, "null": None}.get(
        kind, words[0] if words else "mock"
    )


def wants_tool(names: Iterable[str], last_user_text: str) -> str | None:
    """The tool a user message asks for: one it names, or the first when it says
    "use a tool" / "call the tool"."""
    names = list(names)
    text = last_user_text.lower()
    for name in names:
        if name and name.lower() in text:
            return name
    if names and any(phrase in text for phrase in _TOOL_PHRASES):
        return names[0]
    return None


@functools.lru_cache(maxsize=4096)
def _vector(data: bytes, dimensions: int) -> tuple[float, ...]:
    raw = struct.unpack(f"<{dimensions}h", hashlib.shake_256(data).digest(2 * dimensions))
    norm = math.sqrt(sum(v * v for v in raw)) or 1.0
    return tuple(v / norm for v in raw)


def embedding(item: Any, dimensions: int) -> tuple[float, ...]:
    """A unit vector derived from a hash of one input (a string or a list of token ids)."""
    data = item.encode() if isinstance(item, str) else orjson.dumps(item)
    return _vector(data, dimensions)


def embedding_base64(vector: Sequence[float]) -> str:
    """OpenAI's ``encoding_format: base64``: little-endian float32, base64."""
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
