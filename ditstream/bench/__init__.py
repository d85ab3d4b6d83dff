"""Benchmarks (``ditstream bench ...``) and the process harnesses they start."""
