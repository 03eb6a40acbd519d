"""The RAG lifecycle as OpenTelemetry traces.

Each ``/v1/chat`` request becomes a ``chat`` span, child of the edge's span of the
request (same trace id as ``traceparent`` and the request log), with one child span per
lifecycle step (``guard_input``, ``cache_exact``, ``embed``, ``retrieve``, ``generate``
…) carrying the step's attributes under ``ragplane.*``; the ``generate`` span also
carries the GenAI semantic conventions (``gen_ai.operation.name``,
``gen_ai.request.model``, ``gen_ai.usage.*``).

The spans are made from the request's record once the request has ended — the same
frozen event the request log and the Prometheus metrics receive — with the start and
end times the lifecycle measured, so the request path never touches the SDK. They are
exported in batches by the SDK's own thread, over OTLP/HTTP when
``tracing.otlp_endpoint`` is set; without it no provider is built and nothing is done.
"""

from __future__ import annotations

from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, TraceFlags

from ragplane.config import TracingSettings
from ragplane.service.events import RequestRecord

__all__ = ["LifecycleTracer", "build_provider"]


def build_provider(
    settings: TracingSettings, exporter: SpanExporter | None = None
) -> TracerProvider | None:
    """A provider exporting to ``exporter``, or over OTLP/HTTP to the configured endpoint;
    None when neither is given."""
    if exporter is None:
        if settings.otlp_endpoint is None:
            return None
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter(endpoint=settings.otlp_endpoint)
    provider = TracerProvider(resource=Resource.create({"service.name": settings.service_name}))
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


def _attribute(value: Any) -> Any:
    if isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
        return list(value)
    return str(value)


class LifecycleTracer:
    def __init__(self, provider: TracerProvider) -> None:
        self._tracer = provider.get_tracer("ragplane.chat")

    def export(self, record: RequestRecord) -> None:
        """The request's spans, from its record (module docstring)."""
        parent = trace.set_span_in_context(
            NonRecordingSpan(
                SpanContext(
                    trace_id=int(record.trace_id, 16),
                    span_id=int(record.parent_span_id or "1", 16),
                    is_remote=True,
                    trace_flags=TraceFlags(TraceFlags.SAMPLED),
                )
            )
        )
        begun = record.started_unix_ns
        root = self._tracer.start_span(
            "chat",
            context=parent,
            kind=SpanKind.INTERNAL,
            start_time=begun,
            attributes={
                "ragplane.tenant_id": record.tenant_id,
                "ragplane.request_id": record.request_id,
                "ragplane.outcome": record.outcome,
                "ragplane.mode": record.mode,
                "ragplane.cache_hit": record.cache_hit,
                "ragplane.namespace": record.namespace or "",
                "http.response.status_code": record.status,
                **{f"ragplane.count.{k}": v for k, v in record.counters.items()},
            },
        )
        inside = trace.set_span_in_context(root)
        for step in record.spans:
            start = begun + int(step["start_ms"] * 1e6)
            attributes = {
                f"ragplane.{k}": _attribute(v)
                for k, v in step.items()
                if k not in ("name", "start_ms", "ms")
            }
            if step["name"] == "generate":
                attributes |= {
                    "gen_ai.operation.name": "chat",
                    "gen_ai.request.model": record.model_alias or "",
                    "gen_ai.usage.input_tokens": record.input_tokens,
                    "gen_ai.usage.output_tokens": record.output_tokens,
                }
            span = self._tracer.start_span(
                step["name"], context=inside, start_time=start, attributes=attributes
            )
            span.end(end_time=start + int(step["ms"] * 1e6))
        root.end(end_time=begun + int(record.latency_ms * 1e6))
