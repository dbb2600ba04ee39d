"""The trainer's configuration: dataclasses with every field documented, read from YAML and the command line.

Precedence: dataclass defaults < ``--config FILE.yaml`` < command-line options. The embedded experiment's fields form
a section of their own, ``TaskConfig``: ``task: {digits: 3}`` in YAML, ``--task.digits 3`` on the command line. Unknown
keys, values of the wrong type and out-of-range values raise one ``ValueError``/``TypeError`` naming the field before
any model is loaded.

Paths: a relative input path (``model``, ``tokenizer``, ``ref_model``, ``value_model``, ``reward``, ``prompts``,
``eval_prompts``, ``init_from``) written in a YAML file is relative to that file's folder; given on the command line,
to the current folder. The command line stores them absolute, so a run's ``config.yaml`` reads the same from
anywhere. ``run_dir`` and ``resume`` (where a run is written) are relative to the current folder.

Why no config library: the command line is the standard library's ``argparse``, built from the dataclass fields
(``config_argument_parser``: types, allowed values, defaults and help text from the fields' metadata), and YAML is
PyYAML's ``safe_load`` checked against the same type hints (``from_dict``). Hugging Face's ``HfArgumentParser``
(argparse from dataclasses too) has no nested sections, does not type-check YAML values and cannot tell a default
from a given value, which the precedence above and resume's check of changed fields need; OmegaConf/Hydra or tyro
would add a dependency and their own error format for what this module does in a few functions.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import typing
from dataclasses import dataclass, field
from typing import Any

from remax_kernels.advantages import KL_MODES
from remax_kernels.losses import KL_ESTIMATORS, LOSS_AGG_MODES, LossOptions

ESTIMATORS = ("remax", "reinforce", "rloo", "grpo", "ppo")
LR_SCHEDULES = ("constant", "cosine", "linear")
KL_PENALTIES = ("reward", "loss")
ROLLOUT_CORRECTIONS = ("none", "tis")
DEVICES = ("auto", "cpu", "cuda")
ATTN_IMPLEMENTATIONS = ("auto", "sdpa", "eager", "flash_attention_2")
TASKS = ("addition",)
REPORT_TO = ("none", "tensorboard")
LOG_LEVELS = ("debug", "info", "warning", "error")
PROGRESS = ("auto", "true", "false")

# Input paths, resolved against a YAML file's folder (see the module doc). ``reward`` is a path only in its
# ``file.py:function`` and directory forms.
INPUT_PATHS = ("model", "tokenizer", "ref_model", "value_model", "prompts", "eval_prompts", "init_from")


def _f(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TaskConfig:
    """The embedded experiment (``model`` unset): a tiny Llama built in code, warm-started on the addition task."""

    name: str = _f("addition", "built-in task with a verifiable partial-credit reward", choices=TASKS)
    digits: int = _f(3, "digits per operand of the addition task (zero-padded: '042+917=0959')")
    train_size: int = _f(4096, "number of training prompts the task draws")
    demo_error_rate: float = _f(0.6, "fraction of carrying warm-start demonstrations that drop the carry (imperfect "
                                     "demos leave RL something to fix)")
    sft_steps: int = _f(3000, "supervised warm-start steps on the imperfect demonstrations (~65 s on a 2-core CPU "
                              "by default; --init_from RUN reuses a run's warm-start instead)")
    sft_lr: float = _f(3e-3, "warm-start learning rate (AdamW, cosine decay)")
    sft_batch_size: int = _f(64, "warm-start batch size")
    hidden_size: int = _f(64, "embedded Llama: hidden size")
    layers: int = _f(2, "embedded Llama: decoder layers")
    heads: int = _f(4, "embedded Llama: attention heads")
    kv_heads: int = _f(0, "embedded Llama: key/value heads (grouped-query attention); 0 = heads")
    intermediate_size: int = _f(0, "embedded Llama: MLP width; 0 = 4 * hidden_size")
    vocab_size: int = _f(0, "embedded Llama: vocabulary rows of the embedding and lm-head; 0 = the character "
                            "tokenizer's 16. Larger values give the model a real-sized lm-head (e.g. 151936, "
                            "Qwen2.5's) whose extra tokens the task never uses (they decode to nothing)")
    tie_embeddings: bool = _f(False, "embedded Llama: tie the lm-head to the input embedding (as small Qwen/Llama "
                                     "models do)")

    def __post_init__(self) -> None:
        _check_choices(self, prefix="task.")
        for name in ("digits", "train_size", "sft_batch_size", "hidden_size", "layers", "heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"task.{name}: must be >= 1, got {getattr(self, name)}")
        for name in ("sft_steps", "kv_heads", "intermediate_size", "vocab_size"):
            if getattr(self, name) < 0:
                raise ValueError(f"task.{name}: must be >= 0, got {getattr(self, name)}")
        if self.kv_heads and self.heads % self.kv_heads:
            raise ValueError(f"task.kv_heads: {self.kv_heads} does not divide task.heads {self.heads}")
        if not self.sft_lr > 0:
            raise ValueError(f"task.sft_lr: must be > 0, got {self.sft_lr}")
        if not 0 <= self.demo_error_rate <= 1:
            raise ValueError(f"task.demo_error_rate: must be in [0, 1], got {self.demo_error_rate}")
        if self.hidden_size % self.heads:
            raise ValueError(f"task.hidden_size: {self.hidden_size} is not a multiple of task.heads {self.heads}")


@dataclass
class TrainConfig:
    """Everything a ``remax train`` run needs. Defaults reproduce the embedded experiment (tiny Llama, addition)."""

    # --- policy, reward and prompts -------------------------------------------------------------------------------
    model: str | None = _f(None, "local directory of a Hugging Face causal LM, or of a LoRA adapter saved by a run, "
                                 "or a .gguf file (converted once into ~/.cache/remax/models/; see `remax "
                                 "convert-gguf`) (never downloaded); unset = the embedded experiment (task.*)",
                           metavar="DIR")
    tokenizer: str | None = _f(None, "local tokenizer directory; default: the model directory", metavar="DIR")
    ref_model: str | None = _f(None, "local directory of the frozen KL reference; default: a copy of the initial "
                                     "policy", metavar="DIR")
    reward: str | None = _f(None, "'path/to/file.py:function' or 'module:function' (called with the prompt and "
                                  "response strings, returning a float [B]), or a local directory of an HF "
                                  "sequence-classification model with one label; unset = the task's reward",
                           metavar="SPEC")
    prompts: str | None = _f(None, "JSONL file of training prompts; unset = the embedded task's prompts",
                            metavar="FILE")
    eval_prompts: str | None = _f(None, "JSONL file of held-out prompts; default: the last eval_size prompts of "
                                        "`prompts` (the last 10% when it has fewer than 2 * eval_size)", metavar="FILE")
    prompt_field: str = _f("prompt", "JSONL field holding the prompt text")
    chat_template: bool = _f(True, "wrap prompts in the tokenizer's chat template when it has one")
    # --- the embedded experiment ----------------------------------------------------------------------------------
    task: TaskConfig = field(default_factory=TaskConfig, metadata={"help": "the embedded experiment"})
    init_from: str | None = _f(None, "a run directory of the embedded experiment: start from its warm-started "
                                     "policy (RUN/initial_policy) instead of warming up again; its task.*, seed "
                                     "and eval_size are taken over", metavar="RUN_DIR")
    # --- RL ---------------------------------------------------------------------------------------------------------
    estimator: str = _f("remax", "advantage estimator: remax (greedy baseline), reinforce (no baseline), rloo, grpo, "
                                 "or ppo (a value model and GAE; see the PPO fields)", choices=ESTIMATORS)
    group_size: int = _f(4, "rloo/grpo: samples per prompt (batch_size rows = batch_size/group_size prompts)")
    steps: int = _f(1000, "RL optimizer steps (in all: a resume with a larger value continues the run)")
    batch_size: int = _f(64, "rows per RL step over all ranks (remax: prompts, each with a sampled + greedy response)")
    rollout_batch_size: int = _f(0, "rows per rollout call (generate_pairs; generate_samples for the estimators "
                                    "other than remax; bounds generation memory); 0 = the whole per-rank batch. "
                                    "Each row has its own sampling seed, so results do not depend on it")
    grad_accum: int = _f(1, "micro-batches per optimizer step (the per-rank batch, or ppo mini-batch, is split; the "
                            "loss is normalized exactly; under FSDP2 gradients are reduced once, after the last)")
    # --- PPO (estimator: ppo) -----------------------------------------------------------------------------------------
    # Defaults: the settings TRL, verl, OpenRLHF and DeepSpeed-Chat (the ReMax paper's PPO baseline) share, and
    # DeepSpeed-Chat's where they differ; each help text names the others' values.
    value_model: str | None = _f(None, "ppo: local directory the value model starts from: a sequence-classification "
                                       "model with one label (e.g. a reward model; its score head is kept) or a causal "
                                       "LM (a new zero value head); default: a copy of the policy's backbone with a "
                                       "zero-initialized scalar head", metavar="DIR")
    critic_lr: float | None = _f(None, "ppo: the value model's peak learning rate (AdamW, the policy's schedule); "
                                       "unset = lr (TRL: one rate; verl and OpenRLHF use ~10x the actor's)")
    clip_ratio: float = _f(0.2, "ppo: clip eps of the policy's importance ratio (TRL, verl, OpenRLHF, DeepSpeed-Chat)")
    clip_ratio_c: float | None = _f(None, "ppo: dual-clip bound c > 1 for negative advantages (verl: 3.0); unset = off")
    value_clip: float | None = _f(0.2, "ppo: the value loss clips new values to old +- value_clip (TRL, OpenRLHF, "
                                       "DeepSpeed-Chat: 0.2; verl 0.5); unset = no clipping")
    gae_lambda: float = _f(0.95, "ppo: GAE lambda (TRL, DeepSpeed-Chat, OpenRLHF: 0.95; verl and newer OpenRLHF: "
                                 "1.0); the discount is gamma")
    ppo_epochs: int = _f(1, "ppo: passes over each rollout batch (verl, OpenRLHF, DeepSpeed-Chat: 1; TRL 4)")
    ppo_mini_batch_size: int = _f(0, "ppo: rows per optimizer step within a pass, over all ranks (shuffled per pass); "
                                     "0 = the whole batch: one update per pass (DeepSpeed-Chat; verl: batch / 4)")
    # --- optimizer and schedule -------------------------------------------------------------------------------------
    lr: float = _f(1e-3, "peak learning rate (AdamW)")
    lr_schedule: str = _f("cosine", "learning-rate schedule after warm-up", choices=LR_SCHEDULES)
    warmup_steps: int = _f(50, "linear warm-up steps (Adam's first full-size steps would otherwise knock a "
                                   "warm-started policy back)")
    lr_decay_steps: int = _f(0, "step at which the cosine/linear decay reaches lr * min_lr_ratio; later steps stay "
                                "there. 0 = steps. Fixed when a run starts (stored in its config.yaml), so a resume "
                                "with more steps continues at the final rate instead of restarting the schedule")
    min_lr_ratio: float = _f(0.1, "cosine/linear schedules decay to lr * min_lr_ratio")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    max_grad_norm: float = _f(1.0, "clip the gradient norm to this; 0 = no clipping")
    # --- generation -------------------------------------------------------------------------------------------------
    max_prompt_length: int = _f(256, "prompts longer than this many tokens are truncated from the left")
    max_new_tokens: int | None = _f(None, "maximum response length in tokens; unset = 256, or task.digits + 2 for the "
                                          "embedded experiment (answer + eos + 1 spare)")
    temperature: float = _f(1.0, "sampling temperature (also used for the training log-probs)")
    top_k: int = _f(0, "top-k sampling; 0 = off")
    top_p: float = _f(1.0, "nucleus sampling; 1.0 = off")
    min_p: float = _f(0.0, "min-p sampling; 0.0 = off")
    # --- loss and advantages ----------------------------------------------------------------------------------------
    kl_coef: float = _f(0.0, "KL penalty coefficient to the frozen reference (0 = no reference model is loaded)")
    kl_penalty: str = _f("reward", "'reward': k1 KL shapes the advantages (official ReMax); 'loss': a KL loss term",
                         choices=KL_PENALTIES)
    kl_estimator: str = _f("k3", "KL estimator of the 'loss' penalty and of the logged kl", choices=KL_ESTIMATORS)
    kl_mode: str = _f("sum", "'reward' penalty: KL summed to the end (verl) or one-step (official ReMax)",
                      choices=KL_MODES)
    gamma: float = _f(1.0, "discount of the reward over the response tokens (official ReMax: 0.99); ppo: GAE's")
    clip_reward: float | None = _f(None, "clip the reward difference / reward to [-c, c]; unset = off (official: 5)")
    whiten: bool = _f(False, "whiten the advantages over the batch (single process only; ppo always whitens its GAE "
                             "advantages, over all ranks, as TRL, verl and OpenRLHF do)")
    entropy_coef: float = _f(0.0, "entropy bonus coefficient")
    loss_agg_mode: str = _f("token-mean", "how per-token losses are averaged", choices=LOSS_AGG_MODES)
    rollout_correction: str = _f("none", "'tis': weight each token's policy-gradient term by min(pi_train / "
                                         "pi_rollout, tis_cap) (truncated importance sampling) to correct the "
                                         "rollout-train log-prob mismatch, which is measured and logged either way",
                                 choices=ROLLOUT_CORRECTIONS)
    tis_cap: float = _f(2.0, "rollout_correction 'tis': the cap of the importance weight")
    # --- systems -----------------------------------------------------------------------------------------------------
    device: str = _f("auto", "auto (CUDA when available), cpu or cuda", choices=DEVICES)
    cpu_threads: int = _f(0, "torch threads on the CPU; 0 = 1 for the embedded tiny model, else torch's default (a "
                             "warning suggests measuring 1: generation calls the model once per token on small "
                             "matrices, where extra threads mostly wait, and a busy machine makes them thrash)")
    attn_implementation: str = _f("auto", "attention of models loaded from --model: auto (flash-attn's kernels when "
                                          "flash-attn is installed and on CUDA, else torch SDPA), sdpa, eager, "
                                          "flash_attention_2", choices=ATTN_IMPLEMENTATIONS)
    bf16: bool = _f(True, "bf16 autocast for forward passes on CUDA (ignored on CPU)")
    gradient_checkpointing: bool = _f(False, "recompute decoder-layer activations in the backward pass")
    lora_r: int = _f(0, "LoRA rank (needs peft); 0 = full fine-tuning")
    lora_alpha: int = _f(16, "LoRA alpha")
    lora_dropout: float = _f(0.0, "LoRA dropout")
    lora_target_modules: str = _f("q_proj,k_proj,v_proj,o_proj", "comma-separated module names LoRA adapts")
    seed: int = _f(0, "seed of everything: model init, data order, sampling")
    # --- run directory, checkpoints, evaluation, logging -------------------------------------------------------------
    run_dir: str | None = _f(None, "where metrics, plots and checkpoints go; default runs/<timestamp>",
                             metavar="DIR")
    resume: str | None = _f(None, "run directory to continue from its latest complete checkpoint (fields that fix "
                                  "what the run optimizes must not change; steps may grow)", metavar="RUN_DIR")
    save_every: int = _f(50, "checkpoint every N steps (and at the end); 0 = only at the end; -1 = never (the run "
                             "cannot be resumed; for measurement runs of large models)")
    keep_checkpoints: int = _f(2, "how many complete checkpoints to keep")
    save_final_model: bool = _f(True, "save the final policy (save_pretrained; the adapter for LoRA) into "
                                      "RUN_DIR/final")
    eval_every: int = _f(100, "evaluate on the held-out prompts every N steps (always before and after); 0 = only then")
    eval_size: int = _f(256, "number of held-out prompts")
    eval_seed: int = _f(1234, "sampling seed of the evaluation (fixed, so before/after numbers are comparable)")
    eval_batch_size: int = _f(128, "rows per generate_pairs call during evaluation")
    log_samples: int = _f(3, "at every evaluation, log this many held-out prompts with their greedy and sampled "
                             "responses and rewards (stdout and RUN_DIR/samples.jsonl); 0 = none")
    track_grad_var: bool = _f(False, "log grad_var: 0.5*||g_a - g_b||^2 of the two half-batch gradients (trace of the "
                                     "half-batch gradient covariance, an unbiased estimate; ppo: of its first "
                                     "mini-batch update)")
    log_level: str = _f("info", "messages of the 'remax' logger shown (rank 0 only): debug adds a line per step",
                        choices=LOG_LEVELS)
    report_to: str = _f("none", "also write every metric to TensorBoard event files in RUN_DIR/tensorboard (needs "
                                "the tensorboard package)", choices=REPORT_TO)
    progress: str = _f("auto", "progress lines on stderr (the step bar; prompts done / total and tokens/s of the "
                               "evaluations and rollouts): true, false, or auto = only when stderr is a terminal "
                               "(logs written to a file stay free of them)", choices=PROGRESS)
    plot: bool = _f(True, "write reward_curves.png into the run directory at the end")

    def __post_init__(self) -> None:
        if isinstance(self.progress, bool):  # progress=False, as before it had an "auto"
            self.progress = str(self.progress).lower()
        if isinstance(self.task, dict):
            self.task = _build(TaskConfig, self.task, source="task", prefix="task.")
        if not isinstance(self.task, TaskConfig):
            raise TypeError(f"task: expected a TaskConfig or a mapping, got {type(self.task).__name__}")
        self.validate()

    # ------------------------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Nested plain dict (the ``task`` section as a dict), as written to a run's ``config.yaml``."""
        return dataclasses.asdict(self)

    def flat_dict(self) -> dict[str, Any]:
        """``{"steps": 1000, ..., "task.digits": 3, ...}``: every leaf field under its command-line name."""
        return _flatten(self.to_dict())

    @classmethod
    def from_dict(cls, values: dict[str, Any], *, source: str = "config") -> TrainConfig:
        """Build from a (nested) mapping; unknown keys and wrong types raise naming the key and ``source``."""
        return _build(cls, values, source=source, prefix="")

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with ``changes`` applied (validated like ``from_dict``); ``task={"digits": 2}`` updates a section."""
        merged = self.to_dict()
        for key, value in changes.items():
            if key == "task" and isinstance(value, TaskConfig):
                value = dataclasses.asdict(value)
            if key == "task" and isinstance(value, dict) and isinstance(merged.get("task"), dict):
                merged["task"] = {**merged["task"], **value}
            else:
                merged[key] = value
        return TrainConfig.from_dict(merged, source="replace")

    def validate(self) -> None:
        """Range and consistency checks; raises ``ValueError`` naming the field."""
        _check_choices(self)
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: must be >= 1, got {self.max_new_tokens}")
        for name in ("steps", "batch_size", "grad_accum", "ppo_epochs", "max_prompt_length", "eval_size",
                     "eval_batch_size", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.save_every < -1:
            raise ValueError(f"save_every: must be >= -1, got {self.save_every}")
        for name in ("cpu_threads", "rollout_batch_size", "ppo_mini_batch_size", "warmup_steps", "lr_decay_steps",
                     "eval_every", "top_k", "lora_r", "log_samples"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)}")
        for name in ("lr", "temperature"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: must be > 0, got {getattr(self, name)}")
        for name in ("kl_coef", "entropy_coef", "weight_decay", "max_grad_norm", "min_p", "lora_dropout"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p: must be in (0, 1], got {self.top_p}")
        if not 0 < self.gamma <= 1:
            raise ValueError(f"gamma: must be in (0, 1], got {self.gamma}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio: must be in [0, 1], got {self.min_lr_ratio}")
        for name in ("clip_reward", "critic_lr", "value_clip"):
            if getattr(self, name) is not None and not getattr(self, name) > 0:
                raise ValueError(f"{name}: must be > 0 or unset, got {getattr(self, name)}")
        if not 0 < self.tis_cap < float("inf"):
            raise ValueError(f"tis_cap: must be a finite number > 0, got {self.tis_cap}")
        if not 0 <= self.gae_lambda <= 1:
            raise ValueError(f"gae_lambda: must be in [0, 1], got {self.gae_lambda}")
        if self.estimator == "ppo":
            if self.batch_size % self.mini_batch_rows:
                raise ValueError(f"ppo_mini_batch_size: {self.ppo_mini_batch_size} does not divide batch_size "
                                 f"{self.batch_size}")
            if self.whiten:
                raise ValueError("whiten: ppo always whitens its GAE advantages (over all ranks); leave whiten false")
        self.loss_options()  # the loss options' own checks
        if self.estimator in ("rloo", "grpo"):
            if self.group_size < 2:
                raise ValueError(f"group_size: {self.estimator} needs >= 2 samples per prompt, got {self.group_size}")
            if self.batch_size % self.group_size:
                raise ValueError(f"batch_size: {self.batch_size} is not a multiple of group_size {self.group_size}")

    def loss_options(self) -> LossOptions:
        """The ``remax_kernels.LossOptions`` of this run (checked there): PPO's clipping (``clip_ratio``,
        ``clip_ratio_c``) with ``estimator='ppo'`` only; the KL term only with ``kl_penalty='loss'``; Dr. GRPO's norm
        is the generation budget (a constant, so micro-batches of different lengths share it); TIS with
        ``rollout_correction='tis'``."""
        sum_norm = self.loss_agg_mode == "seq-mean-token-sum-norm"
        ppo = self.estimator == "ppo"
        return LossOptions(
            clip_ratio=self.clip_ratio if ppo else None, clip_ratio_c=self.clip_ratio_c if ppo else None,
            kl_coef=self.kl_coef if self.kl_penalty == "loss" else 0.0, kl_estimator=self.kl_estimator,
            entropy_coef=self.entropy_coef, loss_agg_mode=self.loss_agg_mode,
            loss_agg_norm=float(self.response_budget) if sum_norm else None,
            rollout_is_cap=self.tis_cap if self.rollout_correction == "tis" else None,
        )

    @property
    def response_budget(self) -> int:
        """``max_new_tokens``, 256 when unset (the command line sets it for the embedded experiment)."""
        return 256 if self.max_new_tokens is None else self.max_new_tokens

    @property
    def mini_batch_rows(self) -> int:
        """Rows per optimizer step over all ranks: ``ppo_mini_batch_size`` (0 = ``batch_size``) for ppo, else
        ``batch_size`` (every other estimator makes one update per step)."""
        return (self.ppo_mini_batch_size or self.batch_size) if self.estimator == "ppo" else self.batch_size

    @property
    def schedule_steps(self) -> int:
        """The step where the learning-rate decay ends: ``lr_decay_steps``, or ``steps`` when 0."""
        return self.lr_decay_steps or self.steps

    def with_task_defaults(self) -> TrainConfig:
        """The config the embedded experiment runs (``model`` unset): ``max_new_tokens`` = task.digits + 2 if unset."""
        if self.model is None and self.max_new_tokens is None:
            return self.replace(max_new_tokens=self.task.digits + 2)
        return self

    def check_world(self, world_size: int) -> None:
        """Checks that depend on the number of ranks (called once the process group is up)."""
        rows = self.batch_size
        unit = self.group_size if self.estimator in ("rloo", "grpo") else 1
        if rows % (world_size * unit):
            raise ValueError(
                f"batch_size: {rows} must split evenly over {world_size} rank(s) in units of {unit} row(s) "
                "(a prompt's rloo/grpo group stays on one rank)"
            )
        if (rows // world_size) % self.grad_accum:
            raise ValueError(f"grad_accum: {self.grad_accum} does not divide the per-rank batch {rows // world_size}")
        mini = self.mini_batch_rows
        if mini < rows and (mini % world_size or (mini // world_size) % self.grad_accum):
            raise ValueError(f"ppo_mini_batch_size: {mini} must split evenly over {world_size} rank(s) into grad_accum "
                             f"{self.grad_accum} micro-batches each")
        if self.whiten and world_size > 1:
            raise ValueError("whiten: is computed over one rank's batch; not supported with more than one rank")

    def check_paths(self) -> None:
        """Fail fast on missing local paths (nothing is ever downloaded)."""
        for name in ("model", "tokenizer", "ref_model", "value_model", "init_from"):
            path = getattr(self, name)
            if path is not None and not os.path.isdir(path):
                raise ValueError(f"{name}: {path!r} is not a local directory (models are never downloaded)")
        for name in ("prompts", "eval_prompts"):
            path = getattr(self, name)
            if path is not None and not os.path.isfile(path):
                raise ValueError(f"{name}: {path!r} is not a file")
        if self.model is None and self.prompts is not None:
            raise ValueError("prompts: a prompt file needs a policy (--model); the embedded tiny Llama knows only "
                             f"the built-in task {self.task.name!r}")
        if self.model is not None and self.init_from is not None:
            raise ValueError("init_from: reuses the embedded experiment's warm-start; with --model, point --model at "
                             "the policy to start from (e.g. RUN/final)")
        if self.resume is not None and not os.path.isdir(self.resume):
            raise ValueError(f"resume: {self.resume!r} is not a run directory")


# --- fields, types and values ---------------------------------------------------------------------------------------


def _check_choices(obj, prefix: str = "") -> None:
    for f in dataclasses.fields(obj):
        choices = f.metadata.get("choices")
        if choices is not None and getattr(obj, f.name) not in choices:
            raise ValueError(f"{prefix}{f.name}: must be one of {choices}, got {getattr(obj, f.name)!r}")


def _is_section(tp) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def config_fields(cls=TrainConfig, prefix: str = "") -> dict[str, tuple[dataclasses.Field, Any]]:
    """Every leaf field by its command-line name (``"steps"``, ``"task.digits"``): ``(Field, type hint)``."""
    hints = typing.get_type_hints(cls)
    out: dict[str, tuple[dataclasses.Field, Any]] = {}
    for f in dataclasses.fields(cls):
        if _is_section(hints[f.name]):
            out.update(config_fields(hints[f.name], prefix=f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = (f, hints[f.name])
    return out


def _flatten(values: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(_flatten(value, prefix=f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in flat.items():
        section, dot, leaf = key.rpartition(".")
        (out.setdefault(section, {}) if dot else out)[leaf if dot else key] = value
    return out


def merge(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """``base`` updated with ``changes``; sections (nested dicts) are merged key by key."""
    out = dict(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = {**out[key], **value}
        else:
            out[key] = value
    return out


def _unknown_key_error(key: str, source: str) -> ValueError:
    close = difflib.get_close_matches(key, list(config_fields()), n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ValueError(f"{source}: unknown key {key!r}{hint} (`remax train --help` lists every field)")


def _build(cls, values, *, source: str, prefix: str):
    if not isinstance(values, dict):
        what = f"section {prefix[:-1]!r}" if prefix else "config"
        raise TypeError(f"{source}: {what} must be a mapping of field names to values, got {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    for key in values:
        if key not in hints:
            raise _unknown_key_error(f"{prefix}{key}", source)
    typed = {}
    for key, value in values.items():
        if _is_section(hints[key]):
            typed[key] = value if isinstance(value, hints[key]) else _build(
                hints[key], value, source=source, prefix=f"{prefix}{key}.")
        else:
            choices = next(f.metadata.get("choices") for f in dataclasses.fields(cls) if f.name == key)
            if isinstance(value, bool) and choices and "true" in choices:
                value = str(value).lower()  # YAML reads `progress: false` as a bool
            typed[key] = _coerce(f"{prefix}{key}", value, hints[key], from_string=False)
    return cls(**typed)


def _type_name(tp) -> str:
    args = typing.get_args(tp)
    if args:
        return " | ".join("None" if a is type(None) else a.__name__ for a in args)
    return tp.__name__


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def _coerce(name: str, value: Any, tp, *, from_string: bool) -> Any:
    """Check (YAML) or parse (command line) ``value`` as field type ``tp``."""
    args = typing.get_args(tp)
    optional = type(None) in args
    base = next(a for a in args if a is not type(None)) if args else tp
    if value is None or (from_string and optional and str(value).lower() in ("none", "null")):
        if optional:
            return None
        raise TypeError(f"{name}: expected {base.__name__}, got None")
    if from_string:
        text = str(value)
        try:
            if base is bool:
                if text.lower() in _TRUE:
                    return True
                if text.lower() in _FALSE:
                    return False
                raise ValueError
            return base(text) if base is not int else int(text, 10)
        except ValueError:
            raise TypeError(f"{name}: expected {base.__name__}, got {text!r}") from None
    if base in (int, float) and isinstance(value, str):
        # YAML 1.1 reads "1e-4" (no dot) as a string: accept numbers written that way.
        return _coerce(name, value, tp, from_string=True)
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if base is int and isinstance(value, bool) or not isinstance(value, base):
        raise TypeError(f"{name}: expected {base.__name__}, got {type(value).__name__} {value!r}")
    return value


# --- paths ------------------------------------------------------------------------------------------------------------


def _resolve_reward(spec: str, base: str) -> str:
    module, sep, attr = spec.rpartition(":")
    if not sep:
        return os.path.normpath(os.path.join(base, spec))  # a reward-model directory
    if module.endswith(".py"):
        return f"{os.path.normpath(os.path.join(base, module))}:{attr}"
    if module.isidentifier() and os.path.isfile(os.path.join(base, module + ".py")):
        # 'my_reward:fn' beside the config (or in the current folder): the file, wherever remax is run from.
        return f"{os.path.join(base, module + '.py')}:{attr}"
    return spec


def resolve_paths(values: dict[str, Any], base: str) -> dict[str, Any]:
    """``values`` with its relative input paths (``INPUT_PATHS`` and a path-like ``reward``) made absolute from
    the folder ``base``; other values unchanged."""
    base = os.path.abspath(base)
    out = dict(values)
    for name in INPUT_PATHS:
        if isinstance(out.get(name), str):
            out[name] = os.path.normpath(os.path.join(base, out[name]))
    if isinstance(out.get("reward"), str):
        out["reward"] = _resolve_reward(out["reward"], base)
    return out


# --- the command line ---------------------------------------------------------------------------------------------

# Help groups of ``--help``, in order; "task" stands for every field of the section.
HELP_GROUPS = (
    ("policy, reward and prompts", ("model", "tokenizer", "ref_model", "reward", "prompts", "eval_prompts",
                                    "prompt_field", "chat_template")),
    ("the embedded experiment (when --model is unset)", ("task", "init_from")),
    ("RL", ("estimator", "group_size", "steps", "batch_size", "rollout_batch_size", "grad_accum")),
    ("PPO (estimator ppo)", ("value_model", "critic_lr", "clip_ratio", "clip_ratio_c", "value_clip", "gae_lambda",
                             "ppo_epochs", "ppo_mini_batch_size")),
    ("optimizer and learning-rate schedule", ("lr", "lr_schedule", "warmup_steps", "lr_decay_steps", "min_lr_ratio",
                                              "weight_decay", "max_grad_norm")),
    ("generation", ("max_prompt_length", "max_new_tokens", "temperature", "top_k", "top_p", "min_p")),
    ("loss and advantages", ("kl_coef", "kl_penalty", "kl_estimator", "kl_mode", "gamma", "clip_reward", "whiten",
                             "entropy_coef", "loss_agg_mode", "rollout_correction", "tis_cap")),
    ("systems", ("device", "cpu_threads", "attn_implementation", "bf16", "gradient_checkpointing", "lora_r",
                 "lora_alpha", "lora_dropout", "lora_target_modules", "seed")),
    ("run directory, checkpoints, evaluation, logging", ("run_dir", "resume", "save_every", "keep_checkpoints",
                                                         "save_final_model", "eval_every", "eval_size", "eval_seed",
                                                         "eval_batch_size", "log_samples", "track_grad_var",
                                                         "log_level", "report_to", "progress",
                                                         "plot")),
)


class ConfigArgumentParser(argparse.ArgumentParser):
    """``argparse`` whose errors raise one ``ValueError`` naming the option, instead of printing usage and exiting."""

    def error(self, message: str):
        raise ValueError(message.removeprefix("argument "))


def _string_parser(name: str, tp):
    def parse(text: str):
        try:
            return _coerce(name, text, tp, from_string=True)
        except TypeError as err:
            raise argparse.ArgumentTypeError(str(err).removeprefix(f"{name}: ")) from None

    parse.__name__ = _type_name(tp)
    return parse


def _metavar(tp) -> str:
    args = typing.get_args(tp)
    base = next(a for a in args if a is not type(None)) if args else tp
    name = "true|false" if base is bool else base.__name__.upper()
    return f"{name}|none" if type(None) in args else name


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One ``--name`` option per config field, in ``HELP_GROUPS``; only options given end up in the namespace."""
    fields = config_fields()
    listed = [n for _, names in HELP_GROUPS for group_name in names
              for n in ([k for k in fields if k.startswith(f"{group_name}.")] or [group_name])]
    if sorted(listed) != sorted(fields):
        raise RuntimeError(f"HELP_GROUPS does not list every field once: {sorted(set(fields) ^ set(listed))}")
    for title, names in HELP_GROUPS:
        group = parser.add_argument_group(title)
        for name in [n for n in listed if n.split(".")[0] in names]:
            f, tp = fields[name]
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            # An unset default's meaning is in the help text itself.
            text = str(default).lower() if isinstance(default, bool) else str(default)
            shown = "" if default is None else f" (default: {text})"
            kwargs = dict(dest=name, default=argparse.SUPPRESS, type=_string_parser(name, tp),
                          help=(f.metadata["help"] + shown).replace("%", "%%"))
            if f.metadata.get("choices"):
                kwargs["choices"] = f.metadata["choices"]
            else:
                kwargs["metavar"] = f.metadata.get("metavar") or _metavar(tp)
            group.add_argument(f"--{name}", **kwargs)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def normalize_options(argv: list[str]) -> list[str]:
    """``--run-dir x`` -> ``--run_dir x`` (both spellings are accepted; fields are named with underscores), and
    ``--lr -1e-3`` -> ``--lr=-1e-3``: argparse takes a value that starts with ``-`` and is not a plain ``-1`` /
    ``-0.5`` for an option (``expected one argument``); joined, a negative number reaches the field's own check."""
    out = []
    for token in argv:
        if token.startswith("--") and len(token) > 2:
            key, eq, value = token[2:].partition("=")
            token = "--" + key.replace("-", "_") + eq + value
        if (token.startswith("-") and _is_number(token) and out and out[-1].startswith("--") and "=" not in out[-1]
                and out[-1] != "--"):
            out[-1] = f"{out[-1]}={token}"
            continue
        out.append(token)
    return out


def config_overrides(namespace: argparse.Namespace) -> dict[str, Any]:
    """The config options given on the command line (nested: ``{"task": {"digits": 2}}``)."""
    fields = config_fields()
    return _nest({k: v for k, v in vars(namespace).items() if k in fields})


def unknown_arguments_error(rest: list[str]) -> ValueError:
    token = rest[0]
    if token.startswith("--"):
        key = token[2:].partition("=")[0]
        close = difflib.get_close_matches(key, list(config_fields()), n=1, cutoff=0.6)
        hint = f"; did you mean --{close[0]}?" if close else ""
        return ValueError(f"--{key}: unknown option{hint} (`remax train --help` lists every field)")
    return ValueError(f"unexpected argument {token!r}: options are written --key value or --key=value")


def parse_overrides(argv: list[str]) -> dict[str, Any]:
    """``["--lr", "1e-4", "--bf16", "false", "--task.digits=2"]`` -> ``{"lr": 1e-4, "bf16": False, "task":
    {"digits": 2}}``: the command line's config options, parsed by the same argparse options as ``remax``."""
    parser = ConfigArgumentParser(prog="remax", add_help=False, allow_abbrev=False)
    add_config_arguments(parser)
    namespace, rest = parser.parse_known_args(normalize_options(argv))
    if rest:
        raise unknown_arguments_error(rest)
    return config_overrides(namespace)


# --- YAML -----------------------------------------------------------------------------------------------------------


def read_yaml(path: str, *, name: str = "--config") -> dict[str, Any]:
    """The mapping in a YAML file, its relative input paths resolved from the file's folder; one-line errors."""
    import yaml

    if not os.path.isfile(path):
        raise ValueError(f"{name}: {path!r} is not a file")
    with open(path) as fh:
        try:
            loaded = yaml.safe_load(fh)
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(err, "problem", None) or type(err).__name__
            raise ValueError(f"{name}: {path} is not valid YAML{where}: {problem}") from None
    loaded = {} if loaded is None else loaded
    if not isinstance(loaded, dict):
        raise TypeError(f"{name}: {path} must hold a mapping of field names to values")
    return resolve_paths(loaded, os.path.dirname(path) or ".")


def load_config(path: str | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Defaults, then the YAML file at ``path`` (if any), then ``overrides`` (nested); validated once at the end."""
    values = read_yaml(path) if path is not None else {}
    return TrainConfig.from_dict(merge(values, overrides or {}), source=path or "config")


def save_config(config: TrainConfig, path: str) -> None:
    """Write ``config`` as YAML (sections nested), replacing ``path`` atomically."""
    import yaml

    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as fh:
        yaml.safe_dump(config.to_dict(), fh, sort_keys=False)
    os.replace(tmp, path)
