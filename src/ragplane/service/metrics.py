"""Prometheus metrics of the RAG lifecycle, served at ``GET /metrics``.

They are one output of the request's record (:class:`~ragplane.service.events.RequestRecord`,
the same frozen event the request log stores): each step span is observed in
``ragplane_chat_step_seconds{step}``, each request counted by outcome, mode and cache
result, each lifecycle counter (rewrites skipped, citations dropped, cache verdicts …)
added to ``ragplane_chat_events_total{event}``. The event sink's queue depth and shed
records are read at scrape time. One registry per platform, not the global one, so two
platforms in a process (tests) do not collide.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from ragplane.service.events import EventSink, RequestRecord

__all__ = ["CONTENT_TYPE", "ChatMetrics"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_STEP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class _SinkCollector(Collector):
    def __init__(self, sink: EventSink) -> None:
        self._sink = sink

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        depth = GaugeMetricFamily(
            "ragplane_events_queued", "Request-log records and eval samples waiting to be written"
        )
        depth.add_metric([], len(self._sink))
        yield depth
        shed = CounterMetricFamily(
            "ragplane_events_shed", "Records dropped because the queue was full", labels=["kind"]
        )
        for kind in ("eval_sample", "request_log"):
            shed.add_metric([kind], self._sink.shed[kind])
        yield shed


class ChatMetrics:
    def __init__(self, sink: EventSink | None = None) -> None:
        self.registry = CollectorRegistry()
        self._steps = Histogram(
            "ragplane_chat_step_seconds",
            "Time spent in each step of the RAG lifecycle",
            ["step"],
            buckets=_STEP_BUCKETS,
            registry=self.registry,
        )
        self._requests = Counter(
            "ragplane_chat_requests",
            "Chat requests by outcome, mode and cache result",
            ["outcome", "mode", "cache_hit"],
            registry=self.registry,
        )
        self._events = Counter(
            "ragplane_chat_events",
            "Lifecycle counters (rewrites, cache verdicts, dropped citations, ...)",
            ["event"],
            registry=self.registry,
        )
        self._tokens = Counter(
            "ragplane_chat_tokens", "LLM tokens of chat answers", ["kind"], registry=self.registry
        )
        if sink is not None:
            self.registry.register(_SinkCollector(sink))

    def observe(self, record: RequestRecord) -> None:
        for span in record.spans:
            self._steps.labels(span["name"]).observe(span["ms"] / 1000)
        self._requests.labels(record.outcome, record.mode, str(record.cache_hit).lower()).inc()
        for name, n in record.counters.items():
            self._events.labels(name).inc(n)
        self._tokens.labels("input").inc(record.input_tokens)
        self._tokens.labels("output").inc(record.output_tokens)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
