"""ReMax and the fused kernels inside Hugging Face TRL.

Two entry points:

- ``ReMaxTrainer`` / ``ReMaxConfig``: ReMax (Li et al., 2023) as a TRL trainer, built on TRL's ``GRPOTrainer`` so
  that TRL's datasets (standard or conversational prompts), reward functions (callables, sync or async, reward-model
  ids/paths, several weighted rewards, ``None`` for "not applicable"), logging, callbacks, checkpointing, PEFT and
  accelerate paths are TRL's own. For each prompt the policy decodes one sampled completion (the config's
  temperature / top-k / top-p / min-p) and one greedy completion; the reward functions score both; the advantage of
  the sampled completion is ``r(sampled) - r(greedy)`` through ``remax_kernels.remax_advantages`` (``clip_reward``,
  ``gamma``, KL shaping with ``kl_in_reward``); the loss is ``remax_kernels.hf.causal_lm_policy_loss``, computed
  from the policy's last hidden states without ``[B, T, V]`` logits. Generation is ``remax_kernels.generate_pairs``
  (one prefill shared by both completions) unless TRL uses vLLM; then each prompt gets one sampled and one greedy
  (temperature 0) request through TRL's vLLM backend.
- ``use_remax_kernels(trainer)``: TRL's own ``GRPOTrainer`` or ``RLOOTrainer`` with its per-token log-probs and
  entropies computed by ``remax_kernels.hf.causal_lm_logprobs`` and, for the GRPO losses that the fused op
  expresses exactly, the loss by ``causal_lm_policy_loss``; values and gradients equal TRL's within float
  tolerance. Only the given trainer instance (and the forward of the models it owns) is patched.

How the kernels run inside TRL: the model instances the trainer owns get a forward that takes one extra keyword,
``remax_kernels_request`` (TRL's own fused lm-head is installed the same way). The trainer calls
``model(input_ids=..., attention_mask=..., remax_kernels_request=...)`` through whatever wraps the model
(DistributedDataParallel, FSDP, DeepSpeed, PEFT, accelerate's autocast), so the wrappers' hooks run as for any
forward; inside, the request runs the backbone and the fused lm-head op. Without the keyword the forward is the
previous one, so ``generate`` and TRL's own paths are unchanged.

Supported TRL versions: ``SUPPORTED_TRL_VERSIONS`` (checked when this module is imported). The integration overrides
private TRL methods (``_get_per_token_logps_and_entropies``, ``_compute_loss``, ``_generate_single_turn``,
``_calculate_rewards``, ``_generate_and_score_completions``), whose signatures change between TRL minor versions.

Tested here (CPU): the transformers generation path, PEFT (LoRA), single process. Not tested: the vLLM path (vLLM is
not installable on the CPU development machine; it is written from TRL 1.16's ``VLLMGeneration`` code),
multi-process DDP, FSDP and DeepSpeed ZeRO-1/2. DeepSpeed ZeRO-3 is refused: the fused log-prob backward re-reads
the lm-head weight, which ZeRO-3 releases after the forward.
"""

from __future__ import annotations

import functools
import types
import warnings
from dataclasses import dataclass, field

import torch
from packaging.version import Version

from remax_kernels.advantages import KL_MODES, remax_advantages
from remax_kernels.hf import causal_lm_logprobs, causal_lm_policy_loss
from remax_kernels.losses import KL_ESTIMATORS, LOSS_AGG_MODES, policy_loss

SUPPORTED_TRL_VERSIONS = ">=1.16,<1.17"
_TRL_MIN, _TRL_END = Version("1.16"), Version("1.17")


def check_trl_version(version: str) -> None:
    """Raise ImportError unless ``version`` (a TRL version string) is in ``SUPPORTED_TRL_VERSIONS``."""
    try:
        release = Version(Version(version).base_version)
    except Exception as err:
        raise ImportError(
            f"remax_kernels.integrations.trl supports TRL {SUPPORTED_TRL_VERSIONS}; cannot parse the installed "
            f"version {version!r}"
        ) from err
    if not _TRL_MIN <= release < _TRL_END:
        raise ImportError(
            f"remax_kernels.integrations.trl supports TRL {SUPPORTED_TRL_VERSIONS}, found trl {version}: it overrides "
            f"private TRL methods that change between minor versions. Install a supported one: "
            f"pip install 'trl{SUPPORTED_TRL_VERSIONS}'"
        )


try:
    import trl
except ImportError as _err:
    raise ImportError(
        f"remax_kernels.integrations.trl needs TRL {SUPPORTED_TRL_VERSIONS}: pip install 'remax-kernels[trl]'"
    ) from _err
check_trl_version(trl.__version__)

from accelerate.utils import is_peft_model  # noqa: E402
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled  # noqa: E402
from trl import GRPOConfig, GRPOTrainer, RLOOTrainer  # noqa: E402
from trl.extras.profiling import profiling_context  # noqa: E402
from trl.models import unwrap_model_for_generation  # noqa: E402
from trl.models.utils import disable_gradient_checkpointing  # noqa: E402
from trl.trainer.utils import nanmax, nanmin, pad  # noqa: E402

from remax_kernels.generation import CACHE_IMPLEMENTATIONS, generate_pairs  # noqa: E402

__all__ = ["SUPPORTED_TRL_VERSIONS", "ReMaxConfig", "ReMaxTrainer", "check_trl_version", "use_remax_kernels"]

_REQUEST_KWARG = "remax_kernels_request"
# Inputs of vision-language batches: the kernels' forward is text-only, so batches carrying them take TRL's path.
_MULTIMODAL_KEYS = (
    "pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes", "num_tiles",
    "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids",
)


# --- the model-side request: runs inside the model's own forward call ---------------------------------------------


def _position_ids(input_ids: torch.Tensor, positions: str) -> torch.Tensor | None:
    """``"mask"``: None, i.e. ``cumsum(attention_mask) - 1`` (the positions generation used for left-padded
    prompts); ``"arange"``: ``0 .. L-1`` per row, what a Hugging Face model uses when TRL passes no positions."""
    if positions == "mask":
        return None
    batch, length = input_ids.shape
    return torch.arange(length, device=input_ids.device).expand(batch, length)


@dataclass
class _LogProbsRequest:
    """Log-probs (and entropies) of the last ``logits_to_keep`` tokens; positions with attention 0 give 0."""

    logits_to_keep: int
    temperature: float
    return_entropy: bool
    positions: str

    # ``unused``: the None-valued keywords a PEFT wrapper adds on its way to the wrapped model's forward.
    def __call__(self, model, input_ids, attention_mask, **unused):
        return causal_lm_logprobs(
            model, input_ids, attention_mask, response_mask=attention_mask[:, -self.logits_to_keep:],
            position_ids=_position_ids(input_ids, self.positions), temperature=self.temperature,
            return_entropy=self.return_entropy,
        )


@dataclass
class _PolicyLossRequest:
    """``causal_lm_policy_loss`` over the last ``response_mask.shape[1]`` tokens; returns ``(loss, metrics)``."""

    response_mask: torch.Tensor
    advantages: torch.Tensor
    temperature: float
    positions: str
    options: dict

    def __call__(self, model, input_ids, attention_mask, **unused):
        return causal_lm_policy_loss(
            model, input_ids, attention_mask, self.response_mask, self.advantages,
            position_ids=_position_ids(input_ids, self.positions), temperature=self.temperature, **self.options,
        )


def _install_kernel_forward(model: torch.nn.Module) -> None:
    """Give ``model`` (an unwrapped ``*ForCausalLM``) a forward that runs a ``remax_kernels_request`` when one is
    passed and is the previous forward otherwise. Idempotent."""
    if getattr(model, "_remax_kernels_forward", False):
        return
    previous = model.forward

    # The original signature stays visible (generate and generate_pairs inspect it to pick their keywords).
    @functools.wraps(type(model).forward)
    def forward(self, *args, remax_kernels_request=None, **kwargs):
        if remax_kernels_request is None:
            return previous(*args, **kwargs)
        if args:
            raise TypeError("remax_kernels_request: pass input_ids and attention_mask as keywords")
        return remax_kernels_request(self, **kwargs)

    model.forward = types.MethodType(forward, model)
    model._remax_kernels_forward = True


def _check_trainer_setup(trainer) -> None:
    """Refuse set-ups the kernels cannot serve, before any step runs."""
    if is_deepspeed_zero3_enabled():
        raise ValueError(
            "deepspeed: ZeRO-3 is not supported by remax_kernels' TRL integration (the fused log-prob backward "
            "re-reads the lm-head weight, which ZeRO-3 releases after the forward); use ZeRO-1/2 or FSDP"
        )
    if getattr(trainer.args, "cast_lm_head_to_fp32", False):
        raise ValueError(
            "cast_lm_head_to_fp32: not supported with remax_kernels (the fused op picks the lm-head precision and "
            "accumulates in fp32); set it to False"
        )
    head = trainer.accelerator.unwrap_model(trainer.model).get_output_embeddings()
    if not isinstance(head, torch.nn.Linear) or type(head).forward is not torch.nn.Linear.forward:
        raise ValueError(
            f"model: its output embedding ({type(head).__name__}) is not a plain torch.nn.Linear; the fused "
            "kernels read its weight directly"
        )


def _install_on_trainer_models(trainer) -> None:
    policy = trainer.accelerator.unwrap_model(trainer.model)
    # A PEFT wrapper forwards unknown keywords to the wrapped model, where the forward is installed (as TRL does).
    _install_kernel_forward(policy.get_base_model() if is_peft_model(policy) else policy)
    if trainer.ref_model is not None:
        _install_kernel_forward(trainer.accelerator.unwrap_model(trainer.ref_model))


def _kernel_logps_and_entropies(
    trainer, model, input_ids, attention_mask, logits_to_keep: int, batch_size, compute_entropy: bool, positions: str
):
    """TRL's ``(logps [B, K], entropies [B, K] or None)`` through ``causal_lm_logprobs``, ``batch_size`` rows a call."""
    batch_size = batch_size or input_ids.size(0)
    logps, entropies = [], []
    request = _LogProbsRequest(logits_to_keep, trainer.temperature, compute_entropy, positions)
    with profiling_context(trainer, "remax_kernels.logprobs"):
        for start in range(0, input_ids.size(0), batch_size):
            rows = slice(start, start + batch_size)
            with trainer.accelerator.autocast():
                out = model(input_ids=input_ids[rows], attention_mask=attention_mask[rows], **{_REQUEST_KWARG: request})
            logp, entropy = out if compute_entropy else (out, None)
            logps.append(logp)
            entropies.append(entropy)
    return torch.cat(logps), (torch.cat(entropies) if compute_entropy else None)


def _global_token_mean(trainer, local_mean: torch.Tensor, n_tokens: torch.Tensor) -> float:
    """A token mean over every process's response tokens, from each process's own mean and token count."""
    n_tokens = n_tokens.float()
    totals = trainer.accelerator.reduce(torch.stack([local_mean.float() * n_tokens, n_tokens]), reduction="sum")
    return (totals[0] / totals[1].clamp(min=1.0)).item()


# --- use_remax_kernels: TRL's GRPO and RLOO trainers ----------------------------------------------------------------

# TRL's GRPO aggregations as the fused op's: "dr_grpo" and "dapo" are "seq-mean-token-sum" rescaled below.
_GRPO_AGGREGATION = {
    "grpo": "seq-mean-token-mean",
    "bnpo": "token-mean",
    "dr_grpo": "seq-mean-token-sum",
    "dapo": "seq-mean-token-sum",
}


def _grpo_fused_loss_unsupported(trainer) -> str | None:
    """Why the fused op cannot compute this GRPO trainer's loss exactly (None when it can)."""
    args = trainer.args
    if trainer.loss_type not in _GRPO_AGGREGATION:
        return f"loss_type={trainer.loss_type!r} (supported: {sorted(_GRPO_AGGREGATION)})"
    if trainer.importance_sampling_level != "token":
        return f"importance_sampling_level={trainer.importance_sampling_level!r}"
    if args.delta is not None:
        return "delta (two-sided clipping) is set"
    if trainer.off_policy_mask_threshold is not None:
        return "off_policy_mask_threshold is set"
    if trainer.top_entropy_quantile < 1.0:
        return "top_entropy_quantile < 1"
    if trainer.use_vllm and trainer.vllm_importance_sampling_correction:
        return "vllm_importance_sampling_correction (a per-token weight the fused op does not take)"
    if trainer.beta != 0 and args.use_bias_correction_kl:
        return "use_bias_correction_kl"
    if trainer.aux_loss_enabled:
        return "the MoE router auxiliary loss"
    if trainer.use_adaptive_entropy:
        return "use_adaptive_entropy"
    if trainer.entropy_coef != 0 and trainer.loss_type != "bnpo":
        # TRL's entropy bonus is a token mean whatever the loss type; only "bnpo" aggregates it the same way.
        return f"entropy_coef != 0 with loss_type={trainer.loss_type!r} (only 'bnpo' aggregates it like TRL)"
    return None


def _grpo_fused_compute_loss(trainer, trl_compute_loss, model, inputs):
    """GRPO's on-policy loss by ``causal_lm_policy_loss``, equal to TRL's value and gradient; TRL's code otherwise."""
    if inputs.get("old_per_token_logps") is not None or any(key in inputs for key in _MULTIMODAL_KEYS):
        # Off-policy ratios (num_iterations > 1, generation not aligned with the optimizer steps) or images: TRL's
        # loss on the kernels' log-probs.
        return trl_compute_loss(model, inputs)
    prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
    completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
    mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
    advantages = inputs["advantages"]
    mode = "train" if trainer.model.training else "eval"
    accumulation = trainer.current_gradient_accumulation_steps if mode == "train" else 1.0
    options = {"loss_agg_mode": _GRPO_AGGREGATION[trainer.loss_type]}
    if trainer.beta != 0.0:
        options.update(ref_logprobs=inputs["ref_per_token_logps"], kl_coef=trainer.beta, kl_estimator="k3")
    if trainer.entropy_coef != 0.0:
        options["entropy_coef"] = trainer.entropy_coef
    request = _PolicyLossRequest(mask, advantages, trainer.temperature, "arange", options)
    with profiling_context(trainer, "remax_kernels.policy_loss"), trainer.accelerator.autocast():
        loss, metrics = model(input_ids=input_ids, attention_mask=attention_mask, **{_REQUEST_KWARG: request})

    # On policy TRL's surrogate is -A * exp(logp - logp.detach()): value -A, gradient -A * grad logp. The fused loss is
    # -A * logp: the same gradient, so only its value is shifted (by a constant) to the value TRL reports.
    ones = torch.ones(mask.shape, dtype=torch.float32, device=mask.device)
    at_ratio_one, _ = policy_loss(ones, advantages, mask, loss_agg_mode=options["loss_agg_mode"])
    loss = loss + (at_ratio_one - metrics["pg_loss"]).detach()
    if trainer.loss_type in ("grpo", "bnpo"):
        scale = 1.0 / accumulation
    elif trainer.loss_type == "dr_grpo":
        scale = 1.0 / (trainer.max_completion_length * accumulation)
    else:  # dapo: the active-token count of the whole generation batch, per process and accumulation window
        normalizer = inputs["num_items_in_batch"].clamp(min=1.0) / trainer.accelerator.num_processes
        if mode == "train":
            normalizer = normalizer * accumulation / trainer.args.steps_per_generation
        scale = mask.shape[0] / normalizer

    n_tokens = metrics["response_tokens"]
    if trainer.entropy_coef != 0.0:  # "bnpo" only (see _grpo_fused_loss_unsupported)
        policy_value = loss.detach() + trainer.entropy_coef * metrics["entropy"]
        trainer._metrics[mode]["policy_loss"].append(trainer.accelerator.gather(policy_value).nanmean().item())
        if mode == "train" and trainer.accelerator.sync_gradients:
            trainer._metrics[mode]["entropy_coef"].append(trainer.entropy_coef)
    if trainer.beta != 0.0:
        trainer._metrics[mode]["kl"].append(_global_token_mean(trainer, metrics["kl"], n_tokens))
    if "entropy" in metrics:
        trainer._metrics[mode]["entropy"].append(_global_token_mean(trainer, metrics["entropy"], n_tokens))
    # On policy every ratio is exactly 1, so nothing is clipped; logged as TRL logs it (NaN for empty rows).
    for name in ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"):
        trainer._metrics[mode][name].append(0.0)
    per_sequence = torch.zeros(mask.shape[0], device=mask.device).masked_fill(mask.sum(-1) == 0, float("nan"))
    gathered = trainer.accelerator.gather(per_sequence)
    trainer._metrics[mode]["clip_ratio/low_min"].append(nanmin(gathered).item())
    trainer._metrics[mode]["clip_ratio/high_max"].append(nanmax(gathered).item())
    return loss * scale


def use_remax_kernels(trainer, *, fused_loss: bool = True):
    """Compute a TRL ``GRPOTrainer``'s or ``RLOOTrainer``'s log-probs and entropies (and GRPO's loss) with the
    remax_kernels fused ops. Patches this trainer instance only; returns it.

    After the call:

    - per-token log-probs and entropies (the training forward, and the old-policy and reference log-probs at
      generation time) come from ``remax_kernels.hf.causal_lm_logprobs``: the lm-head runs as the fused op, never
      holding ``[B, T, V]`` logits (TRL's own code holds fp32 logits of up to 32768 tokens at once). Positions are
      TRL's (``0 .. L-1``, as the model computes them when TRL passes none). Vision-language batches and the MoE
      auxiliary loss keep TRL's code;
    - with ``fused_loss`` (GRPO only): the loss is ``remax_kernels.hf.causal_lm_policy_loss`` when it is exactly
      TRL's: ``loss_type`` in grpo / bnpo / dr_grpo / dapo, token-level importance sampling, on-policy batches (no
      ``old_per_token_logps``: ``num_iterations=1`` and generation aligned with the optimizer steps, TRL's
      default), KL to the reference (k3) and the entropy bonus (bnpo only). The logged loss, ``kl``, ``entropy``
      and clip metrics are TRL's (the fused loss always computes the entropy, at no extra read). Other
      configurations warn once and use TRL's loss code on the kernels' log-probs. RLOO's loss (a sequence-level
      ratio) is always TRL's code on the kernels' log-probs.

    Results equal TRL's within float tolerance (tested for values and gradients in ``tests/test_trl_integration.py``).

    Args:
        trainer: a ``trl.GRPOTrainer`` or ``trl.RLOOTrainer`` (a ``ReMaxTrainer`` already uses the kernels and is
            returned as is).
        fused_loss: compute GRPO's loss with the fused op where it is exact (see above).

    Returns:
        ``trainer``.

    Raises:
        TypeError: for another trainer type. ValueError: DeepSpeed ZeRO-3, ``cast_lm_head_to_fp32``, or an output
        embedding that is not a plain ``nn.Linear``.

    Example::

        trainer = GRPOTrainer(model=model, reward_funcs=reward, args=GRPOConfig(...), train_dataset=dataset)
        use_remax_kernels(trainer)
        trainer.train()
    """
    if isinstance(trainer, ReMaxTrainer):
        return trainer
    if not isinstance(trainer, (GRPOTrainer, RLOOTrainer)):
        raise TypeError(f"trainer: expected a trl.GRPOTrainer or trl.RLOOTrainer, got {type(trainer).__name__}")
    if not isinstance(fused_loss, bool):
        raise TypeError(f"fused_loss: expected a bool, got {type(fused_loss).__name__}")
    if getattr(trainer, "_remax_kernels", False):
        return trainer
    _check_trainer_setup(trainer)
    _install_on_trainer_models(trainer)

    trl_logps = trainer._get_per_token_logps_and_entropies

    def get_per_token_logps_and_entropies(
        model, input_ids, attention_mask, logits_to_keep, batch_size=None, compute_entropy=False,
        compute_aux_loss=False, **multimodal,
    ):
        if compute_aux_loss or any(value is not None for value in multimodal.values()):
            return trl_logps(
                model, input_ids, attention_mask, logits_to_keep, batch_size=batch_size,
                compute_entropy=compute_entropy, compute_aux_loss=compute_aux_loss, **multimodal,
            )
        logps, entropies = _kernel_logps_and_entropies(
            trainer, model, input_ids, attention_mask, logits_to_keep, batch_size, compute_entropy, "arange"
        )
        return logps, entropies, None

    trainer._get_per_token_logps_and_entropies = get_per_token_logps_and_entropies
    if fused_loss and isinstance(trainer, GRPOTrainer):
        reason = _grpo_fused_loss_unsupported(trainer)
        if reason is None:
            trainer._compute_loss = functools.partial(_grpo_fused_compute_loss, trainer, trainer._compute_loss)
        else:
            warnings.warn(
                f"use_remax_kernels: the loss stays TRL's code (on the fused log-probs) because of {reason}",
                UserWarning,
                stacklevel=2,
            )
    trainer._remax_kernels = True
    return trainer


# --- ReMax as a TRL trainer -----------------------------------------------------------------------------------------


@dataclass
class ReMaxConfig(GRPOConfig):
    """Configuration of ``ReMaxTrainer``: TRL's ``GRPOConfig`` with ReMax's advantage and loss options.

    Everything in ``GRPOConfig`` keeps its meaning (batch sizes, generation options, ``beta``, ``epsilon`` for
    ``num_iterations > 1``, ``mask_truncated_completions``, logging, vLLM, ...) except the fields fixed by ReMax:
    ``num_generations`` is 2 (one sampled, one greedy completion per prompt; ``per_device_train_batch_size`` counts
    both, as in GRPO, and must be even: each step trains on half of it, the sampled completions),
    ``scale_rewards="none"``, ``loss_type="remax"`` (the aggregation is ``loss_agg_mode``), and
    ``repetition_penalty=1`` (the greedy baseline is plain argmax decoding). Options of GRPO variants that ReMax does
    not have (``delta``, ``top_entropy_quantile``, ``off_policy_mask_threshold``, adaptive entropy, sequence-level
    importance sampling, ``normalize_then_sum``) are refused with a ValueError naming them; the KL term in the loss
    (``beta`` without ``kl_in_reward``) is ``kl_estimator``'s, not weighted by the ratio (``use_bias_correction_kl``
    is not used).

    The official ReMax code corresponds to ``gamma=0.99, clip_reward=5.0, kl_in_reward=True, kl_mode="one-step",
    beta=0.05..0.1, loss_agg_mode="token-mean"``, verl's ReMax to ``kl_in_reward=True, kl_mode="sum"``.

    Args (the fields added to ``GRPOConfig``):
        loss_agg_mode: how per-token losses are aggregated (``remax_kernels.losses.LOSS_AGG_MODES``); default
            ``"token-mean"``, the paper's. ``"seq-mean-token-sum-norm"`` divides by ``max_completion_length``.
        kl_in_reward: False (default): ``beta`` weighs a KL-to-reference term in the loss (``kl_estimator``), as in
            GRPO. True: ``beta`` shapes the advantage with the per-token k1 KL ``log pi_old - log pi_ref`` of the
            rollout (``remax_advantages(kl_coef=beta, kl_mode=..., gamma=...)``), as the official ReMax code.
        kl_estimator: ``"k1"``, ``"k2"`` or ``"k3"`` (default, TRL GRPO's) for the KL term in the loss.
        kl_mode: ``"sum"`` (KL summed from each token to the end, verl) or ``"one-step"`` (each token's own KL,
            official ReMax), for ``kl_in_reward``.
        gamma: discount in (0, 1] of the reward difference over the response tokens (official ReMax: 0.99).
        clip_reward: clamp ``r(sampled) - r(greedy)`` to ``[-clip_reward, clip_reward]`` (official: 5.0); None = off.
        whiten_advantages: whiten the advantages over each process's batch (zero mean, unit variance).
    """

    num_generations: int | None = field(
        default=2,
        metadata={"help": "Completions per prompt: always 2 in ReMax (one sampled, one greedy)."},
    )
    scale_rewards: str = field(
        default="none",
        metadata={"help": "Always 'none' in ReMax: the advantage is r(sampled) - r(greedy) (see whiten_advantages)."},
    )
    loss_type: str = field(
        default="remax",
        metadata={"help": "Always 'remax': the REINFORCE loss with the greedy baseline, aggregated by loss_agg_mode."},
    )
    loss_agg_mode: str = field(
        default="token-mean",
        metadata={"help": f"Aggregation of the per-token losses, one of {LOSS_AGG_MODES}."},
    )
    kl_in_reward: bool = field(
        default=False,
        metadata={"help": "Use beta to shape the advantage with the rollout's per-token KL (official ReMax) instead "
                          "of a KL term in the loss."},
    )
    kl_estimator: str = field(
        default="k3",
        metadata={"help": f"KL estimator of the KL term in the loss, one of {KL_ESTIMATORS}."},
    )
    kl_mode: str = field(
        default="sum",
        metadata={"help": f"KL shaping of the advantage with kl_in_reward, one of {KL_MODES}."},
    )
    gamma: float = field(
        default=1.0,
        metadata={"help": "Discount in (0, 1] of the reward difference over the response tokens."},
    )
    clip_reward: float | None = field(
        default=None,
        metadata={"help": "Clamp r(sampled) - r(greedy) to [-clip_reward, clip_reward]; None = no clipping."},
    )
    whiten_advantages: bool = field(
        default=False,
        metadata={"help": "Whiten the advantages over each process's batch."},
    )

    def __post_init__(self):
        super().__post_init__()
        fixed = {
            "num_generations": (self.num_generations, (2,)),
            "num_generations_eval": (self.num_generations_eval, (None, 2)),
            "scale_rewards": (self.scale_rewards, ("none",)),
            "loss_type": (self.loss_type, ("remax",)),
            "repetition_penalty": (self.repetition_penalty, (1.0,)),
            "importance_sampling_level": (self.importance_sampling_level, ("token",)),
            "multi_objective_aggregation": (self.multi_objective_aggregation, ("sum_then_normalize",)),
            "delta": (self.delta, (None,)),
            "off_policy_mask_threshold": (self.off_policy_mask_threshold, (None,)),
            "top_entropy_quantile": (self.top_entropy_quantile, (1.0,)),
            "use_adaptive_entropy": (self.use_adaptive_entropy, (False,)),
            "use_transformers_continuous_batching": (self.use_transformers_continuous_batching, (False,)),
            "cast_lm_head_to_fp32": (self.cast_lm_head_to_fp32, (False,)),
        }
        for name, (value, allowed) in fixed.items():
            if value not in allowed:
                raise ValueError(f"{name}: ReMax needs {' or '.join(map(repr, allowed))}, got {value!r}")
        if self.loss_agg_mode not in LOSS_AGG_MODES:
            raise ValueError(f"loss_agg_mode: must be one of {LOSS_AGG_MODES}, got {self.loss_agg_mode!r}")
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"kl_estimator: must be one of {KL_ESTIMATORS}, got {self.kl_estimator!r}")
        if self.kl_mode not in KL_MODES:
            raise ValueError(f"kl_mode: must be one of {KL_MODES}, got {self.kl_mode!r}")
        if not isinstance(self.kl_in_reward, bool):
            raise TypeError(f"kl_in_reward: expected a bool, got {type(self.kl_in_reward).__name__}")
        if not isinstance(self.whiten_advantages, bool):
            raise TypeError(f"whiten_advantages: expected a bool, got {type(self.whiten_advantages).__name__}")
        if not 0 < self.gamma <= 1:
            raise ValueError(f"gamma: must be in (0, 1], got {self.gamma!r}")
        if self.clip_reward is not None and not self.clip_reward > 0:
            raise ValueError(f"clip_reward: must be > 0 or None, got {self.clip_reward!r}")
        if not isinstance(self.max_completion_length, int) or self.max_completion_length < 1:
            raise ValueError(f"max_completion_length: expected an int >= 1, got {self.max_completion_length!r}")
        if self.cache_implementation not in (None, *CACHE_IMPLEMENTATIONS):
            raise ValueError(
                f"cache_implementation: ReMax decodes with generate_pairs, which takes None or one of "
                f"{CACHE_IMPLEMENTATIONS}, got {self.cache_implementation!r}"
            )
        # Pairs must not straddle processes or micro-batches: every process's slice starts on a pair boundary.
        if self.per_device_train_batch_size % 2:
            raise ValueError(
                f"per_device_train_batch_size: must be even (it holds (sampled, greedy) pairs), got "
                f"{self.per_device_train_batch_size}"
            )
        if self.do_eval and self.eval_strategy != "no" and self.per_device_eval_batch_size % 2:
            raise ValueError(
                f"per_device_eval_batch_size: must be even (it holds (sampled, greedy) pairs), got "
                f"{self.per_device_eval_batch_size}"
            )


class ReMaxTrainer(GRPOTrainer):
    """ReMax (Li et al., 2023) as a TRL trainer: REINFORCE with the greedy completion's reward as the baseline.

    For each prompt of the batch: one sampled and one greedy completion (``remax_kernels.generate_pairs``, one
    shared prefill; with ``use_vllm``, one sampled and one temperature-0 request through TRL's vLLM backend), both
    scored by the reward functions (TRL's conventions: the weighted sum of every reward function's output; a
    completion scored ``None`` by every function gets advantage 0), advantage ``r(sampled) - r(greedy)`` through
    ``remax_kernels.remax_advantages`` (``ReMaxConfig``'s ``clip_reward``, ``gamma``, ``kl_in_reward``,
    ``kl_mode``, ``whiten_advantages``), and the loss ``-A * log pi(a_t)`` aggregated by ``loss_agg_mode``, plus
    ``beta`` times a KL to the reference unless ``kl_in_reward``, minus ``entropy_coef`` times the entropy, computed
    from the policy's last hidden states by ``remax_kernels.hf.causal_lm_policy_loss`` (no ``[B, T, V]`` logits).
    With ``num_iterations > 1`` (or with vLLM's importance-sampling correction) the loss is PPO-clipped with
    ``epsilon`` / ``epsilon_high``.

    Only the sampled completions are trained on; the greedy ones are the baseline. The logged completions table has
    a ``baseline`` column (``"sampled"`` / ``"greedy"``) and ReMax's advantage (0 on greedy rows); metrics add
    ``remax/reward_sampled``, ``remax/reward_greedy``, ``remax/advantage_mean`` and ``remax/advantage_std`` to
    GRPO's (whose ``reward`` averages both completions, and whose ``frac_reward_zero_std`` is the fraction of prompts
    whose two completions got the same reward, i.e. advantage 0).

    Args:
        model, reward_funcs, train_dataset, eval_dataset, processing_class, reward_processing_classes, callbacks,
            optimizers, quantization_config, peft_config: as ``trl.GRPOTrainer`` (text models with a tokenizer;
            tools, environments and rollout functions are not supported).
        args: a ``ReMaxConfig`` (default: ``ReMaxConfig("<model name>-ReMax")``).

    Example::

        trainer = ReMaxTrainer(model="Qwen/Qwen2.5-0.5B-Instruct", reward_funcs=my_reward,
                               args=ReMaxConfig(output_dir="out", temperature=1.0, top_p=0.9),
                               train_dataset=dataset)
        trainer.train()
    """

    _tag_names = ["trl", "remax", "remax-kernels"]
    _name = "ReMax"
    _paper = {
        "title": "ReMax: A Simple, Effective, and Efficient Reinforcement Learning Method for Aligning Large "
                 "Language Models",
        "id": "2310.10505",
        "citation": (
            "@inproceedings{li2024remax,\n"
            "    title        = {{ReMax: A Simple, Effective, and Efficient Reinforcement Learning Method for Aligning "
            "Large Language Models}},\n"
            "    author       = {Ziniu Li and Tian Xu and Yushun Zhang and Zhihang Lin and Yang Yu and Ruoyu Sun and "
            "Zhi-Quan Luo},\n"
            "    booktitle    = {Forty-first International Conference on Machine Learning},\n"
            "    year         = 2024,\n"
            "}"
        ),
    }

    def __init__(
        self,
        model,
        reward_funcs=None,
        args: ReMaxConfig | None = None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        reward_processing_classes=None,
        callbacks=None,
        optimizers=(None, None),
        quantization_config=None,
        peft_config=None,
    ):
        if args is None:
            name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "") or "model"
            args = ReMaxConfig(f"{name.split('/')[-1]}-ReMax")
        elif not isinstance(args, ReMaxConfig):
            raise TypeError(f"args: expected a ReMaxConfig, got {type(args).__name__}")
        if not reward_funcs:
            raise ValueError("reward_funcs: ReMax needs at least one reward function (or reward model)")
        super().__init__(
            model=model, reward_funcs=reward_funcs, args=args, train_dataset=train_dataset,
            eval_dataset=eval_dataset, processing_class=processing_class,
            reward_processing_classes=reward_processing_classes, callbacks=callbacks, optimizers=optimizers,
            quantization_config=quantization_config, peft_config=peft_config,
        )
        if self._is_vlm:
            raise ValueError("processing_class: ReMaxTrainer is text-only (a tokenizer), got a multimodal processor")
        if self.aux_loss_enabled:
            raise ValueError(
                "router_aux_loss_coef: the MoE router auxiliary loss is not part of ReMax's fused loss; set it to 0.0"
            )
        _check_trainer_setup(self)
        _install_on_trainer_models(self)
        # While scoring a rollout only the sampled rows need log-probs (the greedy rows are dropped after scoring).
        self._remax_sampled_rows_only = False
        self._remax_rewards_per_func = None

    # -- log-probs ------------------------------------------------------------------------------------------------

    def _get_per_token_logps_and_entropies(
        self, model, input_ids, attention_mask, logits_to_keep, batch_size=None, compute_entropy=False,
        compute_aux_loss=False, **multimodal,
    ):
        if compute_aux_loss or any(value is not None for value in multimodal.values()):
            raise ValueError("ReMaxTrainer: multimodal inputs and the MoE auxiliary loss are not supported")
        rows = slice(0, None, 2) if self._remax_sampled_rows_only else slice(None)
        # Positions are cumsum(mask) - 1, as generate_pairs and vLLM decoded the completions.
        logps, entropies = _kernel_logps_and_entropies(
            self, model, input_ids[rows], attention_mask[rows], logits_to_keep, batch_size, compute_entropy, "mask"
        )
        if rows != slice(None):
            logps = logps.new_zeros((input_ids.shape[0], logps.shape[1])).index_copy(
                0, torch.arange(0, input_ids.shape[0], 2, device=logps.device), logps
            )
            if entropies is not None:
                entropies = entropies.new_zeros(logps.shape).index_copy(
                    0, torch.arange(0, input_ids.shape[0], 2, device=logps.device), entropies
                )
        return logps, entropies, None

    # -- generation -----------------------------------------------------------------------------------------------

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        """Completions for the ``2B`` prompt rows ``[p1, p1, p2, p2, ...]``: row ``2i`` sampled, row ``2i + 1``
        greedy, in TRL's format (token-id lists up to and including EOS)."""
        if images is not None or multimodal_fields or has_tool_images:
            raise ValueError("ReMaxTrainer: multimodal prompts are not supported")
        if num_generations != 2 or len(prompt_ids) % 2 or prompt_ids[0::2] != prompt_ids[1::2]:
            raise RuntimeError(
                "ReMaxTrainer: expected each prompt twice in a row (the sampler's (sampled, greedy) pairs); got "
                f"{len(prompt_ids)} rows with num_generations={num_generations}"
            )
        prompts = prompt_ids[0::2]
        if self.use_vllm:
            sampled, greedy, sampled_logps, greedy_logps = self._generate_pairs_vllm(prompts)
        else:
            sampled, greedy = self._generate_pairs_transformers(prompts)
            sampled_logps = greedy_logps = None
        completion_ids = [ids for pair in zip(sampled, greedy, strict=True) for ids in pair]
        logprobs = None
        if sampled_logps is not None and greedy_logps is not None:
            logprobs = [lp for pair in zip(sampled_logps, greedy_logps, strict=True) for lp in pair]
        return completion_ids, logprobs

    def _generate_pairs_transformers(self, prompts: list[list[int]]):
        device = self.accelerator.device
        rows = [torch.tensor(ids) for ids in prompts]
        input_ids = pad(rows, padding_value=self._tokenizer.pad_token_id, padding_side="left").to(device)
        attention_mask = pad([torch.ones_like(r) for r in rows], padding_value=0, padding_side="left").to(device)
        # From torch's global generator, which TRL seeds per process (set_seed(seed, device_specific=True)) and the
        # Trainer checkpoints: rollouts are reproducible and differ across processes.
        seed = int(torch.randint(0, 2**31 - 1, ()).item())
        with (
            profiling_context(self, "remax_kernels.generate_pairs"),
            unwrap_model_for_generation(
                self.model_wrapped,
                self.accelerator,
                gather_deepspeed3_params=self.args.ds3_gather_for_generation,
                gradient_checkpointing_kwargs=self.args.gradient_checkpointing_kwargs,
            ) as unwrapped_model,
            torch.no_grad(),
            self._dist.summon_full_params(self.model_wrapped, recurse=False),
        ):
            out = generate_pairs(
                unwrapped_model, input_ids, attention_mask, max_new_tokens=self.max_completion_length,
                temperature=self.temperature, top_k=self.top_k or 0, top_p=self.top_p, min_p=self.min_p or 0.0,
                eos_token_id=self.eos_token_ids, pad_token_id=self._tokenizer.pad_token_id, seed=seed,
                cache_implementation=self.args.cache_implementation,
            )

        def as_lists(ids, mask):
            return [row[keep.bool()].tolist() for row, keep in zip(ids.cpu(), mask.cpu(), strict=True)]

        return (
            as_lists(out.sampled_response_ids, out.sampled_response_mask),
            as_lists(out.greedy_response_ids, out.greedy_response_mask),
        )

    def _generate_pairs_vllm(self, prompts: list[list[int]]):
        """One sampled and one greedy (temperature 0) vLLM request per prompt. Untested here (no vLLM on the CPU
        development machine); follows TRL 1.16's ``VLLMGeneration.generate``, which reads its sampling options from
        its attributes at each call."""
        if self.state.global_step != self._last_loaded_step:
            with profiling_context(self, "sync_weights"):
                self.vllm_generation.sync_weights()
            self._last_loaded_step = self.state.global_step
        backend = self.vllm_generation
        _, sampled, sampled_logps, _ = backend.generate(
            prompts=prompts, images=None, num_generations=1, profiler=profiling_context(self, "vLLM.generate")
        )
        options = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
        saved = {name: getattr(backend, name) for name in options}
        try:
            for name, value in zip(options, (0.0, 1.0, 0, 0.0, 1.0), strict=True):
                setattr(backend, name, value)
            _, greedy, greedy_logps, _ = backend.generate(
                prompts=prompts, images=None, num_generations=1, profiler=profiling_context(self, "vLLM.generate")
            )
        finally:
            for name, value in saved.items():
                setattr(backend, name, value)

        def top1(logprobs):
            # vLLM returns per-token top-k log-probs; the first one is the chosen token's (as TRL keeps it).
            return None if logprobs is None else [[lp[0] for lp in seq] for seq in logprobs]

        return sampled, greedy, top1(sampled_logps), top1(greedy_logps)

    # -- rewards and advantages -----------------------------------------------------------------------------------

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        # TRL's scoring of every completion (both halves); kept for the ReMax advantage, which TRL does not compute.
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._remax_rewards_per_func = rewards_per_func
        return rewards_per_func

    def _generate_and_score_completions(self, inputs):
        n_rows = len(inputs)
        if n_rows % 2 or any(inputs[i].get("prompt") != inputs[i + 1].get("prompt") for i in range(0, n_rows, 2)):
            raise RuntimeError(
                "ReMaxTrainer: expected each example twice in a row (the sampler's (sampled, greedy) pairs)"
            )
        device = self.accelerator.device
        mode = "train" if self.model.training else "eval"
        self._log_completion_extra("baseline", ["sampled", "greedy"] * (n_rows // 2))
        # vLLM's importance-sampling metrics read every row's old log-probs, so they are all computed there.
        self._remax_sampled_rows_only = not self.use_vllm
        try:
            output = super()._generate_and_score_completions(inputs)
        finally:
            self._remax_sampled_rows_only = False

        # The weighted reward of every completion of every process, then this process's rows (as TRL slices them).
        rewards_per_func = self._remax_rewards_per_func
        rewards = (rewards_per_func * self.reward_weights.to(device).unsqueeze(0)).nansum(dim=1)
        rewards[torch.isnan(rewards_per_func).all(dim=1)] = float("nan")
        start = self.accelerator.process_index * n_rows
        local = rewards[start:start + n_rows]
        sampled_reward, greedy_reward = local[0::2], local[1::2]
        scorable = torch.isfinite(sampled_reward) & torch.isfinite(greedy_reward)

        output = {key: _sampled_rows(value, n_rows) for key, value in output.items()}
        mask = output["completion_mask"]
        if "tool_mask" in output:
            mask = mask * output["tool_mask"]
        output["num_items_in_batch"] = self.accelerator.gather(mask.sum()).sum()

        token_kl = None
        if self.args.kl_in_reward and self.beta != 0.0:
            token_kl = self._rollout_token_kl(output)
            n_tokens = mask.sum()
            local_kl = (token_kl * mask).sum() / n_tokens.clamp(min=1)
            self._metrics[mode]["kl"].append(_global_token_mean(self, local_kl, n_tokens))
        per_token = token_kl is not None or self.args.gamma != 1.0
        zero = torch.zeros_like(sampled_reward)
        scored = torch.where(scorable, sampled_reward, zero), torch.where(scorable, greedy_reward, zero)
        advantages = remax_advantages(
            *scored, response_mask=mask if per_token else None, token_kl=token_kl,
            kl_coef=self.beta if token_kl is not None else 0.0, gamma=self.args.gamma,
            clip_reward=self.args.clip_reward, kl_mode=self.args.kl_mode, whiten=self.args.whiten_advantages,
        )
        # A pair with an unscorable completion (every reward function returned None) carries no signal.
        output["advantages"] = advantages * (scorable if advantages.dim() == 1 else scorable[:, None])

        # The logged advantage: the per-sequence score, clip(r(sampled) - r(greedy)), before any shaping.
        score = remax_advantages(*scored, clip_reward=self.args.clip_reward)
        all_score = self.accelerator.gather(score)
        all_scorable = self.accelerator.gather(scorable)
        self._metrics[mode]["remax/reward_sampled"].append(self.accelerator.gather(sampled_reward).nanmean().item())
        self._metrics[mode]["remax/reward_greedy"].append(self.accelerator.gather(greedy_reward).nanmean().item())
        valid_score = all_score[all_scorable]
        self._metrics[mode]["remax/advantage_mean"].append(valid_score.mean().item() if valid_score.numel() else 0.0)
        self._metrics[mode]["remax/advantage_std"].append(
            valid_score.std(correction=0).item() if valid_score.numel() else 0.0
        )
        # The completions table: TRL logged GRPO's group advantages; ReMax's are the score on sampled rows, 0 on
        # greedy rows (they are not trained on).
        logged = torch.stack([all_score, torch.zeros_like(all_score)], dim=1).flatten().tolist()
        for _ in logged:
            self._logs["advantages"].pop()
        self._logs["advantages"].extend(logged)
        return output

    def _rollout_token_kl(self, output) -> torch.Tensor:
        """k1 KL ``log pi_old - log pi_ref`` per completion token of the sampled rows (rollout time, no gradient)."""
        input_ids = torch.cat([output["prompt_ids"], output["completion_ids"]], dim=1)
        attention_mask = torch.cat([output["prompt_mask"], output["completion_mask"]], dim=1)
        old = output.get("old_per_token_logps")
        if old is None:
            with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
                old, _, _ = self._get_per_token_logps_and_entropies(
                    self.model, input_ids, attention_mask, output["completion_ids"].size(1)
                )
        return old - output["ref_per_token_logps"]

    # -- loss -----------------------------------------------------------------------------------------------------

    def _compute_loss(self, model, inputs):
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], completion_mask], dim=1)
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        advantages = inputs["advantages"]
        ratio = inputs.get("importance_sampling_ratio")
        if ratio is not None:
            # vLLM's importance-sampling weight multiplies the policy-gradient term only, as in TRL: a positive
            # factor on the advantage is exactly that, with or without PPO clipping.
            per_token = advantages[:, None] if advantages.dim() == 1 else advantages
            advantages = (per_token * ratio).expand(mask.shape)
        options = {"loss_agg_mode": self.args.loss_agg_mode, "entropy_coef": self.entropy_coef}
        if self.args.loss_agg_mode == "seq-mean-token-sum-norm":
            # A constant norm (as the remax trainer's budget and Dr. GRPO's): the padded width varies per batch.
            options["loss_agg_norm"] = float(self.args.max_completion_length)
        old = inputs.get("old_per_token_logps")
        if old is not None:
            options.update(old_logprobs=old, clip_ratio=(self.epsilon_low, self.epsilon_high))
        if self.beta != 0.0 and not self.args.kl_in_reward:
            options.update(
                ref_logprobs=inputs["ref_per_token_logps"], kl_coef=self.beta, kl_estimator=self.args.kl_estimator
            )
        request = _PolicyLossRequest(mask, advantages, self.temperature, "mask", options)
        with profiling_context(self, "remax_kernels.policy_loss"), self.accelerator.autocast():
            loss, metrics = model(input_ids=input_ids, attention_mask=attention_mask, **{_REQUEST_KWARG: request})

        mode = "train" if self.model.training else "eval"
        n_tokens = metrics["response_tokens"]
        for name, key in (("kl", "kl"), ("entropy", "entropy"), ("clip_ratio/region_mean", "clip_frac")):
            if key in metrics and not (name == "kl" and self.args.kl_in_reward):
                self._metrics[mode][name].append(_global_token_mean(self, metrics[key], n_tokens))
        self._metrics[mode]["policy_loss"].append(self.accelerator.gather(loss.detach()).nanmean().item())
        # TRL's GRPO losses come scaled for gradient accumulation (loss_is_scaled_for_ga).
        return loss / self.current_gradient_accumulation_steps if mode == "train" else loss


def _sampled_rows(value, n_rows: int):
    """Rows ``0, 2, 4, ...`` (the sampled completions) of a per-row output entry; other entries unchanged."""
    if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == n_rows:
        return value[0::2]
    if isinstance(value, list) and len(value) == n_rows:
        return value[0::2]
    return value
