"""Commands that run the platform: ``up``, ``serve``, ``worker``, ``mock-provider``."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Callable
from typing import Annotated, Any

import typer

from ragplane.cli._common import (
    ConfigOpt,
    DataDirOpt,
    _run,
    _settings,
    app,
    err,
    out,
)
from ragplane.config import Settings
from ragplane.errors import RagplaneError

__all__ = ["mock_provider", "serve", "up", "worker"]


def _serve(
    settings: Settings,
    on_ready: Callable[[Any], None],
    *,
    with_worker: bool = False,
    gateway_only: bool = False,
) -> None:
    """Run the app under uvicorn; call ``on_ready(platform)`` once the socket is listening.

    ``with_worker``: also run background jobs in this process (the one-process deployment).
    ``gateway_only``: serve the LLM gateway's API alone, at the root.
    """
    import uvicorn
    import uvloop

    from ragplane.cli._server import Server
    from ragplane.observe.logging import configure_logging
    from ragplane.platform import Platform, create_app, create_gateway_app

    configure_logging(settings.log_level, settings.log_format)
    platform = Platform(settings)
    make_app = create_gateway_app if gateway_only else create_app
    server = Server(
        uvicorn.Config(
            make_app(settings, platform=platform),
            host=settings.host,
            port=settings.port,
            log_level="warning",
            access_log=False,
            # client addresses from X-Forwarded-For are the edge's business, for the
            # proxies it trusts (edge.trusted_proxies), not uvicorn's loopback default
            proxy_headers=False,
            server_header=False,  # no software fingerprint on every answer
        )
    )

    async def announce_when_listening() -> None:
        # uvicorn exposes only a flag for "listening"; poll it
        while not server.started:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        on_ready(platform)

    async def run() -> None:
        await platform.start()  # errors surface here, as a clean message, before binding
        _tune_gc()
        announcer = asyncio.create_task(announce_when_listening())
        worker = asyncio.create_task(platform.run_worker_in_process()) if with_worker else None
        try:
            await server.serve()
        finally:
            announcer.cancel()
            if worker is not None:
                worker.cancel()  # running jobs get a short grace, then go back to the queue
                with contextlib.suppress(asyncio.CancelledError):
                    await worker
            await platform.stop()

    # uvicorn shuts down gracefully on SIGINT/SIGTERM, then re-raises the signal to the
    # previous handler: make that a clean exit (before serving starts it stops start-up;
    # atexit then stops the embedded database). On a bind failure uvicorn logs the OS
    # error, shuts the app down and raises SystemExit; both end here.
    signalled: list[int] = []

    def exit_quietly(signum: int, frame: object) -> None:
        signalled.append(signum)
        raise SystemExit(0)

    previous = {sig: signal.signal(sig, exit_quietly) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with contextlib.suppress(SystemExit):
            uvloop.run(run())
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if not server.started and not signalled:
        raise RagplaneError(
            f"could not listen on {settings.host}:{settings.port} (see the error above; "
            "is the port in use? choose another with --port)"
        )


def _tune_gc() -> None:
    """A server's heap is mostly what start-up made (modules, settings, pools): keep it out
    of every collection (``gc.freeze``) and collect the young generation less often. Under
    load this cut the gateway's CPU per request by about a third and its p99 latency by
    half (docs/benchmarks.md, "Gateway"); nothing else changes."""
    import gc

    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 20, 10)


@app.command()
def up(
    host: Annotated[
        str, typer.Option(help="Interface to bind (dev mode needs loopback).")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8080,
    data_dir: DataDirOpt = None,
    config: ConfigOpt = None,
    dev: Annotated[
        bool, typer.Option("--dev/--no-dev", help="Dev mode: demo tenants and tokens.")
    ] = True,
    worker: Annotated[
        bool,
        typer.Option("--worker/--no-worker", help="Run background jobs in this process too."),
    ] = True,
) -> None:
    """Start the whole platform in one process on embedded defaults."""
    settings = _settings(
        config,
        host=host,
        port=port,
        data_dir=data_dir,
        dev_mode=dev,
        knowledge={"demo_kb": True} if dev else None,
    )

    def announce(platform: Any) -> None:
        url = f"http://{settings.host}:{settings.port}"
        out.print(
            f"[bold green]ragplane is ready[/] at {url}  (API docs: {url}/docs)", soft_wrap=True
        )
        out.print(f"data directory: {settings.data_dir}", soft_wrap=True, highlight=False)
        if settings.dev_mode:
            out.print("dev mode: demo tenants tnt_acme_eu (eu) and tnt_globex_us (us)")
            out.print("demo token for tnt_acme_eu (use as 'Authorization: Bearer <token>'):")
            out.print(platform.dev_token("tnt_acme_eu"), soft_wrap=True, highlight=False)

    _serve(settings, announce, with_worker=worker)


@app.command()
def serve(
    what: Annotated[
        str,
        typer.Argument(help="'all' (edge, AI service and gateway at /gateway) or 'gateway'."),
    ] = "all",
    host: Annotated[str | None, typer.Option(help="Interface to bind.")] = None,
    port: Annotated[int | None, typer.Option(help="Port to listen on.")] = None,
    config: ConfigOpt = None,
) -> None:
    """Serve the API with the settings as configured (production entry point)."""
    if what not in ("all", "gateway"):
        raise typer.BadParameter(f"expected 'all' or 'gateway', got {what!r}", param_hint="WHAT")
    settings = _settings(config, host=host, port=port)

    def announce(_: Any) -> None:
        name = "ragplane gateway" if what == "gateway" else "ragplane"
        err.print(f"{name} serving on http://{settings.host}:{settings.port}")

    _serve(settings, announce, gateway_only=what == "gateway")


@app.command()
def worker(
    data_dir: DataDirOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Run background jobs (document ingestion) until SIGINT/SIGTERM.

    Run as many as you like, on any machine that reaches the database; a job whose
    worker dies is taken over by another (worker.stalled_after_s).
    """
    from ragplane.observe.logging import configure_logging
    from ragplane.platform import Platform

    settings = _settings(config, data_dir=data_dir)
    configure_logging(settings.log_level, settings.log_format)
    platform = Platform(settings)

    async def run() -> None:
        await platform.start()
        try:
            err.print("ragplane worker started; waiting for jobs (Ctrl-C stops it)")
            await platform.run_worker()
        finally:
            await platform.stop()

    # while jobs run, procrastinate handles SIGINT/SIGTERM itself (graceful: running jobs
    # get worker.shutdown_grace_s); before and after that, a signal is a clean exit
    def exit_quietly(signum: int, frame: object) -> None:
        raise SystemExit(0)

    previous = {sig: signal.signal(sig, exit_quietly) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with contextlib.suppress(SystemExit):
            _run(run())
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@app.command("mock-provider")
def mock_provider(
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on (0: a free one).")] = 9100,
    latency_ms: Annotated[float, typer.Option(min=0, help="Delay before headers.")] = 0.0,
    ttft_ms: Annotated[float, typer.Option(min=0, help="Headers to first token.")] = 0.0,
    tokens_per_s: Annotated[float, typer.Option(min=0, help="Stream pace; 0: unpaced.")] = 0.0,
    output_tokens: Annotated[int, typer.Option(min=1, help="Answer length.")] = 16,
    grounded: Annotated[
        bool,
        typer.Option(help="Answer RAG prompts by quoting each passage's first sentence, cited."),
    ] = False,
    fault: Annotated[
        list[str] | None, typer.Option(help="Fault spec, e.g. 503, 429:2, cut:3 (repeatable).")
    ] = None,
    fault_rate: Annotated[float, typer.Option(min=0, max=1, help="Share of requests.")] = 1.0,
    fault_count: Annotated[
        int | None, typer.Option(min=0, help="Only the next N requests (per --fault).")
    ] = None,
    cached_tokens: Annotated[int, typer.Option(min=0, help="OpenAI cached_tokens.")] = 0,
    api_key: Annotated[str | None, typer.Option(help="Require this key.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of the fault-rate draws.")] = None,
) -> None:
    """Run the provider test server (OpenAI + Anthropic protocols, latency, faults) until
    SIGINT/SIGTERM. Per-request headers: x-mock-fault, x-mock-latency-ms, x-mock-ttft-ms,
    x-mock-tokens-per-s; admin: GET /_mock/stats, POST /_mock/faults, POST /_mock/reset."""
    from ragplane.gateway.mockprovider import (
        FaultRule,
        MockProvider,
        MockProviderConfig,
        serve_mock_provider,
    )

    config = MockProviderConfig(
        api_key=api_key,
        latency_ms=latency_ms,
        ttft_ms=ttft_ms,
        tokens_per_s=tokens_per_s,
        output_tokens=output_tokens,
        grounded=grounded,
        cached_tokens=cached_tokens,
        faults=tuple(FaultRule(f, rate=fault_rate, count=fault_count) for f in fault or ()),
        seed=seed,
    )

    def announce(mock: MockProvider) -> None:
        err.print(f"mock provider listening on {mock.url}", highlight=False, soft_wrap=True)

    serve_mock_provider(config, host=host, port=port, on_ready=announce)
