"""Benchmarks: scripts that measure and print figures; nothing here is a test.

`python -m benchmarks.cluster_bench --quick` (see benchmarks/README.md).
"""
