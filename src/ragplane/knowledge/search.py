"""Hybrid retrieval: pgvector HNSW + Postgres full text, fused, under row-level security.

One unit of work per query (one round trip opens it with the tenant and the
HNSW settings): the candidate lists come back with their chunks and documents in
one statement, then they are fused here. Three candidate lists:

- ``dense``: the chunks nearest to the query (HNSW);
- ``first``: the documents' *first* chunks nearest to the query (the same index,
  filtered to ordinal 0): a document's title and opening, which is how dense
  retrieval over whole documents sees it;
- ``lexical``: BM25 over the chunks, from the kept statistics and the postings of
  the query's terms (``kb_postings``, read by primary key: under row-level security
  an index on ``tsv`` cannot serve ``@@``, which is not leakproof).

Fusion is chosen by evaluation (``ragplane bench retrieval``), not by habit, and
ranks *documents*: each list is aggregated per document (its best chunk), then

- ``blend``: ``w_f * first' + w_d * dense' + w_l * lexical'``, each score normalised
  over its own candidate list (distribution-based: mean ± 3 standard deviations →
  [0, 1]; or min-max), absent → 0;
- ``rrf``: weighted reciprocal rank fusion of the per-document ranks,
  ``sum(w / (k + rank))``.

A document's citation span is its best chunk by the chunk-level blend of the dense
and lexical scores. Ranking a document by its best chunk alone favours long
documents (more chunks, more chances of one close match); the first-chunk list is
what balances that on pyfaq (docs/benchmarks.md).

Each namespace may override the defaults (``control.kb_namespaces.retrieval``).
Filtered ANN relies on pgvector's iterative index scans, so a tenant holding a
small share of the rows still gets its top-k.

**The model.** A query is embedded with the model the namespace is answered with
(``kb_state.active_model``), which only a model switch changes (together with the
namespace's pin). The search statement reads ``kb_state`` itself, so the model it
filters chunks on and the model it reports come from one snapshot: a search that
meets a swap that committed after the query was embedded embeds the query again with
the new model and searches once more (the retriever must have that model; if it has
not, :class:`~ragplane.errors.ModelMismatch`). Queries therefore keep working through
a switch: before the swap they see the old model's chunks, after it the new one's.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from psycopg import sql

from ragplane.control.namespaces import NamespaceConfig
from ragplane.data import Database
from ragplane.errors import BadRequest, ModelMismatch
from ragplane.knowledge.models import EmbedderRegistry
from ragplane.knowledge.types import Embedder

__all__ = [
    "Candidates",
    "ChunkHit",
    "DocumentHit",
    "FusionConfig",
    "Retriever",
    "SearchMode",
    "SearchResult",
    "fuse",
    "rank_candidates",
    "rank_documents",
]

SearchMode = Literal["hybrid", "dense", "lexical"]


@dataclass(frozen=True)
class FusionConfig:
    method: Literal["rrf", "blend"] = "blend"
    dense_weight: float = 0.2  # nearest chunks, best per document
    lexical_weight: float = 0.3  # BM25 chunks, best per document
    first_weight: float = 0.5  # nearest first chunks (0: the list is not searched)
    rrf_k: int = 60
    candidates: int = 300  # per list, before fusion
    normalization: Literal["dbsf", "minmax"] = "dbsf"  # how blend puts scores on one scale
    lead_bonus: float = 0.0  # added to first chunks in the chunk-level blend (citations)
    bm25_k1: float = 1.2
    bm25_b: float = 0.75
    max_df: float = 0.1  # terms in more chunks than this share do not select candidates

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> FusionConfig:
        known = set(cls.__dataclass_fields__)
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown retrieval settings: {sorted(unknown)}")
        return replace(cls(), **values)


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


Scored = tuple[float, dict[str, Any], int | None, int | None]
"""(fused score, candidate row, dense rank, lexical rank)."""


def _normaliser(values: list[float], how: str) -> Callable[[float], float]:
    """Map one retriever's scores onto a common scale for blending."""
    if not values:
        return lambda v: 0.0
    if how == "dbsf":
        # distribution-based: mean ± 3 standard deviations span [0, 1] (numpy: the
        # statistics module's exact pstdev costs milliseconds on a query's lists)
        array = np.asarray(values, dtype=np.float64)
        mean, sd = float(array.mean()), float(array.std()) or 1.0
        lo, span = mean - 3 * sd, 6 * sd
    else:
        lo, span = min(values), (max(values) - min(values)) or 1.0
    return lambda v: (v - lo) / span


def fuse(rows: list[dict[str, Any]], config: FusionConfig, mode: SearchMode) -> list[Scored]:
    """(fused score, row, dense rank, lexical rank) for every candidate, best first.

    ``dense`` and ``lexical`` modes rank by that retriever's score alone; ``hybrid``
    fuses both and adds ``lead_bonus`` to a document's first chunk (its title and
    opening: a position prior), in units of the normalised scale.
    """
    dense = sorted((r for r in rows if r["sim"] is not None), key=lambda r: -r["sim"])
    lexical = sorted((r for r in rows if r["lex"] is not None), key=lambda r: -r["lex"])
    d_rank = {r["id"]: i + 1 for i, r in enumerate(dense)}
    l_rank = {r["id"]: i + 1 for i, r in enumerate(lexical)}
    scored = []
    if mode != "hybrid":
        ranks = d_rank if mode == "dense" else l_rank
        for r in dense if mode == "dense" else lexical:
            rank = ranks[r["id"]]
            score = r["sim"] if mode == "dense" else r["lex"]
            scored.append(
                (
                    float(score),
                    r,
                    rank if mode == "dense" else None,
                    rank if mode == "lexical" else None,
                )
            )
        return scored
    wd, wl = config.dense_weight, config.lexical_weight
    nd = _normaliser([r["sim"] for r in dense], config.normalization)
    nl = _normaliser([r["lex"] for r in lexical], config.normalization)
    for r in rows:
        dr, lr = d_rank.get(r["id"]), l_rank.get(r["id"])
        if config.method == "rrf":
            score = (wd / (config.rrf_k + dr) if dr else 0.0) + (
                wl / (config.rrf_k + lr) if lr else 0.0
            )
        else:
            score = (wd * nd(r["sim"]) if dr else 0.0) + (wl * nl(r["lex"]) if lr else 0.0)
            if r["ordinal"] == 0:
                score += config.lead_bonus
        scored.append((score, r, dr, lr))
    scored.sort(key=lambda t: (-t[0], str(t[1]["id"])))
    return scored


_LISTS = (("first_sim", "first_weight"), ("sim", "dense_weight"), ("lex", "lexical_weight"))


def rank_documents(rows: list[dict[str, Any]], config: FusionConfig) -> dict[str, float]:
    """Hybrid document scores: each list (``first_sim``, ``sim``, ``lex`` of the rows)
    aggregated per document (its best chunk in that list), then blended or RRF-fused."""
    scores: dict[str, float] = {}
    for column, weight_name in _LISTS:
        weight = float(getattr(config, weight_name))
        values = [r for r in rows if r[column] is not None]
        if not weight or not values:
            continue
        normalise = _normaliser([r[column] for r in values], config.normalization)
        best: dict[str, float] = {}
        for r in values:
            doc = str(r["document_id"])
            best[doc] = max(best.get(doc, -np.inf), float(r[column]))
        ordered = sorted(best, key=lambda d: -best[d])
        for rank, doc in enumerate(ordered, start=1):
            if config.method == "rrf":
                part = weight / (config.rrf_k + rank)
            else:
                part = weight * normalise(best[doc])
            scores[doc] = scores.get(doc, 0.0) + part
    return scores


def rank_candidates(
    rows: list[dict[str, Any]], config: FusionConfig, mode: SearchMode
) -> tuple[list[Scored], list[tuple[str, float, dict[str, Any]]]]:
    """Chunks, best first (:func:`fuse`), and documents as (document id, score, best
    chunk's row), best first: in ``hybrid`` mode scored by :func:`rank_documents`, else by
    their best chunk."""
    chunks = fuse(rows, config, mode)
    best: dict[str, tuple[float, dict[str, Any]]] = {}
    for score, r, _, _ in chunks:
        best.setdefault(str(r["document_id"]), (score, r))
    if mode == "hybrid":
        doc_scores = rank_documents(rows, config)
        best = {d: (doc_scores.get(d, 0.0), r) for d, (_, r) in best.items()}
    documents = sorted(
        ((d, score, r) for d, (score, r) in best.items()), key=lambda t: (-t[1], t[0])
    )
    return chunks, documents


_SEARCH = """
WITH dense AS MATERIALIZED (
    SELECT c.id, 1 - (c.embedding::vector({dims}) <=> %(qv)s::vector({dims})) AS sim
    FROM chunks c
    WHERE c.embedding_model = %(model)s AND c.namespace = %(ns)s {filter}
    ORDER BY c.embedding::vector({dims}) <=> %(qv)s::vector({dims})
    LIMIT %(k_dense)s
), first AS MATERIALIZED (
    SELECT c.id, 1 - (c.embedding::vector({dims}) <=> %(qv)s::vector({dims})) AS sim
    FROM chunks c
    WHERE c.embedding_model = %(model)s AND c.namespace = %(ns)s AND c.ordinal = 0 {filter}
    ORDER BY c.embedding::vector({dims}) <=> %(qv)s::vector({dims})
    LIMIT %(k_first)s
), stats AS MATERIALIZED (
    SELECT chunks::float8 AS n, tsv_length_total::float8 / greatest(chunks, 1) AS avgdl
    FROM kb_text_stats WHERE namespace = %(ns)s AND embedding_model = %(model)s
), terms AS MATERIALIZED (
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
    SELECT scored.id, scored.lex FROM scored {lexical_filter}
    ORDER BY scored.lex DESC
    LIMIT %(k_lexical)s
), ids AS (
    SELECT id FROM dense UNION SELECT id FROM first UNION SELECT id FROM lexical
), state AS MATERIALIZED (
    SELECT kb_version, active_model FROM kb_state WHERE namespace = %(ns)s
)
-- one row even without hits: the namespace's state, read in this statement's snapshot;
-- candidates are light (their spans are read for the hits that are returned)
SELECT state.kb_version AS state_version, state.active_model AS state_model, hit.*
FROM (SELECT 1) AS one
LEFT JOIN state ON true
LEFT JOIN (
    SELECT ids.id, c.document_id, c.ordinal, dense.sim, first.sim AS first_sim, lexical.lex
    FROM ids
    -- one primary-key probe per candidate (a fence: never a scan of the namespace)
    CROSS JOIN LATERAL (
        SELECT c.document_id, c.ordinal FROM chunks c WHERE c.id = ids.id OFFSET 0
    ) AS c
    LEFT JOIN dense ON dense.id = ids.id
    LEFT JOIN first ON first.id = ids.id
    LEFT JOIN lexical ON lexical.id = ids.id
) AS hit ON true
"""

_SPANS = """
SELECT c.id, d.source_uri, d.title, c.text, c.heading_path, c.char_start, c.char_end,
       c.metadata
FROM chunks c
JOIN documents d ON d.tenant_id = c.tenant_id AND d.id = c.document_id
WHERE c.id = ANY(%s)
"""


class Retriever:
    """Searches namespaces; ``embedder`` is one embedder or a registry of them (a query is
    embedded with the model its namespace is answered with)."""

    def __init__(
        self,
        db: Database,
        embedder: Embedder | EmbedderRegistry,
        *,
        ef_search: int = 100,
        max_scan_tuples: int = 20000,
    ) -> None:
        self._db = db
        self._embedders = EmbedderRegistry.of(embedder)
        self._settings = {
            "hnsw.ef_search": str(ef_search),
            "hnsw.iterative_scan": "relaxed_order",
            "hnsw.max_scan_tuples": str(max_scan_tuples),
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
    ) -> list[dict[str, Any]]:
        """One search statement: the state row (``state_model``, ``state_version``) on
        every row, hits where ``id`` is set (one row with ``id`` None when none)."""
        statement = sql.SQL(_SEARCH).format(
            dims=sql.Literal(embedder.dimensions),
            filter=sql.SQL("AND c.metadata @> %(filters)s::jsonb" if filters else ""),
            lexical_filter=sql.SQL(
                "JOIN chunks c ON c.id = scored.id WHERE c.metadata @> %(filters)s::jsonb"
                if filters
                else ""
            ),
        )
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
        }
        async with self._db.tenant(config.tenant_id, settings=self._settings) as s:
            return [dict(r) for r in await s.fetch_all(statement, params)]

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
        chunks, documents = rank_candidates(found.rows, fusion, mode)
        chunks, documents = chunks[:top_k], documents[:top_k]
        wanted = {str(r["id"]) for _, r, _, _ in chunks} | {str(b["id"]) for _, _, b in documents}
        t0 = time.perf_counter()
        async with self._db.tenant(config.tenant_id) as s:
            spans = {
                str(r["id"]): dict(r)
                for r in await s.fetch_all(_SPANS, ([uuid.UUID(i) for i in wanted],))
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
