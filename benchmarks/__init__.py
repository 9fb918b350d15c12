"""Benchmarks for tidpo (run as modules, e.g. ``python -m benchmarks.memory_cpu``)."""
