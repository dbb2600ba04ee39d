"""Paired rollouts for ReMax: one sampled and one greedy response per prompt, from one prefill and one decode batch.

``generate_pairs(model, input_ids, attention_mask, max_new_tokens=...)`` reads top to bottom:

1. prefill: the ``B`` prompts go through the model once, filling the cache ``model.generate`` would make (a
   ``DynamicCache`` or ``StaticCache`` from the model's config, so each layer gets its own class: full or sliding
   attention, linear attention, conv/SSM state; or none, for models that build their own state);
2. expand: the state is duplicated along the batch (``Cache.reorder_cache``), so rows ``[0, B)`` continue with
   sampling and rows ``[B, 2B)`` greedily (the two halves share nothing after this point). A model with state
   outside a transformers Cache (RWKV ``state``, XLNet ``mems``, tensors on its modules as in RecurrentGemma)
   prefills the ``2B`` rows instead;
3. decode: ``_decode_step``, one ``2B``-row forward per new token, then ``sample_and_greedy`` picks every row's
   next token in one kernel (rows ``[B, 2B)`` greedy), seeded by ``(seed, step)`` so a rollout is reproducible,
   and the EOS bookkeeping; the sampling options are parsed once per rollout (``_Sampler``) and the step is a
   device tensor, so the whole step is one graph;
4. finish: a row stops at its EOS token, later tokens are ``pad_token_id``; the loop ends when every row has
   finished (the host looks every ``check_every`` steps: one device sync each) or after ``max_new_tokens``.

Each forward's inputs are prepared as ``model.generate`` prepares them, by the model's own
``prepare_inputs_for_generation`` and ``_update_model_kwargs_for_generation`` (``_Stepper``): the cache keyword,
one-token steps or a full re-forward (models without a cache), the attention mask some models drop on one-token
steps (Mamba), the 4-D mask of a static cache, recurrent state. Positions are ``cumsum(attention_mask) - 1`` for
left-padded prompts, then one more per new token, as in training (``remax_kernels.hf``), also for decoders that take
them only through ``**kwargs`` (WhisperForCausalLM). With ``cache_implementation="static"`` the decode step reads a
preallocated ``StaticCache`` (fixed shapes, no per-step reallocation; models transformers runs on one) and with
``use_cuda_graph=True`` the model's forward and the sampling are compiled with
``torch.compile(mode="reduce-overhead", fullgraph=True)`` (CUDA graphs), gpt-fast style. The compiled step's
shapes are ``(2B, P_bucket + max_new_tokens)`` (``B`` rows for ``generate_samples``), with prompts left-padded to
a multiple of ``PROMPT_BUCKET`` tokens: batches whose longest prompts fall in the same bucket reuse its graphs.

Written against the generation API of transformers 5 (``next_sequence_length``, the ``cache`` keyword; tested with
5.25); on 4.56+ the ``past_key_values`` keyword and ``cache_position`` are passed instead (not tested here).
"""

from __future__ import annotations

import functools
import inspect
import weakref
from dataclasses import dataclass

import torch

from remax_kernels._validate import (
    check_attention_mask,
    check_index,
    check_temperature,
    check_token_ids,
    value_checks_enabled,
)
from remax_kernels.hf import position_ids_from_attention_mask
from remax_kernels.ops.sampling import check_sampling_options, parse_options

CACHE_IMPLEMENTATIONS = ("dynamic", "static")
# The compiled step left-pads prompts to a multiple of this many tokens (see the module docstring).
PROMPT_BUCKET = 64

# One StaticCache per model, reused by ``use_cuda_graph`` calls of the same shape: a new cache means new tensor
# addresses, which would force torch.compile to recapture the CUDA graph on every call.
_GRAPH_CACHES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@dataclass
class PairedRollout:
    """The output of ``generate_pairs`` for ``B`` prompts of padded length ``P`` and ``R`` decoding steps.

    ``R`` is the number of steps actually run: ``max_new_tokens``, or fewer when every row (sampled and greedy)
    hit EOS earlier. Row ``i`` of every tensor belongs to prompt ``i``.

    Attributes:
        sampled_ids, greedy_ids: ``[B, P + R]`` int64, the prompt (as given, left-padded) followed by the response;
            after a row's EOS every position holds ``pad_token_id``.
        sampled_attention_mask, greedy_attention_mask: ``[B, P + R]``, the prompt's attention mask followed by the
            response mask (the dtype of the given attention mask): ready for a reward model or a training forward.
        sampled_response_mask, greedy_response_mask: ``[B, R]``, 1 at generated tokens up to and including EOS.
        sampled_logprobs, greedy_logprobs: ``[B, R]`` float32, log-prob of each generated token under the processed
            distribution it was drawn from (temperature, then top-k / top-p / min-p), 0 past the end.
        sampled_lengths, greedy_lengths: ``[B]`` int64, generated tokens per row including EOS.
        prompt_length: ``P``.
    """

    sampled_ids: torch.Tensor
    greedy_ids: torch.Tensor
    sampled_attention_mask: torch.Tensor
    greedy_attention_mask: torch.Tensor
    sampled_response_mask: torch.Tensor
    greedy_response_mask: torch.Tensor
    sampled_logprobs: torch.Tensor
    greedy_logprobs: torch.Tensor
    sampled_lengths: torch.Tensor
    greedy_lengths: torch.Tensor
    prompt_length: int

    @property
    def sampled_response_ids(self) -> torch.Tensor:
        """``[B, R]`` the sampled responses alone."""
        return self.sampled_ids[:, self.prompt_length:]

    @property
    def greedy_response_ids(self) -> torch.Tensor:
        """``[B, R]`` the greedy responses alone."""
        return self.greedy_ids[:, self.prompt_length:]


@dataclass
class SampledRollout:
    """The output of ``generate_samples``: the ``sampled_*`` fields of ``PairedRollout``, with the same shapes and
    meanings (``[B, P + R]`` ids and attention mask, ``[B, R]`` response mask and log-probs, ``[B]`` lengths)."""

    sampled_ids: torch.Tensor
    sampled_attention_mask: torch.Tensor
    sampled_response_mask: torch.Tensor
    sampled_logprobs: torch.Tensor
    sampled_lengths: torch.Tensor
    prompt_length: int

    @property
    def sampled_response_ids(self) -> torch.Tensor:
        """``[B, R]`` the sampled responses alone."""
        return self.sampled_ids[:, self.prompt_length:]


# The entries of ``generate``'s model kwargs whose meaning the paired loop knows, so that it can duplicate them along
# the batch after one prefill. Anything else a model hands from step to step (RWKV's ``state``, XLNet's ``mems``, a
# model's own cache class) is duplicated by prefilling the ``2B`` rows instead.
_SHAREABLE_KWARGS = frozenset(
    {"attention_mask", "position_ids", "cache", "past_key_values", "use_cache", "logits_to_keep", "cache_position"}
)


# Models whose forward mixes the rows of a batch: transformers' RWKV (5.25) adds its one-token step's ``[rows, H]``
# shift state to the ``[rows, 1, H]`` hidden states, broadcasting to ``[rows, rows, H]`` (its logits_to_keep then hides
# the shape), so every batched decode step is wrong, in model.generate too.
_MIXES_BATCH_ROWS = frozenset({"RwkvForCausalLM"})

# Models whose rollout cannot equal both their own model.generate and the full forward that training recomputes
# (measured with tiny random models in tests/test_every_causal_lm.py, transformers 5.25): refused before any work.
_MULTI_CODEBOOK = "it emits one token per audio codebook (one lm-head each), not one token per step"
_ROLLOUT_REFUSED = {
    "CpmAntForCausalLM": "its cached one-token steps disagree with its own full forward (so does its model.generate)",
    "ProphetNetForCausalLM": "its decoder predicts an n-gram stream; cached steps disagree with its full forward",
    "XLMWithLMHeadModel": "its cached steps disagree with its own full forward of the sampled sequences",
    "MptForCausalLM": "its cached greedy steps do not reproduce its own model.generate(do_sample=False)",
    "MusicgenForCausalLM": _MULTI_CODEBOOK,
    "MusicgenMelodyForCausalLM": _MULTI_CODEBOOK,
}


@dataclass(frozen=True)
class _Stepper:
    """How the model's own ``generate`` prepares each forward, found once per rollout.

    ``owner`` is the model, or for a peft wrapper the model it wraps: its ``prepare_inputs_for_generation`` picks the
    cache keyword, slices the inputs to the new token (or not, for a model without a cache: a full re-forward each
    step), drops the attention mask on one-token steps where the model wants that (Mamba, FalconMamba), builds the
    4-D mask of a static cache and passes recurrent state (RWKV ``state``, XLNet ``mems``); its
    ``_update_model_kwargs_for_generation`` carries that state, the mask and the positions to the next step.
    """

    owner: torch.nn.Module
    cache_key: str  # "cache" (transformers >= 5.24) or "past_key_values"
    position_ids: bool  # the model takes positions (by name, or through **kwargs to a decoder that names them)
    cache_position: bool  # transformers < 5: generate passes (and advances) the cache slots
    logits_to_keep: bool
    step_args: tuple[str, ...]  # the transformers-5 arguments of prepare_inputs_for_generation we pass


def _owner(model: torch.nn.Module) -> torch.nn.Module:
    base = getattr(model, "get_base_model", None)
    return base() if callable(base) else model


def _takes_position_ids(owner: torch.nn.Module, params) -> bool:
    """Positions are passed where the forward names them, as ``generate`` does, and also where it takes ``**kwargs``
    on to a decoder that names them (WhisperForCausalLM): ``remax_kernels.hf`` gives such a decoder
    ``cumsum(mask) - 1`` in training, so the rollout must use the same positions on left-padded rows."""
    if "position_ids" in params:
        return True
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return False
    get_decoder = getattr(owner, "get_decoder", None)
    decoder = get_decoder() if callable(get_decoder) else None
    return (isinstance(decoder, torch.nn.Module) and decoder is not owner
            and "position_ids" in inspect.signature(decoder.forward).parameters)


def _stepper(model: torch.nn.Module) -> _Stepper:
    from transformers import GenerationMixin

    owner = _owner(model)
    if not isinstance(owner, GenerationMixin):
        raise TypeError(f"model: {type(owner).__name__} is not a Hugging Face generative model (no GenerationMixin: "
                        "prepare_inputs_for_generation); pass a *ForCausalLM model")
    params = inspect.signature(owner.forward).parameters
    base = inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters
    return _Stepper(
        owner=owner,
        cache_key="cache" if "cache" in base else "past_key_values",
        position_ids=_takes_position_ids(owner, params),
        cache_position="cache_position" in base,
        logits_to_keep="logits_to_keep" in params,
        step_args=tuple(name for name in ("next_sequence_length", "is_first_iteration") if name in base),
    )


def _initial_kwargs(stepper: _Stepper, mask: torch.Tensor, cache, *, use_cache: bool) -> dict:
    """``generate``'s model kwargs before the prefill: the 2-D mask, positions ``cumsum(mask) - 1`` (as in
    training), the cache (None: the model makes its own in the first forward)."""
    kwargs = {"attention_mask": mask, "use_cache": use_cache}
    if cache is not None:
        kwargs[stepper.cache_key] = cache
    if stepper.position_ids:
        kwargs["position_ids"] = position_ids_from_attention_mask(mask)
    if stepper.cache_position:
        kwargs["cache_position"] = torch.arange(mask.shape[1], device=mask.device)
    if stepper.logits_to_keep:
        kwargs["logits_to_keep"] = 1
    return kwargs


def _step_inputs(stepper: _Stepper, ids: torch.Tensor, model_kwargs: dict, *, first: bool) -> dict:
    """The forward's inputs for the sequences ``ids`` ``[rows, L]`` so far, from the model's own
    ``prepare_inputs_for_generation``."""
    args = {}
    if "next_sequence_length" in stepper.step_args:
        args["next_sequence_length"] = None if first or not model_kwargs["use_cache"] else 1
    if "is_first_iteration" in stepper.step_args:
        args["is_first_iteration"] = first
    return stepper.owner.prepare_inputs_for_generation(ids, **args, **model_kwargs)


def _next_kwargs(stepper: _Stepper, outputs, model_kwargs: dict) -> dict:
    """The model kwargs of the next step (state from ``outputs``; the mask and positions one token longer)."""
    return stepper.owner._update_model_kwargs_for_generation(outputs, model_kwargs, is_encoder_decoder=False)


def _token_ids(name: str, value, default_sources) -> list[int]:
    """``value`` (int, list of ints or None) as a list; None falls back to the first source that has one."""
    if value is None:
        for source in default_sources:
            value = getattr(source, name, None) if source is not None else None
            if value is not None:
                break
        else:
            return []
    values = value.tolist() if isinstance(value, torch.Tensor) else value
    values = [values] if isinstance(values, int) else values
    if not isinstance(values, (list, tuple)) or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise TypeError(f"{name}: expected an int or a list of ints, got {value!r}")
    if any(v < 0 for v in values):
        raise ValueError(f"{name}: token ids must be >= 0, got {value!r}")
    return list(values)


def _check_prompts(model, input_ids, attention_mask) -> None:
    check_index("input_ids", input_ids)
    if input_ids.dim() != 2 or input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids: expected a non-empty 2-D tensor [B, P], got shape {tuple(input_ids.shape)}")
    check_attention_mask(attention_mask, input_ids)
    if not value_checks_enabled(input_ids.device):  # the values below read device memory (see _validate)
        return
    check_token_ids("input_ids", input_ids, model)
    mask = attention_mask.long()
    if bool(((mask != 0) & (mask != 1)).any()):
        raise ValueError("attention_mask: values must be 0 or 1")
    if bool((mask.sum(-1) == 0).any()):
        raise ValueError("attention_mask: every prompt needs at least one token (a row is all zeros)")
    # New tokens are appended on the right, so padding must be on the left (as for Hugging Face generate).
    if bool((mask[:, 1:] < mask[:, :-1]).any()):
        raise ValueError("attention_mask: prompts must be left-padded (a 0 follows a 1 in some row)")


def _seeds(seed, batch: int, device: torch.device, *, copies: int):
    """int seed as is; a per-prompt ``[B]`` seed tensor repeated for the greedy half (``copies=2``)."""
    if isinstance(seed, torch.Tensor):
        if seed.dtype != torch.int64 or tuple(seed.shape) != (batch,):
            raise ValueError(f"seed: a tensor seed must be int64 of shape [B] = ({batch},), got {seed.dtype} "
                             f"{tuple(seed.shape)}")
        return seed.to(device).repeat(copies)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed: expected an int or an int64 tensor [B], got {type(seed).__name__}")
    return seed


def _new_cache(stepper: _Stepper, *, static: bool, max_cache_len: int):
    """The cache ``generate`` would make: a DynamicCache or a StaticCache of ``max_cache_len`` slots from the model's
    config (so every layer gets its own class: full, sliding, linear attention, conv/SSM state), or None for the
    models that build their own state in the first forward (``_supports_default_dynamic_cache`` is False)."""
    from transformers import DynamicCache, StaticCache

    owner = stepper.owner
    supports = getattr(owner, "_supports_default_dynamic_cache", None)
    if callable(supports) and not supports():
        if static:
            raise ValueError(
                f"cache_implementation: 'static' needs a model whose state is a transformers Cache; "
                f"{type(owner).__name__} keeps its own (its generate builds no Cache); use 'dynamic'"
            )
        return None
    if static and not getattr(owner, "_can_compile_fullgraph", True):
        raise ValueError(
            f"cache_implementation: 'static' needs a model transformers runs on a static cache; "
            f"{type(owner).__name__} is not one (_can_compile_fullgraph is False); use 'dynamic'"
        )
    config = owner.config.get_text_config(decoder=True) if hasattr(owner.config, "get_text_config") else owner.config
    if static:
        return StaticCache(config=config, max_cache_len=max_cache_len)
    cache = DynamicCache(config=config)
    if not hasattr(cache, "layers"):
        raise RuntimeError("generate_pairs / generate_samples need transformers >= 4.56 (Cache.layers)")
    return cache


def _module_tensors(model: torch.nn.Module, batch: int) -> dict:
    """Per-row tensors a model keeps on its modules outside parameters, buffers and caches (RecurrentGemma keeps
    its recurrent and conv states there): a prefill that changes one leaves state the cache does not hold.
    Parameters and buffers (rotary tables among them) live in the modules' ``_parameters`` / ``_buffers``, not here."""
    return {
        (name, attr): value
        for name, module in model.named_modules()
        for attr, value in vars(module).items()
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dim() >= 1
        and value.shape[0] == batch
    }


def _shared_prefill(stepper: _Stepper, model_kwargs: dict, batch: int, copies: int) -> dict | None:
    """The prefill's state repeated for ``copies * batch`` rows (row ``i`` of copy ``c`` is row ``c * batch + i``),
    or None when some of it is not a DynamicCache / StaticCache or a per-row mask/position tensor (a model's own
    Cache subclass, MiniMax's, may keep state its reorder_cache does not move)."""
    from transformers import DynamicCache, StaticCache

    cache = model_kwargs.get(stepper.cache_key)
    if set(model_kwargs) - _SHAREABLE_KWARGS or (cache is not None and type(cache) not in (DynamicCache, StaticCache)):
        return None
    rows = copies * batch
    index = torch.arange(rows, device=model_kwargs["attention_mask"].device) % batch
    if cache is not None:
        cache.reorder_cache(index)  # every layer class: keys/values, conv and recurrent states, sliding windows
    shared = dict(model_kwargs)
    for key in ("attention_mask", "position_ids"):
        value = shared.get(key)
        if isinstance(value, torch.Tensor):
            shared[key] = value.index_select(1 if value.dim() == 3 else 0, index)  # 3-D: multimodal RoPE positions
    return shared


def _layer_tensors(layer) -> dict:
    """A cache layer's tensors by attribute (and key, for the per-state dicts of linear-attention layers)."""
    found = {}
    for name, value in vars(layer).items():
        if isinstance(value, torch.Tensor):
            found[name] = value
        elif isinstance(value, dict):
            found.update({(name, k): v for k, v in value.items() if isinstance(v, torch.Tensor)})
    return found


def _holds_tensors(value) -> bool:
    return isinstance(value, torch.Tensor) or (
        isinstance(value, dict) and any(isinstance(v, torch.Tensor) for v in value.values()))


def _mark_static(cache) -> None:
    # reorder_cache made new tensors: tell torch.compile their addresses are fixed (as StaticCache does for its own),
    # so CUDA graphs read them in place instead of copying them in at every replay.
    for layer in cache.layers:
        for tensor in _layer_tensors(layer).values():
            torch._dynamo.mark_static_address(tensor)


def _refill(held, fresh) -> bool:
    """Copy the state of ``fresh`` into ``held`` in place (the addresses a captured CUDA graph reads), if the two
    caches have the same structure; False (nothing copied) otherwise."""
    if len(held.layers) != len(fresh.layers):
        return False
    pairs = []
    for old, new in zip(held.layers, fresh.layers, strict=True):
        old_t, new_t = _layer_tensors(old), _layer_tensors(new)
        if type(old) is not type(new) or old_t.keys() != new_t.keys():
            return False
        for key, tensor in new_t.items():
            if (old_t[key].shape, old_t[key].dtype, old_t[key].device) != (tensor.shape, tensor.dtype, tensor.device):
                return False
            pairs.append((old_t[key], tensor))
    for old_tensor, tensor in pairs:
        old_tensor.copy_(tensor)
    for old, new in zip(held.layers, fresh.layers, strict=True):
        for name, value in vars(new).items():  # flags: has_previous_state, is_initialized, conv kernel sizes...
            if not _holds_tensors(value):
                setattr(old, name, dict(value) if isinstance(value, dict) else value)
    return True


def _graph_cache(model, fresh, rows: int, max_cache_len: int):
    """The StaticCache a ``use_cuda_graph`` rollout decodes on: the one held for this model and shape, refilled with
    this prefill's state, so the captured graphs' addresses stay valid; else ``fresh``, held for the next call."""
    key = (rows, max_cache_len)
    held = _GRAPH_CACHES.get(model)
    if held is not None and held[0] == key and _refill(held[1], fresh):
        return held[1]
    _GRAPH_CACHES[model] = (key, fresh)
    return fresh


def generate_pairs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    seed: int | torch.Tensor = 0,
    cache_implementation: str | None = None,
    use_cuda_graph: bool | None = None,
    check_every: int = 4,
) -> PairedRollout:
    """One sampled and one greedy response per prompt (ReMax's rollout), prefilling each prompt once.

    The prompts are prefilled once as a batch of ``B``; the KV cache is then duplicated so that rows ``[0, B)``
    decode by sampling and rows ``[B, 2B)`` greedily, all ``2B`` rows in one forward per step, with
    ``remax_kernels.sample_and_greedy`` choosing the tokens. The greedy responses equal Hugging Face
    ``model.generate(do_sample=False)`` token for token (up to floating-point ties). The model is put in eval
    mode while generating and its ``training`` flag is restored afterwards; no gradients are recorded. Attention is
    the model's own: transformers' default is torch SDPA; load the model with
    ``attn_implementation="flash_attention_2"`` to use flash-attn's kernels (the ``remax`` trainer does so when
    flash-attn is installed and the model is on CUDA).

    Args:
        model: a Hugging Face causal LM (``*ForCausalLM``): attention models, linear-attention and hybrid SSM
            models (Qwen3.5, Qwen3-Next, Jamba, Bamba, Nemotron-H, ...), SSMs (Mamba), models with their own
            state (XLNet ``mems``, RecurrentGemma) or none (OpenAI-GPT); each step's inputs are the ones its
            ``generate`` would give. RWKV decodes one prompt at a time only (a batch is refused: transformers'
            RWKV mixes batch rows on one-token steps).
        input_ids: ``[B, P]`` int64/int32 prompt tokens, left-padded, on the model's device.
        attention_mask: ``[B, P]`` 0/1 (int or bool), 0 at left padding.
        max_new_tokens: the most tokens to generate per response (>= 1).
        temperature: > 0; the sampled half draws from ``softmax(logits / temperature)``. Greedy rows take the
            argmax of the logits (lowest index on ties) whatever the options.
        top_k, top_p, min_p: filters for the sampled half (0, 1.0, 0.0 = off), applied after the temperature.
        eos_token_id: int or list of ints; a row stops after emitting one. Default: ``model.generation_config``,
            else ``model.config``; None there means rows run to ``max_new_tokens``.
        pad_token_id: written after a row's EOS. Default: ``model.generation_config``, ``model.config``, else the
            first EOS id (as Hugging Face does), else 0.
        seed: int, or an int64 tensor ``[B]`` with one seed per prompt. The random numbers behind prompt ``i``'s
            token at step ``t`` are a function of ``(seed, t, i)`` for an int seed, of ``(seed[i], t)`` for a tensor
            (then a prompt's response does not depend on the rest of the batch): the same call gives the same
            rollout.
        cache_implementation: ``"dynamic"`` (transformers' DynamicCache: grows by concatenation each step) or
            ``"static"`` (a preallocated StaticCache of ``P + max_new_tokens`` slots; attention then spans all
            slots every step, masked). Default: ``"static"`` with ``use_cuda_graph``, else ``"dynamic"``.
            ``"static"`` is refused (ValueError, before any decode step) for models transformers does not run on a
            static cache or whose state is not all in one (Mamba, RWKV, XLNet, RecurrentGemma, ...).
        use_cuda_graph: compile the whole decode step (forward, sampling, EOS bookkeeping) with
            ``torch.compile(mode="reduce-overhead", fullgraph=True)``: CUDA graphs over a static cache; CUDA only.
            The compiled step and its cache are kept per model and reused while ``(B, P_bucket, max_new_tokens)``
            stay the same, prompts being left-padded to a multiple of ``PROMPT_BUCKET`` (64) tokens (the extra
            padding is masked, and the returned ids hold the prompts as given). Default None = off until a GPU
            benchmark shows it faster (``benchmarks/README.md`` records the decision).
        check_every: how often (in steps) the host checks whether every row has finished; each check is one
            device sync. Up to ``check_every - 1`` steps may run after the last EOS; they are cut from the result.

    Returns:
        a ``PairedRollout`` (see its docstring): prompt + response ids, attention and response masks, per-token
        log-probs and lengths for both halves, and the prompt length ``P``.

    Example::

        >>> import torch, transformers, remax_kernels as rk
        >>> config = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
        ...     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
        >>> model = transformers.LlamaForCausalLM(config)
        >>> ids = torch.tensor([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12]])
        >>> mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
        >>> out = rk.generate_pairs(model, ids, mask, max_new_tokens=8, temperature=0.7, eos_token_id=2, seed=1)
        >>> out.sampled_ids.shape == out.greedy_ids.shape == (2, 5 + out.sampled_response_mask.shape[1])
        True
    """
    tokens, logprobs, alive = _rollout(
        model, input_ids, attention_mask, paired=True, max_new_tokens=max_new_tokens, temperature=temperature,
        top_k=top_k, top_p=top_p, min_p=min_p, eos_token_id=eos_token_id, pad_token_id=pad_token_id, seed=seed,
        cache_implementation=cache_implementation, use_cuda_graph=use_cuda_graph, check_every=check_every,
    )
    batch, prompt_length = input_ids.shape
    response_mask = alive.to(attention_mask.dtype)
    ids = torch.cat([input_ids.long().repeat(2, 1), tokens], dim=1)
    full_mask = torch.cat([attention_mask.repeat(2, 1), response_mask], dim=1)
    lengths = alive.sum(-1)
    s, g = slice(0, batch), slice(batch, 2 * batch)
    return PairedRollout(
        sampled_ids=ids[s], greedy_ids=ids[g],
        sampled_attention_mask=full_mask[s], greedy_attention_mask=full_mask[g],
        sampled_response_mask=response_mask[s], greedy_response_mask=response_mask[g],
        sampled_logprobs=logprobs[s], greedy_logprobs=logprobs[g],
        sampled_lengths=lengths[s], greedy_lengths=lengths[g],
        prompt_length=prompt_length,
    )


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
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    seed: int | torch.Tensor = 0,
    cache_implementation: str | None = None,
    use_cuda_graph: bool | None = None,
    check_every: int = 4,
) -> SampledRollout:
    """One sampled response per prompt, without a greedy one: exactly the sampled half of ``generate_pairs`` with
    the same arguments (the same random numbers per row), at half the decode rows. For the estimators that need no
    greedy baseline (REINFORCE, RLOO, GRPO, PPO).

    Args:
        as ``generate_pairs``.

    Returns:
        a ``SampledRollout``: the ``sampled_*`` fields of ``PairedRollout``.

    Example::

        >>> import torch, transformers, remax_kernels as rk
        >>> config = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
        ...     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
        >>> model = transformers.LlamaForCausalLM(config)
        >>> ids = torch.tensor([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12]])
        >>> mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
        >>> out = rk.generate_samples(model, ids, mask, max_new_tokens=8, temperature=0.7, eos_token_id=2, seed=1)
        >>> pairs = rk.generate_pairs(model, ids, mask, max_new_tokens=8, temperature=0.7, eos_token_id=2, seed=1)
        >>> bool((out.sampled_ids == pairs.sampled_ids[:, : out.sampled_ids.shape[1]]).all())
        True
    """
    tokens, logprobs, alive = _rollout(
        model, input_ids, attention_mask, paired=False, max_new_tokens=max_new_tokens, temperature=temperature,
        top_k=top_k, top_p=top_p, min_p=min_p, eos_token_id=eos_token_id, pad_token_id=pad_token_id, seed=seed,
        cache_implementation=cache_implementation, use_cuda_graph=use_cuda_graph, check_every=check_every,
    )
    response_mask = alive.to(attention_mask.dtype)
    return SampledRollout(
        sampled_ids=torch.cat([input_ids.long(), tokens], dim=1),
        sampled_attention_mask=torch.cat([attention_mask, response_mask], dim=1),
        sampled_response_mask=response_mask,
        sampled_logprobs=logprobs,
        sampled_lengths=alive.sum(-1),
        prompt_length=input_ids.shape[1],
    )


def _rollout(model, input_ids, attention_mask, *, paired, max_new_tokens, temperature, top_k, top_p, min_p,
             eos_token_id, pad_token_id, seed, cache_implementation, use_cuda_graph, check_every):
    """Checks the arguments of ``generate_pairs`` / ``generate_samples`` and decodes: ``[rows, R]`` tokens, log-probs
    and the alive mask."""
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
        raise TypeError(f"model: expected a Hugging Face causal LM (an nn.Module with a config), got {type(model)}")
    _check_prompts(model, input_ids, attention_mask)
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: expected an int >= 1, got {max_new_tokens!r}")
    temperature = check_temperature("temperature", temperature)
    check_sampling_options(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    param = next(model.parameters(), None)
    if param is not None and param.device != input_ids.device:
        raise ValueError(f"input_ids: is on {input_ids.device} but the model is on {param.device}")
    if isinstance(check_every, bool) or not isinstance(check_every, int) or check_every < 1:
        raise ValueError(f"check_every: expected an int >= 1, got {check_every!r}")
    if use_cuda_graph is None:
        use_cuda_graph = False
    if use_cuda_graph and input_ids.device.type != "cuda":
        raise ValueError(f"use_cuda_graph: CUDA graphs need CUDA tensors, got {input_ids.device}")
    if cache_implementation is None:
        cache_implementation = "static" if use_cuda_graph else "dynamic"
    if cache_implementation not in CACHE_IMPLEMENTATIONS:
        raise ValueError(f"cache_implementation: expected one of {CACHE_IMPLEMENTATIONS}, got {cache_implementation!r}")
    if use_cuda_graph and cache_implementation != "static":
        raise ValueError("cache_implementation: use_cuda_graph needs 'static' (CUDA graphs need fixed addresses)")
    generation_config = getattr(model, "generation_config", None)
    eos_ids = _token_ids("eos_token_id", eos_token_id, (generation_config, model.config))
    pad_ids = _token_ids("pad_token_id", pad_token_id, (generation_config, model.config))
    pad = pad_ids[0] if pad_ids else (eos_ids[0] if eos_ids else 0)

    batch, prompt_length = input_ids.shape
    device = input_ids.device
    seeds = _seeds(seed, batch, device, copies=2 if paired else 1)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            tokens, logprobs, alive = _decode(
                model, input_ids, attention_mask, max_new_tokens=max_new_tokens, temperature=temperature,
                top_k=top_k, top_p=top_p, min_p=min_p, eos_ids=eos_ids, pad=pad, seeds=seeds,
                static=cache_implementation == "static", step_compiler=_graph_step if use_cuda_graph else None,
                check_every=check_every, paired=paired,
            )
    finally:
        model.train(was_training)
    return tokens, logprobs, alive


@dataclass(frozen=True)
class _Sampler:
    """``sample_and_greedy``'s options parsed ONCE per rollout into per-row device tensors (rows ``[0, B)`` sample,
    ``[B, 2B)``, if any, are greedy); calling it runs the op on a step's logits with the step as a device tensor, so a
    compiled or graph-captured decode step is the same graph at every step."""

    greedy_mask: torch.Tensor
    temperature: torch.Tensor
    top_k: torch.Tensor
    top_p: torch.Tensor
    log_min_p: torch.Tensor
    seeds: torch.Tensor
    key_row: bool
    truncate: bool

    @classmethod
    def parse(cls, rows: int, vocab: int, device, *, greedy_from: int, temperature, top_k, top_p, min_p,
              seeds) -> _Sampler:
        """Rows ``[greedy_from, rows)`` are greedy (none when ``greedy_from == rows``)."""
        greedy_mask = torch.arange(rows, device=device) >= greedy_from
        parsed = parse_options(rows, vocab, device, greedy_mask, temperature, top_k, top_p, min_p, seeds, "processed")
        temp, k, p, log_min_p, seed_rows, greedy_mask, key_row, truncate = parsed
        return cls(greedy_mask, temp, k, p, log_min_p, seed_rows, key_row, truncate)

    def __call__(self, logits: torch.Tensor, step: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.ops.remax_kernels.sample_and_greedy(
            logits, self.greedy_mask, self.temperature, self.top_k, self.top_p, self.log_min_p, self.seeds,
            self.key_row, step, self.truncate, False, "auto")


def _pick(sampler, logits, step, finished, eos, pad: int):
    """The next token of every row and its bookkeeping: rows that finished emit ``pad`` with log-prob 0."""
    token, logp = sampler(logits, step)
    token = torch.where(finished, pad, token)
    logp = logp.masked_fill(finished, 0.0)
    alive = ~finished
    return token, logp, alive, finished | torch.isin(token, eos)


def _decode_step(model, inputs: dict, sampler, step, finished, eos, pad: int, keep_outputs: bool):
    """One decode step, all on the device: the model's forward of the step's inputs (its cache updated in place),
    the next tokens, EOS bookkeeping. Compiled whole (``torch.compile``; CUDA graphs with ``use_cuda_graph``), where
    ``keep_outputs`` is False: the static path's state is all in the cache, nothing else leaves the graph."""
    outputs = model(**inputs, return_dict=True)
    logits = outputs.logits[:, -1, :]
    token, logp, alive, finished = _pick(sampler, logits, step, finished, eos, pad)
    return (outputs if keep_outputs else {}), token, logp, alive, finished, step + 1


@functools.lru_cache(maxsize=1)
def _graph_step_fn():
    # Compiled once per process; torch.compile specializes it per model and shape. "reduce-overhead" captures the
    # step in a CUDA graph: at small batch a decode step is launch-bound (hundreds of small kernels).
    return torch.compile(_decode_step, mode="reduce-overhead", fullgraph=True)


def _graph_step(_step_fn):
    return _graph_step_fn()


def _bucketed(input_ids, attention_mask, pad: int):
    """Left-pad the prompts to the next multiple of ``PROMPT_BUCKET`` tokens (the compiled step's shapes, hence its
    graphs, then depend on the bucket, not on each batch's longest prompt)."""
    extra = -input_ids.shape[1] % PROMPT_BUCKET
    if extra == 0:
        return input_ids, attention_mask
    return (torch.cat([input_ids.new_full((input_ids.shape[0], extra), pad), input_ids], dim=1),
            torch.cat([attention_mask.new_zeros((attention_mask.shape[0], extra)), attention_mask], dim=1))


def _prefill(model, stepper: _Stepper, ids, mask, *, static: bool, max_cache_len: int, use_cache: bool):
    """The prompts' forward with a new cache: ``[rows, V]`` last logits and the model kwargs of the first step."""
    cache = _new_cache(stepper, static=static, max_cache_len=max_cache_len)
    model_kwargs = _initial_kwargs(stepper, mask, cache, use_cache=use_cache)
    outputs = model(**_step_inputs(stepper, ids, model_kwargs, first=True), return_dict=True)
    return outputs.logits[:, -1, :], _next_kwargs(stepper, outputs, model_kwargs)


def _check_static_state(stepper: _Stepper, model_kwargs: dict, module_state: bool) -> None:
    """The static path carries the StaticCache and the mask/positions only: refuse a model with more state."""
    from transformers import StaticCache

    extra = sorted(set(model_kwargs) - _SHAREABLE_KWARGS)
    if module_state or extra or not isinstance(model_kwargs.get(stepper.cache_key), StaticCache):
        where = "on its modules" if module_state else f"in {extra or 'its own cache class'}"
        raise ValueError(
            f"cache_implementation: 'static' cannot carry the state {type(stepper.owner).__name__} keeps {where}; "
            "use cache_implementation='dynamic' (use_cuda_graph off)"
        )


def _decode(
    model, input_ids, attention_mask, *, max_new_tokens, temperature, top_k, top_p, min_p, eos_ids, pad, seeds,
    static, step_compiler, check_every, paired: bool = True,
):
    """The prefill + decode loop: ``paired`` decodes ``2B`` rows (sampled, then greedy), else the ``B`` sampled rows
    alone. Returns ``[rows, R]`` tokens, float32 log-probs and the bool alive mask.

    Every forward's inputs come from the model's own ``prepare_inputs_for_generation`` and its state from
    ``_update_model_kwargs_for_generation``, as in ``model.generate`` (``_Stepper``). The paired loop prefills the
    ``B`` prompts once and duplicates the state when all of it is a transformers Cache plus the mask and positions
    (``Cache.reorder_cache`` covers every layer type); a model with other state (RWKV, XLNet, state kept on its
    modules as RecurrentGemma does) prefills the ``2B`` rows instead, so both halves start from their own copy.

    ``step_compiler`` (None = eager) wraps ``_decode_step``; the host reads ``finished`` every ``check_every``
    steps only (one device sync each), so up to ``check_every - 1`` steps run after the last row has finished:
    they emit padding and are cut from the result.
    """
    if step_compiler is not None:
        input_ids, attention_mask = _bucketed(input_ids, attention_mask, pad)
    batch, prompt_length = input_ids.shape
    copies = 2 if paired else 1
    rows, device = copies * batch, input_ids.device
    max_cache_len = prompt_length + max_new_tokens
    stepper = _stepper(model)
    if rows > 1 and type(stepper.owner).__name__ in _MIXES_BATCH_ROWS:
        raise ValueError(
            f"model: {type(stepper.owner).__name__}'s forward mixes the rows of a batch on one-token steps (its "
            f"state broadcasts across the batch), so a rollout of {rows} rows would be wrong; decode one prompt at a "
            "time with generate_samples"
        )
    refused = _ROLLOUT_REFUSED.get(type(stepper.owner).__name__)
    if refused is not None:
        raise ValueError(
            f"model: {type(stepper.owner).__name__} is not supported by generate_pairs / generate_samples: {refused}; "
            "use model.generate"
        )
    generation_config = getattr(stepper.owner, "generation_config", None)
    use_cache = static or getattr(generation_config, "use_cache", True) is not False
    ids, mask = input_ids.long(), attention_mask.long()

    before = _module_tensors(model, batch)
    logits, model_kwargs = _prefill(model, stepper, ids, mask, static=static, max_cache_len=max_cache_len,
                                    use_cache=use_cache)
    changed = [value for key, value in _module_tensors(model, batch).items() if before.get(key) is not value]
    if static:
        _check_static_state(stepper, model_kwargs, bool(changed))
    if changed:
        # State kept on modules outlives a call: that prefill started from the last call's (RecurrentGemma reads
        # it at padded slots). Start again from zeros, the state a fresh model sets up, with all the rows.
        for value in changed:
            value.zero_()
    if changed or copies > 1:
        shared = None if changed else _shared_prefill(stepper, model_kwargs, batch, copies)
        if shared is not None:
            logits, model_kwargs = logits.repeat(copies, 1), shared
        else:
            logits, model_kwargs = _prefill(model, stepper, ids.repeat(copies, 1), mask.repeat(copies, 1),
                                            static=static, max_cache_len=max_cache_len, use_cache=use_cache)
        ids = ids.repeat(copies, 1)
    if static:
        cache = model_kwargs[stepper.cache_key]
        _mark_static(cache)
        if step_compiler is not None:
            model_kwargs[stepper.cache_key] = _graph_cache(model, cache, rows, max_cache_len)
    step_fn = step_compiler(_decode_step) if step_compiler is not None else _decode_step
    sampler = _Sampler.parse(rows, logits.shape[-1], device, greedy_from=batch if paired else rows,
                             temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, seeds=seeds)

    eos = torch.tensor(eos_ids, dtype=torch.int64, device=device)
    step = torch.zeros(1, dtype=torch.int64, device=device)
    tokens = torch.full((rows, max_new_tokens), pad, dtype=torch.int64, device=device)
    logprobs = torch.zeros((rows, max_new_tokens), dtype=torch.float32, device=device)
    alive = torch.zeros((rows, max_new_tokens), dtype=torch.bool, device=device)
    token, logp, alive[:, 0], finished = _pick(sampler, logits, step, torch.zeros(rows, dtype=torch.bool,
                                                                                   device=device), eos, pad)
    tokens[:, 0], logprobs[:, 0] = token, logp
    step = step + 1
    logits = None  # the prefill's [2B, V] logits are not needed any more
    for t in range(1, max_new_tokens):
        if t % check_every == 0 and bool(finished.all()):
            break
        ids = torch.cat([ids, token[:, None]], dim=1)
        inputs = _step_inputs(stepper, ids, model_kwargs, first=False)
        if step_compiler is not None and device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()
        outputs, token, logp, alive_t, finished, step = step_fn(
            model, inputs, sampler, step, finished, eos, pad, not static)
        model_kwargs = _next_kwargs(stepper, outputs, model_kwargs)
        # Copied out before the next step: a CUDA-graph replay overwrites its outputs.
        tokens[:, t], logprobs[:, t], alive[:, t] = token, logp, alive_t
    # R = the steps up to the one where the last row emitted its EOS (one device sync).
    steps = int(alive.any(0).nonzero().max()) + 1
    return tokens[:, :steps], logprobs[:, :steps], alive[:, :steps]
