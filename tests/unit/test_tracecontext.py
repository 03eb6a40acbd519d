"""TraceContext: parsing, continuing and minting W3C ``traceparent`` values (version 00)."""

from __future__ import annotations

import re

import pytest

from ragplane.observe import tracecontext
from ragplane.observe.tracecontext import TraceContext, random_hex

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN = "00f067aa0ba902b7"
HEADER = re.compile(r"^00-[0-9a-f]{32}-[0-9a-f]{16}-0[01]$")


def test_continue_from_keeps_the_trace_in_a_new_span() -> None:
    ctx = TraceContext.continue_from(f"00-{TRACE}-{SPAN}-01")
    assert ctx is not None
    assert ctx.trace_id == TRACE
    assert ctx.parent_span_id == SPAN
    assert re.fullmatch(r"[0-9a-f]{16}", ctx.span_id)
    assert ctx.span_id != SPAN
    assert ctx.sampled is True
    assert ctx.traceparent == f"00-{TRACE}-{ctx.span_id}-01"


def test_each_continuation_gets_its_own_span() -> None:
    spans = set()
    for _ in range(50):
        ctx = TraceContext.continue_from(f"00-{TRACE}-{SPAN}-01")
        assert ctx is not None
        spans.add(ctx.span_id)
    assert len(spans) == 50


@pytest.mark.parametrize(
    ("flags", "sampled"),
    [("00", False), ("01", True), ("02", False), ("03", True), ("ff", True), ("fe", False)],
)
def test_sampled_is_bit_zero_of_the_flags(flags: str, sampled: bool) -> None:
    ctx = TraceContext.continue_from(f"00-{TRACE}-{SPAN}-{flags}")
    assert ctx is not None
    assert ctx.sampled is sampled
    # only the sampled bit is propagated; the header we send is always well-formed
    assert ctx.traceparent.endswith("-01" if sampled else "-00")
    assert HEADER.fullmatch(ctx.traceparent)


@pytest.mark.parametrize(
    "header",
    [
        f"00-{TRACE.upper()}-{SPAN}-01",
        f"00-{TRACE}-{SPAN.upper()}-01",
        f"00-{TRACE}-{SPAN}-0A",
    ],
)
def test_uppercase_hex_is_ignored(header: str) -> None:
    """W3C Trace Context: a traceparent with non-lowercase hex MUST be ignored."""
    assert TraceContext.continue_from(header) is None


def test_surrounding_whitespace_is_tolerated() -> None:
    ctx = TraceContext.continue_from(f"  00-{TRACE}-{SPAN}-01 ")
    assert ctx is not None
    assert ctx.trace_id == TRACE


@pytest.mark.parametrize(
    "value",
    [
        pytest.param(None, id="absent"),
        pytest.param("", id="empty"),
        pytest.param("   ", id="blank"),
        pytest.param("garbage", id="garbage"),
        pytest.param(f"01-{TRACE}-{SPAN}-01", id="version-01"),
        pytest.param(f"ff-{TRACE}-{SPAN}-01", id="version-ff-forbidden"),
        pytest.param(f"0-{TRACE}-{SPAN}-01", id="version-one-digit"),
        pytest.param(f"00-{'0' * 32}-{SPAN}-01", id="all-zero-trace-id"),
        pytest.param(f"00-{TRACE}-{'0' * 16}-01", id="all-zero-span-id"),
        pytest.param(f"00-{'0' * 32}-{'0' * 16}-00", id="all-zero-both"),
        pytest.param(f"00-{TRACE[:-1]}-{SPAN}-01", id="trace-id-31"),
        pytest.param(f"00-{TRACE}0-{SPAN}-01", id="trace-id-33"),
        pytest.param(f"00-{TRACE}-{SPAN[:-1]}-01", id="span-id-15"),
        pytest.param(f"00-{TRACE}-{SPAN}0-01", id="span-id-17"),
        pytest.param(f"00-{TRACE}-{SPAN}-1", id="flags-one-digit"),
        pytest.param(f"00-{TRACE}-{SPAN}-001", id="flags-three-digits"),
        pytest.param(f"00-{TRACE}-{SPAN}-0g", id="flags-not-hex"),
        pytest.param(f"00-{TRACE[:-1]}z-{SPAN}-01", id="trace-id-not-hex"),
        pytest.param(f"00-{TRACE}-{SPAN[:-1]}.-01", id="span-id-not-hex"),
        pytest.param(f"00-{TRACE}-{SPAN}-01-extra", id="version-00-with-extra-field"),
        pytest.param(f"00-{TRACE}-{SPAN}", id="no-flags"),
        pytest.param(f"00{TRACE}{SPAN}01", id="no-separators"),
        pytest.param(f"00-{TRACE}-{SPAN}-01\n00-{TRACE}-{SPAN}-01", id="two-lines"),
    ],
)
def test_malformed_values_are_treated_as_absent(value: str | None) -> None:
    assert TraceContext.continue_from(value) is None


def test_mint_makes_valid_distinct_ids() -> None:
    minted = [TraceContext.mint() for _ in range(50)]
    for ctx in minted:
        assert HEADER.fullmatch(ctx.traceparent)
        assert ctx.parent_span_id is None
        assert ctx.sampled is True
        assert ctx.trace_id != "0" * 32
        assert ctx.span_id != "0" * 16
    assert len({c.trace_id for c in minted}) == 50
    assert len({c.span_id for c in minted}) == 50


@pytest.mark.parametrize("zero", ["0" * 32 + "ab" * 8, "ab" * 16 + "0" * 16])
def test_mint_draws_again_rather_than_make_an_all_zero_id(
    zero: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    draws = iter([zero, "12" * 24])
    monkeypatch.setattr(tracecontext, "random_hex", lambda chars: next(draws))
    ctx = TraceContext.mint()
    assert (ctx.trace_id, ctx.span_id) == ("12" * 16, "12" * 8)


def test_minted_header_round_trips() -> None:
    ctx = TraceContext.mint()
    again = TraceContext.continue_from(ctx.traceparent)
    assert again is not None
    assert again.trace_id == ctx.trace_id
    assert again.parent_span_id == ctx.span_id


def test_random_hex_is_lowercase_hex_of_the_asked_length_and_unique() -> None:
    values = {random_hex(32) for _ in range(1000)}
    assert len(values) == 1000
    assert all(re.fullmatch(r"[0-9a-f]{32}", v) for v in values)
    assert re.fullmatch(r"[0-9a-f]{24}", random_hex(24))


def test_a_forked_child_draws_other_ids_than_its_parent() -> None:
    import os

    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report one id and leave at once
        os.write(write, random_hex(32).encode())
        os._exit(0)
    os.close(write)
    child = os.read(read, 64).decode()
    os.close(read)
    os.waitpid(pid, 0)
    assert re.fullmatch(r"[0-9a-f]{32}", child)
    assert child != random_hex(32)
