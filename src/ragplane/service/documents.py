"""Knowledge-base documents over HTTP: upload (a background job), job status, delete.

``POST /v1/documents`` takes either ``multipart/form-data`` -- one or more files, a
``kb`` field (the namespace, default ``default``) and, with a single file, an optional
``source_uri`` (default: the file name) -- or JSON
``{"kb": ..., "documents": [{"source_uri", "content" | "content_base64", "media_type"?}]}``.
It stores the files and queues one ingest job (``ragplane.knowledge.jobs``), then answers
202 with the job's id and status URL; ``ragplane worker`` does the work.

Limits (``knowledge.*`` settings): a request over ``max_request_bytes`` is refused with
413 before its body is read (a request without ``Content-Length`` gets 411); a file over
``max_upload_bytes`` is accepted as part of the job and becomes that document's
``too_large`` error, like any other bad document, while the rest of the job proceeds.
"""

from __future__ import annotations

import base64
import binascii
from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from starlette.datastructures import UploadFile
from starlette.responses import JSONResponse

from ragplane.config import Settings
from ragplane.control.namespaces import NamespaceConfig, NamespaceNotFound, get_namespace
from ragplane.data import Database
from ragplane.edge.context import TenantContext
from ragplane.edge.tenancy import tenant_context
from ragplane.errors import (
    BadRequest,
    Forbidden,
    LengthRequired,
    NotFound,
    PayloadTooLarge,
    UnsupportedMediaType,
)
from ragplane.knowledge.ingest import Ingestor
from ragplane.knowledge.jobs import IngestJob, IngestQueue, Upload, get_job

__all__ = ["JobAccepted", "JobOut", "namespace_or_404", "router"]

router = APIRouter(tags=["knowledge"])

MAX_SOURCE_URI = 2048


class DocumentIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    source_uri: str = Field(min_length=1, max_length=MAX_SOURCE_URI)
    content: str | None = Field(default=None, description="The document as text.")
    content_base64: str | None = Field(default=None, description="The document's bytes.")
    media_type: str | None = Field(
        default=None, description="e.g. text/markdown, application/pdf; else the extension."
    )

    @model_validator(mode="after")
    def _one_content(self) -> DocumentIn:
        if (self.content is None) == (self.content_base64 is None):
            raise ValueError("give exactly one of content and content_base64")
        return self


class DocumentsIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kb: str = Field(default="default", description="Knowledge-base namespace.")
    tenant_id: str | None = Field(
        default=None, description="Optional; must be the credentials' tenant if given."
    )
    documents: list[DocumentIn] = Field(min_length=1)


class JobAccepted(BaseModel):
    job_id: str
    status: str
    status_url: str


class JobErrorOut(BaseModel):
    source_uri: str
    code: str
    message: str


class JobOut(BaseModel):
    id: str
    kb: str
    kind: str = Field(description="ingest, or switch_model (an embedding-model switch)")
    status: str
    documents_total: int
    documents_done: int
    chunks_written: int
    tokens_embedded: int
    errors: list[JobErrorOut]
    attempts: int
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    source_model: str | None = Field(default=None, description="A switch: from this model.")
    target_model: str | None = Field(default=None, description="A switch: to this model.")
    phase: str | None = Field(
        default=None,
        description="A switch: embedding, catching_up, swapping, cleanup, done.",
    )

    @classmethod
    def of(cls, job: IngestJob) -> JobOut:
        return cls(
            id=job.id,
            kb=job.namespace,
            kind=job.kind,
            status=job.status,
            documents_total=job.documents_total,
            documents_done=job.documents_done,
            chunks_written=job.chunks_written,
            tokens_embedded=job.tokens_embedded,
            errors=[
                JobErrorOut(source_uri=e.source_uri, code=e.code, message=e.message)
                for e in job.errors
            ],
            attempts=job.attempts,
            created_at=job.created_at,
            started_at=job.started_at,
            finished_at=job.finished_at,
            source_model=job.source_model,
            target_model=job.target_model,
            phase=job.phase,
        )


def _settings(request: Request) -> Settings:
    settings: Settings = request.app.state.platform.settings
    return settings


def _db(request: Request) -> Database:
    db: Database = request.app.state.db
    return db


async def _bounded_body(request: Request) -> bytes:
    """The request body, refused before it is read when it is larger than allowed.

    A dependency declared before ``tenant_context``, which reads JSON bodies itself.
    """
    limit = _settings(request).knowledge.max_request_bytes
    declared = request.headers.get("content-length")
    if declared is None or not declared.isdigit():
        raise LengthRequired("an upload needs a Content-Length header")
    if int(declared) > limit:
        raise PayloadTooLarge(
            f"the request has {int(declared)} bytes; the limit is {limit} bytes "
            "(knowledge.max_request_bytes): split the upload into several requests"
        )
    body = await request.body()
    if len(body) > limit:  # the server enforces Content-Length; this is belt and braces
        raise PayloadTooLarge(f"the request exceeds the limit of {limit} bytes")
    return body


async def namespace_or_404(db: Database, tenant_id: str, kb: str) -> NamespaceConfig:
    try:
        async with db.control() as s:
            return await get_namespace(s, tenant_id, kb)
    except NamespaceNotFound:
        raise NotFound(
            f"no knowledge base {kb!r} for this tenant", code="namespace_not_found"
        ) from None


def _media_essence(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


async def _uploads_from_form(request: Request, ctx: TenantContext) -> tuple[str, list[Upload]]:
    limit = _settings(request).knowledge.max_documents_per_request
    async with request.form(max_files=limit, max_fields=16) as form:
        named = form.get("tenant_id")
        if isinstance(named, str) and named != ctx.tenant_id:
            raise Forbidden(
                "the request names a tenant other than the one its credentials belong to",
                code="tenant_mismatch",
            )
        kb = form.get("kb", "default")
        source_uri = form.get("source_uri")
        if not isinstance(kb, str) or (source_uri is not None and not isinstance(source_uri, str)):
            raise BadRequest("'kb' and 'source_uri' must be form fields, not files")
        files = [(name, v) for name, v in form.multi_items() if isinstance(v, UploadFile)]
        if not files:
            raise BadRequest("no file in the upload (send one or more file parts)")
        if source_uri is not None and len(files) != 1:
            raise BadRequest("'source_uri' names one file; send one file per source_uri")
        uploads = []
        for field, f in files:
            uri = source_uri or f.filename
            if not uri:
                raise BadRequest(f"file part {field!r} has no file name: give a source_uri")
            _check_source_uri(uri)
            uploads.append(Upload(uri, await f.read(), f.content_type or ""))
    return kb, uploads


def _uploads_from_json(body: bytes) -> tuple[str, list[Upload]]:
    try:
        payload = DocumentsIn.model_validate_json(body)
    except ValidationError as exc:  # reported like FastAPI's own body validation: 422
        raise RequestValidationError(exc.errors(include_url=False)) from None
    uploads = []
    for n, d in enumerate(payload.documents):
        _check_source_uri(d.source_uri)
        if d.content is not None:
            data = d.content.encode("utf-8", errors="surrogatepass")
        else:
            try:
                data = base64.b64decode(d.content_base64 or "", validate=True)
            except (binascii.Error, ValueError):
                raise BadRequest(f"documents[{n}].content_base64 is not valid base64") from None
        uploads.append(Upload(d.source_uri, data, d.media_type or ""))
    return payload.kb, uploads


def _check_source_uri(uri: str) -> None:
    if len(uri) > MAX_SOURCE_URI or "\x00" in uri or not uri.strip():
        raise BadRequest(f"not a usable source_uri: {uri[:80]!r}")


@router.post(
    "/v1/documents",
    status_code=202,
    response_model=JobAccepted,
    responses={
        202: {"description": "queued; poll status_url"},
        404: {"description": "no such knowledge base"},
        411: {"description": "no Content-Length"},
        413: {"description": "request larger than knowledge.max_request_bytes"},
        415: {"description": "neither multipart/form-data nor JSON"},
    },
    openapi_extra={
        "requestBody": {
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "properties": {
                            "file": {
                                "type": "array",
                                "items": {"type": "string", "format": "binary"},
                            },
                            "kb": {"type": "string", "default": "default"},
                            "source_uri": {"type": "string"},
                        },
                        "required": ["file"],
                    }
                },
                "application/json": {"schema": DocumentsIn.model_json_schema()},
            },
            "required": True,
        }
    },
)
async def upload_documents(
    request: Request,
    body: Annotated[bytes, Depends(_bounded_body)],
    ctx: Annotated[TenantContext, Depends(tenant_context)],
) -> JSONResponse:
    """Queue documents for ingestion into a knowledge base; 202 with the job's id."""
    settings = _settings(request)
    kind = _media_essence(request)
    if kind == "multipart/form-data":
        kb, uploads = await _uploads_from_form(request, ctx)
    elif kind == "application/json" or kind.endswith("+json"):
        kb, uploads = _uploads_from_json(body)
    else:
        raise UnsupportedMediaType(
            f"send multipart/form-data (files) or application/json, not {kind or 'no type'!r}"
        )
    if len(uploads) > settings.knowledge.max_documents_per_request:
        raise BadRequest(
            f"{len(uploads)} documents in one request; the limit is "
            f"{settings.knowledge.max_documents_per_request}"
        )
    db = _db(request)
    config = await namespace_or_404(db, ctx.tenant_id, kb)
    queue: IngestQueue = request.app.state.platform.ingest_queue
    job = await queue.enqueue(
        db, config, uploads, max_upload_bytes=settings.knowledge.max_upload_bytes
    )
    status_url = f"/v1/jobs/{job.id}"
    accepted = JobAccepted(job_id=job.id, status=job.status, status_url=status_url)
    return JSONResponse(accepted.model_dump(), status_code=202, headers={"Location": status_url})


@router.get("/v1/jobs/{job_id}", responses={404: {"description": "no such job"}})
async def get_ingest_job(
    job_id: str, request: Request, ctx: Annotated[TenantContext, Depends(tenant_context)]
) -> JobOut:
    """A job: status, progress and per-document errors (an ingest job, or an
    embedding-model switch with its phase)."""
    job = await get_job(_db(request), ctx.tenant_id, job_id)
    if job is None:
        raise NotFound(f"no job {job_id!r}", code="job_not_found")
    return JobOut.of(job)


@router.delete(
    "/v1/documents/{document_id}",
    status_code=204,
    responses={404: {"description": "no such document or knowledge base"}},
)
async def delete_document(
    document_id: str,
    request: Request,
    ctx: Annotated[TenantContext, Depends(tenant_context)],
    kb: Annotated[str, Query(description="Knowledge-base namespace.")] = "default",
) -> Response:
    """Delete one document and its chunks."""
    config = await namespace_or_404(_db(request), ctx.tenant_id, kb)
    ingestor: Ingestor = request.app.state.platform.ingestor
    if not await ingestor.delete_document(config, document_id):
        raise NotFound(f"no document {document_id!r} in {kb!r}", code="document_not_found")
    return Response(status_code=204)
