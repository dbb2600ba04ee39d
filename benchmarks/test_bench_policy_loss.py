"""pytest-benchmark tests of the ``policy_loss`` family (``bench_policy_loss.py``): one per case and provider."""

from __future__ import annotations

import pytest

from benchmarks import pytest_support

FAMILY = "policy_loss"


@pytest.mark.parametrize(("case", "provider"), pytest_support.params(FAMILY))
def test_policy_loss(benchmark, remax_bench, case, provider):
    remax_bench.measure(benchmark, FAMILY, case, provider)
