"""The served process's main loop: one tick a second, and a signal ends it at once."""

from __future__ import annotations

import asyncio
import signal

import uvicorn

from ragplane.cli._server import Server


def _server() -> tuple[Server, list[int]]:
    server = Server(uvicorn.Config(app=None))
    ticks: list[int] = []

    async def on_tick(counter: int) -> bool:
        ticks.append(counter)
        return server.should_exit

    server.on_tick = on_tick  # type: ignore[method-assign]
    return server, ticks


async def test_a_signal_ends_the_wait_for_the_next_tick_at_once() -> None:
    server, ticks = _server()
    loop = asyncio.get_running_loop()
    task = asyncio.create_task(server.main_loop())
    await asyncio.sleep(0.05)  # inside its one-second wait
    started = loop.time()
    server.handle_exit(signal.SIGTERM, None)
    await asyncio.wait_for(task, 5)
    assert loop.time() - started < 0.9  # not at the tick: woken by the signal
    assert ticks == [0, 10]


async def test_ticks_come_once_a_second_with_the_date_counter() -> None:
    server, ticks = _server()
    task = asyncio.create_task(server.main_loop())
    await asyncio.sleep(1.5)
    server.should_exit = True  # set by hand: seen at the next tick
    await asyncio.wait_for(task, 5)
    assert ticks == [0, 10, 20]
