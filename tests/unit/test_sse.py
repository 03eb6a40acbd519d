"""The SSE decoder against the event-stream format, fed in every possible split."""

from __future__ import annotations

import pytest

from ragplane.errors import UpstreamProtocolError
from ragplane.gateway import sse
from ragplane.gateway.sse import SseDecoder, encode_event
from ragplane.gateway.types import SseEvent

OPENAI_LIKE = (
    b'data: {"id":"1","choices":[{"delta":{"content":"h\xc3\xa9"}}]}\n\n'
    b": keep-alive\n\n"
    b'data: {"id":"1","choices":[]}\n\n'
    b"data: [DONE]\n\n"
)
ANTHROPIC_LIKE = (
    b"event: message_start\r\n"
    b'data: {"type":"message_start"}\r\n'
    b"\r\n"
    b"event: ping\r\n"
    b'data: {"type": "ping"}\r\n'
    b"\r\n"
    b"event: message_stop\r\n"
    b'data: {"type":"message_stop"}\r\n'
    b"\r\n"
)


def decode_all(raw: bytes, cuts: list[int]) -> list[SseEvent]:
    decoder = SseDecoder()
    events: list[SseEvent] = []
    last = 0
    for cut in [*cuts, len(raw)]:
        events += decoder.feed(raw[last:cut])
        last = cut
    return events + decoder.flush()


@pytest.mark.parametrize(
    "raw", [OPENAI_LIKE, ANTHROPIC_LIKE, ANTHROPIC_LIKE.replace(b"\r\n", b"\r")]
)
def test_every_two_way_split_gives_the_same_events(raw: bytes) -> None:
    whole = decode_all(raw, [])
    assert whole
    for cut in range(len(raw) + 1):
        assert decode_all(raw, [cut]) == whole, cut


def test_byte_by_byte_feeding_handles_utf8_split_inside_a_character() -> None:
    events = decode_all(OPENAI_LIKE, list(range(1, len(OPENAI_LIKE))))
    assert events[0].data == '{"id":"1","choices":[{"delta":{"content":"hé"}}]}'
    assert [e.data for e in events[1:]] == ['{"id":"1","choices":[]}', "[DONE]"]
    assert all(e.event is None for e in events)


def test_event_names_and_crlf() -> None:
    events = decode_all(ANTHROPIC_LIKE, [])
    assert [e.event for e in events] == ["message_start", "ping", "message_stop"]
    assert events[1].data == '{"type": "ping"}'


def test_multi_line_data_is_joined_with_newlines_and_comments_are_skipped() -> None:
    raw = b": comment\ndata: first\ndata:second\ndata\ndata:  indented\nid: 7\nretry: 10\n\n"
    assert decode_all(raw, []) == [SseEvent(None, "first\nsecond\n\n indented")]


def test_an_event_without_data_is_not_dispatched_and_the_name_resets() -> None:
    raw = b"event: lonely\n\ndata: x\n\n"
    assert decode_all(raw, []) == [SseEvent(None, "x")]


def test_comment_only_pings_produce_nothing() -> None:
    assert decode_all(b": ping\n\n: ping\r\n\r\n", []) == []


def test_a_leading_bom_is_ignored() -> None:
    assert decode_all(b"\xef\xbb\xbfdata: x\n\n", []) == [SseEvent(None, "x")]


def test_flush_dispatches_an_unterminated_last_event() -> None:
    decoder = SseDecoder()
    assert decoder.feed(b"data: a\n\ndata: [DONE]") == [SseEvent(None, "a")]
    assert decoder.flush() == [SseEvent(None, "[DONE]")]
    assert decoder.flush() == []


def test_a_trailing_carriage_return_waits_for_its_line_feed() -> None:
    decoder = SseDecoder()
    assert decoder.feed(b"data: a\r") == []
    assert decoder.feed(b"\n\r") == [SseEvent(None, "a")]
    assert decoder.feed(b"\ndata: b\n\n") == [SseEvent(None, "b")]


def test_invalid_utf8_is_a_protocol_error() -> None:
    with pytest.raises(UpstreamProtocolError):
        SseDecoder().feed(b"data: \xff\xfe\n\n")


def test_an_endless_line_is_a_protocol_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sse, "MAX_LINE_BYTES", 16)
    decoder = SseDecoder()
    decoder.feed(b"data: 12345")
    with pytest.raises(UpstreamProtocolError):
        decoder.feed(b"6789012345")


@pytest.mark.parametrize(
    ("data", "event", "expected"),
    [
        ('{"a":1}', None, b'data: {"a":1}\n\n'),
        (b"[DONE]", None, b"data: [DONE]\n\n"),
        ('{"type":"ping"}', "ping", b'event: ping\ndata: {"type":"ping"}\n\n'),
        ("two\nlines", None, b"data: two\ndata: lines\n\n"),
        ("é", "x", "event: x\ndata: é\n\n".encode()),
    ],
)
def test_encode_event(data: str | bytes, event: str | None, expected: bytes) -> None:
    assert encode_event(data, event) == expected


@pytest.mark.parametrize("data", ["plain", "two\nlines", "a\n\nb", " leading space"])
def test_encode_then_decode_round_trips(data: str) -> None:
    assert decode_all(encode_event(data, "e"), []) == [SseEvent("e", data)]
