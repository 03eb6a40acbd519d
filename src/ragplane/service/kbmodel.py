"""A knowledge base's embedding model over HTTP: its state, and a switch to another model.

``GET /v1/kb/{kb}/model`` says which model the namespace is pinned to, which model its
queries are answered with, its ``kb_version`` and the switch in progress, if any.
``POST /v1/kb/{kb}/model`` with ``{"model": ...}`` queues a switch
(``ragplane.knowledge.switch``) and answers 202 with the job's id and status URL; the
job's progress and phase read like any job's, at ``GET /v1/jobs/{id}``. Queries keep
working during the switch (with the old model until the swap, then with the new one).

Refusals: 404 ``namespace_not_found``; 400 ``unknown_embedding_model`` (not a model this
deployment can run); 409 ``switch_in_progress`` (another switch of the namespace is
queued or running) and 409 ``model_already_active``.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import JSONResponse

from ragplane.data import Database
from ragplane.edge.context import TenantContext
from ragplane.edge.tenancy import tenant_context
from ragplane.errors import BadRequest, Conflict
from ragplane.knowledge.switch import SwitchRefused, namespace_state, request_switch
from ragplane.service.documents import JobAccepted, namespace_or_404

__all__ = ["router"]

router = APIRouter(tags=["knowledge"])


class ModelSwitchIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=200, description="The model to switch to.")
    tenant_id: str | None = Field(
        default=None, description="Optional; must be the credentials' tenant if given."
    )


class ModelStateOut(BaseModel):
    kb: str
    pinned_model: str = Field(description="The namespace's pin (the control plane).")
    active_model: str = Field(description="The model queries are answered with.")
    kb_version: int
    switching_to: str | None
    switch_job_id: str | None
    available_models: list[str] = Field(description="Models this deployment can embed with.")


def _db(request: Request) -> Database:
    db: Database = request.app.state.db
    return db


@router.get("/v1/kb/{kb}/model", responses={404: {"description": "no such knowledge base"}})
async def get_model(
    kb: str, request: Request, ctx: Annotated[TenantContext, Depends(tenant_context)]
) -> ModelStateOut:
    """The knowledge base's embedding model, and the switch in progress, if any."""
    db = _db(request)
    config = await namespace_or_404(db, ctx.tenant_id, kb)
    state = await namespace_state(db, ctx.tenant_id, kb)
    return ModelStateOut(
        kb=kb,
        pinned_model=config.embedding_model,
        active_model=state.active_model if state else config.embedding_model,
        kb_version=state.kb_version if state else 0,
        switching_to=state.switching_to if state else None,
        switch_job_id=state.switch_job_id if state else None,
        available_models=list(request.app.state.platform.embedders.model_ids),
    )


@router.post(
    "/v1/kb/{kb}/model",
    status_code=202,
    response_model=JobAccepted,
    responses={
        202: {"description": "switch queued; poll status_url"},
        400: {"description": "not a model this deployment can embed with"},
        404: {"description": "no such knowledge base"},
        409: {"description": "a switch is in progress, or the model is already active"},
    },
)
async def switch_model(
    kb: str,
    body: ModelSwitchIn,
    request: Request,
    ctx: Annotated[TenantContext, Depends(tenant_context)],
) -> JSONResponse:
    """Re-embed the knowledge base with another model in the background, then swap."""
    db = _db(request)
    config = await namespace_or_404(db, ctx.tenant_id, kb)
    platform = request.app.state.platform
    try:
        job = await request_switch(
            platform.ingest_queue, db, config, body.model, platform.embedders
        )
    except SwitchRefused as exc:
        if exc.code == "unknown_embedding_model":
            raise BadRequest(str(exc), code=exc.code) from None
        raise Conflict(str(exc), code=exc.code) from None
    status_url = f"/v1/jobs/{job.id}"
    accepted = JobAccepted(job_id=job.id, status=job.status, status_url=status_url)
    return JSONResponse(accepted.model_dump(), status_code=202, headers={"Location": status_url})
