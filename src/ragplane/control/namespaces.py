"""Knowledge-base namespaces: configuration in the control plane.

A namespace belongs to one tenant and pins an embedding model, a chunking
policy and (optionally) retrieval fusion settings. Reads run on any session;
creation and changes run on the owner's (admin commands).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from ragplane.control.changes import ControlChanges, PushedCache
from ragplane.data import Database, Session, validate_tenant_id
from ragplane.errors import KnowledgeError
from ragplane.knowledge.types import ChunkingPolicy

__all__ = [
    "NamespaceConfig",
    "NamespaceNotFound",
    "NamespaceRegistry",
    "get_namespace",
    "upsert_namespace",
]


class NamespaceNotFound(KnowledgeError):
    def __init__(self, tenant_id: str, namespace: str) -> None:
        super().__init__(f"tenant {tenant_id!r} has no knowledge-base namespace {namespace!r}")
        self.tenant_id = tenant_id
        self.namespace = namespace


@dataclass(frozen=True)
class NamespaceConfig:
    tenant_id: str
    name: str
    embedding_model: str
    chunking: ChunkingPolicy
    retrieval: dict[str, Any] = field(default_factory=dict)


_SELECT = (
    "SELECT tenant_id, name, embedding_model, chunk_max_tokens, chunk_overlap_tokens, "
    "retrieval FROM control.kb_namespaces WHERE tenant_id = %s AND name = %s"
)


async def get_namespace(session: Session, tenant_id: str, namespace: str) -> NamespaceConfig:
    row = await session.fetch_one(_SELECT, (tenant_id, namespace))
    return _config(row, tenant_id, namespace)


def _config(row: dict[str, Any] | None, tenant_id: str, namespace: str) -> NamespaceConfig:
    if row is None:
        raise NamespaceNotFound(tenant_id, namespace)
    return NamespaceConfig(
        tenant_id=row["tenant_id"],
        name=row["name"],
        embedding_model=row["embedding_model"],
        chunking=ChunkingPolicy(row["chunk_max_tokens"], row["chunk_overlap_tokens"]),
        retrieval=dict(row["retrieval"]),
    )


async def upsert_namespace(
    session: Session,
    tenant_id: str,
    namespace: str,
    *,
    embedding_model: str,
    chunking: ChunkingPolicy | None = None,
    retrieval: dict[str, Any] | None = None,
) -> NamespaceConfig:
    """Create or reconfigure a namespace (owner session)."""
    validate_tenant_id(tenant_id)
    policy = chunking or ChunkingPolicy()
    await session.execute(
        "INSERT INTO control.kb_namespaces (tenant_id, name, embedding_model, chunk_max_tokens, "
        "chunk_overlap_tokens, retrieval) VALUES (%s, %s, %s, %s, %s, %s::jsonb) "
        "ON CONFLICT (tenant_id, name) DO UPDATE SET embedding_model = EXCLUDED.embedding_model, "
        "chunk_max_tokens = EXCLUDED.chunk_max_tokens, "
        "chunk_overlap_tokens = EXCLUDED.chunk_overlap_tokens, retrieval = EXCLUDED.retrieval",
        (
            tenant_id,
            namespace,
            embedding_model,
            policy.max_tokens,
            policy.overlap_tokens,
            json.dumps(retrieval or {}),
        ),
    )
    return await get_namespace(session, tenant_id, namespace)


class NamespaceRegistry(PushedCache[tuple[str, str], NamespaceConfig]):
    """Read-through cache of namespace configurations for the request path (``/v1/chat``),
    keyed by (tenant, namespace): a pushed change to a tenant's namespaces forgets them
    (:class:`~ragplane.control.changes.PushedCache`)."""

    def __init__(
        self,
        db: Database,
        *,
        ttl_s: float = 5.0,
        changes: ControlChanges | None = None,
        listening_ttl_s: float = 300.0,
    ) -> None:
        async def load(key: tuple[str, str]) -> NamespaceConfig:
            rows = await db.control_fetch(_SELECT, key)
            return _config(rows[0] if rows else None, *key)

        super().__init__(
            load, _tenant, ttl_s=ttl_s, changes=changes, listening_ttl_s=listening_ttl_s
        )


def _tenant(key: tuple[str, str]) -> str:
    return key[0]
