"""pytest set-up of the benchmark suite (``pytest benchmarks/``): see :mod:`benchmarks.pytest_support`.

Only ``pytest benchmarks/`` (or a file in it) collects these tests; ``pytest tests`` never does (pyproject's
``testpaths``), and ``tests/test_benchmarks_pytest.py`` runs this suite at smoke size in a subprocess.
"""

from __future__ import annotations

import pytest

try:
    import pytest_benchmark  # noqa: F401
except ImportError as exc:  # the suite's tests need its `benchmark` fixture, and BenchSession its hooks
    raise ImportError("pytest benchmarks/ needs pytest-benchmark: pip install -e '.[bench]'") from exc

from benchmarks.pytest_support import SMOKE_OPTION, BenchSession  # noqa: E402

_PLUGIN = "remax-kernels-benchmarks"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.getgroup("remax-kernels benchmarks").addoption(
        SMOKE_OPTION, action="store_true",
        help="run the smoke-size cases on the CPU (tiny shapes, torch backend) even when CUDA is available; "
             "they are what runs without CUDA",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.pluginmanager.register(BenchSession(config), _PLUGIN)


@pytest.fixture
def remax_bench(request: pytest.FixtureRequest) -> BenchSession:
    """The session's benchmark state; a test calls ``remax_bench.measure(benchmark, FAMILY, case, provider)``."""
    return request.config.pluginmanager.get_plugin(_PLUGIN)
