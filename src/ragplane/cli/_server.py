"""uvicorn's server, woken once a second instead of ten times (imported when serving)."""

from __future__ import annotations

import asyncio
from types import FrameType

import uvicorn

__all__ = ["Server"]


class Server(uvicorn.Server):
    """uvicorn's main loop wakes every 100 ms to refresh the ``Date`` header (once a
    second) and to poll ``should_exit``: an idle gateway spent about 1.5 ms of CPU per
    second on it, a tenth of a millisecond per request at one request every 50 ms
    (docs/benchmarks.md, "Gateway"). This loop ticks once a second on a bare future and
    timer (``asyncio.wait_for`` made a task and two exceptions per tick: 0.4 ms of CPU
    per idle second), and SIGINT/SIGTERM settle the future at once; setting
    ``should_exit`` by hand takes effect within a second."""

    _tick: asyncio.Future[None] | None = None
    _loop: asyncio.AbstractEventLoop | None = None

    async def main_loop(self) -> None:
        loop = self._loop = asyncio.get_running_loop()
        counter = 0
        should_exit = await self.on_tick(counter)
        while not should_exit:
            counter = (counter + 10) % 864_000  # on_tick refreshes the Date at multiples of 10
            tick = self._tick = loop.create_future()
            timer = loop.call_later(1.0, _settle, tick)
            if not self.should_exit:  # a signal after the last on_tick: do not wait
                await tick
            timer.cancel()
            should_exit = await self.on_tick(counter)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        if self._loop is not None and self._tick is not None:
            self._loop.call_soon_threadsafe(_settle, self._tick)


def _settle(tick: asyncio.Future[None]) -> None:
    if not tick.done():
        tick.set_result(None)
