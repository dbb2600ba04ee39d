"""Advantages for ReMax and its REINFORCE-family relatives, per sequence ``[B]`` or per token ``[B, T]``.

Every function first computes one score per sequence (ReMax: ``clip(r(sampled) - r(greedy))``; RLOO and GRPO: a
group baseline), then optionally spreads it over the response tokens with the same shaping code:

* no ``response_mask``: the per-sequence scores ``[B]`` are returned (broadcast them over the tokens yourself, or
  pass them to ``policy_loss``, which does);
* with ``response_mask`` ``[B, T]``: per-token advantages ``[B, T]``, zero outside the response. For each response
  token t of row b, with ``n_t`` = number of response tokens at positions >= t (1 at the last one),
  ``KL_t = kl_coef * token_kl[b, t]`` and ``score = score[b]``::

      kl_mode="one-step":  A_t = -KL_t + gamma**n_t * score
      kl_mode="sum":       A_t = -sum_{s >= t, s in response} gamma**(n_t - n_s) * KL_s + gamma**n_t * score

  "one-step" with ``gamma=0.99, clip_reward=5`` is the official ReMax code (liziniu/ReMax ``compute_returns``: each
  token carries only its own KL, and the clipped reward difference is multiplied by gamma once per token walked
  back from the end, *including* the last token, so the last token gets ``gamma * score``). "sum" with
  ``gamma=1`` is verl's ``compute_remax_outcome_advantage`` with KL in the reward (return-to-go: ``reverse cumsum``
  of the KL-shaped token rewards minus the greedy reward); with ``gamma < 1`` it is the discounted return-to-go of
  the same token rewards, the sequence score arriving one step after the last token as in the official code.

Advantages are constants for the policy gradient: every function runs under ``torch.no_grad`` and returns
detached tensors in float32 (float64 if the rewards are float64).
"""

from __future__ import annotations

import torch

from remax_kernels._validate import check_float, check_number, check_same_device, check_tensor, value_checks_enabled

KL_MODES = ("sum", "one-step")
_REWARD_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_MASK_DTYPES = (torch.bool, torch.uint8, torch.int8, torch.int32, torch.int64, torch.float32, torch.float16,
                torch.bfloat16, torch.float64)
# verl's masked_whiten adds this inside the rsqrt; kept identical so whitened advantages match verl's.
_WHITEN_EPS = 1e-8


def _check_rewards(name: str, rewards, batch: int | None = None) -> torch.Tensor:
    check_float(name, rewards, _REWARD_DTYPES)
    if rewards.dim() != 1:
        raise ValueError(f"{name}: expected a 1-D tensor [B] (one reward per sequence), got {tuple(rewards.shape)}")
    if batch is not None and rewards.shape[0] != batch:
        raise ValueError(f"{name}: has {rewards.shape[0]} rewards but the batch has {batch} (shape mismatch)")
    if value_checks_enabled(rewards.device):
        n_bad = int((~torch.isfinite(rewards)).sum())
        if n_bad:
            raise ValueError(f"{name}: {n_bad} NaN/inf values; rewards must be finite")
    return rewards


def _check_group_size(group_size, batch: int) -> int:
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        raise TypeError(f"group_size: expected an int, got {type(group_size).__name__}")
    if group_size < 2:
        raise ValueError(f"group_size: must be >= 2 (a group needs other samples for its baseline), got {group_size}")
    if batch % group_size:
        raise ValueError(f"group_size: {group_size} does not divide the batch size {batch}")
    return group_size


def _result_dtype(rewards: torch.Tensor) -> torch.dtype:
    return torch.float64 if rewards.dtype == torch.float64 else torch.float32


def _shape_and_whiten(
    score: torch.Tensor,
    *,
    response_mask,
    token_kl,
    kl_coef: float,
    gamma: float,
    kl_mode: str,
    whiten: bool,
) -> torch.Tensor:
    """Spread per-sequence ``score [B]`` over the response tokens (see the module docstring) and optionally whiten."""
    kl_coef = check_number("kl_coef", kl_coef)
    gamma = check_number("gamma", gamma)
    if not (kl_coef >= 0 and kl_coef != float("inf")):
        raise ValueError(f"kl_coef: must be a finite number >= 0, got {kl_coef!r}")
    if not 0 < gamma <= 1:
        raise ValueError(f"gamma: must be in (0, 1], got {gamma!r}")
    if kl_mode not in KL_MODES:
        raise ValueError(f"kl_mode: must be one of {KL_MODES}, got {kl_mode!r}")
    if not isinstance(whiten, bool):
        raise TypeError(f"whiten: expected a bool, got {type(whiten).__name__}")
    batch = score.shape[0]

    if response_mask is None:
        if token_kl is not None or kl_coef != 0 or gamma != 1:
            raise ValueError(
                "response_mask: is required for per-token shaping (token_kl, kl_coef != 0 or gamma != 1 were given)"
            )
        return _whiten(score, None) if whiten else score

    check_tensor("response_mask", response_mask)
    if response_mask.dtype not in _MASK_DTYPES:
        raise TypeError(f"response_mask: dtype must be bool, integer or float, got {response_mask.dtype}")
    if response_mask.dim() != 2 or response_mask.shape[0] != batch:
        raise ValueError(
            f"response_mask: expected shape [B, T] with B = {batch} (the rewards), got {tuple(response_mask.shape)}"
        )
    if token_kl is not None:
        check_float("token_kl", token_kl, _REWARD_DTYPES)
        if tuple(token_kl.shape) != tuple(response_mask.shape):
            raise ValueError(
                f"token_kl: shape {tuple(token_kl.shape)} does not match response_mask {tuple(response_mask.shape)}"
            )
    check_same_device(rewards=score, response_mask=response_mask, token_kl=token_kl)
    valid = response_mask != 0
    m = valid.to(score.dtype)
    if kl_coef != 0 and token_kl is None:
        raise ValueError(f"token_kl: is required when kl_coef != 0 (kl_coef={kl_coef})")

    # n_t: response tokens at positions >= t; the reward is discounted once per token walked back from the end.
    n_from_t = m.flip(-1).cumsum(-1).flip(-1)
    if gamma == 1:
        adv = score[:, None] * m
    else:
        adv = torch.pow(gamma, n_from_t) * score[:, None] * m

    if token_kl is not None:
        # Positions outside the response may hold padding garbage; only response tokens must be finite.
        kl = torch.where(valid, token_kl.to(score.dtype), torch.zeros((), dtype=score.dtype, device=score.device))
        if value_checks_enabled(kl.device):
            n_bad = int((~torch.isfinite(kl)).sum())
            if n_bad:
                raise ValueError(f"token_kl: {n_bad} NaN/inf values at response tokens")
        kl_reward = -kl_coef * kl
        if kl_mode == "one-step":
            adv = adv + kl_reward
        elif gamma == 1:
            adv = adv + kl_reward.flip(-1).cumsum(-1).flip(-1) * m
        else:
            adv = adv + _discounted_return_to_go(kl_reward, valid, gamma)

    return _whiten(adv, valid) if whiten else adv


def _discounted_return_to_go(reward: torch.Tensor, valid: torch.Tensor, gamma: float) -> torch.Tensor:
    """G_t = reward_t + gamma * G_(next response token), zero outside the response.

    A loop over T (small [B] ops): a closed form via gamma**(-position) rescaling overflows for long responses.
    """
    out = torch.zeros_like(reward)
    running = torch.zeros_like(reward[:, 0])
    for t in range(reward.shape[1] - 1, -1, -1):
        running = torch.where(valid[:, t], reward[:, t] + gamma * running, running)
        out[:, t] = torch.where(valid[:, t], running, torch.zeros_like(running))
    return out


def _whiten(x: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """(x - mean) / sqrt(var + 1e-8) over all values (or the masked ones), unbiased variance as verl; 0 off-mask."""
    if valid is None:
        values, count = x, x.numel()
    else:
        values, count = x[valid], int(valid.sum())
    if count < 2:
        raise ValueError(f"whiten: needs at least 2 values to estimate a variance, got {count}")
    mean = values.mean()
    var = ((values - mean) ** 2).sum() / (count - 1)
    out = (x - mean) * torch.rsqrt(var + _WHITEN_EPS)
    return out if valid is None else out * valid.to(x.dtype)


def _clip_score(score: torch.Tensor, clip_reward: float | None) -> torch.Tensor:
    if clip_reward is None:
        return score
    clip_reward = check_number("clip_reward", clip_reward)
    if not clip_reward > 0:
        raise ValueError(f"clip_reward: must be > 0 or None, got {clip_reward!r}")
    return score.clamp(-clip_reward, clip_reward)


@torch.no_grad()
def remax_advantages(
    sampled_rewards: torch.Tensor,
    greedy_rewards: torch.Tensor,
    *,
    response_mask: torch.Tensor | None = None,
    token_kl: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    gamma: float = 1.0,
    clip_reward: float | None = None,
    kl_mode: str = "sum",
    whiten: bool = False,
) -> torch.Tensor:
    """ReMax advantages: the greedy response's reward is the baseline of the sampled one.

    ``score = clip(sampled_rewards - greedy_rewards, -clip_reward, clip_reward)`` (no clipping when ``clip_reward``
    is None), then spread over the response tokens as described in this module's docstring.

    Args:
        sampled_rewards: ``[B]`` float, reward-model scores of the sampled responses (finite).
        greedy_rewards: ``[B]`` float, scores of the greedy responses to the same prompts.
        response_mask: optional ``[B, T]`` (bool / 0-1 values), 1 at response tokens. When given the result is
            per-token ``[B, T]`` (0 outside the response); else per-sequence ``[B]``.
        token_kl: optional ``[B, T]`` per-token KL estimate from rollout time, e.g. ``old_logprobs - ref_logprobs``
            (k1, as the official code and verl's ``use_kl_in_reward``); values outside the response are ignored.
        kl_coef: KL penalty coefficient beta >= 0 (needs ``token_kl``).
        gamma: discount in (0, 1]; the official ReMax code uses 0.99, verl 1.0.
        clip_reward: clamp the reward *difference* to ``[-clip_reward, clip_reward]`` (official code: 5.0).
        kl_mode: ``"sum"`` (KL summed from t to the end, verl) or ``"one-step"`` (own KL only, official ReMax).
        whiten: subtract the mean and divide by the (unbiased) std over all returned values (response tokens only
            for ``[B, T]``), with verl's ``rsqrt(var + 1e-8)``; applied last.

    Returns:
        float32 (float64 for float64 rewards) ``[B]`` or ``[B, T]``, detached.

    Example (official ReMax settings)::

        >>> r, r_greedy = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 4.0])
        >>> remax_advantages(r, r_greedy, clip_reward=5.0)
        tensor([ 0.5000, -5.0000])
        >>> mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
        >>> kl = torch.full((2, 3), 0.1)
        >>> remax_advantages(r, r_greedy, response_mask=mask, token_kl=kl, kl_coef=0.1, gamma=0.99,
        ...                  clip_reward=5.0, kl_mode="one-step")
        tensor([[ 0.4801,  0.4850,  0.0000],
                [-4.8615, -4.9105, -4.9600]])
    """
    _check_rewards("sampled_rewards", sampled_rewards)
    _check_rewards("greedy_rewards", greedy_rewards, sampled_rewards.shape[0])
    check_same_device(sampled_rewards=sampled_rewards, greedy_rewards=greedy_rewards)
    dtype = _result_dtype(sampled_rewards)
    score = sampled_rewards.to(dtype) - greedy_rewards.to(dtype)
    score = _clip_score(score, clip_reward)
    return _shape_and_whiten(
        score, response_mask=response_mask, token_kl=token_kl, kl_coef=kl_coef, gamma=gamma, kl_mode=kl_mode,
        whiten=whiten,
    )


@torch.no_grad()
def reinforce_advantages(
    rewards: torch.Tensor,
    *,
    response_mask: torch.Tensor | None = None,
    token_kl: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    gamma: float = 1.0,
    clip_reward: float | None = None,
    kl_mode: str = "sum",
    whiten: bool = False,
) -> torch.Tensor:
    """Plain REINFORCE advantages (no baseline): ``score = clip(rewards)``, shaped like ``remax_advantages``.

    With ``whiten=True, kl_mode="sum"`` and a token KL this is REINFORCE++'s advantage (whitened return-to-go).

    Args:
        rewards: ``[B]`` float, finite. Other arguments as in ``remax_advantages``.

    Returns:
        float32 ``[B]`` or ``[B, T]``, detached.

    Example::

        >>> reinforce_advantages(torch.tensor([1.0, 3.0]), whiten=True)
        tensor([-0.7071,  0.7071])
    """
    _check_rewards("rewards", rewards)
    score = rewards.to(_result_dtype(rewards))
    score = _clip_score(score, clip_reward)
    return _shape_and_whiten(
        score, response_mask=response_mask, token_kl=token_kl, kl_coef=kl_coef, gamma=gamma, kl_mode=kl_mode,
        whiten=whiten,
    )


@torch.no_grad()
def rloo_advantages(
    rewards: torch.Tensor,
    group_size: int,
    *,
    response_mask: torch.Tensor | None = None,
    token_kl: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    gamma: float = 1.0,
    kl_mode: str = "sum",
    whiten: bool = False,
) -> torch.Tensor:
    """RLOO: each sample's baseline is the mean reward of the *other* samples of its prompt.

    ``rewards`` holds ``B / group_size`` groups of ``group_size`` contiguous samples (prompt 0's samples first).
    ``score_i = r_i - mean_{j != i} r_j = k / (k - 1) * (r_i - mean_group)`` (verl's
    ``compute_rloo_outcome_advantage``), then shaped like ``remax_advantages``.

    Args:
        rewards: ``[B]`` float, finite.
        group_size: k >= 2 samples per prompt, dividing B.

    Returns:
        float32 ``[B]`` or ``[B, T]``, detached.

    Example::

        >>> rloo_advantages(torch.tensor([1.0, 2.0, 0.0, 4.0]), 2)
        tensor([-1.,  1., -4.,  4.])
    """
    _check_rewards("rewards", rewards)
    k = _check_group_size(group_size, rewards.shape[0])
    r = rewards.to(_result_dtype(rewards)).view(-1, k)
    score = ((r - r.mean(dim=1, keepdim=True)) * (k / (k - 1))).reshape(-1)
    return _shape_and_whiten(
        score, response_mask=response_mask, token_kl=token_kl, kl_coef=kl_coef, gamma=gamma, kl_mode=kl_mode,
        whiten=whiten,
    )


@torch.no_grad()
def grpo_advantages(
    rewards: torch.Tensor,
    group_size: int,
    *,
    eps: float = 1e-6,
    scale: bool = True,
    response_mask: torch.Tensor | None = None,
    token_kl: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    gamma: float = 1.0,
    kl_mode: str = "sum",
    whiten: bool = False,
) -> torch.Tensor:
    """GRPO: rewards normalized within each prompt's group.

    ``score_i = (r_i - mean_group) / (std_group + eps)`` with the unbiased std (verl's
    ``compute_grpo_outcome_advantage``); ``scale=False`` drops the division (Dr. GRPO). Groups are ``group_size``
    contiguous samples. Then shaped like ``remax_advantages``.

    Args:
        rewards: ``[B]`` float, finite.
        group_size: k >= 2 samples per prompt, dividing B.
        eps: added to the group std (> 0).
        scale: divide by the group std.

    Returns:
        float32 ``[B]`` or ``[B, T]``, detached.

    Example::

        >>> grpo_advantages(torch.tensor([1.0, 3.0, 5.0, 5.0]), 2)
        tensor([-0.7071,  0.7071,  0.0000,  0.0000])
    """
    _check_rewards("rewards", rewards)
    k = _check_group_size(group_size, rewards.shape[0])
    eps = check_number("eps", eps)
    if not eps > 0:
        raise ValueError(f"eps: must be > 0, got {eps!r}")
    if not isinstance(scale, bool):
        raise TypeError(f"scale: expected a bool, got {type(scale).__name__}")
    r = rewards.to(_result_dtype(rewards)).view(-1, k)
    score = r - r.mean(dim=1, keepdim=True)
    if scale:
        score = score / (r.std(dim=1, keepdim=True) + eps)
    return _shape_and_whiten(
        score.reshape(-1), response_mask=response_mask, token_kl=token_kl, kl_coef=kl_coef, gamma=gamma,
        kl_mode=kl_mode, whiten=whiten,
    )
