"""The mock provider's aiohttp application, its admin endpoints, and the two ways to run
it: ``run_mock_provider`` (in the caller's event loop) and ``serve_mock_provider``
(a blocking process entry point that stops on SIGINT/SIGTERM)."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import orjson
import uvloop
from aiohttp import web

from ragplane.errors import ConfigError
from ragplane.gateway.mockprovider import _anthropic, _openai
from ragplane.gateway.mockprovider._config import FaultRule, MockProviderConfig
from ragplane.gateway.mockprovider._state import MockState, MockStats
from ragplane.gateway.mockprovider._wire import Call, Timing, close_connection, hang
from ragplane.observe.logging import get_logger

__all__ = ["MockProvider", "build_app", "run_mock_provider", "serve_mock_provider"]

log = get_logger(__name__)
_INT_HEADERS = ("x-mock-output-tokens", "x-mock-cached-tokens", "x-mock-reasoning-tokens")
_MAX_BODY = 64 * 1024 * 1024
Answer = Callable[[Call], Awaitable[web.StreamResponse]]


@dataclass(frozen=True, slots=True)
class _Api:
    error: Callable[..., web.Response]
    check_auth: Callable[[web.Request, str], web.Response | None]


_OPENAI = _Api(_openai.error, _openai.check_auth)
_ANTHROPIC = _Api(_anthropic.error, _anthropic.check_auth)


def _timing(headers: Mapping[str, str], config: MockProviderConfig) -> Timing:
    """Per-request timing (headers override the config); ValueError on a bad header."""

    def seconds(name: str, default_ms: float) -> float:
        value = headers.get(name)
        ms = default_ms if value is None else float(value)
        if ms < 0:
            raise ValueError(f"{name} must not be negative")
        return ms / 1000.0

    for name in _INT_HEADERS:
        if name in headers and int(headers[name]) < 0:
            raise ValueError(f"{name} must not be negative")
    tps = headers.get("x-mock-tokens-per-s")
    return Timing(
        latency_s=seconds("x-mock-latency-ms", config.latency_ms),
        ttft_s=seconds("x-mock-ttft-ms", config.ttft_ms),
        tokens_per_s=config.tokens_per_s if tps is None else max(float(tps), 0.0),
    )


async def _serve(
    request: web.Request, state: MockState, api: _Api, answer: Answer, number: int
) -> web.StreamResponse:
    config = state.config
    if config.api_key is not None:
        denied = api.check_auth(request, config.api_key)
        if denied is not None:
            return denied
    try:
        timing = _timing(request.headers, config)
        fault = state.fault_for(request.headers.get("x-mock-fault"))
    except (ConfigError, ValueError) as exc:
        return api.error(400, f"mock provider: {exc}")
    body: Any = {}
    if request.method == "POST":
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            return api.error(400, "The request body is not valid JSON.")
        if not isinstance(body, dict):
            return api.error(400, "The request body must be a JSON object.")
    if fault is not None and fault.kind == "hang":
        return await hang(request, state.stopping)
    if timing.latency_s > 0:
        await asyncio.sleep(timing.latency_s)
    if fault is not None and fault.kind == "refuse":
        return close_connection(request)
    if fault is not None and fault.kind == "status":
        retry = fault.retry_after_s
        if retry is None and fault.status == 429:
            retry = config.retry_after_s
        headers = {} if retry is None else {"Retry-After": f"{retry:g}"}
        return api.error(fault.status, headers=headers)
    call = Call(request, state, body, timing, fault, number, f"req_mock{number}")
    try:
        return await answer(call)
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        # a body of the wrong shape somewhere the handlers do not check field by field
        log.warning("mock_provider.bad_request", path=request.path, error=repr(exc))
        return api.error(400, f"The request body has an invalid shape: {exc!r}")


def _route(state: MockState, api: _Api | None, answer: Answer) -> Callable[..., Any]:
    async def handle(request: web.Request) -> web.StreamResponse:
        number = state.begin(request.path)
        chosen = api or (_ANTHROPIC if "anthropic-version" in request.headers else _OPENAI)
        try:
            return await _serve(request, state, chosen, answer, number)
        finally:
            state.end()

    return handle


async def _models(call: Call) -> web.StreamResponse:
    if "anthropic-version" in call.request.headers:
        return await _anthropic.models(call)
    return await _openai.models(call)


def _admin_routes(state: MockState) -> list[web.RouteDef]:
    def state_json() -> web.Response:
        body = {**state.stats().as_json(), "rules": state.rules_json()}
        return web.Response(body=orjson.dumps(body), content_type="application/json")

    async def stats(request: web.Request) -> web.Response:
        return state_json()

    async def set_faults(request: web.Request) -> web.Response:
        """Body: ``{"faults": ["503", {"spec": "429:2", "rate": 0.5, "count": 3}]}``."""
        try:
            payload = orjson.loads(await request.read())
            items = payload["faults"] if isinstance(payload, dict) else payload
            rules = [FaultRule(i) if isinstance(i, str) else FaultRule(**i) for i in items]
        except (orjson.JSONDecodeError, ConfigError, KeyError, TypeError) as exc:
            return _openai.error(400, f"mock provider: bad fault rules: {exc}")
        state.set_faults(rules)
        log.info("mock_provider.faults_set", rules=[r.spec for r in rules])
        return state_json()

    async def reset(request: web.Request) -> web.Response:
        state.reset()
        return state_json()

    return [
        web.get("/_mock/stats", stats),
        web.post("/_mock/faults", set_faults),
        web.post("/_mock/reset", reset),
    ]


def build_app(state: MockState) -> web.Application:
    app = web.Application(client_max_size=_MAX_BODY)
    app.add_routes(
        [
            web.post("/v1/chat/completions", _route(state, _OPENAI, _openai.chat_completions)),
            web.post("/v1/embeddings", _route(state, _OPENAI, _openai.embeddings)),
            web.get("/v1/models", _route(state, None, _models)),
            web.post("/v1/messages", _route(state, _ANTHROPIC, _anthropic.messages)),
            *_admin_routes(state),
            web.route("*", "/{tail:.*}", _not_found),
        ]
    )
    return app


async def _not_found(request: web.Request) -> web.Response:
    api = _ANTHROPIC if "anthropic-version" in request.headers else _OPENAI
    return api.error(404, f"Unknown route: {request.method} {request.path}")


class MockProvider:
    """A running mock provider: its URL, its counters, and runtime fault control."""

    def __init__(self, state: MockState, host: str, port: int) -> None:
        self._state = state
        self.host = host
        self.port = port
        self.url = f"http://{f'[{host}]' if ':' in host else host}:{port}"

    @property
    def openai_base_url(self) -> str:
        """``base_url`` for the OpenAI SDK (the Anthropic SDK takes ``url`` itself)."""
        return self.url + "/v1"

    @property
    def config(self) -> MockProviderConfig:
        return self._state.config

    @property
    def stats(self) -> MockStats:
        return self._state.stats()

    def set_faults(self, *rules: FaultRule | str) -> None:
        """Replace the fault rules; a bare spec string fails every request."""
        self._state.set_faults(FaultRule(r) if isinstance(r, str) else r for r in rules)

    def reset(self) -> None:
        """Zero the counters, restore the configured faults, empty the prompt cache."""
        self._state.reset()


@asynccontextmanager
async def run_mock_provider(
    config: MockProviderConfig | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    shutdown_timeout_s: float = 5.0,
) -> AsyncIterator[MockProvider]:
    """Serve on ``host:port`` (0: a free port) in the running loop until the block ends;
    requests still in flight then get ``shutdown_timeout_s`` to finish."""
    state = MockState(config or MockProviderConfig())
    runner = web.AppRunner(
        build_app(state),
        access_log=None,
        handle_signals=False,
        shutdown_timeout=shutdown_timeout_s,
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, backlog=1024)
        try:
            await site.start()
        except OSError as exc:
            raise ConfigError(f"mock provider: cannot listen on {host}:{port}: {exc}") from exc
        bound = runner.addresses[0][1]
        mock = MockProvider(state, host, bound)
        log.info(
            "mock_provider.listening", url=mock.url, faults=[r.spec for r in state.config.faults]
        )
        yield mock
    finally:
        state.stopping.set()  # hanging requests give up now
        await runner.cleanup()


def serve_mock_provider(
    config: MockProviderConfig,
    *,
    host: str = "127.0.0.1",
    port: int = 9100,
    on_ready: Callable[[MockProvider], None] | None = None,
) -> None:
    """Run a mock provider (on uvloop) until SIGINT or SIGTERM, then stop gracefully."""

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            async with run_mock_provider(config, host=host, port=port) as mock:
                if on_ready is not None:
                    on_ready(mock)
                await stop.wait()
                log.info("mock_provider.stopping", stats=mock.stats.as_json())
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main())
