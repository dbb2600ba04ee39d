"""Sampled-only rollouts for the estimators that need no greedy response (PPO, REINFORCE, RLOO, GRPO).

``remax_kernels.generate_pairs`` decodes a sampled and a greedy response per prompt (``2B`` rows per step); only
ReMax uses the greedy half. ``generate_samples`` decodes the ``B`` sampled rows alone, with the same pieces: the
model's forward with a ``DynamicCache`` and one ``sample_and_greedy`` call per step (every row sampled), seeded per
row by ``(seed[i], step)``. A row's response is therefore the sampled half of ``generate_pairs`` with the same seeds
(``tests/test_ppo.py`` checks it token for token), so an estimator's rollout costs what it needs and no more, and
comparisons between estimators time the same sampling.

It reuses ``remax_kernels.generation``'s small helpers for the model call (the cache keyword and ``cache_position``
differ across transformers versions) rather than restating them; a ``greedy=False`` switch in ``generate_pairs``
would replace this module.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SampledRollout:
    """``generate_samples``' output for ``B`` prompts of padded length ``P`` and ``R`` decoding steps; the same
    fields and meanings as the sampled half of ``remax_kernels.PairedRollout``.

    Attributes:
        sampled_ids: ``[B, P + R]`` int64, prompt then response; ``pad_token_id`` after a row's EOS.
        sampled_attention_mask: ``[B, P + R]``, the prompt's mask then the response mask (the prompt mask's dtype).
        sampled_response_mask: ``[B, R]``, 1 at generated tokens up to and including EOS.
        sampled_logprobs: ``[B, R]`` float32, log-prob of each token under the distribution it was drawn from.
        sampled_lengths: ``[B]`` int64, generated tokens per row including EOS.
        prompt_length: ``P``.
    """

    sampled_ids: torch.Tensor
    sampled_attention_mask: torch.Tensor
    sampled_response_mask: torch.Tensor
    sampled_logprobs: torch.Tensor
    sampled_lengths: torch.Tensor
    prompt_length: int


@torch.no_grad()
def generate_samples(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    eos_token_id: int,
    pad_token_id: int,
    seed: torch.Tensor,
    check_every: int = 4,
) -> SampledRollout:
    """One sampled response per prompt: ``generate_pairs``' sampled half without decoding the greedy half.

    Args:
        model: a Hugging Face causal LM; put in eval mode while generating, its ``training`` flag restored after.
        input_ids: ``[B, P]`` int64 prompt tokens, left-padded, on the model's device.
        attention_mask: ``[B, P]`` 0/1, 0 at left padding.
        max_new_tokens: the most tokens per response (>= 1).
        temperature, top_k, top_p, min_p: the sampling distribution, as in ``generate_pairs``.
        eos_token_id, pad_token_id: a row stops after EOS; later positions hold ``pad_token_id``.
        seed: ``[B]`` int64, one seed per prompt (row ``i``'s noise at step ``t`` depends on ``(seed[i], t)`` only).
        check_every: the host checks every this many steps whether all rows finished (one device sync each).

    Returns:
        a ``SampledRollout``.
    """
    from transformers import DynamicCache

    from remax_kernels import sample_and_greedy
    from remax_kernels.generation import _check_prompts, _forward_kwargs, _last_logits
    from remax_kernels.hf import position_ids_from_attention_mask

    _check_prompts(input_ids, attention_mask)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: expected an int >= 1, got {max_new_tokens!r}")
    batch, prompt_length = input_ids.shape
    if not isinstance(seed, torch.Tensor) or seed.dtype != torch.int64 or tuple(seed.shape) != (batch,):
        raise ValueError(f"seed: expected an int64 tensor of shape [B] = ({batch},)")
    device = input_ids.device
    mask = attention_mask.long()
    position = position_ids_from_attention_mask(mask)
    fwd = _forward_kwargs(model)
    sample = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, seed=seed.to(device))
    no_greedy = torch.zeros(batch, dtype=torch.bool, device=device)
    eos = torch.tensor([eos_token_id], dtype=torch.int64, device=device)
    tokens = torch.full((batch, max_new_tokens), pad_token_id, dtype=torch.int64, device=device)
    logprobs = torch.zeros((batch, max_new_tokens), dtype=torch.float32, device=device)
    alive = torch.zeros((batch, max_new_tokens), dtype=torch.bool, device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)

    was_training = model.training
    model.eval()
    try:
        cache = DynamicCache(config=model.config)
        logits = _last_logits(model, fwd, cache, input_ids, mask, position,
                              torch.arange(prompt_length, device=device))
        position = position[:, -1:]
        for t in range(max_new_tokens):
            if t:
                if t % check_every == 0 and bool(finished.all()):
                    break
                mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=1)
                position = position + 1
                slot = torch.full((1,), prompt_length + t - 1, dtype=torch.int64, device=device)
                logits = _last_logits(model, fwd, cache, tokens[:, t - 1 : t], mask, position, slot)
            token, logp = sample_and_greedy(logits, no_greedy, step=t, **sample)
            tokens[:, t] = torch.where(finished, pad_token_id, token)
            logprobs[:, t] = logp.masked_fill(finished, 0.0)
            alive[:, t] = ~finished
            finished = finished | torch.isin(tokens[:, t], eos)
    finally:
        model.train(was_training)
    steps = int(alive.any(0).nonzero().max()) + 1
    tokens, logprobs, alive = tokens[:, :steps], logprobs[:, :steps], alive[:, :steps]
    response_mask = alive.to(attention_mask.dtype)
    return SampledRollout(
        sampled_ids=torch.cat([input_ids.long(), tokens], dim=1),
        sampled_attention_mask=torch.cat([attention_mask, response_mask], dim=1),
        sampled_response_mask=response_mask,
        sampled_logprobs=logprobs,
        sampled_lengths=alive.sum(-1),
        prompt_length=prompt_length,
    )
