"""Observability: trace context, logs (and, later, metrics, traces and the event sink)."""
