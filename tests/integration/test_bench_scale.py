"""The retrieval scale bench at a tiny size: the report's shape, and that recall is measured.

The full run (1,000,000 chunks, 100 tenants) is ``ragplane bench scale``; its
figures are in docs/benchmarks.md. Here it runs on the session's database,
which it leaves as it found it apart from rows (truncated afterwards).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import numpy as np
import psycopg
import pytest

from ragplane.data import Database
from ragplane.evals import scale_data
from ragplane.evals.bench_scale import INDEX, SWEEP, exact_top_k, run_scale_bench
from ragplane.evals.metrics import recall_at_k
from tests.conftest import TENANT_TABLES, PgCluster


@pytest.fixture
async def scale_db(clean_db: PgCluster) -> AsyncIterator[PgCluster]:
    yield clean_db
    with psycopg.connect(clean_db.owner, autocommit=True) as conn:
        conn.execute("TRUNCATE " + ", ".join(TENANT_TABLES) + " CASCADE")


def test_tenant_sizes_are_skewed_and_sum_to_the_total() -> None:
    sizes = scale_data.tenant_sizes(1_000_000, 100)
    assert sum(sizes) == 1_000_000
    assert sizes == sorted(sizes, reverse=True)
    shares = [s / 1_000_000 for s in sizes]
    assert shares[0] == pytest.approx(0.10, abs=0.001)
    assert min(abs(s - 0.001) for s in shares) < 0.00005
    assert min(abs(s - 0.01) for s in shares) < 0.0005
    assert shares[-1] == pytest.approx(0.0005, abs=0.0001)


def test_chunk_rows_encode_one_fixed_width_binary_copy_row_each() -> None:
    vectors = scale_data.Mixture(seed=1).sample(3, np.random.default_rng(1))
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    ids = np.zeros(3, dtype="V16")
    data = scale_data.chunk_rows(
        ids=ids,
        tenant_id="scale_t000",
        document_ids=ids,
        namespace="ns",
        model="m",
        ordinals=np.arange(3),
        text="t",
        vectors=vectors,
    )
    row = len(data) // 3
    # field count, then 7 length-prefixed fields, then the vector (dims, unused, floats)
    assert row == 2 + (4 + 16) + (4 + 10) + (4 + 16) + (4 + 2) + (4 + 1) + (4 + 4) + (4 + 1) + (
        4 + 4 + 4 * 384
    )
    assert int.from_bytes(data[:2], "big") == 8


def _schema_state(owner_url: str) -> tuple[list[tuple[str, ...]], list[tuple[str, ...]]]:
    """The indexes on chunks and documents, and their triggers with their enabled state."""
    with psycopg.connect(owner_url) as conn:
        indexes = conn.execute(
            "SELECT indexname, indexdef FROM pg_indexes "
            "WHERE tablename IN ('chunks', 'documents') ORDER BY 1"
        ).fetchall()
        triggers = conn.execute(
            "SELECT tgname, tgenabled::text FROM pg_trigger "
            "WHERE tgrelid IN ('chunks'::regclass, 'documents'::regclass) ORDER BY 1"
        ).fetchall()
    return indexes, triggers


async def test_the_scale_bench_measures_recall_against_exact_search(scale_db: PgCluster) -> None:
    schema_before = _schema_state(scale_db.owner)
    result = await run_scale_bench(
        scale_db.urls,
        chunks=5000,
        tenants=10,
        queries=20,
        maintenance_work_mem="64MB",
        sweep=True,
    )
    report = result.as_json()
    assert report["chunks"] == 5000
    assert sum(result.sizes) == 5000
    assert {"largest", "~1%", "~0.1%", "smallest"} <= set(report["tenants_measured"])
    for scores in report["tenants_measured"].values():
        assert 0.0 <= scores["min_recall@10"] <= scores["recall@10"] <= 1.0
        assert scores["p95_ms"] >= scores["p50_ms"] > 0
        # other settings are tried only where the index is used
        assert set(scores["sweep"]) == (set(SWEEP) if scores["plan_uses_hnsw"] else set())
        # the Retriever's own choice, the planner's (as before it), the index forced
        assert scores["searched"] in ("exact", "hnsw")
        for side in ("planner", "hnsw_forced"):
            assert 0.0 <= scores[side]["min_recall@10"] <= scores[side]["recall@10"] <= 1.0
        assert scores["hnsw_forced"]["plan_uses_hnsw"]
    # a table this small is read exactly for every tenant, so exactly
    assert {s["searched"] for s in report["tenants_measured"].values()} == {"exact"}
    assert all(s["recall@10"] == 1.0 for s in report["tenants_measured"].values())
    # a broken comparison (ids of another shape, the wrong tenant) would score near 0
    assert report["tenants_measured"]["largest"]["recall@10"] >= 0.5
    assert report["index_build_s"] > 0
    assert report["index_build"]["definition"].startswith(f"CREATE INDEX {INDEX} ")
    assert report["sizes_mb"]["hnsw_index"] > 0
    assert report["memory"]["postgres_after_queries"]["rss_mb"] > 0
    assert report["memory"]["bench_process"]["peak_rss_mb"] > 0

    assert INDEX in report["index_builds_s"]

    # row-level security is back on (forced); indexes and triggers are as migrated
    with psycopg.connect(scale_db.owner) as conn:
        forced = conn.execute(
            "SELECT relname, relforcerowsecurity FROM pg_class "
            "WHERE relname IN ('chunks', 'documents')"
        ).fetchall()
        assert dict(forced) == {"chunks": True, "documents": True}
    assert _schema_state(scale_db.owner) == schema_before
    # the chunk counts the statistics triggers would keep (off for the load)
    assert scale_db.urls.reporting is not None  # the role that reads across tenants
    with psycopg.connect(scale_db.urls.reporting) as conn:
        counts = conn.execute(
            "SELECT tenant_id, chunks FROM kb_text_stats ORDER BY chunks DESC, tenant_id"
        ).fetchall()
    assert [n for _, n in counts] == sorted(result.sizes, reverse=True)

    # exact search agrees with itself, and sees only its own tenant's rows
    tenant = "scale_t000"
    vector = scale_data.Mixture(seed=7).sample(1, np.random.default_rng(3))[0]
    async with Database(scale_db.app, max_size=1) as app:
        truth = await exact_top_k(app, tenant, vector)
        assert len(truth) == 10
        assert recall_at_k(truth, dict.fromkeys(truth, 1), 10) == 1.0
        async with app.tenant(tenant) as s:
            own = await s.fetch_all("SELECT id FROM chunks WHERE id = ANY(%s::uuid[])", (truth,))
        assert len(own) == 10
        smallest = f"scale_t{len(result.sizes) - 1:03d}"
        other = await exact_top_k(app, smallest, vector, k=10_000)
        assert len(other) == result.sizes[-1]
        assert not set(other) & set(truth)
