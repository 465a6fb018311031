"""Reproducible benchmarks for lambdasplit: `python -m benchmarks --help`."""
