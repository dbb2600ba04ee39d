"""The benchmark harness end to end on the CPU (``--smoke``): every family runs, and the result
file has the documented schema. GPU numbers come only from ``scripts/gpu_check.sh`` on a CUDA machine."""

from __future__ import annotations

import json
import math

import pytest
import torch

from benchmarks import harness as hz
from benchmarks import plot, registry
from benchmarks import results as results_io
from benchmarks import run as runner

# Every family the suite must hold (the README's list), each run by the smoke run.
FAMILIES = ("logprobs", "policy_loss", "sampling", "generate", "trainer")
CASE_KEYS = {"name", "op", "mode", "shape", "dtype", "ours", "baselines", "speedup", "memory_ratio", "work",
             "inputs_grads_bytes", "extra"}
TARGET_KEYS = {"target", "measured", "threshold", "higher_is_better", "unit", "pass", "family"}


@pytest.fixture(scope="module")
def smoke_run() -> tuple[dict, str]:
    """One smoke run of every family, shared by the tests below: (results, printed report)."""
    lines: list[str] = []
    with pytest.MonkeyPatch.context() as mp:
        # The smoke run exercises the harness, not the kernels (their own tests run them under the interpreter).
        mp.setenv("REMAX_KERNELS_BACKEND", "torch")
        out = runner.run_benchmarks(smoke=True, log=lambda *a: lines.append(" ".join(map(str, a))))
    return out, "\n".join(lines)


@pytest.fixture
def results(smoke_run) -> dict:
    return smoke_run[0]


def test_environment_and_ceilings(results):
    assert results["schema_version"] == runner.SCHEMA_VERSION
    env = results["environment"]
    for key in ("device", "torch", "triton", "cuda", "python", "date", "smoke", "dtype", "backend"):
        assert key in env, key
    assert env["smoke"] is True and env["torch"] == torch.__version__
    ceilings = results["ceilings"]
    assert ceilings["copy_gbps"] > 0 and ceilings["matmul_tflops"] > 0
    assert ceilings["copy_gbps"] == pytest.approx(ceilings["copy_bytes"] / ceilings["copy_ms"] / 1e6)


@pytest.mark.parametrize("family", FAMILIES)
def test_family_runs(results, family):
    entry = results["families"][family]
    assert entry["status"] == "ok", entry.get("traceback") or entry.get("error") or entry.get("reason")
    assert entry["cases"], f"{family}: no cases"
    for case in entry["cases"]:
        assert set(case) == CASE_KEYS, case["name"]
        ours = case["ours"]
        assert ours["ms"] > 0 and ours["ms_p20"] <= ours["ms"] <= ours["ms_p80"] and ours["reps"] >= 1
        assert ours["memory"] is None  # no allocator statistics on the CPU
        assert case["baselines"], f"{case['name']}: no baseline"
        for label, b in case["baselines"].items():
            assert "error" not in b, f"{case['name']} / {label}: {b['error']}"
            if "skipped" in b:
                continue
            assert b["ms"] > 0
            assert case["speedup"][label] == pytest.approx(b["ms"] / ours["ms"])
        if "bytes" in case["work"]:
            assert case["work"]["gbps"] == pytest.approx(case["work"]["bytes"] / ours["ms"] / 1e6)
        if "flops" in case["work"]:
            assert case["work"]["tflops"] == pytest.approx(case["work"]["flops"] / ours["ms"] / 1e9)
    family_targets = [t for t in results["targets"] if t["family"] == family]
    assert family_targets, f"{family}: no targets evaluated"
    for t in family_targets:
        assert set(t) == TARGET_KEYS
        assert t["pass"] is None or t["pass"] == (
            t["measured"] >= t["threshold"] if t["higher_is_better"] else t["measured"] <= t["threshold"]
        )


def test_benchmarked_ops_agree_with_baselines(results):
    """The numbers come from working ops: each case's own correctness check against the eager baseline passes."""
    checked = 0
    for entry in results["families"].values():
        for case in entry["cases"]:
            extra = case["extra"]
            for key, value in extra.items():
                assert not (isinstance(value, dict) and "error" in value), f"{case['name']}: check {key}: {value}"
            if "max_abs_diff_logprobs_vs_eager" in extra:
                assert extra["max_abs_diff_logprobs_vs_eager"] < 1e-4, case["name"]
                checked += 1
            if "abs_diff_loss_vs_eager" in extra:
                assert extra["abs_diff_loss_vs_eager"] < 1e-4, case["name"]
                checked += 1
            if case["op"] == "sample_and_greedy":
                assert extra["checks"] == {"tokens_in_range": True, "greedy_rows_equal_argmax": 1.0,
                                           "logprobs_finite_and_nonpositive": True}, case["name"]
                checked += 1
            if case["op"] == "remax.Trainer.train_step":
                # The fused loss and the eager-logits loss of the baseline agree on one batch.
                assert extra["checks"]["abs_diff"] < 1e-4 * max(1.0, abs(extra["checks"]["loss"])), extra["checks"]
                assert set(extra["step_split"]) == {"ours", "eager_logits_loss"}
                checked += 1
            if case["op"] == "generate_pairs":
                assert extra["checks"]["all_rows_full_length"] is True, extra["checks"]
                assert 0.0 <= extra["checks"]["greedy_tokens_equal_hf"] <= 1.0
                checked += 1
    if checked == 0:
        pytest.skip("no family with correctness checks has landed yet")


def test_printed_report(smoke_run):
    results, log = smoke_run
    assert "ceilings: copy" in log and "SMOKE" in log
    for entry in results["families"].values():
        for case in entry["cases"]:
            assert case["name"] in log
    for t in results["targets"]:
        assert t["target"] in log


def test_result_file_is_strict_json_and_never_overwritten(results, tmp_path):
    data = results
    first = runner.write_results(data, tmp_path)
    second = runner.write_results(data, tmp_path)
    assert first != second and second.name.endswith("-2.json")
    assert first.name == f"cpu-{data['environment']['date'][:10]}.json"
    loaded = json.loads(first.read_text(), parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    assert set(loaded["families"]) == set(FAMILIES)
    assert loaded["environment"] == data["environment"]


def test_non_finite_values_are_written_as_strings(tmp_path):
    data = {"environment": {"device": "cpu (x)", "date": "2025-01-01T00:00:00+00:00"}, "v": [math.nan, math.inf, 1.5]}
    path = runner.write_results(data, tmp_path)
    assert json.loads(path.read_text())["v"] == ["nan", "inf", 1.5]


def test_cli_only_and_out(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("REMAX_KERNELS_BACKEND", "torch")
    assert runner.main(["--smoke", "--only", "sampling", "--out", str(tmp_path)]) == 0
    files = list(tmp_path.glob("*.json"))
    assert len(files) == 1
    loaded = json.loads(files[0].read_text())
    assert list(loaded["families"]) == ["sampling"]
    assert f"wrote {files[0]}" in capsys.readouterr().out


def test_bad_options():
    with pytest.raises(ValueError, match="only: unknown families"):
        runner.run_benchmarks(only=["nope"], smoke=True)
    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        hz.make_settings(smoke=False, device="cpu")


def test_target_verdicts():
    assert hz.target("t", 2.5, 2.0, higher_is_better=True, unit="x")["pass"] is True
    assert hz.target("t", 1.5, 2.0, higher_is_better=True, unit="x")["pass"] is False
    assert hz.target("t", 1.6, 1.5, higher_is_better=False, unit="x")["pass"] is False
    assert hz.target("t", 1.4, 1.5, higher_is_better=False, unit="x")["pass"] is True
    missing = hz.target("t", None, 1.5, higher_is_better=False, unit="x")
    assert missing["pass"] is None and "n/a" in hz.format_target(missing)
    assert "[MISS]" in hz.format_target(hz.target("t", 1.0, 2.0, higher_is_better=True, unit="x"))


def test_time_fn_counts_calls_and_takes_the_median():
    s = hz.make_settings(smoke=True)
    calls = []
    timing = hz.time_fn(lambda: calls.append(1), s, warmup=2, reps=5)
    assert len(calls) == 2 + 5 and timing["reps"] == 5
    assert timing["ms_p20"] <= timing["ms"] <= timing["ms_p80"]


def _spec(calls: dict, providers: tuple[str, ...] | None = None, **case_kw) -> hz.CaseSpec:
    return hz.CaseSpec(family="f", size="smoke", name="op fwd N=2 top_p=0.9", op="op", mode="fwd", shape={"N": 2},
                       providers=providers or tuple(calls), build=lambda s: hz.Case(calls=calls, **case_kw))


def test_failing_op_is_recorded_not_raised():
    s = hz.make_settings(smoke=True)
    ceilings = {"copy_gbps": 1.0, "matmul_tflops": 1.0}

    def broken():
        raise RuntimeError("kernel exploded")

    closed = []
    spec = _spec({"ours": broken, "eager": lambda: None, "peer": "not installed"}, bytes_moved=10,
                 close=lambda: closed.append(True))
    case = hz.run_case(s, ceilings, spec)
    assert case["ours"] == {"error": "RuntimeError: kernel exploded"}
    assert case["baselines"]["peer"] == {"skipped": "not installed"}
    assert case["baselines"]["eager"]["ms"] > 0
    assert case["speedup"] == {} and "gbps" not in case["work"] and case["work"]["bytes"] == 10
    assert closed == [True]


def test_case_records_per_provider_facts_and_checks_its_columns():
    s = hz.make_settings(smoke=True)
    ceilings = {"copy_gbps": 1.0, "matmul_tflops": 1.0}
    spec = _spec({"ours": lambda: None, "eager": lambda: None}, flops=10**6, shape={"params": 3},
                 provider_extra=lambda label, entry: {"calls_per_s": 1e3 / entry["ms"]})
    case = hz.run_case(s, ceilings, spec)
    assert case["shape"] == {"N": 2, "params": 3}
    assert set(case["extra"]["calls_per_s"]) == {"ours", "eager"}
    assert case["extra"]["calls_per_s"]["ours"] == pytest.approx(1e3 / case["ours"]["ms"])
    assert case["work"]["tflops"] == pytest.approx(10**6 / case["ours"]["ms"] / 1e9)
    with pytest.raises(RuntimeError, match="built providers"):
        hz.run_case(s, ceilings, _spec({"ours": lambda: None}, providers=("ours", "eager")))
    assert spec.test_id == "op-fwd-N2-top_p0.9"  # no '=' or spaces: usable in -k expressions


def test_registry_lists_every_family_at_both_sizes():
    for family in runner.FAMILIES:
        for size in hz.SIZES:
            specs = registry.specs(family, size)
            assert specs and all(s.family == family and s.size == size and s.providers[0] == "ours" for s in specs)
            assert len({s.name for s in specs}) == len(specs)
    with pytest.raises(ValueError, match="family: unknown"):
        registry.specs("nope", "smoke")
    with pytest.raises(ValueError, match="size: must be one of"):
        registry.specs("sampling", "huge")


def test_runner_file_loads_unchanged_and_plots(results, tmp_path):
    path = runner.write_results(results, tmp_path)
    assert results_io.load(path) == json.loads(path.read_text())
    png = plot.plot_family(results_io.load(path), "sampling", tmp_path / "sampling.png")
    assert png.read_bytes()[:4] == b"\x89PNG"
