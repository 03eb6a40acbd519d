"""The semantic cache (lifecycle steps 3 and 9): answers in Postgres + pgvector, under
row-level security, reused only where they are the same answer.

**Key.** An entry belongs to a tenant (RLS: another tenant's reads return nothing) and a
*scope* — a hash of the model alias, the namespace, the prompt version and the filters —
and records the namespace's ``kb_version`` and embedding model when it was written. A
look-up compares those two with ``kb_state`` in the same statement, so a knowledge-base
change or a model switch makes earlier answers unreachable at once, without a purge.

**Look-up.** One statement returns the entry whose normalised query hashes to the same
``query_key`` (the exact path: no embedding needed), then :meth:`SemanticCache.lookup`
asks for the nearest entries of the scope by cosine (an exact scan of the scope's rows,
ordered by distance; a scope holds a tenant's questions about one namespace). A near
entry is served only if

1. the cache policy (:mod:`ragplane.service.cache_policy`) accepts the pair of queries —
   it refuses the traps plain cosine falls into (negations, changed numbers, dates,
   entities, swapped order, scope changes), and
2. its evidence still fits the new query: the new query's cosine to the nearest chunk
   the cached answer cites (read in the same statement) is at most ``evidence_margin``
   below what the cached query's was. A question that drifted to another part of the
   knowledge base no longer lands on the passages the answer quotes.

**Write-back** stores only answers that passed the output guard and cite at least one
chunk (an unsupported answer is not worth repeating), with a TTL; a second answer to the
same normalised query replaces the first.

**Offline mode** (every provider down, or inference switched off) looks up with
``offline_similarity`` as the policy's cosine threshold for rewordings — the refusals of
traps stay — and without the evidence check; the service marks such answers
``offline`` and shows a banner.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson

from ragplane.data import Database
from ragplane.service.cache_policy import CachePolicy

__all__ = ["CacheHit", "CacheScope", "SemanticCache"]


@dataclass(frozen=True)
class CacheScope:
    model_alias: str
    namespace: str
    prompt_version: str
    filters: Mapping[str, Any] | None = None

    def key(self) -> str:
        raw = orjson.dumps(
            [self.model_alias, self.namespace, self.prompt_version, self.filters or {}],
            option=orjson.OPT_SORT_KEYS,
        )
        return hashlib.sha256(raw).hexdigest()[:32]


@dataclass(frozen=True)
class CacheHit:
    entry_id: str
    query: str
    answer: str
    citations: list[dict[str, Any]]
    usage: dict[str, Any]
    similarity: float
    reason: str  # the policy's: "exact", "near_repeat", "paraphrase", ...


_EXACT = """
SELECT e.id, e.query, e.answer, e.citations, e.usage
FROM semantic_cache e JOIN kb_state s ON s.namespace = e.namespace
WHERE e.scope = %(scope)s AND e.query_key = %(key)s AND e.expires_at > now()
  AND e.kb_version = s.kb_version AND e.embedding_model = s.active_model
"""

_NEAR = """
SELECT e.id, e.query, e.answer, e.citations, e.usage, e.evidence_similarity,
       1 - (e.embedding <=> %(qv)s) AS similarity,
       (SELECT max(1 - (c.embedding <=> %(qv)s)) FROM chunks c
        WHERE c.id = ANY (e.evidence) AND c.embedding_model = e.embedding_model) AS evidence_now
FROM semantic_cache e JOIN kb_state s ON s.namespace = e.namespace
WHERE e.scope = %(scope)s AND e.expires_at > now()
  AND e.kb_version = s.kb_version AND e.embedding_model = s.active_model
  AND e.embedding_model = %(model)s
ORDER BY e.embedding <=> %(qv)s
LIMIT %(n)s
"""

_STORE = """
INSERT INTO semantic_cache (tenant_id, scope, query_key, query, embedding_model, embedding,
    answer, citations, evidence, evidence_similarity, model_alias, namespace, kb_version, usage,
    expires_at)
VALUES (%(tenant)s, %(scope)s, %(key)s, %(query)s, %(model)s, %(qv)s, %(answer)s,
    %(citations)s::jsonb, %(evidence)s::uuid[],
    coalesce((SELECT max(1 - (c.embedding <=> %(qv)s)) FROM chunks c
              WHERE c.id = ANY (%(evidence)s::uuid[]) AND c.embedding_model = %(model)s), 0),
    %(alias)s, %(ns)s, %(kb_version)s, %(usage)s::jsonb, now() + %(ttl)s)
ON CONFLICT (tenant_id, scope, query_key) DO UPDATE SET
    query = EXCLUDED.query, embedding = EXCLUDED.embedding, answer = EXCLUDED.answer,
    citations = EXCLUDED.citations, evidence = EXCLUDED.evidence,
    evidence_similarity = EXCLUDED.evidence_similarity, kb_version = EXCLUDED.kb_version,
    embedding_model = EXCLUDED.embedding_model, usage = EXCLUDED.usage,
    created_at = now(), expires_at = EXCLUDED.expires_at
RETURNING id
"""


class SemanticCache:
    def __init__(
        self,
        db: Database,
        policy: CachePolicy,
        *,
        ttl_s: float = 86400.0,
        candidates: int = 3,
        evidence_margin: float = 0.05,
        offline_similarity: float = 0.80,
    ) -> None:
        self._db = db
        self.policy = policy
        # offline: a lower cosine for rewordings, the same refusals of traps
        self.offline_policy = CachePolicy(
            min_similarity=min(policy.min_similarity, offline_similarity),
            paraphrase_similarity=offline_similarity,
        )
        self._ttl = timedelta(seconds=ttl_s)
        self._candidates = candidates
        self._evidence_margin = evidence_margin

    def query_key(self, query: str) -> str:
        return hashlib.sha256(self.policy.normalise(query).encode()).hexdigest()

    async def exact(self, tenant_id: str, scope: CacheScope, query: str) -> CacheHit | None:
        """The entry for the same normalised query (no embedding needed)."""
        rows = await self._db.tenant_fetch(
            tenant_id, _EXACT, {"scope": scope.key(), "key": self.query_key(query)}
        )
        if not rows:
            return None
        r = rows[0]
        return CacheHit(
            str(r["id"]), r["query"], r["answer"], r["citations"], r["usage"], 1.0, "exact"
        )

    async def near(
        self,
        tenant_id: str,
        scope: CacheScope,
        query: str,
        vector: npt.NDArray[np.float32],
        embedding_model: str,
        *,
        offline: bool = False,
    ) -> tuple[CacheHit | None, str]:
        """The nearest entry the policy and its evidence accept, and why (or why not)."""
        rows = await self._db.tenant_fetch(
            tenant_id,
            _NEAR,
            {"scope": scope.key(), "qv": vector, "model": embedding_model, "n": self._candidates},
        )
        reason = "empty"
        for r in rows:
            similarity = float(r["similarity"])
            verdict = (self.offline_policy if offline else self.policy).verify(
                query, r["query"], similarity
            )
            if not verdict.hit:
                reason = verdict.reason
                continue
            evidence_now = r["evidence_now"]
            if not offline and (
                evidence_now is None
                or float(evidence_now) < float(r["evidence_similarity"]) - self._evidence_margin
            ):
                reason = "evidence_drift"  # offline: the answer is all there is
                continue
            verdict_reason = verdict.reason
            return (
                CacheHit(
                    str(r["id"]),
                    r["query"],
                    r["answer"],
                    r["citations"],
                    r["usage"],
                    similarity,
                    verdict_reason,
                ),
                verdict_reason,
            )
        return None, reason

    async def store(
        self,
        tenant_id: str,
        scope: CacheScope,
        *,
        query: str,
        vector: npt.NDArray[np.float32],
        embedding_model: str,
        kb_version: int,
        answer: str,
        citations: Sequence[Mapping[str, Any]],
        usage: Mapping[str, Any],
    ) -> None:
        evidence = sorted({str(c["chunk_id"]) for c in citations})
        await self._db.tenant_fetch(
            tenant_id,
            _STORE,
            {
                "tenant": tenant_id,
                "scope": scope.key(),
                "key": self.query_key(query),
                "query": query,
                "model": embedding_model,
                "qv": vector,
                "answer": answer,
                "citations": orjson.dumps(list(citations)).decode(),
                "evidence": evidence,
                "alias": scope.model_alias,
                "ns": scope.namespace,
                "kb_version": kb_version,
                "usage": orjson.dumps(dict(usage)).decode(),
                "ttl": self._ttl,
            },
        )
