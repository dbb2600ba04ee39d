"""Per-chunk fp32 math shared by the torch (CPU) paths of the log-prob and loss ops.

The torch paths process a few rows at a time, so only a ``[chunk, V]`` fp32 temporary ever exists; these two
functions are the math on one chunk. The Triton kernels implement the same formulas blockwise.

With soft-capping on (cap > 0) the logits x are first replaced by y = cap * tanh(x / cap) (``soft_cap``), and every
formula below holds with y for the logits; the gradient w.r.t. x is then that w.r.t. y times 1 - tanh(x / cap)^2.

With z = logits / T, lse = logsumexp(z), p = softmax(z):
  logp      = z[target] - lse
  entropy H = lse - sum_v p_v z_v
  d logp / d logits_v = (1[v == target] - p_v) / T
  d H    / d logits_v = -p_v (z_v - lse + H) / T
"""

from __future__ import annotations

import torch


def soft_cap(x: torch.Tensor, cap: float) -> torch.Tensor:
    """``cap * tanh(x / cap)`` in fp32 (``cap > 0``; ``cap == 0`` returns ``x``). ``-inf`` stays ``-inf`` (a masked
    token stays masked), NaN stays NaN, ``+inf`` gives ``cap``."""
    if not cap:
        return x
    return torch.where(x == float("-inf"), x, torch.tanh(x / cap) * cap)


def soft_cap_grad(x: torch.Tensor, cap: float) -> torch.Tensor:
    """d soft_cap(x) / dx = 1 - tanh(x / cap)^2 (fp32)."""
    t = torch.tanh(x / cap)
    return 1.0 - t * t


def logprobs_entropy_chunk(
    logits: torch.Tensor, targets: torch.Tensor, temperature: float | torch.Tensor, ignore_index: int,
    need_entropy: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """logits ``[n, V]`` (any float dtype), targets ``[n]`` -> fp32 ``(logp [n], entropy [n] or None, lse [n])``.

    ``temperature``: a float, or per-row fp32 ``[n, 1]``. Ignored rows get logp = 0 and entropy = 0; a row with
    NaN/inf logits gets NaN (unless ignored).
    """
    z = logits.float()
    if isinstance(temperature, torch.Tensor) or temperature != 1.0:
        z = z / temperature
    # Work relative to the row max: lse - sum(p * z) cancels catastrophically when |z| ~ 1e3 (3 digits lost in
    # fp32), while d = z - max is exact for the entries that carry the probability mass.
    row_max = z.amax(dim=-1, keepdim=True)
    shift = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))  # all -inf/NaN rows stay NaN
    d = z - shift
    lse_d = torch.logsumexp(d, dim=-1)
    valid = targets != ignore_index
    safe = targets.masked_fill(~valid, 0).long()
    logp = (d.gather(-1, safe.unsqueeze(-1)).squeeze(-1) - lse_d).masked_fill(~valid, 0.0)
    entropy = None
    if need_entropy:
        p = torch.exp(d - lse_d.unsqueeze(-1))
        entropy = (lse_d - (p * d).sum(-1)).masked_fill(~valid, 0.0)
    lse = lse_d + shift.squeeze(-1)
    return logp, entropy, lse


def grad_logits_chunk(
    logits: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor | None,
    grad_logp: torch.Tensor | None,
    grad_entropy: torch.Tensor | None,
    temperature: float,
    ignore_index: int,
) -> torch.Tensor:
    """Gradient of ``sum(grad_logp * logp + grad_entropy * entropy)`` w.r.t. one chunk of logits, fp32 ``[n, V]``.

    ``lse``/``entropy`` are the forward's values for these rows; ignored rows get a zero gradient.
    """
    valid = targets != ignore_index
    z = logits.float()
    if temperature != 1.0:
        z = z / temperature
    p = torch.exp(z - lse.unsqueeze(-1))
    grad = torch.zeros_like(z)
    if grad_logp is not None:
        g = grad_logp.float().masked_fill(~valid, 0.0)
        grad -= p * g.unsqueeze(-1)
        safe = targets.masked_fill(~valid, 0).long()
        grad.scatter_add_(1, safe.unsqueeze(-1), g.unsqueeze(-1))
    if grad_entropy is not None:
        ge = grad_entropy.float().masked_fill(~valid, 0.0)
        grad -= p * (z - lse.unsqueeze(-1) + entropy.unsqueeze(-1)) * ge.unsqueeze(-1)
    if temperature != 1.0:
        grad /= temperature
    return grad
