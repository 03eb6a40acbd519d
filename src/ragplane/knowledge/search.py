"""Hybrid retrieval: pgvector HNSW + Postgres full text, fused, under row-level security.

Hybrid search reads its candidates with two statements at once — the dense lists, and
the lexical list — each in a tenant unit of work of its own on its own pooled
connection, sent in one round trip (BEGIN, the tenant and the HNSW settings, the
statement, COMMIT: :meth:`Database.tenant_fetch`). The candidates come back with their
chunks' documents and ordinals, are fused here (array arithmetic), and a second round
trip reads the spans of the hits returned. Three candidate lists:

- ``dense``: the chunks nearest to the query (HNSW);
- ``first``: the documents' *first* chunks nearest to the query (a partial HNSW index
  on ordinal 0): a document's title and opening, which is how dense retrieval over
  whole documents sees it;
- ``lexical``: BM25 over the chunks, from the kept statistics and the postings of
  the query's terms (``kb_postings``, read by primary key: under row-level security
  an index on ``tsv`` cannot serve ``@@``, which is not leakproof).

Fusion, and its per-namespace defaults, are in :mod:`ragplane.knowledge.fusion`.

**Exact or HNSW.** The HNSW graph is shared by every tenant: filtered ANN relies on
pgvector's iterative index scans, so a tenant holding a small share of the rows still
gets its top-k, but such a walk visits about ``k / share`` index tuples, and Postgres's
cost estimate does not see that (at a million chunks it sent a 2% tenant to the index,
10-16x slower than reading that tenant's rows, and not exact). A chunk count alone
cannot decide either: pyfaq's 13,374 chunks alone in a table are 3-4x faster through
the index than read exactly. So the statement chooses, from the namespace's chunk count
``n`` (``kb_text_stats.chunks`` of the namespace and model, kept by the BM25 statistics
triggers) and the table's ``N`` (``pg_class.reltuples``): exact when reading ``n`` rows
costs less than visiting ``k * N / n`` index tuples at ``hnsw_visit_cost`` rows each
(``n^2 < hnsw_visit_cost * k * N``). Exact search reads the namespace's rows once and
scores both dense lists from them (docs/benchmarks.md, scale).

**The model.** A query is embedded with the model the namespace is answered with
(``kb_state.active_model``), which only a model switch changes (together with the
namespace's pin). Each search statement reads ``kb_state`` itself, so the model it
filters chunks on and the model it reports come from one snapshot (two statements that
saw different models search again; of two versions the older is reported): a search that
meets a swap that committed after the query was embedded embeds the query again with
the new model and searches once more (the retriever must have that model; if it has
not, :class:`~ragplane.errors.ModelMismatch`). Queries therefore keep working through
a switch: before the swap they see the old model's chunks, after it the new one's.
"""

from __future__ import annotations

import asyncio
import functools
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
from psycopg import sql

from ragplane.control.namespaces import NamespaceConfig
from ragplane.data import Database
from ragplane.errors import BadRequest, ModelMismatch
from ragplane.knowledge.fusion import FusionConfig, SearchMode, rank_candidates
from ragplane.knowledge.models import EmbedderRegistry
from ragplane.knowledge.types import Embedder

__all__ = [
    "HNSW_VISIT_COST",
    "Candidates",
    "ChunkHit",
    "DocumentHit",
    "Retriever",
    "SearchResult",
]

HNSW_VISIT_COST = 20.0
"""What one index tuple visited by a filtered HNSW walk costs, in rows read by an exact
search: a namespace of ``n`` chunks out of the table's ``N`` is searched exactly when
``n < visit_cost * k * N / n`` (``knowledge.hnsw_visit_cost``; docs/benchmarks.md, scale)."""


@dataclass(frozen=True)
class ChunkHit:
    chunk_id: str
    document_id: str
    source_uri: str
    title: str
    text: str
    ordinal: int
    heading_path: tuple[str, ...]
    char_start: int
    char_end: int
    metadata: dict[str, Any]
    score: float
    dense_score: float | None  # cosine similarity
    lexical_score: float | None  # BM25
    dense_rank: int | None
    lexical_rank: int | None


@dataclass(frozen=True)
class DocumentHit:
    """A document, scored by the fusion of its lists; ``best`` is its best chunk (whose
    span is what a citation quotes)."""

    document_id: str
    source_uri: str
    title: str
    score: float
    best: ChunkHit


@dataclass(frozen=True)
class SearchResult:
    query: str
    namespace: str
    mode: SearchMode
    kb_version: int
    embedding_model: str
    chunks: list[ChunkHit]
    documents: list[DocumentHit]
    timings_ms: dict[str, float] = field(default_factory=dict)


_HEAD = """
WITH state AS MATERIALIZED (
    SELECT kb_version, active_model FROM kb_state WHERE namespace = %(ns)s
), stats AS MATERIALIZED (
    SELECT chunks::float8 AS n, tsv_length_total::float8 / greatest(chunks, 1) AS avgdl
    FROM kb_text_stats WHERE namespace = %(ns)s AND embedding_model = %(model)s
)
"""
# the dense lists: nearest chunks, nearest first chunks (exact or HNSW)
_DENSE = """
, plan AS MATERIALIZED (
    -- a filtered HNSW walk visits about k / share index tuples (share: the namespace's
    -- chunks over the table's), an exact search reads the namespace's rows once; exact
    -- when that is cheaper, a visit costing visit_cost rows
    SELECT coalesce(stats.n, 0) ^ 2 < %(visit_cost)s * greatest(%(k_dense)s, %(k_first)s)
           * greatest(t.reltuples, coalesce(stats.n, 0)) AS exact
    FROM pg_class AS t LEFT JOIN stats ON true
    WHERE t.oid = 'chunks'::regclass
), exact AS MATERIALIZED (
    -- the namespace's rows read and scored once for both dense lists (a one-time
    -- filter: on the index path nothing is read here)
    SELECT c.id, c.document_id, c.ordinal,
           1 - (c.embedding::vector({dims}) <=> %(qv)s::vector({dims})) AS sim
    FROM chunks c
    WHERE (SELECT exact FROM plan) AND greatest(%(k_dense)s, %(k_first)s) > 0
      AND c.embedding_model = %(model)s AND c.namespace = %(ns)s {filter}
), dense AS MATERIALIZED (
    (SELECT * FROM exact ORDER BY sim DESC LIMIT %(k_dense)s)
    UNION ALL
    (SELECT c.id, c.document_id, c.ordinal,
            1 - (c.embedding::vector({dims}) <=> %(qv)s::vector({dims})) AS sim
     FROM chunks c
     WHERE NOT (SELECT exact FROM plan)
       AND c.embedding_model = %(model)s AND c.namespace = %(ns)s {filter}
     ORDER BY c.embedding::vector({dims}) <=> %(qv)s::vector({dims})
     LIMIT %(k_dense)s)
), first AS MATERIALIZED (
    (SELECT * FROM exact WHERE ordinal = 0 ORDER BY sim DESC LIMIT %(k_first)s)
    UNION ALL
    (SELECT c.id, c.document_id, c.ordinal,
            1 - (c.embedding::vector({dims}) <=> %(qv)s::vector({dims})) AS sim
     FROM chunks c
     WHERE NOT (SELECT exact FROM plan)
       AND c.embedding_model = %(model)s AND c.namespace = %(ns)s AND c.ordinal = 0 {filter}
     ORDER BY c.embedding::vector({dims}) <=> %(qv)s::vector({dims})
     LIMIT %(k_first)s)
)
"""
# the lexical list: BM25 from the postings of the query's terms
_LEXICAL = """
, terms AS MATERIALIZED (
    -- candidates come from the query's rarer terms (and always its two rarest);
    -- every term scores them
    SELECT t.lexeme, ln(1 + (stats.n - t.df + 0.5) / (t.df + 0.5)) AS idf,
           t.df <= greatest(%(max_df)s * stats.n, 100)
           OR row_number() OVER (ORDER BY t.df, t.lexeme) <= 2 AS probe
    FROM (SELECT DISTINCT lexeme FROM unnest(to_tsvector('english', %(q)s))) AS ql
    JOIN kb_terms t ON t.lexeme = ql.lexeme
    CROSS JOIN stats
    WHERE %(k_lexical)s > 0 AND t.namespace = %(ns)s AND t.embedding_model = %(model)s
), scored AS MATERIALIZED (
    -- the postings of the query's terms, by primary key (an index-only scan)
    SELECT p.chunk_id AS id, sum(
        terms.idf * p.tf * (%(k1)s + 1)
        / (p.tf + %(k1)s * (1 - %(b)s + %(b)s * p.dl / stats.avgdl))
    ) AS lex
    FROM terms JOIN kb_postings p ON p.lexeme = terms.lexeme, stats
    WHERE p.namespace = %(ns)s AND p.embedding_model = %(model)s
    GROUP BY p.chunk_id
    HAVING bool_or(terms.probe)
), lexical AS MATERIALIZED (
    SELECT top.id, c.document_id, c.ordinal, top.lex
    FROM (
        SELECT scored.id, scored.lex FROM scored {lexical_filter}
        ORDER BY scored.lex DESC
        LIMIT %(k_lexical)s
    ) AS top
    -- one primary-key probe per candidate (a fence: never a scan of the namespace)
    CROSS JOIN LATERAL (
        SELECT c.document_id, c.ordinal FROM chunks c WHERE c.id = top.id OFFSET 0
    ) AS c
)
"""
# one row even without hits: the namespace's state, read in this statement's snapshot;
# candidates are light (their spans are read for the hits that are returned)
_ROWS = """
SELECT state.kb_version AS state_version, state.active_model AS state_model, hit.*
FROM (SELECT 1) AS one
LEFT JOIN state ON true
LEFT JOIN ({hits}) AS hit ON true
"""
_HITS = {
    "both": """
    SELECT coalesce(d.id, f.id, l.id)::text AS id,
           coalesce(d.document_id, f.document_id, l.document_id)::text AS document_id,
           coalesce(d.ordinal, f.ordinal, l.ordinal) AS ordinal,
           d.sim, f.sim AS first_sim, l.lex
    FROM dense AS d
    FULL JOIN first AS f ON f.id = d.id
    FULL JOIN lexical AS l ON l.id = coalesce(d.id, f.id)
""",
    "dense": """
    SELECT coalesce(d.id, f.id)::text AS id,
           coalesce(d.document_id, f.document_id)::text AS document_id,
           coalesce(d.ordinal, f.ordinal) AS ordinal,
           d.sim, f.sim AS first_sim, NULL::float8 AS lex
    FROM dense AS d
    FULL JOIN first AS f ON f.id = d.id
""",
    "lexical": """
    SELECT l.id::text, l.document_id::text, l.ordinal,
           NULL::float8 AS sim, NULL::float8 AS first_sim, l.lex
    FROM lexical AS l
""",
}
_STATEMENTS = {
    "both": _HEAD + _DENSE + _LEXICAL + _ROWS.replace("{hits}", _HITS["both"]),
    "dense": _HEAD + _DENSE + _ROWS.replace("{hits}", _HITS["dense"]),
    "lexical": _HEAD + _LEXICAL + _ROWS.replace("{hits}", _HITS["lexical"]),
}

_SPANS = """
SELECT c.id, d.source_uri, d.title, c.text, c.heading_path, c.char_start, c.char_end,
       c.metadata
FROM chunks c
JOIN documents d ON d.tenant_id = c.tenant_id AND d.id = c.document_id
WHERE c.id = ANY(%s::uuid[])
"""


class Retriever:
    """Searches namespaces; ``embedder`` is one embedder or a registry of them (a query is
    embedded with the model its namespace is answered with).

    ``hnsw_visit_cost`` decides exact search against the index (module docstring; 0:
    always the index); ``concurrent`` runs hybrid search's dense and lexical statements
    at once, on two pooled connections (else one statement reads all three lists).
    """

    def __init__(
        self,
        db: Database,
        embedder: Embedder | EmbedderRegistry,
        *,
        ef_search: int = 100,
        max_scan_tuples: int = 20000,
        hnsw_visit_cost: float = HNSW_VISIT_COST,
        concurrent: bool = True,
    ) -> None:
        self._db = db
        self._embedders = EmbedderRegistry.of(embedder)
        self.hnsw_visit_cost = hnsw_visit_cost
        self.concurrent = concurrent
        self._settings = {
            "hnsw.ef_search": str(ef_search),
            "hnsw.iterative_scan": "relaxed_order",
            "hnsw.max_scan_tuples": str(max_scan_tuples),
            # a generic plan of a prepared search statement reads the whole namespace
            # (4-7x slower on pyfaq): always plan for the parameters
            "plan_cache_mode": "force_custom_plan",
        }

    async def embed_query(self, query: str, model: str | None = None) -> npt.NDArray[np.float32]:
        """``query`` embedded with ``model`` (default: the registry's default model)."""
        embedder = self._embedders.default if model is None else self._embedders.find(model)
        if embedder is None:
            raise ModelMismatch(
                f"this retriever embeds queries with {self._embedders.describe()}, not {model!r}"
            )
        vectors = await embedder.embed([query])
        vector: npt.NDArray[np.float32] = vectors[0]
        return vector

    async def candidates(
        self,
        config: NamespaceConfig,
        query: str,
        *,
        k: int,
        filters: Mapping[str, Any] | None = None,
        mode: SearchMode = "hybrid",
        query_vector: npt.NDArray[np.float32] | None = None,
        fusion: FusionConfig | None = None,
    ) -> Candidates:
        """Up to ``k`` dense and ``k`` lexical (BM25) candidate chunks, unfused."""
        fusion = fusion or FusionConfig.from_mapping(config.retrieval)
        if not query.strip():
            raise BadRequest("the query is empty", code="empty_query")
        model = config.embedding_model
        embedder = self._embedders.find(model)
        if embedder is None:
            raise ModelMismatch(
                f"namespace {config.name!r} is pinned to {model!r}; "
                f"this retriever embeds queries with {self._embedders.describe()}"
            )
        timings: dict[str, float] = {"embed": 0.0, "retrieve": 0.0}
        for _ in range(3):  # a swap mid-query costs one more round; two swaps, a third
            vector = query_vector
            t0 = time.perf_counter()
            if vector is None and mode != "lexical":
                vector = (await embedder.embed([query]))[0]
            timings["embed"] += (time.perf_counter() - t0) * 1000
            t1 = time.perf_counter()
            rows = await self._fetch(config, query, embedder, vector, k, filters, mode, fusion)
            timings["retrieve"] += (time.perf_counter() - t1) * 1000
            if rows is None:  # a switch committed between the two statements: again
                continue
            active = rows[0]["state_model"]
            if active is None or active == embedder.model_id:
                hits = [r for r in rows if r["id"] is not None]
                version = int(rows[0]["state_version"] or 0)
                return Candidates(hits, version, timings, embedder.model_id)
            switched = self._embedders.find(active)
            if switched is None or switched is embedder or query_vector is not None:
                raise ModelMismatch(
                    f"namespace {config.name!r} is answered with {active!r}, not "
                    f"{embedder.model_id!r}"
                    + (": embed the query with that model" if query_vector is not None else "")
                )
            # the namespace switched models: embed the query with the active one
            embedder = switched
        raise ModelMismatch(f"namespace {config.name!r} kept switching models during a query")

    async def _fetch(
        self,
        config: NamespaceConfig,
        query: str,
        embedder: Embedder,
        query_vector: npt.NDArray[np.float32] | None,
        k: int,
        filters: Mapping[str, Any] | None,
        mode: SearchMode,
        fusion: FusionConfig,
    ) -> list[dict[str, Any]] | None:
        """The candidates: the state row (``state_model``, ``state_version``) on every row,
        hits where ``id`` is set (one row with ``id`` None when none). Hybrid search runs
        its dense and lexical statements at once, each in a unit of work of its own (None:
        they saw different models, a switch committed between them)."""
        params: dict[str, Any] = {
            "qv": query_vector if query_vector is not None else _zero(embedder),
            "model": embedder.model_id,
            "ns": config.name,
            "k_dense": k if mode != "lexical" else 0,
            "k_first": k if mode == "hybrid" and fusion.first_weight else 0,
            "k_lexical": k if mode != "dense" else 0,
            "q": query,
            "k1": fusion.bm25_k1,
            "b": fusion.bm25_b,
            "max_df": fusion.max_df,
            "filters": _json(filters),
            "visit_cost": self.hnsw_visit_cost,
        }
        run = functools.partial(self._run, config, embedder, filters, params)
        if mode != "hybrid":
            return await run(mode)
        if not self.concurrent:
            return await run("both")
        dense, lexical = await asyncio.gather(run("dense"), run("lexical"))
        return _merge(dense, lexical)

    async def _run(
        self,
        config: NamespaceConfig,
        embedder: Embedder,
        filters: Mapping[str, Any] | None,
        params: dict[str, Any],
        which: str,
    ) -> list[dict[str, Any]]:
        statement = sql.SQL(_STATEMENTS[which]).format(
            dims=sql.Literal(embedder.dimensions),
            filter=sql.SQL("AND c.metadata @> %(filters)s::jsonb" if filters else ""),
            lexical_filter=sql.SQL(
                "JOIN chunks c ON c.id = scored.id WHERE c.metadata @> %(filters)s::jsonb"
                if filters
                else ""
            ),
        )
        rows = await self._db.tenant_fetch(
            config.tenant_id, statement, params, settings=self._settings
        )
        return [dict(r) for r in rows]

    async def search(
        self,
        config: NamespaceConfig,
        query: str,
        *,
        top_k: int = 10,
        filters: Mapping[str, Any] | None = None,
        mode: SearchMode = "hybrid",
        fusion: FusionConfig | None = None,
        query_vector: npt.NDArray[np.float32] | None = None,
    ) -> SearchResult:
        """The top ``top_k`` chunks and documents of one namespace for ``query``."""
        if not 1 <= top_k <= 100:
            raise BadRequest("top_k must be between 1 and 100", code="invalid_top_k")
        fusion = fusion or FusionConfig.from_mapping(config.retrieval)
        found = await self.candidates(
            config,
            query,
            k=max(fusion.candidates, top_k * 5),
            filters=filters,
            mode=mode,
            query_vector=query_vector,
            fusion=fusion,
        )
        return await self.rank(config, query, found, fusion=fusion, mode=mode, top_k=top_k)

    async def rank(
        self,
        config: NamespaceConfig,
        query: str,
        found: Candidates,
        *,
        fusion: FusionConfig,
        mode: SearchMode,
        top_k: int,
    ) -> SearchResult:
        """Fuse candidates (:func:`rank_candidates`), then read the spans of the chunks
        returned (a hit whose chunk was deleted meanwhile is left out)."""
        chunks, documents = rank_candidates(found.rows, fusion, mode, top_k)
        wanted = {str(r["id"]) for _, r, _, _ in chunks} | {str(b["id"]) for _, _, b in documents}
        t0 = time.perf_counter()
        spans = {
            str(r["id"]): dict(r)
            for r in await self._db.tenant_fetch(config.tenant_id, _SPANS, (sorted(wanted),))
        }
        timings = dict(found.timings_ms)
        timings["spans"] = (time.perf_counter() - t0) * 1000
        chunk_hits = [
            _hit(score, r | spans[str(r["id"])], dr, lr)
            for score, r, dr, lr in chunks
            if str(r["id"]) in spans
        ]
        by_id = {h.chunk_id: h for h in chunk_hits}
        document_hits = []
        for doc, score, best in documents:
            if str(best["id"]) not in spans:
                continue
            hit = by_id.get(str(best["id"])) or _hit(score, best | spans[str(best["id"])])
            document_hits.append(DocumentHit(doc, hit.source_uri, hit.title, score, hit))
        return SearchResult(
            query=query,
            namespace=config.name,
            mode=mode,
            kb_version=found.kb_version,
            embedding_model=found.embedding_model,
            chunks=chunk_hits,
            documents=document_hits,
            timings_ms=timings,
        )


def _merge(
    dense: list[dict[str, Any]], lexical: list[dict[str, Any]]
) -> list[dict[str, Any]] | None:
    """One candidate list from the dense and the lexical statements' rows (None: they saw
    different models); the older of the two versions they saw."""
    if dense[0]["state_model"] != lexical[0]["state_model"]:
        return None
    version = min(dense[0]["state_version"] or 0, lexical[0]["state_version"] or 0)
    by_id = {r["id"]: r for r in dense if r["id"] is not None}
    for r in lexical:
        if r["id"] is None:
            continue
        if r["id"] in by_id:
            by_id[r["id"]]["lex"] = r["lex"]
        else:
            by_id[r["id"]] = r
    state = {"state_model": dense[0]["state_model"], "state_version": version}
    return [r | state for r in by_id.values()] or [state | dict.fromkeys(_HIT_COLUMNS)]


_HIT_COLUMNS = ("id", "document_id", "ordinal", "sim", "first_sim", "lex")


@dataclass(frozen=True)
class Candidates:
    rows: list[dict[str, Any]]
    kb_version: int
    timings_ms: dict[str, float]
    embedding_model: str = ""  # the model the chunks (and the query) were embedded with


def _zero(embedder: Embedder) -> npt.NDArray[np.float32]:
    return np.zeros(embedder.dimensions, dtype=np.float32)


def _hit(score: float, r: dict[str, Any], dr: int | None = None, lr: int | None = None) -> ChunkHit:
    return ChunkHit(
        chunk_id=str(r["id"]),
        document_id=str(r["document_id"]),
        source_uri=r["source_uri"],
        title=r["title"],
        text=r["text"],
        ordinal=r["ordinal"],
        heading_path=tuple(r["heading_path"]),
        char_start=r["char_start"],
        char_end=r["char_end"],
        metadata=dict(r["metadata"]),
        score=score,
        dense_score=float(r["sim"]) if r["sim"] is not None else None,
        lexical_score=float(r["lex"]) if r["lex"] is not None else None,
        dense_rank=dr,
        lexical_rank=lr,
    )


def _json(values: Mapping[str, Any] | None) -> str | None:
    return json.dumps(dict(values)) if values else None
