"""Conversations: multi-turn chat sessions, scoped to the tenant by row-level security.

A session is created on a client's first ``/v1/chat`` without ``session_id`` (the
answer carries the new id) or when the client names an id the tenant does not have yet
(a UUID of its choosing). Another tenant's session id reads as an empty, new session of
this tenant's: under RLS the other tenant's rows do not exist, and the primary key
(tenant, id) keeps both apart.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from ragplane.data import Database
from ragplane.errors import BadRequest

__all__ = ["SessionStore", "Turn", "parse_session_id"]


@dataclass(frozen=True)
class Turn:
    role: str
    content: str


def parse_session_id(value: str) -> str:
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise BadRequest(
            f"session_id must be a UUID, got {value[:64]!r}", code="invalid_session_id"
        ) from None


class SessionStore:
    def __init__(self, db: Database, *, history_turns: int = 6) -> None:
        self._db = db
        self.history_turns = history_turns

    async def history(self, tenant_id: str, session_id: str) -> list[Turn]:
        """The session's last ``history_turns`` messages, oldest first."""
        rows = await self._db.tenant_fetch(
            tenant_id,
            "SELECT role, content FROM (SELECT id, role, content FROM chat_messages "
            "WHERE session_id = %s ORDER BY id DESC LIMIT %s) AS last ORDER BY id",
            (session_id, self.history_turns),
        )
        return [Turn(r["role"], r["content"]) for r in rows]

    async def append(
        self, tenant_id: str, session_id: str, namespace: str, subject: str, turns: list[Turn]
    ) -> None:
        """Record turns, creating the session on its first."""
        async with self._db.tenant(tenant_id) as s:
            await s.execute(
                "INSERT INTO chat_sessions (tenant_id, id, subject, namespace) "
                "VALUES (%s, %s, %s, %s) ON CONFLICT (tenant_id, id) DO UPDATE "
                "SET updated_at = now()",
                (tenant_id, session_id, subject, namespace),
            )
            cur = s.connection.cursor()
            await cur.executemany(
                "INSERT INTO chat_messages (tenant_id, session_id, role, content) "
                "VALUES (%s, %s, %s, %s)",
                [(tenant_id, session_id, t.role, t.content) for t in turns],
            )
