"""Sampling benchmark: one ``sample_and_greedy`` decoding step.

B=256 rows (half sampled, half greedy: ReMax's pairs), V in {128256, 151936}, bf16 logits, temperature 1, with
and without top-p 0.9, against the eager step (softmax, sort-based top-p, ``torch.multinomial``, ``argmax`` for the
greedy rows, gather of the log-probs) and its ``torch.compile``.

The step must read the logits at least once, so its time is compared with one read of ``B*V`` logits at the copy
bandwidth measured in the same run (``frac_copy_bw`` of the case: 1.0 = as fast as one read, 0.5 = twice as slow).
"""

from __future__ import annotations

import dataclasses
import functools

import torch

import remax_kernels as rk
from benchmarks import baselines as bl
from benchmarks import harness as hz

FAMILY = "sampling"
SHAPES = {
    # The main cases (every column), and a batch sweep for the decode-step kernels against each other and
    # FlashInfer (no torch.compile column there: it recompiles for every shape).
    "full": {"B": 256, "V": (128256, 151936), "top_p": (1.0, 0.9),
             "sweep_B": (1, 8, 64, 1024), "sweep_V": (32000, 128256, 151936)},
    "smoke": {"B": 4, "V": (300,), "top_p": (1.0, 0.9), "sweep_B": (1,), "sweep_V": (300,)},
}
# Gemma-2/3's final_logit_softcapping: one case (the main batch, the first vocabulary, top-p 0.9) with the cap on,
# against the same op without it.
SOFTCAP = 30.0


@dataclasses.dataclass
class Inputs:
    logits: torch.Tensor  # [B, V]
    greedy_mask: torch.Tensor  # [B] bool, the second half of the rows
    top_p: float
    sweep: bool = False  # a batch-sweep case
    softcap: float | None = None  # the soft-capping case


def _compiled(s: hz.Settings, x: Inputs):
    if x.sweep:
        return "measured at the main batch size only (torch.compile recompiles for every shape)"
    step = bl.compiled(bl.eager_sample_and_greedy, s.compile_backend)
    return lambda: step(x.logits, x.greedy_mask, temperature=1.0, top_p=x.top_p)


def _ours_cuda(s: hz.Settings, x: Inputs):
    """The CUDA kernel of csrc/ (backend="cuda"), when the extension is built."""
    if reason := hz.cuda_extension_only(s):
        return reason
    return lambda: rk.sample_and_greedy(x.logits, x.greedy_mask, temperature=1.0, top_p=x.top_p, seed=0, step=0,
                                        softcap=x.softcap, backend="cuda")


def _flashinfer(s: hz.Settings, x: Inputs):
    """FlashInfer's sort-free sampling from logits (every row sampled: it has no greedy rows), when installed."""
    fi = hz.cuda_only(s) or bl.optional_import("flashinfer.sampling")
    if isinstance(fi, str):
        return fi
    if x.top_p < 1.0:
        return lambda: fi.top_k_top_p_sampling_from_logits(x.logits, x.logits.shape[1], x.top_p)
    return lambda: fi.sampling_from_logits(x.logits)


# The columns of every case, "ours" first (see hz.ProviderFactory): one entry per backend, baseline or peer.
PROVIDERS: dict[str, hz.ProviderFactory] = {
    "ours": lambda s, x: lambda: rk.sample_and_greedy(x.logits, x.greedy_mask, temperature=1.0, top_p=x.top_p,
                                                      seed=0, step=0, softcap=x.softcap, backend=s.backend),
    "ours_no_softcap": lambda s, x: (lambda: rk.sample_and_greedy(x.logits, x.greedy_mask, temperature=1.0,
                                                                  top_p=x.top_p, seed=0, step=0, backend=s.backend))
    if x.softcap else "the reference column of the softcap case",
    "eager": lambda s, x: lambda: bl.eager_sample_and_greedy(x.logits, x.greedy_mask, temperature=1.0,
                                                             top_p=x.top_p),
    "compile": _compiled,
    "ours_cuda": _ours_cuda,
    "flashinfer": _flashinfer,
}


def _providers(softcap: float | None) -> tuple[str, ...]:
    """The softcap case is timed against the same op without the cap (the peers have no cap); the others skip that
    column."""
    if softcap:
        return ("ours", "ours_no_softcap", "ours_cuda")
    return tuple(p for p in PROVIDERS if p != "ours_no_softcap")


def case_name(batch: int, vocab: int, top_p: float, softcap: float | None = None) -> str:
    return f"sample_and_greedy B={batch} V={vocab} top_p={top_p:g}" + (f" softcap={softcap:g}" if softcap else "")


def _spec(size: str, batch: int, vocab: int, top_p: float, sweep: bool, softcap: float | None = None) -> hz.CaseSpec:
    shape = {"B": batch, "V": vocab, "top_p": top_p, "greedy_rows": batch - batch // 2}
    if softcap:
        shape["softcap"] = softcap
    return hz.CaseSpec(family=FAMILY, size=size, name=case_name(batch, vocab, top_p, softcap), op="sample_and_greedy",
                       mode="step", shape=shape, providers=_providers(softcap),
                       build=functools.partial(_build, batch=batch, vocab=vocab, top_p=top_p, sweep=sweep,
                                               softcap=softcap))


def specs(size: str) -> list[hz.CaseSpec]:
    shapes = SHAPES[size]
    main = [(shapes["B"], vocab, top_p) for vocab in shapes["V"] for top_p in shapes["top_p"]]
    sweep = [(batch, vocab, top_p) for batch in shapes["sweep_B"] for vocab in shapes["sweep_V"]
             for top_p in shapes["top_p"]]
    return ([_spec(size, *c, sweep=False) for c in main]
            + [_spec(size, *c, sweep=True) for c in sweep if c not in main]
            + [_spec(size, shapes["B"], shapes["V"][0], 0.9, sweep=False, softcap=SOFTCAP)])


def _build(s: hz.Settings, *, batch: int, vocab: int, top_p: float, sweep: bool,
           softcap: float | None = None) -> hz.Case:
    # Scale 3: top-p 0.9 then keeps ~4% of the vocabulary (the mass sits in the tail above ~1.7 sigma).
    logits = 3.0 * torch.randn(batch, vocab, device=s.device, dtype=s.dtype)
    x = Inputs(logits, torch.arange(batch, device=s.device) >= batch // 2, top_p, sweep, softcap)
    calls = hz.provider_calls({p: PROVIDERS[p] for p in _providers(softcap)}, s, x)

    def checks():
        tokens, logprobs = calls["ours"]()
        greedy_ok = tokens[x.greedy_mask] == logits[x.greedy_mask].argmax(dim=-1)
        return {
            "tokens_in_range": bool(((tokens >= 0) & (tokens < vocab)).all()),
            "greedy_rows_equal_argmax": float(greedy_ok.float().mean()),
            "logprobs_finite_and_nonpositive": bool((torch.isfinite(logprobs) & (logprobs <= 0)).all()),
        }

    return hz.Case(
        calls=calls,
        bytes_moved=logits.numel() * logits.element_size(),
        inputs_grads_bytes=hz.tensor_bytes(logits, x.greedy_mask),
        extra={"checks": hz.check(checks), "bytes_counted": "one read of the logits"},
    )


def targets(cases: list[dict], size: str) -> list[dict]:
    shapes = SHAPES[size]
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
    # Issue 11, the CUDA kernel: >= 15x the sort-based path with top-p; without truncation within 1.3x of one read
    # of the logits; faster than FlashInfer at every batch size measured.
    for vocab in shapes["V"]:
        case = hz.find_case(cases, case_name(shapes["B"], vocab, 0.9))
        out.append(hz.target(f"sample_and_greedy (cuda) V={vocab} top_p=0.9: speedup over sort-based top-p",
                             hz.ratio(hz.baseline_ms(case, "eager"), hz.baseline_ms(case, "ours_cuda")), 15.0,
                             higher_is_better=True, unit="x"))
        case = hz.find_case(cases, case_name(shapes["B"], vocab, 1.0))
        frac = case["work"].get("frac_copy_bw") if case else None
        out.append(hz.target(f"sample_and_greedy (cuda) V={vocab} no truncation: one-logits-read time / step time",
                             None if frac is None else hz.ratio(frac * hz.ours_ms(case),
                                                                hz.baseline_ms(case, "ours_cuda")),
                             1 / 1.3, higher_is_better=True, unit="x"))
    for batch in sorted({shapes["B"], *shapes["sweep_B"]}):
        for vocab in sorted({*shapes["V"], *shapes["sweep_V"]}):
            case = hz.find_case(cases, case_name(batch, vocab, 0.9))
            if case is None:
                continue
            out.append(hz.target(f"sample_and_greedy (cuda) B={batch} V={vocab} top_p=0.9: speedup over FlashInfer",
                                 hz.ratio(hz.baseline_ms(case, "flashinfer"), hz.baseline_ms(case, "ours_cuda")),
                                 1.0, higher_is_better=True, unit="x"))
    return out
