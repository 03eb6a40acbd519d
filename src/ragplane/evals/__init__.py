"""Evaluations and benchmarks: golden sets, metrics, side-by-side measurements."""
