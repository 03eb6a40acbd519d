"""The tenant registry.

Reads run on the application role (the edge resolves every request's tenant
here); writes run on the owner's database from admin commands. Both take an
open :class:`~ragplane.data.Session`; this module never opens connections.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from ragplane.config import Region
from ragplane.control.changes import ControlChanges, PushedCache
from ragplane.data import Database, Session, validate_tenant_id
from ragplane.errors import TenantExists, TenantNotFound

__all__ = [
    "Tenant",
    "TenantRegistry",
    "add_tenant",
    "get_tenant",
    "list_tenants",
    "set_tenant_policy",
]

DEFAULT_EMBEDDING_MODEL = "all-minilm-l6-v2"


@dataclass(frozen=True)
class Tenant:
    id: str
    name: str
    home_region: Region
    data_class: str
    embedding_model: str
    status: str
    kb_namespaces: tuple[str, ...]
    created_at: datetime
    guard_policy: dict[str, Any] = field(default_factory=dict)  # GuardPolicy.from_mapping
    output_mode: str = "stream"  # or "buffered": nothing is sent before the output guard

    @property
    def active(self) -> bool:
        return self.status == "active"


_SELECT = """
SELECT t.id, t.name, t.home_region, t.data_class, t.embedding_model, t.status, t.created_at,
       t.guard_policy, t.output_mode,
       coalesce(array_agg(n.name ORDER BY n.name) FILTER (WHERE n.name IS NOT NULL), '{}')
           AS kb_namespaces
FROM control.tenants t
LEFT JOIN control.kb_namespaces n ON n.tenant_id = t.id
"""


def _tenant(row: dict[str, Any]) -> Tenant:
    return Tenant(**{**row, "kb_namespaces": tuple(row["kb_namespaces"])})


_ONE = " WHERE t.id = %s GROUP BY t.id"


def _found(row: dict[str, Any] | None, tenant_id: str) -> Tenant:
    if row is None:
        raise TenantNotFound(tenant_id)
    return _tenant(row)


async def get_tenant(session: Session, tenant_id: str) -> Tenant:
    return _found(await session.fetch_one(_SELECT + _ONE, (tenant_id,)), tenant_id)


async def list_tenants(session: Session) -> list[Tenant]:
    rows = await session.fetch_all(_SELECT + " GROUP BY t.id ORDER BY t.id")
    return [_tenant(r) for r in rows]


async def add_tenant(
    session: Session,
    tenant_id: str,
    *,
    name: str,
    home_region: Region,
    data_class: str = "standard",
    embedding_model: str = DEFAULT_EMBEDDING_MODEL,
    kb_namespaces: tuple[str, ...] = ("default",),
    exist_ok: bool = False,
) -> Tenant:
    """Register a tenant (owner session). ``exist_ok`` makes it idempotent for seeding."""
    validate_tenant_id(tenant_id)
    inserted = await session.execute(
        "INSERT INTO control.tenants (id, name, home_region, data_class, embedding_model) "
        "VALUES (%s, %s, %s, %s, %s) ON CONFLICT (id) DO NOTHING",
        (tenant_id, name, home_region, data_class, embedding_model),
    )
    if not inserted and not exist_ok:
        raise TenantExists(tenant_id)
    for ns in kb_namespaces:
        await session.execute(
            "INSERT INTO control.kb_namespaces (tenant_id, name, embedding_model) "
            "VALUES (%s, %s, %s) ON CONFLICT DO NOTHING",
            (tenant_id, ns, embedding_model),
        )
    return await get_tenant(session, tenant_id)


async def set_tenant_policy(
    session: Session,
    tenant_id: str,
    *,
    guard_policy: dict[str, Any] | None = None,
    output_mode: str | None = None,
) -> Tenant:
    """Replace the tenant's guard policy and/or output mode (owner session; what is None
    stays). The caller validates the policy (``GuardPolicy.from_mapping``)."""
    changed = await session.execute(
        "UPDATE control.tenants SET guard_policy = coalesce(%s::jsonb, guard_policy), "
        "output_mode = coalesce(%s, output_mode), updated_at = now() WHERE id = %s",
        (
            json.dumps(guard_policy) if guard_policy is not None else None,
            output_mode,
            tenant_id,
        ),
    )
    if not changed:
        raise TenantNotFound(tenant_id)
    return await get_tenant(session, tenant_id)


class TenantRegistry(PushedCache[str, Tenant]):
    """Read-through cache of the registry for the edge and the gateway
    (:class:`~ragplane.control.changes.PushedCache`: pushed changes forget a tenant)."""

    def __init__(
        self,
        db: Database,
        *,
        ttl_s: float = 5.0,
        changes: ControlChanges | None = None,
        listening_ttl_s: float = 300.0,
    ) -> None:
        async def load(tenant_id: str) -> Tenant:
            # one round trip (a unit of work would take three: BEGIN, SELECT, COMMIT)
            rows = await db.control_fetch(_SELECT + _ONE, (tenant_id,))
            return _found(rows[0] if rows else None, tenant_id)

        super().__init__(
            load, _itself, ttl_s=ttl_s, changes=changes, listening_ttl_s=listening_ttl_s
        )


def _itself(tenant_id: str) -> str:
    return tenant_id
