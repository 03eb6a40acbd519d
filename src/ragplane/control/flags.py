"""Feature flags: rollout by tenant hash, and the platform's kill switches.

A flag (``control.flags``, migration 0009) is on or off; when on, it applies to
``rollout_percent`` of tenants, chosen by a stable hash of flag name and tenant id (a
tenant keeps its bucket as the percentage grows, and each flag draws its own buckets),
plus the tenants it lists. Every change is audited (``control.flag_audit``, by a
trigger) and pushed (``NOTIFY ragplane_control 'flag:<name>'``).

:class:`FlagStore` keeps every flag in memory: it reads them all in one statement,
forgets them when a change is pushed, and while nothing is pushed (the listener is
down) re-reads them at most ``ttl_s`` after the last read — so a kill switch takes
effect within a second either way. A flag the table does not hold takes its default;
when the database cannot be read, the last flags read stay in force.

Writes go through the owner's session (``ragplane flags set``, the admin API).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from ragplane.control.changes import ControlChanges, cache_ttl
from ragplane.data import Database, Session
from ragplane.errors import BadRequest, DataError, NotFound
from ragplane.observe.logging import get_logger

__all__ = [
    "AI_INFERENCE_ENABLED",
    "DEFAULTS",
    "Flag",
    "FlagStore",
    "list_flags",
    "rollout_bucket",
    "set_flag",
]

AI_INFERENCE_ENABLED = "ai-inference-enabled"
DEFAULTS: Mapping[str, bool] = {AI_INFERENCE_ENABLED: True}
log = get_logger("ragplane.flags")


def rollout_bucket(flag: str, tenant_id: str) -> int:
    """The tenant's bucket, 0-99, for ``flag``: stable across processes and releases."""
    digest = hashlib.sha256(f"{flag}\x00{tenant_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % 100


@dataclass(frozen=True)
class Flag:
    name: str
    enabled: bool
    rollout_percent: int
    tenants: tuple[str, ...]
    description: str
    updated_at: datetime
    updated_by: str

    def on_for(self, tenant_id: str | None) -> bool:
        """Whether the flag is on for ``tenant_id`` (``None``: the platform as a whole,
        on only when fully rolled out)."""
        if not self.enabled:
            return False
        if tenant_id is None:
            return self.rollout_percent >= 100
        return (
            tenant_id in self.tenants or rollout_bucket(self.name, tenant_id) < self.rollout_percent
        )


_SELECT = (
    "SELECT name, enabled, rollout_percent, tenants, description, updated_at, updated_by "
    "FROM control.flags"
)


def _flag(row: Mapping[str, Any]) -> Flag:
    return Flag(**{**row, "tenants": tuple(row["tenants"])})


async def list_flags(session: Session) -> list[Flag]:
    return [_flag(r) for r in await session.fetch_all(_SELECT + " ORDER BY name")]


async def set_flag(
    session: Session,
    name: str,
    *,
    enabled: bool,
    by: str,
    rollout_percent: int | None = None,
    tenants: tuple[str, ...] | None = None,
    description: str | None = None,
) -> Flag:
    """Create or change a flag (owner session); what is not given keeps its value."""
    if rollout_percent is not None and not 0 <= rollout_percent <= 100:
        raise BadRequest("rollout_percent must be between 0 and 100", code="invalid_flag")
    row = await session.fetch_one(
        "INSERT INTO control.flags AS f (name, enabled, rollout_percent, tenants, description, "
        "updated_by) VALUES (%(name)s, %(enabled)s, coalesce(%(pct)s::int, 100), "
        "coalesce(%(tenants)s::text[], '{}'), coalesce(%(desc)s::text, ''), %(by)s) "
        "ON CONFLICT (name) DO UPDATE SET enabled = EXCLUDED.enabled, "
        "rollout_percent = coalesce(%(pct)s::int, f.rollout_percent), "
        "tenants = coalesce(%(tenants)s::text[], f.tenants), "
        "description = coalesce(%(desc)s::text, f.description), "
        "updated_at = now(), updated_by = EXCLUDED.updated_by "
        "RETURNING name, enabled, rollout_percent, tenants, description, updated_at, updated_by",
        {
            "name": name,
            "enabled": enabled,
            "pct": rollout_percent,
            "tenants": list(tenants) if tenants is not None else None,
            "desc": description,
            "by": by,
        },
    )
    if row is None:  # pragma: no cover - RETURNING always yields the row
        raise NotFound(f"flag {name!r}")
    return _flag(row)


class FlagStore:
    """Every flag, in memory, for the request path (module docstring)."""

    def __init__(
        self,
        db: Database,
        *,
        changes: ControlChanges | None = None,
        ttl_s: float = 1.0,
        listening_ttl_s: float = 300.0,
        defaults: Mapping[str, bool] = DEFAULTS,
    ) -> None:
        self._db = db
        self._changes = changes
        self._ttl_s = ttl_s
        self._listening_ttl_s = listening_ttl_s
        self._defaults = dict(defaults)
        self._flags: dict[str, Flag] = {}
        self._read_at: float | None = None
        self._generation = 0
        if changes is not None:
            changes.subscribe_flags(self.forget)

    def forget(self, name: str | None) -> None:
        self._generation += 1
        self._read_at = None

    async def _current(self) -> dict[str, Flag]:
        now = time.monotonic()
        ttl = cache_ttl(self._changes, self._ttl_s, self._listening_ttl_s)
        if self._read_at is not None and now - self._read_at < ttl:
            return self._flags
        generation = self._generation
        try:
            rows = await self._db.control_fetch(_SELECT)
        except DataError as exc:  # keep the last flags read
            log.warning("flags_unreadable", error=str(exc))
            return self._flags
        self._flags = {r["name"]: _flag(r) for r in rows}
        if generation == self._generation:
            self._read_at = now
        return self._flags

    async def is_on(self, name: str, tenant_id: str | None = None) -> bool:
        flag = (await self._current()).get(name)
        if flag is None:
            return self._defaults.get(name, False)
        return flag.on_for(tenant_id)

    async def get(self, name: str) -> Flag | None:
        return (await self._current()).get(name)
