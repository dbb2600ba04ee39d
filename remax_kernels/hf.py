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

Logit post-processing and heads: the config fields by which families transform their logits are one table,
``LOGIT_TRANSFORMS`` (scales folded into the temperature, soft-caps through the fused ops' ``softcap=``, a muP
width multiplier on the hidden states, an unpadded vocabulary as the head's first rows); a logit-looking field the
model's code names but the table lacks refuses the model. Heads with a per-token transform before the output
embedding (BERT/RoBERTa-style dense + activation + LayerNorm, Electra, ModernBert-decoder) run it first; peft LoRA
on the lm-head is one widened linear map, ``modules_to_save`` uses the active trained copy; heads that are not
"transform, then one linear map" (ProphetNet's n-gram stream, Musicgen's per-codebook heads, unknown extra modules)
are refused before any work. README.md's "Model families" lists what each class of transformers does.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass

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


# Config fields by which a family transforms its lm-head output. Read here and nowhere else (_logit_transforms):
# every field a model's head code uses is applied exactly or the model is refused before any work.
@dataclass(frozen=True)
class LogitTransform:
    """One config field of a family's logit post-processing and how the fused op reproduces it exactly.

    ``kind``: ``"multiply"`` (logits * v: folded into the temperature, T / v), ``"divide"`` (logits / v: T * v),
    ``"softcap"`` (v * tanh(logits / v): the fused ops' ``softcap=v`` on the raw logits, before the temperature),
    ``"divide_hidden"`` (lm_head(hidden / v): the hidden states are divided first, so a bias stays unscaled),
    ``"vocab_limit"`` (logits[..., :v]: the first v rows of the head). ``model_types``: the families whose code
    reads the field that way (empty: every family whose head code names it).
    """

    field: str
    kind: str
    families: str
    model_types: tuple[str, ...] = ()


LOGIT_TRANSFORMS: tuple[LogitTransform, ...] = (
    LogitTransform("logits_mup_width_multiplier", "divide_hidden", "Inkling"),
    LogitTransform("unpadded_vocab_size", "vocab_limit", "Inkling, Inkling2"),
    LogitTransform("logit_scale", "multiply", "Cohere, Cohere2, Cohere2-MoE, CohereCompass"),
    LogitTransform("lm_head_multiplier", "multiply", "Falcon-H1"),
    # HyperCLOVAX multiplies by logits_scaling (muP), Granite divides by it.
    LogitTransform("logits_scaling", "multiply", "HyperCLOVAX", ("hyperclovax",)),
    LogitTransform("logits_scaling", "divide", "Granite, GraniteMoe, GraniteMoeShared, GraniteMoeHybrid, Granite-SWA"),
    LogitTransform("final_logit_softcapping", "softcap",
                   "Gemma-2, Gemma-3, Gemma-3n, Gemma-4, VaultGemma, NanoChat, Beam, Inkling2"),
    LogitTransform("logits_soft_cap", "softcap", "RecurrentGemma"),
    LogitTransform("output_logit_soft_cap", "softcap", "xLSTM"),
)
# A config field whose name looks like a logit transform (this pattern) and that the model class's own code names,
# but that is not in LOGIT_TRANSFORMS, refuses the model: a new family's transform is never silently dropped.
_LOOKS_LIKE_A_LOGIT_TRANSFORM = re.compile(r"logit|lm_head|soft_?cap|mup|output_(scale|mult)", re.IGNORECASE)
# Names matching the pattern that are not transforms of the returned logits.
_NOT_LOGIT_TRANSFORMS = frozenset({
    "output_router_logits",  # MoE router outputs, not the vocabulary logits
    "router_aux_loss_coef",
    "tie_word_embeddings",
})


def _text_config(model):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def position_ids_from_attention_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Hugging Face ``generate``'s positions ``[B, L]`` int64: ``cumsum(attention_mask) - 1``, so left padding does
    not count; padded slots get a harmless 1."""
    mask = check_tensor("attention_mask", attention_mask).long()
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)


@dataclass(frozen=True)
class _Head:
    """What the fused op needs to reproduce ``model(...).logits`` from the backbone's last hidden states:
    ``logits = softcap(scale * (prepare(hidden) @ weight.T + bias))`` (softcap None = none)."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    prepare: object  # hidden [N, H] -> [N, H'] (H' = weight's columns); a per-token function
    scale: float
    softcap: float | None


def _class_source(model) -> str | None:
    """The source of the model class's ``forward`` and ``__init__`` (where families apply their head transforms),
    or None where Python cannot show it."""
    try:
        return inspect.getsource(type(model).forward) + inspect.getsource(type(model).__init__)
    except (OSError, TypeError):
        return None


def _config_value(model, field: str):
    """``field`` of the model's config, else of its text config (composite models keep the LM's fields there)."""
    value = getattr(model.config, field, None)
    return getattr(_text_config(model), field, None) if value is None else value


def _logit_transforms(model) -> list[tuple[LogitTransform, float]]:
    """The active entries of LOGIT_TRANSFORMS for ``model`` with their values; raises for a config field that looks
    like a logit transform, is named by the model's head code and is not in the table."""
    source = _class_source(model)
    model_type = getattr(_text_config(model), "model_type", None)
    configs = [model.config] + ([_text_config(model)] if _text_config(model) is not model.config else [])
    known = {entry.field for entry in LOGIT_TRANSFORMS}
    for config in configs:
        for field in config.to_dict():
            if (field in known or field in _NOT_LOGIT_TRANSFORMS or not _LOOKS_LIKE_A_LOGIT_TRANSFORM.search(field)
                    or getattr(config, field, None) in (None, False)):
                continue
            if source is None or re.search(rf"\b{field}\b", source):
                raise ValueError(
                    f"model: {type(model).__name__} has config.{field}={getattr(config, field)!r}, which looks like "
                    "a logit transform that remax_kernels.hf does not know (remax_kernels.hf.LOGIT_TRANSFORMS); its "
                    "log-probs could silently differ from model(...).logits, so it is refused"
                )
    active, seen = [], set()
    for entry in LOGIT_TRANSFORMS:
        if entry.field in seen or (entry.model_types and model_type not in entry.model_types):
            continue
        value = _config_value(model, entry.field)
        # A field the class's code never names is not applied by it (Gemma3ForConditionalGeneration ignores its
        # text config's final_logit_softcapping, Gemma3ForCausalLM applies it).
        if value is None or (source is not None and not re.search(rf"\b{entry.field}\b", source)):
            continue
        seen.add(entry.field)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(
                f"model: config.{entry.field} must be a number > 0 for {type(model).__name__}, got {value!r}"
            )
        active.append((entry, float(value)))
    kinds = {entry.kind for entry, _ in active}
    if "softcap" in kinds and kinds & {"multiply", "divide"}:
        # No family in transformers 5.25 has both; which comes first decides the folding, so do not guess.
        fields = ", ".join(entry.field for entry, _ in active)
        raise ValueError(f"model: {type(model).__name__} both scales and soft-caps its logits ({fields}); the order "
                         "of the two is not known to remax_kernels.hf, so it is refused")
    return active


def _dense_act_norm(head):
    return lambda hidden: head.LayerNorm(head.activation(head.dense(hidden)))


def _refuse_adaptive_softmax(model):
    if getattr(model.config, "asm", False):
        raise ValueError("model: XLMWithLMHeadModel with config.asm=True predicts with an adaptive softmax, not one "
                         "linear map; compute log-probs from the model's own output")


def _roberta_head_transform(head):
    from transformers.activations import gelu

    return lambda hidden: head.layer_norm(gelu(head.dense(hidden)))


# Heads that run a per-token transform (dense + activation + LayerNorm) before the output embedding: the transform
# runs on the hidden states (exact: it is the model's own module), then the fused linear map.
_PRE_HEAD_TRANSFORMS = {
    **{name: lambda model: model.cls.predictions.transform for name in (
        "BertLMHeadModel", "BigBirdForCausalLM", "ErnieForCausalLM", "MegatronBertForCausalLM",
        "RemBertForCausalLM", "RoCBertForCausalLM", "RoFormerForCausalLM")},
    "RemBertForCausalLM": lambda model: _dense_act_norm(model.cls.predictions),
    "ElectraForCausalLM": lambda model: model.generator_predictions,
    # Heads nested in a module of their own that only calls the output embedding (None: no transform).
    "BertGenerationDecoder": lambda model: None,
    "ReformerModelWithLMHead": lambda model: None,  # the decoder applied in chunks of tokens
    "XLMWithLMHeadModel": lambda model: _refuse_adaptive_softmax(model),
    "ModernBertDecoderForCausalLM": lambda model: model.lm_head,
    **{name: lambda model: _roberta_head_transform(model.lm_head) for name in (
        "RobertaForCausalLM", "CamembertForCausalLM", "Data2VecTextForCausalLM", "XLMRobertaForCausalLM",
        "XmodForCausalLM", "RobertaPreLayerNormForCausalLM", "XLMRobertaXLForCausalLM")},
}
# Heads that are not "a per-token transform, then one linear map": refused up front, with the reason.
_REFUSED_HEADS = {
    "ProphetNetForCausalLM": "predicts with an n-gram stream (ngram extra positions per token), not from one "
                             "hidden state per token",
    "MusicgenForCausalLM": "has one lm-head per audio codebook (the logits are [B, codebooks, L, V])",
    "MusicgenMelodyForCausalLM": "has one lm-head per audio codebook (the logits are [B, codebooks, L, V])",
}


def _backbone(model) -> torch.nn.Module:
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "get_output_embeddings"):
        raise TypeError(f"model: expected a Hugging Face causal LM (PreTrainedModel), got {type(model)}")
    head = model.get_output_embeddings()
    # get_decoder() finds the body in transformers 5; some classes return themselves there (GPT-2 in 4.x,
    # Llama-4 and Mllama, whose base_model_prefix names a module they do not have) or the lm-head itself
    # (ModernBert-decoder): then the body is base_model, else the conventional `model` attribute.
    for find in ("get_decoder", "base_model", "model"):
        body = getattr(model, find, None)
        body = body() if callable(body) and not isinstance(body, torch.nn.Module) else body
        if isinstance(body, torch.nn.Module) and body is not model and body is not head:
            return body
    raise ValueError(
        f"model: cannot find the backbone of {type(model).__name__} (get_decoder(), base_model and .model give "
        "the model itself or its lm-head); pass a *ForCausalLM model"
    )


# Linear heads (no bias) whose forward multiplies each vocabulary entry's logit by a learned scale.
_ROW_SCALED_HEADS = frozenset({"DoryLMHead"})
# Linear subclasses whose forward is still hidden @ weight.T (+ bias), accumulated in fp32 as the fused op does.
_LINEAR_LIKE = frozenset({"ErgoLinearWithFP32Output"})


def _plain_linear(name: str, module) -> torch.nn.Linear:
    # Only a plain Linear computes hidden @ weight.T + bias; a quantized head overrides forward and its .weight
    # alone would give silently wrong log-probs.
    plain = isinstance(module, torch.nn.Linear) and (
        type(module).forward is torch.nn.Linear.forward or type(module).__name__ in _LINEAR_LIKE)
    if not plain:
        raise ValueError(
            f"model: its {name} ({type(module).__name__}) is not a plain torch.nn.Linear (a quantized or otherwise "
            "wrapped lm-head); the fused log-probs read its weight and bias directly: dequantize the lm-head, or "
            "compute log-probs from model(...).logits"
        )
    return module


def _modules_to_save_head(head):
    """peft ``modules_to_save`` on the lm-head: the trained copy of the active adapter (what its forward calls)."""
    adapters = list(head.active_adapters) if not head.disable_adapters else []
    if len(adapters) > 1:
        raise ValueError(f"model: its lm-head is a peft modules_to_save copy with {len(adapters)} active adapters "
                         f"({adapters}); activate one (model.set_adapter)")
    if adapters and adapters[0] in head.modules_to_save:
        return head.modules_to_save[adapters[0]]
    return head.original_module


def _lora_head(head):
    """peft LoRA on the lm-head: ``W x + b + sum_a s_a B_a A_a dropout_a(x)`` as ONE linear map of the widened hidden
    state ``[x, s_a A_a dropout_a(x), ...]`` with the weight ``[W, B_a, ...]`` ([V, H + r]): gradients reach W, A
    and B, and the ``[N, V]`` product is never formed (the widened weight is one copy of the head, V (H + r))."""
    base = _plain_linear("LoRA base layer", head.base_layer)
    if head.disable_adapters or head.merged:  # merged: the base weight already holds B A
        return base.weight, base.bias, None
    adapters = [a for a in head.active_adapters if a in head.lora_A]
    variants = [a for a in adapters if a in getattr(head, "lora_variant", {})]
    if variants:
        raise ValueError(
            f"model: its LoRA lm-head uses a LoRA variant (adapters {variants}: DoRA or similar), which is not a "
            "low-rank update of one linear map; merge it into the lm-head first (model.merge_adapter())"
        )
    weights, bias = [base.weight], base.bias
    parts = []
    for name in adapters:
        lora_a, lora_b = _plain_linear("LoRA A", head.lora_A[name]), _plain_linear("LoRA B", head.lora_B[name])
        scaling, dropout = head.scaling[name], head.lora_dropout[name]
        weights.append(lora_b.weight.to(base.weight.dtype))
        if lora_b.bias is not None:  # lora_bias=True: B's bias is scaled with the update
            lora_bias = lora_b.bias.to(base.weight.dtype) * scaling
            bias = lora_bias if bias is None else bias + lora_bias
        parts.append((lora_a, scaling, dropout))

    def widen(hidden):
        low_rank = [
            torch.nn.functional.linear(dropout(hidden).to(lora_a.weight.dtype), lora_a.weight).to(hidden.dtype)
            * scaling
            for lora_a, scaling, dropout in parts
        ]
        return torch.cat([hidden, *low_rank], dim=-1)

    return torch.cat(weights, dim=1), bias, widen if parts else None


def _divided_first(divisor: float, then):
    """hidden / divisor, then ``then`` (None: nothing more): a muP width multiplier acts before the lm-head."""
    return (lambda hidden: hidden / divisor) if then is None else (lambda hidden: then(hidden / divisor))


def _unwrapped(model):
    """The transformers model inside a peft wrapper (whose class names no head transform), else ``model``: its
    modules, adapters included, are the ones the wrapper runs."""
    base = getattr(model, "get_base_model", None)
    return base() if callable(base) and isinstance(model, torch.nn.Module) else model


def _check_causal(model) -> None:
    """Refuse configs under which one forward lets a position see later tokens: its logits are then not the
    next-token distributions a rollout samples from."""
    config = model.config
    if type(model).__name__ == "XLNetLMHeadModel" and getattr(config, "attn_type", "uni") != "uni":
        raise ValueError(f"model: XLNetLMHeadModel with attn_type={config.attn_type!r} attends to later tokens in "
                         "one forward, so its logits are not next-token predictions; set config.attn_type='uni'")
    if type(model).__name__ == "XLMWithLMHeadModel" and not getattr(config, "causal", False):
        raise ValueError("model: XLMWithLMHeadModel with causal=False is a masked LM (attends to later tokens); "
                         "set config.causal=True for a causal LM")


def _lm_head(model) -> _Head:
    """The model's head as ``_Head``; raises before any work for a head the fused op cannot reproduce exactly."""
    name = type(model).__name__
    _check_causal(model)
    if name in _REFUSED_HEADS:
        raise ValueError(f"model: {name} {_REFUSED_HEADS[name]}; the fused log-probs need logits = one linear map "
                         "of the last hidden state: compute them from model(...).logits")
    head = model.get_output_embeddings()
    backbone = _backbone(model)
    if hasattr(head, "original_module") and hasattr(head, "modules_to_save"):
        head = _modules_to_save_head(head)
    prepare = None
    if hasattr(head, "base_layer") and hasattr(head, "lora_A"):
        weight, bias, prepare = _lora_head(head)
    elif type(head).__name__ in _ROW_SCALED_HEADS:
        # Dory: logits * (logit_scale * factor), a learned scale per vocabulary row = the weight's rows scaled: one
        # [V, H] product, differentiable in both, instead of the [N, V] logits.
        weight, bias = head.weight * (head.logit_scale * head.logit_scale_factor).to(head.weight.dtype)[:, None], None
    else:
        linear = _plain_linear("output embedding", head)
        weight, bias = linear.weight, linear.bias
    if name in _PRE_HEAD_TRANSFORMS:
        transform, widen = _PRE_HEAD_TRANSFORMS[name](model), prepare
        if transform is not None:
            prepare = transform if widen is None else (lambda hidden: widen(transform(hidden)))
    else:
        # Any other module with parameters outside the backbone and the lm-head takes part in the logits in a way
        # the fused op does not know (a transform before the decoder, a projection after the body...).
        head_modules = {id(m) for m in model.get_output_embeddings().modules()}
        extra = [child for child, module in model.named_children()
                 if module is not backbone and id(module) not in head_modules
                 and not any(m is backbone for m in module.modules()) and any(True for _ in module.parameters())
                 and not any(m is model.get_output_embeddings() for m in module.modules())]
        nested = [child for child, module in model.named_children()
                  if any(m is model.get_output_embeddings() for m in module.modules())
                  and module is not model.get_output_embeddings()]
        if extra or nested:
            raise ValueError(
                f"model: {name}'s lm-head is more than one linear map (module(s) {extra or nested} with parameters "
                "besides the backbone and the output embedding); the fused log-probs need logits = "
                "get_output_embeddings()(last hidden state): compute them from model(...).logits"
            )
    scale, softcap = 1.0, None
    for entry, value in _logit_transforms(model):
        if entry.kind == "multiply":
            scale *= value
        elif entry.kind == "divide":
            scale /= value
        elif entry.kind == "softcap":
            softcap = value
        elif entry.kind == "vocab_limit" and int(value) < weight.shape[0]:
            weight, bias = weight[: int(value)], None if bias is None else bias[: int(value)]
        elif entry.kind == "divide_hidden":
            prepare = _divided_first(value, prepare)
    return _Head(weight, bias, prepare, scale, softcap)


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
    lm-head (``_Head``)."""
    model = _unwrapped(model)
    backbone = _backbone(model)
    head = _lm_head(model)
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
    if head.prepare is not None:
        hidden = head.prepare(hidden)
    targets = input_ids[:, seq_len - window:].long()
    keep = (response_mask != 0) if response_mask is not None else (mask[:, seq_len - window:] != 0)
    return hidden, targets, keep, head


def _softcap_kwargs(head: _Head) -> dict:
    # Passed only when the family soft-caps, so the fused ops' signature is not asked for more than it needs.
    return {} if head.softcap is None else {"softcap": head.softcap}


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
    hidden, targets, keep, head = _hidden_and_targets(
        model, input_ids, attention_mask, position_ids, response_mask
    )
    return fused_linear_logprobs(
        hidden,
        head.weight,
        targets.masked_fill(~keep, _IGNORE_INDEX),
        bias=head.bias,
        temperature=temperature / head.scale,
        ignore_index=_IGNORE_INDEX,
        return_entropy=return_entropy,
        backend=backend,
        **_softcap_kwargs(head),
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
    hidden, targets, _, head = _hidden_and_targets(
        model, input_ids, attention_mask, position_ids, response_mask
    )
    return fused_linear_policy_loss(
        hidden, head.weight, targets, advantages, response_mask, bias=head.bias,
        temperature=temperature / head.scale, old_logprobs=old_logprobs, ref_logprobs=ref_logprobs,
        rollout_logprobs=rollout_logprobs, options=options, backend=backend, **_softcap_kwargs(head),
        **option_overrides,
    )
