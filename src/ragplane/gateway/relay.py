"""A stream after its first byte: forwarded, and ended explicitly, exactly once.

By the time a :class:`StreamRelay` exists the provider's first chunk has arrived and
the caller is about to see it, so nothing is retried any more: a stream that breaks
(connection lost, malformed event, idle or total timeout, no final event) ends with
the caller protocol's error event, never silently.

The relay ends exactly once, whichever comes first: the stream's own end, an error,
or :meth:`aclose` — which the HTTP layer calls when the caller goes away, also for a
stream that was never iterated (a never-started generator runs no ``finally``). The
end closes the upstream response and hands usage and outcome to ``on_end`` (bulkhead
slot, breaker, ledger).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from ragplane.errors import GatewayError, StreamInterrupted
from ragplane.gateway.sse import SseDecoder
from ragplane.gateway.types import StreamTranslator, UpstreamResponse, Usage

__all__ = ["StreamEnd", "StreamRelay"]

StreamEnd = Callable[[Usage, GatewayError | None, str | None], Awaitable[None]]
"""``on_end(usage, error, status)``: status is ``"client_closed"`` when the caller left."""


class StreamRelay:
    def __init__(
        self,
        *,
        response: UpstreamResponse,
        chunks: AsyncIterator[bytes],
        decoder: SseDecoder,
        translator: StreamTranslator,
        first: list[bytes],
        deadline: float,
        total_s: float,
        request_id: str,
        on_end: StreamEnd,
    ) -> None:
        self._response = response
        self._chunks = chunks
        self._decoder = decoder
        self._translator = translator
        self._first = first
        self._deadline = deadline  # time.perf_counter() value
        self._total_s = total_s
        self._request_id = request_id
        self._on_end = on_end
        self._ended = False

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._frames()

    async def aclose(self) -> None:
        """End the stream now if it has not ended (the caller went away)."""
        await self._end(None, None if self._translator.finished else "client_closed")

    async def _end(self, error: GatewayError | None, status: str | None) -> None:
        if self._ended:
            return
        self._ended = True
        try:
            await self._response.aclose()
        finally:
            await self._on_end(self._translator.usage or Usage(), error, status)

    async def _frames(self) -> AsyncIterator[bytes]:
        error: GatewayError | None = None
        try:
            for frame in self._first:
                yield frame
            async with asyncio.timeout(max(0.0, self._deadline - time.perf_counter())):
                async for frame in self._rest():
                    yield frame
        except TimeoutError:
            error = StreamInterrupted(f"the stream passed its total timeout of {self._total_s:g} s")
        except StreamInterrupted as exc:
            error = exc
        except GatewayError as exc:
            error = StreamInterrupted(f"the stream broke: {exc.message}")
        finally:
            if error is None and not self._translator.finished:
                await self._end(None, "client_closed")  # GeneratorExit: the caller left
        if error is not None:
            for frame in self._translator.error_frames(error.code, error.message, self._request_id):
                yield frame
        await self._end(error, None)

    async def _rest(self) -> AsyncIterator[bytes]:
        translator, decoder = self._translator, self._decoder
        if translator.finished:
            return
        async for chunk in self._chunks:
            for event in decoder.feed(chunk):
                for frame in translator.feed(event):
                    yield frame
            if translator.finished:
                return
        for event in decoder.flush():  # the body ended: a last event may lack its blank line
            for frame in translator.feed(event):
                yield frame
        if not translator.finished:
            raise StreamInterrupted("the provider's stream ended without its final event")
