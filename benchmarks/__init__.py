"""Microbenchmarks for remax-kernels: one harness (``harness.py``), eager baselines written once (``baselines.py``),
one module per op family (``bench_*.py``) and the runner (``python -m benchmarks.run``). See ``README.md``."""
