"""Lifecycle step 10: the request log and eval samples, written off the response path.

:meth:`EventSink.submit` only appends to a bounded in-memory queue; a background task
writes what has queued, in batches (one tenant unit of work per tenant per batch), every
``flush_interval_s`` or as soon as ``batch_size`` requests wait. The queue holds at most
``capacity`` records; when it is full, eval samples are shed first (the oldest queued
one, else the new one), and only then request-log rows — each shed record is counted
(:attr:`EventSink.shed`). :meth:`stop` drains whatever is queued before it returns.
The LLM cost ledger is the gateway's (written by its own sink); a request-log row joins
it by ``request_id``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

import orjson

from ragplane.data import Database
from ragplane.errors import DataError
from ragplane.observe.logging import get_logger

__all__ = ["EvalSample", "EventSink", "RequestRecord"]

log = get_logger("ragplane.events")


@dataclass(frozen=True)
class RequestRecord:
    tenant_id: str
    request_id: str
    trace_id: str
    route: str
    status: int
    latency_ms: float
    session_id: str | None
    namespace: str | None
    model_alias: str | None
    mode: str
    cache_hit: bool
    outcome: str
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0
    spans: list[dict[str, Any]] = field(default_factory=list)
    counters: dict[str, int] = field(default_factory=dict)
    started_unix_ns: int = 0  # wall clock at the lifecycle's start (span offsets count from it)
    parent_span_id: str = ""  # the edge's span of this request


@dataclass(frozen=True)
class EvalSample:
    tenant_id: str
    request_id: str
    query: str
    answer: str
    contexts: list[dict[str, Any]]
    citations: list[dict[str, Any]]


_LOG = """
INSERT INTO request_log (request_id, tenant_id, route, status, latency_ms, trace_id, session_id,
    namespace, model_alias, mode, cache_hit, outcome, input_tokens, output_tokens, cost_usd,
    spans, counters)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s::jsonb, %s::jsonb)
ON CONFLICT DO NOTHING
"""
_SAMPLE = """
INSERT INTO eval_samples (tenant_id, request_id, query, answer, contexts, citations)
VALUES (%s, %s, %s, %s, %s::jsonb, %s::jsonb) ON CONFLICT DO NOTHING
"""


def _json(value: Any) -> str:
    return orjson.dumps(value).decode()


class EventSink:
    def __init__(
        self,
        db: Database,
        *,
        capacity: int = 10_000,
        batch_size: int = 200,
        flush_interval_s: float = 1.0,
    ) -> None:
        self._db = db
        self._capacity = capacity
        self._batch_size = batch_size
        self._interval = flush_interval_s
        self._records: deque[RequestRecord] = deque()
        self._samples: deque[EvalSample] = deque()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self.shed: Counter[str] = Counter()
        self.written: Counter[str] = Counter()

    def __len__(self) -> int:
        return len(self._records) + len(self._samples)

    def submit(self, record: RequestRecord, sample: EvalSample | None = None) -> None:
        """Queue a request's records; never waits."""
        if len(self) >= self._capacity:
            if self._samples:
                self._samples.popleft()
                self.shed["eval_sample"] += 1
            else:
                self.shed["request_log"] += 1
                if sample is not None:
                    self.shed["eval_sample"] += 1
                return
        self._records.append(record)
        if sample is not None:
            if len(self) >= self._capacity:
                self.shed["eval_sample"] += 1
            else:
                self._samples.append(sample)
        if len(self._records) >= self._batch_size:
            self._wake.set()

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="ragplane-events")

    async def stop(self) -> None:
        """Stop the writer (after the batch it is writing) and write what is queued."""
        task, self._task = self._task, None
        if task is not None:
            self._stopping = True
            self._wake.set()
            await task
        while self._records or self._samples:
            if not await self.flush():
                break

    async def _run(self) -> None:
        while not self._stopping:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._interval)
            self._wake.clear()
            try:
                await self.flush()
            except Exception:  # a bug must not stop the writer; the batch is logged
                log.exception("events_flush_failed")

    async def flush(self) -> bool:
        """Write one batch of what is queued; False when the database refused it (the
        batch is put back, to be tried again)."""
        records = [
            self._records.popleft() for _ in range(min(self._batch_size, len(self._records)))
        ]
        samples = [
            self._samples.popleft() for _ in range(min(self._batch_size, len(self._samples)))
        ]
        if not records and not samples:
            return True
        tenants = {r.tenant_id for r in records} | {s.tenant_id for s in samples}
        try:
            for tenant in sorted(tenants):
                async with self._db.tenant(tenant) as s:
                    cur = s.connection.cursor()
                    mine = [r for r in records if r.tenant_id == tenant]
                    if mine:
                        await cur.executemany(_LOG, [_log_row(r) for r in mine])
                    theirs = [x for x in samples if x.tenant_id == tenant]
                    if theirs:
                        await cur.executemany(_SAMPLE, [_sample_row(x) for x in theirs])
        except (DataError, asyncio.CancelledError) as exc:
            # put back (rows already committed are not written twice: ON CONFLICT DO NOTHING)
            log.warning("events_write_failed", error=str(exc), records=len(records))
            self._records.extendleft(reversed(records))
            self._samples.extendleft(reversed(samples))
            if isinstance(exc, asyncio.CancelledError):
                raise
            return False
        self.written["request_log"] += len(records)
        self.written["eval_sample"] += len(samples)
        return True


def _log_row(r: RequestRecord) -> tuple[Any, ...]:
    return (
        r.request_id,
        r.tenant_id,
        r.route,
        r.status,
        r.latency_ms,
        r.trace_id,
        r.session_id,
        r.namespace,
        r.model_alias,
        r.mode,
        r.cache_hit,
        r.outcome,
        r.input_tokens,
        r.output_tokens,
        r.cost_usd,
        _json(r.spans),
        _json(r.counters),
    )


def _sample_row(x: EvalSample) -> tuple[Any, ...]:
    return (x.tenant_id, x.request_id, x.query, x.answer, _json(x.contexts), _json(x.citations))
