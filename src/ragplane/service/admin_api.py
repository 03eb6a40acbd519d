"""The admin API: feature flags and kill switches (``/v1/admin/flags``), and tenants'
guard policy and output mode (``/v1/admin/tenants/{id}/policy``).

Both are platform settings, so changing them needs the ``platform-admin`` role in the
verified credentials (``ragplane token --role platform-admin`` in dev mode) — a tenant's
own ``admin`` role is not enough. Changes are written as the owner role (the
application role may only read the control plane) and pushed to every process by the
control-plane triggers; flag changes are audited with the caller's subject
(``control.flag_audit``).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Path, Request
from pydantic import BaseModel, Field

from ragplane.control.flags import Flag, list_flags, set_flag
from ragplane.control.tenants import set_tenant_policy
from ragplane.data import Database
from ragplane.edge.context import TenantContext
from ragplane.edge.tenancy import tenant_context
from ragplane.errors import ApiError, BadRequest, ConfigError, Forbidden, NotFound, TenantNotFound
from ragplane.service.guardrails import GuardPolicy

__all__ = ["PLATFORM_ADMIN", "router"]

PLATFORM_ADMIN = "platform-admin"
router = APIRouter(prefix="/v1/admin", tags=["admin"])


class OwnerUnavailable(ApiError):
    status_code = 503
    code = "admin_unavailable"


class FlagOut(BaseModel):
    name: str
    enabled: bool
    rollout_percent: int
    tenants: list[str]
    description: str
    updated_at: datetime
    updated_by: str


class FlagChange(BaseModel):
    enabled: bool
    rollout_percent: int | None = Field(default=None, ge=0, le=100)
    tenants: list[str] | None = None
    description: str | None = Field(default=None, max_length=500)


def _out(f: Flag) -> FlagOut:
    return FlagOut(
        name=f.name,
        enabled=f.enabled,
        rollout_percent=f.rollout_percent,
        tenants=list(f.tenants),
        description=f.description,
        updated_at=f.updated_at,
        updated_by=f.updated_by,
    )


def _platform_admin(ctx: Annotated[TenantContext, Depends(tenant_context)]) -> TenantContext:
    if PLATFORM_ADMIN not in ctx.roles:
        raise Forbidden(
            f"changing platform flags needs the {PLATFORM_ADMIN!r} role", code="not_platform_admin"
        )
    return ctx


def _owner(request: Request) -> Database:
    owner: Database | None = request.app.state.platform.owner_db
    if owner is None:
        raise OwnerUnavailable(
            "the admin API needs the owner role: set database.owner_url "
            "(RAGPLANE_DATABASE__OWNER_URL)"
        )
    return owner


@router.get("/flags")
async def get_flags(
    request: Request, ctx: Annotated[TenantContext, Depends(_platform_admin)]
) -> list[FlagOut]:
    """Every feature flag."""
    async with request.app.state.db.control() as s:
        return [_out(f) for f in await list_flags(s)]


@router.put("/flags/{name}")
async def put_flag(
    name: Annotated[str, Path(pattern=r"^[a-z][a-z0-9-]{1,62}$")],
    change: FlagChange,
    request: Request,
    ctx: Annotated[TenantContext, Depends(_platform_admin)],
) -> FlagOut:
    """Create or change a flag (audited with the caller's subject)."""
    async with _owner(request).control() as s:
        flag = await set_flag(
            s,
            name,
            enabled=change.enabled,
            by=f"{ctx.subject} ({ctx.tenant_id})",
            rollout_percent=change.rollout_percent,
            tenants=tuple(change.tenants) if change.tenants is not None else None,
            description=change.description,
        )
    return _out(flag)


class TenantPolicy(BaseModel):
    guard_policy: dict[str, Any] | None = Field(
        default=None, description="The guard policy (replaces the current one); none: keep."
    )
    output_mode: Literal["stream", "buffered"] | None = None


class TenantPolicyOut(BaseModel):
    tenant_id: str
    guard_policy: dict[str, Any]
    output_mode: str


@router.put("/tenants/{tenant_id}/policy")
async def put_tenant_policy(
    tenant_id: str,
    change: TenantPolicy,
    request: Request,
    ctx: Annotated[TenantContext, Depends(_platform_admin)],
) -> TenantPolicyOut:
    """Set a tenant's guard policy and output mode (pushed to every process at once)."""
    if change.guard_policy is not None:
        try:
            GuardPolicy.from_mapping(change.guard_policy)
        except ConfigError as exc:
            raise BadRequest(str(exc), code="invalid_guard_policy") from None
    try:
        async with _owner(request).control() as s:
            tenant = await set_tenant_policy(
                s, tenant_id, guard_policy=change.guard_policy, output_mode=change.output_mode
            )
    except TenantNotFound:
        raise NotFound(f"tenant {tenant_id!r} is not registered", code="unknown_tenant") from None
    return TenantPolicyOut(
        tenant_id=tenant.id, guard_policy=tenant.guard_policy, output_mode=tenant.output_mode
    )
