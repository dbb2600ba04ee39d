"""The ReMax training loop (and its baselines: REINFORCE, RLOO, GRPO, PPO).

One step, top to bottom (``Trainer.train_step``):

1. take this step's prompts (a seeded permutation per epoch, so step k's prompts depend only on (seed, k));
2. rollout: ReMax's ``generate_pairs``, one sampled and one greedy response per prompt sharing the prompt's prefill;
   the other estimators need no greedy response and decode the sampled rows alone
   (``remax_kernels.generate_samples``: the same responses). Sampling noise is seeded per (seed, step, row), so a
   run does not depend on how many ranks share the batch;
3. rewards; advantages (ReMax: r(sampled) - r(greedy); or REINFORCE / RLOO / GRPO; PPO: GAE over the value model's
   values, ``remax.ppo``), optionally KL-shaped with the frozen reference's log-probs;
4. the policy loss straight from hidden states (``causal_lm_policy_loss``: no ``[tokens, vocab]`` logits), in
   micro-batches normalized so their gradients add up to the full batch's exactly; one optimizer step. PPO instead
   runs ``ppo_epochs`` passes of mini-batch updates of the policy (the clipped loss against the rollout's
   log-probs) and of the value model (the clipped value loss).

Every step appends one JSON line to ``RUN_DIR/metrics.jsonl`` (and, with ``report_to: tensorboard``, to TensorBoard
event files in ``RUN_DIR/tensorboard``); evaluation (greedy and sampled reward on held-out prompts with a fixed seed)
runs before training, every ``eval_every`` steps and at the end, and logs a few prompts with their responses
(``RUN_DIR/samples.jsonl``). Messages go to the ``remax`` logger (``remax.logs``), from rank 0 only.

Resuming (``config.resume``) continues from the latest complete checkpoint and says what it does: the step it
continues from, the fields changed since the run started. Fields that fix what the run optimizes (estimator,
batch size, learning rate, data, seed, ...) must not change; ``steps`` may grow. The learning-rate schedule is part
of the checkpoint: its decay ends at ``lr_decay_steps`` (``steps`` when the run started), so extending a run
continues at the final rate instead of restarting the cosine.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import math
import os
import random
import resource
import sys
import time

import numpy as np
import torch

from remax.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    read_trainer_state,
    rng_state,
    save_checkpoint,
    set_rng_state,
    write_atomic,
)
from remax.config import INPUT_PATHS, TrainConfig, save_config
from remax.data import format_prompts, load_jsonl_prompts, tokenize_prompts, uses_chat_template
from remax.distributed import (
    DistInfo,
    all_reduce_max,
    all_reduce_sum,
    barrier,
    broadcast_object,
    gathered_params,
    gradient_sync,
    local_tensor,
    wrap_model,
)
from remax.logs import get_logger, setup_logging
from remax.model import (
    apply_lora,
    enable_gradient_checkpointing,
    ensure_pad_token,
    frozen_copy,
    no_hf_progress_bars,
    pick_device,
)
from remax.rewards import RewardFunction
from remax.stopping import StopNow, StopSignals, TrainingStopped

# Keys of a metrics record that measure the machine, not the run (excluded when comparing runs for equality).
PERF_PREFIX = "perf/"

# Fewer held-out prompts than this make the held-out reward too noisy to compare (a warning says so).
MIN_EVAL_PROMPTS = 32

# Fields a resume may change: how a run is executed, logged and saved, not what it optimizes or measures.
RESUME_MAY_CHANGE = frozenset({
    "steps", "run_dir", "resume", "init_from", "save_every", "keep_checkpoints", "save_final_model", "eval_every",
    "eval_batch_size", "rollout_batch_size", "grad_accum", "log_samples", "track_grad_var", "log_level",
    "report_to", "progress", "plot", "device", "cpu_threads", "attn_implementation", "bf16", "gradient_checkpointing",
})

# Token-mean metrics of the loss, and their names in a step's record. The rollout's log-probs (the sampling kernel's,
# on the KV-cache decode path) against the training forward's on the same tokens: the train-rollout mismatch.
_LOSS_METRICS = {
    "pg_loss": "loss/pg_loss", "logprob_mean": "loss/logprob_mean", "kl": "loss/kl", "entropy": "entropy",
    "rollout_abs_diff": "mismatch/logprob_abs_diff", "rollout_is_ratio": "mismatch/is_ratio",
    "rollout_is_clipped": "mismatch/is_clipped", "ppo_kl": "ppo/approx_kl", "clip_frac": "ppo/clip_frac",
    "clip_frac_lower": "ppo/clip_frac_lower",
}
_VALUE_METRICS = {"value_loss": "value/loss", "value_clip_frac": "value/clip_frac", "value_mean": "value/mean"}

logger = get_logger("trainer")


def derive_seed(*parts) -> int:
    """A 31-bit seed from any parts; different parts give unrelated seeds (no arithmetic collisions)."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFF


class LRSchedule:
    """Multiplier of ``config.lr`` at a step: linear warm-up, then constant / cosine / linear decay to
    ``min_lr_ratio`` at step ``horizon`` (``config.schedule_steps``), constant after it.

    A callable object, not a closure, so ``LambdaLR.state_dict`` stores its fields in every checkpoint and a resumed
    run continues the schedule it started with.
    """

    def __init__(self, *, warmup: int, horizon: int, floor: float, kind: str):
        self.warmup, self.horizon, self.floor, self.kind = warmup, horizon, floor, kind

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        if self.kind == "constant":
            return 1.0
        progress = min(1.0, (step - self.warmup) / max(1, self.horizon - self.warmup))
        decay = 0.5 * (1 + math.cos(math.pi * progress)) if self.kind == "cosine" else 1 - progress
        return self.floor + (1 - self.floor) * decay


def lr_lambda(config: TrainConfig) -> LRSchedule:
    """The ``LRSchedule`` of ``config``."""
    return LRSchedule(warmup=config.warmup_steps, horizon=config.schedule_steps, floor=config.min_lr_ratio,
                      kind=config.lr_schedule)


def _comparable(name: str, value):
    if isinstance(value, str) and (name in INPUT_PATHS or name == "reward" and value.partition(":")[0].endswith(".py")):
        return os.path.abspath(value)
    return value


def check_resume(saved: dict, step: int, config: TrainConfig, run_dir: str, *, finished: bool) -> list[str]:
    """Whether ``config`` can continue the run saved at ``step`` with config ``saved`` (a ``to_dict()``).

    Raises ``ValueError`` when a field outside ``RESUME_MAY_CHANGE`` differs, or when ``steps`` leaves nothing to do
    (``finished``: the final model is written too). Returns the changes as ``"name: old -> new"`` strings.
    """
    try:
        old = TrainConfig.from_dict(saved, source=f"{run_dir}'s checkpoint").flat_dict()
    except (ValueError, TypeError) as err:
        raise ValueError(f"resume: cannot read the config saved in {run_dir} ({err}); start a new run") from None
    new = config.flat_dict()
    if new["lr_decay_steps"] == 0:
        new["lr_decay_steps"] = old["lr_decay_steps"] or old["steps"]  # 0 = the run's own schedule
    changed = {k: (old[k], new[k]) for k in new if _comparable(k, old[k]) != _comparable(k, new[k])}
    fixed = {k: v for k, v in changed.items() if k not in RESUME_MAY_CHANGE}
    if fixed:
        listed = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in fixed.items())
        raise ValueError(f"resume: {run_dir} was trained with different settings ({listed}); they fix what the run "
                         "optimizes and cannot change mid-run. Resume with the run's values, or start a new run "
                         f"(may change on resume: {', '.join(sorted(RESUME_MAY_CHANGE - {'run_dir', 'resume'}))})")
    if config.steps < step:
        raise ValueError(f"steps: {run_dir} has already run {step} steps, so --steps {config.steps} would run none; "
                         f"continue it with --steps N > {step}, or evaluate it with `remax eval {run_dir}`")
    if config.steps == step and finished:
        raise ValueError(f"resume: {run_dir} has finished its {step} steps; nothing to do. Continue it with --steps "
                         f"N > {step}, or evaluate it with `remax eval {run_dir}`")
    return [f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items() if k not in ("run_dir", "resume")]


def check_run_dir(config: TrainConfig, run_dir: str) -> None:
    """Before any heavy work: a fresh run must not overwrite checkpoints; a resume must be able to continue
    (``check_resume``)."""
    path = latest_checkpoint(run_dir)
    if path is None:
        return
    if config.resume is None:
        raise ValueError(f"run_dir: {run_dir} already holds checkpoints; continue it with --resume {run_dir} "
                         "or choose another run_dir")
    state = read_trainer_state(path)
    check_resume(state["config"], int(state["step"]), config, run_dir,
                 finished=run_finished(run_dir, int(state["step"])))


def default_run_dir(info: DistInfo, prefix: str = "") -> str:
    """``runs/<prefix><YYYYmmdd-HHMMSS>`` (relative to the current folder), rank 0's name on every rank."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return broadcast_object(os.path.join("runs", f"{prefix}{stamp}"), info)


def run_finished(run_dir: str, step: int) -> bool:
    """Whether the run in ``run_dir`` completed ``step`` to the end (``summary.json`` is written last)."""
    path = os.path.join(run_dir, "summary.json")
    if not os.path.isfile(path):
        return False
    with open(path) as fh:
        return json.load(fh).get("step") == step


def _pad_right(t: torch.Tensor, length: int, value) -> torch.Tensor:
    if t.shape[1] == length:
        return t
    pad = t.new_full((t.shape[0], length - t.shape[1]), value)
    return torch.cat([t, pad], dim=1)


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    # Linux reports ru_maxrss in KiB: the process's peak resident memory so far.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _short(text: str, limit: int = 80) -> str:
    """``repr`` of ``text`` cut to ``limit`` characters (a sample line stays one line)."""
    return repr(text if len(text) <= limit else text[: limit - 3] + "...")


class Trainer:
    """ReMax (or REINFORCE / RLOO / GRPO / PPO) on an HF causal LM.

    Args:
        policy: an HF causal LM (``LlamaForCausalLM``, ...) in float32; moved to the configured device. With
            ``config.lora_r > 0`` it is wrapped with LoRA adapters here (peft), unless it already is a peft model.
        tokenizer: its HF tokenizer (a pad token is needed; eos is used when there is none).
        reward_fn: ``fn(prompts, responses) -> float [B]`` (strings; see ``remax.rewards``), or a ``RewardFunction``.
        ref_model: frozen KL reference; default (when ``config.kl_coef > 0``): a copy of ``policy`` as given.
        value_model: PPO's critic, a ``remax.ppo.ValueModel``; default (``estimator="ppo"``): loaded from
            ``config.value_model``, else a copy of ``policy``'s backbone with a zero scalar head.
        config: a ``TrainConfig``.
        prompts / eval_prompts: lists of prompt strings; default: read from ``config.prompts`` /
            ``config.eval_prompts`` (JSONL), the held-out set defaulting to the last ``eval_size`` training prompts.
        dist_info: ranks when launched by torchrun (``remax.distributed.init_distributed``).
        quiet: no progress bar and no informational messages (warnings still show). Messages go to the ``remax``
            logger at ``config.log_level``; ``logging.getLogger("remax")`` redirects them.

    Example::

        >>> trainer = Trainer(policy, tokenizer, my_reward, config=TrainConfig(model="ckpt/", steps=100),
        ...                   prompts=["Write a haiku about rain.", ...])
        >>> summary = trainer.train()   # metrics.jsonl, checkpoints and reward_curves.png in summary["run_dir"]
    """

    def __init__(
        self,
        policy: torch.nn.Module,
        tokenizer,
        reward_fn,
        *,
        ref_model: torch.nn.Module | None = None,
        value_model: torch.nn.Module | None = None,
        config: TrainConfig,
        prompts: list[str] | None = None,
        eval_prompts: list[str] | None = None,
        dist_info: DistInfo | None = None,
        quiet: bool = False,
    ):
        if not isinstance(config, TrainConfig):
            raise TypeError(f"config: expected a remax.TrainConfig, got {type(config).__name__}")
        self.config = config
        self.info = dist_info or DistInfo()
        setup_logging(config.log_level, is_main=self.info.is_main)
        self.quiet = quiet
        config.check_world(self.info.world_size)
        self.loss_options = config.loss_options()  # checked once: a bad combination fails before any model work
        self.device = pick_device(config.device)
        self._tensorboard = _tensorboard_writer_class() if config.report_to == "tensorboard" else None
        self.tokenizer = ensure_pad_token(tokenizer)
        self.reward_fn = reward_fn if isinstance(reward_fn, RewardFunction) else RewardFunction(
            reward_fn, name=getattr(reward_fn, "__qualname__", type(reward_fn).__name__))

        self.prompts, self.eval_prompts = self._resolve_prompts(prompts, eval_prompts)
        self.reward_fn.probe(self.prompts, tokenizer)
        self._templated = uses_chat_template(tokenizer, config.chat_template)

        if config.kl_coef > 0 and ref_model is None:
            ref_model = frozen_copy(policy)
        self.ref_runner = None
        if config.kl_coef > 0:
            ref_model.requires_grad_(False).eval().to(self.device)
            self.ref_runner = wrap_model(ref_model, self.info, self.device, bf16=config.bf16)
        self.value_model = self.value_runner = self.critic_optimizer = self.critic_scheduler = None
        if config.estimator == "ppo":
            # Built before LoRA wraps the policy: the value backbone copies the plain policy backbone.
            self.value_model = self._build_value_model(policy, value_model)
        if hasattr(policy, "peft_config") and config.lora_r:
            self._info("policy: already a LoRA (peft) model; its adapters train, lora_* fields are not applied")
        policy = apply_lora(policy, config) if not hasattr(policy, "peft_config") else policy
        policy.to(self.device)
        if config.gradient_checkpointing:
            enable_gradient_checkpointing(policy)
        self.policy = policy
        self.runner = wrap_model(policy, self.info, self.device, bf16=config.bf16)
        self.optimizer, self.scheduler = self._optimizer(self.runner, "policy", config.lr)
        if self.value_model is not None:
            self.value_runner = wrap_model(self.value_model, self.info, self.device, bf16=config.bf16)
            self.critic_optimizer, self.critic_scheduler = self._optimizer(self.value_runner, "value_model",
                                                                           config.critic_lr or config.lr)
        if self.info.enabled:
            sharded = ["policy"] + ["reference"] * (self.ref_runner is not None) + ["value model"] * (
                self.value_runner is not None)
            self._info(f"FSDP2: {', '.join(sharded)} sharded over {self.info.world_size} ranks")
        self.model_states: dict | None = None  # bytes held in model states, measured at the first step
        self._grad_bytes: dict[str, int] = {}
        self.step = 0
        self.history: list[dict] = []
        self.run_dir: str | None = None
        self._writer = None  # TensorBoard, while train() runs with report_to="tensorboard"
        self._signals: StopSignals | None = None  # SIGTERM/SIGINT handling, while train() runs
        self._bar = None  # the steps' progress bar, while train() runs
        self._perms: dict[int, torch.Tensor] = {}

    # ------------------------------------------------------------------------------------------------------------
    def _build_value_model(self, policy: torch.nn.Module, given: torch.nn.Module | None) -> torch.nn.Module:
        from remax.model import attention_implementation
        from remax.ppo import apply_value_lora, load_value_model, value_model_from_policy

        cfg = self.config
        if given is not None:
            value = given
        elif cfg.value_model is not None:
            value = load_value_model(cfg.value_model,
                                     attn_implementation=attention_implementation(cfg.attn_implementation,
                                                                                  self.device))
        else:
            value = value_model_from_policy(policy)
        value = apply_value_lora(value, cfg) if given is None else value
        value.to(self.device)
        if cfg.gradient_checkpointing:
            enable_gradient_checkpointing(value.backbone)
        return value

    def _optimizer(self, runner: torch.nn.Module, name: str, lr: float):
        """AdamW over ``runner``'s trainable parameters and its ``LambdaLR`` (the run's schedule)."""
        params = [p for p in runner.parameters() if p.requires_grad]
        if not params:
            raise ValueError(f"{name}: has no trainable parameters (every parameter has requires_grad=False)")
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=self.config.weight_decay)
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(self.config))

    def _resolve_prompts(self, prompts, eval_prompts) -> tuple[list[str], list[str]]:
        """Training and held-out prompts; logs their counts and warns when the held-out set is too small to trust."""
        cfg = self.config
        source = cfg.prompts or "the list given"
        if prompts is None:
            if cfg.prompts is None:
                raise ValueError("prompts: pass prompts=[...] or set config.prompts to a JSONL file")
            prompts = load_jsonl_prompts(cfg.prompts, field=cfg.prompt_field)
        how = ""
        if eval_prompts is None and cfg.eval_prompts is not None:
            eval_prompts = load_jsonl_prompts(cfg.eval_prompts, field=cfg.prompt_field)
            how = f"from {cfg.eval_prompts}"
        if eval_prompts is None:
            if not isinstance(prompts, (list, tuple)) or not prompts:
                raise ValueError("prompts: expected a non-empty list of strings")
            if len(prompts) == 1:
                raise ValueError(f"prompts: {source} holds 1 prompt: too few to hold some out for evaluation; give "
                                 "more, or a separate held-out set (eval_prompts)")
            if len(prompts) < 2 * cfg.eval_size:
                n_eval = max(1, len(prompts) // 10)
                how = f"the last 10% of the {len(prompts)} prompts, which are fewer than 2 * eval_size"
            else:
                n_eval = cfg.eval_size
                how = f"the last eval_size of the {len(prompts)} prompts"
            prompts, eval_prompts = prompts[:-n_eval], prompts[-n_eval:]
        elif len(eval_prompts) > cfg.eval_size:
            how = f"the first eval_size of {len(eval_prompts)} {how}".rstrip()
        prompts, eval_prompts = list(prompts), list(eval_prompts)[: cfg.eval_size]
        for name, values in (("prompts", prompts), ("eval_prompts", eval_prompts)):
            if not values or not all(isinstance(p, str) for p in values):
                raise ValueError(f"{name}: expected a non-empty list of strings")
        self._info(f"prompts: {len(prompts)} for training, {len(eval_prompts)} held out" + (f" ({how})" if how else ""))
        if len(eval_prompts) < MIN_EVAL_PROMPTS:
            logger.warning(f"only {len(eval_prompts)} held-out prompt(s): each moves the held-out reward by "
                           f"1/{len(eval_prompts)} of its range, so before/after numbers are mostly noise; give "
                           f"at least {MIN_EVAL_PROMPTS} (more prompts, or a separate eval_prompts file)")
        return prompts, eval_prompts

    def _autocast(self):
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16,
                              enabled=self.config.bf16 and self.device.type == "cuda")

    def _info(self, text: str) -> None:
        if not self.quiet:
            logger.info(text)

    # --- data -------------------------------------------------------------------------------------------------
    def _group(self) -> int:
        return self.config.group_size if self.config.estimator in ("rloo", "grpo") else 1

    def step_prompt_indices(self, step: int) -> torch.Tensor:
        """Prompt index of every row at ``step`` ([batch_size] int64); rloo/grpo repeat a prompt group_size times."""
        group = self._group()
        per_step = self.config.batch_size // group
        n = len(self.prompts)
        positions = torch.arange(step * per_step, (step + 1) * per_step)
        out = torch.empty(per_step, dtype=torch.long)
        for epoch in positions.div(n, rounding_mode="floor").unique().tolist():
            if epoch not in self._perms:
                gen = torch.Generator().manual_seed(derive_seed(self.config.seed, "data", epoch))
                self._perms = {epoch: torch.randperm(n, generator=gen)}
            sel = positions.div(n, rounding_mode="floor") == epoch
            out[sel] = self._perms[epoch][positions[sel] % n]
        return out.repeat_interleave(group)

    def _local_rows(self, rows: int) -> tuple[int, int]:
        per_rank = rows // self.info.world_size
        return self.info.rank * per_rank, per_rank

    # --- rollout ----------------------------------------------------------------------------------------------
    @property
    def needs_greedy(self) -> bool:
        """Whether training rollouts decode the greedy response too (ReMax's baseline); evaluation always does."""
        return self.config.estimator == "remax"

    def _generate(self, jobs: list[tuple[list[str], list[int], int]], *, greedy: bool = True,
                  on_rows=None) -> list[dict]:
        """Rollouts for each job ``(texts, row_seeds, chunk_size)``, all in ONE runner call: paired (sampled and
        greedy, ``generate_pairs``), or with ``greedy=False`` the sampled responses alone (``generate_samples``,
        the same responses).

        A job's texts are tokenized together (one prompt length P) and generated ``chunk_size`` rows at a time.
        Every row has its own sampling seed, so its response depends on (seed, its prompt) only: not on the
        chunking, the batch or the number of ranks. One runner call per phase keeps the collectives identical on
        every rank whatever its amount of work (see ``remax.distributed``). Returns per job a dict of ``[B, ...]``
        tensors: prompt_ids/prompt_mask ``[B, P]``, ``{sampled,greedy}_ids`` / ``_attention_mask`` ``[B, P+R]``,
        ``_response_mask`` (bool) / ``_logprobs`` ``[B, R]``, ``_lengths`` ``[B]`` (``greedy_*`` only with
        ``greedy``), and ``prompt_length`` P. ``on_rows(rows, tokens)``, if given, is called after every generate
        call with its rows and generated tokens (progress lines; it reads the lengths, so a GPU waits for them).
        """
        from remax_kernels import generate_pairs, generate_samples

        cfg = self.config
        generate = generate_pairs if greedy else generate_samples
        encoded = []
        for texts, row_seeds, _ in jobs:
            formatted = format_prompts(self.tokenizer, texts, chat_template=cfg.chat_template)
            ids, mask = tokenize_prompts(self.tokenizer, formatted, max_length=cfg.max_prompt_length,
                                         templated=self._templated)
            seeds = torch.tensor(row_seeds, dtype=torch.int64, device=self.device)
            encoded.append((ids.to(self.device), mask.to(self.device), seeds))

        def run_jobs(model):
            results = []
            with gathered_params(self.runner), torch.no_grad(), self._autocast():
                for (ids, mask, seeds), (_, _, size) in zip(encoded, jobs, strict=True):
                    outs = []
                    for i in range(0, ids.shape[0], size):
                        out = generate(
                            model, ids[i : i + size], mask[i : i + size], max_new_tokens=cfg.response_budget,
                            temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, min_p=cfg.min_p,
                            eos_token_id=self.tokenizer.eos_token_id, pad_token_id=self.tokenizer.pad_token_id,
                            seed=seeds[i : i + size],
                        )
                        outs.append(out)
                        if on_rows is not None:
                            tokens = int(out.sampled_lengths.sum()) + (int(out.greedy_lengths.sum()) if greedy else 0)
                            on_rows(out.sampled_lengths.shape[0], tokens)
                    results.append(self._merge_rollouts(outs, ids, mask, greedy=greedy))
            return results

        return self.runner(run_jobs)

    def _merge_rollouts(self, outs: list, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, *,
                        greedy: bool) -> dict:
        P = prompt_ids.shape[1]
        R = max(o.sampled_response_mask.shape[1] for o in outs)
        pad = self.tokenizer.pad_token_id
        merged = {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "prompt_length": P}
        for kind in ("sampled", "greedy") if greedy else ("sampled",):
            merged[f"{kind}_ids"] = torch.cat([_pad_right(getattr(o, f"{kind}_ids"), P + R, pad) for o in outs])
            merged[f"{kind}_attention_mask"] = torch.cat(
                [_pad_right(getattr(o, f"{kind}_attention_mask"), P + R, 0) for o in outs])
            merged[f"{kind}_response_mask"] = torch.cat(
                [_pad_right(getattr(o, f"{kind}_response_mask"), R, 0) for o in outs]).bool()
            merged[f"{kind}_logprobs"] = torch.cat(
                [_pad_right(getattr(o, f"{kind}_logprobs").float(), R, 0.0) for o in outs])
            merged[f"{kind}_lengths"] = torch.cat([getattr(o, f"{kind}_lengths") for o in outs])
        return merged

    def _score(self, texts: list[str], rollout: dict) -> tuple[torch.Tensor, torch.Tensor | None, list[str]]:
        """Rewards ``[B]`` (float32, CPU) of the sampled and the greedy responses (one reward call for both; None for
        the greedy ones of a sampled-only rollout), and the decoded responses (``B`` sampled then ``B`` greedy)."""
        P = rollout["prompt_length"]
        kinds = ("sampled", "greedy") if "greedy_ids" in rollout else ("sampled",)
        responses, response_ids = [], []
        for kind in kinds:
            ids = rollout[f"{kind}_ids"][:, P:].cpu()
            mask = rollout[f"{kind}_response_mask"].cpu()
            for row in range(ids.shape[0]):
                toks = ids[row][mask[row]].tolist()
                response_ids.append(toks)
                responses.append(self.tokenizer.decode(toks, skip_special_tokens=True))
        prompt_ids = [row[m.bool()].tolist()
                      for row, m in zip(rollout["prompt_ids"].cpu(), rollout["prompt_mask"].cpu(), strict=True)]
        rewards = self.reward_fn(list(texts) * len(kinds), responses, prompt_ids=prompt_ids * len(kinds),
                                 response_ids=response_ids)
        B = len(texts)
        return rewards[:B], (rewards[B:] if len(kinds) == 2 else None), responses

    # --- loss -------------------------------------------------------------------------------------------------
    def _advantages(self, r_sampled, r_greedy, response_mask, token_kl) -> torch.Tensor:
        import remax_kernels as rk

        cfg = self.config
        kl = dict(token_kl=token_kl, kl_coef=cfg.kl_coef) if token_kl is not None else {}
        shaping = dict(response_mask=response_mask, gamma=cfg.gamma, kl_mode=cfg.kl_mode, whiten=cfg.whiten, **kl)
        if cfg.estimator == "remax":
            return rk.remax_advantages(r_sampled, r_greedy, clip_reward=cfg.clip_reward, **shaping)
        if cfg.estimator == "reinforce":
            return rk.reinforce_advantages(r_sampled, clip_reward=cfg.clip_reward, **shaping)
        if cfg.estimator == "rloo":
            return rk.rloo_advantages(r_sampled, cfg.group_size, **shaping)
        return rk.grpo_advantages(r_sampled, cfg.group_size, **shaping)

    def _response_logprobs(self, runner, ids, attention_mask, response_mask, *, entropy: bool = False):
        """No-grad log-probs (and entropies) ``[B, R]`` of the response tokens at the sampling temperature."""
        from remax_kernels.hf import causal_lm_logprobs

        def run(model):
            with torch.no_grad(), self._autocast():
                return causal_lm_logprobs(model, ids, attention_mask, response_mask=response_mask,
                                          temperature=self.config.temperature, return_entropy=entropy)

        out = runner(run)
        return (out[0].float(), out[1].float()) if entropy else (out.float(), None)

    def _loss_weights(self, micro: list[torch.Tensor], response_mask: torch.Tensor, *,
                      mode: str | None = None) -> list[float]:
        """Per-micro-batch loss multipliers so the summed gradients equal the global (mini-)batch's (see
        loss_agg_mode; ``mode`` overrides it: the value loss is always a token mean). ``micro``: row indices.

        token-mean: tokens_m / tokens_global; every seq-mean-* mode (seq-mean-token-sum-norm too: a mean over rows
        of token sums / norm): rows_m / rows_global. FSDP2 averages gradients over ranks, hence the ``world_size``
        factor.
        """
        mode = mode or self.config.loss_agg_mode
        world = self.info.world_size
        counts = [float(response_mask[idx].sum()) if mode == "token-mean" else float(len(idx)) for idx in micro]
        total = float(all_reduce_sum(torch.tensor([sum(counts)], dtype=torch.float64), self.info)[0])
        return [world * c / max(total, 1.0) for c in counts]

    def _policy_loss(self, model, ids, attention_mask, response_mask, advantages, ref_logprobs, rollout_logprobs,
                     old_logprobs=None):
        """``(loss, metrics)`` of one micro-batch, from hidden states (no ``[tokens, vocab]`` logits), its gradients
        computed in the forward. The rollout's log-probs give the mismatch metrics (and TIS weights when on);
        ``old_logprobs`` (PPO) the importance ratio that ``clip_ratio`` clips."""
        from remax_kernels.hf import causal_lm_policy_loss

        with self._autocast():
            return causal_lm_policy_loss(model, ids, attention_mask, response_mask, advantages,
                                         temperature=self.config.temperature, old_logprobs=old_logprobs,
                                         ref_logprobs=ref_logprobs, rollout_logprobs=rollout_logprobs,
                                         options=self.loss_options)

    def _values(self, model, ids, attention_mask, response_mask) -> torch.Tensor:
        """The value model's ``[B, R]`` float32 values of the response window."""
        with self._autocast():
            return model(ids, attention_mask, response_width=response_mask.shape[1])

    def _value_loss(self, model, ids, attention_mask, response_mask, old_values, returns):
        from remax.ppo import clipped_value_loss

        values = self._values(model, ids, attention_mask, response_mask)
        return clipped_value_loss(values, old_values, returns, response_mask, clip=self.config.value_clip)

    def _grad_shards(self) -> list[torch.Tensor | None]:
        return [local_tensor(p.grad).detach().clone() if p.grad is not None else None
                for p in self.optimizer.param_groups[0]["params"]]

    # --- one step ---------------------------------------------------------------------------------------------
    def train_step(self, step: int) -> dict:
        """Rollout, rewards, advantages, loss and the optimizer step(s); returns the step's metrics record."""
        cfg = self.config
        t_start = time.perf_counter()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        rows = self.step_prompt_indices(step)
        first, n_local = self._local_rows(len(rows))
        texts = [self.prompts[i] for i in rows[first : first + n_local].tolist()]
        seeds = [derive_seed(cfg.seed, "rollout", step, row) for row in range(first, first + n_local)]
        bar, advance = self._rows_progress(n_local, f"rollout, step {step + 1}")
        # Nothing before the update changes the training state: a stop request may abandon the rollout and reward.
        with self._abandonable():
            try:
                rollout = self._generate([(texts, seeds, cfg.rollout_batch_size or n_local)],
                                         greedy=self.needs_greedy, on_rows=advance)[0]
            finally:
                if bar is not None:
                    bar.close()
            t_rollout = time.perf_counter()
            r_sampled, r_greedy, _ = self._score(texts, rollout)
        t_reward = time.perf_counter()

        batch = self._prepare(rollout, r_sampled, r_greedy)
        resp = batch["resp"]
        stats = _Stats()
        self.policy.train()
        if cfg.estimator == "ppo":
            grad_norm, grad_var = self._ppo_updates(step, batch, stats)
        else:
            grad_norm, grad_var = self._update_policy(batch, torch.arange(n_local), stats,
                                                      track_var=cfg.track_grad_var)
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        if self.critic_scheduler is not None:
            self.critic_scheduler.step()
        t_end = time.perf_counter()
        if self.model_states is None:
            self.model_states = self.model_state_bytes()

        tokens = float(resp.sum())
        stats.add("reward/sampled", float(r_sampled.sum()), n_local)
        stats.add("_reward_sampled_sq", float(r_sampled.square().sum()), n_local)
        stats.add("response_length/sampled", float(rollout["sampled_lengths"].sum()), n_local)
        if r_greedy is not None:
            stats.add("reward/greedy", float(r_greedy.sum()), n_local)
            stats.add("response_length/greedy", float(rollout["greedy_lengths"].sum()), n_local)
        advantages = batch["advantages"]
        adv = advantages if advantages.dim() == 2 else advantages[:, None].expand_as(resp)
        adv = torch.where(resp, adv.float(), 0.0)
        stats.add("adv/mean", float(adv.sum()), tokens)
        stats.add("_adv_sq", float(adv.square().sum()), tokens)
        if batch["token_kl"] is not None:
            stats.add("kl", float(batch["token_kl"].sum()), tokens)
        if "returns" in batch:
            returns, old_values = batch["returns"], batch["old_values"]
            for name, t in (("value/returns_mean", returns), ("_returns_sq", returns.square()),
                            ("_td", returns - old_values), ("_td_sq", (returns - old_values).square())):
                stats.add(name, float(torch.where(resp, t, 0.0).sum()), tokens)
        record = {"split": "train", "step": step + 1}
        record.update(stats.reduce(self.info))
        is_ratio_sq = record.pop("_is_ratio_sq")
        record["mismatch/is_ratio_std"] = math.sqrt(max(is_ratio_sq - record["mismatch/is_ratio"] ** 2, 0.0))
        record["mismatch/logprob_abs_diff_max"] = float(
            all_reduce_max(torch.tensor([record.pop("_diff_max")], dtype=torch.float64), self.info)[0])
        sampled_sq = record.pop("_reward_sampled_sq")
        record["reward/sampled_std"] = math.sqrt(max(sampled_sq - record["reward/sampled"] ** 2, 0.0))
        record["adv/std"] = math.sqrt(max(record.pop("_adv_sq") - record["adv/mean"] ** 2, 0.0))
        if "value/returns_mean" in record:
            # Explained variance of the returns by the rollout's values: 1 - Var(G - V) / Var(G) (TRL's metric).
            var_returns = record.pop("_returns_sq") - record["value/returns_mean"] ** 2
            var_td = record.pop("_td_sq") - record.pop("_td") ** 2
            record["value/explained_variance"] = 1 - var_td / var_returns if var_returns > 0 else float("nan")
        record["grad_norm"] = grad_norm
        if grad_var is not None:
            record["grad_var"] = grad_var
        record["lr"] = lr
        generated = record["response_length/sampled"] + record.get("response_length/greedy", 0.0)
        record.update({
            "perf/step_time_s": t_end - t_start,
            "perf/rollout_s": t_rollout - t_start,
            "perf/reward_s": t_reward - t_rollout,
            "perf/train_s": t_end - t_reward,
            "perf/tokens_per_s": generated * len(rows) / max(t_end - t_start, 1e-9),
            "perf/peak_mem_mb": _peak_memory_mb(self.device),
        })
        return record

    def _prepare(self, rollout: dict, r_sampled: torch.Tensor, r_greedy: torch.Tensor | None) -> dict:
        """The training batch of a rollout: sequences and masks, log-probs (rollout, reference, PPO's old), the token
        KL and the advantages (PPO: with the value model's values and the GAE returns)."""
        from remax.ppo import gae_advantages, token_rewards, whiten_over_ranks

        cfg = self.config
        ppo = cfg.estimator == "ppo"
        ids, attn = rollout["sampled_ids"], rollout["sampled_attention_mask"]
        resp = rollout["sampled_response_mask"]
        # The rollout's log-probs are of the distribution sampled from, truncated by top-k / top-p / min-p; the KL
        # and PPO's ratio compare full distributions (softmax(logits / T)), so with truncation they are recomputed.
        truncated = cfg.top_k > 0 or cfg.top_p < 1.0 or cfg.min_p > 0.0
        rollout_logprobs = old_logprobs = rollout["sampled_logprobs"]
        if truncated and (self.ref_runner is not None or ppo):
            old_logprobs = self._response_logprobs(self.runner, ids, attn, resp)[0]
        ref_logprobs = token_kl = None
        if self.ref_runner is not None:
            ref_logprobs = self._response_logprobs(self.ref_runner, ids, attn, resp)[0]
            # k1 from rollout-time log-probs (constants), as the official ReMax code.
            token_kl = torch.where(resp, old_logprobs - ref_logprobs, 0.0)
        shaping_kl = token_kl if cfg.kl_penalty == "reward" else None
        batch = dict(ids=ids, attn=attn, resp=resp, rollout_logprobs=rollout_logprobs, ref_logprobs=ref_logprobs,
                     token_kl=token_kl, old_logprobs=old_logprobs if ppo else None)
        if not ppo:
            r_greedy = r_greedy.to(self.device) if r_greedy is not None else None
            batch["advantages"] = self._advantages(r_sampled.to(self.device), r_greedy, resp, shaping_kl)
            return batch
        with torch.no_grad():
            old_values = self.value_runner(self._values, ids, attn, resp)
        score = r_sampled.to(self.device)
        if cfg.clip_reward is not None:
            score = score.clamp(-cfg.clip_reward, cfg.clip_reward)
        rewards = token_rewards(score, resp, token_kl=shaping_kl, kl_coef=cfg.kl_coef)
        advantages, returns = gae_advantages(rewards, old_values, resp, gamma=cfg.gamma, lam=cfg.gae_lambda)
        batch.update(advantages=whiten_over_ranks(advantages, resp, self.info), returns=returns,
                     old_values=old_values)
        return batch

    def _micro_batches(self, rows: torch.Tensor, n_micro: int) -> list[torch.Tensor]:
        bounds = np.linspace(0, len(rows), n_micro + 1).round().astype(int)
        return [rows[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a]

    def _update_policy(self, batch: dict, rows: torch.Tensor, stats: _Stats, *, track_var: bool,
                       first: bool = True) -> tuple[float, float | None]:
        """One optimizer step of the policy on ``rows`` (this rank's row indices), in ``grad_accum`` micro-batches;
        returns the gradient norm before clipping and, with ``track_var``, the half-batch gradient variance.

        The rollout-train mismatch metrics are taken at a step's ``first`` update only: PPO's later updates see a
        policy that has already moved, which is not the kernels' mismatch."""
        cfg = self.config
        n_micro = cfg.grad_accum
        if track_var and n_micro == 1 and len(rows) >= 2:
            n_micro = 2
        micro = self._micro_batches(rows, n_micro)
        weights = self._loss_weights(micro, batch["resp"])
        half = len(micro) // 2 - 1 if track_var else None
        half_grads = None
        for i, (idx, w) in enumerate(zip(micro, weights, strict=True)):
            # Gradients are reduced over ranks only where they are read: after the last micro-batch (and the
            # middle one, whose partial sum the variance estimate needs).
            gradient_sync(self.runner, i in (half, len(micro) - 1))
            part = {k: None if batch[k] is None else batch[k][idx] for k in (
                "ids", "attn", "resp", "advantages", "ref_logprobs", "rollout_logprobs", "old_logprobs")}
            loss, m = self.runner(self._policy_loss, part["ids"], part["attn"], part["resp"], part["advantages"],
                                  part["ref_logprobs"], part["rollout_logprobs"], part["old_logprobs"])
            (loss * w).backward()
            tokens = float(batch["resp"][idx].sum())
            for key, name in _LOSS_METRICS.items():
                if key in m and (first or not name.startswith("mismatch/")):
                    stats.add(name, float(m[key]) * tokens, tokens)
            if first:
                ratio_mean, ratio_std = float(m["rollout_is_ratio"]), float(m["rollout_is_ratio_std"])
                stats.add("_is_ratio_sq", (ratio_std**2 + ratio_mean**2) * tokens, tokens)
                stats.add_max("_diff_max", float(m["rollout_abs_diff_max"]))
            if i == half:
                half_grads = self._grad_shards()
        grad_var = self._grad_var(half_grads, micro, weights) if half_grads is not None else None
        return self._optimizer_step("policy", self.optimizer), grad_var

    def _update_value(self, batch: dict, rows: torch.Tensor, stats: _Stats) -> float:
        """One optimizer step of the value model on ``rows`` (clipped value loss, token mean over the mini-batch of
        every rank), in ``grad_accum`` micro-batches; returns the gradient norm before clipping."""
        micro = self._micro_batches(rows, self.config.grad_accum)
        weights = self._loss_weights(micro, batch["resp"], mode="token-mean")
        for i, (idx, w) in enumerate(zip(micro, weights, strict=True)):
            gradient_sync(self.value_runner, i == len(micro) - 1)
            loss, m = self.value_runner(self._value_loss, batch["ids"][idx], batch["attn"][idx], batch["resp"][idx],
                                        batch["old_values"][idx], batch["returns"][idx])
            (loss * w).backward()
            tokens = float(batch["resp"][idx].sum())
            for key, name in _VALUE_METRICS.items():
                stats.add(name, float(m[key]) * tokens, tokens)
        return self._optimizer_step("value", self.critic_optimizer)

    def _optimizer_step(self, name: str, optimizer: torch.optim.Optimizer) -> float:
        """Clip (``max_grad_norm``), step and zero the gradients of ``optimizer``; returns the norm before clipping.
        The first time, the gradient bytes held are recorded for ``model_state_bytes``."""
        params = optimizer.param_groups[0]["params"]
        if name not in self._grad_bytes:
            self._grad_bytes[name] = _tensor_bytes(p.grad for p in params if p.grad is not None)
        max_norm = self.config.max_grad_norm if self.config.max_grad_norm > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def _ppo_updates(self, step: int, batch: dict, stats: _Stats) -> tuple[float, float | None]:
        """``ppo_epochs`` passes over the rollout; each pass deals the rows into mini-batches at random (when there
        are several) and makes one policy and one value-model step per mini-batch. Returns the mean policy gradient
        norm and, with ``track_grad_var``, the variance of the first policy step's gradient."""
        cfg = self.config
        n_local = batch["ids"].shape[0]
        first_row = self.info.rank * n_local
        n_mini = cfg.batch_size // cfg.mini_batch_rows
        norms, value_norms, grad_var = [], [], None
        for epoch in range(cfg.ppo_epochs):
            mini_batches = [torch.arange(n_local)]
            if n_mini > 1:
                # Each run of n_mini consecutive rows (of the global batch) sends one row to every mini-batch, in a
                # random order drawn from (seed, step, pass): every rank holds whole runs, so each gives each
                # mini-batch its share, and a row's mini-batch does not depend on the number of ranks.
                gen = torch.Generator().manual_seed(derive_seed(cfg.seed, "minibatch", step, epoch))
                label = torch.rand(cfg.batch_size // n_mini, n_mini, generator=gen).argsort(1).reshape(-1)
                local = label[first_row : first_row + n_local]
                mini_batches = [(local == j).nonzero().squeeze(1) for j in range(n_mini)]
            for j, rows in enumerate(mini_batches):
                first = epoch == 0 and j == 0
                norm, var = self._update_policy(batch, rows, stats, track_var=cfg.track_grad_var and first,
                                                first=first)
                norms.append(norm)
                grad_var = var if first else grad_var
                value_norms.append(self._update_value(batch, rows, stats))
        # Norms are global (the same on every rank): summed over ranks with their counts, the mean is unchanged.
        stats.add("value/grad_norm", sum(value_norms), len(value_norms))
        return sum(norms) / len(norms), grad_var

    def model_state_bytes(self) -> dict[str, dict[str, int]]:
        """Bytes held in model states over all ranks, per model (policy, reference, value, reward model): the
        parameters (trainable and frozen; shared storage counted once), the gradients (as held at the model's
        first optimizer step) and the optimizer state (AdamW's two moments and step counts), each summed from the
        tensors themselves. Summing the models gives the usual accounting of model states; PPO's two models hold
        their gradients one after the other here (each optimizer step frees its own), so its momentary peak is
        lower by the smaller model's gradients."""
        models = {"policy": (self.runner, self.optimizer), "reference": (self.ref_runner, None),
                  "value": (self.value_runner, self.critic_optimizer),
                  "reward": (self._reward_model(), None)}
        out = {}
        for name, (module, optimizer) in models.items():
            if not isinstance(module, torch.nn.Module):
                continue
            optim_bytes = 0 if optimizer is None else _tensor_bytes(
                t for state in optimizer.state.values() for t in state.values() if isinstance(t, torch.Tensor))
            local = [_tensor_bytes(module.parameters()), self._grad_bytes.get(name, 0), optim_bytes]
            total = all_reduce_sum(torch.tensor(local, dtype=torch.float64), self.info).tolist()
            out[name] = dict(zip(("params", "grads", "optimizer"), map(int, total), strict=True))
        return out

    def _reward_model(self) -> torch.nn.Module | None:
        """The reward model when the reward is one (``remax.rewards``' sequence-classifier reward), else None."""
        model = getattr(getattr(self.reward_fn, "fn", None), "model", None)
        return model if isinstance(model, torch.nn.Module) else None

    def parameter_counts(self) -> dict[str, int]:
        """Parameters held by every model (policy, reference, value, reward): ``trainable`` and ``frozen``."""
        counts = {"trainable": 0, "frozen": 0}
        seen: set[int] = set()
        for module in (self.runner, self.ref_runner, self.value_runner, self._reward_model()):
            if not isinstance(module, torch.nn.Module):
                continue
            for p in module.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    counts["trainable" if p.requires_grad else "frozen"] += p.numel()  # DTensor: global numel
        return counts

    def _grad_var(self, half_grads: list, micro: list[torch.Tensor], weights: list[float]) -> float:
        """``0.5 * ||g_a - g_b||^2`` of the two half-batch mean gradients (each an unbiased full-batch estimate)."""
        k = len(micro) // 2
        w_a = sum(weights[:k]) / self.info.world_size
        w_b = sum(weights[k:]) / self.info.world_size
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for p, g_a in zip(self.optimizer.param_groups[0]["params"], half_grads, strict=True):
            if p.grad is None:
                continue
            g = local_tensor(p.grad).detach().double()
            g_a = torch.zeros_like(g) if g_a is None else g_a.double()
            total += (g_a / w_a - (g - g_a) / w_b).square().sum()
        total = all_reduce_sum(total.reshape(1).cpu(), self.info)
        return 0.5 * float(total[0])

    # --- evaluation -------------------------------------------------------------------------------------------
    def evaluate(self, step: int | None = None) -> dict:
        """Greedy and sampled reward on the held-out prompts; prompt i is sampled with seed (eval_seed, i), the same
        noise at every evaluation, so before/after numbers differ only by the policy.

        Chunks of ``eval_batch_size`` prompts are dealt to ranks round-robin; the means are over all prompts.
        Returns the metrics record (``eval/reward_greedy``, ...) with ``"samples"``: on rank 0, the first
        ``config.log_samples`` held-out prompts with their greedy and sampled responses and rewards.
        """
        cfg = self.config
        size = cfg.eval_batch_size
        n_chunks = math.ceil(len(self.eval_prompts) / size)
        mine = range(self.info.rank, n_chunks, self.info.world_size)
        jobs = []
        for c in mine:
            rows = range(c * size, min((c + 1) * size, len(self.eval_prompts)))
            jobs.append(([self.eval_prompts[i] for i in rows], [derive_seed(cfg.eval_seed, "eval", i) for i in rows],
                         len(rows)))
        stats = _Stats()
        samples = []
        bar, advance = self._rows_progress(sum(len(job[0]) for job in jobs),
                                           f"eval @ step {self.step if step is None else step}")
        try:
            rollouts = self._generate(jobs, on_rows=advance)
        finally:
            if bar is not None:
                bar.close()
        for job, rollout in zip(jobs, rollouts, strict=True):
            r_s, r_g, responses = self._score(job[0], rollout)
            n = len(job[0])
            stats.add("eval/reward_sampled", float(r_s.sum()), n)
            stats.add("eval/reward_greedy", float(r_g.sum()), n)
            stats.add("eval/response_length_sampled", float(rollout["sampled_lengths"].sum()), n)
            stats.add("eval/response_length_greedy", float(rollout["greedy_lengths"].sum()), n)
            # Chunk 0 (prompts 0, 1, ...) is rank 0's first job: the same prompts at every evaluation.
            for i in range(min(cfg.log_samples - len(samples), n) if self.info.is_main else 0):
                samples.append({"prompt": job[0][i], "greedy": responses[n + i], "sampled": responses[i],
                                "reward_greedy": float(r_g[i]), "reward_sampled": float(r_s[i])})
        if not jobs:
            for name in ("eval/reward_sampled", "eval/reward_greedy", "eval/response_length_sampled",
                         "eval/response_length_greedy"):
                stats.add(name, 0.0, 0.0)
        return {"split": "eval", "step": self.step if step is None else step, **stats.reduce(self.info),
                "samples": samples}

    def eval_lines(self, record: dict) -> list[str]:
        """The evaluation's log lines: the held-out rewards, then one line per sample."""
        lines = [f"eval @ step {record['step']}: greedy reward {record['eval/reward_greedy']:.4f}, sampled reward "
                 f"{record['eval/reward_sampled']:.4f} ({len(self.eval_prompts)} held-out prompts)"]
        for s in record.get("samples", ()):
            lines.append(f"  {_short(s['prompt'])} -> greedy {_short(s['greedy'])} ({s['reward_greedy']:.3f}), "
                         f"sampled {_short(s['sampled'])} ({s['reward_sampled']:.3f})")
        return lines

    # --- the loop ---------------------------------------------------------------------------------------------
    def _setup_run_dir(self) -> str:
        run_dir = self.config.resume or self.config.run_dir or default_run_dir(self.info)
        if self.info.is_main:
            os.makedirs(run_dir, exist_ok=True)
        barrier(self.info)
        return run_dir

    def _write_records(self, name: str, records: list[dict]) -> None:
        if self.info.is_main:
            write_atomic(os.path.join(self.run_dir, name), "".join(json.dumps(r) + "\n" for r in records))

    def _append_metrics(self, record: dict) -> None:
        """Record a train or eval record (metrics.jsonl, TensorBoard); an eval's samples go to samples.jsonl."""
        samples = record.pop("samples", [])
        self.history.append(record)
        if not self.info.is_main:
            return
        with open(os.path.join(self.run_dir, "metrics.jsonl"), "a") as fh:
            fh.write(json.dumps(record) + "\n")
        if record["split"] == "eval":
            with open(os.path.join(self.run_dir, "samples.jsonl"), "a") as fh:
                fh.writelines(json.dumps({"step": record["step"], **s}) + "\n" for s in samples)
        if self._writer is not None:
            for key, value in record.items():
                if key not in ("split", "step") and isinstance(value, (int, float)):
                    self._writer.add_scalar(key, value, record["step"])
            if samples:
                rows = [f"| {s['prompt']!r} | {s['greedy']!r} ({s['reward_greedy']:.3f}) | {s['sampled']!r} "
                        f"({s['reward_sampled']:.3f}) |" for s in samples]
                self._writer.add_text("eval/samples", "\n".join(["| prompt | greedy | sampled |", "|---|---|---|",
                                                                  *rows]), record["step"])
            self._writer.flush()

    def _evaluate_and_record(self, step: int | None = None) -> None:
        with self._abandonable():
            record = self.evaluate(step)
        for line in self.eval_lines(record):
            self._info(line)
        self._append_metrics(record)

    def _checkpoint_parts(self) -> dict:
        if self.value_model is None:
            return {}
        return {"value": (self.value_model, self.critic_optimizer, self.critic_scheduler)}

    def save(self) -> str:
        return save_checkpoint(
            self.run_dir, self.step, model=self.policy, optimizer=self.optimizer, scheduler=self.scheduler,
            trainer_state={"history": self.history, "config": self.config.to_dict()}, info=self.info,
            keep=self.config.keep_checkpoints, extra=self._checkpoint_parts(),
        )

    def resume(self, run_dir: str) -> bool:
        """Load ``run_dir``'s latest complete checkpoint; False when it has none (the run starts from scratch).

        Raises ``ValueError`` (see ``check_resume``) when this trainer's config cannot continue that run.
        """
        path = latest_checkpoint(run_dir)
        if path is None:
            return False
        saved = read_trainer_state(path)
        step = int(saved["step"])
        changes = check_resume(saved["config"], step, self.config, run_dir, finished=run_finished(run_dir, step))
        state = load_checkpoint(path, model=self.policy, optimizer=self.optimizer, scheduler=self.scheduler,
                                info=self.info, extra=self._checkpoint_parts())
        self.step = int(state["step"])
        saved_world = int(state.get("world_size", 1))
        if saved_world != self.info.world_size:
            self._info(f"the checkpoint was written by {saved_world} rank(s), this run has {self.info.world_size}: "
                       "its model and optimizer states were resharded on loading (rollouts are seeded per row, so the "
                       "run continues as it would have)")
        self.history = list(state["history"])
        horizon = self.scheduler.lr_lambdas[0].horizon  # restored from the checkpoint
        self.config = self.config.replace(lr_decay_steps=horizon)
        cfg = self.config
        self._info(f"resuming {run_dir} from its checkpoint at step {self.step}: steps {self.step + 1}-{cfg.steps} "
                   f"to run" if cfg.steps > self.step else
                   f"resuming {run_dir} at its last step {self.step}: finishing its final evaluation and model")
        if changes:
            self._info(f"changed since the run's last invocation: {', '.join(changes)}")
        if cfg.lr_schedule != "constant" and cfg.steps > horizon >= cfg.warmup_steps:
            self._info(f"learning rate: the {cfg.lr_schedule} decay ends at step {horizon} (lr_decay_steps, fixed when "
                       f"the run started); steps {max(horizon, self.step) + 1}-{cfg.steps} run at lr * min_lr_ratio = "
                       f"{cfg.lr * cfg.min_lr_ratio:.3g}")
        return True

    def train(self) -> dict:
        """Run (or continue) training to ``config.steps``; returns the summary (also logged as a table).

        Writes into the run directory: ``config.yaml`` (updated on every resume), ``metrics.jsonl``,
        ``samples.jsonl``, checkpoints, ``final/`` (``save_final_model``), ``summary.json`` and
        ``reward_curves.png`` (``plot``).

        SIGTERM or SIGINT (Ctrl-C) while it runs: a complete checkpoint of the last finished step, then
        ``remax.stopping.TrainingStopped`` (see ``remax.stopping``). A reward that fails (raises, NaN, wrong shape):
        the same checkpoint, then a ``RewardError`` saying where it is.
        """
        from tqdm.contrib.logging import logging_redirect_tqdm

        from remax.rewards import RewardError

        self.run_dir = self._setup_run_dir()
        t0 = time.perf_counter()
        if self.config.resume is None:
            check_run_dir(self.config, self.run_dir)
        resumed = self.config.resume is not None and self.resume(self.run_dir)
        if self.config.resume is not None and not resumed:
            self._info(f"{self.run_dir} has no complete checkpoint yet: starting it at step 0")
        start = self.step
        if resumed:
            self._write_records("metrics.jsonl", self.history)
            self._truncate_samples(start)
        else:
            random.seed(derive_seed(self.config.seed, "python", self.info.rank))
            np.random.seed(derive_seed(self.config.seed, "numpy", self.info.rank))
            torch.manual_seed(derive_seed(self.config.seed, "torch", self.info.rank))
            # The schedule's end is fixed now, so a later resume with more steps cannot move it.
            self.config = self.config.replace(lr_decay_steps=self.config.schedule_steps)
            self.history = []
            self._write_records("metrics.jsonl", [])
            self._write_records("samples.jsonl", [])
        cfg = self.config
        self._warn_long_warmup()
        if self.info.is_main:
            save_config(cfg, os.path.join(self.run_dir, "config.yaml"))
        if self._tensorboard is not None and self.info.is_main:
            self._writer = self._tensorboard(log_dir=os.path.join(self.run_dir, "tensorboard"),
                                             purge_step=start + 1 if resumed else None)
        self._bar = None
        self._last_saved = self.step if resumed else -1
        self._signals = StopSignals(abandon=not self.info.enabled)
        try:
            with logging_redirect_tqdm(loggers=[get_logger()]), self._signals:
                try:
                    self._loop(resumed)
                except StopNow:
                    pass  # the phase was abandoned: the checkpoint is of the last finished step
                if self._signals.received is not None:
                    path = self._save_after_failure()
                    raise TrainingStopped(self._signals.received, self.step, path)
        except RewardError as err:
            path = self._save_after_failure()
            where = (f"; {self.run_dir} holds a complete checkpoint at step {read_trainer_state(path)['step']}: fix "
                     f"the reward and continue with `remax train --resume {self.run_dir}`") if path else ""
            raise RewardError(f"{err} (after {self.step} completed steps){where}") from None
        finally:
            self._signals = None
            if self._bar is not None:
                self._bar.close()
            if self._writer is not None:
                self._writer.close()
        if self._last_saved != self.step and cfg.save_every >= 0:
            self.save()  # the final checkpoint includes the final evaluation
        if cfg.save_final_model:
            self.save_final_model(os.path.join(self.run_dir, "final"))
        summary = self.summary(time.perf_counter() - t0, start=start, resumed=resumed)
        if self.info.is_main:
            write_atomic(os.path.join(self.run_dir, "summary.json"), json.dumps(summary, indent=2))
            if cfg.plot:
                from remax.plotting import plot_run

                summary["plot"] = plot_run(self.run_dir)
            self._info(format_summary(summary))
        return summary

    def _loop(self, resumed: bool) -> None:
        """Steps to ``config.steps``, with the evaluations and checkpoints due at each step boundary; returns early
        at a boundary where a stop was requested (``self._signals``)."""
        from tqdm.auto import tqdm

        cfg = self.config
        if resumed and self._has_eval(self.step):
            last = self.history_eval()[-1]
            self._info(f"last held-out eval @ step {last['step']}: greedy reward {last['eval/reward_greedy']:.4f}, "
                       f"sampled reward {last['eval/reward_sampled']:.4f}")
        while True:
            # Everything of the step boundary: what an abandoned evaluation or rollout restores before saving.
            self._boundary_rng = rng_state()
            if self._signals.requested(self.info):
                return
            if self._eval_due(self.step) and not self._has_eval(self.step):
                self._evaluate_and_record()
            if cfg.save_every > 0 and self.step % cfg.save_every == 0 and 0 < self.step < cfg.steps and (
                    self._last_saved != self.step):
                self.save()
                self._last_saved = self.step
            if self.step >= cfg.steps:
                return
            if self._bar is None:
                self._bar = tqdm(total=cfg.steps, initial=self.step, desc="remax", dynamic_ncols=True,
                                 disable=not self.show_progress)
            if self._signals.requested(self.info):
                return
            record = self.train_step(self.step)
            self.step += 1
            self._append_metrics(record)
            greedy = f", greedy {record['reward/greedy']:.4f}" if "reward/greedy" in record else ""
            logger.debug(f"step {self.step}: reward sampled {record['reward/sampled']:.4f}{greedy}, lr "
                         f"{record['lr']:.3g}, grad norm {record['grad_norm']:.3g}, "
                         f"{record['perf/step_time_s']:.3f} s")
            postfix = {"r_sampled": f"{record['reward/sampled']:.3f}"}
            if "reward/greedy" in record:
                postfix["r_greedy"] = f"{record['reward/greedy']:.3f}"
            if "loss/kl" in record:
                postfix["kl"] = f"{record['loss/kl']:.4f}"
            postfix["tokens/s"] = f"{record['perf/tokens_per_s']:.0f}"
            self._bar.set_postfix(postfix)
            self._bar.update(1)

    def _eval_due(self, step: int) -> bool:
        """Evaluations run before training (step 0), every ``eval_every`` steps and after the last step."""
        every = self.config.eval_every
        return step == 0 or step == self.config.steps or bool(every) and step % every == 0

    def _has_eval(self, step: int) -> bool:
        return any(r["split"] == "eval" and r["step"] == step for r in self.history)

    def _save_after_failure(self) -> str | None:
        """After a stop request or a failed reward: a checkpoint of the last finished step (unless it has one, or
        none is wanted: ``save_every -1``, step 0), with the RNG states of that step boundary; returns the latest
        complete checkpoint (None if there is none). Under torchrun a failed reward may have reached one rank only,
        so nothing new is saved there."""
        boundary = getattr(self, "_boundary_rng", None)
        if (self.step > 0 and self.config.save_every >= 0 and self._last_saved != self.step and not self.info.enabled
                and boundary is not None):
            set_rng_state(boundary)
            self.save()
            self._last_saved = self.step
        return latest_checkpoint(self.run_dir)

    def _abandonable(self):
        """A phase that changes no training state: a stop request may cut it short (``remax.stopping``)."""
        return self._signals.abandonable() if self._signals is not None else contextlib.nullcontext()

    @property
    def show_progress(self) -> bool:
        """Progress lines on stderr: ``config.progress`` "true", or "auto" when stderr is a terminal; rank 0 only,
        never with ``quiet``."""
        wanted = self.config.progress == "true" or self.config.progress == "auto" and sys.stderr.isatty()
        return wanted and self.info.is_main and not self.quiet

    def _rows_progress(self, total: int, desc: str):
        """``(bar, advance)`` for a rollout or an evaluation: ``advance(rows, tokens)`` after each generate call
        shows prompts done / total and generated tokens/s; ``advance`` is None when progress is off."""
        from tqdm.auto import tqdm

        if not self.show_progress:
            return None, None
        # mininterval 0: a line per generate call (seconds apart on a real model), none skipped.
        bar = tqdm(total=total, desc=desc, unit="prompt", leave=False, dynamic_ncols=True, mininterval=0)
        t0, tokens = time.perf_counter(), [0]

        def advance(rows: int, new_tokens: int) -> None:
            tokens[0] += new_tokens
            bar.set_postfix_str(f"{tokens[0] / max(time.perf_counter() - t0, 1e-9):.0f} tokens/s", refresh=False)
            bar.update(rows)

        return bar, advance

    def _warn_long_warmup(self) -> None:
        """One line when the warm-up outlasts the run: the learning rate then never reaches ``lr`` (not capped: the
        schedule stays what the config says, and the summary states the peak reached)."""
        cfg = self.config
        if cfg.warmup_steps > cfg.steps:
            logger.warning(f"warmup_steps {cfg.warmup_steps} > steps {cfg.steps}: the learning rate climbs to "
                           f"{cfg.lr * cfg.steps / cfg.warmup_steps:.3g} at most and never reaches lr {cfg.lr:.3g} "
                           f"(not capped); --warmup_steps {max(1, cfg.steps // 10)} reaches it")

    def _truncate_samples(self, step: int) -> None:
        """Drop samples.jsonl lines of evaluations after ``step`` (a resumed run repeats them)."""
        path = os.path.join(self.run_dir, "samples.jsonl")
        if not self.info.is_main or not os.path.isfile(path):
            return
        with open(path) as fh:
            kept = [r for r in map(json.loads, filter(str.strip, fh)) if r["step"] <= step]
        self._write_records("samples.jsonl", kept)

    def history_eval(self) -> list[dict]:
        return [r for r in self.history if r["split"] == "eval"]

    def summary(self, wall_s: float, *, start: int = 0, resumed: bool = False) -> dict:
        """Held-out rewards of the run's first (step 0) and last evaluations; speed of the steps run since
        ``start`` (this invocation: ``steps_run``), ``resumed_from`` the step a resume continued from.

        Also, for the steps of this invocation: ``time_per_step_s`` (median seconds in rollout, reward, training
        and in all, the first step left out as warm-up when there are more), ``peak_mem_mb`` (``peak_mem_kind``: CUDA's
        ``max_memory_allocated`` or the process's peak resident memory), ``model_states_bytes`` (see
        ``model_state_bytes``) and ``parameters`` (trainable and frozen, every model)."""
        evals = self.history_eval()
        train = [r for r in self.history if r["split"] == "train" and r["step"] > start]
        before, after = evals[0], evals[-1]
        out = {
            "run_dir": self.run_dir,
            "estimator": self.config.estimator,
            "step": self.step,
            "steps_run": self.step - start,
            "resumed_from": start if resumed else None,
            "wall_s": wall_s,
            "before": {"step": before["step"], "greedy": before["eval/reward_greedy"],
                       "sampled": before["eval/reward_sampled"]},
            "after": {"step": after["step"], "greedy": after["eval/reward_greedy"],
                      "sampled": after["eval/reward_sampled"]},
        }
        lrs = [r["lr"] for r in self.history if r["split"] == "train"]
        if lrs:
            # The warm-up can outlast a short run (see _warn_long_warmup): say what the run actually reached.
            out["lr"] = {"peak": float(max(lrs)), "configured": self.config.lr,
                         "warmup_steps": self.config.warmup_steps}
        if train:
            out["rollout_mismatch"] = {
                "logprob_abs_diff_mean": float(np.mean([r["mismatch/logprob_abs_diff"] for r in train])),
                "logprob_abs_diff_max": float(max(r["mismatch/logprob_abs_diff_max"] for r in train)),
            }
            out["mean_step_time_s"] = float(np.mean([r["perf/step_time_s"] for r in train]))
            out["mean_tokens_per_s"] = float(np.mean([r["perf/tokens_per_s"] for r in train]))
            out["peak_mem_mb"] = float(max(r["perf/peak_mem_mb"] for r in train))
            out["peak_mem_kind"] = ("cuda max_memory_allocated" if self.device.type == "cuda"
                                    else "peak resident memory of the process")
            # Medians: a step slowed by another job on a shared machine does not move them.
            timed = train[1:] if len(train) > 1 else train
            out["time_per_step_s"] = {name: float(np.median([r[f"perf/{key}"] for r in timed])) for name, key in (
                ("rollout", "rollout_s"), ("reward", "reward_s"), ("train", "train_s"), ("total", "step_time_s"))}
        if self.model_states is not None:
            out["model_states_bytes"] = self.model_states
        out["parameters"] = self.parameter_counts()
        return out

    def save_final_model(self, path: str) -> None:
        """``save_pretrained`` of the policy (full weights gathered on rank 0 under FSDP2; the adapter of a LoRA
        policy) and the tokenizer."""
        state_dict = None
        if self.info.enabled:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            state_dict = get_model_state_dict(self.policy,
                                              options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.info.is_main:
            with no_hf_progress_bars():
                if state_dict is None:
                    self.policy.save_pretrained(path)
                else:
                    self.policy.save_pretrained(path, state_dict=state_dict)
            self.tokenizer.save_pretrained(path)
        barrier(self.info)


def _tensorboard_writer_class():
    """``torch.utils.tensorboard.SummaryWriter``, or a ``ValueError`` saying how to install it."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ValueError("report_to: 'tensorboard' needs the tensorboard package (pip install tensorboard); "
                         "metrics.jsonl is written either way") from None
    return SummaryWriter


def _tensor_bytes(tensors) -> int:
    """Bytes of this rank's part of ``tensors`` (a DTensor's local shard), each storage counted once (tied weights)."""
    seen: set[int] = set()
    total = 0
    for t in tensors:
        t = local_tensor(t)
        if t.numel() and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


class _Stats:
    """Named (sum, count) pairs, summed over ranks in one all-reduce; ``reduce`` returns sum/count per name, and the
    local maxima of ``add_max`` (the caller reduces those with ``all_reduce_max``)."""

    def __init__(self):
        self.names: list[str] = []
        self.values: list[float] = []
        self.maxima: dict[str, float] = {}

    def add_max(self, name: str, value: float) -> None:
        self.maxima[name] = max(self.maxima.get(name, -math.inf), value)

    def add(self, name: str, total: float, count: float) -> None:
        if name in self.names:
            i = self.names.index(name)
            self.values[2 * i] += total
            self.values[2 * i + 1] += count
        else:
            self.names.append(name)
            self.values += [total, count]

    def reduce(self, info: DistInfo) -> dict[str, float]:
        summed = all_reduce_sum(torch.tensor(self.values, dtype=torch.float64), info).tolist()
        return {**{n: summed[2 * i] / max(summed[2 * i + 1], 1e-12) for i, n in enumerate(self.names)}, **self.maxima}


def format_summary(summary: dict) -> str:
    """The final table: greedy and sampled held-out reward before and after RL, plus what ran, speed and memory."""
    b, a = summary["before"], summary["after"]
    before, after = f"step {b.get('step', 0)}", f"step {a.get('step', summary['step'])}"
    ran = summary["steps_run"]
    if summary.get("resumed_from") is None:
        what = f"{ran} steps"
    elif ran:
        what = f"resumed from step {summary['resumed_from']}: ran steps {summary['resumed_from'] + 1}-{summary['step']}"
    else:
        what = f"resumed at step {summary['resumed_from']}: no steps to run"
    lines = [
        "",
        f"{'held-out reward':24}{'before RL':>12}{'after RL':>12}{'change':>10}",
        f"{'':24}{before:>12}{after:>12}",
        f"{'greedy':24}{b['greedy']:>12.4f}{a['greedy']:>12.4f}{a['greedy'] - b['greedy']:>+10.4f}",
        f"{'sampled':24}{b['sampled']:>12.4f}{a['sampled']:>12.4f}{a['sampled'] - b['sampled']:>+10.4f}",
        "",
        f"estimator {summary['estimator']}, {what} in {summary['wall_s']:.1f} s",
    ]
    if "mean_step_time_s" in summary:
        lines.append(f"mean step {summary['mean_step_time_s']:.3f} s, {summary['mean_tokens_per_s']:.0f} generated "
                     f"tokens/s, peak memory {summary['peak_mem_mb']:.0f} MB")
    if "model_states_bytes" in summary:
        states = summary["model_states_bytes"]
        parts = ", ".join(f"{name} {sum(v.values()) / 2**20:.1f}" for name, v in states.items())
        params = summary["parameters"]
        lines.append(f"model states {sum(sum(v.values()) for v in states.values()) / 2**20:.1f} MB ({parts}; "
                     f"parameters, gradients, optimizer), {params['trainable'] / 1e6:.3g}M trainable and "
                     f"{params['frozen'] / 1e6:.3g}M frozen parameters")
    if "lr" in summary:
        lr = summary["lr"]
        short = lr["peak"] < lr["configured"] * (1 - 1e-6)
        lines.append(f"learning rate: peak {lr['peak']:.3g}" + (
            f", below lr {lr['configured']:.3g} (warmup_steps {lr['warmup_steps']} > steps {summary['step']})"
            if short else ""))
    if "rollout_mismatch" in summary:
        mm = summary["rollout_mismatch"]
        lines.append(f"rollout vs training log-probs of the sampled tokens: mean |diff| "
                     f"{mm['logprob_abs_diff_mean']:.2e}, max {mm['logprob_abs_diff_max']:.2e}")
    lines.append(f"run directory: {summary['run_dir']}")
    return "\n".join(lines)
