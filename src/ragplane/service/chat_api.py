"""``POST /v1/chat``: ask a tenant's knowledge base; JSON, or typed server-sent events.

JSON (the default) answers ``{answer, citations, cache_hit, mode, request_id, trace_id,
session_id, usage, model_alias}`` (``banner`` too in offline mode). ``"stream": true`` or
``Accept: text/event-stream`` streams events instead::

    event: meta       {request_id, trace_id, session_id, cache_hit, mode, model_alias[, banner]}
    event: delta      {text}                      (one or more)
    event: citations  {citations, dropped}
    event: done       {usage, cache_hit, mode, latency_ms}
    event: error      {code, message, request_id, status}   (instead of what is left)

A refusal before the answer starts (unknown knowledge base, the input guard or its
injection model, a bad body, inference switched off with nothing to serve) is a plain
JSON error with its HTTP status, in both modes: a stream's headers go out with its first
event. Once a stream has started, a failure ends it with an ``error`` event — never
silently.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.background import BackgroundTask
from starlette.responses import JSONResponse, Response, StreamingResponse

from ragplane.control.namespaces import NamespaceNotFound
from ragplane.edge.context import TenantContext
from ragplane.edge.tenancy import request_context, tenant_context
from ragplane.errors import NotFound
from ragplane.service.chat import ChatEvent, ChatRequest, ChatService
from ragplane.service.citations import Citation
from ragplane.service.sessions import parse_session_id

__all__ = ["router"]

router = APIRouter()


class ChatBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    query: str = Field(min_length=1, description="The question.")
    kb: str = Field(default="default", description="The knowledge-base namespace to ask.")
    session_id: str | None = Field(
        default=None, description="Continue this conversation (a UUID); none starts one."
    )
    filters: dict[str, Any] | None = Field(
        default=None, description="Chunk metadata that must match (JSON containment)."
    )
    stream: bool = Field(default=False, description="Server-sent events instead of JSON.")
    feature: str | None = Field(
        default=None,
        max_length=64,
        pattern=r"^[A-Za-z0-9._:-]+$",
        description="Attribution for the cost ledger.",
    )
    tenant_id: str | None = Field(
        default=None, description="Dev mode only, without credentials: the tenant to act as."
    )


class Usage(BaseModel):
    input_tokens: int
    output_tokens: int
    cost_usd: float


class ChatAnswer(BaseModel):
    answer: str
    citations: list[Citation]
    citations_dropped: int
    cache_hit: bool
    mode: str
    banner: str | None = None
    request_id: str
    trace_id: str
    session_id: str
    usage: Usage
    model_alias: str
    latency_ms: float


def _sse(name: str, data: dict[str, Any]) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


async def _frames(events: AsyncIterator[ChatEvent]) -> AsyncIterator[bytes]:
    async for name, data in events:
        yield _sse(name, data)


async def _prepend(first: ChatEvent, rest: AsyncIterator[ChatEvent]) -> AsyncIterator[ChatEvent]:
    yield first
    async for event in rest:
        yield event


def _error_response(error: dict[str, Any]) -> JSONResponse:
    return JSONResponse(
        {"error": {k: error[k] for k in ("code", "message", "request_id")}},
        status_code=error["status"],
    )


@router.post(
    "/v1/chat",
    tags=["chat"],
    response_model=ChatAnswer,
    responses={
        200: {"content": {"text/event-stream": {}}, "description": "JSON, or SSE events"},
        400: {"description": "a bad body, or refused by the input guard (reason code)"},
        404: {"description": "no such knowledge base"},
        503: {"description": "inference switched off and no cached answer"},
    },
)
async def chat(
    request: Request,
    body: ChatBody,
    ctx: Annotated[TenantContext, Depends(tenant_context)],
) -> Response:
    """Ask the tenant's knowledge base; the answer cites its sources."""
    platform = request.app.state.platform
    service: ChatService = platform.chat
    tenant = await platform.edge.registry.get(ctx.tenant_id)
    try:
        namespace = await platform.namespaces.get((ctx.tenant_id, body.kb))
    except NamespaceNotFound:
        raise NotFound(
            f"no knowledge base {body.kb!r} for this tenant", code="namespace_not_found"
        ) from None
    prepared = service.prepare(
        ctx,
        tenant,
        ChatRequest(
            query=body.query,
            kb=body.kb,
            session_id=parse_session_id(body.session_id) if body.session_id else None,
            filters=body.filters,
            stream=body.stream or "text/event-stream" in request.headers.get("accept", ""),
            feature=body.feature,
        ),
        namespace,
        request_context(request).trace,
    )
    remember = BackgroundTask(service.remember, prepared)
    answer = service.answer(prepared)
    if prepared.request.stream:
        first = await anext(answer)
        if first[0] == "error":  # refused before the answer began: a plain HTTP error
            async for _ in answer:  # nothing follows an error; this ends the generator
                pass
            return _error_response(first[1])
        return StreamingResponse(
            _frames(_prepend(first, answer)),
            media_type="text/event-stream",
            headers={"cache-control": "no-cache", "x-accel-buffering": "no"},
            background=remember,
        )
    events: list[ChatEvent] = [event async for event in answer]
    found = dict(events)
    if "error" in found:
        return _error_response(found["error"])
    meta, done = found["meta"], found["done"]
    return JSONResponse(
        {
            "answer": "".join(data["text"] for name, data in events if name == "delta"),
            "citations": found["citations"]["citations"],
            "citations_dropped": found["citations"]["dropped"],
            "cache_hit": meta["cache_hit"],
            "mode": meta["mode"],
            "banner": meta.get("banner"),
            "request_id": meta["request_id"],
            "trace_id": meta["trace_id"],
            "session_id": meta["session_id"],
            "usage": done["usage"],
            "model_alias": meta["model_alias"],
            "latency_ms": done["latency_ms"],
        },
        background=remember,
    )
