"""pytest-benchmark tests of the ``sampling`` family (``bench_sampling.py``): one per case and provider."""

from __future__ import annotations

import pytest

from benchmarks import pytest_support

FAMILY = "sampling"


@pytest.mark.parametrize(("case", "provider"), pytest_support.params(FAMILY))
def test_sampling(benchmark, remax_bench, case, provider):
    remax_bench.measure(benchmark, FAMILY, case, provider)
