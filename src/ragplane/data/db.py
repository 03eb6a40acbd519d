"""Pooled async access to Postgres, and the one way into tenant data.

A :class:`Database` wraps one ``psycopg_pool.AsyncConnectionPool`` for one role.
Services hold the application role's database; admin commands hold the
owner's. Tenant rows are reached only through :meth:`Database.tenant` (or
:meth:`Database.tenant_fetch`, the same for one read, in one round trip), a unit
of work that opens a transaction and calls
``set_config('app.tenant_id', <tenant>, true)`` before anything else, so
row-level security in the database decides what is visible. The setting is
transaction-local: it is gone when the unit of work ends, and every pooled
connection is reset before reuse.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any, LiteralString

import psycopg
import psycopg_pool
from pgvector.psycopg import register_vector_async
from psycopg import sql
from psycopg.rows import DictRow, dict_row

from ragplane.errors import DatabaseUnavailable, TenantScopeError

__all__ = ["TENANT_ID_PATTERN", "Database", "Session", "TenantSession", "validate_tenant_id"]

TENANT_ID_PATTERN = re.compile(r"^[a-z][a-z0-9_]{2,62}$")

Params = Sequence[Any] | dict[str, Any]
Query = LiteralString | sql.SQL | sql.Composed

_BEGIN = sql.SQL("BEGIN")
_COMMIT = sql.SQL("COMMIT")
_IDLE = psycopg.pq.TransactionStatus.IDLE
# BEGIN and the transaction-local tenant setting in one round trip
_BEGIN_TENANT = sql.SQL("BEGIN; SELECT set_config('app.tenant_id', {}, true)")
_SET_LOCAL = sql.SQL("; SELECT set_config({}, {}, true)")
_SETTING_NAME = re.compile(r"^[a-z_][a-z0-9_]*(\.[a-z_][a-z0-9_]*)?$")


def validate_tenant_id(tenant_id: object) -> str:
    """Return ``tenant_id`` if it is a well-formed tenant id, else raise TenantScopeError."""
    if not isinstance(tenant_id, str) or not TENANT_ID_PATTERN.fullmatch(tenant_id):
        raise TenantScopeError(
            f"not a valid tenant id: {tenant_id!r} (expected lowercase letters, digits and '_', "
            "3-63 characters, starting with a letter)"
        )
    return tenant_id


class Session:
    """One transaction on one pooled connection."""

    def __init__(self, conn: psycopg.AsyncConnection[DictRow]) -> None:
        self._conn = conn

    @property
    def connection(self) -> psycopg.AsyncConnection[DictRow]:
        return self._conn

    async def fetch_all(self, query: Query, params: Params | None = None) -> list[DictRow]:
        cur = await self._conn.execute(query, params)
        return await cur.fetchall()

    async def fetch_one(self, query: Query, params: Params | None = None) -> DictRow | None:
        cur = await self._conn.execute(query, params)
        return await cur.fetchone()

    async def execute(self, query: Query, params: Params | None = None) -> int:
        """Run a statement; return the number of rows it touched."""
        cur = await self._conn.execute(query, params)
        return cur.rowcount


class TenantSession(Session):
    """A transaction bound to one tenant by ``app.tenant_id``; RLS does the rest."""

    def __init__(self, conn: psycopg.AsyncConnection[DictRow], tenant_id: str) -> None:
        super().__init__(conn)
        self.tenant_id = tenant_id


async def _configure(conn: psycopg.AsyncConnection[Any]) -> None:
    # pgvector's adapters: numpy arrays go to and come from `vector` columns in binary
    await register_vector_async(conn)


async def _reset(conn: psycopg.AsyncConnection[Any]) -> None:
    # A connection goes back to the pool with no session state, whatever the
    # code that held it did (a session-level set_config included).
    await conn.execute("RESET ALL")


class Database:
    """A pool of connections for one database role."""

    def __init__(
        self,
        url: str,
        *,
        min_size: int = 1,
        max_size: int = 10,
        timeout_s: float = 5.0,
        name: str = "app",
    ) -> None:
        self.name = name
        self._url = url
        self._timeout_s = timeout_s
        self._pool: psycopg_pool.AsyncConnectionPool[psycopg.AsyncConnection[DictRow]] = (
            psycopg_pool.AsyncConnectionPool(
                url,
                min_size=min_size,
                max_size=max_size,
                timeout=timeout_s,
                open=False,
                configure=_configure,
                reset=_reset,
                kwargs={
                    "row_factory": dict_row,
                    "autocommit": True,  # units of work send BEGIN/COMMIT themselves
                    "connect_timeout": max(1, int(timeout_s)),
                    "application_name": f"ragplane-{name}",
                },
                name=f"ragplane-{name}",
            )
        )

    async def open(self) -> None:
        try:
            await self._pool.open(wait=True, timeout=self._timeout_s)
        except psycopg_pool.PoolTimeout as exc:
            await self._pool.close()
            raise DatabaseUnavailable(
                f"could not connect to the {self.name} database within {self._timeout_s:g}s"
            ) from exc

    async def close(self) -> None:
        await self._pool.close()

    async def listen(
        self, channel: LiteralString, *, ready: Callable[[], None] | None = None
    ) -> AsyncGenerator[str, None]:
        """The payloads of ``NOTIFY channel``, on a connection of its own (not the pool's);
        ``ready`` is called once ``LISTEN`` is in effect. Raises
        :class:`DatabaseUnavailable` when the connection cannot be made or fails.

        The wait is on the socket itself: psycopg's ``notifies()`` wakes ten times a
        second to check for interrupts, which on an idle gateway cost more CPU than its
        requests (docs/benchmarks.md, "Session 5")."""
        try:
            async with await psycopg.AsyncConnection.connect(
                self._url,
                autocommit=True,
                connect_timeout=max(1, int(self._timeout_s)),
                application_name=f"ragplane-{self.name}-listen",
            ) as conn:
                await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
                if ready is not None:
                    ready()
                loop = asyncio.get_running_loop()
                while True:
                    async for notice in conn.notifies(timeout=0):  # what has arrived
                        yield notice.payload
                    readable = loop.create_future()
                    loop.add_reader(conn.fileno(), _settle, readable)
                    try:
                        await readable  # data, or the connection's end
                    finally:
                        loop.remove_reader(conn.fileno())
        except psycopg.Error as exc:
            raise DatabaseUnavailable(f"{self.name} database: listening stopped: {exc}") from exc

    async def __aenter__(self) -> Database:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @asynccontextmanager
    async def _transaction(
        self, begin: sql.SQL | sql.Composed = _BEGIN
    ) -> AsyncIterator[psycopg.AsyncConnection[DictRow]]:
        """``begin`` … COMMIT on a pooled connection; ROLLBACK if the block raises.

        ``begin`` goes out as one simple query, so a unit of work can open with more
        than BEGIN (the tenant setting) in the same round trip.
        """
        try:
            async with self._pool.connection() as conn:
                await conn.execute(begin)
                try:
                    yield conn
                except BaseException:
                    if not conn.closed:
                        with contextlib.suppress(psycopg.Error):
                            await conn.rollback()
                    raise
                await conn.commit()
        except (psycopg.OperationalError, psycopg_pool.PoolTimeout) as exc:
            raise DatabaseUnavailable(f"{self.name} database unavailable: {exc}") from exc

    @asynccontextmanager
    async def tenant(
        self, tenant_id: str, *, settings: Mapping[str, str] | None = None
    ) -> AsyncIterator[TenantSession]:
        """A unit of work on one tenant's rows: a transaction with ``app.tenant_id`` set first.

        ``settings`` are further transaction-local settings (e.g. ``hnsw.ef_search``), sent
        in the same round trip; ``app.*`` names are refused there.
        """
        validate_tenant_id(tenant_id)  # also what makes the literal below safe to inline
        begin = _BEGIN_TENANT.format(sql.Literal(tenant_id))
        for name, value in (settings or {}).items():
            if not _SETTING_NAME.fullmatch(name) or name.startswith("app."):
                raise ValueError(f"not a setting a unit of work may change: {name!r}")
            begin += _SET_LOCAL.format(sql.Literal(name), sql.Literal(value))
        async with self._transaction(begin) as conn:
            yield TenantSession(conn, tenant_id)

    async def tenant_fetch(
        self,
        tenant_id: str,
        query: Query,
        params: Params | None = None,
        *,
        settings: Mapping[str, str] | None = None,
    ) -> list[DictRow]:
        """One statement in a tenant unit of work of its own, in one round trip (a read, or a
        write that returns rows, e.g. ``INSERT … RETURNING``: it commits with the unit).

        The same unit of work as :meth:`tenant` (``BEGIN``, ``app.tenant_id`` and
        ``settings`` set transaction-locally, the statement, ``COMMIT``), sent as one
        pipeline: for a query on the hot path each round trip is a wake-up of the client
        and of the server, which a loaded machine makes wait.
        """
        validate_tenant_id(tenant_id)
        names = dict(settings or {})
        for name in names:
            if not _SETTING_NAME.fullmatch(name) or name.startswith("app."):
                raise ValueError(f"not a setting a unit of work may change: {name!r}")
        configure = sql.SQL("SELECT {}").format(
            sql.SQL(", ").join(
                sql.SQL("set_config({}, {}, true)").format(sql.Literal(k), sql.Literal(v))
                for k, v in {"app.tenant_id": tenant_id, **names}.items()
            )
        )
        try:
            async with self._pool.connection() as conn:
                try:
                    async with conn.pipeline():
                        await conn.execute(_BEGIN)
                        await conn.execute(configure)
                        cur = await conn.execute(query, params)
                        await conn.execute(_COMMIT)
                    return await cur.fetchall()
                except BaseException:
                    if not conn.closed and conn.info.transaction_status != _IDLE:
                        with contextlib.suppress(psycopg.Error):
                            await conn.rollback()
                    raise
        except (psycopg.OperationalError, psycopg_pool.PoolTimeout) as exc:
            raise DatabaseUnavailable(f"{self.name} database unavailable: {exc}") from exc

    @asynccontextmanager
    async def control(self) -> AsyncIterator[Session]:
        """A unit of work on control-plane tables (no tenant set: tenant tables show no rows)."""
        async with self._transaction() as conn:
            yield Session(conn)

    async def control_fetch(self, query: Query, params: Params | None = None) -> list[DictRow]:
        """One read-only statement on control-plane tables, in one round trip: alone on
        the pool's autocommit connection it is its own transaction (no BEGIN/COMMIT round
        trips; for read-through caches on the request path, such as the tenant registry)."""
        try:
            async with self._pool.connection() as conn:
                cur = await conn.execute(query, params)
                return await cur.fetchall()
        except (psycopg.OperationalError, psycopg_pool.PoolTimeout) as exc:
            raise DatabaseUnavailable(f"{self.name} database unavailable: {exc}") from exc

    async def ping(self) -> None:
        """Raise DatabaseUnavailable unless a trivial query succeeds."""
        async with self.control() as s:
            await s.fetch_one("SELECT 1")


def _settle(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
