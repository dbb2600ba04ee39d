"""Float64 references for per-token log-probs and entropy (token_logprobs, fused_linear_logprobs)."""

from __future__ import annotations

import torch


def ref_soft_cap(logits, softcap=None):
    """float64 logit soft-capping ``softcap * tanh(logits / softcap)`` (None: the logits, in float64); -inf stays
    -inf, as the ops define it. Differentiable."""
    x = logits.double()
    if softcap is None:
        return x
    return torch.where(x == float("-inf"), x, softcap * torch.tanh(x / softcap))


def ref_token_logprobs(logits, targets, *, temperature=1.0, ignore_index=-100, softcap=None):
    """float64 (logprobs, entropy), shapes = targets.shape; 0 at ignored positions. Differentiable in logits.
    ``softcap``: the logits are soft-capped before the temperature (as Hugging Face's Gemma-2/3)."""
    z = ref_soft_cap(logits, softcap) / temperature
    logp_all = torch.log_softmax(z, dim=-1)
    valid = targets != ignore_index
    safe = torch.where(valid, targets, torch.zeros_like(targets)).long()
    logp = logp_all.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    zero = torch.zeros((), dtype=torch.float64, device=logits.device)
    return torch.where(valid, logp, zero), torch.where(valid, entropy, zero)


def ref_fused_linear_logprobs(hidden, weight, targets, *, bias=None, temperature=1.0, ignore_index=-100,
                              softcap=None):
    """float64 reference that materializes logits = hidden @ weight.T + bias. Differentiable in all inputs."""
    logits = hidden.double() @ weight.double().T
    if bias is not None:
        logits = logits + bias.double()
    return ref_token_logprobs(logits, targets, temperature=temperature, ignore_index=ignore_index, softcap=softcap)
