"""The cost ledger sink: one ``llm_ledger`` row per call, written off the response path.

::

    submit(entry) / submit_later(make, *args)  (sync, O(1), never awaits; with
      submit_later the entry itself is made by the flusher, off the response path)
      ├─ queue has room → bounded in-memory queue ──┐
      └─ queue full     → append to the spill file  │  (counted in ``overflowed``;
                           (one write syscall)       │   an error log per burst: the alarm)
                                                     ▼
    flusher task: asleep while there is nothing to write (no timer: an idle gateway
      does not wake for it); flush_interval_s after the first row arrives, or as soon
      as a batch is full: queue → batches of batch_size → write_ledger_rows (one
      transaction each), so a row reaches the table within about flush_interval_s;
      a batch's rows are made a slice at a time (ROWS_PER_SLICE), yielding to the event
      loop in between, so a full batch never holds the responses up for milliseconds
      a batch the database does not take → appended to the spill file, retried with backoff
      spill files → replayed in batches; a file is removed only after all its rows committed
    stop(timeout_s): drain the queue and the spill files; whatever the database does not
      take in time (it is gone) stays in a spill file, replayed by the next start()

Every row gets an id when it is made (by the flusher, or when it is spilled): a
time-ordered UUID, inserted with ``ON CONFLICT DO NOTHING``, so a row written twice (a
crash between a commit and the removal of its spill file, a batch cancelled mid-commit
at shutdown and spilled) is stored once. Rows the database refuses (an unregistered
tenant, a value out of range) go to ``rejected.jsonl`` beside the spill files, with an
error log; no row is dropped without a trace. What ``stop`` does not get to run for
(SIGKILL, out of memory) loses the rows still in memory: at most ``queue_size`` plus one
batch; spilled rows survive (see ``ledger_spill``). ``submit`` belongs to the event
loop's thread.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import random
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from ragplane.config import LedgerSettings, Settings
from ragplane.data.db import Database
from ragplane.data.ledger_store import LedgerRow, WriteResult, new_row_id, write_ledger_rows
from ragplane.errors import DataError
from ragplane.gateway.ledger_spill import SPILL_GLOB, SpillFile, loads_row
from ragplane.gateway.types import LedgerEntry
from ragplane.observe.logging import get_logger

__all__ = ["LedgerSink", "ledger_row"]

log = get_logger("ragplane.gateway.ledger")

_REJECTED = "rejected.jsonl"
ROWS_PER_SLICE = 100  # ledger rows made between two yields to the event loop (~0.5 ms)

MakeEntry = Callable[..., LedgerEntry]
_Queued = tuple[MakeEntry, tuple[Any, ...], float]  # how to make the entry; when it ended


def _given(entry: LedgerEntry) -> LedgerEntry:
    return entry


def _row(item: _Queued) -> LedgerRow:
    make, args, at = item
    return ledger_row(make(*args), at)


def ledger_row(entry: LedgerEntry, at: float | None = None) -> LedgerRow:
    """The ledger row of one call that ended at ``at`` (Unix seconds; default now),
    with a new id."""
    u = entry.usage
    return LedgerRow(
        tenant_id=entry.tenant_id,
        id=new_row_id(),
        created_at=datetime.fromtimestamp(time.time() if at is None else at, UTC),
        request_id=entry.request_id,
        alias=entry.alias,
        api=entry.api,
        stream=entry.stream,
        status=entry.status,
        http_status=entry.http_status,
        attempts=entry.attempts,
        latency_ms=entry.latency_ms,
        route=entry.route,
        provider=entry.provider,
        model=entry.model,
        trace_id=entry.trace_id,
        feature_id=entry.feature_id,
        input_tokens=u.input_tokens,
        output_tokens=u.output_tokens,
        cache_read_tokens=u.cache_read_tokens,
        cache_write_tokens=u.cache_write_tokens,
        reasoning_tokens=u.reasoning_tokens,
        cost_usd=entry.cost_usd,
        ttft_ms=entry.ttft_ms,
        extra=dict(entry.extra),
    )


class LedgerSink:
    """Bounded async writer of ledger rows (see the module docstring).

    Counters, for metrics: ``submitted``, ``written`` (new rows committed),
    ``duplicates`` (rows found already committed on a replay), ``overflowed`` (rows that
    found the queue full), ``spilled_pending`` (rows in spill files not yet committed),
    ``failed_writes`` (batches the database did not take), ``rejected`` (rows refused,
    in ``rejected.jsonl``), ``lost`` (rows neither written nor spillable: disk failure,
    logged whole), ``write_transactions`` (batch transactions committed).
    """

    def __init__(
        self,
        db: Database,
        settings: LedgerSettings,
        spill_dir: Path,
        *,
        retry_base_s: float = 0.2,
        retry_max_s: float = 5.0,
    ) -> None:
        self._db = db
        self._settings = settings
        self.spill_dir = spill_dir
        self._retry_base_s = retry_base_s
        self._retry_max_s = retry_max_s
        # calls and when they ended; made into entries and rows (id minted) by the
        # flusher, off the response path
        self._queue: collections.deque[_Queued] = collections.deque()
        self._in_flight: list[LedgerRow] = []
        self._spill: SpillFile | None = None  # the file overflow appends to
        self._sealed: list[SpillFile] = []  # files to replay (no more appends)
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._burst = 0  # rows overflowed in the current burst (0: none under way)
        self._closed = False  # stop() finished: submit spills
        self.submitted = 0
        self.written = 0
        self.duplicates = 0
        self.overflowed = 0
        self.spilled_pending = 0
        self.failed_writes = 0
        self.rejected = 0
        self.lost = 0
        self.write_transactions = 0

    @classmethod
    def from_settings(cls, db: Database, settings: Settings) -> LedgerSink:
        return cls(db, settings.gateway.ledger, settings.data_dir / "ledger")

    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def in_flight(self) -> int:
        """Rows of the batch being written now."""
        return len(self._in_flight)

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    # ------------------------------------------------------------------ response path

    def submit(self, entry: LedgerEntry) -> None:
        """Record one call. Synchronous, O(1), never awaits; never drops the row.

        Before ``start`` rows wait in the queue; after ``stop`` they go to a spill file
        straight away (the next start writes them).
        """
        self.submit_later(_given, entry)

    def submit_later(self, make: MakeEntry, *args: Any) -> None:
        """Record one call whose entry ``make(*args)`` builds when the row is written:
        the response path only queues a tuple (the arguments must not change after).
        Otherwise as :meth:`submit`."""
        self.submitted += 1
        if self._closed:
            entry = make(*args)
            log.warning("ledger_submit_after_stop", request_id=entry.request_id)
            self._spill_rows([ledger_row(entry)])
            return
        if len(self._queue) < self._settings.queue_size:
            self._queue.append((make, args, time.time()))
            n = len(self._queue)
            if n == 1 or n >= self._settings.batch_size:  # the flusher's two wake-ups
                self._wake.set()
            return
        self.overflowed += 1
        self._wake.set()
        if self._burst == 0:
            log.error(
                "ledger_queue_full",
                queue_size=self._settings.queue_size,
                spill_dir=str(self.spill_dir),
                running=self.running,
            )
        self._burst += 1
        self._spill_rows([ledger_row(make(*args))])

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Claim spill files left by sinks that are gone and start the flusher."""
        if self._task is not None:
            raise RuntimeError("a LedgerSink starts once")
        self.spill_dir.mkdir(parents=True, exist_ok=True)
        for path in sorted(self.spill_dir.glob(SPILL_GLOB)):
            if self._spill is not None and path == self._spill.path:
                continue
            claimed = SpillFile.claim(path)
            if claimed is not None:
                self._sealed.append(claimed)
                self.spilled_pending += claimed.rows
        if self._sealed:
            log.info("ledger_spill_claimed", files=len(self._sealed), rows=self.spilled_pending)
        self._task = asyncio.create_task(self._run(), name="ledger-flusher")

    async def stop(self, timeout_s: float = 10.0) -> None:
        """Drain the queue and the spill files, within ``timeout_s``; what the database did
        not take by then (it is gone) is left in a spill file for the next start."""
        self._stopping.set()
        self._wake.set()
        task = self._task
        try:
            if task is not None and not task.done():
                try:
                    await asyncio.wait_for(asyncio.shield(task), timeout_s)
                except TimeoutError:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
        finally:  # also when stop() itself is cancelled: the rows still go to disk
            if task is not None and not task.done():
                task.cancel()
            self._close()

    def _close(self) -> None:
        # a batch cancelled mid-commit may or may not be in the table: spill it anyway,
        # its ids make the replay a no-op for rows that did commit
        self._closed = True
        leftover = [*self._in_flight, *map(_row, self._queue)]
        self._in_flight = []
        self._queue.clear()
        if leftover:
            self._spill_rows(leftover)
        for sf in [*self._sealed, *([self._spill] if self._spill else [])]:
            sf.close()
        if self.spilled_pending:
            log.error(
                "ledger_stopped_with_spilled_rows",
                rows=self.spilled_pending,
                spill_dir=str(self.spill_dir),
            )
        self._sealed = []
        self._spill = None

    # ------------------------------------------------------------------ flusher

    async def _run(self) -> None:
        failures = 0
        while True:
            if not (self._stopping.is_set() or self._queue or self._pending_files()):
                await self._wake.wait()  # idle until the first row (or stop)
            if not self._stopping.is_set() and len(self._queue) < self._settings.batch_size:
                self._wake.clear()  # only a full batch or stop cuts the wait short
                with contextlib.suppress(TimeoutError):  # let the batch fill
                    await asyncio.wait_for(self._wake.wait(), self._settings.flush_interval_s)
            self._wake.clear()
            try:
                ok = await self._flush_queue() and await self._replay_spill()
            except Exception:
                log.exception("ledger_flush_crashed")  # never let the flusher die
                if self._in_flight:
                    self._spill_rows(self._in_flight)
                    self._in_flight = []
                ok = False
            if ok:
                failures = 0
                if self._stopping.is_set() and not self._queue and not self._pending_files():
                    return
                continue
            if self._stopping.is_set():
                return  # the database is gone: stop() spills what is left
            failures += 1
            backoff = min(self._retry_max_s, self._retry_base_s * 2 ** (failures - 1))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), random.uniform(0, backoff))  # noqa: S311

    def _pending_files(self) -> bool:
        return bool(self._sealed) or (self._spill is not None and self._spill.rows > 0)

    async def _flush_queue(self) -> bool:
        """Write the queue in batches; False after a batch the database did not take."""
        while self._queue:
            n = min(len(self._queue), self._settings.batch_size)
            batch = self._in_flight = []  # rows taken from the queue are in flight at once
            for i in range(n):
                if i and i % ROWS_PER_SLICE == 0:
                    await asyncio.sleep(0)
                batch.append(_row(self._queue.popleft()))
            ok = await self._write(batch)
            self._in_flight = []
            if not ok:
                self._spill_rows(batch)
                return False
        if self._burst and len(self._queue) < self._settings.queue_size // 2 + 1:
            log.warning("ledger_overflow_burst_ended", rows=self._burst)
            self._burst = 0
        return True

    async def _replay_spill(self) -> bool:
        """Write the rows of the spill files; remove each file once all its rows committed."""
        if self._spill is not None and self._spill.rows > 0:
            self._sealed.append(self._spill)  # overflow goes to a new file from now on
            self._spill = None
        while self._sealed:
            sf = self._sealed[0]
            while True:
                lines, end = sf.read_from(sf.done_offset, self._settings.batch_size)
                if not lines:
                    break
                rows = self._parse(sf, lines)
                if rows and not await self._write(rows):
                    return False
                sf.done_offset = end
            sf.remove()
            self._sealed.pop(0)
            self.spilled_pending -= sf.rows
        return True

    def _parse(self, sf: SpillFile, lines: list[bytes]) -> list[LedgerRow]:
        rows = []
        for line in lines:
            try:
                rows.append(loads_row(line))
            except (ValueError, TypeError, KeyError) as exc:
                # a line cut short by a crash mid-write (its submit never returned)
                self.rejected += 1
                self._write_rejected([{"line": line.decode(errors="replace"), "error": str(exc)}])
                log.exception("ledger_spill_line_unreadable", path=str(sf.path), error=str(exc))
        return rows

    async def _write(self, rows: list[LedgerRow]) -> bool:
        try:
            result: WriteResult = await write_ledger_rows(self._db, rows)
        except DataError as exc:  # DatabaseUnavailable included
            self.failed_writes += 1
            log.warning("ledger_write_failed", rows=len(rows), error=str(exc))
            return False
        self.write_transactions += 1
        self.written += result.inserted
        self.duplicates += result.duplicates
        if result.rejected:
            self.rejected += len(result.rejected)
            self._write_rejected([{"row": r, "error": reason} for r, reason in result.rejected])
            log.error(
                "ledger_rows_rejected",
                rows=len(result.rejected),
                first_error=result.rejected[0][1],
                path=str(self.spill_dir / _REJECTED),
            )
        return True

    # ------------------------------------------------------------------ files

    def _spill_rows(self, rows: list[LedgerRow]) -> None:
        try:
            if self._spill is None:
                self._spill = SpillFile.create(self.spill_dir)
            self._spill.append(rows)
        except OSError as exc:
            self.lost += len(rows)
            data = b"".join(orjson.dumps(r, default=str) + b"\n" for r in rows)
            log.exception(  # the last place these rows exist
                "ledger_rows_lost", error=str(exc), rows=data.decode(errors="replace")
            )
            return
        self.spilled_pending += len(rows)

    def _write_rejected(self, items: list[dict[str, Any]]) -> None:
        data = b"".join(orjson.dumps(i, default=str) + b"\n" for i in items)
        try:
            self.spill_dir.mkdir(parents=True, exist_ok=True)
            with (self.spill_dir / _REJECTED).open("ab") as f:
                f.write(data)
        except OSError as exc:
            log.exception("ledger_rejected_unwritable", error=str(exc), rows=data.decode())
