"""Administration: tokens, tenants, API keys, knowledge bases, ingestion, migrations."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from ragplane.config import Region, Settings
from ragplane.errors import RagplaneError

if TYPE_CHECKING:
    from ragplane.data import Session

from ragplane.cli._common import (
    DATA_CLASSES,
    ConfigOpt,
    DataDirOpt,
    _control,
    _need_owner,
    _owner_and_app,
    _run,
    _settings,
    app,
    db_app,
    err,
    kb_app,
    keys_app,
    out,
    tenants_app,
)

__all__ = []


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
