"""Float64 references for advantages and policy losses, written as plain loops that follow the reference code.

- ``ref_official_remax_returns``: the official ReMax ``compute_returns`` (liziniu/ReMax, remax_trainer.py): clip the
  reward difference, walk the response backwards multiplying it by gamma at every token (the last token included),
  add that token's own KL reward.
- ``ref_verl_remax_advantages``: verl's ReMax path: token rewards = score at the last response token minus
  beta * KL at every response token, return-to-go by a reverse cumulative sum, minus the greedy reward.
- ``ref_discounted_advantages``: the textbook recursion G_t = r_t + gamma * G_next over response tokens, with the
  sequence score arriving one step after the last token.
- ``ref_policy_loss``: per-token PPO/REINFORCE loss + KL + entropy and verl's (>= 0.8) ``agg_loss``,
  differentiable.
"""

from __future__ import annotations

import math

import torch


def _rows(mask):
    """Per row, the list of response positions (mask != 0)."""
    return [[t for t in range(mask.shape[1]) if mask[b, t] != 0] for b in range(mask.shape[0])]


def ref_official_remax_returns(sampled, greedy, mask, token_kl, *, kl_coef, gamma, clip_reward):
    out = torch.zeros(mask.shape, dtype=torch.float64)
    for b, positions in enumerate(_rows(mask)):
        cumulative_reward = max(-clip_reward, min(clip_reward, float(sampled[b]) - float(greedy[b])))
        for t in reversed(positions):
            cumulative_reward *= gamma
            out[b, t] = -kl_coef * float(token_kl[b, t]) + cumulative_reward
    return out


def ref_verl_remax_advantages(sampled, greedy, mask, token_kl, *, kl_coef):
    batch, seq_len = mask.shape
    out = torch.zeros(mask.shape, dtype=torch.float64)
    for b, positions in enumerate(_rows(mask)):
        rewards = [0.0] * seq_len
        for t in positions:
            rewards[t] -= kl_coef * float(token_kl[b, t])
        if positions:
            rewards[positions[-1]] += float(sampled[b])
        for t in positions:
            out[b, t] = sum(rewards[s] for s in range(t, seq_len) if mask[b, s] != 0) - float(greedy[b])
    return out


def ref_discounted_advantages(score, mask, token_kl, *, kl_coef, gamma, kl_mode):
    out = torch.zeros(mask.shape, dtype=torch.float64)
    for b, positions in enumerate(_rows(mask)):
        n = len(positions)
        for i, t in enumerate(positions):
            steps_to_end = n - i  # response tokens at positions >= t
            value = gamma**steps_to_end * float(score[b])
            if kl_mode == "one-step":
                value -= kl_coef * float(token_kl[b, t]) if token_kl is not None else 0.0
            elif token_kl is not None:
                value -= kl_coef * sum(gamma**j * float(token_kl[b, s]) for j, s in enumerate(positions[i:]))
            out[b, t] = value
    return out


def ref_whiten(values, mask=None):
    """(x - mean) / sqrt(unbiased var + 1e-8) over all values or the masked ones; 0 off the mask."""
    x = values.double()
    sel = [float(v) for v in x.flatten()] if mask is None else [float(x[i, j]) for i, j in (mask != 0).nonzero()]
    mean = sum(sel) / len(sel)
    var = sum((v - mean) ** 2 for v in sel) / (len(sel) - 1)
    out = (x - mean) / math.sqrt(var + 1e-8)
    return out if mask is None else out * (mask != 0).double()


def ref_rloo(rewards, k):
    r = [float(v) for v in rewards]
    out = []
    for i, v in enumerate(r):
        g = i // k
        others = [r[j] for j in range(g * k, g * k + k) if j != i]
        out.append(v - sum(others) / len(others))
    return torch.tensor(out, dtype=torch.float64)


def ref_grpo(rewards, k, *, eps=1e-6, scale=True):
    r = [float(v) for v in rewards]
    out = []
    for i, v in enumerate(r):
        group = r[(i // k) * k : (i // k) * k + k]
        mean = sum(group) / k
        std = math.sqrt(sum((x - mean) ** 2 for x in group) / (k - 1))
        out.append((v - mean) / (std + eps) if scale else v - mean)
    return torch.tensor(out, dtype=torch.float64)


def ref_kl(logp, ref, estimator):
    d = logp - ref
    if estimator == "k1":
        return d
    if estimator == "k2":
        return 0.5 * d**2
    x = torch.clamp(ref - logp, min=-20, max=20)
    return torch.clamp(torch.exp(x) - x - 1, min=-10, max=10)


def ref_policy_loss(
    logprobs,
    advantages,
    mask,
    *,
    old_logprobs=None,
    clip_ratio=None,
    clip_ratio_c=None,
    ref_logprobs=None,
    kl_coef=0.0,
    kl_estimator="k3",
    entropy=None,
    entropy_coef=0.0,
    loss_agg_mode="token-mean",
    loss_agg_norm=None,
    rollout_logprobs=None,
    rollout_is_cap=None,
):
    """float64 loss (0-d), differentiable in ``logprobs`` and ``entropy``. Inputs must be finite (no padding NaN)."""
    logp = logprobs.double()
    m = mask.double()
    adv = advantages.detach().double()
    if adv.dim() == 1:
        adv = adv[:, None].expand_as(logp)
    if old_logprobs is None:
        loss = -adv * logp
    else:
        ratio = torch.exp(torch.clamp(logp - old_logprobs.detach().double(), min=-20, max=20))
        loss = -adv * ratio
        if clip_ratio is not None:
            low, high = clip_ratio if isinstance(clip_ratio, tuple) else (clip_ratio, clip_ratio)
            loss = torch.maximum(loss, -adv * torch.clamp(ratio, 1 - low, 1 + high))
        if clip_ratio_c is not None:
            loss = torch.where(adv < 0, torch.minimum(loss, -adv * clip_ratio_c), loss)
    if rollout_is_cap is not None:  # truncated importance sampling: a constant weight per token
        weight = torch.exp(torch.clamp(logp.detach() - rollout_logprobs.double(), min=-20, max=20))
        loss = loss * torch.clamp(weight, max=rollout_is_cap)
    if ref_logprobs is not None and kl_coef:
        loss = loss + kl_coef * ref_kl(logp, ref_logprobs.detach().double(), kl_estimator)
    if entropy is not None and entropy_coef:
        loss = loss - entropy_coef * entropy.double()

    batch, seq_len = logp.shape
    row_sums = [sum(loss[b, t] * m[b, t] for t in range(seq_len)) for b in range(batch)]
    row_counts = [float(m[b].sum()) for b in range(batch)]
    zero = logp.new_zeros(())
    if loss_agg_mode == "token-mean":
        total = sum(row_counts)
        return sum(row_sums, zero) / total if total > 0 else sum(row_sums, zero) * 0.0
    if loss_agg_mode == "seq-mean-token-sum":
        return sum(row_sums, zero) / batch
    if loss_agg_mode == "seq-mean-token-mean":
        return sum((s / c for s, c in zip(row_sums, row_counts, strict=True) if c > 0), zero) / batch
    if loss_agg_mode == "seq-mean-token-sum-norm":  # verl >= 0.8: per-sequence sums / norm, then the batch mean
        return sum(row_sums, zero) / (batch * (loss_agg_norm if loss_agg_norm is not None else seq_len))
    raise ValueError(loss_agg_mode)
