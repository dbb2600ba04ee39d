"""The ReMax / REINFORCE / PPO-clip policy loss: on per-token log-probs (``policy_loss``) or straight from the last
hidden states and the lm-head (``fused_linear_policy_loss``, ``ReMaxLoss``), with its options stated once
(``LossOptions``).

Per response token t (``A`` = advantage, ``logp`` = current log-prob, ``old``/``ref`` = behaviour/reference
log-probs, all constants except ``logp`` and ``entropy``)::

    REINFORCE (old_logprobs=None):   pg_t = -A_t * logp_t                  gradient -A_t * grad logp_t (ReMax)
    importance ratio:                r_t  = exp(clamp(logp_t - old_t, -20, 20))
    PPO (clip_ratio=eps):            pg_t = max(-A_t r_t, -A_t clip(r_t, 1 - eps_low, 1 + eps_high))
    dual clip (clip_ratio_c=c):      pg_t = min(pg_t, -A_t c) where A_t < 0
    rollout correction (TIS):        pg_t *= min(exp(logp_t - rollout_t), rollout_is_cap)   (a constant weight)
    L_t = pg_t + kl_coef * KL_t(logp_t, ref_t) - entropy_coef * entropy_t

``rollout_logprobs`` are the log-probs the rollout engine reported for the tokens it sampled (e.g.
``PairedRollout.sampled_logprobs``). Given them, the metrics measure the train-rollout mismatch (mean and max
|logp - rollout|, the importance ratio's mean and spread); with ``rollout_is_cap`` the policy-gradient term is
reweighted by the truncated importance ratio (TIS, as verl and others correct the mismatch between inference and
training kernels).

KL estimators (Schulman's k1/k2/k3, verl's ``kl_penalty``; d = logp - ref)::

    k1 = d        k2 = d**2 / 2        k3 = clamp(exp(-d') + d' - 1, -10, 10),  d' = clamp(d, -20, 20)

The loss is a weighted sum ``sum_t w_t L_t`` over the response tokens (mask m, B rows, T columns), the weights
``w_t`` fixed by the aggregation mode and the mask alone::

    "token-mean"              w = m / sum(m)                                 (official ReMax, verl default)
    "seq-mean-token-sum"      w = m / B
    "seq-mean-token-mean"     w = m / (B * sum_t m_b)
    "seq-mean-token-sum-norm" w = m / (B * norm), norm = loss_agg_norm or T    (Dr. GRPO)

These are verl's ``agg_loss`` (verl >= 0.8, one data-parallel rank, ``global_batch_size`` = B; earlier verl
divided "seq-mean-token-sum-norm" by the norm only, i.e. B times this). Rows without response tokens add 0 and
still count in B; a batch without response tokens gives loss 0 with zero, finite gradients. Values at masked
positions are never read into the loss, so padding may hold anything (NaN included).

Because the weights are known before any log-prob is, and ``L_t`` depends on its own token only, the gradient
``d loss / d logp_t = w_t * dL_t/dlogp_t`` is a closed form of ``logp_t`` (``token_loss_terms``): ``policy_loss``
uses it as its backward, and ``fused_linear_policy_loss`` computes it IN THE FORWARD, chunk by chunk, so its
gradients w.r.t. hidden, weight and bias are finished when the forward returns (3 GEMM-equivalents in all; see
``remax_kernels/ops/fused_linear_logprobs.py`` for the pipeline and its cost model).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from remax_kernels._dispatch import check_backend
from remax_kernels._validate import (
    check_float,
    check_index,
    check_number,
    check_same_device,
    check_softcap,
    check_targets,
    check_temperature,
    check_tensor,
    value_checks_enabled,
)
from remax_kernels.ops.fused_linear_logprobs import LmHead, check_lm_head, compute_dtype, scatter_rows, stream

LOSS_AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
KL_ESTIMATORS = ("k1", "k2", "k3")
# verl's names for the same estimators, accepted so its configs can be passed through unchanged.
KL_ALIASES = {"kl": "k1", "mse": "k2", "low_var_kl": "k3"}
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_MASK_DTYPES = (torch.bool, torch.uint8, torch.int8, torch.int32, torch.int64, torch.float32, torch.float16,
                torch.bfloat16, torch.float64)
# Bounds from verl: exp(20) ~ 4.9e8 keeps ratios finite in fp32 whatever the log-prob gap.
_LOG_RATIO_CLAMP = 20.0
_K3_CLAMP = 10.0
# Targets outside the response are rewritten to this before the lm-head op sees them.
_IGNORE_INDEX = -100


@dataclass(frozen=True)
class LossOptions:
    """The options of the policy loss, checked and normalized once (``policy_loss``, ``fused_linear_policy_loss``,
    ``ReMaxLoss``, ``remax_kernels.hf.causal_lm_policy_loss`` and the ``remax`` trainer all take these).

    Attributes:
        clip_ratio: PPO clip eps, or ``(eps_low, eps_high)`` (clip-higher); None = no clipping. Stored as a pair.
        clip_ratio_c: dual-clip bound c > 1 for negative advantages (verl uses 3.0); None = off.
        kl_coef: weight of the KL loss term (needs ``ref_logprobs``).
        kl_estimator: ``"k1"``, ``"k2"`` or ``"k3"`` (verl's ``"kl"``, ``"mse"``, ``"low_var_kl"`` accepted and
            stored under the canonical name).
        entropy_coef: weight of the entropy bonus (subtracted from the loss; needs the entropy).
        loss_agg_mode: one of ``LOSS_AGG_MODES`` (weights in the module docstring).
        loss_agg_norm: the constant ``norm`` of ``"seq-mean-token-sum-norm"`` (default: T, the padded length).
        rollout_is_cap: truncated importance sampling: each token's policy-gradient term is weighted by
            ``min(exp(logp - rollout_logp), rollout_is_cap)`` (a constant; needs ``rollout_logprobs``); None = off.

    Example::

        >>> opts = LossOptions(clip_ratio=0.2, kl_coef=0.05, kl_estimator="low_var_kl")
        >>> opts.clip_ratio, opts.kl_estimator
        ((0.2, 0.2), 'k3')
    """

    clip_ratio: float | tuple[float, float] | None = None
    clip_ratio_c: float | None = None
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    entropy_coef: float = 0.0
    loss_agg_mode: str = "token-mean"
    loss_agg_norm: float | None = None
    rollout_is_cap: float | None = None

    def __post_init__(self) -> None:
        set_ = lambda name, value: object.__setattr__(self, name, value)
        if self.clip_ratio is not None:
            pair = self.clip_ratio if isinstance(self.clip_ratio, (tuple, list)) else (self.clip_ratio,) * 2
            if len(pair) != 2:
                raise ValueError(f"clip_ratio: expected eps or a pair (low, high), got {self.clip_ratio!r}")
            low, high = check_number("clip_ratio", pair[0]), check_number("clip_ratio", pair[1])
            if not (0 < low < 1 and 0 < high < float("inf")):
                raise ValueError(
                    f"clip_ratio: needs eps in (0, 1) or a pair (low in (0, 1), high > 0), got {self.clip_ratio!r}")
            set_("clip_ratio", (low, high))
        if self.clip_ratio_c is not None:
            clip_c = check_number("clip_ratio_c", self.clip_ratio_c)
            if not clip_c > 1:
                raise ValueError(f"clip_ratio_c: the dual-clip bound must be > 1, got {self.clip_ratio_c!r}")
            set_("clip_ratio_c", clip_c)
        for name in ("kl_coef", "entropy_coef"):
            value = check_number(name, getattr(self, name))
            if value != value or abs(value) == float("inf"):
                raise ValueError(f"{name}: must be finite, got {getattr(self, name)!r}")
            set_(name, value)
        estimator = KL_ALIASES.get(self.kl_estimator, self.kl_estimator) if isinstance(self.kl_estimator, str) else None
        if estimator not in KL_ESTIMATORS:
            raise ValueError(
                f"kl_estimator: must be one of {KL_ESTIMATORS} (or verl's {tuple(KL_ALIASES)}), got "
                f"{self.kl_estimator!r}")
        set_("kl_estimator", estimator)
        if self.loss_agg_mode not in LOSS_AGG_MODES:
            raise ValueError(f"loss_agg_mode: must be one of {LOSS_AGG_MODES}, got {self.loss_agg_mode!r}")
        if self.loss_agg_norm is not None:
            if self.loss_agg_mode != "seq-mean-token-sum-norm":
                raise ValueError(f"loss_agg_norm: only used by loss_agg_mode='seq-mean-token-sum-norm', got mode "
                                 f"{self.loss_agg_mode!r}")
            norm = check_number("loss_agg_norm", self.loss_agg_norm)
            if not (norm > 0 and norm != float("inf")):
                raise ValueError(f"loss_agg_norm: must be a finite number > 0, got {self.loss_agg_norm!r}")
            set_("loss_agg_norm", norm)
        if self.rollout_is_cap is not None:
            cap = check_number("rollout_is_cap", self.rollout_is_cap)
            if not (cap > 0 and cap != float("inf")):
                raise ValueError(f"rollout_is_cap: must be a finite number > 0, got {self.rollout_is_cap!r}")
            set_("rollout_is_cap", cap)

    @classmethod
    def build(cls, options: LossOptions | None = None, **overrides) -> LossOptions:
        """``options`` (default: all defaults) with keyword ``overrides`` of its fields; an unknown keyword raises
        ``TypeError`` naming it."""
        if options is not None and not isinstance(options, LossOptions):
            raise TypeError(f"options: expected a remax_kernels.LossOptions, got {type(options).__name__}")
        unknown = sorted(set(overrides) - set(_OPTION_NAMES))
        if unknown:
            raise TypeError(f"{', '.join(unknown)}: not a loss option; the options are {list(_OPTION_NAMES)}")
        base = options or cls()
        # A plain constructor call (not dataclasses.replace/fields), so that torch.compile traces it.
        return cls(**{name: overrides.get(name, getattr(base, name)) for name in _OPTION_NAMES})

    def check_inputs(self, *, has_old: bool, has_ref: bool, has_entropy: bool, has_rollout: bool = False) -> None:
        """The tensors these options need must be given."""
        if self.rollout_is_cap is not None and not has_rollout:
            raise ValueError("rollout_logprobs: is required when rollout_is_cap is set (the correction needs them)")
        if not has_old and (self.clip_ratio is not None or self.clip_ratio_c is not None):
            raise ValueError("old_logprobs: is required when clip_ratio or clip_ratio_c is set (the ratio needs it)")
        if self.kl_coef != 0 and not has_ref:
            raise ValueError(f"ref_logprobs: is required when kl_coef != 0 (kl_coef={self.kl_coef})")
        if self.entropy_coef != 0 and not has_entropy:
            raise ValueError(f"entropy: is required when entropy_coef != 0 (entropy_coef={self.entropy_coef})")


_OPTION_NAMES = tuple(f.name for f in dataclasses.fields(LossOptions))


# ----------------------------------------------------------------------------------------------------------------
# The per-token formula and the aggregation weights: the one statement of the loss
# ----------------------------------------------------------------------------------------------------------------


def kl_estimate(logp: torch.Tensor, ref: torch.Tensor, estimator: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token KL(pi || ref) estimate from sampled-token log-probs and its derivative w.r.t. ``logp``;
    ``estimator`` in k1/k2/k3 (see the module docstring). A clamp that is active stops the derivative."""
    d = logp - ref
    if estimator == "k1":
        return d, torch.ones_like(d)
    if estimator == "k2":
        return 0.5 * d * d, d
    neg = (-d).clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
    k3 = torch.exp(neg) - neg - 1
    passes = (d.abs() <= _LOG_RATIO_CLAMP) & (k3.abs() <= _K3_CLAMP)
    return k3.clamp(-_K3_CLAMP, _K3_CLAMP), torch.where(passes, 1 - torch.exp(neg), 0.0)


def token_loss_terms(
    logp: torch.Tensor,
    advantages: torch.Tensor,
    options: LossOptions,
    *,
    old_logprobs: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    rollout_logprobs: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float, dict[str, torch.Tensor]]:
    """Elementwise: ``(pg, L, dL/dlogp, dL/dentropy, per-token metrics)`` for tokens with these inputs (all the
    same shape, finite, constants except ``logp``/``entropy``). ``dL/dentropy`` is the constant
    ``-entropy_coef``. Metrics: ``ppo_kl``, ``clip_frac``, ``clip_frac_lower``, ``kl``, ``entropy``,
    ``rollout_abs_diff``, ``rollout_is_ratio``, ``rollout_is_clipped`` as the inputs allow."""
    metrics: dict[str, torch.Tensor] = {}
    adv = advantages
    if old_logprobs is None:
        pg, d_pg = -adv * logp, -adv
    else:
        raw = logp - old_logprobs
        log_ratio = raw.clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
        ratio = torch.exp(log_ratio)
        d_ratio = torch.where(raw.abs() <= _LOG_RATIO_CLAMP, ratio, 0.0)
        pg, d_pg = -adv * ratio, -adv * d_ratio
        metrics["ppo_kl"] = -log_ratio
        if options.clip_ratio is not None:
            low, high = options.clip_ratio
            pg_clipped = -adv * ratio.clamp(1 - low, 1 + high)
            clipped = pg_clipped > pg  # only then is the clipped branch (with its zero slope) the max
            metrics["clip_frac"] = clipped.to(pg.dtype)
            pg = torch.where(clipped, pg_clipped, pg)
            d_pg = torch.where(clipped, 0.0, d_pg)
        if options.clip_ratio_c is not None:
            pg_lower = -adv * options.clip_ratio_c
            capped = (adv < 0) & (pg > pg_lower)
            metrics["clip_frac_lower"] = capped.to(pg.dtype)
            pg = torch.where(capped, pg_lower, pg)
            d_pg = torch.where(capped, 0.0, d_pg)
    if rollout_logprobs is not None:
        diff = logp.detach() - rollout_logprobs
        ratio = torch.exp(diff.clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP))
        metrics["rollout_abs_diff"] = diff.abs()
        metrics["rollout_is_ratio"] = ratio
        if options.rollout_is_cap is not None:
            metrics["rollout_is_clipped"] = (ratio > options.rollout_is_cap).to(pg.dtype)
            is_weight = ratio.clamp(max=options.rollout_is_cap)
            pg, d_pg = is_weight * pg, is_weight * d_pg
    loss, d_loss = pg, d_pg
    if ref_logprobs is not None:
        kl, d_kl = kl_estimate(logp, ref_logprobs, options.kl_estimator)
        metrics["kl"] = kl
        if options.kl_coef != 0:
            loss, d_loss = loss + options.kl_coef * kl, d_loss + options.kl_coef * d_kl
    if entropy is not None:
        metrics["entropy"] = entropy
        if options.entropy_coef != 0:
            loss = loss - options.entropy_coef * entropy
    return pg, loss, d_loss, -options.entropy_coef, metrics


def aggregation_weights(response_mask: torch.Tensor, options: LossOptions, dtype: torch.dtype) -> torch.Tensor:
    """``[B, T]`` weights ``w`` with ``loss = sum(w * L)`` (module docstring); 0 outside the response."""
    weight = response_mask.to(dtype)
    batch, seq_len = weight.shape
    mode = options.loss_agg_mode
    if mode == "token-mean":
        n = weight.sum()
        return weight / torch.where(n > 0, n, torch.ones_like(n))
    if mode == "seq-mean-token-mean":
        n = weight.sum(-1, keepdim=True)
        return weight / (torch.where(n > 0, n, torch.ones_like(n)) * max(batch, 1))
    norm = 1.0 if mode == "seq-mean-token-sum" else (options.loss_agg_norm or max(seq_len, 1))
    return weight / (max(batch, 1) * norm)


class _TokenInputs:
    """The ``[B, T]`` inputs of the loss in the math dtype, zeroed off the response before any math (so padding
    garbage, NaN or -inf, reaches neither the loss nor, through 0 * NaN, a gradient)."""

    def __init__(self, response_mask, advantages, old_logprobs, ref_logprobs, dtype, rollout_logprobs=None):
        self.valid = response_mask != 0
        zero = torch.zeros((), dtype=dtype, device=response_mask.device)
        self.on_response = lambda t: torch.where(self.valid, t.detach().to(dtype), zero)
        adv = advantages.detach()
        self.advantages = self.on_response(adv[:, None].expand(self.valid.shape) if adv.dim() == 1 else adv)
        self.old = None if old_logprobs is None else self.on_response(old_logprobs)
        self.ref = None if ref_logprobs is None else self.on_response(ref_logprobs)
        self.rollout = None if rollout_logprobs is None else self.on_response(rollout_logprobs)


def _check_finite_advantages(inputs: _TokenInputs) -> None:
    if value_checks_enabled(inputs.advantages.device):
        n_bad = int((~torch.isfinite(inputs.advantages)).sum())
        if n_bad:
            raise ValueError(f"advantages: {n_bad} NaN/inf values at response tokens; advantages must be finite")


def _metrics(logp, entropy, inputs: _TokenInputs, weights, options, response_mask, dtype) -> dict[str, torch.Tensor]:
    """Detached 0-d metrics (no device sync): ``pg_loss`` (aggregated like the loss) and token means over the
    response of ``logprob_mean``, ``adv_mean``, ``adv_std`` and the per-token metrics of ``token_loss_terms``."""
    with torch.no_grad():
        pg, _, _, _, per_token = token_loss_terms(
            logp, inputs.advantages, options, old_logprobs=inputs.old, ref_logprobs=inputs.ref, entropy=entropy,
            rollout_logprobs=inputs.rollout)
        weight = response_mask.to(dtype)
        n_tokens = weight.sum()
        denom = torch.where(n_tokens > 0, n_tokens, torch.ones_like(n_tokens))

        def token_mean(t: torch.Tensor) -> torch.Tensor:
            return (t * weight).sum() / denom

        out = {"pg_loss": (weights * pg).sum(), "logprob_mean": token_mean(logp)}
        out.update({name: token_mean(value) for name, value in per_token.items()})
        adv_mean = token_mean(inputs.advantages)
        out["adv_mean"] = adv_mean
        out["adv_std"] = token_mean((inputs.advantages - adv_mean) ** 2).sqrt()
        out["response_tokens"] = n_tokens
        if inputs.rollout is not None:
            out["rollout_abs_diff_max"] = torch.where(weight > 0, per_token["rollout_abs_diff"], 0.0).amax()
            out["rollout_is_ratio_std"] = token_mean((per_token["rollout_is_ratio"] - out["rollout_is_ratio"]) ** 2
                                                     ).sqrt()
    return out


# ----------------------------------------------------------------------------------------------------------------
# policy_loss: from per-token log-probs
# ----------------------------------------------------------------------------------------------------------------


class _WeightedTokenLoss(torch.autograd.Function):
    """``sum(w * L(logp, entropy))`` with the closed-form gradient of ``token_loss_terms``."""

    @staticmethod
    def forward(ctx, logp, entropy, weights, advantages, old, ref, rollout, options):
        _, loss_tok, d_logp, d_entropy, _ = token_loss_terms(
            logp, advantages, options, old_logprobs=old, ref_logprobs=ref, entropy=entropy, rollout_logprobs=rollout)
        ctx.save_for_backward(weights * d_logp, weights * d_entropy)
        return (weights * loss_tok).sum()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        g_logp, g_entropy = ctx.saved_tensors
        return (grad * g_logp, grad * g_entropy if ctx.needs_input_grad[1] else None) + (None,) * 6


def _check_token_tensor(name: str, t, shape: tuple) -> torch.Tensor:
    check_float(name, t, _FLOAT_DTYPES)
    if tuple(t.shape) != shape:
        raise ValueError(f"{name}: shape {tuple(t.shape)} does not match logprobs {shape}")
    return t


def _check_mask_and_advantages(response_mask, advantages, shape: tuple, what: str) -> None:
    check_tensor("response_mask", response_mask)
    if response_mask.dtype not in _MASK_DTYPES:
        raise TypeError(f"response_mask: dtype must be bool, integer or float, got {response_mask.dtype}")
    if tuple(response_mask.shape) != shape:
        raise ValueError(f"response_mask: shape {tuple(response_mask.shape)} does not match {what} {shape}")
    check_float("advantages", advantages, _FLOAT_DTYPES)
    if tuple(advantages.shape) not in ((shape[0],), shape):
        raise ValueError(
            f"advantages: shape {tuple(advantages.shape)} does not match {what} {shape}: expected [B] or [B, T]")


def policy_loss(
    logprobs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    old_logprobs: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    rollout_logprobs: torch.Tensor | None = None,
    options: LossOptions | None = None,
    **option_overrides,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Policy-gradient loss (ReMax/REINFORCE, optionally PPO-clipped) with KL and entropy terms; see the module doc.

    Args:
        logprobs: ``[B, T]`` float, log pi(a_t) of the taken tokens under the current policy (requires grad).
        advantages: ``[B]`` (broadcast over tokens) or ``[B, T]`` float, finite; treated as constants.
        response_mask: ``[B, T]`` bool or 0/1 values; 1 at response tokens. Non-binary values act as token weights.
        old_logprobs: ``[B, T]`` behaviour-policy log-probs (constants); enables the importance ratio. Needed by
            ``clip_ratio`` and ``clip_ratio_c``. Passing ``logprobs.detach()`` gives exactly the REINFORCE gradient.
        ref_logprobs: ``[B, T]`` reference-policy log-probs (constants), for the KL term and the ``kl`` metric.
        entropy: ``[B, T]`` per-token entropy of the current policy (may require grad), for the bonus and metric.
        rollout_logprobs: ``[B, T]`` log-probs the rollout engine reported for these tokens (constants): the
            train-rollout mismatch metrics, and the TIS weights with ``rollout_is_cap``.
        options: a ``LossOptions`` (default: its defaults, the paper's loss).
        **option_overrides: any ``LossOptions`` field by keyword (``clip_ratio``, ``clip_ratio_c``, ``kl_coef``,
            ``kl_estimator``, ``entropy_coef``, ``loss_agg_mode``, ``loss_agg_norm``, ``rollout_is_cap``), applied
            over ``options``.

    Returns:
        ``(loss, metrics)``: loss is a float32 0-d tensor (float64 for float64 logprobs); metrics maps names to
        detached 0-d tensors of that dtype (no device sync), all token means over the response: ``pg_loss`` (the
        policy-gradient part, aggregated like the loss), ``logprob_mean``, ``adv_mean``, ``adv_std`` (population
        std), ``response_tokens``; plus ``kl`` (with ``ref_logprobs``), ``entropy`` (with ``entropy``), ``ppo_kl``
        (mean old - logp) with ``old_logprobs``, ``clip_frac`` with ``clip_ratio``, ``clip_frac_lower`` with
        ``clip_ratio_c``; with ``rollout_logprobs``: ``rollout_abs_diff`` (mean |logp - rollout|),
        ``rollout_abs_diff_max``, ``rollout_is_ratio`` and ``rollout_is_ratio_std`` (exp(logp - rollout)) and,
        with ``rollout_is_cap``, ``rollout_is_clipped`` (the fraction of tokens whose weight was capped). The
        backward is the closed form of ``token_loss_terms`` (once differentiable).

    Non-finite advantages at response tokens raise ``ValueError`` on CPU tensors (on CUDA with
    ``REMAX_KERNELS_CHECKS=1``: the check reads device memory).

    Example (the official ReMax loss: REINFORCE, token mean)::

        >>> logp = torch.randn(2, 4).clamp(max=0).requires_grad_()
        >>> adv = torch.tensor([0.5, -1.0])
        >>> mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
        >>> loss, metrics = policy_loss(logp, adv, mask)
        >>> loss.backward()  # logp.grad = -adv[:, None] * mask / mask.sum()
    """
    check_float("logprobs", logprobs, _FLOAT_DTYPES)
    if logprobs.dim() != 2:
        raise ValueError(f"logprobs: expected a 2-D tensor [B, T], got shape {tuple(logprobs.shape)}")
    shape = tuple(logprobs.shape)
    _check_mask_and_advantages(response_mask, advantages, shape, "logprobs")
    for name, t in (("old_logprobs", old_logprobs), ("ref_logprobs", ref_logprobs), ("entropy", entropy),
                    ("rollout_logprobs", rollout_logprobs)):
        if t is not None:
            _check_token_tensor(name, t, shape)
    check_same_device(
        logprobs=logprobs, advantages=advantages, response_mask=response_mask, old_logprobs=old_logprobs,
        ref_logprobs=ref_logprobs, entropy=entropy, rollout_logprobs=rollout_logprobs,
    )
    opts = LossOptions.build(options, **option_overrides)
    opts.check_inputs(has_old=old_logprobs is not None, has_ref=ref_logprobs is not None,
                      has_entropy=entropy is not None, has_rollout=rollout_logprobs is not None)
    # fp32 math whatever the input precision (float64 inputs stay float64, for references and tests).
    dtype = torch.float64 if logprobs.dtype == torch.float64 else torch.float32
    inputs = _TokenInputs(response_mask, advantages, old_logprobs, ref_logprobs, dtype, rollout_logprobs)
    _check_finite_advantages(inputs)
    zero = torch.zeros((), dtype=dtype, device=logprobs.device)
    logp = torch.where(inputs.valid, logprobs.to(dtype), zero)
    ent = None if entropy is None else torch.where(inputs.valid, entropy.to(dtype), zero)
    weights = aggregation_weights(response_mask, opts, dtype)
    loss = _WeightedTokenLoss.apply(logp, ent, weights, inputs.advantages, inputs.old, inputs.ref, inputs.rollout,
                                    opts)
    return loss, _metrics(logp.detach(), None if ent is None else ent.detach(), inputs, weights, opts, response_mask,
                          dtype)


# ----------------------------------------------------------------------------------------------------------------
# fused_linear_policy_loss: from hidden states and the lm-head, gradients in the forward
# ----------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("remax_kernels::fused_linear_policy_loss", mutates_args=())
def _fused_loss_op(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
    token_weights: torch.Tensor, advantages: torch.Tensor, old_logprobs: torch.Tensor | None,
    ref_logprobs: torch.Tensor | None, rollout_logprobs: torch.Tensor | None, temperature: float,
    clip_low: float | None, clip_high: float | None, clip_ratio_c: float | None, kl_coef: float, kl_estimator: str,
    entropy_coef: float, rollout_is_cap: float | None, dtype: torch.dtype, backend: str, need_hidden: bool,
    need_weight: bool, need_bias: bool, softcap: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flat ``[N]`` per-token inputs (``targets`` -100 off the response) -> (fp32 0-d loss, logp ``[N]``, entropy
    ``[N]`` or ``[0]``, grad_hidden, grad_weight, grad_bias for a unit upstream gradient, ``[0]`` when not needed).
    """
    if value_checks_enabled(hidden.device):
        check_targets("targets", targets, weight.shape[0], _IGNORE_INDEX, where="at response tokens")
    options = LossOptions(clip_ratio=None if clip_low is None else (clip_low, clip_high), clip_ratio_c=clip_ratio_c,
                          kl_coef=kl_coef, kl_estimator=kl_estimator, entropy_coef=entropy_coef,
                          rollout_is_cap=rollout_is_cap)
    n_rows = hidden.shape[0]
    entropy_grad = entropy_coef != 0
    head = LmHead(hidden, weight, bias, targets, _IGNORE_INDEX, dtype, temperature, backend, softcap)
    per_row = {name: None if t is None else t.index_select(0, head.rows)
               for name, t in (("w", token_weights), ("adv", advantages), ("old", old_logprobs),
                               ("ref", ref_logprobs), ("rollout", rollout_logprobs))}
    losses = []

    def upstream(part, logp, entropy):
        sel = {name: None if t is None else t[part] for name, t in per_row.items()}
        _, loss_tok, d_logp, d_entropy, _ = token_loss_terms(
            logp, sel["adv"], options, old_logprobs=sel["old"], ref_logprobs=sel["ref"], entropy=entropy,
            rollout_logprobs=sel["rollout"])
        losses.append((sel["w"] * loss_tok).sum())
        return sel["w"] * d_logp, (sel["w"] * d_entropy if entropy_grad else None)

    # The entropy costs its row pass no extra memory traffic, so it is always computed (for the metric); its
    # gradient only when the bonus is on.
    out = stream(head, need_entropy=True, upstream=upstream, needs=(need_hidden, need_weight, need_bias))
    loss = torch.stack(losses).sum() if losses else hidden.new_zeros((), dtype=torch.float32)
    logp = scatter_rows(out["logp"], head, n_rows)
    entropy = scatter_rows(out["entropy"], head, n_rows)
    empty = lambda: hidden.new_empty(0)  # outputs must not alias each other
    return (loss, logp, entropy, out["grad_hidden"] if need_hidden else empty(),
            out["grad_weight"].to(weight.dtype) if need_weight else empty(),
            out["grad_bias"].to(bias.dtype) if need_bias else empty())


@_fused_loss_op.register_fake
def _(hidden, weight, bias, targets, token_weights, advantages, old_logprobs, ref_logprobs, rollout_logprobs,
      temperature, clip_low, clip_high, clip_ratio_c, kl_coef, kl_estimator, entropy_coef, rollout_is_cap, dtype,
      backend, need_hidden, need_weight, need_bias, softcap=0.0):
    n = hidden.shape[0]
    empty = lambda: hidden.new_empty(0)
    return (hidden.new_empty((), dtype=torch.float32), hidden.new_empty(n, dtype=torch.float32),
            hidden.new_empty(n, dtype=torch.float32),
            torch.empty_like(hidden) if need_hidden else empty(), torch.empty_like(weight) if need_weight else empty(),
            torch.empty_like(bias) if need_bias else empty())


def _fused_loss_setup_context(ctx, inputs, output):
    _, logp, entropy, grad_hidden, grad_weight, grad_bias = output
    need_hidden, need_weight, need_bias = inputs[19:22]
    # Only the loss is differentiable: the stored gradients must not carry a graph back into this op.
    ctx.mark_non_differentiable(logp, entropy, grad_hidden, grad_weight, grad_bias)
    ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
    ctx.needs = (need_hidden, need_weight, need_bias)
    ctx.set_materialize_grads(False)


def _scaled(grad: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    # Eagerly, in place: no second [V, H] buffer at the peak of the backward. While torch.compile traces (the
    # tensors are then FakeTensor/FunctionalTensor subclasses), out of place: its graphs must not mutate saved
    # tensors, and it plans the memory itself.
    if type(grad) is torch.Tensor:
        return grad.mul_(scale.to(grad.dtype))
    return grad * scale.to(grad.dtype)


def _fused_loss_backward(ctx, grad_loss, *_):
    # The gradients were finished in the forward for a unit upstream gradient; the chain rule only scales them.
    # In place, so a second backward through the same graph is refused.
    if grad_loss is None:
        return (None,) * 23
    if getattr(ctx, "used", False):
        raise RuntimeError("fused_linear_policy_loss: backward through the same loss twice is not supported (its "
                           "stored gradients were already scaled); compute the loss again")
    ctx.used = True
    grads = [_scaled(g, grad_loss) if need else None for g, need in zip(ctx.saved_tensors, ctx.needs, strict=True)]
    return (*grads,) + (None,) * 20


_fused_loss_op.register_autograd(_fused_loss_backward, setup_context=_fused_loss_setup_context)


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
    ref_logprobs: torch.Tensor | None = None,
    rollout_logprobs: torch.Tensor | None = None,
    options: LossOptions | None = None,
    softcap: float | None = None,
    backend: str = "auto",
    **option_overrides,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``policy_loss(log_softmax((hidden @ weight.T + bias) / temperature)[targets], ...)`` without the logits, its
    gradients computed in the forward.

    One pass over chunks of the response tokens only (the rest never enter a matmul): per chunk the logits GEMM,
    the row kernel's log-probs and entropies, the loss gradient w.r.t. each log-prob (and entropy, when
    ``entropy_coef != 0``) from the closed form of ``token_loss_terms``, the row kernel's gradient over the logits
    in place, and the two gradient GEMMs. The backward only scales the stored gradients by the upstream gradient:
    3 GEMM-equivalents in all (the module docstring of ``remax_kernels.ops.fused_linear_logprobs`` has the cost
    model and the memory).

    Args:
        hidden: ``[B, T, H]`` fp32/fp16/bf16, the policy's last hidden states at the positions that predict
            ``targets``.
        weight: ``[V, H]``, the lm-head weight; the same dtype as ``hidden`` unless autocast is on (then the GEMMs
            run in the autocast dtype).
        targets: ``[B, T]`` int64/int32, the taken tokens, already shifted (``targets[:, t]`` is the token
            predicted from ``hidden[:, t]``); values outside the response are ignored (any value allowed there).
        advantages: ``[B]`` or ``[B, T]`` float, e.g. from ``remax_advantages``.
        response_mask: ``[B, T]`` bool / 0-1, 1 at response tokens.
        bias: optional ``[V]`` lm-head bias.
        temperature: the sampling temperature (> 0): log-probs are taken under ``softmax(logits / temperature)``,
            the distribution the tokens were sampled from.
        old_logprobs, ref_logprobs, rollout_logprobs: ``[B, T]``, as in ``policy_loss``.
        options, **option_overrides: the loss options, as in ``policy_loss``.
        softcap: logit soft-capping, ``None`` (off) or a finite ``c > 0``: ``logits = c * tanh(logits / c)`` before
            the temperature (Gemma-2/3's ``final_logit_softcapping``), inside the row kernels' passes, as in
            ``token_logprobs``.
        backend: ``"auto"``, ``"triton"``, ``"cuda"`` (the CUDA C++ row kernel) or ``"torch"`` for the row kernels
            (see ``remax_kernels._dispatch``).

    Returns:
        ``(loss, metrics)`` as ``policy_loss``: float32 0-d loss, differentiable w.r.t. ``hidden``, ``weight``
        and ``bias`` (gradients of whichever require grad, computed in the forward: a call under ``no_grad``
        computes none); detached 0-d metrics, ``entropy`` always included (it costs the row pass no extra reads).

    It is the ``torch.library`` op ``remax_kernels::fused_linear_policy_loss`` (fake implementation and autograd
    registered). Device syncs: one, to count the response tokens. Target values are checked on CPU tensors (on
    CUDA with ``REMAX_KERNELS_CHECKS=1``).

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
    vocab, hidden_size = check_lm_head(hidden, weight, bias)
    shape = tuple(hidden.shape[:2])
    check_index("targets", targets)
    if tuple(targets.shape) != shape:
        raise ValueError(f"targets: shape {tuple(targets.shape)} does not match hidden's [B, T] = {shape}")
    _check_mask_and_advantages(response_mask, advantages, shape, "targets")
    for name, t in (("old_logprobs", old_logprobs), ("ref_logprobs", ref_logprobs),
                    ("rollout_logprobs", rollout_logprobs)):
        if t is not None and tuple(check_tensor(name, t).shape) != shape:
            raise ValueError(f"{name}: shape {tuple(t.shape)} does not match targets {shape}")
    check_same_device(
        hidden=hidden, targets=targets, response_mask=response_mask, advantages=advantages,
        old_logprobs=old_logprobs, ref_logprobs=ref_logprobs, rollout_logprobs=rollout_logprobs,
    )
    temperature = check_temperature("temperature", temperature)
    cap = check_softcap("softcap", softcap)
    check_backend(backend)
    opts = LossOptions.build(options, **option_overrides)
    opts.check_inputs(has_old=old_logprobs is not None, has_ref=ref_logprobs is not None, has_entropy=True,
                      has_rollout=rollout_logprobs is not None)
    dtype = compute_dtype(hidden, weight)

    inputs = _TokenInputs(response_mask, advantages, old_logprobs, ref_logprobs, torch.float32, rollout_logprobs)
    weights = aggregation_weights(response_mask, opts, torch.float32)
    flat = lambda t: None if t is None else t.reshape(-1)
    grad_on = torch.is_grad_enabled()
    clip_low, clip_high = opts.clip_ratio if opts.clip_ratio is not None else (None, None)
    loss, logp, entropy, _, _, _ = _fused_loss_op(
        hidden.reshape(-1, hidden_size), weight, bias, targets.masked_fill(~inputs.valid, _IGNORE_INDEX).reshape(-1),
        weights.reshape(-1), inputs.advantages.reshape(-1), flat(inputs.old), flat(inputs.ref), flat(inputs.rollout),
        temperature, clip_low, clip_high, opts.clip_ratio_c, opts.kl_coef, opts.kl_estimator, opts.entropy_coef,
        opts.rollout_is_cap, dtype, backend,
        grad_on and hidden.requires_grad, grad_on and weight.requires_grad,
        grad_on and bias is not None and bias.requires_grad, cap,
    )
    entropy = entropy.view(shape)
    return loss, _metrics(logp.view(shape), entropy, inputs, weights, opts, response_mask, torch.float32)


class ReMaxLoss(nn.Module):
    """``fused_linear_policy_loss`` with its options fixed at construction (checked there, so a bad config fails
    before the first step).

    Args:
        options: a ``LossOptions``; or its fields as keywords (``**option_overrides``).
        temperature: the sampling temperature (> 0).
        softcap: logit soft-capping (``None`` or a finite number > 0), as in ``fused_linear_policy_loss``.
        backend: for the row kernels, as in ``fused_linear_policy_loss``.

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

    def __init__(self, options: LossOptions | None = None, *, temperature: float = 1.0,
                 softcap: float | None = None, backend: str = "auto", **option_overrides) -> None:
        super().__init__()
        self.options = LossOptions.build(options, **option_overrides)
        self.temperature = check_temperature("temperature", temperature)
        check_softcap("softcap", softcap)
        self.softcap = softcap
        self.backend = check_backend(backend)

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
        rollout_logprobs: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Shapes as ``fused_linear_policy_loss``; returns ``(loss, metrics)``."""
        return fused_linear_policy_loss(
            hidden, lm_head_weight, targets, advantages, response_mask, bias=bias, temperature=self.temperature,
            old_logprobs=old_logprobs, ref_logprobs=ref_logprobs, rollout_logprobs=rollout_logprobs,
            options=self.options, softcap=self.softcap, backend=self.backend,
        )

    def extra_repr(self) -> str:
        fields = ", ".join(f"{name}={getattr(self.options, name)!r}" for name in _OPTION_NAMES)
        return f"{fields}, temperature={self.temperature}, softcap={self.softcap}, backend={self.backend!r}"
