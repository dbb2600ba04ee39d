"""PPO's pieces beside the policy loss: the value model, per-token rewards, GAE, whitening and the clipped value loss.

The policy's PPO-clip loss is ``remax_kernels``' fused loss with ``old_logprobs`` and the clip options of
``TrainConfig.loss_options()``; this module holds what a critic adds. Per response token ``t`` of a row with
sequence score ``s`` (the clipped reward), last response token ``T`` and values ``V_t`` (the value of the state
that predicts token ``t``, i.e. the same hidden state as its log-prob)::

    r_t     = -kl_coef * KL_t + [t == T] * s              (KL only with kl_penalty='reward', as for ReMax)
    delta_t = r_t + gamma * V_(t+1) - V_t                 (V_(T+1) = 0)
    A_t     = delta_t + gamma * lambda * A_(t+1)          (GAE; returns G_t = A_t + V_t)
    A       = (A - mean(A)) / sqrt(var(A) + 1e-8)         (over every response token of the batch, all ranks)
    L_V     = token-mean 0.5 * max((V - G)^2, (V_old + clip(V - V_old, -c, c) - G)^2)

as TRL, verl, OpenRLHF and DeepSpeed-Chat compute them (verl's masked whitening with its unbiased variance).

The value model is a causal LM's backbone with a scalar head ``Linear(H, 1)``: its outputs are ``[B, R]`` values,
never ``[tokens, vocab]`` logits, so it needs no fused op.
"""

from __future__ import annotations

import copy
import inspect

import torch
from torch import nn

from remax.distributed import DistInfo, all_reduce_sum
from remax.model import lora_config
from remax_kernels.advantages import _WHITEN_EPS  # verl's masked_whiten epsilon, as the library's whiten uses


class ValueModel(nn.Module):
    """``backbone`` (an HF transformer body ending with its final norm) and a scalar ``head`` ``Linear(H, 1)``.

    ``forward(input_ids [B, L], attention_mask [B, L], response_width=R)`` returns float32 values ``[B, R]``: entry
    ``t`` is the value of the state that predicts token ``L - R + t`` (the hidden state at ``L - R - 1 + t``), the
    same alignment as ``remax_kernels.hf.causal_lm_logprobs`` with a ``[B, R]`` response mask. Positions come from
    the attention mask (left padding skipped), as in generation.
    """

    def __init__(self, backbone: nn.Module, head: nn.Linear):
        super().__init__()
        if not isinstance(head, nn.Linear) or head.out_features != 1:
            raise ValueError(f"value_model: the value head must be a Linear(H, 1), got {head}")
        self.backbone = backbone
        self.head = head
        self._takes_positions = "position_ids" in inspect.signature(backbone.forward).parameters

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, response_width: int) -> torch.Tensor:
        from remax_kernels.hf import position_ids_from_attention_mask

        seq_len = input_ids.shape[1]
        if not 1 <= response_width <= seq_len - 1:
            raise ValueError(f"response_width: must be in [1, L - 1] = [1, {seq_len - 1}], got {response_width}")
        mask = attention_mask.long()
        kwargs = {"use_cache": False}
        if self._takes_positions:
            kwargs["position_ids"] = position_ids_from_attention_mask(mask)
        hidden = self.backbone(input_ids=input_ids, attention_mask=mask, **kwargs).last_hidden_state
        # Only the response window goes through the head: [B, R, H] -> [B, R].
        hidden = hidden[:, seq_len - 1 - response_width : seq_len - 1]
        return self.head(hidden.to(self.head.weight.dtype)).squeeze(-1).float()


def _backbone_of(policy: nn.Module) -> nn.Module:
    """The policy's transformer body, found as the fused log-probs find it (``remax_kernels.hf``)."""
    from remax_kernels.hf import _backbone

    try:
        return _backbone(policy)
    except (TypeError, ValueError):
        raise ValueError(f"policy: cannot find the backbone of {type(policy).__name__} to copy as the value model; "
                         "give value_model: DIR") from None


def _zero_head(hidden_size: int) -> nn.Linear:
    # Zero-initialized: values start at 0, so the first advantages are the plain (whitened) rewards-to-go, with no
    # noise from a random head; the head's gradient is the hidden state, so it learns from the first update.
    head = nn.Linear(hidden_size, 1)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    return head


def value_model_from_policy(policy: nn.Module) -> ValueModel:
    """A ``ValueModel`` whose backbone is a deep copy of ``policy``'s (its weights as RL starts) with a zero scalar
    head; the policy's lm-head is not copied."""
    backbone = copy.deepcopy(_backbone_of(policy))
    hidden_size = policy.get_output_embeddings().weight.shape[1]
    return ValueModel(backbone.float(), _zero_head(hidden_size)).requires_grad_(True)


def load_value_model(path: str, *, attn_implementation: str = "sdpa") -> ValueModel:
    """A ``ValueModel`` from a local HF directory: a one-label sequence-classification model (e.g. a reward model)
    keeps its score head; a causal LM gets a zero head (its lm-head is dropped). float32."""
    import os

    from transformers import AutoModelForSequenceClassification

    from remax.model import no_hf_progress_bars

    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"value_model: {path!r} has no config.json: not a Hugging Face model directory")
    try:
        with no_hf_progress_bars():
            model, info = AutoModelForSequenceClassification.from_pretrained(
                path, num_labels=1, local_files_only=True, attn_implementation=attn_implementation,
                output_loading_info=True)
    except (OSError, ValueError, RuntimeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"value_model: cannot load {path!r} as a one-label value model: {first}") from None
    head = next((getattr(model, name) for name in ("score", "classifier") if hasattr(model, name)), None)
    if not isinstance(head, nn.Linear) or head.out_features != 1:
        raise ValueError(f"value_model: {type(model).__name__} has no Linear(H, 1) score head")
    missing = set(info.get("missing_keys", ()))
    if any(key.split(".")[0] in ("score", "classifier") for key in missing):
        head = _zero_head(head.in_features)  # a causal LM: no trained head
    return ValueModel(model.base_model.float(), head.float())


def apply_value_lora(value: ValueModel, config) -> ValueModel:
    """With ``config.lora_r > 0``: LoRA adapters in the value backbone (same targets as the policy's); only the
    adapters and the head train."""
    if not config.lora_r:
        return value
    lora = lora_config(config)
    from peft import inject_adapter_in_model

    value.backbone = inject_adapter_in_model(lora, value.backbone)
    for name, p in value.backbone.named_parameters():
        p.requires_grad_("lora_" in name)
    return value


@torch.no_grad()
def token_rewards(score: torch.Tensor, response_mask: torch.Tensor, *, token_kl: torch.Tensor | None = None,
                  kl_coef: float = 0.0) -> torch.Tensor:
    """Per-token rewards ``[B, R]``: ``-kl_coef * token_kl`` at response tokens plus ``score [B]`` at each row's last
    response token; 0 elsewhere. float32 (float64 for float64 scores)."""
    valid = response_mask != 0
    dtype = torch.float64 if score.dtype == torch.float64 else torch.float32
    count = valid.sum(-1, keepdim=True)
    last = valid & (valid.cumsum(-1) == count)
    rewards = torch.where(last, score.to(dtype)[:, None], torch.zeros((), dtype=dtype, device=score.device))
    if token_kl is not None and kl_coef:
        rewards = rewards - kl_coef * torch.where(valid, token_kl.to(dtype), 0.0)
    return rewards


@torch.no_grad()
def gae_advantages(rewards: torch.Tensor, values: torch.Tensor, response_mask: torch.Tensor, *, gamma: float,
                   lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE advantages and returns ``[B, R]`` (module docstring), 0 off the response; tokens with mask 0 are skipped
    (the next value and running advantage carry over them). Inputs ``[B, R]``; ``values`` detached."""
    valid = response_mask != 0
    dtype = rewards.dtype
    values = values.to(dtype)
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    next_value = torch.zeros_like(rewards[:, 0])
    for t in range(rewards.shape[1] - 1, -1, -1):
        on = valid[:, t]
        current = rewards[:, t] + gamma * next_value - values[:, t] + gamma * lam * running
        running = torch.where(on, current, running)
        next_value = torch.where(on, values[:, t], next_value)
        advantages[:, t] = torch.where(on, current, 0.0)
    returns = torch.where(valid, advantages + values, 0.0)
    return advantages, returns


@torch.no_grad()
def whiten_over_ranks(x: torch.Tensor, response_mask: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """``(x - mean) / sqrt(var + 1e-8)`` over the response tokens of every rank (unbiased variance, as verl's
    masked_whiten); 0 off the response."""
    valid = response_mask != 0
    x64 = torch.where(valid, x.double(), 0.0)
    count_sum = all_reduce_sum(torch.stack([valid.sum().double(), x64.sum()]).cpu(), info)
    count, mean = float(count_sum[0]), float(count_sum[1]) / max(float(count_sum[0]), 1.0)
    if count < 2:
        raise ValueError(f"whiten: needs at least 2 response tokens over all ranks, got {count:.0f}")
    centered = torch.where(valid, x64 - mean, 0.0)
    var = float(all_reduce_sum(centered.square().sum().reshape(1).cpu(), info)[0]) / (count - 1)
    return (centered / (var + _WHITEN_EPS) ** 0.5).to(x.dtype)


def clipped_value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, response_mask: torch.Tensor, *,
    clip: float | None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Token-mean over the response of ``0.5 * max((V - G)^2, (V_old + clip(V - V_old, -c, c) - G)^2)`` (plain
    ``0.5 * (V - G)^2`` with ``clip=None``).

    Args:
        values: ``[B, R]`` float, the value model's outputs (require grad).
        old_values, returns: ``[B, R]`` constants (the rollout's values and the GAE returns).
        response_mask: ``[B, R]`` 0/1.
        clip: the value clip ``c`` > 0, or None.

    Returns:
        ``(loss, metrics)``: 0-d loss (differentiable w.r.t. ``values``); detached token means ``value_loss``,
        ``value_clip_frac`` (tokens where the clip is active and its branch the larger one: their gradient is cut)
        and ``value_mean``.
    """
    valid = response_mask != 0
    weight = valid.to(values.dtype)
    n = weight.sum().clamp(min=1.0)
    err = (values - returns).square()
    clipped = torch.zeros_like(valid)
    if clip is not None:
        v_clipped = old_values + (values - old_values).clamp(-clip, clip)
        err_clipped = (v_clipped - returns).square()
        # Clipped: where the clamp is active and its branch is the larger (where it is not, both branches are the
        # same value up to rounding, which must not count).
        clipped = ((values - old_values).abs() > clip) & (err_clipped > err)
        err = torch.maximum(err, err_clipped)
    loss = 0.5 * (torch.where(valid, err, 0.0) * weight).sum() / n
    with torch.no_grad():
        metrics = {"value_loss": loss.detach(), "value_clip_frac": (clipped & valid).sum() / n,
                   "value_mean": (torch.where(valid, values, 0.0) * weight).sum() / n}
    return loss, metrics
