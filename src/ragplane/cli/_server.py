"""uvicorn's server, woken once a second instead of ten times (imported when serving)."""

from __future__ import annotations

import asyncio
import contextlib
from types import FrameType

import uvicorn

__all__ = ["Server"]


class Server(uvicorn.Server):
    """uvicorn's main loop wakes every 100 ms to refresh the ``Date`` header (once a
    second) and to poll ``should_exit``: an idle gateway spent about 1.5 ms of CPU per
    second on it, a tenth of a millisecond per request at one request every 50 ms
    (docs/benchmarks.md, "Gateway"). This loop ticks once a second, and SIGINT/SIGTERM
    wake it at once; setting ``should_exit`` by hand takes effect within a second."""

    _wake: asyncio.Event | None = None
    _loop: asyncio.AbstractEventLoop | None = None

    async def main_loop(self) -> None:
        self._wake = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        counter = 0
        should_exit = await self.on_tick(counter)
        while not should_exit:
            counter = (counter + 10) % 864_000  # on_tick refreshes the Date at multiples of 10
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), 1.0)
            should_exit = await self.on_tick(counter)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        if self._loop is not None and self._wake is not None:
            self._loop.call_soon_threadsafe(self._wake.set)
