"""Cost models of the ops at the benchmark shapes: what each design moves and computes, against the floor.

    python -m benchmarks.model                              # every kernel case of the registry, full size
    python -m benchmarks.model --ceilings RESULTS.json      # with the ceilings a GPU run measured
    python -m benchmarks.model --json out.json

For each case of the ``logprobs``, ``policy_loss`` and ``sampling`` families (``benchmarks/registry.py``, the same
cases the benchmarks time) it prints:

- design: the op's GEMM-equivalents (one = ``2 N H V`` flops) and the bytes its passes move (logits written and
  read, fp32 weight-gradient accumulation, sampling search passes), as the op's module docstrings describe them;
- floor: the least any implementation must do (token ops: the logits read once per direction and the gradient
  written; lm-head ops: the GEMMs the issue targets, 4 for log-probs with any downstream loss, 3 for a scalar loss);
- the time each implies at the device's ceilings (``time = flops / matmul peak + bytes / copy bandwidth``, a
  serial sum: optimistic for both, as ceilings are), and design / floor;
- for the soft-capping cases (``shape["softcap"]``), the cap's special-function work: ``cap * tanh(x / cap)`` costs
  one exp and one reciprocal per logit per row pass (``SOFTCAP_SFU_PER_ELEMENT``, the kernels' ``1 - 2 / (exp(2u) +
  1)``), counted as ``sfu`` ops and timed against the SFU rate (``sfu_tops``) as the larger of that and the pass's
  memory time: the cap stays inside the passes (no extra bytes), so it costs time only where the SFU is the limit.

The sampling search passes are not a constant: they are counted by replaying the op's multi-pivot search
(``remax_kernels.ops.sampling._threshold_search``) in numpy on rows drawn like the benchmark's (``3 * N(0, 1)``).

Without ``--ceilings`` the H200 figures of ``shared/TOOLCHAIN.md`` are used and labeled as assumed; the ratios do not
depend on them. Whole-model families (``generate``, ``trainer``) are not modeled here.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import numpy as np
import torch

from benchmarks import registry
from remax_kernels.ops import fused_linear_logprobs as flp
from remax_kernels.ops import sampling

ASSUMED_CEILINGS = {"copy_gbps": 4300.0, "matmul_tflops": 790.0, "source": "assumed: H200 figures of TOOLCHAIN.md"}
# SFU (MUFU) throughput: 16 ops per SM per clock (sm_90) x 132 SMs x ~1.98 GHz, on top of the exp and log the row
# passes already use (those are not counted here; the soft-cap's extra ops are).
SFU_TOPS = 4.2
SOFTCAP_SFU_PER_ELEMENT = 2  # exp + reciprocal (the tanh) per logit per row pass
BF16 = 2  # bytes per element of the benchmarks' dtype
# The policy-loss benchmark draws response lengths uniformly in [T/2, T]: 75% of the rows are response tokens.
RESPONSE_FRACTION = 0.75


def _gemm(n: int, h: int, v: int) -> float:
    return 2.0 * n * h * v


def _grad_weight_bytes(n_valid: int, h: int, v: int) -> float:
    """fp32 grad_W accumulation across chunks (first chunk writes, later ones read-modify-write) plus the final
    cast to the weight's dtype."""
    chunks = math.ceil(n_valid / flp.chunk_rows(n_valid, v, torch.bfloat16, torch.device("cuda")))
    return 4.0 * v * h * (1 + 2 * (chunks - 1)) + (4.0 + BF16) * v * h


def _with_softcap(cost: dict, shape: dict, elements_per_pass: float, passes: float) -> dict:
    """Adds the soft-cap's SFU ops (``shape["softcap"]`` set) to the design side: per logit per row pass."""
    if shape.get("softcap"):
        cost["design"]["sfu"] = SOFTCAP_SFU_PER_ELEMENT * elements_per_pass * passes
        cost["design"]["what"] += f"; soft-cap: {SOFTCAP_SFU_PER_ELEMENT} SFU ops per logit, {passes:g} row pass(es)"
    return cost


def token_logprobs(shape: dict, mode: str) -> dict:
    n, v = shape["N"], shape["V"]
    passes = 1 if mode == "fwd" else 3  # fwd: one read; bwd: one read + one write of the gradient
    logits = n * v * BF16
    return {"design": {"gemms": 0, "bytes": passes * logits, "what": f"{passes} pass(es) over [N, V]"},
            "floor": {"gemms": 0, "bytes": passes * logits, "what": "logits read once per direction + grad write"}}


def fused_linear_logprobs(shape: dict, mode: str) -> dict:
    n, h, v = shape["N"], shape["H"], shape["V"]
    logits = n * v * BF16
    operands = (n * h + v * h) * BF16
    if mode == "fwd":
        return {"design": {"gemms": 1, "bytes": 2 * logits + operands, "what": "GEMM; logits written + read once"},
                "floor": {"gemms": 1, "bytes": operands, "what": "1 GEMM, row pass fused on chip"}}
    design_bytes = 5 * logits + 3 * operands + _grad_weight_bytes(n, h, v)
    cost = {"design": {"gemms": 4, "bytes": design_bytes,
                       "what": "fwd GEMM + recompute + 2 grad GEMMs; logits written, read; rewritten, read + written"},
            "floor": {"gemms": 4, "bytes": 3 * operands, "what": "the issue's 4 GEMMs (logits recomputed)"}}
    return _with_softcap(cost, shape, n * v, 2)  # the forward row pass and the backward row pass


def fused_linear_policy_loss(shape: dict, mode: str) -> dict:
    n, h, v = shape["N"], shape["H"], shape["V"]
    n_valid = int(n * RESPONSE_FRACTION)
    logits = n_valid * v * BF16
    operands = (n_valid * h + v * h) * BF16
    design_bytes = 4 * logits + 3 * operands + _grad_weight_bytes(n_valid, h, v)
    return _with_softcap({"design": {"gemms": 3 * n_valid / n, "bytes": design_bytes,
                       "what": f"3 GEMMs over the {RESPONSE_FRACTION:.0%} response rows; logits written, read, "
                               "read + written in place"},
            "floor": {"gemms": 3, "bytes": (n * h + v * h) * BF16 * 3, "what": "3 GEMMs of N H V (all rows)"}},
        shape, n_valid * v, 2)


def _ordered_keys(z: np.ndarray) -> np.ndarray:
    bits = z.astype(np.float32).view(np.int32).astype(np.int64)
    key = np.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return np.where(z == 0, 0, key)


def top_p_search_passes(z: np.ndarray, top_p: float, num_pivots: int = sampling._NUM_PIVOTS) -> int:
    """Passes of the op's mass-based pivot search for one row (the kernel's ``_threshold_search``, replayed)."""
    return top_p_search(z, top_p, num_pivots)[0]


def top_p_search(z: np.ndarray, top_p: float, num_pivots: int = sampling._NUM_PIVOTS) -> tuple[int, int]:
    """``(passes, threshold key)`` of the kernel's top-p search on one fp32 row."""
    keys = _ordered_keys(z)
    order = np.argsort(keys)[::-1]
    sorted_keys, mass = keys[order], np.exp(z[order].astype(np.float64) - z.max())
    mass_ge = np.cumsum(mass)  # mass of keys >= sorted_keys[i]
    target = top_p * mass_ge[-1]
    lo, hi, passes = int(sorted_keys[-1]), int(sorted_keys[0]), 0
    desc = -sorted_keys
    while lo < hi:
        passes += 1
        j = np.arange(1, num_pivots + 1)
        pivots = lo + ((hi - lo) * j + num_pivots - 1) // num_pivots
        count_ge = np.searchsorted(desc, -pivots, side="right")  # entries with key >= pivot
        mass_at = np.where(count_ge > 0, mass_ge[np.maximum(count_ge - 1, 0)], 0.0)
        ok = mass_at >= target
        jstar = int(j[ok].max()) if ok.any() else 0
        if jstar > 0:
            lo = int(sorted_keys[count_ge[jstar - 1] - 1])  # the smallest key >= the chosen pivot
        if jstar < num_pivots:
            below = count_ge[jstar]  # first key < pivot j* + 1
            hi = int(sorted_keys[below]) if below < len(sorted_keys) else lo
    return passes, lo


def sample_and_greedy(shape: dict, mode: str, *, rows: int = 8) -> dict:
    b, v, top_p = shape["B"], shape["V"], shape["top_p"]
    sampled = b - shape["greedy_rows"]
    logits = v * BF16
    if top_p >= 1.0:
        return {"design": {"gemms": 0, "bytes": b * logits, "what": "one pass per row"},
                "floor": {"gemms": 0, "bytes": b * logits, "what": "logits read once"}}
    rng = np.random.default_rng(0)
    searches = [top_p_search_passes(3.0 * rng.standard_normal(v).astype(np.float32), top_p) for _ in range(rows)]
    per_sampled_row = 2 + float(np.mean(searches))  # statistics pass + search passes + sampling pass
    cost = {"design": {"gemms": 0, "bytes": (sampled * per_sampled_row + (b - sampled)) * logits,
                       "what": f"sampled rows {per_sampled_row:.1f} passes (search {min(searches)}-{max(searches)}),"
                               " greedy rows 1"},
            "floor": {"gemms": 0, "bytes": b * logits, "what": "logits read once"}}
    # Every pass caps what it reads: the row-passes per row, averaged over sampled and greedy rows.
    return _with_softcap(cost, shape, v, sampled * per_sampled_row + (b - sampled))


MODELS = {"token_logprobs": token_logprobs, "fused_linear_logprobs": fused_linear_logprobs,
          "fused_linear_policy_loss": fused_linear_policy_loss, "sample_and_greedy": sample_and_greedy}


def implied_ms(cost: dict, shape: dict, ceilings: dict) -> float:
    flops = cost["gemms"] * _gemm(shape.get("N", 0), shape.get("H", 0), shape.get("V", 0))
    memory_s = cost["bytes"] / (ceilings["copy_gbps"] * 1e9)
    # The soft-cap's SFU work overlaps the passes' memory traffic: it adds time only beyond it.
    sfu_s = cost.get("sfu", 0.0) / (ceilings.get("sfu_tops", SFU_TOPS) * 1e12)
    return 1e3 * (flops / (ceilings["matmul_tflops"] * 1e12) + max(memory_s, sfu_s))


def model_cases(ceilings: dict) -> list[dict]:
    rows = []
    for family in ("logprobs", "policy_loss", "sampling"):
        for spec in registry.specs(family, "full"):
            cost = MODELS[spec.op](spec.shape, spec.mode)
            for side in ("design", "floor"):
                cost[side]["ms"] = implied_ms(cost[side], spec.shape, ceilings)
            rows.append({"family": family, "case": spec.name, "op": spec.op, "mode": spec.mode,
                         "shape": spec.shape, **cost, "ratio": cost["design"]["ms"] / cost["floor"]["ms"]})
    return rows


def _load_ceilings(path: str | None) -> dict:
    if path is None:
        return dict(ASSUMED_CEILINGS)
    with open(path) as f:
        data = json.load(f)
    found = data.get("ceilings") or data.get("remax_kernels", {}).get("ceilings")
    if not found:
        raise SystemExit(f"--ceilings: {path} has no 'ceilings' entry (a benchmarks.run or pytest-benchmark JSON)")
    return {"copy_gbps": float(found["copy_gbps"]), "matmul_tflops": float(found["matmul_tflops"]),
            "source": f"measured: {path}"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="cost models of the ops at the benchmark shapes")
    parser.add_argument("--ceilings", help="a results JSON whose measured ceilings to use")
    parser.add_argument("--json", help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    ceilings = _load_ceilings(args.ceilings)
    rows = model_cases(ceilings)
    print(f"ceilings: copy {ceilings['copy_gbps']:.0f} GB/s, bf16 matmul {ceilings['matmul_tflops']:.0f} TFLOP/s "
          f"({ceilings['source']})")
    print(f"{'case':52} {'design':>24} {'floor':>24} {'ratio':>6}")
    for r in rows:
        d, f = r["design"], r["floor"]
        fmt = lambda c: f"{c['gemms']:.2f} GEMM {c['bytes'] / 1e9:6.2f} GB {c['ms']:7.3f} ms"
        print(f"{r['case'][:52]:52} {fmt(d):>24} {fmt(f):>24} {r['ratio']:6.2f}")
        print(f"{'':52}   design: {d['what']}; floor: {f['what']}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"ceilings": ceilings, "cases": rows}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
