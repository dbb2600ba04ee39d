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

import dataclasses
import functools

import torch

import remax_kernels as rk
from benchmarks import baselines as bl
from benchmarks import harness as hz
from remax_kernels import _cuda

FAMILY = "logprobs"
SHAPES = {
    "full": {"token_n": 8192, "token_vocabs": (32000, 128256, 151936), "linear": (8192, 4096, 128256)},
    "smoke": {"token_n": 16, "token_vocabs": (300,), "linear": (16, 32, 300)},
}
# Gemma-2/3's final_logit_softcapping: one fused lm-head case (fwd+bwd) with the cap on, against the same op without
# it (its cost must stay in the row passes: within a few percent of the uncapped case).
SOFTCAP = 30.0
MODES = ("fwd", "fwd+bwd")


@dataclasses.dataclass
class TokenInputs:
    logits: torch.Tensor  # [N, V], requires grad in fwd+bwd
    targets: torch.Tensor  # [N]
    grad_out: torch.Tensor  # [N] float32 upstream gradient (per-token weights, as advantages are)
    backward: bool

    def runner(self, logprob_fn):
        """One call of ``logprob_fn(logits, targets)``, with the gradient of the logits in fwd+bwd."""
        if not self.backward:
            return lambda: logprob_fn(self.logits, self.targets)
        return lambda: torch.autograd.grad(logprob_fn(self.logits, self.targets), self.logits, self.grad_out)


@dataclasses.dataclass
class LinearInputs:
    hidden: torch.Tensor  # [N, H]
    weight: torch.Tensor  # [V, H]
    targets: torch.Tensor  # [N]
    grad_out: torch.Tensor  # [N] float32
    backward: bool
    softcap: float | None = None  # the soft-capping case

    def runner(self, logprob_fn):
        """One call of ``logprob_fn(hidden, weight, targets)``, with both gradients in fwd+bwd."""
        args = (self.hidden, self.weight, self.targets)
        if not self.backward:
            return lambda: logprob_fn(*args)
        return lambda: torch.autograd.grad(logprob_fn(*args), (self.hidden, self.weight), self.grad_out)


def _token_inplace(s: hz.Settings, x: TokenInputs):
    if not x.backward:
        return "an option of the backward: measured in fwd+bwd"
    return x.runner(lambda logits, targets: rk.token_logprobs(logits, targets, inplace_backward=True,
                                                               backend=s.backend))


def _token_liger(s: hz.Settings, x: TokenInputs):
    liger = bl.optional_import("liger_kernel.transformers")
    if isinstance(liger, str):
        return liger
    if not x.backward:
        return "Liger's cross-entropy computes the gradient inside its forward: compared in fwd+bwd"
    loss = liger.LigerCrossEntropyLoss(reduction="sum")
    return lambda: torch.autograd.grad(loss(x.logits, x.targets), x.logits)


def _token_cuda_rows(s: hz.Settings, x: TokenInputs):
    """The CUDA row kernel of csrc/ alone (remax_kernels._cuda launchers, no autograd): forward, or forward then
    backward into a new gradient buffer."""
    if reason := hz.cuda_extension_only(s):
        return reason
    logits = x.logits.detach()
    if not x.backward:
        return lambda: _cuda.row_logprobs_forward(logits, x.targets, 1.0, -100, False)

    def forward_backward():
        _, row_max, log_norm, _ = _cuda.row_logprobs_forward(logits, x.targets, 1.0, -100, False)
        return _cuda.row_logprobs_backward(logits, x.targets, row_max, log_norm, None, x.grad_out, None, 1.0, -100,
                                           torch.empty_like(logits))

    return forward_backward


# The columns of the token_logprobs cases, "ours" first, in measuring order (see hz.ProviderFactory). The last two
# write the gradient into the logits' storage, so they run after every entry that needs the original values (the
# values do not change the work done).
TOKEN_PROVIDERS: dict[str, hz.ProviderFactory] = {
    "ours": lambda s, x: x.runner(lambda logits, targets: rk.token_logprobs(logits, targets, backend=s.backend)),
    "eager": lambda s, x: x.runner(bl.eager_token_logprobs),
    "compile": lambda s, x: x.runner(bl.compiled(bl.eager_token_logprobs, s.compile_backend)),
    "cuda_row_kernel": _token_cuda_rows,
    "ours_inplace_backward": _token_inplace,
    "liger": _token_liger,
}


def _fwd_bwd_only(peer):
    """A fused cross-entropy peer (gradients in its forward): compared in fwd+bwd only."""
    def factory(s: hz.Settings, x: LinearInputs):
        if not x.backward:
            return "fused cross-entropy losses are compared in fwd+bwd"
        return peer(x.hidden, x.weight, x.targets, (x.hidden, x.weight))

    return factory


def _four_matmuls(s: hz.Settings, x: LinearInputs):
    """cuBLAS lower bound of a recomputing fused backward: logits twice, grad_hidden, grad_weight."""
    if not x.backward:
        return "the four-matmul bound is for fwd+bwd"
    return bl.lm_head_gemms(x.hidden, x.weight, logits_gemms=2)


# The columns of the fused_linear_logprobs cases, "ours" first, in measuring order (see hz.ProviderFactory).
LINEAR_PROVIDERS: dict[str, hz.ProviderFactory] = {
    "ours": lambda s, x: x.runner(lambda h, w, t: rk.fused_linear_logprobs(h, w, t, softcap=x.softcap,
                                                                            backend=s.backend)),
    "ours_no_softcap": lambda s, x: (x.runner(lambda h, w, t: rk.fused_linear_logprobs(h, w, t, backend=s.backend))
                                     if x.softcap else "the reference column of the softcap case"),
    "eager": lambda s, x: x.runner(bl.eager_fused_linear_logprobs),
    "compile": lambda s, x: x.runner(bl.compiled(bl.eager_fused_linear_logprobs, s.compile_backend)),
    "liger": _fwd_bwd_only(bl.liger_fused_linear_ce),
    "cut_cross_entropy": _fwd_bwd_only(bl.cut_cross_entropy),
    "cublas_4mm": _four_matmuls,
}


def token_case_name(mode: str, n: int, vocab: int) -> str:
    return f"token_logprobs {mode} N={n} V={vocab}"


def linear_case_name(mode: str, n: int, hidden: int, vocab: int, softcap: float | None = None) -> str:
    return f"fused_linear_logprobs {mode} N={n} H={hidden} V={vocab}" + (f" softcap={softcap:g}" if softcap else "")


def specs(size: str) -> list[hz.CaseSpec]:
    shapes = SHAPES[size]
    n = shapes["token_n"]
    out = [
        hz.CaseSpec(family=FAMILY, size=size, name=token_case_name(mode, n, vocab), op="token_logprobs", mode=mode,
                    shape={"N": n, "V": vocab}, providers=tuple(TOKEN_PROVIDERS),
                    build=functools.partial(_build_token, mode=mode, n=n, vocab=vocab))
        for vocab in shapes["token_vocabs"]
        for mode in MODES
    ]
    n, hidden_size, vocab = shapes["linear"]
    out += [
        hz.CaseSpec(family=FAMILY, size=size, name=linear_case_name(mode, n, hidden_size, vocab),
                    op="fused_linear_logprobs", mode=mode, shape={"N": n, "H": hidden_size, "V": vocab},
                    providers=_linear_providers(None),
                    build=functools.partial(_build_linear, mode=mode, n=n, hidden_size=hidden_size, vocab=vocab))
        for mode in MODES
    ]
    out.append(hz.CaseSpec(
        family=FAMILY, size=size, name=linear_case_name("fwd+bwd", n, hidden_size, vocab, SOFTCAP),
        op="fused_linear_logprobs", mode="fwd+bwd", shape={"N": n, "H": hidden_size, "V": vocab, "softcap": SOFTCAP},
        providers=_linear_providers(SOFTCAP),
        build=functools.partial(_build_linear, mode="fwd+bwd", n=n, hidden_size=hidden_size, vocab=vocab,
                                softcap=SOFTCAP)))
    return out


def _build_token(s: hz.Settings, *, mode: str, n: int, vocab: int) -> hz.Case:
    backward = mode == "fwd+bwd"
    # Scale 2 keeps the softmax away from uniform; the kernels' work does not depend on the values.
    logits = (2.0 * torch.randn(n, vocab, device=s.device, dtype=s.dtype)).requires_grad_(backward)
    x = TokenInputs(logits, torch.randint(0, vocab, (n,), device=s.device), torch.randn(n, device=s.device), backward)
    row_bytes = vocab * logits.element_size()
    # Minimum traffic: forward reads the logits once; backward reads them again and writes the gradient.
    bytes_moved = n * row_bytes * (3 if backward else 1) + n * (x.targets.element_size() + 4 * (2 if backward else 1))
    ours = lambda: rk.token_logprobs(logits, x.targets, backend=s.backend)
    diff = hz.check(lambda: hz.max_abs_diff(ours(), bl.eager_token_logprobs(logits, x.targets)))
    grads = hz.tensor_bytes(logits) if backward else 0
    return hz.Case(
        calls=hz.provider_calls(TOKEN_PROVIDERS, s, x), bytes_moved=bytes_moved,
        inputs_grads_bytes=hz.tensor_bytes(logits, x.targets, x.grad_out) + grads,
        extra={"max_abs_diff_logprobs_vs_eager": diff},
    )


def _linear_providers(softcap: float | None) -> tuple[str, ...]:
    """The softcap case is timed against the same op without the cap (the peers have no cap); the others skip that
    column."""
    if softcap:
        return ("ours", "ours_no_softcap")
    return tuple(p for p in LINEAR_PROVIDERS if p != "ours_no_softcap")


def _build_linear(s: hz.Settings, *, mode: str, n: int, hidden_size: int, vocab: int,
                  softcap: float | None = None) -> hz.Case:
    backward = mode == "fwd+bwd"
    hidden = torch.randn(n, hidden_size, device=s.device, dtype=s.dtype).requires_grad_(backward)
    # std H^-1/2 makes logits ~ N(0, 1) like a trained lm-head on normalized hidden states.
    weight = (torch.randn(vocab, hidden_size, device=s.device, dtype=s.dtype) * hidden_size**-0.5)
    weight.requires_grad_(backward)
    x = LinearInputs(hidden, weight, torch.randint(0, vocab, (n,), device=s.device), torch.randn(n, device=s.device),
                     backward, softcap)
    ours = lambda: rk.fused_linear_logprobs(hidden, weight, x.targets, softcap=softcap, backend=s.backend)
    # The eager reference with the cap: torch's tanh on the materialized logits (what Gemma's forward computes).
    eager_capped = lambda: torch.log_softmax(
        softcap * torch.tanh((hidden @ weight.T).float() / softcap), -1).gather(-1, x.targets[:, None])[:, 0]
    reference = eager_capped if softcap else lambda: bl.eager_fused_linear_logprobs(hidden, weight, x.targets)
    diff = hz.check(lambda: hz.max_abs_diff(ours(), reference()))
    grads = hz.tensor_bytes(hidden, weight) if backward else 0
    return hz.Case(
        calls=hz.provider_calls({p: LINEAR_PROVIDERS[p] for p in _linear_providers(softcap)}, s, x),
        flops=2 * n * hidden_size * vocab * (3 if backward else 1),
        inputs_grads_bytes=hz.tensor_bytes(hidden, weight, x.targets, x.grad_out) + grads,
        extra={"max_abs_diff_logprobs_vs_eager": diff,
               "flops_counted": "model flops: 1 matmul forward, 3 forward+backward (recomputation not counted)"},
    )


def targets(cases: list[dict], size: str) -> list[dict]:
    shapes = SHAPES[size]
    n = shapes["token_n"]
    out = []
    for vocab in shapes["token_vocabs"]:
        fwd = hz.find_case(cases, token_case_name("fwd", n, vocab))
        frac = fwd["work"].get("frac_copy_bw") if fwd else None
        out.append(hz.target(f"token_logprobs fwd V={vocab}: fraction of copy bandwidth", frac, 0.85,
                             higher_is_better=True, unit="x copy GB/s"))
        # Issue 11: the CUDA row kernel's forward >= 90% of copy bandwidth (same bytes, its own time).
        cuda_frac = None if frac is None else hz.ratio(frac * hz.ours_ms(fwd), hz.baseline_ms(fwd, "cuda_row_kernel"))
        out.append(hz.target(f"token_logprobs fwd (cuda row kernel) V={vocab}: fraction of copy bandwidth",
                             cuda_frac, 0.90, higher_is_better=True, unit="x copy GB/s"))
    for vocab in shapes["token_vocabs"]:
        both = hz.find_case(cases, token_case_name("fwd+bwd", n, vocab))
        out.append(hz.target(f"token_logprobs fwd+bwd V={vocab}: speedup over eager",
                             hz.ratio(hz.baseline_ms(both, "eager"), hz.ours_ms(both)), 2.0,
                             higher_is_better=True, unit="x"))
    n, hidden_size, vocab = shapes["linear"]
    both = hz.find_case(cases, linear_case_name("fwd+bwd", n, hidden_size, vocab))
    # Issue 8: the GEMM pipeline at 1.15x of its four GEMMs (logits recomputed in the backward).
    out.append(hz.target("fused_linear_logprobs fwd+bwd: time / cuBLAS four-matmul time",
                         hz.ratio(hz.ours_ms(both), hz.baseline_ms(both, "cublas_4mm")), 1.15,
                         higher_is_better=False, unit="x"))
    peak = hz.peak_bytes(both)
    out.append(hz.target("fused_linear_logprobs fwd+bwd: peak memory / (inputs + grads)",
                         hz.ratio(peak, both["inputs_grads_bytes"] if both else None), 1.05,
                         higher_is_better=False, unit="x"))
    return out
