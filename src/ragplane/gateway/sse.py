"""Server-sent events: an incremental decoder and an encoder (the WHATWG event-stream format).

``SseDecoder.feed`` takes bytes split anywhere (inside a line, inside a UTF-8 sequence,
between ``\\r`` and ``\\n``) and returns the events completed so far. Lines end with
``\\n``, ``\\r\\n`` or ``\\r``; several ``data:`` lines of one event are joined with
``\\n``; comment lines (``: ping``) and ``id:``/``retry:`` fields are skipped; an event
with no data is not dispatched. ``flush`` is called when the stream ends: unlike the
browser algorithm it dispatches a last event that lacks its blank line, because some
OpenAI-compatible servers end with ``data: [DONE]`` and no terminator.

``encode_event`` is the inverse for one event.
"""

from __future__ import annotations

from ragplane.errors import UpstreamProtocolError
from ragplane.gateway.types import SseEvent

__all__ = ["MAX_LINE_BYTES", "SseDecoder", "encode_event"]

MAX_LINE_BYTES = 16 * 1024 * 1024
"""A longer unterminated line means the upstream is not speaking SSE."""

_BOM = "\ufeff"


class SseDecoder:
    """Bytes in any split → ``SseEvent`` s, in order. One decoder per stream."""

    __slots__ = ("_buf", "_data", "_event", "_skip_lf", "_started")

    def __init__(self) -> None:
        self._buf = b""  # bytes of an incomplete line (no line terminator yet)
        self._data: list[str] = []
        self._event: str | None = None
        self._started = False
        self._skip_lf = False

    def feed(self, chunk: bytes) -> list[SseEvent]:
        if self._skip_lf and chunk:
            # the last chunk ended with \r, already taken as a line end: drop its \n
            if chunk[0] == 0x0A:
                chunk = chunk[1:]
            self._skip_lf = False
        buf = self._buf + chunk if self._buf else chunk
        if b"\r" in buf:
            self._skip_lf = buf.endswith(b"\r")
            buf = buf.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        end = buf.rfind(b"\n")
        if end < 0:
            if len(buf) > MAX_LINE_BYTES:
                raise UpstreamProtocolError(
                    f"server-sent event line longer than {MAX_LINE_BYTES} bytes"
                )
            self._buf = buf
            return []
        self._buf = buf[end + 1 :]
        try:
            text = buf[:end].decode("utf-8")
        except UnicodeDecodeError as exc:
            raise UpstreamProtocolError("server-sent events are not valid UTF-8") from exc
        return self._lines(text.split("\n"))

    def flush(self) -> list[SseEvent]:
        """The end of the stream: dispatch what a missing final blank line left pending."""
        rest = self._buf
        self._buf = b""
        lines: list[str] = []
        if rest:
            try:
                lines.append(rest.decode("utf-8"))
            except UnicodeDecodeError as exc:
                raise UpstreamProtocolError("server-sent events are not valid UTF-8") from exc
        lines.append("")
        return self._lines(lines)

    def _lines(self, lines: list[str]) -> list[SseEvent]:
        events: list[SseEvent] = []
        if not self._started and lines:
            self._started = True
            if lines[0].startswith(_BOM):
                lines[0] = lines[0][1:]
        data = self._data
        for line in lines:
            if not line:
                if data:
                    events.append(SseEvent(self._event, "\n".join(data)))
                    data.clear()
                self._event = None
                continue
            if line[0] == ":":
                continue  # a comment: keep-alive pings
            if line.startswith("data:"):
                value = line[5:]
                data.append(value[1:] if value.startswith(" ") else value)
                continue
            name, sep, value = line.partition(":")
            if sep and value.startswith(" "):
                value = value[1:]
            if name == "event":
                self._event = value or None
            elif name == "data":  # "data" with no colon: an empty data line
                data.append("")
            # id, retry and unknown fields carry nothing a gateway needs
        return events


def encode_event(data: bytes | str, event: str | None = None) -> bytes:
    """One SSE frame: optional ``event:`` line, one ``data:`` line per line of data."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    if b"\n" in raw or b"\r" in raw:
        lines = raw.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
        body = b"".join(b"data: " + line + b"\n" for line in lines)
    else:
        body = b"data: " + raw + b"\n"
    if event is None:
        return body + b"\n"
    return b"event: " + event.encode("utf-8") + b"\n" + body + b"\n"
