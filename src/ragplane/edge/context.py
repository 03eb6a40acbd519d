"""Per-request values the edge establishes, read by every layer behind it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ragplane.config import Region
from ragplane.observe.tracecontext import TraceContext

__all__ = ["AuthMethod", "Principal", "RequestContext", "TenantContext"]

AuthMethod = Literal["jwt", "api_key", "dev"]


@dataclass(frozen=True)
class RequestContext:
    request_id: str
    trace: TraceContext


@dataclass(frozen=True)
class Principal:
    """Who the verified credentials say is calling."""

    tenant_id: str
    subject: str
    roles: tuple[str, ...]
    scopes: tuple[str, ...]
    method: AuthMethod


@dataclass(frozen=True)
class TenantContext:
    """The verified tenant of one request, with what the registry says about it."""

    tenant_id: str
    subject: str
    roles: tuple[str, ...]
    scopes: tuple[str, ...]
    region: Region
    data_class: str
    auth_method: AuthMethod
    request_id: str
    trace_id: str
