"""pytest-benchmark tests of the ``trainer`` family (``bench_trainer.py``): one per case and provider."""

from __future__ import annotations

import pytest

from benchmarks import pytest_support

FAMILY = "trainer"


@pytest.mark.parametrize(("case", "provider"), pytest_support.params(FAMILY))
def test_trainer(benchmark, remax_bench, case, provider):
    remax_bench.measure(benchmark, FAMILY, case, provider)
