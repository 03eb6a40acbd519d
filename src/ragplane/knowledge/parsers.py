"""Parse source bytes into :class:`~ragplane.knowledge.types.ParsedDocument` values.

Supported sources, chosen by ``media_type`` or else by the extension of ``source_uri``:

==========================  ========================  ==================================
media type                  extensions                documents
==========================  ========================  ==================================
``text/plain``              ``.txt`` ``.text``        one; one section
``text/markdown``           ``.md`` ``.markdown``     one; a section per heading
``text/html``               ``.html`` ``.htm``        one; visible text, a section per
                                                      h1-h6
``application/pdf``         ``.pdf``                  one; a section per page
``application/x-ndjson``    ``.jsonl``                one per BEIR record (``_id``,
                                                      ``title``, ``text``)
==========================  ========================  ==================================

A generic media type (``application/octet-stream``, or an empty one) is no information:
the extension decides.

Text sources must be UTF-8. A leading byte-order mark is dropped and line endings are
normalised to ``\\n``; ``ParsedDocument.text`` is that normalised text, and every offset
indexes it. Sections are ordered, do not overlap, start and end on non-whitespace
characters, and together cover every non-whitespace character of the text.

Two entry points:

* :func:`parse_many` never raises :class:`~ragplane.errors.IngestError`: it returns the
  documents it could build and one error per failure. A file-level failure (too large,
  unsupported, invalid UTF-8, unreadable ...) yields no documents and one error. In a JSONL
  file a bad line fails only its record: the other records are returned, and the error
  names the line (and, for ``invalid_utf8``, the byte offset in the file).
* :func:`parse` is all-or-nothing: it returns the documents or raises the first error
  (several failed records are reported together as one error).

The functions are pure: no I/O besides the bytes given.
"""

from __future__ import annotations

import io
import itertools
import json
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any
from urllib.parse import urlsplit

from markdown_it import MarkdownIt
from markdown_it.token import Token
from pypdf import PdfReader
from selectolax.lexbor import LexborHTMLParser, LexborNode, SelectolaxError

from ragplane.errors import IngestError
from ragplane.knowledge.types import ParsedDocument, Section

__all__ = [
    "DEFAULT_MAX_BYTES",
    "MAX_TITLE_CHARS",
    "MEDIA_TYPES",
    "ParseResult",
    "detect_media_type",
    "parse",
    "parse_many",
]

DEFAULT_MAX_BYTES = 20 * 1024 * 1024
MAX_TITLE_CHARS = 200

TEXT = "text/plain"
MARKDOWN = "text/markdown"
HTML = "text/html"
PDF = "application/pdf"
JSONL = "application/x-ndjson"

MEDIA_TYPES: dict[str, str] = {
    ".txt": TEXT,
    ".text": TEXT,
    ".md": MARKDOWN,
    ".markdown": MARKDOWN,
    ".html": HTML,
    ".htm": HTML,
    ".pdf": PDF,
    ".jsonl": JSONL,
}
"""Extension → media type."""

_ALIASES = {
    "text/x-markdown": MARKDOWN,
    "application/xhtml+xml": HTML,
    "application/jsonl": JSONL,
    "application/x-jsonlines": JSONL,
    "application/jsonlines": JSONL,
}

_GENERIC = frozenset({"", "application/octet-stream", "binary/octet-stream"})


@dataclass(frozen=True)
class ParseResult:
    """What one source yielded: its documents and one error per failed document."""

    documents: tuple[ParsedDocument, ...]
    errors: tuple[IngestError, ...]


def detect_media_type(source_uri: str, media_type: str | None = None) -> str:
    """The supported media type of a source, from ``media_type`` or else the extension.

    Parameters such as ``; charset=utf-8`` are ignored, and a generic media type counts as
    none. Raises ``unsupported_type``.
    """
    essence = (media_type or "").split(";", 1)[0].strip().lower()
    if essence not in _GENERIC:
        essence = _ALIASES.get(essence, essence)
        if essence in MEDIA_TYPES.values():
            return essence
        raise IngestError(
            "unsupported_type", f"media type {media_type!r} is not supported", source_uri=source_uri
        )
    suffix = PurePosixPath(_path_of(source_uri)).suffix.lower()
    if suffix in MEDIA_TYPES:
        return MEDIA_TYPES[suffix]
    what = f"extension {suffix!r}" if suffix else "a name without an extension"
    supported = ", ".join(MEDIA_TYPES)
    raise IngestError(
        "unsupported_type",
        f"{what} is not supported (supported: {supported})",
        source_uri=source_uri,
    )


def parse_many(
    source_uri: str,
    data: bytes,
    *,
    media_type: str | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> ParseResult:
    """Parse one source; failures are returned in ``errors``, never raised."""
    try:
        return _parse_source(source_uri, data, media_type, max_bytes)
    except IngestError as exc:
        return ParseResult((), (exc,))


def parse(
    source_uri: str,
    data: bytes,
    *,
    media_type: str | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> list[ParsedDocument]:
    """Parse one source, all or nothing: any failure (even of one JSONL record) raises."""
    result = parse_many(source_uri, data, media_type=media_type, max_bytes=max_bytes)
    if not result.errors:
        return list(result.documents)
    if len(result.errors) == 1:
        raise result.errors[0]
    codes = {e.code for e in result.errors}
    shown = "; ".join(e.message for e in result.errors[:5])
    more = f"; and {len(result.errors) - 5} more" if len(result.errors) > 5 else ""
    raise IngestError(
        codes.pop() if len(codes) == 1 else "invalid_record",
        f"{len(result.errors)} records failed: {shown}{more}",
        source_uri=source_uri,
    )


def _parse_source(
    source_uri: str, data: bytes, media_type: str | None, max_bytes: int
) -> ParseResult:
    """Raises file-level failures; returns the record-level ones of a JSONL file."""
    if len(data) > max_bytes:
        raise IngestError(
            "too_large",
            f"{len(data)} bytes exceeds the limit of {max_bytes} bytes",
            source_uri=source_uri,
        )
    kind = detect_media_type(source_uri, media_type)
    if kind == JSONL:
        return _parse_jsonl(source_uri, data)
    return ParseResult((_PARSERS[kind](source_uri, data),), ())


# -- plain text and Markdown ---------------------------------------------------------------


def _parse_text(source_uri: str, data: bytes) -> ParsedDocument:
    text = _decode(source_uri, data)
    _require_text(source_uri, text)
    title = _clip_title(_first_line(text)) or _file_name(source_uri)
    sections = _sections(text, [(0, ())])
    return ParsedDocument(source_uri, title, text, sections, TEXT)


_FRONT_MATTER_TITLE = re.compile(r"""^title:[ \t]*(["']?)(.*?)\1[ \t]*$""", re.MULTILINE)


def _parse_markdown(source_uri: str, data: bytes) -> ParsedDocument:
    text = _decode(source_uri, data)
    _require_text(source_uri, text)
    line_starts = [0, *(i + 1 for i, ch in enumerate(text) if ch == "\n")]
    body_line, front_matter = _front_matter(text)
    tokens = MarkdownIt("commonmark").parse(text[line_starts[body_line] :])
    # (offset of the heading line, level, heading text) of every top-level heading
    headings: list[tuple[int, int, str]] = []
    for token, inline in itertools.pairwise(tokens):
        if token.type != "heading_open" or token.level != 0 or token.map is None:
            continue
        heading = _inline_text(inline.children or [])
        if heading:
            headings.append((line_starts[body_line + token.map[0]], int(token.tag[1:]), heading))
    fm_title = _FRONT_MATTER_TITLE.search(front_matter)
    title = (
        (_clip_title(fm_title.group(2)) if fm_title else "")
        or next((_clip_title(h) for _, level, h in headings if level == 1), "")
        or next((_clip_title(h) for _, _, h in headings), "")
        or _file_name(source_uri)
    )
    return ParsedDocument(
        source_uri, title, text, _sections(text, _heading_boundaries(headings)), MARKDOWN
    )


def _front_matter(text: str) -> tuple[int, str]:
    """(index of the first body line, front matter) for a ``---`` YAML front-matter block."""
    lines = text.split("\n")
    if lines[0].rstrip() != "---":
        return 0, ""
    for i in range(1, len(lines)):
        if lines[i].rstrip() in ("---", "..."):
            return i + 1, "\n".join(lines[1:i])
    return 0, ""


def _inline_text(children: list[Token]) -> str:
    parts = []
    for child in children:
        if child.type in ("text", "code_inline", "image"):
            parts.append(child.content)
        elif child.type in ("softbreak", "hardbreak"):
            parts.append(" ")
    return " ".join("".join(parts).split())


def _heading_boundaries(
    headings: Iterable[tuple[int, int, str]],
) -> list[tuple[int, tuple[str, ...]]]:
    """Section starts (offset, heading path) from (offset, level, text) headings.

    The path is the stack of enclosing headings: a heading closes every open heading of
    its level or deeper. Text before the first heading has the empty path.
    """
    boundaries: list[tuple[int, tuple[str, ...]]] = [(0, ())]
    stack: list[tuple[int, str]] = []
    for offset, level, heading in headings:
        while stack and stack[-1][0] >= level:
            stack.pop()
        stack.append((level, heading))
        boundaries.append((offset, tuple(h for _, h in stack)))
    return boundaries


# -- HTML ----------------------------------------------------------------------------------

_DROPPED = frozenset(
    {"script", "style", "nav", "noscript", "template", "head", "svg", "iframe", "object"}
    | {"canvas", "select", "datalist"}
)
_CHROME = frozenset({"header", "footer"})  # dropped unless inside <article> or <main>
_PARAGRAPH_BLOCKS = frozenset(
    {"p", "h1", "h2", "h3", "h4", "h5", "h6", "pre", "blockquote", "ul", "ol", "dl", "table"}
    | {"figure", "hr", "section", "article", "main", "aside", "details", "address"}
    | {"form", "fieldset", "header", "footer"}
)
_LINE_BLOCKS = frozenset(
    {"div", "li", "dt", "dd", "tr", "caption", "figcaption", "summary", "legend", "body"}
)
_CELLS = frozenset({"td", "th"})
_HEADINGS = {f"h{n}": n for n in range(1, 7)}
_HTML_SPACE = re.compile(r"[ \t\n\r\f]+")
# separators in increasing strength; a pending separator is the strongest one asked for
_SEPARATORS = ("", " ", "\t", "\n", "\n\n")


class _HtmlText:
    """Visible text of an HTML tree, with newlines between blocks and heading offsets."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.length = 0
        self.pending = 0  # index into _SEPARATORS
        self.headings: list[tuple[int, int, str]] = []  # (offset, level, text)
        # per open heading element: (level, offset, index into parts) of its first text
        self._open: list[tuple[int, int | None, int | None]] = []

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def separate(self, strength: int) -> None:
        self.pending = max(self.pending, strength)

    def write(self, text: str, *, pre: bool) -> None:
        trailing_space = False
        if not pre:
            text = _HTML_SPACE.sub(" ", text)
            if text.startswith(" "):
                self.separate(1)
            trailing_space = text.endswith(" ")
            text = text.strip(" ")
        if not text:
            if trailing_space:
                self.separate(1)
            return
        if self.parts and self.pending:
            self._append(_SEPARATORS[self.pending])
        self.pending = 1 if trailing_space else 0
        self._open = [
            (level, self.length, len(self.parts)) if start is None else (level, start, index)
            for level, start, index in self._open
        ]
        self._append(text)

    def open_heading(self, level: int) -> None:
        self._open.append((level, None, None))

    def close_heading(self) -> None:
        level, start, index = self._open.pop()
        if start is not None and index is not None:
            heading = " ".join("".join(self.parts[index:]).split())
            if heading:
                self.headings.append((start, level, heading))

    def _append(self, text: str) -> None:
        self.parts.append(text)
        self.length += len(text)


def _parse_html(source_uri: str, data: bytes) -> ParsedDocument:
    source = _decode(source_uri, data)
    out = _HtmlText()
    try:
        tree = LexborHTMLParser(source)
        root = tree.body or tree.root
        if root is None:
            raise IngestError("unreadable", "HTML has no document tree", source_uri=source_uri)
        _walk_html(root, out)
        title_node = tree.css_first("title")
        page_title = title_node.text() if title_node is not None else ""
    except (SelectolaxError, ValueError, RuntimeError) as exc:
        raise IngestError(
            "unreadable", f"HTML cannot be parsed: {exc}", source_uri=source_uri
        ) from exc
    text = out.text
    _require_text(source_uri, text, after="extracting the visible text")
    title = (
        _clip_title(" ".join(page_title.split()))
        or next((_clip_title(h) for _, level, h in out.headings if level == 1), "")
        or _file_name(source_uri)
    )
    sections = _sections(text, _heading_boundaries(out.headings))
    return ParsedDocument(source_uri, title, text, sections, HTML)


def _walk_html(root: LexborNode, out: _HtmlText) -> None:
    """Depth-first and iterative: deeply nested markup must not exhaust the Python stack.

    The stack holds nodes to enter and, as ``(None, tag)``, elements to leave.
    """
    stack: list[tuple[LexborNode | None, str]] = [(root, "")]
    in_content = 0  # how many <article>/<main> elements enclose the node
    in_pre = 0
    while stack:
        node, leaving = stack.pop()
        if node is None:
            in_content -= leaving in ("article", "main")
            in_pre -= leaving == "pre"
            if leaving in _HEADINGS:
                out.close_heading()
            _separate(leaving, out)
            continue
        tag = node.tag or ""
        if tag == "-text":
            out.write(node.text_content or "", pre=in_pre > 0)
            continue
        if tag.startswith("-") or tag in _DROPPED or "hidden" in node.attributes:
            continue  # comments, doctype, invisible elements
        if tag in _CHROME and not in_content:
            continue
        if tag == "br":
            out.separate(3)
            continue
        _separate(tag, out)
        if tag in _HEADINGS:
            out.open_heading(_HEADINGS[tag])
        in_content += tag in ("article", "main")
        in_pre += tag == "pre"
        stack.append((None, tag))
        stack.extend((child, "") for child in reversed(list(node.iter(include_text=True))))


def _separate(tag: str, out: _HtmlText) -> None:
    """Ask for the separator a block element needs before and after its content."""
    if tag in _PARAGRAPH_BLOCKS:
        out.separate(4)
    elif tag in _LINE_BLOCKS:
        out.separate(3)
    elif tag in _CELLS:
        out.separate(2)


# -- PDF -----------------------------------------------------------------------------------


def _parse_pdf(source_uri: str, data: bytes) -> ParsedDocument:
    if b"%PDF-" not in data[:1024]:
        raise IngestError("unreadable", "not a PDF (no %PDF- header)", source_uri=source_uri)
    try:
        reader = PdfReader(io.BytesIO(data))
        locked = reader.is_encrypted and not reader.decrypt("")
        pages = [] if locked else [_clean_pdf(page.extract_text()) for page in reader.pages]
        meta_title = "" if locked or not reader.metadata else reader.metadata.title or ""
    except Exception as exc:  # pypdf raises about anything on hostile input
        raise IngestError(
            "unreadable", f"PDF cannot be read: {type(exc).__name__}: {exc}", source_uri=source_uri
        ) from exc
    if locked:
        raise IngestError("unreadable", "PDF is encrypted with a password", source_uri=source_uri)
    if not pages:
        raise IngestError("empty_document", "PDF has no pages", source_uri=source_uri)
    if not any(page.strip() for page in pages):
        raise IngestError(
            "no_text_layer",
            f"none of the {len(pages)} pages has a text layer (a scanned PDF? OCR it first)",
            source_uri=source_uri,
        )
    text = "\n\n".join(pages)
    boundaries: list[tuple[int, tuple[str, ...]]] = []
    offset = 0
    for n, page in enumerate(pages, start=1):
        boundaries.append((offset, (f"page {n}",)))
        offset += len(page) + 2
    title = (
        _clip_title(" ".join(str(meta_title).split()))
        or _clip_title(_first_line(text))
        or _file_name(source_uri)
    )
    return ParsedDocument(
        source_uri, title, text, _sections(text, boundaries), PDF, {"pages": len(pages)}
    )


def _clean_pdf(text: str) -> str:
    # NUL cannot be stored in Postgres text; pypdf emits it for glyphs it cannot map
    return text.replace("\r\n", "\n").replace("\r", "\n").replace("\x00", "")


# -- JSONL (BEIR corpus records) -------------------------------------------------------------


def _parse_jsonl(source_uri: str, data: bytes) -> ParseResult:
    documents: list[ParsedDocument] = []
    errors: list[IngestError] = []
    first_line: dict[str, int] = {}
    records = 0
    for number, offset, raw in _lines(data):
        if not raw.strip():
            continue
        records += 1
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            errors.append(
                IngestError(
                    "invalid_utf8",
                    f"line {number}: not valid UTF-8 at byte {offset + exc.start}: {exc.reason}",
                    source_uri=source_uri,
                )
            )
            continue
        try:
            document = _record(source_uri, line.lstrip("\ufeff"), number, first_line)
        except IngestError as exc:
            errors.append(exc)
        else:
            documents.append(document)
    if not records:
        return ParseResult(
            (), (IngestError("empty_document", "no records", source_uri=source_uri),)
        )
    return ParseResult(tuple(documents), tuple(errors))


def _lines(data: bytes) -> Iterator[tuple[int, int, bytes]]:
    """(1-based line number, byte offset, line without its line ending)."""
    offset = 0
    for number, raw in enumerate(data.split(b"\n"), start=1):
        yield number, offset, raw.removesuffix(b"\r")
        offset += len(raw) + 1


def _record(source_uri: str, line: str, number: int, first_line: dict[str, int]) -> ParsedDocument:
    def invalid(problem: str, code: str = "invalid_record") -> IngestError:
        return IngestError(code, f"line {number}: {problem}", source_uri=source_uri)

    try:
        record: Any = json.loads(line)
    except (ValueError, RecursionError) as exc:
        raise invalid(f"not JSON: {exc}") from exc
    if not isinstance(record, dict):
        raise invalid(f"expected a JSON object, got {type(record).__name__}")
    doc_id, text, title = record.get("_id"), record.get("text"), record.get("title")
    if not isinstance(doc_id, str) or not doc_id.strip():
        raise invalid("'_id' must be a non-empty string")
    if not isinstance(text, str):
        raise invalid(f"record {doc_id!r}: 'text' must be a string")
    if title is None:
        title = ""
    if not isinstance(title, str):
        raise invalid(f"record {doc_id!r}: 'title' must be a string")
    for name, value in (("_id", doc_id), ("title", title), ("text", text)):
        problem = _unstorable(value)
        if problem:
            raise invalid(f"record {doc_id!r}: {name!r} contains {problem}")
    if doc_id in first_line:
        raise invalid(f"duplicate _id {doc_id!r} (first on line {first_line[doc_id]})")
    first_line[doc_id] = number
    text = _normalise_newlines(text)
    if not text.strip():
        raise invalid(f"record {doc_id!r} has no text", code="empty_document")
    title = _clip_title(" ".join(title.split()))
    heading_path = (title,) if title else ()
    return ParsedDocument(
        f"{source_uri}#{doc_id}",
        title or doc_id,
        text,
        _sections(text, [(0, heading_path)]),
        JSONL,
        {"id": doc_id},
    )


def _unstorable(value: str) -> str:
    """Why Postgres could not store ``value`` as text (JSON escapes allow both), or ''."""
    if "\x00" in value:
        return "a NUL character"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "an unpaired surrogate"
    return ""


# -- shared --------------------------------------------------------------------------------

_PARSERS: dict[str, Callable[[str, bytes], ParsedDocument]] = {
    TEXT: _parse_text,
    MARKDOWN: _parse_markdown,
    HTML: _parse_html,
    PDF: _parse_pdf,
}


def _decode(source_uri: str, data: bytes) -> str:
    """Strict UTF-8, without a leading BOM, with ``\\n`` line endings and no NUL."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        hint = " (a UTF-16 byte-order mark?)" if data[:2] in (b"\xff\xfe", b"\xfe\xff") else ""
        raise IngestError(
            "invalid_utf8",
            f"not valid UTF-8 at byte {exc.start}: {exc.reason}{hint}",
            source_uri=source_uri,
        ) from exc
    nul = data.find(b"\x00")
    if nul >= 0:
        raise IngestError(
            "unreadable", f"NUL byte at byte {nul}: binary data, not text", source_uri=source_uri
        )
    return _normalise_newlines(text.removeprefix("\ufeff"))


def _normalise_newlines(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _require_text(source_uri: str, text: str, *, after: str = "") -> None:
    if not text.strip():
        where = f" after {after}" if after else ""
        raise IngestError(
            "empty_document", f"no text{where} (only whitespace)", source_uri=source_uri
        )


def _sections(text: str, boundaries: list[tuple[int, tuple[str, ...]]]) -> tuple[Section, ...]:
    """Sections from ascending (start offset, heading path) boundaries, each running to the
    next boundary, trimmed of surrounding whitespace; whitespace-only ones are dropped."""
    sections = []
    ends = [start for start, _ in boundaries[1:]] + [len(text)]
    for (start, path), end in zip(boundaries, ends, strict=True):
        start, end = _trim(text, start, end)
        if start < end:
            sections.append(Section(path, text[start:end], start, end))
    return tuple(sections)


def _trim(text: str, start: int, end: int) -> tuple[int, int]:
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


def _first_line(text: str) -> str:
    return next((line.strip() for line in text.split("\n") if line.strip()), "")


def _clip_title(title: str) -> str:
    """At most MAX_TITLE_CHARS, cut at a word boundary where one is near."""
    title = title.strip()
    if len(title) <= MAX_TITLE_CHARS:
        return title
    cut = title[: MAX_TITLE_CHARS - 1]
    space = cut.rfind(" ")
    if space >= MAX_TITLE_CHARS // 2:
        cut = cut[:space]
    return cut.rstrip() + "…"


def _path_of(source_uri: str) -> str:
    return urlsplit(source_uri).path if "://" in source_uri else source_uri


def _file_name(source_uri: str) -> str:
    return _clip_title(PurePosixPath(_path_of(source_uri).replace("\\", "/")).name) or source_uri
