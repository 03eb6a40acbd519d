"""The exception tree of ragplane.

Every error the platform raises on purpose is one of these. Library and driver
exceptions are translated once, where they enter our code (``raise X from exc``),
so callers, handlers and (later) retries and breakers look only at this tree::

    RagplaneError
    ├── ConfigError             invalid settings; start-up stops
    ├── DataError
    │   ├── DatabaseUnavailable the database cannot be reached
    │   ├── StateStoreUnavailable Redis (shared gateway state) cannot be reached
    │   ├── MigrationError      a migration failed or the schema is not current
    │   └── TenantScopeError    a unit of work was asked for with no valid tenant
    ├── ControlError
    │   ├── TenantNotFound
    │   └── TenantExists
    ├── KnowledgeError
    │   ├── IngestError         one document could not be ingested (carries a code)
    │   ├── EmbeddingError      the embedder failed (model missing, remote error)
    │   └── ModelMismatch       a query names a namespace pinned to another model
    ├── GatewayError            an LLM call failed; carries provider, route, attempt, request id
    │   ├── UpstreamError       the provider answered with an error status (retryable or not)
    │   ├── UpstreamTimeout     connect / first token / idle / total timeout (``phase``)
    │   ├── UpstreamUnavailable the connection failed (refused, reset, DNS)
    │   ├── StreamInterrupted   the stream broke after the first byte reached the caller
    │   ├── UpstreamProtocolError the provider sent bytes we cannot parse
    │   ├── NoHealthyRoute      every route of the alias is open or exhausted
    │   ├── BulkheadFull        too many concurrent calls for a tenant or route (429)
    │   ├── UnknownAlias        the model name is not a configured alias
    │   └── RegionNotServed     no route of the alias may serve the tenant's home region
    └── ApiError                carries an HTTP status and a stable error code
        ├── BadRequest          400
        ├── Unauthorized        401 (credentials missing or not valid)
        ├── Forbidden           403 (valid credentials, not allowed)
        ├── NotFound            404
        ├── Conflict            409 (the resource is busy, e.g. a model switch in progress)
        ├── LengthRequired      411 (an upload without Content-Length)
        ├── PayloadTooLarge     413
        └── UnsupportedMediaType 415

``ApiError`` subclasses are what the edge turns into the JSON error body
``{"error": {"code", "message", "request_id"}}``.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "ApiError",
    "BadRequest",
    "BulkheadFull",
    "ConfigError",
    "Conflict",
    "ControlError",
    "DataError",
    "DatabaseUnavailable",
    "EmbeddingError",
    "Forbidden",
    "GatewayError",
    "IngestError",
    "KnowledgeError",
    "LengthRequired",
    "MigrationError",
    "ModelMismatch",
    "NoHealthyRoute",
    "NotFound",
    "PayloadTooLarge",
    "RagplaneError",
    "RegionNotServed",
    "StateStoreUnavailable",
    "StreamInterrupted",
    "TenantExists",
    "TenantNotFound",
    "TenantScopeError",
    "Unauthorized",
    "UnknownAlias",
    "UnsupportedMediaType",
    "UpstreamError",
    "UpstreamProtocolError",
    "UpstreamTimeout",
    "UpstreamUnavailable",
]


class RagplaneError(Exception):
    """Base of every error ragplane raises on purpose."""


class ConfigError(RagplaneError):
    """Settings are invalid; the message names the key, the source and what was expected."""


class DataError(RagplaneError):
    """A data-plane failure."""


class DatabaseUnavailable(DataError):
    """The database could not be reached or refused the connection."""


class StateStoreUnavailable(DataError):
    """The shared state store (Redis: breaker state, bulkhead slots) could not be reached."""


class MigrationError(DataError):
    """A migration failed, or the schema is not at the version this code expects."""


class TenantScopeError(DataError):
    """A tenant-scoped unit of work was requested without a valid tenant id."""


class ControlError(RagplaneError):
    """A control-plane operation failed."""


class TenantNotFound(ControlError):
    def __init__(self, tenant_id: str) -> None:
        super().__init__(f"tenant {tenant_id!r} is not registered")
        self.tenant_id = tenant_id


class TenantExists(ControlError):
    def __init__(self, tenant_id: str) -> None:
        super().__init__(f"tenant {tenant_id!r} already exists")
        self.tenant_id = tenant_id


class KnowledgeError(RagplaneError):
    """A knowledge-base failure."""


class IngestError(KnowledgeError):
    """One document could not be ingested; the rest of its batch goes on.

    ``code`` is one of: ``unsupported_type``, ``empty_document``, ``invalid_utf8``,
    ``too_large``, ``no_text_layer``, ``unreadable``, ``invalid_record``.
    """

    def __init__(self, code: str, message: str, *, source_uri: str = "") -> None:
        super().__init__(f"{source_uri}: {message}" if source_uri else message)
        self.code = code
        self.message = message
        self.source_uri = source_uri


class EmbeddingError(KnowledgeError):
    """The embedder could not produce vectors."""


class ModelMismatch(KnowledgeError):
    """A namespace is pinned to one embedding model and was asked to use another."""


class GatewayError(RagplaneError):
    """An LLM call failed. Context fields are filled in where they are known.

    ``retryable`` says whether trying again (same or next route) may succeed; only
    errors raised before the first byte reached the caller are ever retried.
    """

    retryable = False
    status_code = 502
    code = "upstream_error"

    def __init__(
        self,
        message: str,
        *,
        provider: str | None = None,
        route: str | None = None,
        attempt: int | None = None,
        request_id: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.provider = provider
        self.route = route
        self.attempt = attempt
        self.request_id = request_id


RETRYABLE_STATUSES = frozenset({408, 429, 500, 502, 503, 504, 529})


class UpstreamError(GatewayError):
    """The provider answered with an error status; ``body`` is its (bounded) error text."""

    def __init__(
        self,
        message: str,
        *,
        status: int,
        retry_after_s: float | None = None,
        body: str = "",
        **context: Any,
    ) -> None:
        super().__init__(message, **context)
        self.status = status
        self.retry_after_s = retry_after_s
        self.body = body
        self.retryable = status in RETRYABLE_STATUSES
        self.status_code = status if status in (400, 401, 403, 404, 413, 422, 429) else 502
        self.code = "rate_limited" if status == 429 else "upstream_error"


class UpstreamTimeout(GatewayError):
    retryable = True
    status_code = 504
    code = "upstream_timeout"

    def __init__(self, message: str, *, phase: str, **context: Any) -> None:
        super().__init__(message, **context)
        self.phase = phase  # connect | ttft | idle | total


class UpstreamUnavailable(GatewayError):
    retryable = True
    code = "upstream_unavailable"


class UpstreamProtocolError(GatewayError):
    retryable = True
    code = "upstream_protocol_error"


class StreamInterrupted(GatewayError):
    """After the first byte: never retried, always reported to the caller as an error event."""

    code = "stream_interrupted"


class NoHealthyRoute(GatewayError):
    status_code = 503
    code = "no_healthy_route"


class BulkheadFull(GatewayError):
    """``scope`` says which limit was hit: "tenant" (the caller's own) or "route"."""

    status_code = 429
    code = "concurrency_limit"

    def __init__(
        self, message: str, *, retry_after_s: float, scope: str = "tenant", **context: Any
    ) -> None:
        super().__init__(message, **context)
        self.retry_after_s = retry_after_s
        self.scope = scope


class RegionNotServed(GatewayError):
    """Every route of the alias is pinned to another region than the tenant's home."""

    status_code = 403
    code = "region_not_served"


class UnknownAlias(GatewayError):
    status_code = 404
    code = "model_not_found"


class ApiError(RagplaneError):
    """An error with an HTTP status and a stable, machine-readable code."""

    status_code = 500
    code = "internal_error"

    def __init__(
        self, message: str, *, code: str | None = None, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.headers = headers or {}


class BadRequest(ApiError):
    status_code = 400
    code = "invalid_request"


class Unauthorized(ApiError):
    status_code = 401
    code = "unauthorized"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message, code=code, headers={"WWW-Authenticate": "Bearer"})


class Forbidden(ApiError):
    status_code = 403
    code = "forbidden"


class NotFound(ApiError):
    status_code = 404
    code = "not_found"


class Conflict(ApiError):
    status_code = 409
    code = "conflict"


class LengthRequired(ApiError):
    status_code = 411
    code = "length_required"


class PayloadTooLarge(ApiError):
    status_code = 413
    code = "payload_too_large"


class UnsupportedMediaType(ApiError):
    status_code = 415
    code = "unsupported_media_type"
