"""``ragplane bench gateway``: the gateway's overhead side by side with a floor and LiteLLM.

Every target forwards the same OpenAI chat-completions request to the SAME upstream,
one ``ragplane mock-provider`` process with a fixed latency (50 ms), all on loopback:

- ``direct``: the load generator talks to the mock itself (the baseline);
- ``floor``: an aiohttp server forwarding through one shared ClientSession
  (:mod:`ragplane.evals.floor_proxy`): no auth, routing or ledger;
- ``ragplane``: ``ragplane serve gateway`` with a service key, a registered tenant
  (``X-Tenant-Id``), routing, breaker, bulkheads and the ledger writing to Postgres;
- ``litellm``: the LiteLLM proxy from its own virtual environment
  (``scripts/litellm-venv.sh``), 2 workers, one model pointing at the mock.

Load comes from ``wrk`` (one thread, keep-alive connections, a Lua script that POSTs
the body and prints its figures as JSON, :mod:`ragplane.evals.wrk`). Per target and
concurrency: requests/s, latency p50/p99 (and "added": minus ``direct`` at the same
concurrency), CPU seconds of the target's process tree per request, and RSS. The CPU
of a run is counted from a settled start to a settled end: each run begins
``settle_s`` after the previous load (so work it deferred — a ragplane ledger flush of
the warm-up's rows — is not billed to this run) and its CPU snapshot is taken
``settle_s`` after wrk stopped (so the work this run deferred is). Time to first token
of streams is measured by an aiohttp client (time from sending the request to the
first ``data:`` line, as many concurrent streams as the concurrency).
RSS growth: the tree's RSS after the measured runs (the warm-up) against
after ``requests`` more at the highest concurrency (the soak).

The processes are started by :mod:`ragplane.evals.gateway_launch`, measured through
:mod:`ragplane.evals.gateway_targets` (``/proc``), and the report's targets checked by
:mod:`ragplane.evals.gateway_verdict`. The load generator and the bench itself share
the machine's cores with the targets.
"""

from __future__ import annotations

import asyncio
import math
import os
import secrets
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from ragplane.config import LedgerSettings
from ragplane.data import DatabaseUrls
from ragplane.errors import RagplaneError
from ragplane.evals.gateway_launch import start_floor, start_litellm, start_mock, start_ragplane
from ragplane.evals.gateway_targets import TargetProcess, cpu_between
from ragplane.evals.gateway_verdict import assess
from ragplane.evals.wrk import WrkFigures, measure_ttft, run_wrk, wrk_version

__all__ = ["TARGETS", "GatewayBenchOptions", "run_gateway_bench"]

TARGETS = ("direct", "floor", "ragplane", "litellm")
TENANT = "tnt_bench_gateway"
SERVICE_KEY = "svc-bench-" + secrets.token_hex(16)
ALIAS = "fast"
PROMPT = "Summarise the benefits of connection pooling in one short paragraph."


@dataclass(frozen=True)
class GatewayBenchOptions:
    work_dir: Path
    concurrencies: tuple[int, ...] = (1, 16, 64)
    duration_s: int = 10
    warmup_s: int = 5
    requests: int = 100_000
    ttft_s: float = 5.0
    upstream_latency_ms: float = 50.0
    targets: tuple[str, ...] = TARGETS
    litellm: Path | None = None  # the litellm executable of its own venv
    litellm_skip_reason: str = "not requested"
    litellm_workers: int = 2
    # quiet time around each measured run: longer than the ledger's flush interval
    settle_s: float = LedgerSettings().flush_interval_s + 1.0


@dataclass
class _Measured:
    """One target: per-concurrency wrk figures, CPU, RSS and TTFT; the soak."""

    runs: dict[int, WrkFigures] = field(default_factory=dict)
    cpu_s: dict[int, float] = field(default_factory=dict)
    rss_mb: dict[int, float] = field(default_factory=dict)
    ttft_ms: dict[int, tuple[list[float], int]] = field(default_factory=dict)
    rss_warm_mb: float = 0.0
    rss_after_mb: float = 0.0
    soak_requests: int = 0
    soak_errors: int = 0
    processes: int = 1
    version: str = ""


def _body(stream: bool) -> bytes:
    body: dict[str, Any] = {
        "model": ALIAS,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": 16,
    }
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    return orjson.dumps(body)


def _measure(
    name: str,
    target: TargetProcess,
    headers: dict[str, str],
    opts: GatewayBenchOptions,
    progress: Callable[[str], None],
) -> _Measured:
    url = f"{target.url}/v1/chat/completions"
    script = opts.work_dir / f"{name}.lua"
    m = _Measured()
    top = max(opts.concurrencies)
    _first_answer(target, url, headers)
    if opts.warmup_s > 0:
        progress(f"{name}: warm-up {opts.warmup_s} s at c={top}")
        run_wrk(url, headers, _body(False), script, concurrency=top, duration_s=opts.warmup_s)
    for c in opts.concurrencies:
        target.check_alive()
        time.sleep(opts.settle_s)  # what the previous load deferred is done by now
        before = target.cpu()
        m.runs[c] = run_wrk(
            url, headers, _body(False), script, concurrency=c, duration_s=opts.duration_s
        )
        time.sleep(opts.settle_s)  # ... and what this run deferred
        m.cpu_s[c] = cpu_between(before, target.cpu())
        m.rss_mb[c] = target.rss_mb()
        r = m.runs[c]
        progress(
            f"{name}: c={c} {r.rps:,.0f} req/s p50 {r.p50_ms:.2f} ms p99 {r.p99_ms:.2f} ms "
            f"cpu {1000 * m.cpu_s[c] / max(r.requests, 1):.3f} ms/req errors {r.errors}"
        )
    for c in opts.concurrencies:
        m.ttft_ms[c] = asyncio.run(
            measure_ttft(url, headers, _body(True), concurrency=c, duration_s=opts.ttft_s)
        )
    target.check_alive()
    m.rss_warm_mb = target.rss_mb()
    rps = max(m.runs[top].rps, 1.0)
    while m.soak_requests < opts.requests:
        left = opts.requests - m.soak_requests
        chunk = max(1, min(30, math.ceil(left / rps)))
        progress(f"{name}: soak, {m.soak_requests:,}/{opts.requests:,} requests")
        r = run_wrk(url, headers, _body(False), script, concurrency=top, duration_s=chunk)
        m.soak_requests += r.requests
        m.soak_errors += r.errors
        rps = max(r.rps, 1.0)
    target.check_alive()
    m.rss_after_mb = target.rss_mb()
    m.processes = len(target.tree())
    m.version = target.notes.get("version", "")
    return m


def _first_answer(target: TargetProcess, url: str, headers: dict[str, str]) -> None:
    """One call must succeed before load starts (a listening proxy may still be loading)."""
    request = urllib.request.Request(  # noqa: S310 (a loopback URL)
        url, data=_body(False), headers=headers | {"content-type": "application/json"}
    )
    deadline = time.monotonic() + 120
    while True:
        target.check_alive()
        try:
            with urllib.request.urlopen(request, timeout=60) as r:  # noqa: S310
                if int(r.status) == 200:
                    return
        except (urllib.error.URLError, OSError) as exc:
            if time.monotonic() > deadline:
                raise RagplaneError(f"{target.name} does not answer {url}: {exc}") from exc
        time.sleep(0.5)


# -- the run -----------------------------------------------------------------------------


def run_gateway_bench(
    urls: DatabaseUrls | None,
    opts: GatewayBenchOptions,
    progress: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    """Run every requested target against one mock upstream; the JSON report.

    ``urls``: a database with migrations applied, for the ``ragplane`` target (its
    tenant registry and ledger); ``None`` only when that target is not requested.
    """
    load_before = os.getloadavg()
    measured: dict[str, _Measured] = {}
    skipped: dict[str, str] = {}
    mock = start_mock(opts.work_dir, opts.upstream_latency_ms)
    try:
        plain = {"x-tenant-id": TENANT}
        for name in TARGETS:
            if name != "direct" and name not in opts.targets:
                skipped[name] = "not requested"
                continue
            if name == "litellm" and opts.litellm is None:
                skipped[name] = opts.litellm_skip_reason
                progress(f"litellm: skipped ({opts.litellm_skip_reason})")
                continue
            progress(f"{name}: starting")
            if name == "direct":
                target, headers = mock, plain | {"authorization": "Bearer sk-mock"}
            elif name == "floor":
                target, headers = start_floor(opts.work_dir, mock.url), plain
            elif name == "ragplane":
                if urls is None:
                    raise ValueError("the ragplane target needs a database")
                target = start_ragplane(
                    opts.work_dir,
                    mock.url,
                    urls,
                    tenant=TENANT,
                    service_key=SERVICE_KEY,
                    alias=ALIAS,
                )
                headers = plain | {"authorization": f"Bearer {SERVICE_KEY}"}
            else:
                assert opts.litellm is not None
                target = start_litellm(
                    opts.work_dir, opts.litellm, mock.url, alias=ALIAS, workers=opts.litellm_workers
                )
                headers = plain | {"authorization": f"Bearer {target.notes['master_key']}"}
            try:
                measured[name] = _measure(name, target, headers, opts, progress)
            finally:
                if target is not mock:
                    target.stop()
    finally:
        mock.stop()
    setup = {
        "cores": os.cpu_count(),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "load_generator": f"{wrk_version()}, 1 thread, keep-alive; shares the cores",
        "upstream": f"ragplane mock-provider, {opts.upstream_latency_ms:g} ms fixed latency",
        "concurrencies": list(opts.concurrencies),
        "duration_s": opts.duration_s,
        "warmup_s": opts.warmup_s,
        "ttft_s": opts.ttft_s,
        "soak_requests": opts.requests,
    }
    return _report(measured, skipped, setup, opts.concurrencies)


def _report(
    measured: dict[str, _Measured],
    skipped: dict[str, str],
    setup: dict[str, Any],
    concurrencies: tuple[int, ...],
) -> dict[str, Any]:
    direct = measured["direct"]
    report: dict[str, Any] = {"setup": setup}
    for name in TARGETS:
        if name in skipped:
            report[name] = {"skipped": True, "reason": skipped[name]}
            continue
        m = measured.get(name)
        if m is None:
            continue
        growth = 100 * (m.rss_after_mb - m.rss_warm_mb) / m.rss_warm_mb if m.rss_warm_mb else 0.0
        per_c: dict[str, Any] = {}
        for c in concurrencies:
            r, d = m.runs[c], direct.runs[c]
            ttft, ttft_errors = m.ttft_ms[c]
            ttft_p99 = _pct(ttft, 99)
            per_c[str(c)] = {
                "rps": round(r.rps, 1),
                "added_p50_ms": round(r.p50_ms - d.p50_ms, 3),
                "added_p99_ms": round(r.p99_ms - d.p99_ms, 3),
                "cpu_ms_per_req": round(1000 * m.cpu_s[c] / max(r.requests, 1), 4),
                "added_ttft_p99_ms": _num(ttft_p99 - _pct(direct.ttft_ms[c][0], 99)),
                "rss_mb": round(m.rss_mb[c], 1),
                "rss_growth_pct": round(growth, 2),
                "p50_ms": round(r.p50_ms, 3),
                "p99_ms": round(r.p99_ms, 3),
                "ttft_p50_ms": _num(_pct(ttft, 50)),
                "ttft_p99_ms": _num(ttft_p99),
                "requests": r.requests,
                "errors": r.errors,
                "ttft_streams": len(ttft),
                "ttft_errors": ttft_errors,
            }
        report[name] = {
            "concurrency": per_c,
            "rss": {
                "warm_mb": round(m.rss_warm_mb, 1),
                "after_mb": round(m.rss_after_mb, 1),
                "soak_requests": m.soak_requests,
                "soak_errors": m.soak_errors,
                "growth_pct": round(growth, 2),
            },
            "processes": m.processes,
        } | ({"version": m.version} if m.version else {})
    report["targets"] = assess(report, concurrencies)
    return report


def _pct(values: list[float], q: float) -> float:
    if not values:
        return math.nan  # no stream answered: reported as null
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1)]


def _num(x: float, digits: int = 3) -> float | None:
    return None if math.isnan(x) else round(x, digits)
