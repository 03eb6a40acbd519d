"""`ragplane bench gateway` at a tiny size: direct, the aiohttp floor and ragplane as
separate processes in front of one mock provider, loaded by wrk (LiteLLM skipped)."""

from __future__ import annotations

import json
from pathlib import Path

import psycopg
import pytest

from ragplane.evals.bench_gateway import TENANT, GatewayBenchOptions, run_gateway_bench
from tests.conftest import PgCluster

METRICS = {
    "rps",
    "added_p50_ms",
    "added_p99_ms",
    "cpu_ms_per_req",
    "added_ttft_p99_ms",
    "rss_mb",
    "rss_growth_pct",
}


def test_tiny_gateway_bench(clean_db: PgCluster, tmp_path: Path) -> None:
    opts = GatewayBenchOptions(
        work_dir=tmp_path,
        concurrencies=(1,),
        duration_s=1,
        warmup_s=0,
        requests=10,
        ttft_s=0.3,
        settle_s=0.2,
        targets=("direct", "floor", "ragplane", "litellm"),
        litellm=None,
        litellm_skip_reason="--skip-litellm",
    )
    report = json.loads(json.dumps(run_gateway_bench(clean_db.urls, opts)))  # plain JSON

    assert report["litellm"] == {"skipped": True, "reason": "--skip-litellm"}
    for name in ("direct", "floor", "ragplane"):
        figures = report[name]["concurrency"]["1"]
        assert set(figures) >= METRICS, name
        for key in ("errors", "ttft_errors"):
            assert figures[key] == 0, (name, key)
        for key in ("rps", "cpu_ms_per_req", "rss_mb", "p50_ms", "p99_ms", "ttft_p99_ms"):
            assert figures[key] > 0, (name, key)
        for key in ("requests", "ttft_streams"):
            assert figures[key] > 0, (name, key)
        rss = report[name]["rss"]
        assert rss["soak_requests"] >= 10
        assert rss["warm_mb"] > 0
        assert rss["after_mb"] > 0
    # "added" is against direct at the same concurrency
    direct = report["direct"]["concurrency"]["1"]
    assert direct["added_p50_ms"] == direct["added_p99_ms"] == direct["added_ttft_p99_ms"] == 0
    ours = report["ragplane"]["concurrency"]["1"]
    assert ours["added_p50_ms"] == pytest.approx(ours["p50_ms"] - direct["p50_ms"], abs=0.002)
    assert report["setup"]["cores"] >= 1
    assert {t["name"] for t in report["targets"]} == {
        "cpu",
        "added_latency",
        "vs_litellm",
        "rss_growth",
    }
    # the ragplane target ran with auth and the ledger on: every call has its row
    with psycopg.connect(clean_db.superuser_url) as conn:
        (rows,) = conn.execute(
            "SELECT count(*) FROM llm_ledger WHERE tenant_id = %s", (TENANT,)
        ).fetchone() or (0,)
    assert rows >= ours["requests"]
