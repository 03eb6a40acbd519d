"""Filtered ANN at scale: recall@10 of the served dense path against exact search.

The run (``ragplane bench scale``), on a database of its own:

1. load: tenants of skewed size (:func:`~ragplane.evals.scale_data.tenant_sizes`)
   with synthetic unit vectors (:class:`~ragplane.evals.scale_data.Mixture`),
   bulk-loaded as the owner with binary ``COPY`` — bypassing the embedder, with every
   HNSW index on chunks dropped (their definitions kept from the migrations) and the
   chunk triggers off (the rows carry no text for the BM25 statistics); each tenant's
   chunk count is written to ``kb_text_stats`` as the triggers keep it for real text
   (the Retriever reads it to choose between exact search and the index);
2. build: those HNSW indexes from the same definitions, each timed;
3. measure: for the largest tenant, the ones nearest 5%, 3%, 2%, 1% and 0.1% of the
   rows, the smallest, and the smallest whose dense query the planner sends to HNSW,
   ``queries`` fresh query vectors each go through the real
   :meth:`Retriever.search` (dense mode, top 10) as the application role under
   row-level security — as shipped (exact search or HNSW by the namespace's share,
   :data:`~ragplane.knowledge.search.HNSW_VISIT_COST`) and as before that choice
   (``hnsw_visit_cost = 0``: the planner's) — and
   through exact search in the same tenant scope (the index off:
   ``enable_indexscan = off`` and a distance expression the index does not cover) →
   recall@10, latency p50/p95; the dense candidate query forced onto the HNSW index
   (``enable_sort = off``) shows where the index starts to pay; with ``sweep``, that
   query again under other HNSW scan settings (:data:`SWEEP`);
4. resources: build time, database and index size, memory of the Postgres server
   processes and of this process (from ``/proc``).

Bulk ``COPY`` is refused on a table whose row-level security binds the caller,
so the load transaction lifts ``FORCE ROW LEVEL SECURITY`` for its own duration
(the owner's DDL is transactional: it is back on when the load commits or fails).
"""

from __future__ import annotations

import asyncio
import functools
import math
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import numpy.typing as npt
from psycopg import sql

from ragplane.control.namespaces import NamespaceConfig
from ragplane.data import Database, DatabaseUrls, Session
from ragplane.evals import scale_data
from ragplane.evals.metrics import recall_at_k
from ragplane.knowledge.search import HNSW_VISIT_COST, Retriever
from ragplane.knowledge.types import ChunkingPolicy

__all__ = [
    "SWEEP",
    "Latency",
    "ScaleBenchResult",
    "TenantScores",
    "exact_top_k",
    "run_scale_bench",
    "uses_hnsw",
]

MODEL = "all-minilm-l6-v2"
DIMS = 384
NAMESPACE = "scale"
INDEX = "chunks_embedding_all_minilm_l6_v2_idx"
CHUNKS_PER_DOCUMENT = 16
BATCH = 20_000
K = 10

_EXACT = """
SELECT c.id FROM chunks c
WHERE c.embedding_model = %(model)s AND c.namespace = %(ns)s
ORDER BY c.embedding <=> %(qv)s::vector LIMIT %(k)s
"""  # `embedding` uncast: not the expression the HNSW index covers
_EXACT_SETTINGS = {"enable_indexscan": "off"}
# the Retriever's dense candidate query as the planner sees it (EXPLAIN, and the
# settings sweep, which asks "what if the Retriever ran with these settings")
_DENSE = f"""
SELECT c.id, c.embedding::vector({DIMS}) <=> %(qv)s::vector({DIMS}) AS distance FROM chunks c
WHERE c.embedding_model = %(model)s AND c.namespace = %(ns)s
ORDER BY c.embedding::vector({DIMS}) <=> %(qv)s::vector({DIMS}) LIMIT %(k)s
"""  # noqa: S608 - constants only
_EXPLAIN = "EXPLAIN (FORMAT JSON) " + _DENSE
# the planner's alternative (the tenant's rows, sorted) disabled: the HNSW index or nothing
FORCE_HNSW = {"enable_sort": "off"}
CANDIDATES = 300  # the dense candidates Retriever.search asks for (FusionConfig.candidates)
SWEEP: dict[str, dict[str, str]] = {
    "iterative off, ef 100": {"hnsw.iterative_scan": "off", "hnsw.ef_search": "100"},
    "strict, ef 100": {"hnsw.iterative_scan": "strict_order", "hnsw.ef_search": "100"},
    "relaxed, ef 40": {"hnsw.iterative_scan": "relaxed_order", "hnsw.ef_search": "40"},
    "relaxed, ef 100": {"hnsw.iterative_scan": "relaxed_order", "hnsw.ef_search": "100"},
    "relaxed, ef 200": {"hnsw.iterative_scan": "relaxed_order", "hnsw.ef_search": "200"},
    "relaxed, ef 300": {"hnsw.iterative_scan": "relaxed_order", "hnsw.ef_search": "300"},
    "relaxed, ef 100, 100k tuples": {
        "hnsw.iterative_scan": "relaxed_order",
        "hnsw.ef_search": "100",
        "hnsw.max_scan_tuples": "100000",
        "hnsw.scan_mem_multiplier": "4",
    },
}


class _QueryVectors:
    """An embedder that has only the model's name: the bench brings its own query vectors."""

    model_id = MODEL
    dimensions = DIMS
    max_tokens = 256

    def count_tokens(self, text: str) -> int:
        return len(text.split())

    async def embed(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        raise NotImplementedError("the scale bench passes query vectors; it embeds nothing")


@dataclass(frozen=True)
class Latency:
    recall_10: float
    min_recall_10: float
    p50_ms: float
    p95_ms: float
    uses_hnsw: bool | None = None  # the plan under these settings (sweep only)

    def as_json(self) -> dict[str, float | bool]:
        return {
            "recall@10": round(self.recall_10, 4),
            "min_recall@10": round(self.min_recall_10, 4),
            "p50_ms": round(self.p50_ms, 2),
            "p95_ms": round(self.p95_ms, 2),
        } | ({} if self.uses_hnsw is None else {"plan_uses_hnsw": self.uses_hnsw})


@dataclass(frozen=True)
class TenantScores:
    tenant: str
    label: str
    rows: int
    share: float
    served: Latency  # Retriever.search, dense, top 10, as shipped
    exact_p50_ms: float
    exact_p95_ms: float
    uses_hnsw: bool  # the planner's choice for the dense candidate query
    sweep: dict[str, Latency] = field(default_factory=dict)
    searched: str = ""  # what the Retriever as shipped does: "exact" or "hnsw"
    planner: Latency | None = None  # Retriever.search, the planner choosing (before)
    hnsw: Latency | None = None  # the dense candidate query forced onto the index

    def as_json(self) -> dict[str, Any]:
        return (
            {"tenant": self.tenant, "rows": self.rows, "share_pct": round(self.share * 100, 4)}
            | self.served.as_json()
            | {
                "searched": self.searched,
                "exact_p50_ms": round(self.exact_p50_ms, 2),
                "exact_p95_ms": round(self.exact_p95_ms, 2),
                "plan_uses_hnsw": self.uses_hnsw,
                "planner": self.planner.as_json() if self.planner else None,
                "hnsw_forced": self.hnsw.as_json() if self.hnsw else None,
                "sweep": {name: lat.as_json() for name, lat in self.sweep.items()},
            }
        )


@dataclass
class ScaleBenchResult:
    chunks: int
    tenants: int
    queries: int
    sizes: list[int]
    load_s: float = 0.0
    build_s: float = 0.0
    build_settings: dict[str, Any] = field(default_factory=dict)
    build_notices: list[str] = field(default_factory=list)
    index_builds_s: dict[str, float] = field(default_factory=dict)  # every HNSW index on chunks
    retriever_settings: dict[str, str] = field(default_factory=dict)
    sizes_mb: dict[str, float] = field(default_factory=dict)
    memory: dict[str, Any] = field(default_factory=dict)
    scores: list[TenantScores] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {
            "chunks": self.chunks,
            "tenants": self.tenants,
            "queries_per_tenant": self.queries,
            "vectors": "mixture of 1000 Gaussians, 32-d latent -> 384-d, unit length",
            "largest_share_pct": round(self.sizes[0] / self.chunks * 100, 4),
            "smallest_share_pct": round(self.sizes[-1] / self.chunks * 100, 4),
            "load_s": round(self.load_s, 1),
            "index_build_s": round(self.build_s, 1),
            "index_build": self.build_settings,
            "index_build_notices": self.build_notices,
            "index_builds_s": {k: round(v, 1) for k, v in self.index_builds_s.items()},
            "retriever": self.retriever_settings,
            "sizes_mb": self.sizes_mb,
            "memory": self.memory,
            "tenants_measured": {s.label: s.as_json() for s in self.scores},
        }


def _uuids(n: int, rng: np.random.Generator) -> npt.NDArray[np.void]:
    raw = np.frombuffer(rng.bytes(16 * n), dtype=np.uint8).reshape(n, 16).copy()
    raw[:, 6] = (raw[:, 6] & 0x0F) | 0x40  # version 4
    raw[:, 8] = (raw[:, 8] & 0x3F) | 0x80  # RFC 4122 variant
    return raw.view("V16").reshape(n)


async def _load(
    owner: Database,
    names: list[str],
    sizes: list[int],
    mixture: scale_data.Mixture,
    rng: np.random.Generator,
    progress: Callable[[str], None],
) -> dict[str, str]:
    """Load every tenant's documents and chunks with the HNSW indexes on chunks dropped
    and its triggers off; return the dropped indexes' definitions, by name."""
    async with owner.control() as s:
        rows = await s.fetch_all(
            "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = current_schema() "
            "AND tablename = 'chunks' AND indexdef LIKE '%% USING hnsw %%' ORDER BY indexname"
        )
        indexes = {str(r["indexname"]): str(r["indexdef"]) for r in rows}
        if INDEX not in indexes:
            raise RuntimeError(f"index {INDEX} is missing: is the database migrated?")
        await s.execute(
            "INSERT INTO control.tenants (id, name, home_region) "
            "SELECT t, t, 'eu' FROM unnest(%s::text[]) AS t ON CONFLICT DO NOTHING",
            (names,),
        )
        for ddl in (
            "ALTER TABLE documents NO FORCE ROW LEVEL SECURITY",
            "ALTER TABLE chunks NO FORCE ROW LEVEL SECURITY",
            "ALTER TABLE kb_text_stats NO FORCE ROW LEVEL SECURITY",
            "ALTER TABLE chunks DISABLE TRIGGER USER",
        ):
            await s.execute(ddl)
        for name in indexes:
            await s.execute(sql.SQL("DROP INDEX {}").format(sql.Identifier(name)))
        for i, (name, n) in enumerate(zip(names, sizes, strict=True)):
            await _load_tenant(s, name, n, mixture, rng)
            if i % 10 == 0 or n >= BATCH:
                progress(f"loaded tenant {i + 1}/{len(names)} ({n:,} chunks)")
        # the statistics triggers' chunk count (for text), which the Retriever reads
        await s.execute(
            "INSERT INTO kb_text_stats (tenant_id, namespace, embedding_model, chunks, "
            "tsv_length_total) SELECT t, %s, %s, n, 0 FROM unnest(%s::text[], %s::int[]) AS "
            "u(t, n)",
            (NAMESPACE, MODEL, names, sizes),
        )
        await s.execute("ALTER TABLE chunks ENABLE TRIGGER USER")
        await s.execute("ALTER TABLE chunks FORCE ROW LEVEL SECURITY")
        await s.execute("ALTER TABLE kb_text_stats FORCE ROW LEVEL SECURITY")
        await s.execute("ALTER TABLE documents FORCE ROW LEVEL SECURITY")
    async with owner.control() as s:
        await s.execute("ANALYZE documents")
        await s.execute("ANALYZE chunks")
    return indexes


async def _load_tenant(
    s: Session, tenant: str, n: int, mixture: scale_data.Mixture, rng: np.random.Generator
) -> None:
    docs = _uuids(math.ceil(n / CHUNKS_PER_DOCUMENT), rng)
    cur = s.connection.cursor()
    async with cur.copy(
        "COPY documents (id, tenant_id, namespace, source_uri, title, content_hash) FROM STDIN"
    ) as copy:
        for j, doc in enumerate(docs):
            uri = f"scale://{tenant}/{j}"
            await copy.write_row((uuid.UUID(bytes=doc.tobytes()), tenant, NAMESPACE, uri, uri, uri))
    async with cur.copy(
        "COPY chunks (id, tenant_id, document_id, namespace, embedding_model, ordinal, text, "
        "embedding) FROM STDIN (FORMAT BINARY)"
    ) as copy:
        await copy.write(scale_data.COPY_SIGNATURE)
        for start in range(0, n, BATCH):
            idx = np.arange(start, min(n, start + BATCH))
            await copy.write(
                scale_data.chunk_rows(
                    ids=_uuids(len(idx), rng),
                    tenant_id=tenant,
                    document_ids=docs[idx // CHUNKS_PER_DOCUMENT],
                    namespace=NAMESPACE,
                    model=MODEL,
                    ordinals=idx % CHUNKS_PER_DOCUMENT,
                    text="synthetic chunk",
                    vectors=mixture.sample(len(idx), rng),
                )
            )
        await copy.write(scale_data.COPY_TRAILER)


async def _build(
    owner: Database,
    indexdef: str,
    maintenance_work_mem: str,
    workers: int,
    peak: _Peak,
) -> tuple[float, dict[str, Any], list[str]]:
    notices: list[str] = []
    async with owner.control() as s:
        s.connection.add_notice_handler(lambda d: notices.append(str(d.message_primary)))
        await s.execute(
            "SELECT set_config('maintenance_work_mem', %s, true), "
            "set_config('max_parallel_maintenance_workers', %s, true)",
            (maintenance_work_mem, str(workers)),
        )
        backend = await s.fetch_one("SELECT pg_backend_pid() AS pid")
        assert backend is not None
        sampler = asyncio.create_task(peak.sample(int(backend["pid"])))
        t0 = time.perf_counter()
        try:
            # the migration's own text, from pg_indexes
            await s.execute(sql.SQL(indexdef))
        finally:
            sampler.cancel()
        build_s = time.perf_counter() - t0
        settings = await s.fetch_one(
            "SELECT current_setting('maintenance_work_mem') AS maintenance_work_mem, "
            "current_setting('max_parallel_maintenance_workers')::int AS parallel_workers, "
            "current_setting('server_version') AS server_version, "
            "(SELECT extversion FROM pg_extension WHERE extname = 'vector') AS pgvector"
        )
    return build_s, dict(settings or {}) | {"definition": indexdef}, notices


class _Peak:
    """The largest Postgres memory seen while sampling every half second."""

    def __init__(self) -> None:
        self.best: scale_data.ProcessMemory | None = None

    async def sample(self, backend_pid: int) -> None:
        while True:
            now = await asyncio.to_thread(scale_data.postgres_memory, backend_pid)
            if self.best is None or (now.pss_mb or now.rss_mb) > (
                self.best.pss_mb or self.best.rss_mb
            ):
                self.best = now
            await asyncio.sleep(0.5)


async def exact_top_k(
    app: Database, tenant: str, vector: npt.NDArray[np.float32], k: int = K
) -> list[str]:
    """The true top ``k`` chunk ids of ``tenant`` for ``vector``: a scan, no index."""
    async with app.tenant(tenant, settings=_EXACT_SETTINGS) as s:
        rows = await s.fetch_all(_EXACT, {"model": MODEL, "ns": NAMESPACE, "qv": vector, "k": k})
    return [str(r["id"]) for r in rows]


async def uses_hnsw(
    app: Database,
    tenant: str,
    vector: npt.NDArray[np.float32],
    settings: dict[str, str] | None = None,
) -> bool:
    """Whether the planner answers ``tenant``'s dense candidate query from the HNSW index."""
    params = {"model": MODEL, "ns": NAMESPACE, "qv": vector, "k": CANDIDATES}
    async with app.tenant(tenant, settings=settings) as s:
        plan = await s.fetch_one(_EXPLAIN, params)
    return INDEX in str(plan)


def _pct(samples: list[float], q: int) -> float:
    if len(samples) < 2:
        return samples[0] if samples else 0.0
    return statistics.quantiles(samples, n=100, method="inclusive")[q - 1]


def _latency(recalls: list[float], ms: list[float]) -> Latency:
    return Latency(statistics.fmean(recalls), min(recalls), _pct(ms, 50), _pct(ms, 95))


async def _served(
    retriever: Retriever, config: NamespaceConfig, vector: npt.NDArray[np.float32]
) -> list[str]:
    found = await retriever.search(config, "scale", top_k=K, mode="dense", query_vector=vector)
    return [h.chunk_id for h in found.chunks]


async def _with_settings(
    app: Database, tenant: str, vector: npt.NDArray[np.float32], *, settings: dict[str, str]
) -> list[str]:
    params = {"model": MODEL, "ns": NAMESPACE, "qv": vector, "k": CANDIDATES}
    async with app.tenant(tenant, settings=settings) as s:
        rows = await s.fetch_all(_DENSE, params)
    rows.sort(key=lambda r: r["distance"])  # relaxed order: sorted afterwards, as fuse() does
    return [str(r["id"]) for r in rows[:K]]


async def _measure(
    app: Database,
    retriever: Retriever,
    planner: Retriever,
    tenant: str,
    label: str,
    rows: int,
    total: int,
    vectors: npt.NDArray[np.float32],
    sweep: bool,
) -> TenantScores:
    config = NamespaceConfig(tenant, NAMESPACE, MODEL, ChunkingPolicy())
    for v in vectors[: min(10, len(vectors))]:  # warm plans and caches
        await _served(retriever, config, v)
        await exact_top_k(app, tenant, v)
    truths, exact_ms = [], []
    for v in vectors:
        t0 = time.perf_counter()
        truths.append(dict.fromkeys(await exact_top_k(app, tenant, v), 1))
        exact_ms.append((time.perf_counter() - t0) * 1000)

    async def score(search: Callable[[npt.NDArray[np.float32]], Awaitable[list[str]]]) -> Latency:
        recalls, ms = [], []
        for v, truth in zip(vectors, truths, strict=True):
            t0 = time.perf_counter()
            ranked = await search(v)
            ms.append((time.perf_counter() - t0) * 1000)
            recalls.append(recall_at_k(ranked, truth, K))
        return _latency(recalls, ms)

    served = await score(lambda v: _served(retriever, config, v))
    before = await score(lambda v: _served(planner, config, v))
    forced = dict(retriever._settings) | FORCE_HNSW
    on_index = await score(functools.partial(_with_settings, app, tenant, settings=forced))
    on_index = replace(on_index, uses_hnsw=await uses_hnsw(app, tenant, vectors[0], forced))
    hnsw = await uses_hnsw(app, tenant, vectors[0])
    swept: dict[str, Latency] = {}
    for name, settings in SWEEP.items() if sweep and hnsw else ():
        lat = await score(functools.partial(_with_settings, app, tenant, settings=settings))
        swept[name] = replace(lat, uses_hnsw=await uses_hnsw(app, tenant, vectors[0], settings))
    return TenantScores(
        tenant=tenant,
        label=label,
        rows=rows,
        share=rows / total,
        served=served,
        exact_p50_ms=_pct(exact_ms, 50),
        exact_p95_ms=_pct(exact_ms, 95),
        uses_hnsw=hnsw,
        sweep=swept,
        # the Retriever's rule (knowledge.search), the table's rows being this run's chunks
        searched="exact" if rows**2 < retriever.hnsw_visit_cost * CANDIDATES * total else "hnsw",
        planner=before,
        hnsw=on_index,
    )


async def _pick(app: Database, names: list[str], sizes: list[int]) -> dict[str, int]:
    """Which tenants (by rank) to measure: the largest, those nearest 1% and 0.1% of the
    rows, the smallest, and the smallest whose dense query the planner sends to HNSW
    (below it, a tenant's rows are few enough to be scanned exactly)."""
    total = sum(sizes)

    def nearest(share: float) -> int:
        return min(range(len(sizes)), key=lambda i: abs(math.log(sizes[i] / total / share)))

    picks = {"largest": 0, "~1%": nearest(0.01), "~0.1%": nearest(0.001)}
    for share in (0.05, 0.03, 0.02):  # between the planner's boundary and the largest
        if nearest(share) not in picks.values():
            picks[f"~{share:.0%}"] = nearest(share)
    probe = np.zeros(DIMS, dtype=np.float32)
    probe[0] = 1.0
    on_hnsw = [i for i, name in enumerate(names) if await uses_hnsw(app, name, probe)]
    if on_hnsw and max(on_hnsw) not in picks.values():
        picks["smallest on HNSW"] = max(on_hnsw)
    picks["smallest"] = len(sizes) - 1
    return picks


async def run_scale_bench(
    urls: DatabaseUrls,
    *,
    chunks: int = 1_000_000,
    tenants: int = 100,
    queries: int = 200,
    maintenance_work_mem: str = "4GB",
    parallel_workers: int = 1,
    sweep: bool = False,
    seed: int = 7,
    hnsw_visit_cost: float = HNSW_VISIT_COST,
    progress: Callable[[str], None] = lambda _msg: None,
) -> ScaleBenchResult:
    """Load, index, and measure filtered recall@10 and latency (see the module docstring);
    with ``sweep``, also other HNSW scan settings on the tenants that use the index."""
    if urls.owner is None:
        raise ValueError("the scale benchmark needs the owner role URL")
    sizes = scale_data.tenant_sizes(chunks, tenants)
    names = [f"scale_t{i:03d}" for i in range(tenants)]
    result = ScaleBenchResult(chunks=chunks, tenants=tenants, queries=queries, sizes=sizes)
    rng = np.random.default_rng(seed)
    mixture = scale_data.Mixture(seed=seed)
    peak = _Peak()
    async with Database(urls.owner, max_size=1, name="owner") as owner:
        progress(f"loading {chunks:,} chunks over {tenants} tenants")
        t0 = time.perf_counter()
        indexes = await _load(owner, names, sizes, mixture, rng, progress)
        result.load_s = time.perf_counter() - t0
        built: list[str] = []
        try:
            for name, indexdef in indexes.items():
                progress(f"building {name}")
                seconds, settings, notices = await _build(
                    owner, indexdef, maintenance_work_mem, parallel_workers, peak
                )
                built.append(name)
                result.index_builds_s[name] = seconds
                result.build_notices += notices
                if name == INDEX:
                    result.build_s, result.build_settings = seconds, settings
        finally:
            for name in set(indexes) - set(built):  # a failed run leaves the schema as it was
                async with owner.control() as s:
                    await s.execute(
                        sql.SQL(
                            indexes[name].replace("CREATE INDEX", "CREATE INDEX IF NOT EXISTS", 1)
                        )
                    )
        async with owner.control() as s:
            sized = await s.fetch_one(
                "SELECT pg_database_size(current_database()) AS database, "
                "pg_relation_size('chunks') AS chunks_heap, "
                "pg_total_relation_size('chunks') AS chunks_total, "
                "pg_relation_size(%s::regclass) AS hnsw_index",
                (INDEX,),
            )
        result.sizes_mb = {k: round(v / 2**20, 1) for k, v in dict(sized or {}).items()}
    async with Database(urls.app, max_size=2) as app:
        retriever = Retriever(app, _QueryVectors(), hnsw_visit_cost=hnsw_visit_cost)
        planner = Retriever(app, _QueryVectors(), hnsw_visit_cost=0)
        result.retriever_settings = dict(retriever._settings) | {  # what its units of work set
            "hnsw_visit_cost": str(retriever.hnsw_visit_cost)
        }
        for label, rank in (await _pick(app, names, sizes)).items():
            progress(f"measuring {label} tenant ({sizes[rank]:,} chunks, {queries} queries)")
            vectors = mixture.sample(queries, rng)
            result.scores.append(
                await _measure(
                    app,
                    retriever,
                    planner,
                    names[rank],
                    label,
                    sizes[rank],
                    chunks,
                    vectors,
                    sweep,
                )
            )
        async with app.control() as s:
            backend = await s.fetch_one("SELECT pg_backend_pid() AS pid")
        assert backend is not None
        after = scale_data.postgres_memory(int(backend["pid"]))
    result.memory = {
        "postgres_peak_during_build": peak.best.as_json() if peak.best else None,
        "postgres_after_queries": after.as_json(),
        "bench_process": scale_data.self_memory(),
    }
    return result
