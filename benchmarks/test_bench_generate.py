"""pytest-benchmark tests of the ``generate`` family (``bench_generate.py``): one per case and provider."""

from __future__ import annotations

import pytest

from benchmarks import pytest_support

FAMILY = "generate"


@pytest.mark.parametrize(("case", "provider"), pytest_support.params(FAMILY))
def test_generate(benchmark, remax_bench, case, provider):
    remax_bench.measure(benchmark, FAMILY, case, provider)
