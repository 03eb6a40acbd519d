"""The cost ledger against the real database: every field, batching, RLS, overflow into
the spill file, draining on stop, a database that is gone at shutdown, and a process
stopped by SIGTERM mid-stream (``ledger_child.py``)."""

from __future__ import annotations

import json
import math
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import psycopg
import pytest
import structlog.testing

from ragplane.config import LedgerSettings
from ragplane.data import Database
from ragplane.data.ledger_store import CostLine, tenant_costs, write_ledger_rows
from ragplane.gateway import ledger as ledger_module
from ragplane.gateway.ledger import LedgerSink, ledger_row
from ragplane.gateway.types import LedgerEntry, Usage
from tests.conftest import PgCluster

ALPHA, BETA = "tnt_alpha", "tnt_beta"
CHILD = Path(__file__).with_name("ledger_child.py")


def entry(n: int, tenant: str = ALPHA, **overrides: Any) -> LedgerEntry:
    values: dict[str, Any] = {
        "request_id": f"req-{tenant}-{n:05d}",
        "tenant_id": tenant,
        "alias": "support-quality",
        "route": "support-quality/sonnet",
        "provider": "anthropic",
        "model": "claude-sonnet",
        "api": "openai",
        "stream": True,
        "status": "ok",
        "http_status": 200,
        "attempts": 1,
        "usage": Usage(
            input_tokens=100 + n,
            output_tokens=20,
            cache_read_tokens=3,
            cache_write_tokens=4,
            reasoning_tokens=5,
        ),
        "cost_usd": 0.000123456,
        "latency_ms": 812.5,
        "ttft_ms": 120.25,
        "feature_id": "chat",
        "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736",
    }
    values.update(overrides)
    return LedgerEntry(**values)


def settings(**overrides: Any) -> LedgerSettings:
    values: dict[str, Any] = {"queue_size": 1000, "batch_size": 100, "flush_interval_s": 60.0}
    values.update(overrides)
    return LedgerSettings(**values)


async def stored(pg: PgCluster) -> list[dict[str, Any]]:
    """Every ledger row of every tenant, read as the reporting role."""
    async with await psycopg.AsyncConnection.connect(
        pg.reporting, autocommit=True, row_factory=psycopg.rows.dict_row
    ) as conn:
        cur = await conn.execute("SELECT * FROM llm_ledger ORDER BY request_id")
        return await cur.fetchall()


def request_ids(rows: list[dict[str, Any]]) -> list[str]:
    return [r["request_id"] for r in rows]


def spill_files(spill_dir: Path) -> list[Path]:
    return sorted(spill_dir.glob("spill-*.jsonl"))


async def until(predicate: Any) -> None:
    """Yield to the event loop until ``predicate()`` holds (the test timeout bounds it)."""
    while not predicate():  # noqa: ASYNC110 -- polls the sink's counters, which set no event
        await anyio.sleep(0.01)


@asynccontextmanager
async def table_locked(pg: PgCluster) -> AsyncIterator[None]:
    """Hold a lock that blocks inserts into llm_ledger (reads still pass) until exit."""
    async with await psycopg.AsyncConnection.connect(pg.owner) as conn:
        await conn.execute("LOCK TABLE llm_ledger IN SHARE MODE")
        try:
            yield
        finally:
            await conn.rollback()


# --------------------------------------------------------------------------- rows


async def test_a_row_carries_every_field(clean_db: PgCluster, app_db: Database, tmp_path: Path):
    sink = LedgerSink(app_db, settings(), tmp_path)
    await sink.start()
    before = datetime.now(UTC)
    sink.submit(entry(7, extra={"cached": True, "guard": "pass"}))
    sink.submit(
        entry(
            8,
            route=None,
            provider=None,
            model=None,
            api="anthropic",
            stream=False,
            status="no_healthy_route",
            http_status=503,
            attempts=3,
            usage=Usage(),
            cost_usd=0.0,
            ttft_ms=None,
            feature_id=None,
            trace_id=None,
        )
    )
    await sink.stop()
    ok, failed = await stored(clean_db)
    assert isinstance(ok["id"], type(failed["id"]))
    assert ok["id"] != failed["id"]
    assert ok["id"].version == 7
    assert before <= ok["created_at"] <= datetime.now(UTC)
    assert {k: v for k, v in ok.items() if k not in ("id", "created_at")} == {
        "tenant_id": ALPHA,
        "request_id": "req-tnt_alpha-00007",
        "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736",
        "feature_id": "chat",
        "alias": "support-quality",
        "route": "support-quality/sonnet",
        "provider": "anthropic",
        "model": "claude-sonnet",
        "api": "openai",
        "stream": True,
        "status": "ok",
        "http_status": 200,
        "attempts": 1,
        "input_tokens": 107,
        "output_tokens": 20,
        "cache_read_tokens": 3,
        "cache_write_tokens": 4,
        "reasoning_tokens": 5,
        "cost_usd": Decimal("0.000123456"),
        "latency_ms": 812.5,
        "ttft_ms": 120.25,
        "extra": {"cached": True, "guard": "pass"},
    }
    assert (failed["route"], failed["provider"], failed["model"], failed["ttft_ms"]) == (
        None,
        None,
        None,
        None,
    )
    assert (failed["status"], failed["http_status"], failed["attempts"]) == (
        "no_healthy_route",
        503,
        3,
    )
    assert (failed["feature_id"], failed["trace_id"], failed["cost_usd"]) == (
        None,
        None,
        Decimal("0E-9"),
    )
    assert (sink.submitted, sink.written, sink.overflowed, sink.spilled_pending) == (2, 2, 0, 0)


async def test_rows_are_written_in_batches(clean_db: PgCluster, app_db: Database, tmp_path: Path):
    n, batch = 230, 50
    sink = LedgerSink(app_db, settings(batch_size=batch), tmp_path)
    await sink.start()
    for i in range(n):  # no await in between: the flusher sees them all at once
        sink.submit(entry(i, tenant=(ALPHA, BETA, "tnt_gamma")[i % 3]))
    await sink.stop()
    rows = await stored(clean_db)
    assert len(rows) == n == sink.written
    assert len({r["id"] for r in rows}) == n
    assert 0 < sink.write_transactions <= math.ceil(n / batch)
    assert sink.failed_writes == sink.overflowed == 0


async def test_submit_later_makes_the_entry_in_the_flusher_not_on_the_response_path(
    clean_db: PgCluster, app_db: Database, tmp_path: Path
):
    made: list[int] = []

    def make(n: int) -> LedgerEntry:
        made.append(n)
        return entry(n)

    sink = LedgerSink(app_db, settings(queue_size=2), tmp_path)
    await sink.start()
    sink.submit_later(make, 1)
    sink.submit_later(make, 2)
    assert made == []  # queued as (make, args): nothing built yet
    sink.submit_later(make, 3)  # the queue is full: spilled at once, so made now
    assert made == [3]
    await sink.stop()
    assert sorted(made) == [1, 2, 3]
    assert sorted(r["request_id"] for r in await stored(clean_db)) == [
        f"req-{ALPHA}-{n:05d}" for n in (1, 2, 3)
    ]


async def test_a_large_batch_is_made_in_slices_that_let_other_tasks_run(
    clean_db: PgCluster, app_db: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Making 500 rows takes milliseconds: the flusher yields between slices so the
    responses the event loop is serving are not held up behind a whole batch."""
    order: list[str] = []

    def recorded_row(e: LedgerEntry, at: float | None = None) -> Any:
        order.append("row")
        return ledger_row(e, at)

    monkeypatch.setattr("ragplane.gateway.ledger.ledger_row", recorded_row)
    n = 3 * ledger_module.ROWS_PER_SLICE
    sink = LedgerSink(app_db, settings(batch_size=n), tmp_path)
    await sink.start()

    async def ticker() -> None:
        while True:
            order.append("tick")
            await anyio.lowlevel.checkpoint()

    async with anyio.create_task_group() as tg:
        tg.start_soon(ticker)
        for i in range(n):
            sink.submit(entry(i))
        await until(lambda: sink.written == n)
        tg.cancel_scope.cancel()
    await sink.stop()
    rows = "".join("r" if x == "row" else "t" for x in order).strip("t")
    slices = [s for s in rows.split("t") if s]
    assert [len(s) for s in slices] == [ledger_module.ROWS_PER_SLICE] * 3
    assert sink.write_transactions == 1


async def test_a_full_batch_is_written_without_waiting_for_the_interval(
    clean_db: PgCluster, app_db: Database, tmp_path: Path
):
    sink = LedgerSink(app_db, settings(batch_size=10, flush_interval_s=3600), tmp_path)
    await sink.start()
    for i in range(10):
        sink.submit(entry(i))
    await until(lambda: sink.written == 10)
    assert len(await stored(clean_db)) == 10
    sink.submit(entry(10))  # below a batch: waits for the interval (or stop)
    await anyio.sleep(0.2)
    assert sink.written == 10
    assert sink.queued == 1
    await sink.stop()
    assert sink.written == 11


async def test_a_row_is_written_flush_interval_after_it_arrived_and_not_before(
    clean_db: PgCluster, app_db: Database, tmp_path: Path
):
    """The flusher sleeps while nothing is queued (no timer) and gives the first row
    flush_interval_s to gather a batch; an idle sink writes nothing."""
    interval = 0.3
    sink = LedgerSink(app_db, settings(flush_interval_s=interval), tmp_path)
    await sink.start()
    await anyio.sleep(2 * interval)  # idle: nothing to write, no transaction
    assert sink.write_transactions == 0
    submitted = anyio.current_time()
    sink.submit(entry(1))
    await anyio.sleep(interval / 2)
    sink.submit(entry(2))  # joins the batch the first row opened
    await until(lambda: sink.written == 2)
    assert anyio.current_time() - submitted >= interval * 0.9
    assert sink.write_transactions == 1
    await sink.stop()


async def test_a_tenant_sees_only_its_own_rows_and_cannot_change_them(
    clean_db: PgCluster, app_db: Database, tmp_path: Path
):
    sink = LedgerSink(app_db, settings(), tmp_path)
    await sink.start()
    for i in range(6):
        sink.submit(entry(i, tenant=ALPHA, feature_id=("chat", "search")[i % 2], cost_usd=0.25))
    for i in range(4):
        sink.submit(entry(i, tenant=BETA, cost_usd=1.0))
    await sink.stop()
    assert sink.write_transactions == 1  # both tenants in one transaction
    async with app_db.tenant(ALPHA) as s:
        rows = await s.fetch_all("SELECT tenant_id, request_id FROM llm_ledger")
        assert {r["tenant_id"] for r in rows} == {ALPHA}
        assert len(rows) == 6
        visible = await s.fetch_one(
            "SELECT count(*) AS n FROM llm_ledger WHERE tenant_id = %s", (BETA,)
        )
        assert visible == {"n": 0}
    async with app_db.control() as s:  # no tenant set: nothing
        assert await s.fetch_one("SELECT count(*) AS n FROM llm_ledger") == {"n": 0}
    # append-only for the application role
    for stmt in ("UPDATE llm_ledger SET cost_usd = 0", "DELETE FROM llm_ledger"):
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            async with app_db.tenant(ALPHA) as s:
                await s.execute(stmt)  # type: ignore[arg-type]
    since = datetime.now(UTC) - timedelta(hours=1)
    costs = await tenant_costs(app_db, ALPHA, since)
    assert costs == [
        CostLine(
            "support-quality", "chat", 3, 0, 3 * 100 + 0 + 2 + 4, 60, 9, 12, 15, Decimal("0.75")
        ),
        CostLine(
            "support-quality", "search", 3, 0, 3 * 100 + 1 + 3 + 5, 60, 9, 12, 15, Decimal("0.75")
        ),
    ]
    assert await tenant_costs(app_db, ALPHA, datetime.now(UTC) + timedelta(seconds=1)) == []
    (beta,) = await tenant_costs(app_db, BETA, since)
    assert (beta.calls, beta.cost_usd) == (4, Decimal("4"))


# --------------------------------------------------------------------------- overflow


async def test_overflow_spills_and_every_row_lands_once(
    clean_db: PgCluster, app_db: Database, tmp_path: Path
):
    """A queue of 5 with the table locked: 100 submits overflow into the spill file,
    with one error log for the burst; after the lock goes, stop() leaves all 100 in the
    table exactly once and no spill file behind."""
    sink = LedgerSink(app_db, settings(queue_size=5, batch_size=5, flush_interval_s=0.01), tmp_path)
    await sink.start()
    with structlog.testing.capture_logs() as logs:
        async with table_locked(clean_db):
            sink.submit(entry(0))
            await until(lambda: sink.in_flight == 1)  # the flusher is stuck on the lock
            for i in range(1, 100):
                sink.submit(entry(i))
            assert sink.queued == 5
            assert sink.overflowed == 94 == sink.spilled_pending
            assert len(spill_files(tmp_path)) == 1
            assert await stored(clean_db) == []
        await sink.stop()
    rows = await stored(clean_db)
    assert request_ids(rows) == [f"req-tnt_alpha-{i:05d}" for i in range(100)]
    assert (sink.submitted, sink.written, sink.overflowed) == (100, 100, 94)
    assert sink.spilled_pending == 0
    assert spill_files(tmp_path) == []
    alarms = [e for e in logs if e["event"] == "ledger_queue_full"]
    assert len(alarms) == 1
    assert alarms[0]["log_level"] == "error"


async def test_stop_drains_rows_in_flight_and_queued(
    clean_db: PgCluster, app_db: Database, tmp_path: Path
):
    sink = LedgerSink(app_db, settings(batch_size=100, flush_interval_s=3600), tmp_path)
    await sink.start()
    async with anyio.create_task_group() as tg, table_locked(clean_db):
        for i in range(150):
            sink.submit(entry(i))
        await until(lambda: sink.in_flight == 100)  # stuck on the lock
        assert sink.queued == 50
        tg.start_soon(sink.stop)
        await anyio.sleep(0.05)
        assert await stored(clean_db) == []
        # the lock is gone; stop() returns once all 150 are in
    assert len(await stored(clean_db)) == 150 == sink.written
    assert sink.spilled_pending == 0
    assert spill_files(tmp_path) == []


async def test_a_cancelled_stop_still_keeps_every_row(
    clean_db: PgCluster, app_db: Database, tmp_path: Path
):
    """The shutdown gives up on the drain (stop() is cancelled) while a batch is stuck:
    the batch and the queue go to the spill file, and the next start writes each once
    (whether or not the stuck batch committed after all)."""
    sink = LedgerSink(app_db, settings(batch_size=10), tmp_path)
    await sink.start()
    async with table_locked(clean_db):
        for i in range(25):
            sink.submit(entry(i))
        await until(lambda: sink.in_flight == 10)
        with anyio.move_on_after(0.1):
            await sink.stop()
        assert sink.spilled_pending == 25
        assert len(spill_files(tmp_path)) == 1
    again = LedgerSink(app_db, settings(), tmp_path)
    await again.start()
    await again.stop()
    assert request_ids(await stored(clean_db)) == [f"req-tnt_alpha-{i:05d}" for i in range(25)]
    assert spill_files(tmp_path) == []


# --------------------------------------------------------------------------- database gone


def refusing_url(pg: PgCluster) -> str:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"postgresql://ragplane_app@127.0.0.1:{port}/ragplane"


async def test_a_failed_write_is_kept_and_retried_until_the_database_takes_it(
    clean_db: PgCluster, app_db: Database, tmp_path: Path
):
    """While the database refuses the writes, each batch moves to the spill file (on disk,
    not in memory) and the sink retries with backoff; once it takes them, every row is
    written once and the spill file is gone, without a restart."""
    sink = LedgerSink(
        app_db,
        settings(batch_size=5, flush_interval_s=0.01),
        tmp_path,
        retry_base_s=0.01,
        retry_max_s=0.05,
    )
    async with await psycopg.AsyncConnection.connect(clean_db.owner, autocommit=True) as owner:
        await owner.execute("REVOKE INSERT ON llm_ledger FROM ragplane_app")
        try:
            await sink.start()
            for i in range(12):
                sink.submit(entry(i))
            await until(lambda: sink.failed_writes >= 4)
            assert sink.written == 0
            assert sink.queued == 0
            assert sink.spilled_pending == 12
            assert len(spill_files(tmp_path)) == 1
        finally:
            await owner.execute("GRANT INSERT ON llm_ledger TO ragplane_app")
    await until(lambda: sink.written == 12)
    assert sink.spilled_pending == 0
    assert spill_files(tmp_path) == []
    await sink.stop()
    assert request_ids(await stored(clean_db)) == [f"req-tnt_alpha-{i:05d}" for i in range(12)]


async def test_a_database_gone_at_shutdown_leaves_a_spill_the_next_start_replays(
    clean_db: PgCluster, app_db: Database, tmp_path: Path
):
    async with Database(refusing_url(clean_db), min_size=0, timeout_s=1, name="gone") as gone:
        sink = LedgerSink(gone, settings(batch_size=16), tmp_path, retry_base_s=0.01)
        await sink.start()
        for i in range(40):
            sink.submit(entry(i))
        await sink.stop(timeout_s=30)
    assert sink.failed_writes >= 1
    assert sink.written == 0
    assert sink.spilled_pending == 40
    assert sink.lost == 0
    (spill,) = spill_files(tmp_path)
    assert len(spill.read_bytes().splitlines()) == 40
    assert await stored(clean_db) == []

    again = LedgerSink(app_db, settings(), tmp_path)
    await again.start()
    assert again.spilled_pending == 40
    await again.stop()
    assert request_ids(await stored(clean_db)) == [f"req-tnt_alpha-{i:05d}" for i in range(40)]
    assert (again.written, again.spilled_pending) == (40, 0)
    assert spill_files(tmp_path) == []


async def test_a_replay_of_rows_already_committed_writes_nothing_twice(
    clean_db: PgCluster, app_db: Database, tmp_path: Path
):
    """A crash between a batch's commit and the removal of its spill file: the rows are
    in the table and in the file. The next start replays the file and stores each once."""
    rows = [ledger_row(entry(i)) for i in range(30)]
    result = await write_ledger_rows(app_db, rows[:20])
    assert (result.inserted, result.duplicates, result.rejected) == (20, 0, ())
    dead = LedgerSink(app_db, settings(), tmp_path)
    dead._spill_rows(rows)  # what the dead process left behind
    dead._spill.handle.close()  # type: ignore[union-attr]  # its lock dies with it
    sink = LedgerSink(app_db, settings(batch_size=8), tmp_path)
    await sink.start()
    await sink.stop()
    assert request_ids(await stored(clean_db)) == [r.request_id for r in rows]
    assert (sink.written, sink.duplicates) == (10, 20)
    assert spill_files(tmp_path) == []


async def test_a_live_sinks_spill_file_is_not_taken_by_another(
    clean_db: PgCluster, app_db: Database, tmp_path: Path
):
    live = LedgerSink(app_db, settings(queue_size=1), tmp_path)
    live.submit(entry(0))
    live.submit(entry(1))  # overflows into live's own spill file (it holds the lock)
    other = LedgerSink(app_db, settings(), tmp_path)
    await other.start()
    await other.stop()
    assert other.spilled_pending == 0
    assert other.written == 0
    await live.start()
    await live.stop()
    assert request_ids(await stored(clean_db)) == ["req-tnt_alpha-00000", "req-tnt_alpha-00001"]


async def test_rows_the_database_refuses_go_to_the_rejected_file(
    clean_db: PgCluster, app_db: Database, tmp_path: Path
):
    sink = LedgerSink(app_db, settings(), tmp_path)
    await sink.start()
    sink.submit(entry(0))
    sink.submit(entry(1, tenant="tnt_unregistered"))  # foreign key: no such tenant
    sink.submit(entry(2, tenant="Not A Tenant"))
    sink.submit(entry(3, attempts=-1))  # check constraint
    sink.submit(entry(4))
    await sink.stop()
    assert request_ids(await stored(clean_db)) == ["req-tnt_alpha-00000", "req-tnt_alpha-00004"]
    assert (sink.written, sink.rejected, sink.spilled_pending) == (2, 3, 0)
    rejected = [json.loads(line) for line in (tmp_path / "rejected.jsonl").read_text().splitlines()]
    assert sorted(r["row"]["request_id"] for r in rejected) == [
        "req-Not A Tenant-00002",
        "req-tnt_alpha-00003",
        "req-tnt_unregistered-00001",
    ]


# --------------------------------------------------------------------------- a real process


def test_sigterm_drains_every_submitted_row(clean_db: PgCluster, tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, str(CHILD), clean_db.app, str(tmp_path), ALPHA],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        printed = [proc.stdout.readline().strip() for _ in range(400)]
        proc.send_signal(signal.SIGTERM)
        rest, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    printed += rest.split()
    counters = json.loads(err.strip().splitlines()[-1])
    assert counters["submitted"] == len(printed) >= 400
    assert counters["overflowed"] > 0, "the child's queue never overflowed; tune it"
    assert (counters["spilled_pending"], counters["lost"], counters["rejected"]) == (0, 0, 0)
    with psycopg.connect(clean_db.reporting) as conn:
        rows = conn.execute(
            "SELECT request_id, count(*) FROM llm_ledger GROUP BY request_id"
        ).fetchall()
    assert dict(rows) == dict.fromkeys(printed, 1)
    assert spill_files(tmp_path) == []
