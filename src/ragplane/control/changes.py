"""Control-plane changes as Postgres pushes them (``LISTEN ragplane_control``).

A trigger (migration 0008) sends the tenant id whenever a tenant's registry row, its
namespaces or its API keys change, and one on feature flags (0009) sends
``flag:<name>``. :class:`ControlChanges` keeps one connection listening and tells its
subscribers which tenant (or flag) to forget — or ``None``, "forget everything",
whenever it (re)connects, since what was sent while it was away is lost.
While it listens, caches may keep their entries much longer (nothing changes
unannounced); while it does not, they fall back to their short TTL.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

from ragplane.data.db import Database
from ragplane.errors import DatabaseUnavailable
from ragplane.observe.logging import get_logger

__all__ = ["CHANNEL", "FLAG_PREFIX", "ControlChanges", "PushedCache", "cache_ttl"]

CHANNEL = "ragplane_control"
FLAG_PREFIX = "flag:"  # tenant ids cannot hold a colon
log = get_logger("ragplane.control")

Forget = Callable[[str | None], None]
K = TypeVar("K")
V = TypeVar("V")


class ControlChanges:
    def __init__(self, db: Database, *, retry_s: float = 1.0) -> None:
        self._db = db
        self._retry_s = retry_s
        self._subscribers: list[Forget] = []
        self._flag_subscribers: list[Forget] = []
        self._listening = False
        self._task: asyncio.Task[None] | None = None
        self._first_try = asyncio.Event()

    @property
    def listening(self) -> bool:
        return self._listening

    def subscribe(self, forget: Forget) -> None:
        """``forget(tenant_id)`` on a change to a tenant, ``forget(None)`` when anything
        may have changed."""
        self._subscribers.append(forget)

    def subscribe_flags(self, forget: Forget) -> None:
        """``forget(flag_name)`` on a change to a feature flag, ``forget(None)`` when any
        may have changed."""
        self._flag_subscribers.append(forget)

    async def start(self) -> None:
        """Listen in the background; returns after the first attempt to connect."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="ragplane-control-changes")
            await self._first_try.wait()

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._listening = False

    def _tell(self, payload: str | None) -> None:
        if payload is not None and payload.startswith(FLAG_PREFIX):
            for forget in self._flag_subscribers:
                forget(payload.removeprefix(FLAG_PREFIX))
            return
        for forget in self._subscribers:
            forget(payload)
        if payload is None:
            for forget in self._flag_subscribers:
                forget(None)

    def _connected(self) -> None:
        self._listening = True
        self._tell(None)  # whatever changed before LISTEN took effect
        self._first_try.set()

    async def _run(self) -> None:
        while True:
            changes = self._db.listen(CHANNEL, ready=self._connected)
            try:
                async for payload in changes:
                    self._tell(payload)
            except DatabaseUnavailable as exc:
                log.warning("control_changes_lost", error=str(exc), retry_s=self._retry_s)
            except Exception:  # a subscriber's bug: keep listening (caches were told None)
                log.exception("control_changes_failed")
            finally:
                self._listening = False
                self._tell(None)
                self._first_try.set()
                await changes.aclose()
            await asyncio.sleep(self._retry_s)


def cache_ttl(changes: ControlChanges | None, ttl_s: float, listening_ttl_s: float) -> float:
    """How long a cached control-plane entry may be trusted now."""
    return listening_ttl_s if changes is not None and changes.listening else ttl_s


class PushedCache(Generic[K, V]):
    """A read-through cache of control-plane rows for the request path (tenants,
    namespaces): an entry lives ``ttl_s``, or ``listening_ttl_s`` while ``changes``
    listens — a change to a tenant is pushed then and forgets that tenant's entries
    (``tenant_of`` says whose an entry is); a look-up under way when it came is not
    cached (it may have read the row before the change)."""

    def __init__(
        self,
        load: Callable[[K], Awaitable[V]],
        tenant_of: Callable[[K], str],
        *,
        ttl_s: float,
        changes: ControlChanges | None,
        listening_ttl_s: float,
    ) -> None:
        self._load = load
        self._tenant_of = tenant_of
        self._ttl_s = ttl_s
        self._changes = changes
        self._listening_ttl_s = listening_ttl_s
        self._cache: dict[K, tuple[float, V]] = {}
        self._generation = 0  # moves on every forget
        if changes is not None:
            changes.subscribe(self.forget)

    def forget(self, tenant_id: str | None) -> None:
        """Drop ``tenant_id``'s entries (``None``: every entry)."""
        self._generation += 1
        if tenant_id is None:
            self._cache.clear()
            return
        for key in [k for k in self._cache if self._tenant_of(k) == tenant_id]:
            del self._cache[key]

    async def get(self, key: K) -> V:
        now = time.monotonic()
        hit = self._cache.get(key)
        if hit is not None and now - hit[0] < cache_ttl(
            self._changes, self._ttl_s, self._listening_ttl_s
        ):
            return hit[1]
        generation = self._generation
        value = await self._load(key)
        if generation == self._generation:
            self._cache[key] = (now, value)
        return value
