"""Microbenchmarks for remax-kernels: one harness (``harness.py``), eager baselines written once (``baselines.py``),
one module per op family (``bench_*.py``, listed in ``registry.py``), two front ends measuring the same cases
(``python -m benchmarks.run`` and ``pytest benchmarks/ --benchmark-only``), result files (``results.py``) and their
plots (``python -m benchmarks.plot``). See ``README.md``."""
