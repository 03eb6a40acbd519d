"""Parsers: every source type, the section invariants, and every IngestError code."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from pypdf import PdfWriter
from selectolax.lexbor import SelectolaxError

from ragplane.errors import IngestError
from ragplane.knowledge import parsers
from ragplane.knowledge.parsers import (
    DEFAULT_MAX_BYTES,
    MAX_TITLE_CHARS,
    ParseResult,
    detect_media_type,
    parse,
    parse_many,
)
from ragplane.knowledge.types import ParsedDocument


def check_sections(doc: ParsedDocument) -> None:
    """Sections index the text, are ordered, disjoint, trimmed, and cover all of it."""
    covered = [False] * len(doc.text)
    previous_end = 0
    for section in doc.sections:
        assert section.text == doc.text[section.start : section.end]
        assert section.start >= previous_end
        assert section.text == section.text.strip()
        assert section.text
        previous_end = section.end
        covered[section.start : section.end] = [True] * (section.end - section.start)
    uncovered = [ch for ch, c in zip(doc.text, covered, strict=True) if not c and not ch.isspace()]
    assert not uncovered


def parse_one(
    uri: str, data: bytes, *, media_type: str | None = None, max_bytes: int = DEFAULT_MAX_BYTES
) -> ParsedDocument:
    (doc,) = parse(uri, data, media_type=media_type, max_bytes=max_bytes)
    check_sections(doc)
    return doc


def error_of(
    uri: str, data: bytes, *, media_type: str | None = None, max_bytes: int = DEFAULT_MAX_BYTES
) -> IngestError:
    with pytest.raises(IngestError) as caught:
        parse(uri, data, media_type=media_type, max_bytes=max_bytes)
    assert caught.value.source_uri == uri
    return caught.value


def paths(doc: ParsedDocument) -> list[tuple[str, ...]]:
    return [s.heading_path for s in doc.sections]


# -- media types ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("a.txt", "text/plain"),
        ("dir/a.TEXT", "text/plain"),
        ("a.md", "text/markdown"),
        ("a.Markdown", "text/markdown"),
        ("a.html", "text/html"),
        ("https://example.com/x/page.htm?lang=en#top", "text/html"),
        ("file:///srv/docs/report.pdf", "application/pdf"),
        ("corpus.jsonl", "application/x-ndjson"),
    ],
)
def test_media_type_comes_from_the_extension(uri: str, expected: str) -> None:
    assert detect_media_type(uri) == expected


def test_a_given_media_type_wins_and_its_parameters_are_ignored() -> None:
    assert detect_media_type("notes.bin", "text/markdown; charset=utf-8") == "text/markdown"
    assert detect_media_type("x", "Application/JSONL") == "application/x-ndjson"
    assert detect_media_type("C# notes.md", "application/octet-stream") == "text/markdown"
    assert detect_media_type("a.html", "") == "text/html"
    doc = parse_one("notes", b"# Title\n\nbody", media_type="text/markdown")
    assert doc.title == "Title"
    assert doc.media_type == "text/markdown"


@pytest.mark.parametrize(
    ("uri", "media_type", "named"),
    [
        ("slides.pptx", None, "'.pptx'"),
        ("README", None, "without an extension"),
        ("data.json", None, "'.json'"),
        ("a.txt", "image/png", "'image/png'"),
    ],
)
def test_unsupported_type(uri: str, media_type: str | None, named: str) -> None:
    error = error_of(uri, b"hello", media_type=media_type)
    assert error.code == "unsupported_type"
    assert named in error.message


def test_too_large_is_checked_before_parsing() -> None:
    error = error_of("big.txt", b"\xff" * 11, max_bytes=10)
    assert error.code == "too_large"
    assert "11 bytes" in error.message
    assert "10 bytes" in error.message
    assert parse_one("fits.txt", b"x" * 10, max_bytes=10).text == "x" * 10
    # even an unsupported type is reported as too large first: nothing is looked at
    assert error_of("big.exe", b"x" * 11, max_bytes=10).code == "too_large"


def test_parse_many_returns_file_level_errors_instead_of_raising() -> None:
    result = parse_many("a.txt", b"   \n ")
    assert isinstance(result, ParseResult)
    assert result.documents == ()
    assert [e.code for e in result.errors] == ["empty_document"]


# -- text encodings ------------------------------------------------------------------------


@pytest.mark.parametrize("uri", ["a.txt", "a.md", "a.html", "a.jsonl"])
def test_invalid_utf8_names_the_byte_offset(uri: str) -> None:
    data = b'{"_id": "1", "text": "caf\xe9"}' if uri.endswith("jsonl") else b"caf\xe9 au lait"
    result = parse_many(uri, data)
    assert result.documents == ()
    (error,) = result.errors
    assert error.code == "invalid_utf8"
    expected = data.index(b"\xe9")
    assert f"byte {expected}" in error.message


def test_utf16_is_invalid_utf8_with_a_hint() -> None:
    error = error_of("a.txt", "hello".encode("utf-16"))
    assert error.code == "invalid_utf8"
    assert "byte 0" in error.message
    assert "UTF-16" in error.message


def test_nul_bytes_mean_binary_data() -> None:
    error = error_of("a.md", b"PK\x03\x04\x00\x00 zip")
    assert error.code == "unreadable"
    assert "byte 4" in error.message


@pytest.mark.parametrize(
    ("uri", "data"),
    [
        ("a.txt", b""),
        ("a.txt", b" \n\t\r\n \xc2\xa0"),
        ("a.md", b"\n\n   \n"),
        ("a.html", b"<html><head><title>T</title><script>x()</script></head><body> </body>"),
        ("a.html", b"<nav>menu</nav><style>p{}</style><template><p>t</p></template>"),
        ("a.jsonl", b"\n\n"),
    ],
)
def test_empty_document(uri: str, data: bytes) -> None:
    assert error_of(uri, data).code == "empty_document"


# -- plain text ----------------------------------------------------------------------------


def test_plain_text_is_one_section_with_normalised_newlines() -> None:
    data = b"\xef\xbb\xbf\r\n  A first line  \r\nsecond\rthird\r\n\r\nnext paragraph\r\n"
    doc = parse_one("notes/a.txt", data)
    assert doc.text == "\n  A first line  \nsecond\nthird\n\nnext paragraph\n"
    assert doc.title == "A first line"
    assert doc.media_type == "text/plain"
    (section,) = doc.sections
    assert section.heading_path == ()
    assert section.text == "A first line  \nsecond\nthird\n\nnext paragraph"


def test_a_long_first_line_is_clipped_to_a_title() -> None:
    line = " ".join(["word"] * 100)
    doc = parse_one("a.txt", line.encode())
    assert len(doc.title) <= MAX_TITLE_CHARS
    assert doc.title.endswith("…")
    assert line.startswith(doc.title[:-1])
    assert not doc.title[:-1].endswith(" ")


# -- Markdown ------------------------------------------------------------------------------

GUIDE = """\
Intro before any heading.

# User guide

Welcome.

## Install *fast*

Run `pip install x`.

### On Linux

Use apt.

```
# not a heading
```

## Configure

> # quoted, not a section

Set things.

Setext top
==========

Closing words.
"""


def test_markdown_sections_follow_the_heading_stack() -> None:
    doc = parse_one("docs/guide.md", GUIDE.encode())
    assert doc.title == "User guide"
    assert doc.text == GUIDE
    assert paths(doc) == [
        (),
        ("User guide",),
        ("User guide", "Install fast"),
        ("User guide", "Install fast", "On Linux"),
        ("User guide", "Configure"),
        ("Setext top",),
    ]
    by_path = {s.heading_path: s.text for s in doc.sections}
    assert by_path[()] == "Intro before any heading."
    assert by_path[("User guide",)] == "# User guide\n\nWelcome."
    assert by_path[("User guide", "Install fast", "On Linux")].endswith("# not a heading\n```")
    assert "quoted, not a section" in by_path[("User guide", "Configure")]
    assert by_path[("Setext top",)] == "Setext top\n==========\n\nClosing words."


def test_markdown_offsets_survive_crlf_and_a_bom() -> None:
    data = b"\xef\xbb\xbf# One\r\n\r\ntext one\r\n\r\n## Two\r\ntext two\r\n"
    doc = parse_one("a.md", data)
    assert doc.text == "# One\n\ntext one\n\n## Two\ntext two\n"
    assert [s.text for s in doc.sections] == ["# One\n\ntext one", "## Two\ntext two"]
    assert paths(doc) == [("One",), ("One", "Two")]


def test_markdown_title_prefers_front_matter_then_h1_then_any_heading_then_file_name() -> None:
    front = b"---\ntitle: 'From front matter'\ntags: [a]\n---\n## Sub\n\n# Main\n"
    doc = parse_one("a.md", front)
    assert doc.title == "From front matter"
    # the closing --- is not read as a setext underline
    assert paths(doc) == [(), ("Sub",), ("Main",)]
    assert doc.sections[0].text == "---\ntitle: 'From front matter'\ntags: [a]\n---"
    assert parse_one("a.md", b"## Sub\n\n# Main\n").title == "Main"
    assert parse_one("a.md", b"intro\n\n## Only sub\n").title == "Only sub"
    assert parse_one("dir/plain.md", b"no headings at all\n").title == "plain.md"


def test_markdown_front_matter_must_be_closed() -> None:
    doc = parse_one("a.md", b"---\ntitle: Not front matter\n\n# Real\n")
    assert doc.title == "Real"
    assert paths(doc) == [(), ("Real",)]


def test_markdown_multi_line_setext_heading() -> None:
    doc = parse_one("a.md", b"A heading\non two lines\n===\nbody\n")
    assert doc.title == "A heading on two lines"
    assert paths(doc) == [("A heading on two lines",)]


def test_markdown_empty_headings_do_not_start_sections() -> None:
    doc = parse_one("a.md", b"# A\n\ntext\n\n#\n\nmore\n")
    assert paths(doc) == [("A",)]


# -- HTML ----------------------------------------------------------------------------------

PAGE = """\
<!doctype html>
<html><head><title>  The   Page </title><style>p { color: red }</style>
<script>var x = "<p>not text</p>";</script></head>
<body>
<header>Site banner</header>
<nav><a href="/">Home</a></nav>
<main>
  <article>
    <header><h1>Article <em>title</em></h1></header>
    <p>Hello   <b>wo</b>rld &amp; friends.<br>Next line.</p>
    <p>Second paragraph.</p>
    <div hidden>invisible</div>
    <noscript>enable js</noscript>
    <h2>Details</h2>
    <ul><li>one</li><li>two</li></ul>
    <table><tr><th>k</th><th>v</th></tr><tr><td>a</td><td>1</td></tr></table>
    <h3>Code</h3>
    <pre>  indented
    code</pre>
    <h2>Later</h2>
    <p>End.</p>
  </article>
</main>
<footer>Copyright</footer>
</body></html>
"""


def test_html_keeps_visible_text_and_block_structure() -> None:
    doc = parse_one("site/page.html", PAGE.encode())
    assert doc.text == (
        "Article title\n\n"
        "Hello world & friends.\nNext line.\n\n"
        "Second paragraph.\n\n"
        "Details\n\n"
        "one\ntwo\n\n"
        "k\tv\na\t1\n\n"
        "Code\n\n"
        "  indented\n    code\n\n"
        "Later\n\n"
        "End."
    )
    assert doc.title == "The Page"
    assert doc.media_type == "text/html"
    assert paths(doc) == [
        ("Article title",),
        ("Article title", "Details"),
        ("Article title", "Details", "Code"),
        ("Article title", "Later"),
    ]
    assert doc.sections[1].text == "Details\n\none\ntwo\n\nk\tv\na\t1"


def test_html_title_falls_back_to_the_first_h1_then_the_file_name() -> None:
    doc = parse_one("a.html", b"<p>intro</p><h2>Sub</h2><h1>Main</h1><p>x</p>")
    assert doc.title == "Main"
    assert paths(doc) == [(), ("Sub",), ("Main",)]
    assert parse_one("dir/b.htm", b"<p>just text</p>").title == "b.htm"


def test_html_fragments_and_broken_markup_are_read_leniently() -> None:
    doc = parse_one("a.html", b"<div><p>unclosed <b>bold<p>next</div></span>trailing")
    assert doc.text == "unclosed bold\n\nnext\n\ntrailing"


def test_a_failing_html_parser_is_reported_as_unreadable(monkeypatch: pytest.MonkeyPatch) -> None:
    # lexbor parses any string as HTML5 does; this is the path for when it gives up
    def broken(html: str) -> None:
        raise SelectolaxError("cannot parse")

    monkeypatch.setattr(parsers, "LexborHTMLParser", broken)
    error = error_of("a.html", b"<p>x</p>")
    assert error.code == "unreadable"
    assert "cannot parse" in error.message
    assert isinstance(error.__cause__, SelectolaxError)


def test_deeply_nested_html_does_not_exhaust_the_stack() -> None:
    depth = 5000
    data = ("<div>" * depth + "<h1>deep</h1><p>text</p>" + "</div>" * depth).encode()
    doc = parse_one("deep.html", data)
    assert doc.text == "deep\n\ntext"
    assert paths(doc) == [("deep",)]


# -- PDF -----------------------------------------------------------------------------------


def text_pdf(pages: list[list[str]], *, title: str | None = None) -> bytes:
    """A minimal PDF with a Helvetica text layer: one content stream per page."""
    objects: list[bytes] = [b"", b""]  # 1: catalog, 2: page tree; filled in below

    def add(body: bytes) -> int:
        objects.append(body)
        return len(objects)

    font = add(b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>")
    kids = []
    for lines in pages:
        ops = [b"BT /F1 12 Tf 14 TL 72 720 Td"]
        for line in lines:
            escaped = line.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")
            ops.append(b"(" + escaped.encode("latin-1") + b") Tj T*")
        ops.append(b"ET")
        stream = b"\n".join(ops)
        content = add(b"<< /Length %d >>\nstream\n%s\nendstream" % (len(stream), stream))
        kids.append(
            add(
                b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] "
                b"/Resources << /Font << /F1 %d 0 R >> >> /Contents %d 0 R >>" % (font, content)
            )
        )
    objects[0] = b"<< /Type /Catalog /Pages 2 0 R >>"
    refs = b" ".join(b"%d 0 R" % kid for kid in kids)
    objects[1] = b"<< /Type /Pages /Kids [%s] /Count %d >>" % (refs, len(kids))
    info = add(b"<< /Title (%s) >>" % title.encode("latin-1")) if title else None
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n%s\nendobj\n" % (number, body)
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    info_ref = b" /Info %d 0 R" % info if info else b""
    out += b"trailer\n<< /Size %d /Root 1 0 R%s >>\n" % (len(objects) + 1, info_ref)
    out += b"startxref\n%d\n%%%%EOF\n" % xref
    return bytes(out)


def blank_pdf(pages: int = 1, *, password: str | None = None) -> bytes:
    """What a scanned PDF looks like to a text extractor: pages without a text layer."""
    writer = PdfWriter()
    for _ in range(pages):
        writer.add_blank_page(612, 792)
    if password is not None:
        writer.encrypt(password, algorithm="RC4-128")
    buffer = io.BytesIO()
    writer.write(buffer)
    return buffer.getvalue()


def test_pdf_has_a_section_per_page() -> None:
    data = text_pdf(
        [["Quarterly report (draft)", "Revenue grew."], ["Page two text."]], title="Q3 Report"
    )
    doc = parse_one("reports/q3.pdf", data)
    assert doc.title == "Q3 Report"
    assert doc.media_type == "application/pdf"
    assert doc.metadata == {"pages": 2}
    assert paths(doc) == [("page 1",), ("page 2",)]
    assert doc.sections[0].text == "Quarterly report (draft)\nRevenue grew."
    assert doc.sections[1].text == "Page two text."
    assert doc.text.index("Page two") > doc.text.index("\n\n")


def test_pdf_title_falls_back_to_the_first_line() -> None:
    doc = parse_one("a.pdf", text_pdf([["  First line here", "more"]]))
    assert doc.title == "First line here"


def test_pdf_pages_without_text_get_no_section() -> None:
    writer = PdfWriter(clone_from=io.BytesIO(text_pdf([["Only text page."]])))
    writer.add_blank_page(612, 792)
    buffer = io.BytesIO()
    writer.write(buffer)
    doc = parse_one("a.pdf", buffer.getvalue())
    assert doc.metadata == {"pages": 2}
    assert paths(doc) == [("page 1",)]


def test_a_pdf_without_pages_is_empty() -> None:
    buffer = io.BytesIO()
    PdfWriter().write(buffer)
    assert error_of("none.pdf", buffer.getvalue()).code == "empty_document"


def test_a_pdf_without_a_text_layer_is_reported() -> None:
    error = error_of("scan.pdf", blank_pdf(3))
    assert error.code == "no_text_layer"
    assert "3 pages" in error.message


@pytest.mark.parametrize(
    "data",
    [
        b"this is not a PDF at all",
        b"%PDF-1.4\n\x8f\x02garbage without structure",
        text_pdf([["cut short"]])[:150],
    ],
    ids=["no-header", "garbage", "truncated"],
)
def test_a_corrupt_pdf_is_unreadable(data: bytes) -> None:
    assert error_of("bad.pdf", data).code == "unreadable"


def test_a_password_protected_pdf_is_unreadable() -> None:
    error = error_of("locked.pdf", blank_pdf(password="secret"))
    assert error.code == "unreadable"
    assert "password" in error.message


# -- JSONL ---------------------------------------------------------------------------------


def jsonl(*lines: object) -> bytes:
    return b"\n".join(
        line if isinstance(line, bytes) else json.dumps(line).encode() for line in lines
    )


def test_jsonl_yields_one_document_per_record() -> None:
    data = jsonl(
        {"_id": "d1", "title": "First", "text": "Alpha text.\r\nMore."},
        b"",
        {"_id": "d2", "title": "", "text": "Beta text."},
        {"_id": "d3", "text": "Gamma text.", "title": None, "extra": 1},
    )
    docs = parse("corpus/corpus.jsonl", data + b"\n")
    for doc in docs:
        check_sections(doc)
    assert [d.source_uri for d in docs] == [
        "corpus/corpus.jsonl#d1",
        "corpus/corpus.jsonl#d2",
        "corpus/corpus.jsonl#d3",
    ]
    assert [d.metadata for d in docs] == [{"id": "d1"}, {"id": "d2"}, {"id": "d3"}]
    assert [d.title for d in docs] == ["First", "d2", "d3"]
    assert [paths(d) for d in docs] == [[("First",)], [()], [()]]
    assert docs[0].text == "Alpha text.\nMore."
    assert {d.media_type for d in docs} == {"application/x-ndjson"}


def test_bad_jsonl_lines_fail_only_their_record() -> None:
    data = jsonl(
        {"_id": "ok1", "text": "fine"},
        b"{not json",
        ["a", "list"],
        {"title": "no id", "text": "x"},
        {"_id": 7, "text": "numeric id"},
        {"_id": "t", "text": 3},
        {"_id": "u", "text": "x", "title": ["x"]},
        {"_id": "ok1", "text": "duplicate"},
        {"_id": "blank", "text": "  \n "},
        b'{"_id": "nul", "text": "a\\u0000b"}',
        b'{"_id": "sur", "text": "a\\ud800b"}',
        b'{"_id": "bytes", "text": "caf\xe9"}',
        b"[[[[" * 10_000,
        {"_id": "ok2", "text": "also fine"},
    )
    result = parse_many("c.jsonl", data)
    assert [d.source_uri for d in result.documents] == ["c.jsonl#ok1", "c.jsonl#ok2"]
    problems = [(e.code, e.message.split(":")[0]) for e in result.errors]
    assert problems == [
        ("invalid_record", "line 2"),
        ("invalid_record", "line 3"),
        ("invalid_record", "line 4"),
        ("invalid_record", "line 5"),
        ("invalid_record", "line 6"),
        ("invalid_record", "line 7"),
        ("invalid_record", "line 8"),
        ("empty_document", "line 9"),
        ("invalid_record", "line 10"),
        ("invalid_record", "line 11"),
        ("invalid_utf8", "line 12"),
        ("invalid_record", "line 13"),
    ]
    assert all(e.source_uri == "c.jsonl" for e in result.errors)
    messages = [e.message for e in result.errors]
    assert "first on line 1" in messages[6]
    assert "NUL" in messages[8]
    assert "surrogate" in messages[9]
    assert f"byte {data.index(bytes([0xE9]))}" in messages[10]


def test_parse_is_all_or_nothing_for_jsonl() -> None:
    one_bad = jsonl({"_id": "a", "text": "fine"}, b"oops")
    error = error_of("c.jsonl", one_bad)
    assert error.code == "invalid_record"
    assert error.message.startswith("line 2: not JSON")
    several = jsonl(b"oops", {"_id": "a", "text": "fine"}, b"[]", b"{}")
    error = error_of("c.jsonl", several)
    assert error.code == "invalid_record"
    assert error.message.startswith("3 records failed: line 1")
    assert "line 3" in error.message
    assert "line 4" in error.message


def test_the_benchmark_corpus_parses_without_errors() -> None:
    corpus = Path(__file__).parents[3] / "shared" / "eval" / "pyfaq" / "corpus.jsonl"
    if not corpus.exists():
        pytest.skip(f"{corpus} is not present")
    with corpus.open("rb") as lines:
        head = b"".join(line for _, line in zip(range(200), lines, strict=False))
    result = parse_many("pyfaq/corpus.jsonl", head)
    assert result.errors == ()
    assert len(result.documents) == 200
    for doc in result.documents:
        check_sections(doc)
