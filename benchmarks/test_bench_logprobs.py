"""pytest-benchmark tests of the ``logprobs`` family (``bench_logprobs.py``): one per case and provider."""

from __future__ import annotations

import pytest

from benchmarks import pytest_support

FAMILY = "logprobs"


@pytest.mark.parametrize(("case", "provider"), pytest_support.params(FAMILY))
def test_logprobs(benchmark, remax_bench, case, provider):
    remax_bench.measure(benchmark, FAMILY, case, provider)
