"""``ragplane bench``: benchmarks, side by side with a baseline."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

if TYPE_CHECKING:
    pass

from ragplane.cli._common import (
    _run,
    _throwaway_database,
    bench_app,
    err,
    out,
)

__all__ = []


@bench_app.command("tenancy")
def bench_tenancy(
    tenants: Annotated[int, typer.Option(min=1, help="Number of tenants.")] = 50,
    rows: Annotated[int, typer.Option(min=1, help="Documents per tenant.")] = 2000,
    iterations: Annotated[int, typer.Option(min=100, help="Timed queries per side.")] = 2000,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """The cost of RLS isolation: tenant unit of work vs. a plain filtered query.

    Runs on a throwaway embedded database in a temporary directory.
    """
    import json

    from ragplane.evals.bench_tenancy import run_tenancy_bench

    with _throwaway_database() as urls:
        result = _run(
            run_tenancy_bench(
                urls,
                tenants=tenants,
                rows_per_tenant=rows,
                iterations=iterations,
                progress=lambda msg: err.print(f"[dim]{msg}…[/]"),
            )
        )
    if as_json:
        print(json.dumps(result.as_json(), indent=2))
        return
    table = Table(
        "query",
        "baseline p50 ms",
        "baseline p95 ms",
        "RLS p50 ms",
        "RLS p95 ms",
        "p50 ratio",
        title=f"RLS unit of work vs. filtered query "
        f"({result.rows:,} rows, {result.tenants} tenants)",
    )
    for name, sides in result.results.items():
        b, r = sides["baseline"], sides["rls"]
        table.add_row(
            name,
            f"{b.p50_ms:.3f}",
            f"{b.p95_ms:.3f}",
            f"{r.p50_ms:.3f}",
            f"{r.p95_ms:.3f}",
            f"{r.p50_ms / b.p50_ms:.2f}x",
        )
    out.print(table)


@bench_app.command("retrieval")
def bench_retrieval(
    dataset: Annotated[Path, typer.Option(help="BEIR-format directory (corpus, queries, qrels).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    sweep: Annotated[bool, typer.Option(help="Also score a grid of fusion settings.")] = False,
    limit: Annotated[int | None, typer.Option(help="Ingest only the first N documents.")] = None,
    db_dir: Annotated[
        Path | None,
        typer.Option(
            help="Keep the database in this directory (created if missing) and reuse it: "
            "a rerun skips the unchanged corpus (its ingest figures are then a re-ingest's).",
        ),
    ] = None,
) -> None:
    """Retrieval quality and latency: BM25, dense, and ragplane hybrid, side by side.

    Ingests the corpus through the real ingestion path into a throwaway embedded
    database in a temporary directory (or the kept one of ``--db-dir``).
    """
    import json

    from ragplane.evals.bench_retrieval import default_sweep, load_beir, run_retrieval_bench

    data = load_beir(dataset)
    with _throwaway_database(db_dir) as urls:
        result = _run(
            run_retrieval_bench(
                urls,
                data,
                sweep=default_sweep() if sweep else (),
                limit_documents=limit,
                progress=lambda msg: err.print(f"[dim]{msg}[/]"),
            )
        )
    if as_json:
        print(json.dumps(result.as_json(), indent=2))
        return
    table = Table(
        "retriever",
        "nDCG@10",
        "recall@10",
        "recall@100",
        "p50 ms",
        "p95 ms",
        "p50 ms (+embed)",
        "p95 ms (+embed)",
        title=f"{dataset.name}: {result.documents:,} documents, {result.chunks:,} chunks, "
        f"{result.queries} queries",
    )
    for name, r in result.retrievers.items():
        table.add_row(
            name,
            f"{r.ndcg_10:.3f}",
            f"{r.recall_10:.3f}",
            f"{r.recall_100:.3f}",
            f"{r.p50_ms:.2f}",
            f"{r.p95_ms:.2f}",
            "" if r.p50_with_embed_ms is None else f"{r.p50_with_embed_ms:.2f}",
            "" if r.p95_with_embed_ms is None else f"{r.p95_with_embed_ms:.2f}",
        )
    out.print(table)
    ingest = result.as_json()["ingest"]
    ratio = ingest["ratio_to_raw_embedder"]
    out.print(
        f"ingest: {ingest['docs_per_s']} documents/s, {ingest['tokens_per_s']:,} tokens/s "
        f"({'n/a' if ratio is None else format(ratio, '.0%')} of the raw embedder's "
        f"{ingest['raw_embedder_tokens_per_s']:,} tokens/s); re-ingest: "
        f"{ingest['reingest_new_chunks']} new chunks, "
        f"{ingest['reingest_embedding_calls']} embedding calls"
    )
    out.print(f"fusion: {result.fusion}")
    for fusion, ndcg in result.sweep:
        out.print(f"  sweep {fusion} -> nDCG@10 {ndcg:.4f}")


@bench_app.command("scale")
def bench_scale(
    chunks: Annotated[int, typer.Option(min=100, help="Chunk rows in all.")] = 1_000_000,
    tenants: Annotated[int, typer.Option(min=1, help="Tenants (skewed sizes).")] = 100,
    queries: Annotated[int, typer.Option(min=1, help="Queries per measured tenant.")] = 200,
    maintenance_work_mem: Annotated[str, typer.Option(help="For the index build.")] = "4GB",
    workers: Annotated[int, typer.Option(min=0, help="Parallel index-build workers.")] = 1,
    sweep: Annotated[bool, typer.Option(help="Also try other HNSW scan settings.")] = False,
    visit_cost: Annotated[
        float | None,
        typer.Option(min=0, help="The Retriever's hnsw_visit_cost (default: as shipped)."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Filtered ANN at scale: recall@10 against exact search, latency, build time, memory.

    Synthetic vectors, bulk-loaded into a throwaway embedded database in a
    temporary directory (about 4 GB at a million chunks); not part of CI.
    """
    import json

    from ragplane.evals.bench_scale import run_scale_bench
    from ragplane.knowledge.search import HNSW_VISIT_COST

    with _throwaway_database() as urls:
        result = _run(
            run_scale_bench(
                urls,
                chunks=chunks,
                tenants=tenants,
                queries=queries,
                maintenance_work_mem=maintenance_work_mem,
                parallel_workers=workers,
                sweep=sweep,
                hnsw_visit_cost=HNSW_VISIT_COST if visit_cost is None else visit_cost,
                progress=lambda msg: err.print(f"[dim]{msg}[/]"),
            )
        )
    report = result.as_json()
    if as_json:
        print(json.dumps(report, indent=2))
        return
    table = Table(
        "tenant",
        "chunks",
        "share",
        "recall@10",
        "min",
        "p50 ms",
        "p95 ms",
        "exact p50 ms",
        "HNSW plan",
        "searched",
        "planner p50 / p95 ms",
        "HNSW forced p50 / p95 ms",
        title=f"{chunks:,} chunks, {tenants} tenants, {queries} queries per tenant",
    )
    for label, t in report["tenants_measured"].items():
        table.add_row(
            label,
            f"{t['rows']:,}",
            f"{t['share_pct']:.3f}%",
            f"{t['recall@10']:.4f}",
            f"{t['min_recall@10']:.2f}",
            f"{t['p50_ms']:.2f}",
            f"{t['p95_ms']:.2f}",
            f"{t['exact_p50_ms']:.2f}",
            "yes" if t["plan_uses_hnsw"] else "no",
            t["searched"],
            f"{t['planner']['p50_ms']:.2f} / {t['planner']['p95_ms']:.2f}",
            f"{t['hnsw_forced']['p50_ms']:.2f} / {t['hnsw_forced']['p95_ms']:.2f}",
        )
        for name, swept in t["sweep"].items():
            table.add_row(
                f"  {name}",
                "",
                "",
                f"{swept['recall@10']:.4f}",
                f"{swept['min_recall@10']:.2f}",
                f"{swept['p50_ms']:.2f}",
                f"{swept['p95_ms']:.2f}",
            )
    out.print(table)
    out.print(
        f"load {report['load_s']} s; index build {report['index_build_s']} s "
        f"({report['index_build']}); sizes MB {report['sizes_mb']}"
    )
    out.print(f"memory: {report['memory']}")


@bench_app.command("gateway")
def bench_gateway(
    concurrency: Annotated[
        list[int] | None, typer.Option("--concurrency", "-c", min=1, help="Repeatable.")
    ] = None,
    duration: Annotated[int, typer.Option(min=1, help="Seconds per measured run.")] = 10,
    warmup: Annotated[int, typer.Option(min=0, help="Warm-up seconds per target (0: none).")] = 5,
    requests: Annotated[
        int, typer.Option(min=0, help="Soak requests after warm-up (RSS growth).")
    ] = 100_000,
    ttft_duration: Annotated[float, typer.Option(min=0.1, help="Seconds of streams.")] = 5.0,
    target: Annotated[
        list[str] | None,
        typer.Option("--target", "-t", help="floor, ragplane, litellm (repeatable; default all)."),
    ] = None,
    skip_litellm: Annotated[bool, typer.Option(help="Do not run LiteLLM.")] = False,
    litellm: Annotated[
        Path | None,
        typer.Option(help="The litellm executable (default: scripts/litellm-venv.sh's venv)."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """The gateway's overhead next to direct, an aiohttp floor and LiteLLM, side by side.

    Every target is its own process on loopback, in front of one mock provider with a
    50 ms latency; load from wrk. Needs wrk (apt-get install wrk) and, for LiteLLM,
    its venv (scripts/litellm-venv.sh). Runs ragplane on a throwaway embedded database.
    """
    import json
    import tempfile

    from ragplane.evals.bench_gateway import TARGETS, GatewayBenchOptions, run_gateway_bench

    targets = tuple(target or TARGETS)
    unknown = set(targets) - set(TARGETS)
    if unknown:
        raise typer.BadParameter(f"unknown target(s): {', '.join(sorted(unknown))}")
    exe = litellm or Path.home() / ".cache/ragplane/litellm-venv/bin/litellm"
    reason = ""
    if skip_litellm or "litellm" not in targets:
        reason = "--skip-litellm" if skip_litellm else "not requested"
    elif not exe.exists():
        reason = f"{exe} not found: run scripts/litellm-venv.sh"
    with tempfile.TemporaryDirectory(prefix="ragplane-bench-gw-") as tmp:
        opts = GatewayBenchOptions(
            work_dir=Path(tmp),
            concurrencies=tuple(concurrency or (1, 16, 64)),
            duration_s=duration,
            warmup_s=warmup,
            requests=requests,
            ttft_s=ttft_duration,
            targets=targets,
            litellm=None if reason else exe,
            litellm_skip_reason=reason or "not requested",
        )
        progress = lambda msg: err.print(f"[dim]{msg}[/]", highlight=False)  # noqa: E731
        if "ragplane" in targets:
            with _throwaway_database() as urls:
                report = run_gateway_bench(urls, opts, progress)
        else:
            report = run_gateway_bench(None, opts, progress)
    if as_json:
        print(json.dumps(report, indent=2))
        return
    _print_gateway_report(report)


def _print_gateway_report(report: dict[str, Any]) -> None:
    setup = report["setup"]
    table = Table(
        "target",
        "c",
        "req/s",
        "added p50 ms",
        "added p99 ms",
        "CPU ms/req",
        "added TTFT p99 ms",
        "RSS MB",
        "RSS growth %",
        "errors",
        title=f"gateway overhead over a {setup['upstream']} ({setup['cores']} cores, "
        f"load {setup['load_average_before'][0]})",
    )
    for name in ("direct", "floor", "ragplane", "litellm"):
        entry = report.get(name)
        if entry is None:
            continue
        if entry.get("skipped"):
            table.add_row(name, "", f"skipped: {entry['reason']}")
            continue
        for c, f in entry["concurrency"].items():
            ttft = f["added_ttft_p99_ms"]
            table.add_row(
                name,
                c,
                f"{f['rps']:,.0f}",
                f"{f['added_p50_ms']:.2f}",
                f"{f['added_p99_ms']:.2f}",
                f"{f['cpu_ms_per_req']:.3f}",
                "n/a" if ttft is None else f"{ttft:.2f}",
                f"{f['rss_mb']:.0f}",
                f"{f['rss_growth_pct']:.1f}",
                str(f["errors"] + f["ttft_errors"]),
            )
    out.print(table)
    for t in report["targets"]:
        verdict = {True: "[green]met[/]", False: "[red]not met[/]", None: "n/a"}[t["met"]]
        out.print(f"{t['goal']}: {verdict} ({t['measured']})", highlight=False)


@bench_app.command("cache")
def bench_cache(
    pairs: Annotated[
        Path | None, typer.Option(help="JSON-lines pairs (default: fow-cache's 600).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Semantic-cache hit policy: false hits and recall of plain cosine thresholds and of
    ragplane's CachePolicy, overall, per category and on two halves of the pairs.

    Embeds every question once, in memory, with the bundled all-MiniLM-L6-v2.
    """
    import asyncio
    import json

    from ragplane.evals.bench_cache import load_pairs, run_cache_bench
    from ragplane.knowledge.embedder import LocalEmbedder

    data = load_pairs(pairs)
    result = asyncio.run(
        run_cache_bench(data, LocalEmbedder(), progress=lambda msg: err.print(f"[dim]{msg}…[/]"))
    )
    report = result.as_json()
    if as_json:
        print(json.dumps(report, indent=2))
        return
    methods = report["methods"]
    table = Table(
        "method",
        "hits",
        "false hits",
        "precision",
        "recall",
        "half 0 P / R",
        "half 1 P / R",
        title=f"{result.pairs} pairs ({methods['ragplane policy']['should_hit']} should hit)",
    )
    for name, m in methods.items():
        halves = [f"{f['precision']:.3f} / {f['recall']:.3f}" for f in m["folds"]]
        table.add_row(
            name,
            str(m["hits"]),
            str(m["false_hits"]),
            f"{m['precision']:.3f}",
            f"{m['recall']:.3f}",
            *halves,
        )
    out.print(table)
    per = Table(
        "category", *methods, title="per category: recall (should hit) / false hits (traps)"
    )
    for category, policy_score in methods["ragplane policy"]["by_category"].items():
        trap = policy_score["should_hit"] == 0
        cells = []
        for m in methods.values():
            s = m["by_category"][category]
            cells.append(f"{s['false_hits']} of {s['pairs']}" if trap else f"{s['recall']:.3f}")
        per.add_row(f"{category} ({'trap' if trap else 'hit'})", *cells)
    out.print(per)
    for fold in report["two_fold"]:
        held = fold["held_out"]
        out.print(
            f"paraphrase_similarity tuned on half {fold['tuned_on_fold']}: "
            f"{fold['paraphrase_similarity']:.2f} -> other half: {held['hits']} hits, "
            f"{held['false_hits']} false, precision {held['precision']:.3f}, "
            f"recall {held['recall']:.3f}",
            highlight=False,
        )
    v = report["verify_us"]
    out.print(
        f"verify(): p50 {v['p50']} µs, p95 {v['p95']} µs, p99 {v['p99']} µs, max {v['max']} µs",
        highlight=False,
    )


@bench_app.command("guard")
def bench_guard(
    repeats: Annotated[int, typer.Option(min=1, help="Fills of each template per locale.")] = 2,
    seed: Annotated[int, typer.Option(help="Faker seed of the template fills.")] = 5,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Guardrails: injection recall / false positives, structured PII recall, scan latency.

    Injections from bastioncorpus, PII from presidio-evaluator's templates filled by
    faker (both in the bench extra); CPU only, no database.
    """
    import json

    from ragplane.evals.bench_guard import (
        fill_templates,
        load_injection_corpus,
        load_ordinary_questions,
        load_presidio_templates,
        run_guard_bench,
    )
    from ragplane.knowledge.embedder import LocalEmbedder

    sentences = fill_templates(load_presidio_templates(), repeats=repeats, seed=seed)
    result = run_guard_bench(
        load_injection_corpus(),
        sentences,
        embed=LocalEmbedder().encode,
        ordinary=load_ordinary_questions(),
        progress=lambda msg: err.print(f"[dim]{msg}…[/]"),
    )
    report = result.as_json()
    if as_json:
        print(json.dumps(report, indent=2))
        return
    inj, pii, lat = report["injection"], report["pii"], report["latency"]
    table = Table(
        "category",
        "rows",
        "flagged",
        "recall / FPR",
        title=f"prompt injection ({inj['rows']} rows, threshold {inj['threshold']})",
    )
    for cat, c in inj["categories"].items():
        rate = c.get("recall", c.get("fpr"))
        table.add_row(cat, str(c["rows"]), str(c["flagged"]), f"{rate:.3f}")
    table.add_row("[b]malicious: recall[/]", str(inj["malicious_rows"]), "", f"{inj['recall']:.3f}")
    table.add_row("[b]benign: FPR[/]", str(inj["benign_rows"]), "", f"{inj['fpr']:.3f}")
    out.print(table)
    ordinary = inj["ordinary_questions"]
    table = Table(
        "detector",
        "recall / FPR",
        "dev split",
        "holdout split (never read)",
        f"ordinary questions refused (of {ordinary['rows']})",
        title="side by side: the rules, the learned model, both (the platform's decision)",
    )
    for name, d in inj["detectors"].items():
        dev, hold = d["splits"]["dev"], d["splits"]["holdout"]
        table.add_row(
            name,
            f"{d['recall']:.3f} / {d['fpr']:.3f}",
            f"{dev['recall']:.3f} / {dev['fpr']:.3f}",
            f"{hold['recall']:.3f} / {hold['fpr']:.3f}",
            str(ordinary["flagged"].get(name, "")),
        )
    out.print(table)
    if inj["model"]:
        m = inj["model"]
        out.print(
            f"model {m['id']} (trained on {m['trained_on']}), threshold {m['threshold']:.4f}: "
            f"score p50 {m['score_p50_us']} µs, p95 {m['score_p95_us']} µs on the query vector",
            highlight=False,
        )
    table = Table(
        "entity", "inserted", "recall", title=f"structured PII ({pii['sentences']:,} sentences)"
    )
    for kind, recall in pii["recall"].items():
        table.add_row(kind, str(pii["inserted"][kind]), f"{recall:.3f}")
    out.print(table)
    out.print(f"false positives (findings over no inserted value): {pii['false_positives']}")
    out.print(
        f"InputGuard.scan over {lat['scans']:,} texts: p50 {lat['p50_ms']:.3f} ms, "
        f"p95 {lat['p95_ms']:.3f} ms, p99 {lat['p99_ms']:.3f} ms, max {lat['max_ms']:.3f} ms"
    )
    for t in report["targets"]:
        verdict = {True: "[green]met[/]", False: "[red]not met[/]", None: "n/a"}[t["met"]]
        out.print(f"{t['goal']}: {verdict} ({t['measured']})", highlight=False)


@bench_app.command("chat")
def bench_chat(
    dataset: Annotated[Path, typer.Option(help="BEIR-format directory (corpus, queries, qrels).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    limit: Annotated[int | None, typer.Option(help="Ingest only the first N documents.")] = None,
    streams: Annotated[int, typer.Option(min=1, help="Concurrent SSE requests.")] = 200,
    rounds: Annotated[int, typer.Option(min=1, help="Rounds of concurrent streams.")] = 3,
    db_dir: Annotated[
        Path | None,
        typer.Option(help="Keep the database in this directory and reuse it (skips ingest)."),
    ] = None,
) -> None:
    """/v1/chat end to end over HTTP with the mock provider: cache misses and hits, the
    platform's own overhead per step (from the request log's spans), and concurrent
    streams with the server's memory."""
    import json
    import tempfile

    from ragplane.evals.bench_chat import run_chat_bench
    from ragplane.evals.bench_retrieval import load_beir

    data = load_beir(dataset)
    with _throwaway_database(db_dir) as urls, tempfile.TemporaryDirectory() as work:
        result = _run(
            run_chat_bench(
                urls,
                data,
                Path(work),
                limit_documents=limit,
                streams=streams,
                rounds=rounds,
                progress=lambda msg: err.print(f"[dim]{msg}[/]"),
            )
        )
    report = result.as_json()
    if as_json:
        print(json.dumps(report, indent=2))
        return
    out.print(
        f"{dataset.name}: {result.documents:,} documents, {result.chunks:,} chunks, "
        f"{result.queries} queries; mock provider {result.mock}"
    )
    table = Table("measure", "n", "p50 ms", "p95 ms", "target")
    rows = [
        ("floor: GET /v1/whoami (HTTP + auth + tenant)", result.floor_latency, "baseline"),
        ("cache miss, end to end", result.miss_latency, ""),
        ("cache hit, end to end", result.hit_latency, "p95 <= 20"),
        ("miss overhead (guard+cache+embed+retrieve+assemble)", result.overhead, "p95 <= 60"),
        ("lifecycle start -> gateway call", result.pre_generation, ""),
    ]
    for name, s, target in rows:
        table.add_row(name, str(s.get("n")), str(s.get("p50_ms")), str(s.get("p95_ms")), target)
    out.print(table)
    steps = Table("step (spans)", "n", "p50 ms", "p95 ms", title="per step, cache-miss requests")
    for name, s in result.steps.items():
        steps.add_row(name, str(s["n"]), str(s["p50_ms"]), str(s["p95_ms"]))
    out.print(steps)
    out.print(f"hit rate on the second pass: {result.hit_rate:.1%}")
    out.print(f"streams: {report['streams']}")
    out.print(f"targets: {report['targets']}")
