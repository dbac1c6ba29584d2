"""Benchmark harness: raw ultralytics ceiling vs the server under load, with target ratios."""
