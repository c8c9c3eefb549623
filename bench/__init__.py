"""Benchmarks: commands (``make bench-…``) that report, never tests. Results go to ``out/bench/*.json``."""
