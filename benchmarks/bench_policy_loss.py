"""Policy-loss benchmark: ``fused_linear_policy_loss`` forward+backward from hidden states.

The paper's ReMax loss (REINFORCE with per-sequence advantages, token mean over the response) at H=4096, V=128256,
N = B*T in {4096, 8192, 16384} tokens (T=1024), bf16, against the eager loss with materialized fp32 logits and its
``torch.compile``. Each response mask keeps a random 50-100% prefix of its row, as padded responses do. Peak memory
is measured for all three.

The same case also times ``fused_linear_logprobs`` forward+backward on the same inputs (targets outside the response
set to ``ignore_index``, as the loss does internally): the loss should add almost nothing on top of it.
"""

from __future__ import annotations

import dataclasses
import functools

import torch

import remax_kernels as rk
from benchmarks import baselines as bl
from benchmarks import harness as hz

FAMILY = "policy_loss"
SHAPES = {
    "full": {"H": 4096, "V": 128256, "T": 1024, "N": (4096, 8192, 16384)},
    "smoke": {"H": 32, "V": 300, "T": 8, "N": (16,)},
}
# The loss-vs-log-probs time target is checked at this N (the middle of the range); memory at every N.
TIME_TARGET_N = {"full": 8192, "smoke": 16}


@dataclasses.dataclass
class Inputs:
    hidden: torch.Tensor  # [B, T, H], requires grad
    weight: torch.Tensor  # [V, H], requires grad
    targets: torch.Tensor  # [B, T]
    advantages: torch.Tensor  # [B] float32
    response_mask: torch.Tensor  # [B, T] bool, a random 50-100% prefix of each row

    def loss_runner(self, loss_fn):
        """One call of ``loss_fn(hidden, weight, targets, advantages, response_mask)`` and its two gradients."""
        args = (self.hidden, self.weight, self.targets, self.advantages, self.response_mask)
        return lambda: torch.autograd.grad(loss_fn(*args), (self.hidden, self.weight))


def _ours_loss(s: hz.Settings):
    return lambda *args: rk.fused_linear_policy_loss(*args, backend=s.backend)[0]


def _logprobs_only(s: hz.Settings, x: Inputs):
    """Our fused_linear_logprobs fwd+bwd on the same inputs (targets outside the response ignored, as the loss does
    internally, and a random per-token upstream gradient): what the loss costs at least."""
    kernel_targets = x.targets.masked_fill(~x.response_mask, -100).reshape(-1)
    flat_hidden = x.hidden.view(-1, x.hidden.shape[-1])
    grad_logp = torch.randn(kernel_targets.numel(), device=s.device)

    def logprobs_only():
        logp = rk.fused_linear_logprobs(flat_hidden, x.weight, kernel_targets, backend=s.backend)
        return torch.autograd.grad(logp, (x.hidden, x.weight), grad_logp)

    return logprobs_only


def _flat_ce_peer(peer):
    """A fused cross-entropy peer (Liger, cut-cross-entropy: the same GEMM work as our loss) on the flattened rows,
    the non-response tokens ignored (-100), as ours skips them."""
    def factory(s: hz.Settings, x: Inputs):
        targets = x.targets.masked_fill(~x.response_mask, -100).reshape(-1)
        return peer(x.hidden.view(-1, x.hidden.shape[-1]), x.weight, targets, (x.hidden, x.weight))

    return factory


def _three_matmuls(s: hz.Settings, x: Inputs):
    """The floor: the three ``N*H*V`` cuBLAS GEMMs any loss with gradients needs (logits, grad_hidden, grad_weight),
    over ALL rows."""
    return hz.cuda_only(s) or bl.lm_head_gemms(x.hidden.view(-1, x.hidden.shape[-1]), x.weight, logits_gemms=1)


# The columns of every case, "ours" first, in measuring order (see hz.ProviderFactory).
PROVIDERS: dict[str, hz.ProviderFactory] = {
    "ours": lambda s, x: x.loss_runner(_ours_loss(s)),
    "eager": lambda s, x: x.loss_runner(bl.eager_remax_loss),
    "compile": lambda s, x: x.loss_runner(bl.compiled(bl.eager_remax_loss, s.compile_backend)),
    "fused_linear_logprobs": _logprobs_only,
    "liger": _flat_ce_peer(bl.liger_fused_linear_ce),
    "cut_cross_entropy": _flat_ce_peer(bl.cut_cross_entropy),
    "cublas_3mm": _three_matmuls,
}


def case_name(n: int, hidden: int, vocab: int) -> str:
    return f"fused_linear_policy_loss fwd+bwd N={n} H={hidden} V={vocab}"


def specs(size: str) -> list[hz.CaseSpec]:
    shapes = SHAPES[size]
    hidden_size, vocab, seq_len = shapes["H"], shapes["V"], shapes["T"]
    return [
        hz.CaseSpec(family=FAMILY, size=size, name=case_name(n, hidden_size, vocab), op="fused_linear_policy_loss",
                    mode="fwd+bwd", shape={"N": n, "B": n // seq_len, "T": seq_len, "H": hidden_size, "V": vocab},
                    providers=tuple(PROVIDERS),
                    build=functools.partial(_build, n=n, seq_len=seq_len, hidden_size=hidden_size, vocab=vocab))
        for n in shapes["N"]
    ]


def _build(s: hz.Settings, *, n: int, seq_len: int, hidden_size: int, vocab: int) -> hz.Case:
    batch = n // seq_len
    hidden = torch.randn(batch, seq_len, hidden_size, device=s.device, dtype=s.dtype).requires_grad_(True)
    weight = torch.randn(vocab, hidden_size, device=s.device, dtype=s.dtype) * hidden_size**-0.5
    weight.requires_grad_(True)
    lengths = torch.randint(seq_len // 2, seq_len + 1, (batch, 1), device=s.device)
    x = Inputs(hidden, weight, torch.randint(0, vocab, (batch, seq_len), device=s.device),
               torch.randn(batch, device=s.device), torch.arange(seq_len, device=s.device) < lengths)
    args = (hidden, weight, x.targets, x.advantages, x.response_mask)

    def loss_diff():
        return abs(float(_ours_loss(s)(*args)) - float(bl.eager_remax_loss(*args)))

    return hz.Case(
        calls=hz.provider_calls(PROVIDERS, s, x), flops=6 * n * hidden_size * vocab,
        shape={"response_tokens": int(lengths.sum())},
        inputs_grads_bytes=hz.tensor_bytes(*args, hidden, weight),
        extra={"abs_diff_loss_vs_eager": hz.check(loss_diff),
               "flops_counted": "model flops: 3 matmuls of N*H*V (recomputation not counted)"},
    )


def targets(cases: list[dict], size: str) -> list[dict]:
    shapes = SHAPES[size]
    out = []
    for n in shapes["N"]:
        case = hz.find_case(cases, case_name(n, shapes["H"], shapes["V"]))
        out.append(hz.target(f"fused_linear_policy_loss N={n}: eager peak memory / ours",
                             hz.ratio(hz.peak_bytes(case, "eager"), hz.peak_bytes(case)), 3.0,
                             higher_is_better=True, unit="x"))
    n = TIME_TARGET_N[size]
    case = hz.find_case(cases, case_name(n, shapes["H"], shapes["V"]))
    # Gradients in the forward: 3 GEMM-equivalents against fused_linear_logprobs' 4.
    out.append(hz.target(f"fused_linear_policy_loss N={n}: time / fused_linear_logprobs fwd+bwd time",
                         hz.ratio(hz.ours_ms(case), hz.baseline_ms(case, "fused_linear_logprobs")), 0.85,
                         higher_is_better=False, unit="x"))
    # Issue 8: within 1.15x of the three cuBLAS GEMMs, faster than Liger and cut-cross-entropy, peak memory <= theirs.
    out.append(hz.target(f"fused_linear_policy_loss N={n}: time / three cuBLAS GEMMs of N*H*V",
                         hz.ratio(hz.ours_ms(case), hz.baseline_ms(case, "cublas_3mm")), 1.15,
                         higher_is_better=False, unit="x"))
    for peer in ("liger", "cut_cross_entropy"):
        out.append(hz.target(f"fused_linear_policy_loss N={n}: speedup over {peer}",
                             hz.ratio(hz.baseline_ms(case, peer), hz.ours_ms(case)), 1.0,
                             higher_is_better=True, unit="x"))
        out.append(hz.target(f"fused_linear_policy_loss N={n}: {peer} peak memory / ours",
                             hz.ratio(hz.peak_bytes(case, peer), hz.peak_bytes(case)), 1.0,
                             higher_is_better=True, unit="x"))
    return out
