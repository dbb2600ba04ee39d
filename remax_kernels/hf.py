"""Hugging Face helpers: per-token log-probs and the policy loss of a causal LM without its ``[B, L, V]`` logits.

``model(...)`` would project every position onto the vocabulary (``B * L * V`` floats, e.g. 4 GiB in fp32 for
8 x 1024 tokens of a 128k vocabulary, plus the same again for its gradient). These helpers instead call the
model's backbone (``model.get_decoder()``, else ``model.base_model``: the transformer body that ends with the
final norm) and feed its last hidden states and the model's own output embedding
(``model.get_output_embeddings()``: tied or not, with its bias if any; it must be a plain ``nn.Linear``) to
``fused_linear_logprobs`` / ``fused_linear_policy_loss``, which never hold the logits.

Shift: hidden state ``t`` predicts token ``t + 1``, so a ``[B, L]`` sequence gives ``L - 1`` log-probs. Positions
come from the attention mask (``cumsum(attention_mask) - 1``, as Hugging Face ``generate`` and
``remax_kernels.generate_pairs`` compute them), so left-padded prompts get the positions they were generated with.

Logit post-processing: families that scale their logits (Cohere ``logit_scale``, Granite ``logits_scaling``,
Falcon-H1 ``lm_head_multiplier``) are handled by folding the scale into the temperature, which is exact; families
that soft-cap them (Gemma 2/3 ``final_logit_softcapping``) are refused with a ValueError, because a soft-cap is
not a linear map of the hidden state. Other post-processing inside a family's ``forward`` is not detected.
"""

from __future__ import annotations

import inspect

import torch

from remax_kernels._validate import (
    check_attention_mask,
    check_index,
    check_temperature,
    check_tensor,
    check_token_ids,
    value_checks_enabled,
)
from remax_kernels.losses import _IGNORE_INDEX, LossOptions, fused_linear_policy_loss
from remax_kernels.ops.fused_linear_logprobs import fused_linear_logprobs

# Config attributes by which families post-process their logits: logits * value, logits / value, soft-cap.
_LOGIT_MULTIPLIERS = ("logit_scale", "lm_head_multiplier")
_LOGIT_DIVISORS = ("logits_scaling",)
_LOGIT_SOFTCAPS = ("final_logit_softcapping", "logits_soft_cap", "logit_softcapping")


def _text_config(model):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _logit_scale(model) -> float:
    """The factor the family multiplies its lm-head output by (1.0 for most); raises for soft-capping families."""
    config = _text_config(model)
    for name in _LOGIT_SOFTCAPS:
        if getattr(config, name, None) is not None:
            raise ValueError(
                f"model: {type(model).__name__} soft-caps its logits ({name}={getattr(config, name)}); the fused "
                "log-probs need logits linear in the hidden state, so this family is not supported"
            )
    scale = 1.0
    for name in _LOGIT_MULTIPLIERS:
        value = getattr(config, name, None)
        if value is not None:
            scale *= float(value)
    for name in _LOGIT_DIVISORS:
        value = getattr(config, name, None)
        if value is not None:
            scale /= float(value)
    if not scale > 0:
        raise ValueError(f"model: logit scale must be > 0, got {scale} from its config")
    return scale


def position_ids_from_attention_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Hugging Face ``generate``'s positions ``[B, L]`` int64: ``cumsum(attention_mask) - 1``, so left padding does
    not count; padded slots get a harmless 1."""
    mask = check_tensor("attention_mask", attention_mask).long()
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)


def _backbone(model) -> torch.nn.Module:
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "get_output_embeddings"):
        raise TypeError(f"model: expected a Hugging Face causal LM (PreTrainedModel), got {type(model)}")
    # get_decoder() finds the body in transformers 5; some 4.x classes (GPT-2) return themselves there, and their
    # body is base_model (the module named by base_model_prefix).
    for find in ("get_decoder", "base_model"):
        body = getattr(model, find, None)
        body = body() if callable(body) and not isinstance(body, torch.nn.Module) else body
        if isinstance(body, torch.nn.Module) and body is not model:
            return body
    raise ValueError(
        f"model: cannot find the backbone of {type(model).__name__} (get_decoder() and base_model give the model "
        "itself); pass a *ForCausalLM model"
    )


def _lm_head(model) -> tuple[torch.Tensor, torch.Tensor | None]:
    head = model.get_output_embeddings()
    # Only a plain Linear computes hidden @ weight.T + bias; a LoRA-wrapped or quantized head overrides forward and
    # its .weight alone would give silently wrong log-probs.
    if not isinstance(head, torch.nn.Linear) or type(head).forward is not torch.nn.Linear.forward:
        raise ValueError(
            f"model: its output embedding ({type(head).__name__}) is not a plain torch.nn.Linear; the fused "
            "log-probs read its weight and bias directly (merge adapters into the lm-head first)"
        )
    return head.weight, head.bias


def _check_sequences(model, input_ids, attention_mask, position_ids) -> None:
    check_index("input_ids", input_ids)
    if input_ids.dim() != 2 or input_ids.shape[1] < 2:
        raise ValueError(f"input_ids: expected [B, L] with L >= 2, got shape {tuple(input_ids.shape)}")
    check_attention_mask(attention_mask, input_ids)
    if value_checks_enabled(input_ids.device):  # reads the ids (see _validate)
        check_token_ids("input_ids", input_ids, model)
    if position_ids is not None:
        check_index("position_ids", position_ids)
        if tuple(position_ids.shape) != tuple(input_ids.shape):
            raise ValueError(
                f"position_ids: shape {tuple(position_ids.shape)} does not match input_ids {tuple(input_ids.shape)}"
            )


def _response_window(response_mask, input_ids) -> int:
    """How many trailing tokens of ``input_ids`` the outputs cover: ``L - 1``, or ``R`` for a ``[B, R]`` mask."""
    batch, seq_len = input_ids.shape
    if response_mask is None:
        return seq_len - 1
    check_tensor("response_mask", response_mask)
    if response_mask.dim() != 2 or response_mask.shape[0] != batch or not 1 <= response_mask.shape[1] <= seq_len - 1:
        raise ValueError(
            f"response_mask: expected [B, R] with B = {batch} and 1 <= R <= L - 1 = {seq_len - 1}, got shape "
            f"{tuple(response_mask.shape)}"
        )
    if response_mask.device != input_ids.device:
        raise ValueError(f"response_mask: is on {response_mask.device} but input_ids is on {input_ids.device}")
    return response_mask.shape[1]


def _hidden_and_targets(model, input_ids, attention_mask, position_ids, response_mask):
    """The last hidden states that predict the last ``R`` tokens, those tokens with the masked ones ignored, the
    lm-head and the temperature divisor of the family's logit scale."""
    backbone = _backbone(model)
    weight, bias = _lm_head(model)
    scale = _logit_scale(model)
    window = _response_window(response_mask, input_ids)
    seq_len = input_ids.shape[1]
    mask = attention_mask.long()
    if position_ids is None:
        position_ids = position_ids_from_attention_mask(mask)
    kwargs = {"use_cache": False}
    if "position_ids" in inspect.signature(backbone.forward).parameters:
        kwargs["position_ids"] = position_ids
    hidden = backbone(input_ids=input_ids, attention_mask=mask, **kwargs).last_hidden_state
    # No cast here: under autocast the fused op runs its GEMMs in the autocast dtype (bf16 on a GPU) whatever the
    # dtypes of the hidden states and of the (fp32 master) weight; without autocast they share the model's dtype.
    hidden = hidden[:, seq_len - 1 - window: seq_len - 1]
    targets = input_ids[:, seq_len - window:].long()
    keep = (response_mask != 0) if response_mask is not None else (mask[:, seq_len - window:] != 0)
    return hidden, targets, keep, weight, bias, scale


def causal_lm_logprobs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    response_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-probs of each next token of ``input_ids`` under a Hugging Face causal LM, without its logits.

    Equals ``log_softmax(model(input_ids, attention_mask, position_ids).logits[:, :-1] / temperature)`` gathered
    at ``input_ids[:, 1:]``, computed from the backbone's last hidden states and the output embedding with
    ``fused_linear_logprobs``. Differentiable w.r.t. every model parameter (gradients equal the eager ones).

    Args:
        model: a ``*ForCausalLM`` model (Llama, Qwen2, Mistral, GPT-2, ...; tied or untied embeddings).
        input_ids: ``[B, L]`` int64/int32, ``L >= 2``; any padding side.
        attention_mask: ``[B, L]`` 0/1 (int or bool).
        response_mask: optional ``[B, R]`` 0/1, ``R <= L - 1``, over the LAST ``R`` tokens of ``input_ids`` (the
            response of prompt + response sequences, e.g. ``PairedRollout.sampled_response_mask``; ``R = L - 1``
            covers every predicted token). Only those ``R`` positions go through the lm-head.
        position_ids: optional ``[B, L]``; default ``cumsum(attention_mask) - 1`` (left padding skipped).
        temperature: > 0; log-probs under ``softmax(logits / temperature)``, the distribution sampled from.
        return_entropy: also return the per-token entropy of that distribution.
        backend: for the row kernels, as in ``remax_kernels.fused_linear_logprobs``.

    Returns:
        float32 log-probs ``[B, L - 1]`` (or ``[B, R]`` with a response mask): entry ``t`` is the log-prob of the
        token right after position ``t`` (of the window). 0 where that token is masked out (``response_mask == 0``,
        or without a response mask ``attention_mask == 0``). With ``return_entropy``, ``(logprobs, entropy)``.

    Example::

        >>> import torch, transformers
        >>> from remax_kernels.hf import causal_lm_logprobs
        >>> config = transformers.Qwen2Config(vocab_size=128, hidden_size=32, intermediate_size=64,
        ...     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
        >>> model = transformers.Qwen2ForCausalLM(config)
        >>> ids = torch.randint(0, 128, (2, 9))
        >>> mask = torch.ones_like(ids)
        >>> response_mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])  # the last 4 tokens are the response
        >>> logp = causal_lm_logprobs(model, ids, mask, response_mask=response_mask)
        >>> logp.shape, logp.dtype
        (torch.Size([2, 4]), torch.float32)
    """
    _check_sequences(model, input_ids, attention_mask, position_ids)
    temperature = check_temperature("temperature", temperature)
    if not isinstance(return_entropy, bool):
        raise TypeError(f"return_entropy: expected a bool, got {type(return_entropy).__name__}")
    hidden, targets, keep, weight, bias, scale = _hidden_and_targets(
        model, input_ids, attention_mask, position_ids, response_mask
    )
    return fused_linear_logprobs(
        hidden,
        weight,
        targets.masked_fill(~keep, _IGNORE_INDEX),
        bias=bias,
        temperature=temperature / scale,
        ignore_index=_IGNORE_INDEX,
        return_entropy=return_entropy,
        backend=backend,
    )


def causal_lm_policy_loss(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    response_mask: torch.Tensor,
    advantages: torch.Tensor,
    *,
    position_ids: torch.Tensor | None = None,
    temperature: float = 1.0,
    old_logprobs: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    rollout_logprobs: torch.Tensor | None = None,
    options: LossOptions | None = None,
    backend: str = "auto",
    **option_overrides,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The ReMax / PPO policy loss of a Hugging Face causal LM on prompt + response sequences, without its logits.

    ``fused_linear_policy_loss`` on the backbone's last hidden states and the model's output embedding: the same
    loss and parameter gradients as ``policy_loss(causal_lm_logprobs(...), advantages, response_mask, ...)``.

    Args:
        model, input_ids, attention_mask, position_ids, temperature: as in ``causal_lm_logprobs``.
        response_mask: ``[B, R]`` 0/1 over the last ``R`` tokens of ``input_ids`` (``R <= L - 1``), e.g.
            ``PairedRollout.sampled_response_mask`` with ``input_ids = PairedRollout.sampled_ids``.
        advantages: ``[B]`` or ``[B, R]`` float, e.g. ``remax_advantages(sampled_reward, greedy_reward)``.
        old_logprobs, ref_logprobs, rollout_logprobs: optional ``[B, R]``, as in ``remax_kernels.policy_loss``
            (``rollout_logprobs``: e.g. ``PairedRollout.sampled_logprobs``, for the mismatch metrics and TIS).
        options, **option_overrides: the loss options (``remax_kernels.LossOptions`` and/or its fields by keyword).
        backend: for the row kernels, as in ``remax_kernels.fused_linear_policy_loss``.

    Gradients are computed in the forward (``fused_linear_policy_loss``): call it with grad enabled and backward
    the loss once. Under ``torch.autocast`` the lm-head GEMMs run in the autocast dtype.

    Returns:
        ``(loss, metrics)``: float32 0-d loss, differentiable w.r.t. the model's parameters; detached metrics.

    Usage, one ReMax step (``reward`` scores full sequences)::

        out = rk.generate_pairs(model, prompt_ids, prompt_mask, max_new_tokens=256, top_p=0.9, seed=step)
        advantages = rk.remax_advantages(reward(out.sampled_ids), reward(out.greedy_ids))
        loss, metrics = causal_lm_policy_loss(
            model, out.sampled_ids, out.sampled_attention_mask, out.sampled_response_mask, advantages
        )
        loss.backward()
    """
    _check_sequences(model, input_ids, attention_mask, position_ids)
    temperature = check_temperature("temperature", temperature)
    check_tensor("response_mask", response_mask)
    hidden, targets, _, weight, bias, scale = _hidden_and_targets(
        model, input_ids, attention_mask, position_ids, response_mask
    )
    return fused_linear_policy_loss(
        hidden, weight, targets, advantages, response_mask, bias=bias, temperature=temperature / scale,
        old_logprobs=old_logprobs, ref_logprobs=ref_logprobs, rollout_logprobs=rollout_logprobs, options=options,
        backend=backend, **option_overrides,
    )
