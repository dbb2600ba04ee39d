"""Policy-loss benchmark: ``fused_linear_policy_loss`` forward+backward from hidden states.

The paper's ReMax loss (REINFORCE with per-sequence advantages, token mean over the response) at H=4096, V=128256,
N = B*T in {4096, 8192, 16384} tokens (T=1024), bf16, against the eager loss with materialized fp32 logits and its
``torch.compile``. Each response mask keeps a random 50-100% prefix of its row, as padded responses do. Peak memory
is measured for all three.

The same case also times ``fused_linear_logprobs`` forward+backward on the same inputs (targets outside the response
set to ``ignore_index``, as the loss does internally): the loss should add almost nothing on top of it.
"""

from __future__ import annotations

import torch

import remax_kernels as rk
from benchmarks import baselines as bl
from benchmarks import harness as hz

FULL = {"H": 4096, "V": 128256, "T": 1024, "N": (4096, 8192, 16384)}
SMOKE = {"H": 32, "V": 300, "T": 8, "N": (16,)}
# The loss-vs-log-probs time target is checked at this N (the middle of the range); memory at every N.
TIME_TARGET_N = {"full": 8192, "smoke": 16}


def case_name(n: int, hidden: int, vocab: int) -> str:
    return f"fused_linear_policy_loss fwd+bwd N={n} H={hidden} V={vocab}"


def run(s: hz.Settings, ceilings: dict) -> list[dict]:
    shapes = SMOKE if s.smoke else FULL
    return [_case(s, ceilings, n, shapes["T"], shapes["H"], shapes["V"]) for n in shapes["N"]]


def _case(s: hz.Settings, ceilings: dict, n: int, seq_len: int, hidden_size: int, vocab: int) -> dict:
    batch = n // seq_len
    hidden = torch.randn(batch, seq_len, hidden_size, device=s.device, dtype=s.dtype).requires_grad_(True)
    weight = torch.randn(vocab, hidden_size, device=s.device, dtype=s.dtype) * hidden_size**-0.5
    weight.requires_grad_(True)
    targets = torch.randint(0, vocab, (batch, seq_len), device=s.device)
    lengths = torch.randint(seq_len // 2, seq_len + 1, (batch, 1), device=s.device)
    response_mask = torch.arange(seq_len, device=s.device) < lengths
    advantages = torch.randn(batch, device=s.device)
    params = (hidden, weight)

    def ours():
        loss, _ = rk.fused_linear_policy_loss(hidden, weight, targets, advantages, response_mask, backend=s.backend)
        return torch.autograd.grad(loss, params)

    def loss_runner(loss_fn):
        return lambda: torch.autograd.grad(loss_fn(hidden, weight, targets, advantages, response_mask), params)

    kernel_targets = targets.masked_fill(~response_mask, -100).reshape(-1)
    flat_hidden = hidden.view(-1, hidden_size)
    grad_logp = torch.randn(n, device=s.device)

    def logprobs_only():
        logp = rk.fused_linear_logprobs(flat_hidden, weight, kernel_targets, backend=s.backend)
        return torch.autograd.grad(logp, params, grad_logp)

    baselines = {
        "eager": loss_runner(bl.eager_remax_loss),
        "compile": loss_runner(bl.compiled(bl.eager_remax_loss, s.compile_backend)),
        "fused_linear_logprobs": logprobs_only,
    }

    def loss_diff():
        loss, _ = rk.fused_linear_policy_loss(hidden, weight, targets, advantages, response_mask, backend=s.backend)
        return abs(float(loss) - float(bl.eager_remax_loss(hidden, weight, targets, advantages, response_mask)))

    return hz.run_case(
        s, ceilings,
        name=case_name(n, hidden_size, vocab), op="fused_linear_policy_loss", mode="fwd+bwd",
        shape={"N": n, "B": batch, "T": seq_len, "H": hidden_size, "V": vocab, "response_tokens": int(lengths.sum())},
        ours=ours, baselines=baselines, flops=6 * n * hidden_size * vocab,
        inputs_grads_bytes=hz.tensor_bytes(hidden, weight, targets, response_mask, advantages, hidden, weight),
        extra={"abs_diff_loss_vs_eager": hz.check(loss_diff),
               "flops_counted": "model flops: 3 matmuls of N*H*V (recomputation not counted)"},
    )


def targets(cases: list[dict], ceilings: dict, s: hz.Settings) -> list[dict]:
    shapes = SMOKE if s.smoke else FULL
    out = []
    for n in shapes["N"]:
        case = hz.find_case(cases, case_name(n, shapes["H"], shapes["V"]))
        out.append(hz.target(f"fused_linear_policy_loss N={n}: eager peak memory / ours",
                             hz.ratio(hz.peak_bytes(case, "eager"), hz.peak_bytes(case)), 3.0,
                             higher_is_better=True, unit="x"))
    n = TIME_TARGET_N["smoke" if s.smoke else "full"]
    case = hz.find_case(cases, case_name(n, shapes["H"], shapes["V"]))
    out.append(hz.target(f"fused_linear_policy_loss N={n}: time / fused_linear_logprobs fwd+bwd time",
                         hz.ratio(hz.ours_ms(case), hz.baseline_ms(case, "fused_linear_logprobs")), 1.1,
                         higher_is_better=False, unit="x"))
    return out
