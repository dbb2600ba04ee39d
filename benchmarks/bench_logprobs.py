"""Log-prob benchmarks: ``token_logprobs`` (from logits) and ``fused_linear_logprobs`` (from hidden states).

- token_logprobs, forward and forward+backward, N=8192 tokens, V in {32000, 128256, 151936}, bf16, against eager
  ``log_softmax(logits.float()).gather`` and its ``torch.compile``, and Liger's cross-entropy when importable. The
  forward must read the logits once: its GB/s is compared with the measured copy bandwidth. Forward+backward moves
  at least three ``[N, V]`` tensors (read in forward, read in backward, write the gradient).
- fused_linear_logprobs, forward and forward+backward, N=8192, H=4096, V=128256, bf16, against eager (materialized
  logits) and compile, Liger's fused linear cross-entropy and cut-cross-entropy when importable, and the cuBLAS time
  of the four ``N*H*V`` matmuls a logits-recomputing backward needs (forward logits, recomputed logits, grad_hidden,
  grad_weight). Peak memory is compared with the bytes of the inputs plus the returned gradients.

Every call uses random inputs; the upstream gradient of the log-probs is a random ``[N]`` vector (per-token weights,
as advantages are), and gradients are taken with ``torch.autograd.grad`` so nothing accumulates between calls.
"""

from __future__ import annotations

import torch

import remax_kernels as rk
from benchmarks import baselines as bl
from benchmarks import harness as hz

FULL = {"token_n": 8192, "token_vocabs": (32000, 128256, 151936), "linear": (8192, 4096, 128256)}
SMOKE = {"token_n": 16, "token_vocabs": (300,), "linear": (16, 32, 300)}


def token_case_name(mode: str, n: int, vocab: int) -> str:
    return f"token_logprobs {mode} N={n} V={vocab}"


def linear_case_name(mode: str, n: int, hidden: int, vocab: int) -> str:
    return f"fused_linear_logprobs {mode} N={n} H={hidden} V={vocab}"


def run(s: hz.Settings, ceilings: dict) -> list[dict]:
    shapes = SMOKE if s.smoke else FULL
    cases = []
    for vocab in shapes["token_vocabs"]:
        for mode in ("fwd", "fwd+bwd"):
            cases.append(_token_case(s, ceilings, mode, shapes["token_n"], vocab))
    n, hidden, vocab = shapes["linear"]
    for mode in ("fwd", "fwd+bwd"):
        cases.append(_linear_case(s, ceilings, mode, n, hidden, vocab))
    return cases


def _token_case(s: hz.Settings, ceilings: dict, mode: str, n: int, vocab: int) -> dict:
    backward = mode == "fwd+bwd"
    # Scale 2 keeps the softmax away from uniform; the kernels' work does not depend on the values.
    logits = (2.0 * torch.randn(n, vocab, device=s.device, dtype=s.dtype)).requires_grad_(backward)
    targets = torch.randint(0, vocab, (n,), device=s.device)
    grad_out = torch.randn(n, device=s.device)

    def runner(logprob_fn):
        if not backward:
            return lambda: logprob_fn(logits, targets)
        return lambda: torch.autograd.grad(logprob_fn(logits, targets), logits, grad_out)

    ours_fn = lambda x, t: rk.token_logprobs(x, t, backend=s.backend)
    compiled_fn = bl.compiled(bl.eager_token_logprobs, s.compile_backend)
    baselines = {"eager": runner(bl.eager_token_logprobs), "compile": runner(compiled_fn)}
    if backward:
        # Our opt-in memory saver, timed beside the default; it overwrites the logits with their gradient, so it
        # runs after every entry that needs the original values (the values do not change the work done).
        baselines["ours_inplace_backward"] = lambda: torch.autograd.grad(
            rk.token_logprobs(logits, targets, inplace_backward=True, backend=s.backend), logits, grad_out
        )
    liger = bl.optional_import("liger_kernel.transformers")
    if isinstance(liger, str):
        baselines["liger"] = liger
    elif not backward:
        baselines["liger"] = "Liger's cross-entropy computes the gradient inside its forward: compared in fwd+bwd"
    else:
        # Last on purpose: Liger writes the gradient into the logits' storage, as inplace_backward does.
        liger_loss = liger.LigerCrossEntropyLoss(reduction="sum")
        baselines["liger"] = lambda: torch.autograd.grad(liger_loss(logits, targets), logits)

    row_bytes = vocab * logits.element_size()
    # Minimum traffic: forward reads the logits once; backward reads them again and writes the gradient.
    bytes_moved = n * row_bytes * (3 if backward else 1) + n * (targets.element_size() + 4 * (2 if backward else 1))
    diff = hz.check(lambda: hz.max_abs_diff(ours_fn(logits, targets), bl.eager_token_logprobs(logits, targets)))
    return hz.run_case(
        s, ceilings,
        name=token_case_name(mode, n, vocab), op="token_logprobs", mode=mode, shape={"N": n, "V": vocab},
        ours=runner(ours_fn), baselines=baselines, bytes_moved=bytes_moved,
        inputs_grads_bytes=hz.tensor_bytes(logits, targets, grad_out) + (hz.tensor_bytes(logits) if backward else 0),
        extra={"max_abs_diff_logprobs_vs_eager": diff},
    )


def _linear_case(s: hz.Settings, ceilings: dict, mode: str, n: int, hidden_size: int, vocab: int) -> dict:
    backward = mode == "fwd+bwd"
    hidden = torch.randn(n, hidden_size, device=s.device, dtype=s.dtype).requires_grad_(backward)
    # std H^-1/2 makes logits ~ N(0, 1) like a trained lm-head on normalized hidden states.
    weight = (torch.randn(vocab, hidden_size, device=s.device, dtype=s.dtype) * hidden_size**-0.5)
    weight.requires_grad_(backward)
    targets = torch.randint(0, vocab, (n,), device=s.device)
    grad_out = torch.randn(n, device=s.device)

    def runner(logprob_fn):
        if not backward:
            return lambda: logprob_fn(hidden, weight, targets)
        return lambda: torch.autograd.grad(logprob_fn(hidden, weight, targets), (hidden, weight), grad_out)

    ours_fn = lambda h, w, t: rk.fused_linear_logprobs(h, w, t, backend=s.backend)
    compiled_fn = bl.compiled(bl.eager_fused_linear_logprobs, s.compile_backend)
    baselines = {"eager": runner(bl.eager_fused_linear_logprobs), "compile": runner(compiled_fn)}
    liger = bl.optional_import("liger_kernel.transformers")
    cce = bl.optional_import("cut_cross_entropy")
    if not backward:
        baselines["liger"] = baselines["cce"] = "fused cross-entropy losses are compared in fwd+bwd"
    else:
        if isinstance(liger, str):
            baselines["liger"] = liger
        else:
            liger_loss = liger.LigerFusedLinearCrossEntropyLoss(reduction="sum")
            baselines["liger"] = lambda: torch.autograd.grad(liger_loss(weight, hidden, targets), (hidden, weight))
        if isinstance(cce, str):
            baselines["cce"] = cce
        else:
            baselines["cce"] = lambda: torch.autograd.grad(
                cce.linear_cross_entropy(hidden, weight, targets, reduction="sum"), (hidden, weight)
            )
        baselines["cublas_4mm"] = _four_matmuls(hidden, weight, s)

    flops = 2 * n * hidden_size * vocab * (3 if backward else 1)
    eager_logp = lambda: bl.eager_fused_linear_logprobs(hidden, weight, targets)
    diff = hz.check(lambda: hz.max_abs_diff(ours_fn(hidden, weight, targets), eager_logp()))
    grads = hz.tensor_bytes(hidden, weight) if backward else 0
    return hz.run_case(
        s, ceilings,
        name=linear_case_name(mode, n, hidden_size, vocab), op="fused_linear_logprobs", mode=mode,
        shape={"N": n, "H": hidden_size, "V": vocab}, ours=runner(ours_fn), baselines=baselines, flops=flops,
        inputs_grads_bytes=hz.tensor_bytes(hidden, weight, targets, grad_out) + grads,
        extra={"max_abs_diff_logprobs_vs_eager": diff,
               "flops_counted": "model flops: 1 matmul forward, 3 forward+backward (recomputation not counted)"},
    )


def _four_matmuls(hidden: torch.Tensor, weight: torch.Tensor, s: hz.Settings):
    """cuBLAS lower bound of a recomputing fused backward: logits twice, grad_hidden, grad_weight.

    Its ``[N, V]`` buffers are allocated at its first (warm-up) call, after every other entry of the case has been
    measured, so they never count in another entry's peak memory.
    """
    buffers: dict[str, torch.Tensor] = {}
    h, w = hidden.detach(), weight.detach()

    def four_matmuls():
        if not buffers:
            buffers["logits"] = torch.empty(h.shape[0], w.shape[0], device=s.device, dtype=s.dtype)
            buffers["grad_logits"] = torch.randn(h.shape[0], w.shape[0], device=s.device, dtype=s.dtype)
        torch.mm(h, w.T, out=buffers["logits"])
        torch.mm(h, w.T, out=buffers["logits"])
        return buffers["grad_logits"] @ w, buffers["grad_logits"].T @ h

    return four_matmuls


def targets(cases: list[dict], ceilings: dict, s: hz.Settings) -> list[dict]:
    shapes = SMOKE if s.smoke else FULL
    n = shapes["token_n"]
    out = []
    for vocab in shapes["token_vocabs"]:
        fwd = hz.find_case(cases, token_case_name("fwd", n, vocab))
        frac = fwd["work"].get("frac_copy_bw") if fwd else None
        out.append(hz.target(f"token_logprobs fwd V={vocab}: fraction of copy bandwidth", frac, 0.85,
                             higher_is_better=True, unit="x copy GB/s"))
    for vocab in shapes["token_vocabs"]:
        both = hz.find_case(cases, token_case_name("fwd+bwd", n, vocab))
        out.append(hz.target(f"token_logprobs fwd+bwd V={vocab}: speedup over eager",
                             hz.ratio(hz.baseline_ms(both, "eager"), hz.ours_ms(both)), 2.0,
                             higher_is_better=True, unit="x"))
    n, hidden_size, vocab = shapes["linear"]
    both = hz.find_case(cases, linear_case_name("fwd+bwd", n, hidden_size, vocab))
    out.append(hz.target("fused_linear_logprobs fwd+bwd: time / cuBLAS four-matmul time",
                         hz.ratio(hz.ours_ms(both), hz.baseline_ms(both, "cublas_4mm")), 1.5,
                         higher_is_better=False, unit="x"))
    peak = hz.peak_bytes(both)
    out.append(hz.target("fused_linear_logprobs fwd+bwd: peak memory / (inputs + grads)",
                         hz.ratio(peak, both["inputs_grads_bytes"] if both else None), 1.05,
                         higher_is_better=False, unit="x"))
    return out
