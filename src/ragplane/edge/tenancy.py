"""The request-scoped tenant context, built only from verified credentials.

A request with credentials is held to the credentials' tenant: a body field
``tenant_id`` or an ``X-Tenant-Id`` header naming another tenant is refused with
403. Without credentials the request is refused with 401, except in dev mode,
where it may name its tenant (the smoke test's anonymous path). A client-sent
region header is never read: the region comes from the registry.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import structlog
from fastapi import Request

from ragplane.control.tenants import TenantRegistry
from ragplane.edge.auth import Authenticator
from ragplane.edge.context import Principal, RequestContext, TenantContext
from ragplane.errors import Forbidden, TenantNotFound, Unauthorized

__all__ = ["Edge", "request_context", "tenant_context"]

TENANT_HEADER = "x-tenant-id"
TENANT_FIELD = "tenant_id"


@dataclass(frozen=True)
class Edge:
    """What the edge needs per request; stored on ``app.state.edge``."""

    authenticator: Authenticator
    registry: TenantRegistry
    dev_mode: bool


def request_context(request: Request) -> RequestContext:
    ctx: RequestContext = request.state.request_context
    return ctx


async def _named_tenants(request: Request) -> set[str]:
    # every X-Tenant-Id header, not only the first; and the body of any method with a JSON
    # media type in any letter case (FastAPI parses those bodies, so they are checked here)
    named = set(request.headers.getlist(TENANT_HEADER))
    if "json" in request.headers.get("content-type", "").lower():
        try:
            body = json.loads(await request.body() or b"null")
        except ValueError:
            body = None  # the route's own validation reports malformed bodies
        if isinstance(body, dict) and TENANT_FIELD in body:
            named.add(str(body[TENANT_FIELD]))
    return named


async def tenant_context(request: Request) -> TenantContext:
    """FastAPI dependency: the verified tenant of this request."""
    edge: Edge = request.app.state.edge
    rctx = request_context(request)
    principal = await edge.authenticator.authenticate(request.headers.get("authorization"))
    named = await _named_tenants(request)
    if principal is None:
        if not edge.dev_mode:
            raise Unauthorized(
                "credentials required: send 'Authorization: Bearer <token>'",
                code="missing_credentials",
            )
        if len(named) != 1:
            raise Unauthorized(
                "credentials required (dev mode: or name exactly one tenant with tenant_id)",
                code="missing_credentials",
            )
        principal = Principal(
            tenant_id=named.pop(), subject="dev:anonymous", roles=(), scopes=(), method="dev"
        )
    elif named - {principal.tenant_id}:
        raise Forbidden(
            "the request names a tenant other than the one its credentials belong to",
            code="tenant_mismatch",
        )
    try:
        tenant = await edge.registry.get(principal.tenant_id)
    except TenantNotFound:
        raise Forbidden(
            f"tenant {principal.tenant_id!r} is not registered", code="unknown_tenant"
        ) from None
    if not tenant.active:
        raise Forbidden(f"tenant {tenant.id!r} is {tenant.status}", code="tenant_suspended")
    structlog.contextvars.bind_contextvars(tenant_id=tenant.id)
    return TenantContext(
        tenant_id=tenant.id,
        subject=principal.subject,
        roles=principal.roles,
        scopes=principal.scopes,
        region=tenant.home_region,
        data_class=tenant.data_class,
        auth_method=principal.method,
        request_id=rctx.request_id,
        trace_id=rctx.trace.trace_id,
    )
