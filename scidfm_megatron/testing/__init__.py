"""Helpers for this project's tests and benchmarks (multi-process launches on CPU)."""
