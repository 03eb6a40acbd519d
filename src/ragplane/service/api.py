"""Platform endpoints: liveness, readiness, metrics and the caller's verified identity."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel
from starlette.responses import JSONResponse, Response

from ragplane.data import Database
from ragplane.data.migrate import current_status
from ragplane.edge.context import TenantContext
from ragplane.edge.errors import error_response
from ragplane.edge.tenancy import tenant_context
from ragplane.errors import DataError

__all__ = ["router"]

router = APIRouter()


class Health(BaseModel):
    status: str


class Ready(BaseModel):
    status: str
    schema_version: int


class WhoAmI(BaseModel):
    tenant_id: str
    subject: str
    roles: list[str]
    scopes: list[str]
    region: str
    data_class: str
    auth_method: str
    request_id: str
    trace_id: str


@router.get("/health", tags=["platform"])
async def health() -> Health:
    """Liveness: the process is up and serving."""
    return Health(status="ok")


@router.get(
    "/ready",
    tags=["platform"],
    response_model=Ready,
    responses={503: {"description": "database unreachable or migrations not current"}},
)
async def ready(request: Request) -> Ready | JSONResponse:
    """Readiness: the database answers and its schema is at the version this code expects."""
    db: Database = request.app.state.db
    try:
        async with db.control() as s:
            st = await current_status(s)
    except DataError as exc:
        return error_response(request, 503, "not_ready", str(exc))
    if not st.is_current:
        pending = ", ".join(f"{m.version:04d}_{m.name}" for m in st.pending)
        return error_response(
            request, 503, "not_ready", f"migrations pending: {pending} (run: ragplane db migrate)"
        )
    return Ready(status="ready", schema_version=st.current)


@router.get("/metrics", tags=["platform"], response_class=Response)
async def metrics(request: Request) -> Response:
    """Prometheus metrics: the RAG lifecycle's steps, outcomes and queue."""
    from ragplane.service.metrics import CONTENT_TYPE

    chat_metrics = request.app.state.platform.metrics
    body = chat_metrics.exposition() if chat_metrics is not None else b""
    return Response(body, media_type=CONTENT_TYPE)


@router.get("/v1/whoami", tags=["identity"])
async def whoami(ctx: Annotated[TenantContext, Depends(tenant_context)]) -> WhoAmI:
    """The verified tenant context of this request."""
    return WhoAmI(
        tenant_id=ctx.tenant_id,
        subject=ctx.subject,
        roles=list(ctx.roles),
        scopes=list(ctx.scopes),
        region=ctx.region,
        data_class=ctx.data_class,
        auth_method=ctx.auth_method,
        request_id=ctx.request_id,
        trace_id=ctx.trace_id,
    )
