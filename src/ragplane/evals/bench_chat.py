"""``ragplane bench chat``: the RAG lifecycle end to end, over HTTP, with the mock provider.

A BEIR corpus (pyfaq) is ingested into a throwaway tenant; ``ragplane serve`` runs in a
process of its own with ``support-quality`` and ``rewrite`` routed to ``ragplane
mock-provider`` (a real OpenAI-wire server on loopback: fixed time to first token,
paced tokens); the bench process is the client, with a tenant API key:

0. **floor**: ``GET /v1/whoami`` as often (HTTP, key verification, tenant look-up: what
   every request pays before the lifecycle starts), the baseline of the same run;

1. **misses**: every query once, one at a time (JSON) — client latency, and from the
   request log's spans of those that generated (a near repeat among the queries is
   answered from the cache) what the platform spent before and around the provider:
   *overhead* = guard + cache look-ups + embedding + retrieval + assembly (the issue's
   "cache-miss overhead excluding provider time"), and *pre-generation* = everything
   from the start of the lifecycle to the gateway call;
2. **hits**: the same queries again — client latency and hit rate;
3. **streams**: ``rounds`` rounds of ``streams`` concurrent SSE requests (cache emptied
   before each, so every one generates): requests that did not end with ``done``, and
   the server's RSS after each round (bounded memory: flat across rounds).

Each step's p50/p95 comes from the request log's spans (the request's trace).
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import yaml

from ragplane.config import child_process_env
from ragplane.control.apikeys import create_api_key
from ragplane.control.namespaces import upsert_namespace
from ragplane.data import Database, DatabaseUrls
from ragplane.evals.bench_retrieval import BeirDataset
from ragplane.evals.gateway_targets import (
    TargetProcess,
    free_port,
    start_process,
    wait_http,
    wait_log_url,
)
from ragplane.knowledge.embedder import LocalEmbedder
from ragplane.knowledge.ingest import Ingestor
from ragplane.knowledge.parsers import parse

__all__ = ["ChatBenchResult", "run_chat_bench"]

BENCH_TENANT = "tnt_chat_bench"
_RAGPLANE = [sys.executable, "-c", "from ragplane.cli import main; main()"]
_PROVIDER_KEY = "sk-mock"
# what the platform spends itself on a miss, outside the provider call
OVERHEAD_STEPS = (
    "guard_input",
    "guard_model",
    "cache_exact",
    "embed",
    "cache_near",
    "flags",
    "retrieve",
    "assemble",
)


def _pct(values: Sequence[float], q: int) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


def _summary(values: Sequence[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "p50_ms": round(_pct(values, 50), 2),
        "p95_ms": round(_pct(values, 95), 2),
        "mean_ms": round(statistics.fmean(values), 2) if values else float("nan"),
    }


@dataclass
class ChatBenchResult:
    documents: int = 0
    chunks: int = 0
    queries: int = 0
    mock: dict[str, float] = field(default_factory=dict)
    floor_latency: dict[str, float] = field(default_factory=dict)
    miss_latency: dict[str, float] = field(default_factory=dict)
    hit_latency: dict[str, float] = field(default_factory=dict)
    hit_rate: float = 0.0
    overhead: dict[str, float] = field(default_factory=dict)
    pre_generation: dict[str, float] = field(default_factory=dict)
    steps: dict[str, dict[str, float]] = field(default_factory=dict)
    streams: dict[str, Any] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {
            "documents": self.documents,
            "chunks": self.chunks,
            "queries": self.queries,
            "mock": self.mock,
            "floor_latency": self.floor_latency,
            "miss_latency": self.miss_latency,
            "hit_latency": self.hit_latency,
            "hit_rate": round(self.hit_rate, 4),
            "overhead": self.overhead,
            "pre_generation": self.pre_generation,
            "steps": self.steps,
            "streams": self.streams,
            "errors": self.errors[:20],
            "targets": {
                "cache_hit_p95_le_20ms": self.hit_latency.get("p95_ms", 1e9) <= 20,
                "miss_overhead_p95_le_60ms": self.overhead.get("p95_ms", 1e9) <= 60,
                "streams_zero_errors": self.streams.get("errors", 1) == 0,
            },
        }


async def _prepare(
    urls: DatabaseUrls,
    dataset: BeirDataset,
    limit_documents: int | None,
    progress: Callable[[str], None],
) -> tuple[str, int, int]:
    """Register the tenant, ingest the corpus (idempotent), mint an API key."""
    assert urls.owner is not None
    embedder = LocalEmbedder()
    async with Database(urls.owner, max_size=1, name="owner") as owner, owner.control() as s:
        await s.execute(
            "INSERT INTO control.tenants (id, name, home_region) "
            "VALUES (%s, 'chat bench', 'eu') ON CONFLICT DO NOTHING",
            (BENCH_TENANT,),
        )
        config = await upsert_namespace(
            s, BENCH_TENANT, "default", embedding_model=embedder.model_id
        )
        _, key = await create_api_key(s, BENCH_TENANT, name="bench")
    data = dataset.corpus_path.read_bytes()
    if limit_documents is not None:
        data = b"\n".join(data.splitlines()[:limit_documents]) + b"\n"
    async with Database(urls.app, max_size=2) as db:
        report = await Ingestor(db, embedder).ingest(
            config,
            parse(f"file://{dataset.corpus_path}", data),
            on_progress=lambda p: progress(
                f"ingest: {p.documents_done} documents, {p.chunks_written} chunks"
            ),
        )
        rows = await db.tenant_fetch(
            BENCH_TENANT,
            "SELECT (SELECT count(*) FROM documents) AS d, (SELECT count(*) FROM chunks) AS c",
        )
    del report
    return key, int(rows[0]["d"]), int(rows[0]["c"])


def _start_mock(work: Path, ttft_ms: float, tokens_per_s: float, tokens: int) -> TargetProcess:
    argv = [
        *_RAGPLANE,
        "mock-provider",
        "--port",
        "0",
        "--api-key",
        _PROVIDER_KEY,
        "--ttft-ms",
        str(ttft_ms),
        "--tokens-per-s",
        str(tokens_per_s),
        "--output-tokens",
        str(tokens),
        "--grounded",  # quotes the prompt's passages with markers, as a grounded model does
    ]
    mock = start_process("mock", argv, work / "mock.log", env=child_process_env())
    wait_log_url(mock)
    return mock


def _start_platform(work: Path, urls: DatabaseUrls, mock_url: str) -> TargetProcess:
    port = free_port()
    route = [{"model": "gpt"}]
    config = {
        "data_dir": str(work / "data"),
        "host": "127.0.0.1",
        "port": port,
        "log_level": "warning",
        "database": {"url": urls.app, "pool_max_size": 20},
        "gateway": {
            "providers": {
                "mock": {"type": "openai", "base_url": f"{mock_url}/v1", "api_key": _PROVIDER_KEY}
            },
            "models": {
                "gpt": {
                    "provider": "mock",
                    "upstream": "mock-gpt",
                    "context_window": 8192,
                    "input_per_mtok": 0.15,
                    "output_per_mtok": 0.6,
                }
            },
            "aliases": {"support-quality": {"routes": route}, "rewrite": {"routes": route}},
            "bulkheads": {"per_tenant_interactive": 1024, "per_route_interactive": 1024},
        },
    }
    file = work / "ragplane.yaml"
    file.write_text(yaml.safe_dump(config))
    argv = [*_RAGPLANE, "serve", "--config", str(file)]
    server = start_process("ragplane", argv, work / "ragplane.log", env=child_process_env())
    server.url = f"http://127.0.0.1:{port}"
    wait_http(server, f"{server.url}/health", timeout_s=120)
    return server


async def _ask(client: httpx.AsyncClient, query: str) -> tuple[float, dict[str, Any], str]:
    t0 = time.perf_counter()
    r = await client.post("/v1/chat", json={"query": query})
    ms = (time.perf_counter() - t0) * 1000
    if r.status_code != 200:
        return ms, {}, f"{r.status_code} {r.text[:200]}"
    return ms, r.json(), ""


async def _stream(client: httpx.AsyncClient, query: str) -> str:
    """'' when the stream ended with ``done``; else what went wrong."""
    last = ""
    try:
        async with client.stream("POST", "/v1/chat", json={"query": query, "stream": True}) as r:
            if r.status_code != 200:
                await r.aread()
                return f"{r.status_code} {r.text[:200]}"
            async for line in r.aiter_lines():
                if line.startswith("event: "):
                    last = line[7:]
                elif last == "error" and line.startswith("data: "):
                    return f"error event {line[6:200]}"
            return "" if last == "done" else f"ended after {last or 'nothing'}"
    except httpx.HTTPError as exc:
        cause = exc.__cause__ or exc.__context__
        return f"{type(exc).__name__}: {exc} ({cause!r}) after {last or 'nothing'}"


async def _empty_cache(urls: DatabaseUrls) -> None:
    assert urls.owner is not None
    async with Database(urls.owner, max_size=1, name="owner") as owner, owner.control() as s:
        await s.execute("TRUNCATE semantic_cache")


async def _spans(urls: DatabaseUrls, request_ids: list[str]) -> list[list[dict[str, Any]]]:
    async with Database(urls.app, max_size=1) as db:
        rows = await db.tenant_fetch(
            BENCH_TENANT,
            "SELECT spans FROM request_log WHERE request_id = ANY (%s)",
            (request_ids,),
        )
    return [r["spans"] for r in rows]


async def run_chat_bench(
    urls: DatabaseUrls,
    dataset: BeirDataset,
    work: Path,
    *,
    limit_documents: int | None = None,
    streams: int = 200,
    rounds: int = 3,
    ttft_ms: float = 50.0,
    tokens_per_s: float = 200.0,
    output_tokens: int = 48,
    progress: Callable[[str], None] = lambda _m: None,
) -> ChatBenchResult:
    result = ChatBenchResult(
        mock={"ttft_ms": ttft_ms, "tokens_per_s": tokens_per_s, "output_tokens": output_tokens}
    )
    key, result.documents, result.chunks = await _prepare(urls, dataset, limit_documents, progress)
    queries = list(dict.fromkeys(dataset.queries.values()))
    result.queries = len(queries)
    mock = _start_mock(work, ttft_ms, tokens_per_s, output_tokens)
    server = _start_platform(work, urls, mock.url)
    try:
        await _empty_cache(urls)
        headers = {"authorization": f"Bearer {key}"}
        # the client lets idle connections go before the server's keep-alive timeout (5 s):
        # with equal timeouts a request sent on a connection the server is closing fails
        # with a read error before any byte (seen here: 3-7 of 600 streams, "after nothing")
        limits = httpx.Limits(
            max_connections=streams + 8,
            max_keepalive_connections=streams + 8,
            keepalive_expiry=2.0,
        )
        async with httpx.AsyncClient(
            base_url=server.url, headers=headers, timeout=120, limits=limits
        ) as client:
            progress("warm-up")
            for q in ("warm up the embedder", "and the retriever"):
                await _ask(client, q)
            progress("floor: GET /v1/whoami (HTTP, API key, tenant look-up), one at a time")
            floor = []
            for _ in queries:
                t0 = time.perf_counter()
                r = await client.get("/v1/whoami")
                floor.append((time.perf_counter() - t0) * 1000)
                if r.status_code != 200:
                    result.errors.append(f"whoami {r.status_code}")
            result.floor_latency = _summary(floor)
            progress(f"misses: {len(queries)} queries, one at a time")
            misses, request_ids = [], []
            for q in queries:
                ms, body, error = await _ask(client, q)
                if error:
                    result.errors.append(error)
                    continue
                misses.append(ms)
                request_ids.append(body["request_id"])
            result.miss_latency = _summary(misses)
            progress("hits: the same queries again")
            hits, hit_count = [], 0
            for q in queries:
                ms, body, error = await _ask(client, q)
                if error:
                    result.errors.append(error)
                    continue
                hits.append(ms)
                hit_count += bool(body.get("cache_hit"))
            result.hit_latency = _summary(hits)
            result.hit_rate = hit_count / max(1, len(hits))
            rss = [server.rss_mb()]
            failures: list[str] = []
            for n in range(rounds):
                await _empty_cache(urls)
                progress(f"streams: round {n + 1} of {rounds}, {streams} at once")
                batch = [queries[i % len(queries)] for i in range(n * streams, (n + 1) * streams)]
                outcomes = await asyncio.gather(*(_stream(client, q) for q in batch))
                failures += [o for o in outcomes if o]
                rss.append(server.rss_mb())
            result.streams = {
                "concurrent": streams,
                "rounds": rounds,
                "requests": streams * rounds,
                "errors": len(failures),
                "first_errors": failures[:5],
                "rss_mb": [round(x, 1) for x in rss],
                "rss_growth_after_first_round_pct": round((rss[-1] - rss[1]) / rss[1] * 100, 2)
                if len(rss) > 2
                else None,
            }
        await asyncio.sleep(2.5)  # the request log is written in batches every second
        spans = await _spans(urls, request_ids)
    finally:
        server.stop()
        mock.stop()
    by_step: dict[str, list[float]] = {}
    overhead, pre = [], []
    for request in spans:
        generated = [s for s in request if s["name"] == "generate"]
        if not generated:  # answered from the cache (a near repeat among the queries)
            continue
        pre.append(generated[0]["start_ms"])
        overhead.append(sum(s["ms"] for s in request if s["name"] in OVERHEAD_STEPS))
        for span in request:
            by_step.setdefault(span["name"], []).append(span["ms"])
    result.steps = {name: _summary(v) for name, v in sorted(by_step.items())}
    result.overhead = _summary(overhead)
    result.pre_generation = _summary(pre)
    return result


def dumps(result: ChatBenchResult) -> str:
    return orjson.dumps(result.as_json(), option=orjson.OPT_INDENT_2).decode()
