"""The pytest-benchmark front end of the benchmark cases (used by ``benchmarks/conftest.py`` and ``test_bench_*.py``).

``pytest benchmarks/ --benchmark-only`` runs one test per case and provider (id ``<case>-<provider>``, e.g.
``sample_and_greedy-B256-V128256-top_p0.9-eager``), grouped by case, so pytest-benchmark's table shows ours beside
each baseline and peer. The cases are the registry's (:mod:`benchmarks.registry`), measured as ``benchmarks.run``
measures them: the same warm-up and number of calls (``benchmark.pedantic``), the same 256 MiB L2 flush before each
timed call (the round's ``setup``), CUDA-event timing on CUDA (:class:`CudaEventTimer`, pytest-benchmark's timer
hook), then the peak memory of one more call. Each benchmark's ``extra_info`` holds what the runner's case record
holds (see :func:`benchmarks.results.from_pytest_benchmark`), so a saved run (``--benchmark-json``,
``--benchmark-autosave``) converts to the runner's schema and plots the same way.

Sizes: without CUDA (or with ``--bench-smoke``) the smoke-size cases run (torch backend, tiny shapes: the suite proves
it works, its numbers mean nothing) and the full-size GPU cases are skipped with the reason; with CUDA the full-size
cases run and the smoke-size ones are skipped.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import pytest
import torch

from benchmarks import harness as hz
from benchmarks import registry
from benchmarks.results import PYTEST_SECTION, SCHEMA_VERSION, from_pytest_benchmark, json_safe

SMOKE_OPTION = "--bench-smoke"


def params(family: str) -> list:
    """``pytest.param(case name, provider)`` for every case (both sizes) and provider of a family."""
    return [
        pytest.param(spec.name, provider, id=f"{spec.test_id}-{provider}")
        for spec in _specs_by_name(family).values()
        for provider in spec.providers
    ]


@functools.cache
def _specs_by_name(family: str) -> dict[str, hz.CaseSpec]:
    specs = [spec for size in hz.SIZES for spec in registry.specs(family, size)]
    by_name = {spec.name: spec for spec in specs}
    if len(by_name) != len(specs):
        raise LookupError(f"{family}: case names are not unique across sizes")
    return by_name


def find_spec(family: str, name: str) -> hz.CaseSpec:
    """The case of a family with this name (names are unique across sizes: they hold the shapes)."""
    return _specs_by_name(family)[name]


def _describe(spec: hz.CaseSpec) -> dict:
    """What the JSON file keeps of a case for every provider, measured or not (see results.from_pytest_benchmark)."""
    return {"family": spec.family, "case": spec.name, "size": spec.size, "op": spec.op, "mode": spec.mode,
            "shape": spec.shape, "providers": list(spec.providers)}


class CudaEventTimer:
    """A pytest-benchmark timer that times each round with CUDA events, as :func:`benchmarks.harness.time_fn` does.

    In ``benchmark.pedantic`` pytest-benchmark calls its timer twice per round, right before and right after the
    target, and records the difference. The round's ``setup`` queues the L2 flush and calls :meth:`arm`; the first
    call then records a start event and returns 0 without waiting (the flush still runs on the GPU while the host
    launches the target, so launch latency is hidden as in the runner); the second records the end event, waits
    for it and returns the elapsed seconds. Any other call order raises: this timer is for such rounds only.
    """

    __name__ = "cuda_event_timer"  # how pytest-benchmark names the timer in its JSON

    def __init__(self) -> None:
        self._start: torch.cuda.Event | None = None
        self._armed = False

    def arm(self) -> None:
        self._armed, self._start = True, None

    def __call__(self) -> float:
        if self._armed:
            self._armed = False
            self._start = torch.cuda.Event(enable_timing=True)
            self._start.record()
            return 0.0
        if self._start is None:
            raise RuntimeError("CudaEventTimer: called outside a benchmark.pedantic round whose setup armed it")
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        end.synchronize()
        start, self._start = self._start, None
        return start.elapsed_time(end) / 1e3


class BenchSession:
    """State of one pytest session of the benchmark suite: settings, ceilings, the built case, what was measured.

    ``benchmarks/conftest.py`` registers it as a plugin: its ``pytest_*`` methods are hook implementations.
    """

    def __init__(self, config: pytest.Config) -> None:
        self.smoke = bool(config.getoption(SMOKE_OPTION, default=False)) or not torch.cuda.is_available()
        self.size = "smoke" if self.smoke else "full"
        self.timer = None if self.smoke else CudaEventTimer()
        self._settings: hz.Settings | None = None
        self._environment: dict | None = None
        self.ceilings: dict | None = None
        self._built: tuple[hz.CaseSpec, hz.Case | BaseException] | None = None
        self.infos: list[dict] = []  # extra_info of every measured benchmark, in order
        self.skipped: list[dict] = []  # {family, case, provider, reason} of this size's skipped providers
        self.failed: list[dict] = []  # {family, case, provider, error}
        self.items: dict[str, tuple[hz.CaseSpec, str]] = {}  # node id -> (spec, provider) of this size's items
        self._saved_backend_env: str | None = None

    # -- settings ---------------------------------------------------------------------------------------------------
    @property
    def settings(self) -> hz.Settings:
        if self._settings is None:
            self._settings = hz.make_settings(smoke=self.smoke)
        return self._settings

    @property
    def environment(self) -> dict:
        if self._environment is None:
            self._environment = hz.environment(self.settings)
        return self._environment

    def pytest_configure(self) -> None:
        """The smoke run measures the torch paths: the ops without a ``backend=`` argument (generation, the trainer)
        follow REMAX_KERNELS_BACKEND, which would otherwise pick Triton's slow interpreter under TRITON_INTERPRET=1."""
        if self.smoke:
            self._saved_backend_env = os.environ.get("REMAX_KERNELS_BACKEND")
            os.environ["REMAX_KERNELS_BACKEND"] = "torch"

    def pytest_unconfigure(self) -> None:
        self._release()
        if self.smoke:
            if self._saved_backend_env is None:
                os.environ.pop("REMAX_KERNELS_BACKEND", None)
            else:
                os.environ["REMAX_KERNELS_BACKEND"] = self._saved_backend_env

    # -- collection ---------------------------------------------------------------------------------------------------
    def skip_reason(self, spec: hz.CaseSpec) -> str | None:
        """Why a case of the other size does not run in this session (None: it runs)."""
        if spec.size == self.size:
            return None
        if spec.size == "full":
            if not torch.cuda.is_available():
                return "full-size case: needs a CUDA device (its smoke-size twin runs here)"
            return f"full-size case: {SMOKE_OPTION} selects the smoke-size cases"
        return f"smoke-size case: runs without CUDA or with {SMOKE_OPTION}"

    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        """Skip the other size's cases; time this size's with CUDA events on CUDA; remember each item's case."""
        for item in items:
            callspec = getattr(item, "callspec", None)
            family = getattr(getattr(item, "module", None), "FAMILY", None)
            if callspec is None or family is None or "case" not in callspec.params:
                continue
            spec = find_spec(family, callspec.params["case"])
            reason = self.skip_reason(spec)
            if reason is not None:
                item.add_marker(pytest.mark.skip(reason=reason))
                continue
            self.items[item.nodeid] = (spec, callspec.params["provider"])
            if self.timer is not None:
                item.add_marker(pytest.mark.benchmark(timer=self.timer))

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        """Keep the skip reasons and failures of this size's benchmarks for the JSON file."""
        if report.nodeid not in self.items or report.passed:
            return
        spec, provider = self.items[report.nodeid]
        where = {**_describe(spec), "provider": provider}
        if report.skipped:
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
            reason = reason.removeprefix("Skipped: ").removeprefix(f"{provider}: ")
            self.skipped.append({**where, "reason": reason})
        elif report.when == "call":
            crash = getattr(report.longrepr, "reprcrash", None)
            self.failed.append({**where, "error": crash.message.splitlines()[0] if crash else "failed"})

    # -- measuring ----------------------------------------------------------------------------------------------------
    def _release(self) -> None:
        if self._built is not None:
            built = self._built[1]
            self._built = None
            if isinstance(built, hz.Case) and built.close is not None:
                built.close()
            if self._settings is not None:
                hz.free_memory(self._settings)

    def case(self, spec: hz.CaseSpec) -> hz.Case:
        """The built case, kept while its providers run (tests of one case are adjacent), rebuilt for the next."""
        if self._built is None or self._built[0] is not spec:  # find_spec returns one object per case
            self._release()
            try:
                built: hz.Case | BaseException = hz.build_case(spec, self.settings)
            except Exception as exc:
                built = exc
            self._built = (spec, built)
        built = self._built[1]
        if isinstance(built, hz.FamilySkipped):
            pytest.skip(str(built))
        if isinstance(built, BaseException):
            raise built
        return built

    def measure(self, benchmark: Any, family: str, name: str, provider: str) -> None:
        """Benchmark one provider of one case and fill ``benchmark.extra_info`` (the body of every benchmark test)."""
        spec = find_spec(family, name)
        case = self.case(spec)
        call = case.calls[provider]
        if isinstance(call, str):
            pytest.skip(f"{provider}: {call}")
        s = self.settings
        if self.ceilings is None:
            self.ceilings = hz.measure_ceilings(s)
        benchmark.group = spec.name
        hz.free_memory(s)
        reps = hz.warm_up(call, s, **case.time_kw)
        if benchmark.disabled:  # --benchmark-disable: pytest-benchmark calls the target once, untimed
            benchmark.pedantic(call)
            return
        flush = [hz.l2_flush_buffer(s)]  # in a list so it can be freed before the peak-memory call

        def setup():
            if flush[0] is not None:
                flush[0].zero_()
            if self.timer is not None:
                self.timer.arm()

        benchmark.pedantic(call, setup=setup, rounds=reps, iterations=1, warmup_rounds=0)
        flush.clear()
        timing = hz.timing_summary([t * 1e3 for t in benchmark.stats.stats.data])
        memory = hz.peak_memory(call, s)
        info = {
            **_describe(spec), "provider": provider, "shape": {**spec.shape, **case.shape},
            "dtype": hz.dtype_name(s.dtype), "timing": timing, "memory": memory,
            "work": hz.work_metrics(timing["ms"], self.ceilings, bytes_moved=case.bytes_moved, flops=case.flops),
            "inputs_grads_bytes": case.inputs_grads_bytes, "extra": case.extra,
            "provider_extra": case.provider_extra(provider, timing) if case.provider_extra else {},
        }
        benchmark.extra_info.update(json_safe(info))
        self.infos.append(benchmark.extra_info)

    # -- results ------------------------------------------------------------------------------------------------------
    def section(self) -> dict:
        """The ``remax_kernels`` section of the JSON file (its targets are added with the ratios)."""
        return {"schema_version": SCHEMA_VERSION, "environment": self.environment, "ceilings": self.ceilings,
                "skipped": self.skipped, "failed": self.failed}

    def results(self) -> dict:
        """What was measured so far, in the runner's schema."""
        data = {"machine_info": {}, "benchmarks": [{"extra_info": info} for info in self.infos],
                PYTEST_SECTION: self.section()}
        return from_pytest_benchmark(data)

    def pytest_benchmark_update_json(self, output_json: dict) -> None:
        """Add the section and each benchmark's ratios to ours (``speedup``, ``memory_ratio``: its time or peak
        over ours) to pytest-benchmark's JSON, before it is written or saved."""
        if self.ceilings is None:  # none of our benchmarks ran
            return
        results = self.results()
        cases = {(f, c["name"]): c for f, entry in results["families"].items() for c in entry["cases"]}
        for bench in output_json["benchmarks"]:
            info = bench.get("extra_info", {})
            case = cases.get((info.get("family"), info.get("case")))
            if case is None:
                continue
            label = info["provider"]
            if label == "ours":
                if "ms" in case["ours"]:
                    info["speedup"] = 1.0
                if hz.peak_bytes(case):
                    info["memory_ratio"] = 1.0
            else:
                info.update({key: case[field][label] for key, field in (("speedup", "speedup"),
                                                                          ("memory_ratio", "memory_ratio"))
                             if label in case[field]})
        output_json[PYTEST_SECTION] = json_safe({**self.section(), "targets": results["targets"]})

    @pytest.hookimpl(trylast=True)
    def pytest_terminal_summary(self, terminalreporter) -> None:
        """The targets, PASS/MISS, at the end of the report (after pytest-benchmark's tables)."""
        targets = self.results()["targets"] if self.ceilings is not None else []
        if targets:
            terminalreporter.section("remax-kernels targets" + (" (smoke run: PASS/MISS mean nothing)"
                                                                 if self.smoke else ""))
            for t in targets:
                terminalreporter.write_line(hz.format_target(t))
