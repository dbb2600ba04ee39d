"""The pytest-benchmark suite (``pytest benchmarks/``) end to end at smoke size, and the plots of both result forms.

The suite runs once, in a subprocess (its own pytest session, conftest and plugins), with ``--benchmark-json``; the
tests below check that the file holds what the runner's JSON holds. GPU numbers come only from a CUDA machine
(``scripts/gpu_check.sh``), never from here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import harness as hz
from benchmarks import plot, registry, results
from benchmarks.pytest_support import CudaEventTimer

ROOT = Path(__file__).resolve().parents[1]
INFO_KEYS = {"family", "case", "provider", "size", "op", "mode", "shape", "providers", "dtype", "timing", "memory",
             "work", "inputs_grads_bytes", "extra", "provider_extra", "speedup"}
CASE_KEYS = {"name", "op", "mode", "shape", "dtype", "ours", "baselines", "speedup", "memory_ratio", "work",
             "inputs_grads_bytes", "extra"}


@pytest.fixture(scope="module")
def suite(tmp_path_factory) -> tuple[dict, str]:
    """One run of ``pytest benchmarks/ --benchmark-only --bench-smoke --benchmark-json F``: (F's data, its output)."""
    out = tmp_path_factory.mktemp("pytest-benchmark") / "results.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "benchmarks/", "-q", "-p", "no:cacheprovider", "--benchmark-only",
         "--bench-smoke", f"--benchmark-json={out}", "--benchmark-columns=min,median,rounds"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]
    return json.loads(out.read_text()), proc.stdout


@pytest.fixture
def data(suite) -> dict:
    return suite[0]


def _ours(data: dict) -> list[dict]:
    return [b for b in data["benchmarks"] if "family" in b["extra_info"]]


def test_every_smoke_case_and_provider_is_measured_or_skipped_with_a_reason(data):
    measured = {(b["extra_info"]["case"], b["extra_info"]["provider"]) for b in _ours(data)}
    skipped = {(s["case"], s["provider"]): s["reason"] for s in data[results.PYTEST_SECTION]["skipped"]}
    assert not measured & set(skipped)
    assert data[results.PYTEST_SECTION]["failed"] == []
    for family in registry.FAMILIES:
        for spec in registry.specs(family, "smoke"):
            for provider in spec.providers:
                key = (spec.name, provider)
                assert key in measured or skipped.get(key), f"{key}: neither measured nor skipped with a reason"
            assert (spec.name, "ours") in measured, f"{spec.name}: ours not measured"
        full = {spec.name for spec in registry.specs(family, "full")}
        assert not full & {case for case, _ in measured | set(skipped)}, "a full-size case ran or was recorded"


def test_extra_info_holds_the_case_record(data):
    for bench in _ours(data):
        info = bench["extra_info"]
        assert set(info) == INFO_KEYS | ({"memory_ratio"} if info["memory"] else set()), bench["name"]
        assert bench["group"] == info["case"] and info["size"] == "smoke"
        assert bench["params"] == {"case": info["case"], "provider": info["provider"]}
        timing, stats = info["timing"], bench["stats"]
        assert timing["reps"] == stats["rounds"] == len(stats["data"])
        assert timing["ms"] == pytest.approx(stats["median"] * 1e3)
        assert timing["ms_p20"] <= timing["ms"] <= timing["ms_p80"]
        assert info["memory"] is None  # no allocator statistics on the CPU
        work = info["work"]
        if "bytes" in work:
            assert work["gbps"] == pytest.approx(work["bytes"] / timing["ms"] / 1e6)
        if "flops" in work:
            assert work["tflops"] == pytest.approx(work["flops"] / timing["ms"] / 1e9)
        assert bench["options"]["timer"] == "perf_counter"  # CUDA events only on CUDA
    by_case: dict[str, dict[str, dict]] = {}
    for bench in _ours(data):
        by_case.setdefault(bench["extra_info"]["case"], {})[bench["extra_info"]["provider"]] = bench["extra_info"]
    for case, infos in by_case.items():
        ours_ms = infos["ours"]["timing"]["ms"]
        for label, info in infos.items():
            assert info["speedup"] == pytest.approx(info["timing"]["ms"] / ours_ms), (case, label)


def test_converts_to_the_runner_schema(data, tmp_path):
    path = tmp_path / "saved.json"
    path.write_text(json.dumps(data))
    converted = results.load(path)
    section = data[results.PYTEST_SECTION]
    assert converted["environment"] == section["environment"] and section["environment"]["smoke"] is True
    assert converted["ceilings"] == section["ceilings"] and converted["ceilings"]["copy_gbps"] > 0
    assert set(converted["families"]) == set(registry.FAMILIES)
    for family, entry in converted["families"].items():
        assert entry["status"] == "ok", entry
        specs = registry.specs(family, "smoke")
        assert [c["name"] for c in entry["cases"]] == [s.name for s in specs]
        for case, spec in zip(entry["cases"], specs, strict=True):
            assert set(case) == CASE_KEYS
            assert ["ours", *case["baselines"]] == list(spec.providers)  # the registry's column order
            assert set(case["speedup"]) == {p for p, b in case["baselines"].items() if "ms" in b}
            for key, value in case["extra"].items():
                assert not (isinstance(value, dict) and "error" in value), f"{case['name']}: check {key}: {value}"
    assert [t["target"] for t in converted["targets"]] == [t["target"] for t in section["targets"]]
    names = [t["target"] for f, e in converted["families"].items() for t in registry.targets(f, e["cases"], "smoke")]
    assert [t["target"] for t in converted["targets"]] == names
    generate = converted["families"]["generate"]["cases"][0]
    assert set(generate["extra"]["tokens_per_s"]) == {"ours", "hf_generate_x2"}  # per-provider facts merged back


def test_terminal_report(suite):
    _, output = suite
    assert "remax-kernels targets (smoke run: PASS/MISS mean nothing)" in output
    assert "benchmark 'sample_and_greedy B=4 V=300 top_p=0.9'" in output  # one table per case
    assert "full-size case:" in output  # the GPU cases are listed, skipped with the reason


def _assert_pngs(paths: list[Path], names: set[str]) -> None:
    assert {p.name for p in paths} == names
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 10_000, p


def test_plots_of_a_pytest_benchmark_file(data, tmp_path, capsys):
    path = tmp_path / "0001_run.json"
    path.write_text(json.dumps(data))
    assert plot.main([str(path), "--out", str(tmp_path / "plots")]) == 0
    paths = sorted((tmp_path / "plots").glob("*.png"))
    _assert_pngs(paths, {f"{f}.png" for f in registry.FAMILIES} | {"targets.png"})
    assert capsys.readouterr().out.count("wrote ") == len(paths)


def _synthetic_results() -> dict:
    """A made-up GPU-shaped result (test data only: exercises the memory panel, log scales, non-finite values,
    failed and skipped providers, which a CPU smoke run never produces)."""
    def entry(ms, peak):
        return {"ms": ms, "ms_p20": 0.9 * ms, "ms_p80": 1.1 * ms, "reps": 10,
                "memory": {"peak_bytes": peak, "peak_net_bytes": peak // 2, "allocated_before_bytes": peak // 2}}

    cases = []
    for i, vocab in enumerate((1000, 2000)):
        record = {"name": f"op fwd N=8 V={vocab}", "op": "op", "mode": "fwd", "shape": {"N": 8, "V": vocab},
                  "dtype": "bfloat16", "ours": entry(1.0 + i, 2**30),
                  "baselines": {"eager": entry(50.0, 3 * 2**30), "compile": entry(float("nan"), 2**30),
                                "peer": {"skipped": "peer not importable"}, "ours_option": {"error": "out of memory"}},
                  "inputs_grads_bytes": 2**29, "extra": {}}
        cases.append(hz.compare(record, {"copy_gbps": 4000.0, "matmul_tflops": 800.0},
                                bytes_moved=2 * 10**9, flops=None))
    return {"schema_version": 1, "environment": {"device": "GPU", "dtype": "bfloat16", "torch": "x", "triton": "y",
                                                 "date": "2000-01-01", "smoke": False},
            "ceilings": {"copy_gbps": 4000.0, "matmul_tflops": 800.0, "matmul_dtype": "bfloat16"},
            "families": {"fam": {"status": "ok", "cases": cases}, "gone": {"status": "skipped", "reason": "r",
                                                                          "cases": []}},
            "targets": [hz.target("t1", 0.5, 0.85, higher_is_better=True, unit="x") | {"family": "fam"},
                        hz.target("t2", None, 2.0, higher_is_better=False, unit="x") | {"family": "fam"}]}


def test_plot_panels_with_memory_and_missing_values(tmp_path):
    paths = plot.plot_results(_synthetic_results(), tmp_path)
    _assert_pngs(paths, {"fam.png", "targets.png"})


def test_plot_cli_rejects_bad_input(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        plot.main([str(tmp_path / "missing.json")])
    assert exc.value.code == 2 and "no such file" in capsys.readouterr().err
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"benchmarks": [], "machine_info": {}}))
    with pytest.raises(SystemExit):
        plot.main([str(other)])
    assert "remax_kernels" in capsys.readouterr().err  # a pytest-benchmark file of another suite
    other.write_text("[1, 2]")
    with pytest.raises(ValueError, match="neither a benchmarks.run result nor a pytest-benchmark"):
        results.load(other)


def test_cuda_event_timer_refuses_calls_outside_an_armed_round():
    timer = CudaEventTimer()
    with pytest.raises(RuntimeError, match="outside a benchmark.pedantic round"):
        timer()


@pytest.mark.cuda
def test_cuda_event_timer_times_gpu_work():
    timer = CudaEventTimer()
    a = torch.randn(4096, 4096, device="cuda")
    timer.arm()
    assert timer() == 0.0
    for _ in range(20):
        a @ a
    seconds = timer()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        a @ a
    end.record()
    end.synchronize()
    assert seconds == pytest.approx(start.elapsed_time(end) / 1e3, rel=0.5)
    with pytest.raises(RuntimeError):
        timer()
