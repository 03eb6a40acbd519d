"""The floor of the gateway benchmark: the least a Python proxy can do.

An aiohttp server (on uvloop, like ``ragplane serve gateway``) that forwards every
request to one upstream through ONE shared ``aiohttp.ClientSession``: same method,
path, body and content type, the upstream's status and body back (streamed chunk by
chunk for ``text/event-stream``). No authentication, routing, retries, breaker or
ledger: whatever a gateway adds above this is the price of those features.

Run as its own process (``ragplane bench gateway`` does)::

    python -m ragplane.evals.floor_proxy --upstream http://127.0.0.1:9100 --port 0

It prints ``floor proxy listening on http://HOST:PORT`` to stderr and stops on
SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import AsyncIterator

import aiohttp
import uvloop
from aiohttp import web

__all__ = ["build_floor_app", "main", "serve_floor"]

_FORWARD = ("content-type", "authorization", "x-api-key", "anthropic-version")
_UPSTREAM = web.AppKey("upstream", str)
_SESSION = web.AppKey("session", aiohttp.ClientSession)


async def _forward(request: web.Request) -> web.StreamResponse:
    session = request.app[_SESSION]
    body = await request.read()
    headers = {h: request.headers[h] for h in _FORWARD if h in request.headers}
    url = request.app[_UPSTREAM] + request.path_qs
    async with session.request(request.method, url, data=body, headers=headers) as upstream:
        content_type = upstream.headers.get("content-type", "application/octet-stream")
        if not content_type.startswith("text/event-stream"):
            return web.Response(
                body=await upstream.read(),
                status=upstream.status,
                headers={"content-type": content_type},
            )
        response = web.StreamResponse(
            status=upstream.status,
            headers={"content-type": content_type, "cache-control": "no-cache"},
        )
        await response.prepare(request)
        async for chunk in upstream.content.iter_any():
            await response.write(chunk)
        await response.write_eof()
        return response


def build_floor_app(upstream: str) -> web.Application:
    """The forwarding app; its session opens on start-up and closes on clean-up."""
    app = web.Application()
    app[_UPSTREAM] = upstream.rstrip("/")

    async def session_ctx(app: web.Application) -> AsyncIterator[None]:
        connector = aiohttp.TCPConnector(limit=1024, limit_per_host=0, keepalive_timeout=30)
        async with aiohttp.ClientSession(
            connector=connector, auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar()
        ) as session:
            app[_SESSION] = session
            yield

    app.cleanup_ctx.append(session_ctx)
    app.router.add_route("*", "/{tail:.*}", _forward)
    return app


async def serve_floor(upstream: str, host: str, port: int) -> None:
    """Serve until SIGINT or SIGTERM."""
    runner = web.AppRunner(build_floor_app(upstream), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=1024)
    await site.start()
    bound = runner.addresses[0][1] if runner.addresses else port
    print(f"floor proxy listening on http://{host}:{bound}", file=sys.stderr, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upstream", required=True, help="Base URL, e.g. http://127.0.0.1:9100")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    uvloop.run(serve_floor(args.upstream, args.host, args.port))


if __name__ == "__main__":
    main()
