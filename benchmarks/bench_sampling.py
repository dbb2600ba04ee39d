"""Sampling benchmark: one ``sample_and_greedy`` decoding step.

B=256 rows (half sampled, half greedy: ReMax's pairs), V in {128256, 151936}, bf16 logits, temperature 1, with
and without top-p 0.9, against the eager step (softmax, sort-based top-p, ``torch.multinomial``, ``argmax`` for the
greedy rows, gather of the log-probs) and its ``torch.compile``.

The step must read the logits at least once, so its time is compared with one read of ``B*V`` logits at the copy
bandwidth measured in the same run (``frac_copy_bw`` of the case: 1.0 = as fast as one read, 0.5 = twice as slow).
"""

from __future__ import annotations

import torch

import remax_kernels as rk
from benchmarks import baselines as bl
from benchmarks import harness as hz

FULL = {"B": 256, "V": (128256, 151936), "top_p": (1.0, 0.9)}
SMOKE = {"B": 4, "V": (300,), "top_p": (1.0, 0.9)}


def case_name(batch: int, vocab: int, top_p: float) -> str:
    return f"sample_and_greedy B={batch} V={vocab} top_p={top_p:g}"


def run(s: hz.Settings, ceilings: dict) -> list[dict]:
    shapes = SMOKE if s.smoke else FULL
    return [_case(s, ceilings, shapes["B"], vocab, top_p) for vocab in shapes["V"] for top_p in shapes["top_p"]]


def _case(s: hz.Settings, ceilings: dict, batch: int, vocab: int, top_p: float) -> dict:
    # Scale 3: top-p 0.9 then keeps ~4% of the vocabulary (the mass sits in the tail above ~1.7 sigma).
    logits = 3.0 * torch.randn(batch, vocab, device=s.device, dtype=s.dtype)
    greedy_mask = torch.arange(batch, device=s.device) >= batch // 2

    def ours():
        return rk.sample_and_greedy(logits, greedy_mask, temperature=1.0, top_p=top_p, seed=0, step=0,
                                    backend=s.backend)

    eager_fn = lambda: bl.eager_sample_and_greedy(logits, greedy_mask, temperature=1.0, top_p=top_p)
    compiled_fn = bl.compiled(bl.eager_sample_and_greedy, s.compile_backend)

    def checks():
        tokens, logprobs = ours()
        greedy_ok = tokens[greedy_mask] == logits[greedy_mask].argmax(dim=-1)
        return {
            "tokens_in_range": bool(((tokens >= 0) & (tokens < vocab)).all()),
            "greedy_rows_equal_argmax": float(greedy_ok.float().mean()),
            "logprobs_finite_and_nonpositive": bool((torch.isfinite(logprobs) & (logprobs <= 0)).all()),
        }

    return hz.run_case(
        s, ceilings,
        name=case_name(batch, vocab, top_p), op="sample_and_greedy", mode="step",
        shape={"B": batch, "V": vocab, "top_p": top_p, "greedy_rows": batch - batch // 2},
        ours=ours,
        baselines={"eager": eager_fn,
                   "compile": lambda: compiled_fn(logits, greedy_mask, temperature=1.0, top_p=top_p)},
        bytes_moved=logits.numel() * logits.element_size(),
        inputs_grads_bytes=hz.tensor_bytes(logits, greedy_mask),
        extra={"checks": hz.check(checks), "bytes_counted": "one read of the logits"},
    )


def targets(cases: list[dict], ceilings: dict, s: hz.Settings) -> list[dict]:
    shapes = SMOKE if s.smoke else FULL
    out = []
    for vocab in shapes["V"]:
        case = hz.find_case(cases, case_name(shapes["B"], vocab, 0.9))
        out.append(hz.target(f"sample_and_greedy V={vocab} top_p=0.9: speedup over sort-based top-p",
                             case["speedup"].get("eager") if case else None, 10.0,
                             higher_is_better=True, unit="x"))
    for vocab in shapes["V"]:
        case = hz.find_case(cases, case_name(shapes["B"], vocab, 1.0))
        out.append(hz.target(f"sample_and_greedy V={vocab} no truncation: one-logits-read time / step time",
                             case["work"].get("frac_copy_bw") if case else None, 0.5,
                             higher_is_better=True, unit="x"))
    return out
