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
from collections.abc import Callable

from ragplane.data.db import Database
from ragplane.errors import DatabaseUnavailable
from ragplane.observe.logging import get_logger

__all__ = ["CHANNEL", "FLAG_PREFIX", "ControlChanges", "cache_ttl"]

CHANNEL = "ragplane_control"
FLAG_PREFIX = "flag:"  # tenant ids cannot hold a colon
log = get_logger("ragplane.control")

Forget = Callable[[str | None], None]


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
