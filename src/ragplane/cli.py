"""The ``ragplane`` command line."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from ragplane.config import Region, Settings, load_settings
from ragplane.errors import RagplaneError

if TYPE_CHECKING:
    from ragplane.data import DatabaseUrls, Session

__all__ = ["app", "main"]

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    help="ragplane: a production AI platform.",
)
tenants_app = typer.Typer(no_args_is_help=True, help="The tenant registry.")
keys_app = typer.Typer(no_args_is_help=True, help="API keys (bound to one tenant each).")
db_app = typer.Typer(no_args_is_help=True, help="Database migrations.")
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks, side by side with a baseline.")
kb_app = typer.Typer(no_args_is_help=True, help="Knowledge-base namespaces.")
app.add_typer(tenants_app, name="tenants")
app.add_typer(kb_app, name="kb")
app.add_typer(keys_app, name="keys")
app.add_typer(db_app, name="db")
app.add_typer(bench_app, name="bench")

out = Console()
err = Console(stderr=True)
T = TypeVar("T")
DATA_CLASSES = ("public", "standard", "confidential", "restricted")

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="YAML settings file.")]
DataDirOpt = Annotated[Path | None, typer.Option("--data-dir", help="Where embedded data lives.")]


def _settings(config: Path | None, **overrides: Any) -> Settings:
    return load_settings(config, overrides=overrides)


@contextmanager
def _owner_and_app(settings: Settings) -> Iterator[tuple[str | None, str]]:
    """(owner URL, app URL) for admin commands; starts the embedded server if that is the mode."""
    from ragplane.data import EmbeddedPostgres
    from ragplane.platform import database_urls

    if settings.embedded_database:
        embedded = EmbeddedPostgres(settings.data_dir)
        urls = embedded.start()
        try:
            yield urls.owner, urls.app
        finally:
            embedded.stop()
    else:
        urls = database_urls(settings)
        yield urls.owner, urls.app


def _run(coro: Coroutine[Any, Any, T]) -> T:
    import psycopg

    try:
        return asyncio.run(coro)
    except psycopg.IntegrityError as exc:  # a constraint the command did not check itself
        reason = exc.diag.message_primary or str(exc)
        raise RagplaneError(f"the database refused the change: {reason}") from exc


def _control(
    settings: Settings, work: Callable[[Session], Awaitable[T]], *, as_owner: bool = False
) -> T:
    """Run ``work`` in one control-plane unit of work: as the owner for writes, else as the
    application role."""
    from ragplane.data import Database

    with _owner_and_app(settings) as (owner_url, app_url):
        url = _need_owner(owner_url) if as_owner else app_url

        async def go() -> T:
            db = Database(url, max_size=1, name="owner" if as_owner else "app")
            async with db, db.control() as session:
                return await work(session)

        return _run(go())


def _need_owner(owner: str | None) -> str:
    if owner is None:
        raise RagplaneError(
            "this command needs the owner role: set database.owner_url "
            "(RAGPLANE_DATABASE__OWNER_URL)"
        )
    return owner


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

    from ragplane.observe.logging import configure_logging
    from ragplane.platform import Platform, create_app, create_gateway_app

    configure_logging(settings.log_level, settings.log_format)
    platform = Platform(settings)
    make_app = create_gateway_app if gateway_only else create_app
    server = uvicorn.Server(
        uvicorn.Config(
            make_app(settings, platform=platform),
            host=settings.host,
            port=settings.port,
            log_level="warning",
            access_log=False,
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
    settings = _settings(config, host=host, port=port, data_dir=data_dir, dev_mode=dev)

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


@app.command()
def token(
    tenant: Annotated[str, typer.Option("--tenant", "-t", help="Tenant id to put in the token.")],
    data_dir: DataDirOpt = None,
    config: ConfigOpt = None,
    role: Annotated[
        list[str] | None, typer.Option("--role", help="Role claim (repeatable).")
    ] = None,
    ttl: Annotated[int | None, typer.Option(help="Lifetime in seconds.")] = None,
) -> None:
    """Mint a dev JWT signed with this data directory's dev key (printed on the last line)."""
    from ragplane.data.db import validate_tenant_id
    from ragplane.edge.devkeys import load_or_create_dev_keys

    settings = _settings(config, data_dir=data_dir)
    validate_tenant_id(tenant)
    keys = load_or_create_dev_keys(settings.data_dir)
    a = settings.auth
    err.print(f"dev token for {tenant} (accepted by a dev-mode server on {settings.data_dir}):")
    print(
        keys.mint(
            tenant,
            issuer=a.issuer,
            audience=a.audience,
            ttl_s=ttl or a.dev_token_ttl_s,
            tenant_claim=a.tenant_claim,
            roles=tuple(role or ("admin",)),
        )
    )


@tenants_app.command("add")
def tenants_add(
    tenant_id: Annotated[str, typer.Argument(help="e.g. tnt_initech_eu")],
    name: Annotated[str, typer.Option(help="Display name.")],
    region: Annotated[str, typer.Option(help="Home region: eu or us.")] = "eu",
    data_class: Annotated[
        str, typer.Option(help="public|standard|confidential|restricted")
    ] = "standard",
    kb: Annotated[
        list[str] | None, typer.Option(help="Knowledge-base namespace (repeatable).")
    ] = None,
    data_dir: DataDirOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Register a tenant."""
    from ragplane.control.tenants import add_tenant

    if region not in ("eu", "us"):
        raise typer.BadParameter("region must be 'eu' or 'us'", param_hint="--region")
    if data_class not in DATA_CLASSES:
        raise typer.BadParameter(
            f"data class must be one of: {', '.join(DATA_CLASSES)}", param_hint="--data-class"
        )
    home: Region = "eu" if region == "eu" else "us"
    settings = _settings(config, data_dir=data_dir)
    t = _control(
        settings,
        lambda s: add_tenant(
            s,
            tenant_id,
            name=name,
            home_region=home,
            data_class=data_class,
            kb_namespaces=tuple(kb or ("default",)),
        ),
        as_owner=True,
    )
    out.print(f"added tenant [bold]{t.id}[/] ({t.name}, home region {t.home_region})")


def _tenant_table(rows: list[Any]) -> Table:
    table = Table(
        "id", "name", "region", "data class", "embedding model", "kb namespaces", "status"
    )
    for t in rows:
        table.add_row(
            t.id,
            t.name,
            t.home_region,
            t.data_class,
            t.embedding_model,
            ", ".join(t.kb_namespaces),
            t.status,
        )
    return table


@tenants_app.command("list")
def tenants_list(data_dir: DataDirOpt = None, config: ConfigOpt = None) -> None:
    """List registered tenants."""
    from ragplane.control.tenants import list_tenants

    settings = _settings(config, data_dir=data_dir)
    out.print(_tenant_table(_control(settings, list_tenants)))


@tenants_app.command("show")
def tenants_show(tenant_id: str, data_dir: DataDirOpt = None, config: ConfigOpt = None) -> None:
    """Show one tenant."""
    from ragplane.control.tenants import get_tenant

    settings = _settings(config, data_dir=data_dir)
    out.print(_tenant_table([_control(settings, lambda s: get_tenant(s, tenant_id))]))


@keys_app.command("create")
def keys_create(
    tenant: Annotated[str, typer.Option("--tenant", "-t")],
    name: Annotated[str, typer.Option(help="A label for the key.")] = "",
    scope: Annotated[list[str] | None, typer.Option(help="Scope (repeatable).")] = None,
    data_dir: DataDirOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Create an API key for a tenant; the key is printed once, on the last line."""
    from ragplane.control.apikeys import ApiKey, create_api_key
    from ragplane.control.tenants import get_tenant

    settings = _settings(config, data_dir=data_dir)

    async def create(s: Session) -> tuple[ApiKey, str]:
        await get_tenant(s, tenant)  # TenantNotFound names the tenant
        return await create_api_key(s, tenant, name=name, scopes=tuple(scope or ()))

    key, plaintext = _control(settings, create, as_owner=True)
    err.print(f"created key {key.id} for {key.tenant_id}; store it now, it is not shown again:")
    print(plaintext)


@keys_app.command("list")
def keys_list(
    tenant: Annotated[str, typer.Option("--tenant", "-t")],
    data_dir: DataDirOpt = None,
    config: ConfigOpt = None,
) -> None:
    """List a tenant's API keys (ids only; secrets are never stored)."""
    from ragplane.control.apikeys import list_api_keys

    settings = _settings(config, data_dir=data_dir)
    table = Table("id", "name", "scopes", "created", "revoked")
    for k in _control(settings, lambda s: list_api_keys(s, tenant)):
        table.add_row(
            k.id,
            k.name,
            " ".join(k.scopes),
            f"{k.created_at:%Y-%m-%d %H:%M}",
            f"{k.revoked_at:%Y-%m-%d %H:%M}" if k.revoked_at else "",
        )
    out.print(table)


@keys_app.command("revoke")
def keys_revoke(key_id: str, data_dir: DataDirOpt = None, config: ConfigOpt = None) -> None:
    """Revoke an API key by id."""
    from ragplane.control.apikeys import revoke_api_key

    settings = _settings(config, data_dir=data_dir)
    if not _control(settings, lambda s: revoke_api_key(s, key_id), as_owner=True):
        raise RagplaneError(f"no active API key with id {key_id!r}")
    out.print(f"revoked {key_id}")


@kb_app.command("create")
def kb_create(
    namespace: Annotated[str, typer.Argument(help="Namespace name, e.g. support-docs.")],
    tenant: Annotated[str, typer.Option("--tenant", "-t", help="Owning tenant.")],
    max_tokens: Annotated[
        int, typer.Option(min=16, max=8192, help="Chunk size in embedding-model tokens.")
    ] = 256,
    overlap: Annotated[int, typer.Option(min=0, help="Overlap between chunks, in tokens.")] = 32,
    data_dir: DataDirOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Create a knowledge-base namespace for a tenant (pinned to the tenant's embedding model)."""
    from ragplane.control.namespaces import NamespaceNotFound, get_namespace, upsert_namespace
    from ragplane.control.tenants import get_tenant
    from ragplane.knowledge.types import ChunkingPolicy

    try:
        policy = ChunkingPolicy(max_tokens, overlap)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--overlap") from None
    settings = _settings(config, data_dir=data_dir)

    async def create(s: Session) -> Any:
        t = await get_tenant(s, tenant)  # TenantNotFound names the tenant
        try:
            await get_namespace(s, tenant, namespace)
        except NamespaceNotFound:
            pass
        else:
            raise RagplaneError(f"tenant {tenant!r} already has a knowledge base {namespace!r}")
        return await upsert_namespace(
            s, tenant, namespace, embedding_model=t.embedding_model, chunking=policy
        )

    ns = _control(settings, create, as_owner=True)
    out.print(
        f"created knowledge base [bold]{ns.name}[/] for {ns.tenant_id} "
        f"(model {ns.embedding_model}, chunks of {ns.chunking.max_tokens} tokens, "
        f"overlap {ns.chunking.overlap_tokens})",
        highlight=False,
    )


@kb_app.command("switch-model")
def kb_switch_model(
    tenant: Annotated[str, typer.Option("--tenant", "-t", help="Tenant that owns the kb.")],
    model: Annotated[str, typer.Option("--model", "-m", help="The embedding model to use.")],
    kb: Annotated[str, typer.Option("--kb", help="Knowledge-base namespace.")] = "default",
    wait: Annotated[
        bool, typer.Option("--wait/--no-wait", help="Show the job's progress until it ends.")
    ] = False,
    data_dir: DataDirOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Re-embed a knowledge base with another embedding model, in the background.

    Queues a job for a worker (ragplane worker, or ragplane up): every document is
    embedded with the new model beside the old one, then the namespace swaps to it at
    once; queries keep working throughout. Prints the job id (see ragplane kb status).

    Exit status: 0 when queued (with --wait: when the switch succeeded), 1 when the
    switch failed, 2 when it was refused or on a usage or configuration error.
    """
    from ragplane.knowledge.jobs import IngestJob

    settings = _settings(config, data_dir=data_dir)
    with _owner_and_app(settings) as (_, app_url):
        job: IngestJob = _run(_switch_model(settings, app_url, tenant, kb, model, wait=wait))
    out.print(job.id)
    if job.status == "failed":
        for e in job.errors:
            err.print(f"[bold red]{e.code}:[/] {e.message}", highlight=False, soft_wrap=True)
        raise typer.Exit(1)


@kb_app.command("status")
def kb_status(
    tenant: Annotated[str, typer.Option("--tenant", "-t", help="Tenant that owns the kb.")],
    kb: Annotated[str, typer.Option("--kb", help="Knowledge-base namespace.")] = "default",
    data_dir: DataDirOpt = None,
    config: ConfigOpt = None,
) -> None:
    """A knowledge base's embedding model, version, and its latest model switch."""
    settings = _settings(config, data_dir=data_dir)
    with _owner_and_app(settings) as (_, app_url):
        ns, state, job = _run(_kb_status(app_url, tenant, kb))
    table = Table("kb", "pinned model", "active model", "kb_version", "switching to")
    table.add_row(
        ns.name,
        ns.embedding_model,
        state.active_model if state else ns.embedding_model,
        str(state.kb_version if state else 0),
        (state.switching_to if state else None) or "-",
    )
    out.print(table)
    if job is not None:
        out.print(f"latest switch: {_job_line(job)}", highlight=False, soft_wrap=True)


async def _cli_namespace(db: Any, tenant: str, kb: str) -> Any:
    from ragplane.control.namespaces import NamespaceNotFound, get_namespace
    from ragplane.data import validate_tenant_id

    validate_tenant_id(tenant)
    try:
        async with db.control() as s:
            return await get_namespace(s, tenant, kb)
    except NamespaceNotFound:
        raise RagplaneError(
            f"tenant {tenant!r} has no knowledge base {kb!r}; create it first: "
            f"ragplane kb create {kb} --tenant {tenant}"
        ) from None


def _job_line(job: Any) -> str:
    return (
        f"job {job.id} {job.source_model} -> {job.target_model}: {job.status}, phase "
        f"{job.phase}, {job.documents_done:,}/{job.documents_total:,} documents, "
        f"{job.chunks_written:,} chunks"
    )


async def _switch_model(
    settings: Settings, app_url: str, tenant: str, kb: str, model: str, *, wait: bool
) -> Any:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from ragplane.data import Database
    from ragplane.data.queue import create_queue
    from ragplane.knowledge.jobs import IngestQueue, get_job
    from ragplane.knowledge.models import EmbedderRegistry
    from ragplane.knowledge.switch import SwitchRefused, request_switch

    async with Database(app_url, max_size=2, name="app") as db:
        ns = await _cli_namespace(db, tenant, kb)
        queue = IngestQueue(
            create_queue(app_url),
            max_attempts=settings.worker.max_attempts,
            retry_wait_s=settings.worker.retry_wait_s,
        )
        try:
            job = await request_switch(queue, db, ns, model, EmbedderRegistry.local())
        except SwitchRefused as exc:
            raise RagplaneError(str(exc)) from None
        err.print(
            f"queued: {kb} switches from {job.source_model} to {job.target_model} "
            f"({job.documents_total:,} documents) as job {job.id}",
            highlight=False,
            soft_wrap=True,
        )
        if not wait:
            return job
        with Progress(
            TextColumn("[bold]switch[/]"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("documents  {task.fields[stats]}"),
            console=err,
        ) as bar:
            task = bar.add_task("switch", total=job.documents_total or None, stats="")
            while not job.finished:
                await asyncio.sleep(0.5)
                job = await get_job(db, tenant, job.id) or job
                bar.update(
                    task,
                    completed=job.documents_done,
                    total=max(job.documents_total, job.documents_done) or None,
                    stats=f"{job.chunks_written:,} chunks  {job.phase} ({job.status})",
                )
        err.print(_job_line(job), highlight=False, soft_wrap=True)
        return job


async def _kb_status(app_url: str, tenant: str, kb: str) -> tuple[Any, Any, Any]:
    from ragplane.data import Database
    from ragplane.knowledge.jobs import get_job
    from ragplane.knowledge.switch import namespace_state

    async with Database(app_url, max_size=1, name="app") as db:
        ns = await _cli_namespace(db, tenant, kb)
        state = await namespace_state(db, tenant, kb)
        async with db.tenant(tenant) as s:
            row = await s.fetch_one(
                "SELECT id::text AS id FROM ingest_jobs WHERE namespace = %s "
                "AND kind = 'switch_model' ORDER BY created_at DESC LIMIT 1",
                (kb,),
            )
        job = await get_job(db, tenant, row["id"]) if row else None
        return ns, state, job


@app.command()
def ingest(
    path: Annotated[Path, typer.Argument(help="A file, or a folder (walked recursively).")],
    tenant: Annotated[str, typer.Option("--tenant", "-t", help="Tenant that owns the kb.")],
    kb: Annotated[str, typer.Option("--kb", help="Knowledge-base namespace.")] = "default",
    prune: Annotated[
        bool,
        typer.Option(help="Delete the kb's documents under PATH whose files are gone."),
    ] = False,
    data_dir: DataDirOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Ingest files into a knowledge base, in this process, with a progress bar.

    Files are parsed and embedded here (no worker needed); unchanged files cost
    nothing. A file that cannot be ingested does not stop the others: the errors are
    listed at the end.

    Exit status: 0 when every document was ingested, 1 when some documents failed
    (see the error table), 2 on a usage or configuration error.
    """
    from ragplane.knowledge.folder import collect_files
    from ragplane.observe.logging import configure_logging

    settings = _settings(config, data_dir=data_dir)
    # the progress bar and the tables are the output; logs only for what goes wrong
    configure_logging("warning", settings.log_format)
    try:
        files, skipped = collect_files(path)
    except FileNotFoundError as exc:
        raise typer.BadParameter(str(exc), param_hint="PATH") from None
    if not files:
        raise RagplaneError(
            f"no files to ingest under {path} ({skipped} skipped: unsupported extension)"
        )
    from ragplane.knowledge.folder import prune_prefix

    prefix = prune_prefix(path) if prune else None
    with _owner_and_app(settings) as (_, app_url):
        result = _run(_ingest(settings, app_url, tenant, kb, files, prefix))
    _print_ingest_result(result, skipped)
    if result.failed:
        raise typer.Exit(1)


async def _ingest(
    settings: Settings, app_url: str, tenant: str, kb: str, files: list[Path], prune: str | None
) -> Any:
    import anyio.to_thread
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from ragplane.control.namespaces import NamespaceNotFound, get_namespace
    from ragplane.data import Database, validate_tenant_id
    from ragplane.knowledge.embedder import LocalEmbedder
    from ragplane.knowledge.folder import FolderProgress, ingest_files
    from ragplane.knowledge.ingest import Ingestor
    from ragplane.knowledge.models import EmbedderRegistry

    validate_tenant_id(tenant)
    db = Database(app_url, max_size=2, name="app")
    async with db:
        try:
            async with db.control() as s:
                ns = await get_namespace(s, tenant, kb)
        except NamespaceNotFound:
            raise RagplaneError(
                f"tenant {tenant!r} has no knowledge base {kb!r}; create it first: "
                f"ragplane kb create {kb} --tenant {tenant}"
            ) from None
        embedder = LocalEmbedder()
        await anyio.to_thread.run_sync(embedder.load)
        # every local model: the namespace is embedded with the one it is pinned to
        embedders = EmbedderRegistry.local(embedder)
        ingestor = Ingestor(db, embedders, batch_documents=settings.worker.batch_documents)
        with Progress(
            TextColumn("[bold]ingest[/]"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("files"),
            TextColumn("{task.fields[stats]}"),
            console=err,
            transient=False,
        ) as bar:
            task = bar.add_task("ingest", total=None, stats="")

            def show(p: FolderProgress) -> None:
                bar.update(
                    task,
                    completed=p.files_done,
                    total=p.files_total,
                    stats=f"{p.documents:,} documents  {p.chunks_written:,} chunks  "
                    f"{p.tokens_per_s:,.0f} tokens/s",
                )

            return await ingest_files(
                ingestor,
                ns,
                files,
                prune=prune,
                max_bytes=settings.knowledge.max_upload_bytes,
                on_progress=show,
            )


def _print_ingest_result(result: Any, skipped: int) -> None:
    r = result.ingest
    rate = r.tokens_embedded / r.elapsed_s if r.elapsed_s > 0 else 0.0
    out.print(
        f"{result.files} files: {r.added} documents added, {r.updated} updated, "
        f"{r.unchanged} unchanged, {r.deleted} deleted, {len(result.errors)} failed; "
        f"{r.chunks_written:,} chunks, {r.tokens_embedded:,} tokens embedded "
        f"({rate:,.0f} tokens/s) in {r.elapsed_s:.1f}s",
        highlight=False,
        soft_wrap=True,
    )
    if skipped:
        out.print(f"skipped {skipped} files with an unsupported extension", highlight=False)
    if result.prune_skipped:
        out.print(
            "[yellow]not pruned:[/] some files failed, and their documents would have been "
            "taken for deleted",
            highlight=False,
        )
    if result.errors:
        table = Table("document", "error", "message", title="documents that were not ingested")
        for e in result.errors:
            table.add_row(e.source_uri, e.code, e.message)
        out.print(table)


@db_app.command("migrate")
def db_migrate(data_dir: DataDirOpt = None, config: ConfigOpt = None) -> None:
    """Apply pending migrations as the owner role."""
    from ragplane.data import migrate

    settings = _settings(config, data_dir=data_dir)
    with _owner_and_app(settings) as (owner, _):
        applied = migrate.migrate(_need_owner(owner))
    if applied:
        for m in applied:
            out.print(f"applied {m.version:04d}_{m.name}")
    else:
        out.print("database is up to date")


@db_app.command("status")
def db_status(data_dir: DataDirOpt = None, config: ConfigOpt = None) -> None:
    """Show applied and pending migrations."""
    from ragplane.data import migrate

    settings = _settings(config, data_dir=data_dir)
    with _owner_and_app(settings) as (_, app_url):
        st = migrate.status(app_url)
    table = Table("version", "name", "state", "applied at")
    for a in st.applied:
        table.add_row(f"{a.version:04d}", a.name, "applied", f"{a.applied_at:%Y-%m-%d %H:%M:%S}")
    for m in st.pending:
        table.add_row(f"{m.version:04d}", m.name, "[yellow]pending[/]", "")
    out.print(table)
    out.print(f"schema version {st.current} of {st.latest}")


@contextmanager
def _throwaway_database(keep: Path | None = None) -> Iterator[DatabaseUrls]:
    """A fresh embedded Postgres in a temporary directory (benchmarks), removed after;
    with ``keep``, the embedded Postgres in that directory (created if missing), kept."""
    import tempfile

    from ragplane.data import EmbeddedPostgres

    with tempfile.TemporaryDirectory(prefix="ragplane-bench-") as tmp:
        embedded = EmbeddedPostgres(keep or Path(tmp))
        try:
            yield embedded.start()
        finally:
            embedded.stop()


@bench_app.command("tenancy")
def bench_tenancy(
    tenants: Annotated[int, typer.Option(min=1, help="Number of tenants.")] = 50,
    rows: Annotated[int, typer.Option(min=1, help="Documents per tenant.")] = 2000,
    iterations: Annotated[int, typer.Option(min=100, help="Timed queries per side.")] = 2000,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """The cost of RLS isolation: tenant unit of work vs. a plain filtered query.

    Runs on a throwaway embedded database in a temporary directory.
    """
    import json

    from ragplane.evals.bench_tenancy import run_tenancy_bench

    with _throwaway_database() as urls:
        result = _run(
            run_tenancy_bench(
                urls,
                tenants=tenants,
                rows_per_tenant=rows,
                iterations=iterations,
                progress=lambda msg: err.print(f"[dim]{msg}…[/]"),
            )
        )
    if as_json:
        print(json.dumps(result.as_json(), indent=2))
        return
    table = Table(
        "query",
        "baseline p50 ms",
        "baseline p95 ms",
        "RLS p50 ms",
        "RLS p95 ms",
        "p50 ratio",
        title=f"RLS unit of work vs. filtered query "
        f"({result.rows:,} rows, {result.tenants} tenants)",
    )
    for name, sides in result.results.items():
        b, r = sides["baseline"], sides["rls"]
        table.add_row(
            name,
            f"{b.p50_ms:.3f}",
            f"{b.p95_ms:.3f}",
            f"{r.p50_ms:.3f}",
            f"{r.p95_ms:.3f}",
            f"{r.p50_ms / b.p50_ms:.2f}x",
        )
    out.print(table)


@bench_app.command("retrieval")
def bench_retrieval(
    dataset: Annotated[Path, typer.Option(help="BEIR-format directory (corpus, queries, qrels).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    sweep: Annotated[bool, typer.Option(help="Also score a grid of fusion settings.")] = False,
    limit: Annotated[int | None, typer.Option(help="Ingest only the first N documents.")] = None,
    db_dir: Annotated[
        Path | None,
        typer.Option(
            help="Keep the database in this directory (created if missing) and reuse it: "
            "a rerun skips the unchanged corpus (its ingest figures are then a re-ingest's).",
        ),
    ] = None,
) -> None:
    """Retrieval quality and latency: BM25, dense, and ragplane hybrid, side by side.

    Ingests the corpus through the real ingestion path into a throwaway embedded
    database in a temporary directory (or the kept one of ``--db-dir``).
    """
    import json

    from ragplane.evals.bench_retrieval import default_sweep, load_beir, run_retrieval_bench

    data = load_beir(dataset)
    with _throwaway_database(db_dir) as urls:
        result = _run(
            run_retrieval_bench(
                urls,
                data,
                sweep=default_sweep() if sweep else (),
                limit_documents=limit,
                progress=lambda msg: err.print(f"[dim]{msg}[/]"),
            )
        )
    if as_json:
        print(json.dumps(result.as_json(), indent=2))
        return
    table = Table(
        "retriever",
        "nDCG@10",
        "recall@10",
        "recall@100",
        "p50 ms",
        "p95 ms",
        "p50 ms (+embed)",
        "p95 ms (+embed)",
        title=f"{dataset.name}: {result.documents:,} documents, {result.chunks:,} chunks, "
        f"{result.queries} queries",
    )
    for name, r in result.retrievers.items():
        table.add_row(
            name,
            f"{r.ndcg_10:.3f}",
            f"{r.recall_10:.3f}",
            f"{r.recall_100:.3f}",
            f"{r.p50_ms:.2f}",
            f"{r.p95_ms:.2f}",
            "" if r.p50_with_embed_ms is None else f"{r.p50_with_embed_ms:.2f}",
            "" if r.p95_with_embed_ms is None else f"{r.p95_with_embed_ms:.2f}",
        )
    out.print(table)
    ingest = result.as_json()["ingest"]
    ratio = ingest["ratio_to_raw_embedder"]
    out.print(
        f"ingest: {ingest['docs_per_s']} documents/s, {ingest['tokens_per_s']:,} tokens/s "
        f"({'n/a' if ratio is None else format(ratio, '.0%')} of the raw embedder's "
        f"{ingest['raw_embedder_tokens_per_s']:,} tokens/s); re-ingest: "
        f"{ingest['reingest_new_chunks']} new chunks, "
        f"{ingest['reingest_embedding_calls']} embedding calls"
    )
    out.print(f"fusion: {result.fusion}")
    for fusion, ndcg in result.sweep:
        out.print(f"  sweep {fusion} -> nDCG@10 {ndcg:.4f}")


@bench_app.command("scale")
def bench_scale(
    chunks: Annotated[int, typer.Option(min=100, help="Chunk rows in all.")] = 1_000_000,
    tenants: Annotated[int, typer.Option(min=1, help="Tenants (skewed sizes).")] = 100,
    queries: Annotated[int, typer.Option(min=1, help="Queries per measured tenant.")] = 200,
    maintenance_work_mem: Annotated[str, typer.Option(help="For the index build.")] = "4GB",
    workers: Annotated[int, typer.Option(min=0, help="Parallel index-build workers.")] = 1,
    sweep: Annotated[bool, typer.Option(help="Also try other HNSW scan settings.")] = False,
    visit_cost: Annotated[
        float | None,
        typer.Option(min=0, help="The Retriever's hnsw_visit_cost (default: as shipped)."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Filtered ANN at scale: recall@10 against exact search, latency, build time, memory.

    Synthetic vectors, bulk-loaded into a throwaway embedded database in a
    temporary directory (about 4 GB at a million chunks); not part of CI.
    """
    import json

    from ragplane.evals.bench_scale import run_scale_bench
    from ragplane.knowledge.search import HNSW_VISIT_COST

    with _throwaway_database() as urls:
        result = _run(
            run_scale_bench(
                urls,
                chunks=chunks,
                tenants=tenants,
                queries=queries,
                maintenance_work_mem=maintenance_work_mem,
                parallel_workers=workers,
                sweep=sweep,
                hnsw_visit_cost=HNSW_VISIT_COST if visit_cost is None else visit_cost,
                progress=lambda msg: err.print(f"[dim]{msg}[/]"),
            )
        )
    report = result.as_json()
    if as_json:
        print(json.dumps(report, indent=2))
        return
    table = Table(
        "tenant",
        "chunks",
        "share",
        "recall@10",
        "min",
        "p50 ms",
        "p95 ms",
        "exact p50 ms",
        "HNSW plan",
        "searched",
        "planner p50 / p95 ms",
        "HNSW forced p50 / p95 ms",
        title=f"{chunks:,} chunks, {tenants} tenants, {queries} queries per tenant",
    )
    for label, t in report["tenants_measured"].items():
        table.add_row(
            label,
            f"{t['rows']:,}",
            f"{t['share_pct']:.3f}%",
            f"{t['recall@10']:.4f}",
            f"{t['min_recall@10']:.2f}",
            f"{t['p50_ms']:.2f}",
            f"{t['p95_ms']:.2f}",
            f"{t['exact_p50_ms']:.2f}",
            "yes" if t["plan_uses_hnsw"] else "no",
            t["searched"],
            f"{t['planner']['p50_ms']:.2f} / {t['planner']['p95_ms']:.2f}",
            f"{t['hnsw_forced']['p50_ms']:.2f} / {t['hnsw_forced']['p95_ms']:.2f}",
        )
        for name, swept in t["sweep"].items():
            table.add_row(
                f"  {name}",
                "",
                "",
                f"{swept['recall@10']:.4f}",
                f"{swept['min_recall@10']:.2f}",
                f"{swept['p50_ms']:.2f}",
                f"{swept['p95_ms']:.2f}",
            )
    out.print(table)
    out.print(
        f"load {report['load_s']} s; index build {report['index_build_s']} s "
        f"({report['index_build']}); sizes MB {report['sizes_mb']}"
    )
    out.print(f"memory: {report['memory']}")


@bench_app.command("gateway")
def bench_gateway(
    concurrency: Annotated[
        list[int] | None, typer.Option("--concurrency", "-c", min=1, help="Repeatable.")
    ] = None,
    duration: Annotated[int, typer.Option(min=1, help="Seconds per measured run.")] = 10,
    warmup: Annotated[int, typer.Option(min=0, help="Warm-up seconds per target (0: none).")] = 5,
    requests: Annotated[
        int, typer.Option(min=0, help="Soak requests after warm-up (RSS growth).")
    ] = 100_000,
    ttft_duration: Annotated[float, typer.Option(min=0.1, help="Seconds of streams.")] = 5.0,
    target: Annotated[
        list[str] | None,
        typer.Option("--target", "-t", help="floor, ragplane, litellm (repeatable; default all)."),
    ] = None,
    skip_litellm: Annotated[bool, typer.Option(help="Do not run LiteLLM.")] = False,
    litellm: Annotated[
        Path | None,
        typer.Option(help="The litellm executable (default: scripts/litellm-venv.sh's venv)."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """The gateway's overhead next to direct, an aiohttp floor and LiteLLM, side by side.

    Every target is its own process on loopback, in front of one mock provider with a
    50 ms latency; load from wrk. Needs wrk (apt-get install wrk) and, for LiteLLM,
    its venv (scripts/litellm-venv.sh). Runs ragplane on a throwaway embedded database.
    """
    import json
    import tempfile

    from ragplane.evals.bench_gateway import TARGETS, GatewayBenchOptions, run_gateway_bench

    targets = tuple(target or TARGETS)
    unknown = set(targets) - set(TARGETS)
    if unknown:
        raise typer.BadParameter(f"unknown target(s): {', '.join(sorted(unknown))}")
    exe = litellm or Path.home() / ".cache/ragplane/litellm-venv/bin/litellm"
    reason = ""
    if skip_litellm or "litellm" not in targets:
        reason = "--skip-litellm" if skip_litellm else "not requested"
    elif not exe.exists():
        reason = f"{exe} not found: run scripts/litellm-venv.sh"
    with tempfile.TemporaryDirectory(prefix="ragplane-bench-gw-") as tmp:
        opts = GatewayBenchOptions(
            work_dir=Path(tmp),
            concurrencies=tuple(concurrency or (1, 16, 64)),
            duration_s=duration,
            warmup_s=warmup,
            requests=requests,
            ttft_s=ttft_duration,
            targets=targets,
            litellm=None if reason else exe,
            litellm_skip_reason=reason or "not requested",
        )
        progress = lambda msg: err.print(f"[dim]{msg}[/]", highlight=False)  # noqa: E731
        if "ragplane" in targets:
            with _throwaway_database() as urls:
                report = run_gateway_bench(urls, opts, progress)
        else:
            report = run_gateway_bench(None, opts, progress)
    if as_json:
        print(json.dumps(report, indent=2))
        return
    _print_gateway_report(report)


def _print_gateway_report(report: dict[str, Any]) -> None:
    setup = report["setup"]
    table = Table(
        "target",
        "c",
        "req/s",
        "added p50 ms",
        "added p99 ms",
        "CPU ms/req",
        "added TTFT p99 ms",
        "RSS MB",
        "RSS growth %",
        "errors",
        title=f"gateway overhead over a {setup['upstream']} ({setup['cores']} cores, "
        f"load {setup['load_average_before'][0]})",
    )
    for name in ("direct", "floor", "ragplane", "litellm"):
        entry = report.get(name)
        if entry is None:
            continue
        if entry.get("skipped"):
            table.add_row(name, "", f"skipped: {entry['reason']}")
            continue
        for c, f in entry["concurrency"].items():
            ttft = f["added_ttft_p99_ms"]
            table.add_row(
                name,
                c,
                f"{f['rps']:,.0f}",
                f"{f['added_p50_ms']:.2f}",
                f"{f['added_p99_ms']:.2f}",
                f"{f['cpu_ms_per_req']:.3f}",
                "n/a" if ttft is None else f"{ttft:.2f}",
                f"{f['rss_mb']:.0f}",
                f"{f['rss_growth_pct']:.1f}",
                str(f["errors"] + f["ttft_errors"]),
            )
    out.print(table)
    for t in report["targets"]:
        verdict = {True: "[green]met[/]", False: "[red]not met[/]", None: "n/a"}[t["met"]]
        out.print(f"{t['goal']}: {verdict} ({t['measured']})", highlight=False)


@app.command("mock-provider")
def mock_provider(
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on (0: a free one).")] = 9100,
    latency_ms: Annotated[float, typer.Option(min=0, help="Delay before headers.")] = 0.0,
    ttft_ms: Annotated[float, typer.Option(min=0, help="Headers to first token.")] = 0.0,
    tokens_per_s: Annotated[float, typer.Option(min=0, help="Stream pace; 0: unpaced.")] = 0.0,
    output_tokens: Annotated[int, typer.Option(min=1, help="Answer length.")] = 16,
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
        cached_tokens=cached_tokens,
        faults=tuple(FaultRule(f, rate=fault_rate, count=fault_count) for f in fault or ()),
        seed=seed,
    )

    def announce(mock: MockProvider) -> None:
        err.print(f"mock provider listening on {mock.url}", highlight=False, soft_wrap=True)

    serve_mock_provider(config, host=host, port=port, on_ready=announce)


def main() -> None:
    from ragplane.observe.logging import configure_logging

    # logs always go to stderr, so a command's stdout (a token, a key, --json) stays clean;
    # commands that serve reconfigure them from their settings
    configure_logging("warning", "console")
    try:
        app()
    except RagplaneError as exc:
        # soft_wrap: a message piped to a log is not hard-wrapped at 80 columns
        err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)
