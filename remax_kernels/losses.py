"""The ReMax / REINFORCE / PPO-clip policy loss on per-token log-probs ``[B, T]``.

Per response token t (``A`` = advantage, ``logp`` = current log-prob, ``old``/``ref`` = behaviour/reference
log-probs, all constants except ``logp`` and ``entropy``)::

    REINFORCE (old_logprobs=None):   pg_t = -A_t * logp_t                  gradient -A_t * grad logp_t (ReMax)
    importance ratio:                r_t  = exp(clamp(logp_t - old_t, -20, 20))
    PPO (clip_ratio=eps):            pg_t = max(-A_t r_t, -A_t clip(r_t, 1 - eps_low, 1 + eps_high))
    dual clip (clip_ratio_c=c):      pg_t = min(pg_t, -A_t c) where A_t < 0
    L_t = pg_t + kl_coef * KL_t(logp_t, ref_t) - entropy_coef * entropy_t

KL estimators (Schulman's k1/k2/k3, verl's ``kl_penalty``; d = logp - ref)::

    k1 = d        k2 = d**2 / 2        k3 = clamp(exp(-d') + d' - 1, -10, 10),  d' = clamp(d, -20, 20)

The per-token losses are aggregated over the response tokens (mask m) as verl's ``agg_loss``::

    "token-mean"              sum(L m) / sum(m)                                  (official ReMax, verl default)
    "seq-mean-token-sum"      (1/B) sum_b sum_t L m
    "seq-mean-token-mean"     (1/B) sum_b [sum_t L m / sum_t m]
    "seq-mean-token-sum-norm" sum(L m) / norm, norm = loss_agg_norm or T          (Dr. GRPO)

Rows without response tokens add 0 (and still count in the 1/B of the seq-mean modes, as in verl); a batch with no
response tokens at all gives loss 0 with zero, finite gradients. Values at masked positions are never read into
the loss, so padding may hold anything (NaN included).
"""

from __future__ import annotations

import torch

from remax_kernels._validate import check_float, check_same_device, check_tensor

LOSS_AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
KL_ESTIMATORS = ("k1", "k2", "k3")
# verl's names for the same estimators, accepted so its configs can be passed through unchanged.
_KL_ALIASES = {"kl": "k1", "mse": "k2", "low_var_kl": "k3"}
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_MASK_DTYPES = (torch.bool, torch.uint8, torch.int8, torch.int32, torch.int64, torch.float32, torch.float16,
                torch.bfloat16, torch.float64)
# Bounds from verl: exp(20) ~ 4.9e8 keeps ratios finite in fp32 whatever the log-prob gap.
_LOG_RATIO_CLAMP = 20.0
_K3_CLAMP = 10.0


def check_loss_options(
    *,
    clip_ratio,
    clip_ratio_c,
    kl_coef,
    kl_estimator,
    entropy_coef,
    loss_agg_mode,
    loss_agg_norm,
) -> dict:
    """Validate the loss options shared by ``policy_loss``, ``fused_linear_policy_loss`` and ``ReMaxLoss``.

    Returns them normalized: ``clip_ratio`` as ``(low, high)`` or None, floats, canonical ``kl_estimator`` name.
    """
    if clip_ratio is not None:
        low, high = clip_ratio if isinstance(clip_ratio, (tuple, list)) else (clip_ratio, clip_ratio)
        low, high = float(low), float(high)
        if not (0 < low < 1 and high > 0):
            raise ValueError(f"clip_ratio: needs eps in (0, 1) or a pair (low in (0, 1), high > 0), got {clip_ratio!r}")
        clip_ratio = (low, high)
    if clip_ratio_c is not None:
        clip_ratio_c = float(clip_ratio_c)
        if not clip_ratio_c > 1:
            raise ValueError(f"clip_ratio_c: the dual-clip bound must be > 1, got {clip_ratio_c!r}")
    kl_coef, entropy_coef = float(kl_coef), float(entropy_coef)
    for name, value in (("kl_coef", kl_coef), ("entropy_coef", entropy_coef)):
        if value != value or abs(value) == float("inf"):
            raise ValueError(f"{name}: must be finite, got {value!r}")
    if not isinstance(kl_estimator, str) or _KL_ALIASES.get(kl_estimator, kl_estimator) not in KL_ESTIMATORS:
        raise ValueError(
            f"kl_estimator: must be one of {KL_ESTIMATORS} (or verl's {tuple(_KL_ALIASES)}), got {kl_estimator!r}"
        )
    if loss_agg_mode not in LOSS_AGG_MODES:
        raise ValueError(f"loss_agg_mode: must be one of {LOSS_AGG_MODES}, got {loss_agg_mode!r}")
    if loss_agg_norm is not None:
        if loss_agg_mode != "seq-mean-token-sum-norm":
            raise ValueError(
                f"loss_agg_norm: only used by loss_agg_mode='seq-mean-token-sum-norm', got mode {loss_agg_mode!r}"
            )
        loss_agg_norm = float(loss_agg_norm)
        if not (loss_agg_norm > 0 and loss_agg_norm != float("inf")):
            raise ValueError(f"loss_agg_norm: must be a finite number > 0, got {loss_agg_norm!r}")
    return dict(
        clip_ratio=clip_ratio,
        clip_ratio_c=clip_ratio_c,
        kl_coef=kl_coef,
        kl_estimator=_KL_ALIASES.get(kl_estimator, kl_estimator),
        entropy_coef=entropy_coef,
        loss_agg_mode=loss_agg_mode,
        loss_agg_norm=loss_agg_norm,
    )


def check_required_inputs(opts: dict, *, has_old: bool, has_ref: bool, has_entropy: bool) -> None:
    """The tensors that the (normalized) options need must be given."""
    if not has_old and (opts["clip_ratio"] is not None or opts["clip_ratio_c"] is not None):
        raise ValueError("old_logprobs: is required when clip_ratio or clip_ratio_c is set (the ratio needs it)")
    if opts["kl_coef"] != 0 and not has_ref:
        raise ValueError(f"ref_logprobs: is required when kl_coef != 0 (kl_coef={opts['kl_coef']})")
    if opts["entropy_coef"] != 0 and not has_entropy:
        raise ValueError(f"entropy: is required when entropy_coef != 0 (entropy_coef={opts['entropy_coef']})")


def kl_estimate(logp: torch.Tensor, ref: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token KL(pi || ref) estimate from sampled-token log-probs; ``estimator`` in k1/k2/k3 (see module doc)."""
    d = logp - ref
    if estimator == "k1":
        return d
    if estimator == "k2":
        return 0.5 * d * d
    neg = (-d).clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
    return (torch.exp(neg) - neg - 1).clamp(-_K3_CLAMP, _K3_CLAMP)


def _check_token_tensor(name: str, t, shape: tuple) -> torch.Tensor:
    check_float(name, t, _FLOAT_DTYPES)
    if tuple(t.shape) != shape:
        raise ValueError(f"{name}: shape {tuple(t.shape)} does not match logprobs {shape}")
    return t


def policy_loss(
    logprobs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    old_logprobs: torch.Tensor | None = None,
    clip_ratio: float | tuple[float, float] | None = None,
    clip_ratio_c: float | None = None,
    ref_logprobs: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    entropy: torch.Tensor | None = None,
    entropy_coef: float = 0.0,
    loss_agg_mode: str = "token-mean",
    loss_agg_norm: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Policy-gradient loss (ReMax/REINFORCE, optionally PPO-clipped) with KL and entropy terms; see the module doc.

    Args:
        logprobs: ``[B, T]`` float, log pi(a_t) of the taken tokens under the current policy (requires grad).
        advantages: ``[B]`` (broadcast over tokens) or ``[B, T]`` float, finite; treated as constants.
        response_mask: ``[B, T]`` bool or 0/1 values; 1 at response tokens. Non-binary values act as token weights.
        old_logprobs: ``[B, T]`` behaviour-policy log-probs (constants); enables the importance ratio. Needed by
            ``clip_ratio`` and ``clip_ratio_c``. Passing ``logprobs.detach()`` gives exactly the REINFORCE gradient.
        clip_ratio: PPO clip eps, or ``(eps_low, eps_high)`` (clip-higher); None = no clipping.
        clip_ratio_c: dual-clip bound c > 1 for negative advantages (verl uses 3.0); None = off.
        ref_logprobs: ``[B, T]`` reference-policy log-probs (constants), for the KL term and the ``kl`` metric.
        kl_coef: weight of the KL loss term (needs ``ref_logprobs``).
        kl_estimator: ``"k1"``, ``"k2"`` or ``"k3"`` (verl's ``"kl"``, ``"mse"``, ``"low_var_kl"`` also accepted).
        entropy: ``[B, T]`` per-token entropy of the current policy (may require grad), for the bonus and metric.
        entropy_coef: weight of the entropy bonus (subtracted from the loss; needs ``entropy``).
        loss_agg_mode: one of ``LOSS_AGG_MODES`` (formulas in the module doc).
        loss_agg_norm: the constant divisor of ``"seq-mean-token-sum-norm"`` (default T).

    Returns:
        ``(loss, metrics)``: loss is a float32 0-d tensor (float64 for float64 logprobs); metrics maps names to
        detached 0-d tensors of that dtype
        (no device sync), all token means over the response: ``pg_loss`` (the policy-gradient part, aggregated
        like the loss), ``logprob_mean``, ``adv_mean``, ``adv_std`` (population std), ``response_tokens``; plus
        ``kl`` (with ``ref_logprobs``), ``entropy`` (with ``entropy``), ``ppo_kl`` (mean old - logp) with
        ``old_logprobs``, ``clip_frac`` with ``clip_ratio``, ``clip_frac_lower`` with ``clip_ratio_c``.

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
    batch, seq_len = shape
    check_tensor("response_mask", response_mask)
    if response_mask.dtype not in _MASK_DTYPES:
        raise TypeError(f"response_mask: dtype must be bool, integer or float, got {response_mask.dtype}")
    if tuple(response_mask.shape) != shape:
        raise ValueError(f"response_mask: shape {tuple(response_mask.shape)} does not match logprobs {shape}")
    check_float("advantages", advantages, _FLOAT_DTYPES)
    if tuple(advantages.shape) not in ((batch,), shape):
        raise ValueError(
            f"advantages: shape {tuple(advantages.shape)} does not match logprobs {shape}: expected [B] or [B, T]"
        )
    for name, t in (("old_logprobs", old_logprobs), ("ref_logprobs", ref_logprobs), ("entropy", entropy)):
        if t is not None:
            _check_token_tensor(name, t, shape)
    check_same_device(
        logprobs=logprobs, advantages=advantages, response_mask=response_mask, old_logprobs=old_logprobs,
        ref_logprobs=ref_logprobs, entropy=entropy,
    )
    opts = check_loss_options(
        clip_ratio=clip_ratio, clip_ratio_c=clip_ratio_c, kl_coef=kl_coef, kl_estimator=kl_estimator,
        entropy_coef=entropy_coef, loss_agg_mode=loss_agg_mode, loss_agg_norm=loss_agg_norm,
    )
    check_required_inputs(
        opts, has_old=old_logprobs is not None, has_ref=ref_logprobs is not None, has_entropy=entropy is not None
    )
    # fp32 math whatever the input precision (float64 inputs stay float64, for references and tests).
    dtype = torch.float64 if logprobs.dtype == torch.float64 else torch.float32
    valid = response_mask != 0
    weight = response_mask.to(dtype)
    zero = torch.zeros((), dtype=dtype, device=logprobs.device)

    # Every input is zeroed off the response *before* any math, so padding garbage (NaN, -inf) can reach neither
    # the loss nor, through 0 * NaN in the backward, the gradient.
    def on_response(t: torch.Tensor) -> torch.Tensor:
        return torch.where(valid, t.to(dtype), zero)

    logp = on_response(logprobs)
    adv = advantages.detach()
    adv = on_response(adv[:, None].expand(shape) if adv.dim() == 1 else adv)
    n_bad = int((~torch.isfinite(adv)).sum())
    if n_bad:
        raise ValueError(f"advantages: {n_bad} NaN/inf values at response tokens; advantages must be finite")

    metrics: dict[str, torch.Tensor] = {}
    if old_logprobs is None:
        pg = -adv * logp
    else:
        old = on_response(old_logprobs.detach())
        log_ratio = (logp - old).clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
        ratio = torch.exp(log_ratio)
        pg = -adv * ratio
        metrics["ppo_kl"] = -log_ratio
        if opts["clip_ratio"] is not None:
            low, high = opts["clip_ratio"]
            pg_clipped = -adv * ratio.clamp(1 - low, 1 + high)
            metrics["clip_frac"] = (pg_clipped > pg).float()
            pg = torch.maximum(pg, pg_clipped)
        if opts["clip_ratio_c"] is not None:
            pg_lower = -adv * opts["clip_ratio_c"]
            metrics["clip_frac_lower"] = ((pg > pg_lower) & (adv < 0)).float()
            pg = torch.where(adv < 0, torch.minimum(pg, pg_lower), pg)

    loss_tok = pg
    if ref_logprobs is not None:
        kl = kl_estimate(logp, on_response(ref_logprobs.detach()), opts["kl_estimator"])
        metrics["kl"] = kl
        if opts["kl_coef"] != 0:
            loss_tok = loss_tok + opts["kl_coef"] * kl
    if entropy is not None:
        ent = on_response(entropy)
        metrics["entropy"] = ent
        if opts["entropy_coef"] != 0:
            loss_tok = loss_tok - opts["entropy_coef"] * ent

    loss = _aggregate(loss_tok, weight, opts["loss_agg_mode"], opts["loss_agg_norm"])

    with torch.no_grad():
        n_tokens = weight.sum()
        denom = torch.where(n_tokens > 0, n_tokens, torch.ones_like(n_tokens))

        def token_mean(t: torch.Tensor) -> torch.Tensor:
            return (t.detach() * weight).sum() / denom

        out = {
            "pg_loss": _aggregate(pg.detach(), weight, opts["loss_agg_mode"], opts["loss_agg_norm"]),
            "logprob_mean": token_mean(logp),
        }
        out.update({name: token_mean(value) for name, value in metrics.items()})
        adv_mean = token_mean(adv)
        out["adv_mean"] = adv_mean
        out["adv_std"] = token_mean((adv - adv_mean) ** 2).sqrt()
        out["response_tokens"] = n_tokens
    return loss, out


def _aggregate(loss_tok: torch.Tensor, weight: torch.Tensor, mode: str, norm: float | None) -> torch.Tensor:
    """Reduce masked per-token losses ``[B, T]`` to a scalar (formulas in the module doc); empty rows add 0."""
    weighted = loss_tok * weight
    if mode == "token-mean":
        n = weight.sum()
        return weighted.sum() / torch.where(n > 0, n, torch.ones_like(n))
    batch = max(loss_tok.shape[0], 1)
    if mode == "seq-mean-token-sum":
        return weighted.sum() / batch
    if mode == "seq-mean-token-mean":
        n = weight.sum(-1)
        return (weighted.sum(-1) / torch.where(n > 0, n, torch.ones_like(n))).sum() / batch
    return weighted.sum() / (norm if norm is not None else max(loss_tok.shape[1], 1))
