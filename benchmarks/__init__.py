"""The benchmark harness: msgbus vs the raw clients vs peer libraries on the same broker (see docs/benchmarks.md)."""
