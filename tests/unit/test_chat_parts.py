"""The chat lifecycle's pure parts: context assembly, citation verification, the
stream's sentence release, feature-flag rollout, the event sink's shedding, and the
mock provider's grounded answers."""

from __future__ import annotations

from typing import Any, cast

import pytest

from ragplane.control.flags import Flag, rollout_bucket
from ragplane.data import Database
from ragplane.gateway.mockprovider._text import grounded_pieces
from ragplane.knowledge.search import ChunkHit
from ragplane.service.chat import _split_finished
from ragplane.service.citations import verify_citations
from ragplane.service.context import assemble, estimate_tokens, prompt_messages
from ragplane.service.events import EvalSample, EventSink, RequestRecord

REFUND = (
    "# Refunds\n"
    "EU customers can return any item within 30 days of delivery for a full refund. "
    "Refunds are paid to the original payment method within 14 days."
)
SHIPPING = "## Zones\nStandard shipping is free on EU orders of 75 euros or more."


def chunk(cid: str, text: str, *, doc: str = "d1", start: int = 100, title: str = "T") -> ChunkHit:
    return ChunkHit(
        chunk_id=cid,
        document_id=doc,
        source_uri=f"file:///{doc}.md",
        title=title,
        text=text,
        ordinal=0,
        heading_path=(),
        char_start=start,
        char_end=start + len(text),
        metadata={},
        score=1.0,
        dense_score=0.5,
        lexical_score=None,
        dense_rank=1,
        lexical_rank=None,
    )


def context(*chunks: ChunkHit) -> Any:
    return assemble(list(chunks), "q?", context_window=4096, reserved_output=256)


# -- context ----------------------------------------------------------------------------


def test_passages_are_numbered_in_rank_order_and_duplicates_skipped() -> None:
    a, b = chunk("c1", REFUND), chunk("c2", SHIPPING, doc="d2")
    again = chunk("c3", "  " + REFUND.upper() + " ", doc="d3")  # the same words elsewhere
    ctx = assemble([a, b, a, again], "q?", context_window=4096, reserved_output=256)
    assert [p.chunk.chunk_id for p in ctx.passages] == ["c1", "c2"]
    assert [p.marker for p in ctx.passages] == ["[1]", "[2]"]
    assert ctx.skipped_duplicates == 2


def test_the_budget_is_the_window_less_the_reserved_output() -> None:
    big = [chunk(f"c{i}", f"word{i} " * 300, doc=f"d{i}") for i in range(10)]
    ctx = assemble(big, "q?", context_window=2048, reserved_output=512)
    assert 0 < len(ctx.passages) < 10
    assert ctx.skipped_over_budget == 10 - len(ctx.passages)
    assert ctx.tokens <= 2048 - 512
    wider = assemble(big, "q?", context_window=8192, reserved_output=512)
    assert len(wider.passages) > len(ctx.passages)


def test_the_prompt_shows_titles_and_no_markdown_headings() -> None:
    ctx = context(chunk("c1", REFUND, title="Refund policy"))
    messages = prompt_messages(ctx, "How long do I have?")
    user = messages[-1]["content"]
    assert user.startswith("Sources:\n[1] Refund policy\nEU customers can return")
    assert "# Refunds" not in user
    assert user.endswith("Question: How long do I have?")
    assert messages[0]["role"] == "system"
    assert estimate_tokens("one two three") == 4


# -- citations --------------------------------------------------------------------------


def test_a_verbatim_sentence_is_quoted_with_its_document_offsets() -> None:
    ctx = context(chunk("c1", REFUND))
    answer = "EU customers can return any item within 30 days of delivery for a full refund. [1]"
    v = verify_citations(answer, ctx)
    assert v.dropped == 0
    (c,) = v.citations
    assert c.chunk_id == "c1"
    assert c.quote.startswith("EU customers can return")
    offset = REFUND.index("EU customers")
    assert (c.char_start, c.char_end) == (100 + offset, 100 + offset + len(c.quote))
    assert v.text == answer


def test_a_marker_without_a_passage_is_dropped_and_counted() -> None:
    ctx = context(chunk("c1", REFUND))
    v = verify_citations("Refunds are paid within 14 days. [1] Shipping is free. [7]", ctx)
    assert [c.marker for c in v.citations] == ["[1]"]
    assert v.dropped == 1
    assert "[7]" not in v.text
    assert v.text.endswith("Shipping is free.")


def test_a_quote_the_chunk_does_not_hold_is_unsupported() -> None:
    ctx = context(chunk("c1", REFUND))
    v = verify_citations('The policy says "returns are accepted for 90 days". [1]', ctx)
    assert v.citations == ()
    assert v.dropped == 1


def test_a_paraphrase_is_supported_by_the_sentence_it_shares_most_words_with() -> None:
    ctx = context(chunk("c1", REFUND))
    v = verify_citations("Refunds go back to the original payment method. [1]", ctx)
    (c,) = v.citations
    assert c.quote.startswith("Refunds are paid to the original payment method")
    unrelated = verify_citations("Our stores sell tents and backpacks. [1]", ctx)
    assert unrelated.dropped == 1


# -- streaming release --------------------------------------------------------------------


def test_text_is_released_a_finished_sentence_at_a_time_with_its_markers() -> None:
    assert _split_finished("One sentence. [1] Anoth") == ("One sentence. [1] ", "Anoth")
    # the marker may still be on its way: hold the sentence until something else arrives
    assert _split_finished("One sentence. ") == ("", "One sentence. ")
    assert _split_finished("One sentence. [") == ("", "One sentence. [")
    long = "word " * 50 + "call 555 123"
    ready, rest = _split_finished(long)
    assert ready
    assert rest.endswith("555 123")
    assert "555" not in ready  # never cut inside a number


# -- flags ---------------------------------------------------------------------------------


def _flag(enabled: bool, pct: int, tenants: tuple[str, ...] = ()) -> Flag:
    return Flag("new-ranker", enabled, pct, tenants, "", cast(Any, None), "t")


def test_rollout_buckets_are_stable_and_cover_the_percentage() -> None:
    tenants = [f"tnt_{i:04d}" for i in range(2000)]
    assert [rollout_bucket("x", t) for t in tenants[:50]] == [
        rollout_bucket("x", t) for t in tenants[:50]
    ]
    on = sum(_flag(True, 30).on_for(t) for t in tenants)
    assert 500 < on < 700
    # a tenant keeps its bucket as the rollout grows
    assert all(_flag(True, 60).on_for(t) for t in tenants if _flag(True, 30).on_for(t))
    assert not _flag(False, 100, ("tnt_0001",)).on_for("tnt_0001")
    assert _flag(True, 0, ("tnt_0001",)).on_for("tnt_0001")
    assert _flag(True, 100).on_for(None)
    assert not _flag(True, 50).on_for(None)


# -- the event sink ----------------------------------------------------------------------


def _record(i: int) -> RequestRecord:
    return RequestRecord(
        "tnt_alpha",
        f"req_{i}",
        "t",
        "/v1/chat",
        200,
        1.0,
        None,
        "default",
        "a",
        "normal",
        False,
        "answered",
    )


def _sample(i: int) -> EvalSample:
    return EvalSample("tnt_alpha", f"req_{i}", "q", "a", [], [])


def test_a_full_queue_sheds_eval_samples_before_request_logs() -> None:
    sink = EventSink(cast(Database, None), capacity=4, batch_size=100)
    for i in range(2):
        sink.submit(_record(i), _sample(i))
    assert len(sink) == 4
    sink.submit(_record(2), _sample(2))  # full: the oldest sample goes, then the new one
    assert sink.shed["eval_sample"] == 2
    assert sink.shed["request_log"] == 0
    sink.submit(_record(3))
    sink.submit(_record(4))
    assert sink.shed["request_log"] == 1  # no sample left to shed
    assert len(sink) == 4


# -- the mock provider's grounded answers -------------------------------------------------


def test_grounded_mock_answers_quote_passages_with_markers() -> None:
    prompt = (
        "Sources:\n[1] Refunds\nEU customers can return items. More text.\n\n"
        "[2] Zones\nShipping is free. Yes.\n\nQuestion: q?"
    )
    answer = "".join(grounded_pieces(prompt, 64))
    assert answer == "EU customers can return items. [1] Shipping is free. [2]"
    assert "".join(grounded_pieces(prompt, 6)) == "EU customers can return items. [1]"
    assert grounded_pieces("no passages here", 3) == ["no", " passages", " here"]


@pytest.mark.parametrize("n", [1, 3])
def test_grounded_mock_falls_back_to_echo_without_passages(n: int) -> None:
    assert len(grounded_pieces("hello world again", n)) == n


# -- the demo seeding's embedder -------------------------------------------------------------


async def test_a_memoised_embedder_embeds_each_text_once() -> None:
    import numpy as np

    from ragplane.knowledge.models import MemoisedEmbedder

    calls: list[list[str]] = []

    class Base:
        model_id = "m"
        dimensions = 2
        max_tokens = 8

        def count_tokens(self, text: str) -> int:
            return len(text.split())

        async def embed(self, texts: Any) -> Any:
            calls.append(list(texts))
            return np.array([[len(t), 1.0] for t in texts], dtype=np.float32)

    memo = MemoisedEmbedder(Base())
    first = await memo.embed(["a", "bb", "a"])
    again = await memo.embed(["bb", "ccc", "a"])
    assert calls == [["a", "bb"], ["ccc"]]
    assert first[:, 0].tolist() == [1.0, 2.0, 1.0]
    assert again[:, 0].tolist() == [2.0, 3.0, 1.0]
    assert (await memo.embed([])).shape == (0, 2)
    assert (memo.model_id, memo.dimensions, memo.count_tokens("x y")) == ("m", 2, 2)


def test_a_marker_that_opens_a_line_cites_the_text_after_it() -> None:
    ctx = context(chunk("c1", REFUND))
    v = verify_citations(
        "[1] EU customers can return any item within 30 days of delivery for a full refund.",
        ctx,
    )
    (c,) = v.citations
    assert c.quote.startswith("EU customers can return any item")
    assert v.dropped == 0
    lone = verify_citations("[1]\n\nSomething else entirely about tents.", ctx)
    assert lone.dropped == 1


def test_an_excerpt_quotes_the_opening_sentences_with_markers() -> None:
    from ragplane.service.context import excerpt

    ctx = context(
        chunk("c1", REFUND), chunk("c2", SHIPPING, doc="d2"), chunk("c3", "Ok.", doc="d3")
    )
    text = excerpt(ctx)
    assert text == (
        "EU customers can return any item within 30 days of delivery for a full refund. [1] "
        "Standard shipping is free on EU orders of 75 euros or more. [2]"
    )
    v = verify_citations(text, ctx)  # what offline mode serves is verified like any answer
    assert (len(v.citations), v.dropped) == (2, 0)
    assert excerpt(context()) == ""
