"""ReMax / PPO policy loss straight from the last hidden states, without materializing ``[B*T, V]`` logits.

Design: the loss is two steps, and only the first is heavy.

1. ``fused_linear_logprobs`` (Triton forward and backward, ``remax_kernels/ops/fused_linear_logprobs.py``) turns
   hidden ``[B*T, H]`` and the lm-head weight ``[V, H]`` into the taken tokens' log-probs ``[B*T]`` (and entropy when
   asked) by streaming over the vocabulary, so no logits tensor ever exists; its backward recomputes the logit
   tiles and produces grad_hidden / grad_weight / grad_bias directly. Tokens outside ``response_mask`` are passed
   as ``ignore_index``: their log-prob is 0 and they send exactly zero gradient into hidden, weight and bias.
2. ``policy_loss`` on the ``[B, T]`` log-probs: elementwise math (ratio, clipping, KL, entropy bonus) and one
   reduction. Autograd carries ``d loss / d logprobs`` (a ``[B, T]`` tensor) back into step 1's backward, so any
   per-token weighting (advantages, clipping, aggregation mode) is applied exactly, token by token.

Entropy is computed by the kernel only when ``entropy_coef != 0``; then the ``entropy`` metric is reported too.
Otherwise the default ReMax path does no entropy work (verl likewise takes the entropy metric from its separate
rollout log-prob pass, not from the training loss).

Memory: besides the inputs and their gradients, the op keeps O(B*T) floats (log-probs, log-sum-exp, entropy).
"""

from __future__ import annotations

import torch
from torch import nn

from remax_kernels._dispatch import BACKENDS
from remax_kernels._validate import check_float, check_index, check_same_device, check_temperature, check_tensor
from remax_kernels.losses import check_loss_options, check_required_inputs, policy_loss
from remax_kernels.ops.fused_linear_logprobs import fused_linear_logprobs

# Targets outside the response are rewritten to this before the kernel sees them.
_IGNORE_INDEX = -100


def fused_linear_policy_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    old_logprobs: torch.Tensor | None = None,
    clip_ratio: float | tuple[float, float] | None = None,
    clip_ratio_c: float | None = None,
    ref_logprobs: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    entropy_coef: float = 0.0,
    loss_agg_mode: str = "token-mean",
    loss_agg_norm: float | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``policy_loss(log_softmax((hidden @ weight.T + bias) / temperature)[targets], ...)`` without the logits.

    Args:
        hidden: ``[B, T, H]`` fp32/fp16/bf16, the policy's last hidden states at the positions that predict
            ``targets``.
        weight: ``[V, H]``, same dtype as ``hidden``, the lm-head weight.
        targets: ``[B, T]`` int64/int32, the taken tokens, already shifted (``targets[:, t]`` is the token
            predicted from ``hidden[:, t]``); values outside the response are ignored (any value allowed there).
        advantages: ``[B]`` or ``[B, T]`` float, e.g. from ``remax_advantages``.
        response_mask: ``[B, T]`` bool / 0-1, 1 at response tokens.
        bias: optional ``[V]`` lm-head bias.
        temperature: the sampling temperature (> 0): log-probs are taken under ``softmax(logits / temperature)``,
            the distribution the tokens were sampled from.
        old_logprobs, clip_ratio, clip_ratio_c, ref_logprobs, kl_coef, kl_estimator, entropy_coef, loss_agg_mode,
            loss_agg_norm: as in ``remax_kernels.policy_loss()`` (``[B, T]`` tensors).
        backend: ``"auto"``, ``"triton"`` or ``"torch"`` for the log-prob step (see ``remax_kernels._dispatch``).

    Returns:
        ``(loss, metrics)`` as ``policy_loss``: float32 0-d loss, differentiable w.r.t. ``hidden``, ``weight``
        and ``bias``; detached 0-d metrics.

    Example::

        >>> import torch, remax_kernels as rk
        >>> B, T, H, V = 2, 8, 64, 1000
        >>> hidden = torch.randn(B, T, H, requires_grad=True)
        >>> lm_head = torch.nn.Linear(H, V, bias=False)
        >>> targets = torch.randint(0, V, (B, T))
        >>> mask = torch.ones(B, T, dtype=torch.bool)
        >>> adv = rk.remax_advantages(torch.tensor([1.0, 0.2]), torch.tensor([0.5, 0.4]))
        >>> loss, metrics = rk.fused_linear_policy_loss(hidden, lm_head.weight, targets, adv, mask)
        >>> loss.backward()  # fills hidden.grad and lm_head.weight.grad
    """
    check_float("hidden", hidden)
    if hidden.dim() != 3:
        raise ValueError(f"hidden: expected a 3-D tensor [B, T, H], got shape {tuple(hidden.shape)}")
    batch, seq_len = hidden.shape[:2]
    check_index("targets", targets)
    if tuple(targets.shape) != (batch, seq_len):
        raise ValueError(f"targets: shape {tuple(targets.shape)} does not match hidden's [B, T] = {(batch, seq_len)}")
    check_tensor("response_mask", response_mask)
    if tuple(response_mask.shape) != (batch, seq_len):
        raise ValueError(
            f"response_mask: shape {tuple(response_mask.shape)} does not match targets {(batch, seq_len)}"
        )
    if tuple(check_tensor("advantages", advantages).shape) not in ((batch,), (batch, seq_len)):
        raise ValueError(
            f"advantages: shape {tuple(advantages.shape)} does not match targets {(batch, seq_len)}: expected [B] or "
            "[B, T]"
        )
    for name, t in (("old_logprobs", old_logprobs), ("ref_logprobs", ref_logprobs)):
        if t is not None and tuple(check_tensor(name, t).shape) != (batch, seq_len):
            raise ValueError(f"{name}: shape {tuple(t.shape)} does not match targets {(batch, seq_len)}")
    check_same_device(
        hidden=hidden, weight=weight, targets=targets, response_mask=response_mask, bias=bias, advantages=advantages,
        old_logprobs=old_logprobs, ref_logprobs=ref_logprobs,
    )
    # Fail on bad options before the expensive kernel runs; policy_loss re-checks dtypes and values.
    opts = check_loss_options(
        clip_ratio=clip_ratio, clip_ratio_c=clip_ratio_c, kl_coef=kl_coef, kl_estimator=kl_estimator,
        entropy_coef=entropy_coef, loss_agg_mode=loss_agg_mode, loss_agg_norm=loss_agg_norm,
    )
    check_required_inputs(opts, has_old=old_logprobs is not None, has_ref=ref_logprobs is not None, has_entropy=True)

    valid = response_mask != 0
    n_negative = int(((targets < 0) & valid).sum())
    if n_negative:
        raise ValueError(f"targets: {n_negative} negative values at response tokens")
    need_entropy = opts["entropy_coef"] != 0
    out = fused_linear_logprobs(
        hidden,
        weight,
        targets.masked_fill(~valid, _IGNORE_INDEX),
        bias=bias,
        temperature=temperature,
        ignore_index=_IGNORE_INDEX,
        return_entropy=need_entropy,
        backend=backend,
    )
    logprobs, entropy = out if need_entropy else (out, None)
    return policy_loss(
        logprobs,
        advantages,
        response_mask,
        old_logprobs=old_logprobs,
        clip_ratio=clip_ratio,
        clip_ratio_c=clip_ratio_c,
        ref_logprobs=ref_logprobs,
        kl_coef=kl_coef,
        kl_estimator=kl_estimator,
        entropy=entropy,
        entropy_coef=entropy_coef,
        loss_agg_mode=loss_agg_mode,
        loss_agg_norm=loss_agg_norm,
    )


class ReMaxLoss(nn.Module):
    """``fused_linear_policy_loss`` with its options fixed at construction (checked there, so a bad config fails
    before the first step).

    Defaults are the paper's ReMax loss: REINFORCE (no ratio, no clipping), token mean, no KL term, no entropy.

    Example::

        >>> import torch, remax_kernels as rk
        >>> hidden, lm_head = torch.randn(2, 8, 64), torch.nn.Linear(64, 1000, bias=False)
        >>> targets, mask = torch.randint(0, 1000, (2, 8)), torch.ones(2, 8, dtype=torch.bool)
        >>> ref_logp = torch.randn(2, 8) - 7.0  # the reference model's log-probs of the same tokens
        >>> loss_fn = rk.ReMaxLoss(kl_coef=0.05, kl_estimator="k3")
        >>> loss, metrics = loss_fn(hidden, lm_head.weight, targets, torch.tensor([0.5, -1.0]), mask,
        ...                         ref_logprobs=ref_logp)
    """

    def __init__(
        self,
        *,
        temperature: float = 1.0,
        clip_ratio: float | tuple[float, float] | None = None,
        clip_ratio_c: float | None = None,
        kl_coef: float = 0.0,
        kl_estimator: str = "k3",
        entropy_coef: float = 0.0,
        loss_agg_mode: str = "token-mean",
        loss_agg_norm: float | None = None,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        check_loss_options(
            clip_ratio=clip_ratio, clip_ratio_c=clip_ratio_c, kl_coef=kl_coef, kl_estimator=kl_estimator,
            entropy_coef=entropy_coef, loss_agg_mode=loss_agg_mode, loss_agg_norm=loss_agg_norm,
        )
        if backend not in BACKENDS:
            raise ValueError(f"backend: must be one of {BACKENDS}, got {backend!r}")
        self.temperature = check_temperature("temperature", temperature)
        self.clip_ratio = clip_ratio
        self.clip_ratio_c = clip_ratio_c
        self.kl_coef = kl_coef
        self.kl_estimator = kl_estimator
        self.entropy_coef = entropy_coef
        self.loss_agg_mode = loss_agg_mode
        self.loss_agg_norm = loss_agg_norm
        self.backend = backend

    def forward(
        self,
        hidden: torch.Tensor,
        lm_head_weight: torch.Tensor,
        targets: torch.Tensor,
        advantages: torch.Tensor,
        response_mask: torch.Tensor,
        *,
        bias: torch.Tensor | None = None,
        ref_logprobs: torch.Tensor | None = None,
        old_logprobs: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Shapes as ``fused_linear_policy_loss``; returns ``(loss, metrics)``."""
        return fused_linear_policy_loss(
            hidden,
            lm_head_weight,
            targets,
            advantages,
            response_mask,
            bias=bias,
            temperature=self.temperature,
            old_logprobs=old_logprobs,
            clip_ratio=self.clip_ratio,
            clip_ratio_c=self.clip_ratio_c,
            ref_logprobs=ref_logprobs,
            kl_coef=self.kl_coef,
            kl_estimator=self.kl_estimator,
            entropy_coef=self.entropy_coef,
            loss_agg_mode=self.loss_agg_mode,
            loss_agg_norm=self.loss_agg_norm,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, clip_ratio={self.clip_ratio}, clip_ratio_c={self.clip_ratio_c}, "
            f"kl_coef={self.kl_coef}, kl_estimator={self.kl_estimator!r}, entropy_coef={self.entropy_coef}, "
            f"loss_agg_mode={self.loss_agg_mode!r}, backend={self.backend!r}"
        )
