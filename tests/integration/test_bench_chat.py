"""`ragplane bench chat` at a tiny size: the pyfaq slice, `ragplane serve` and the mock
provider as processes, misses, hits and two rounds of concurrent streams."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ragplane.evals.bench_chat import run_chat_bench
from ragplane.evals.bench_retrieval import load_beir
from tests.conftest import PgCluster

pytestmark = pytest.mark.integration

SLICE = Path(__file__).parent.parent / "fixtures" / "pyfaq-slice"


async def test_tiny_chat_bench(clean_db: PgCluster, tmp_path: Path) -> None:
    result = await run_chat_bench(
        clean_db.urls, load_beir(SLICE), tmp_path, limit_documents=40, streams=8, rounds=2
    )
    report = json.loads(json.dumps(result.as_json()))  # plain JSON
    assert report["errors"] == []
    assert report["documents"] == 40
    assert report["miss_latency"]["n"] == report["queries"] > 0
    assert report["hit_rate"] > 0.9  # the grounded mock cites, so answers are cached
    assert report["hit_latency"]["n"] == report["queries"]
    assert report["floor_latency"]["n"] == report["queries"]
    assert {"guard_input", "embed", "retrieve", "assemble", "generate"} <= set(report["steps"])
    # only misses that generated: a near repeat among the queries is answered from the cache
    assert report["queries"] - 2 <= report["overhead"]["n"] <= report["queries"]
    assert report["overhead"]["n"] == report["steps"]["generate"]["n"]
    streams = report["streams"]
    assert (streams["requests"], streams["errors"]) == (16, 0)
    assert len(streams["rss_mb"]) == 3
    assert set(report["targets"]) == {
        "cache_hit_p95_le_20ms",
        "miss_overhead_p95_le_60ms",
        "streams_zero_errors",
    }
