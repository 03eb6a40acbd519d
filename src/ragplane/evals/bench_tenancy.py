"""What database-enforced isolation costs: RLS unit of work vs. a plain filtered query.

Both sides run the same statements on the same rows over the same kind of
pooled connection, one request at a time:

- ``rls``: the application role through :meth:`Database.tenant` (transaction,
  ``set_config('app.tenant_id', …, true)``, the query with no tenant filter;
  row-level security adds it);
- ``baseline``: the reporting role (whose policy admits every row) in a plain
  transaction, the query carrying ``WHERE tenant_id = %s`` itself, which is what
  isolation in application code looks like.

The ratio of the two is the price of the guarantee; absolute times depend on
the machine.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from ragplane.data import Database, DatabaseUrls, Session

__all__ = ["TenancyBenchResult", "run_tenancy_bench"]

_QUERIES: dict[str, tuple[str, str]] = {
    # name: (query under RLS, baseline query with an explicit tenant filter)
    "point lookup": (
        "SELECT id, title FROM documents WHERE namespace = %(ns)s AND source_uri = %(uri)s",
        "SELECT id, title FROM documents WHERE tenant_id = %(tenant)s AND namespace = %(ns)s "
        "AND source_uri = %(uri)s",
    ),
    "list 20 newest": (
        "SELECT id, title FROM documents WHERE namespace = %(ns)s "
        "ORDER BY created_at DESC LIMIT 20",
        "SELECT id, title FROM documents WHERE tenant_id = %(tenant)s AND namespace = %(ns)s "
        "ORDER BY created_at DESC LIMIT 20",
    ),
    "count tenant rows": (
        "SELECT count(*) AS n FROM documents",
        "SELECT count(*) AS n FROM documents WHERE tenant_id = %(tenant)s",
    ),
}


@dataclass(frozen=True)
class Timing:
    p50_ms: float
    p95_ms: float
    per_s: float


@dataclass(frozen=True)
class TenancyBenchResult:
    tenants: int
    rows: int
    iterations: int
    results: dict[str, dict[str, Timing]]  # query -> {"baseline": …, "rls": …}

    def as_json(self) -> dict[str, Any]:
        return {
            "tenants": self.tenants,
            "rows": self.rows,
            "iterations": self.iterations,
            "queries": {
                q: {
                    side: {"p50_ms": t.p50_ms, "p95_ms": t.p95_ms, "per_s": t.per_s}
                    for side, t in sides.items()
                }
                | {"p50_ratio": sides["rls"].p50_ms / sides["baseline"].p50_ms}
                for q, sides in self.results.items()
            },
        }


async def _seed(urls: DatabaseUrls, tenants: list[str], rows_per_tenant: int) -> None:
    assert urls.owner is not None
    async with Database(urls.owner, max_size=1, name="owner") as owner, owner.control() as s:
        for t in tenants:
            await s.execute(
                "INSERT INTO control.tenants (id, name, home_region) VALUES (%s, %s, 'eu') "
                "ON CONFLICT DO NOTHING",
                (t, t),
            )
    async with Database(urls.app, max_size=1) as app:
        for t in tenants:
            # COPY FROM is refused under row-level security; unnest() batches instead
            uris = [f"doc-{i}" for i in range(rows_per_tenant)]
            async with app.tenant(t) as s:
                await s.execute(
                    "INSERT INTO documents (tenant_id, namespace, source_uri, title, content_hash) "
                    "SELECT %s, 'default', u, 'Doc ' || u, md5(u) FROM unnest(%s::text[]) AS u",
                    (t, uris),
                )
    async with Database(urls.owner, max_size=1, name="owner") as owner, owner.control() as s:
        await s.execute("ANALYZE documents")


async def _time(n: int, call: Callable[[], Awaitable[None]]) -> Timing:
    samples = []
    started = time.perf_counter()
    for _ in range(n):
        t0 = time.perf_counter()
        await call()
        samples.append((time.perf_counter() - t0) * 1000)
    total = time.perf_counter() - started
    q = statistics.quantiles(samples, n=100)
    return Timing(p50_ms=q[49], p95_ms=q[94], per_s=n / total)


async def run_tenancy_bench(
    urls: DatabaseUrls,
    *,
    tenants: int = 50,
    rows_per_tenant: int = 2000,
    iterations: int = 2000,
    seed: int = 7,
    progress: Callable[[str], None] = lambda _msg: None,
) -> TenancyBenchResult:
    """Seed ``tenants`` x ``rows_per_tenant`` documents, then time each query both ways."""
    if urls.owner is None or urls.reporting is None:
        raise ValueError("the tenancy benchmark needs the owner and reporting role URLs")
    names = [f"bench_t{i:03d}" for i in range(tenants)]
    progress(f"seeding {tenants} tenants x {rows_per_tenant} documents")
    await _seed(urls, names, rows_per_tenant)
    rng = random.Random(seed)  # noqa: S311 - reproducible workload, not crypto
    results: dict[str, dict[str, Timing]] = {}
    async with (
        Database(urls.app, max_size=1) as app,
        Database(urls.reporting, max_size=1, name="reporting") as reporting,
    ):
        for name, (rls_sql, base_sql) in _QUERIES.items():
            progress(f"timing {name!r}")

            def params() -> dict[str, Any]:
                return {
                    "tenant": rng.choice(names),
                    "ns": "default",
                    "uri": f"doc-{rng.randrange(rows_per_tenant)}",
                }

            async def via_rls(sql: str = rls_sql) -> None:
                p = params()
                async with app.tenant(p["tenant"]) as s:
                    await _fetch(s, sql, p)

            async def via_filter(sql: str = base_sql) -> None:
                async with reporting.control() as s:
                    await _fetch(s, sql, params())

            await _time(max(50, iterations // 10), via_rls)  # warm caches and plans
            await _time(max(50, iterations // 10), via_filter)
            baseline = await _time(iterations, via_filter)
            rls = await _time(iterations, via_rls)
            results[name] = {"baseline": baseline, "rls": rls}
    return TenancyBenchResult(tenants, tenants * rows_per_tenant, iterations, results)


async def _fetch(session: Session, sql: str, params: dict[str, Any]) -> None:
    rows = await session.fetch_all(sql, params)
    if not rows:
        raise AssertionError(f"benchmark query returned nothing: {sql}")
