"""Data plane: the only package that opens database connections."""

from ragplane.data.db import Database, Session, TenantSession, validate_tenant_id
from ragplane.data.embedded import DatabaseUrls, EmbeddedPostgres

__all__ = [
    "Database",
    "DatabaseUrls",
    "EmbeddedPostgres",
    "Session",
    "TenantSession",
    "validate_tenant_id",
]
