"""``python -m benchmarks.model``: the cost models of the ops at the benchmark shapes hold what the designs claim."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks import model


@pytest.fixture(scope="module")
def rows():
    return {r["case"]: r for r in model.model_cases(dict(model.ASSUMED_CEILINGS))}


def test_every_kernel_case_is_modeled(rows):
    ops = {r["op"] for r in rows.values()}
    assert ops == {"token_logprobs", "fused_linear_logprobs", "fused_linear_policy_loss", "sample_and_greedy"}
    assert all(r["design"]["ms"] > 0 and r["floor"]["ms"] > 0 for r in rows.values())


def test_training_ops_are_within_the_issue_targets_of_their_floor(rows):
    """Token ops move exactly the floor's bytes; the lm-head ops stay within 1.15x of their GEMM floor (the
    benchmark targets), the policy loss below 3 full GEMMs because it skips the non-response rows."""
    for r in rows.values():
        if r["op"] == "token_logprobs":
            assert r["ratio"] == pytest.approx(1.0), r["case"]
        elif r["op"] in ("fused_linear_logprobs", "fused_linear_policy_loss"):
            assert r["ratio"] <= 1.15, (r["case"], r["ratio"])


def test_search_replay_counts_passes_like_the_kernel():
    """The replayed pivot search converges to the exact top-p threshold: the kept mass reaches p, and dropping the
    smallest kept value would not."""
    rng = np.random.default_rng(1)
    z = (3 * rng.standard_normal(5000)).astype(np.float32)
    passes, tau = model.top_p_search(z, 0.9)
    assert 1 <= passes <= 11
    keys, mass = model._ordered_keys(z), np.exp(z.astype(np.float64) - z.max())
    assert mass[keys >= tau].sum() >= 0.9 * mass.sum() > mass[keys > tau].sum()
    # Fewer pivots per pass cannot need fewer passes.
    assert model.top_p_search_passes(z, 0.9, num_pivots=2) >= passes


def test_main_prints_a_table(capsys, tmp_path):
    assert model.main(["--json", str(tmp_path / "m.json")]) == 0
    out = capsys.readouterr().out
    assert "fused_linear_policy_loss" in out and "assumed" in out
    assert (tmp_path / "m.json").stat().st_size > 0
