"""API keys: random secrets shown once, stored only as a SHA-256 hash.

A key looks like ``rpk_<id>_<secret>``. The id is public (it names the key in
listings and revocations); the whole string is hashed for lookup, so a leaked
database row does not reveal a usable key. Each key is bound to one tenant and
a set of scopes.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime

from ragplane.data import Session, validate_tenant_id

__all__ = [
    "KEY_PREFIX",
    "ApiKey",
    "create_api_key",
    "find_api_key",
    "list_api_keys",
    "revoke_api_key",
]

KEY_PREFIX = "rpk_"


@dataclass(frozen=True)
class ApiKey:
    id: str
    tenant_id: str
    name: str
    scopes: tuple[str, ...]
    created_at: datetime
    revoked_at: datetime | None

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None


def hash_key(plaintext: str) -> bytes:
    return hashlib.sha256(plaintext.encode()).digest()


async def create_api_key(
    session: Session, tenant_id: str, *, name: str = "", scopes: tuple[str, ...] = ()
) -> tuple[ApiKey, str]:
    """Create a key (owner session); returns the record and the plaintext, shown only now."""
    validate_tenant_id(tenant_id)
    key_id = secrets.token_hex(6)
    plaintext = f"{KEY_PREFIX}{key_id}_{secrets.token_urlsafe(32)}"
    row = await session.fetch_one(
        "INSERT INTO control.api_keys (id, tenant_id, key_hash, name, scopes) "
        "VALUES (%s, %s, %s, %s, %s) RETURNING id, tenant_id, name, scopes, created_at, revoked_at",
        (key_id, tenant_id, hash_key(plaintext), name, list(scopes)),
    )
    assert row is not None
    return ApiKey(**{**row, "scopes": tuple(row["scopes"])}), plaintext


async def find_api_key(session: Session, plaintext: str) -> ApiKey | None:
    row = await session.fetch_one(
        "SELECT id, tenant_id, name, scopes, created_at, revoked_at FROM control.api_keys "
        "WHERE key_hash = %s",
        (hash_key(plaintext),),
    )
    return None if row is None else ApiKey(**{**row, "scopes": tuple(row["scopes"])})


async def list_api_keys(session: Session, tenant_id: str) -> list[ApiKey]:
    rows = await session.fetch_all(
        "SELECT id, tenant_id, name, scopes, created_at, revoked_at FROM control.api_keys "
        "WHERE tenant_id = %s ORDER BY created_at",
        (tenant_id,),
    )
    return [ApiKey(**{**r, "scopes": tuple(r["scopes"])}) for r in rows]


async def revoke_api_key(session: Session, key_id: str) -> bool:
    """Revoke a key (owner session); False when no such unrevoked key exists."""
    n = await session.execute(
        "UPDATE control.api_keys SET revoked_at = now() WHERE id = %s AND revoked_at IS NULL",
        (key_id,),
    )
    return n > 0
