"""What every command shares: the Typer apps, consoles, options and helpers."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from rich.console import Console

from ragplane.config import Settings, load_settings
from ragplane.errors import RagplaneError

if TYPE_CHECKING:
    from ragplane.data import DatabaseUrls, Session

__all__ = [
    "DATA_CLASSES",
    "ConfigOpt",
    "DataDirOpt",
    "T",
    "_control",
    "_need_owner",
    "_owner_and_app",
    "_run",
    "_settings",
    "_throwaway_database",
    "app",
    "bench_app",
    "db_app",
    "err",
    "kb_app",
    "keys_app",
    "out",
    "tenants_app",
]

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
