"""HttpTransport against real servers on loopback: an aiohttp app for well-behaved and
slow upstreams, a raw asyncio server for broken ones, and a listening socket whose
accept queue is full for connects that never complete."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field

import orjson
import pytest
from aiohttp import web

from ragplane.config import GatewaySettings, ProviderSettings
from ragplane.errors import UpstreamProtocolError, UpstreamTimeout, UpstreamUnavailable
from ragplane.gateway.providers.local_extractive import LocalExtractiveTransport
from ragplane.gateway.transport import HttpTransport, build_transports, close_transports
from ragplane.gateway.types import UpstreamRequest

SLOW = 5.0  # what "never" means for a server that stalls; timeouts under test are 0.2 s


@dataclass
class Upstream:
    base: str = ""
    active: int = 0
    peak: int = 0
    seen: list[tuple[dict[str, str], bytes]] = field(default_factory=list)


UPSTREAM = web.AppKey("upstream", Upstream)


async def _json(request: web.Request) -> web.Response:
    upstream: Upstream = request.app[UPSTREAM]
    body = await request.read()
    upstream.seen.append((dict(request.headers), body))
    return web.json_response({"echo": orjson.loads(body)}, headers={"X-Upstream-Id": "u-1"})


async def _chunks(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    for i in range(5):
        await response.write(f"data: {i}\n\n".encode())
        await asyncio.sleep(0.01)
    await response.write_eof()
    return response


async def _small(request: web.Request) -> web.Response:
    return web.Response(body=b"whole")  # with its content-length


async def _trickle(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse()
    await response.prepare(request)
    for i in range(8):
        await asyncio.sleep(0.1)
        await response.write(b"%d" % i)
    await response.write_eof()
    return response


async def _status(request: web.Request) -> web.Response:
    return web.json_response({"error": "overloaded"}, status=503, headers={"Retry-After": "3"})


async def _slow_headers(request: web.Request) -> web.Response:
    await asyncio.sleep(SLOW)
    return web.Response(text="late")


async def _slow_body(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse()
    await response.prepare(request)  # headers go out now, the body much later
    await asyncio.sleep(SLOW)
    await response.write(b"late")
    return response


async def _stall(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse()
    await response.prepare(request)
    await response.write(b"first")
    await asyncio.sleep(SLOW)
    return response


async def _concurrent(request: web.Request) -> web.Response:
    upstream: Upstream = request.app[UPSTREAM]
    upstream.active += 1
    upstream.peak = max(upstream.peak, upstream.active)
    try:
        await asyncio.sleep(0.3)
    finally:
        upstream.active -= 1
    return web.Response(text=request.query["i"])


async def _port(request: web.Request) -> web.Response:
    """The caller's port: which pooled connection the call came on."""
    assert request.transport is not None
    return web.Response(text=str(request.transport.get_extra_info("peername")[1]))


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    app = web.Application()
    app.router.add_post("/json", _json)
    app.router.add_get("/chunks", _chunks)
    app.router.add_get("/small", _small)
    app.router.add_get("/status", _status)
    app.router.add_get("/trickle", _trickle)
    app.router.add_get("/slow-headers", _slow_headers)
    app.router.add_get("/slow-body", _slow_body)
    app.router.add_get("/stall", _stall)
    app.router.add_get("/concurrent", _concurrent)
    app.router.add_get("/port", _port)
    state = Upstream()
    app[UPSTREAM] = state
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    state.base = f"http://127.0.0.1:{port}"
    try:
        yield state
    finally:
        await runner.cleanup()


@pytest.fixture
async def transport() -> AsyncIterator[HttpTransport]:
    t = HttpTransport()
    try:
        yield t
    finally:
        await t.aclose()


def get(url: str) -> UpstreamRequest:
    return UpstreamRequest("GET", url, {}, b"", stream=False)


async def test_headers_status_and_body(upstream: Upstream, transport: HttpTransport) -> None:
    request = UpstreamRequest(
        "POST",
        upstream.base + "/json",
        {"Content-Type": "application/json", "Authorization": "Bearer k"},
        b'{"q": 1}',
        stream=False,
    )
    response = await transport.send(request, connect_s=1, ttft_s=2)
    assert response.status == 200
    assert response.headers["x-upstream-id"] == "u-1"
    assert response.headers["content-type"].startswith("application/json")
    assert orjson.loads(await response.read()) == {"echo": {"q": 1}}
    headers, body = upstream.seen[0]
    assert headers["Authorization"] == "Bearer k"
    assert body == b'{"q": 1}'
    # read to the end: the connection went back to the pool for the next call
    assert transport.pool_stats().in_use == 0
    assert transport.pool_stats().idle == 1
    assert transport.pool_stats().open_responses == 0
    again = await transport.send(request, connect_s=1, ttft_s=2)
    await again.read()
    assert transport.pool_stats().idle == 1


async def test_a_body_that_came_whole_frees_its_connection_with_its_first_chunk(
    upstream: Upstream, transport: HttpTransport
) -> None:
    response = await transport.send(get(upstream.base + "/small"), connect_s=1, ttft_s=2)
    chunks = response.iter_chunks()
    assert await anext(chunks) == b"whole"
    # back in the pool before anyone asked for the end
    assert transport.pool_stats().open_responses == 0
    assert transport.pool_stats().idle == 1
    with pytest.raises(StopAsyncIteration):
        await anext(chunks)


async def test_chunks_arrive_as_sent(upstream: Upstream, transport: HttpTransport) -> None:
    response = await transport.send(get(upstream.base + "/chunks"), connect_s=1, ttft_s=2)
    assert response.headers["content-type"] == "text/event-stream"
    chunks = [chunk async for chunk in response.iter_chunks(idle_s=2)]
    assert len(chunks) > 1
    assert b"".join(chunks) == b"".join(f"data: {i}\n\n".encode() for i in range(5))
    assert transport.pool_stats().in_use == 0
    await response.aclose()  # idempotent after the end
    assert transport.pool_stats().open_responses == 0


async def test_an_error_status_is_an_answer_not_an_exception(
    upstream: Upstream, transport: HttpTransport
) -> None:
    response = await transport.send(get(upstream.base + "/status"), connect_s=1, ttft_s=2)
    assert response.status == 503
    assert response.headers["retry-after"] == "3"
    assert orjson.loads(await response.read()) == {"error": "overloaded"}


@pytest.fixture
def unaccepting_port() -> Iterator[int]:
    """A port whose accept queue is full: SYNs are dropped, connects hang."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(3):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", port))
        fillers.append(s)
    try:
        yield port
    finally:
        for s in fillers:
            s.close()
        listener.close()


async def test_connect_timeout(unaccepting_port: int, transport: HttpTransport) -> None:
    with pytest.raises(UpstreamTimeout) as caught:
        await transport.send(get(f"http://127.0.0.1:{unaccepting_port}/"), connect_s=0.2, ttft_s=5)
    assert caught.value.phase == "connect"
    assert caught.value.retryable
    assert transport.pool_stats().in_use == 0


async def test_ttft_timeout_waiting_for_headers(
    upstream: Upstream, transport: HttpTransport
) -> None:
    with pytest.raises(UpstreamTimeout) as caught:
        await transport.send(get(upstream.base + "/slow-headers"), connect_s=0.1, ttft_s=0.2)
    assert caught.value.phase == "ttft"
    assert transport.pool_stats().in_use == 0


async def test_ttft_timeout_waiting_for_the_first_body_byte(
    upstream: Upstream, transport: HttpTransport
) -> None:
    response = await transport.send(get(upstream.base + "/slow-body"), connect_s=0.1, ttft_s=0.2)
    assert response.status == 200
    with pytest.raises(UpstreamTimeout) as caught:
        await response.read(idle_s=10)
    assert caught.value.phase == "ttft"
    assert transport.pool_stats().in_use == 0
    assert transport.pool_stats().open_responses == 0


async def test_idle_timeout_between_chunks(upstream: Upstream, transport: HttpTransport) -> None:
    response = await transport.send(get(upstream.base + "/stall"), connect_s=1, ttft_s=2)
    chunks = response.iter_chunks(idle_s=0.2)
    assert await anext(chunks) == b"first"
    with pytest.raises(UpstreamTimeout) as caught:
        await anext(chunks)
    assert caught.value.phase == "idle"
    assert transport.pool_stats().in_use == 0
    assert transport.pool_stats().open_responses == 0


async def test_total_timeout_bounds_a_body_that_keeps_trickling(
    upstream: Upstream, transport: HttpTransport
) -> None:
    """Every gap is within idle_s, but the whole body takes 0.8 s: total_s cuts it."""
    response = await transport.send(
        get(upstream.base + "/trickle"), connect_s=1, ttft_s=2, total_s=0.35
    )
    with pytest.raises(UpstreamTimeout) as caught:
        await response.read(idle_s=0.5)
    assert caught.value.phase == "total"
    assert transport.pool_stats().in_use == 0
    assert transport.pool_stats().open_responses == 0


async def test_total_timeout_shorter_than_ttft_while_waiting_for_headers(
    upstream: Upstream, transport: HttpTransport
) -> None:
    with pytest.raises(UpstreamTimeout) as caught:
        await transport.send(
            get(upstream.base + "/slow-headers"), connect_s=1, ttft_s=5, total_s=0.2
        )
    assert caught.value.phase == "total"
    assert transport.pool_stats().in_use == 0


async def test_a_steady_stream_longer_than_idle_s_is_fine(
    upstream: Upstream, transport: HttpTransport
) -> None:
    response = await transport.send(get(upstream.base + "/trickle"), connect_s=1, ttft_s=2)
    assert await response.read(idle_s=0.35) == b"01234567"  # 0.8 s in all, gaps of 0.1 s


async def test_a_slow_consumer_is_not_an_idle_upstream(
    upstream: Upstream, transport: HttpTransport
) -> None:
    response = await transport.send(get(upstream.base + "/chunks"), connect_s=1, ttft_s=2)
    received = []
    async for chunk in response.iter_chunks(idle_s=0.1):
        received.append(chunk)
        await asyncio.sleep(0.3)  # the deadline passes while we are busy, not reading
    assert b"".join(received) == b"".join(f"data: {i}\n\n".encode() for i in range(5))


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_refused_connection_is_unavailable(transport: HttpTransport) -> None:
    with pytest.raises(UpstreamUnavailable) as caught:
        await transport.send(get(f"http://127.0.0.1:{closed_port()}/"), connect_s=1, ttft_s=1)
    assert caught.value.retryable


async def test_unresolvable_host_is_unavailable(transport: HttpTransport) -> None:
    with pytest.raises(UpstreamUnavailable):
        await transport.send(get("http://upstream.invalid/v1"), connect_s=2, ttft_s=1)


RawHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@pytest.fixture
async def raw_server() -> AsyncIterator[Callable[[RawHandler], Awaitable[str]]]:
    servers: list[asyncio.Server] = []

    async def start(handler: RawHandler) -> str:
        server = await asyncio.start_server(handler, "127.0.0.1", 0)
        servers.append(server)
        return f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


async def _read_request(reader: asyncio.StreamReader) -> None:
    await reader.readuntil(b"\r\n\r\n")


async def test_server_closing_mid_body(
    raw_server: Callable[[RawHandler], Awaitable[str]], transport: HttpTransport
) -> None:
    async def truncated(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789")
        await writer.drain()
        writer.close()

    base = await raw_server(truncated)
    response = await transport.send(get(base + "/"), connect_s=1, ttft_s=2)
    assert response.status == 200
    with pytest.raises(UpstreamProtocolError) as caught:
        await response.read(idle_s=2)
    assert caught.value.retryable
    assert transport.pool_stats().in_use == 0
    assert transport.pool_stats().open_responses == 0


async def test_server_dropping_a_chunked_stream(
    raw_server: Callable[[RawHandler], Awaitable[str]], transport: HttpTransport
) -> None:
    async def dropped(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        writer.write(b"d\r\ndata: first\n\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.transport.abort()  # reset, no terminating chunk

    base = await raw_server(dropped)
    response = await transport.send(get(base + "/"), connect_s=1, ttft_s=2)
    chunks = response.iter_chunks(idle_s=2)
    assert await anext(chunks) == b"data: first\n\n"
    with pytest.raises((UpstreamProtocolError, UpstreamUnavailable)):
        await anext(chunks)
    assert transport.pool_stats().in_use == 0


async def test_garbage_instead_of_http_is_a_protocol_error(
    raw_server: Callable[[RawHandler], Awaitable[str]], transport: HttpTransport
) -> None:
    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")
        await writer.drain()
        writer.close()

    base = await raw_server(garbage)
    with pytest.raises((UpstreamProtocolError, UpstreamUnavailable)):
        await transport.send(get(base + "/"), connect_s=1, ttft_s=2)
    assert transport.pool_stats().in_use == 0


async def test_cancelling_a_read_releases_the_connection(
    upstream: Upstream, transport: HttpTransport
) -> None:
    response = await transport.send(get(upstream.base + "/stall"), connect_s=1, ttft_s=2)
    assert transport.pool_stats().in_use == 1
    assert transport.pool_stats().open_responses == 1

    async def consume() -> None:
        async for _ in response.iter_chunks(idle_s=2):  # a deadline armed, not reached
            pass

    task = asyncio.create_task(consume())
    await asyncio.sleep(0.1)  # first chunk read, now waiting for the stalled second
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert transport.pool_stats().in_use == 0
    assert transport.pool_stats().open_responses == 0


async def test_cancelling_a_send_releases_the_connection(
    upstream: Upstream, transport: HttpTransport
) -> None:
    task = asyncio.create_task(
        transport.send(get(upstream.base + "/slow-headers"), connect_s=1, ttft_s=10)
    )
    await asyncio.sleep(0.1)
    assert transport.pool_stats().in_use == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert transport.pool_stats().in_use == 0


async def test_closing_an_unread_response_releases_the_connection(
    upstream: Upstream, transport: HttpTransport
) -> None:
    response = await transport.send(get(upstream.base + "/stall"), connect_s=1, ttft_s=2)
    async with response:
        assert transport.pool_stats().in_use == 1
    assert transport.pool_stats().in_use == 0
    assert transport.pool_stats().idle == 0  # a half-read connection is closed, not reused


async def test_64_concurrent_calls(upstream: Upstream, transport: HttpTransport) -> None:
    async def call(i: int) -> bytes:
        response = await transport.send(
            get(f"{upstream.base}/concurrent?i={i}"), connect_s=2, ttft_s=10
        )
        return await response.read()

    bodies = await asyncio.gather(*(call(i) for i in range(64)))
    assert bodies == [str(i).encode() for i in range(64)]
    assert upstream.peak == 64  # nothing queued behind a pool limit
    stats = transport.pool_stats()
    assert stats.in_use == 0
    assert stats.idle == 64
    assert stats.open_responses == 0


async def test_after_a_burst_sequential_calls_reuse_the_connection_released_last(
    upstream: Upstream, transport: HttpTransport
) -> None:
    """Eight connections stay idle after the burst; calls one at a time keep to the
    warmest of them instead of cycling through all eight."""

    async def call(path: str) -> bytes:
        response = await transport.send(get(upstream.base + path), connect_s=2, ttft_s=10)
        return await response.read()

    await asyncio.gather(*(call(f"/concurrent?i={i}") for i in range(8)))
    assert transport.pool_stats().idle == 8
    ports = [await call("/port") for _ in range(6)]
    assert len(set(ports)) == 1, ports
    assert transport.pool_stats().idle == 8


async def test_a_closed_transport_refuses_calls(upstream: Upstream) -> None:
    transport = HttpTransport()
    await (await transport.send(get(upstream.base + "/status"), connect_s=1, ttft_s=1)).read()
    await transport.aclose()
    with pytest.raises(UpstreamUnavailable):
        await transport.send(get(upstream.base + "/status"), connect_s=1, ttft_s=1)


async def test_build_transports_shares_one_http_transport() -> None:
    settings = GatewaySettings(
        providers={
            "openai": ProviderSettings(type="openai", base_url="https://api.openai.com/v1"),
            "anthropic": ProviderSettings(type="anthropic", base_url="https://api.anthropic.com"),
            "vllm": ProviderSettings(type="openai", base_url="http://vllm:8000/v1"),
            "local": ProviderSettings(type="local-extractive"),
        },
        models={},
        aliases={},
    )
    transports = build_transports(settings)
    assert isinstance(transports["openai"], HttpTransport)
    assert transports["openai"] is transports["anthropic"] is transports["vllm"]
    assert isinstance(transports["local"], LocalExtractiveTransport)
    await close_transports(transports.values())


def test_the_default_settings_need_no_network() -> None:
    transports = build_transports(GatewaySettings())
    assert {name: type(t) for name, t in transports.items()} == {"local": LocalExtractiveTransport}
