"""Benchmarks: scan, memory, reap throughput and cost to the auth server (see docs/performance.md)."""
