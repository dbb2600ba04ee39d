"""The baselines every benchmark compares against, written once.

Each is the plain eager torch composition an RLHF trainer uses today (materialized logits upcast to fp32,
``log_softmax`` + ``gather``; ``softmax`` + sort-based top-p + ``multinomial``; two ``model.generate`` calls).
The second baseline is ``torch.compile`` of the same function (:func:`compiled`). The cuBLAS GEMMs of an lm-head op
are its floor (:func:`lm_head_gemms`). Liger-Kernel and cut-cross-entropy are measured when importable
(:func:`optional_import`), and skipped with a reason otherwise.

These are NOT the test references (those are float64 and live in ``tests/helpers``): they are the fast paths users
would otherwise run, in the precision they would run them.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch


def eager_token_logprobs(logits: torch.Tensor, targets: torch.Tensor, *, temperature: float = 1.0) -> torch.Tensor:
    """``log_softmax(logits.float() / temperature).gather(targets)``: ``[N, V]`` any float -> ``[N]`` float32.

    The fp32 upcast is what verl / TRL / OpenRLHF do (bf16 log-softmax loses too much precision for RL); it
    materializes two ``[N, V]`` fp32 tensors in the forward and keeps one for the backward.
    """
    z = logits.float()
    if temperature != 1.0:
        z = z / temperature
    return torch.log_softmax(z, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def eager_fused_linear_logprobs(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *, temperature: float = 1.0
) -> torch.Tensor:
    """Log-probs from hidden states through materialized logits: ``[N, H] x [V, H] -> [N]`` float32."""
    return eager_token_logprobs(hidden @ weight.T, targets, temperature=temperature)


def eager_remax_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    temperature: float = 1.0,
) -> torch.Tensor:
    """The paper's ReMax loss with materialized logits: ``sum(-A_b * logp * m) / sum(m)``.

    hidden ``[B, T, H]``, weight ``[V, H]``, targets ``[B, T]``, advantages ``[B]``, response_mask ``[B, T]`` bool;
    returns a float32 scalar. ``fused_linear_policy_loss`` with its defaults computes the same loss.
    """
    batch, seq_len, hidden_size = hidden.shape
    safe_targets = torch.where(response_mask, targets, torch.zeros_like(targets))
    logp = eager_fused_linear_logprobs(
        hidden.reshape(-1, hidden_size), weight, safe_targets.reshape(-1), temperature=temperature
    ).view(batch, seq_len)
    mask = response_mask.float()
    return -(advantages.float()[:, None] * logp * mask).sum() / mask.sum().clamp(min=1.0)


def eager_sample_and_greedy(
    logits: torch.Tensor, greedy_mask: torch.Tensor, *, temperature: float = 1.0, top_p: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoding step the usual way: ``[B, V]`` logits -> (tokens ``[B]`` int64, log-probs ``[B]`` float32).

    Sampled rows: softmax of ``logits / temperature``, top-p by sorting the whole row (vLLM's and HF's default
    path), ``torch.multinomial``; greedy rows (``greedy_mask``): ``argmax``. The log-probs are those of the
    processed (tempered, truncated) distribution at the returned token.
    """
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p: drop a token when the mass before it already does.
        drop = sorted_probs.cumsum(dim=-1) - sorted_probs > top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    sampled = torch.multinomial(probs, 1).squeeze(-1)
    tokens = torch.where(greedy_mask, logits.argmax(dim=-1), sampled)
    return tokens, probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1).log()


def hf_generate_twice(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    pad_token_id: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """ReMax's rollout with Hugging Face: one sampled and one greedy ``model.generate`` call on the same prompts.

    Both generate exactly ``max_new_tokens`` tokens (``min_new_tokens`` equal to it, no end-of-sequence stop), so the
    work matches ``generate_pairs`` with ``eos_token_id=None``. Returns (sampled, greedy) ``[B, P + max_new_tokens]``.
    """
    common = dict(
        input_ids=input_ids,
        attention_mask=attention_mask,
        max_new_tokens=max_new_tokens,
        min_new_tokens=max_new_tokens,
        pad_token_id=pad_token_id,
        eos_token_id=None,
    )
    sampled = model.generate(**common, do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
    greedy = model.generate(**common, do_sample=False)
    return sampled, greedy


def lm_head_gemms(hidden: torch.Tensor, weight: torch.Tensor, *, logits_gemms: int) -> Callable[[], tuple]:
    """The cuBLAS floor of an lm-head op with gradients, as a zero-argument call: ``logits_gemms`` GEMMs of the
    ``[N, V]`` logits (1, or 2 when a backward recomputes them), then grad_hidden and grad_weight from a random
    ``[N, V]`` gradient; hidden ``[N, H]``, weight ``[V, H]``, in the weight's dtype.

    The ``[N, V]`` buffers are allocated at the first (warm-up) call, after every other entry of the case has been
    measured, so they never count in another entry's peak memory.
    """
    h, w = hidden.detach(), weight.detach()
    buffers: dict[str, torch.Tensor] = {}

    def gemms():
        if not buffers:
            buffers["logits"] = torch.empty(h.shape[0], w.shape[0], device=w.device, dtype=w.dtype)
            buffers["grad_logits"] = torch.randn(h.shape[0], w.shape[0], device=w.device, dtype=w.dtype)
        for _ in range(logits_gemms):
            torch.mm(h, w.T, out=buffers["logits"])
        return buffers["grad_logits"] @ w, buffers["grad_logits"].T @ h

    return gemms


def liger_fused_linear_ce(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          wrt: tuple[torch.Tensor, ...]) -> Callable[[], tuple] | str:
    """Liger-Kernel's fused linear cross-entropy (chunked, gradients in its forward) on hidden ``[N, H]``, weight
    ``[V, H]`` and targets ``[N]`` (-100 ignored), summed, with the gradients of ``wrt``; the skip reason when Liger
    is not importable."""
    liger = optional_import("liger_kernel.transformers")
    if isinstance(liger, str):
        return liger
    loss = liger.LigerFusedLinearCrossEntropyLoss(reduction="sum", ignore_index=-100)
    return lambda: torch.autograd.grad(loss(weight, hidden, targets), wrt)


def cut_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                      wrt: tuple[torch.Tensor, ...]) -> Callable[[], tuple] | str:
    """Apple's cut-cross-entropy (tiles with ``tl.dot``, gradient filtering) on the same inputs as
    :func:`liger_fused_linear_ce`; the skip reason when it is not importable."""
    cce = optional_import("cut_cross_entropy")
    if isinstance(cce, str):
        return cce
    return lambda: torch.autograd.grad(cce.linear_cross_entropy(hidden, weight, targets, reduction="sum"), wrt)


def compiled(fn: Callable, backend: str) -> Callable:
    """``torch.compile`` of a baseline (static shapes: each benchmark shape is compiled once, in the warm-up).

    The dynamo caches are reset first so that many shapes of one function never hit the recompile limit.
    """
    torch._dynamo.reset()
    return torch.compile(fn, backend=backend, dynamic=False)


def optional_import(module: str) -> object | str:
    """The module, or a string saying why it is unavailable (stored as the baseline's skip reason)."""
    try:
        return importlib.import_module(module)
    except Exception as exc:
        return f"{module} not importable ({type(exc).__name__}: {exc})".splitlines()[0]
