"""The trainer's configuration: one dataclass, every field documented, loaded from YAML and ``--key value`` overrides.

Precedence: dataclass defaults < ``--config FILE.yaml`` < command-line ``--key value``. Unknown keys, values of the
wrong type and out-of-range values raise one ``ValueError``/``TypeError`` naming the field, before any model is
loaded. ``TrainConfig.help()`` lists every field with its default (``remax train --help`` prints it).
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from typing import Any

ESTIMATORS = ("remax", "reinforce", "rloo", "grpo")
LR_SCHEDULES = ("constant", "cosine", "linear")
KL_PENALTIES = ("reward", "loss")
KL_ESTIMATORS = ("k1", "k2", "k3")
KL_MODES = ("sum", "one-step")
LOSS_AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
DEVICES = ("auto", "cpu", "cuda")
ATTN_IMPLEMENTATIONS = ("auto", "sdpa", "eager", "flash_attention_2")
TASKS = ("addition",)


def _f(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    """Everything a ``remax train`` run needs. Defaults reproduce the embedded experiment (tiny Llama, addition)."""

    # --- policy, reward and prompts -------------------------------------------------------------------------------
    model: str | None = _f(None, "local directory of a Hugging Face causal LM (never downloaded); None = the embedded "
                                 "tiny Llama, warm-started on the built-in task")
    tokenizer: str | None = _f(None, "local tokenizer directory; default: the model directory")
    ref_model: str | None = _f(None, "local directory of the frozen KL reference; default: a copy of the initial "
                                     "policy")
    reward: str | None = _f(None, "'module:function' taking (prompts, responses) strings and returning a float [B], "
                                  "or a local directory of an HF sequence-classification model; None = the task's "
                                  "reward")
    prompts: str | None = _f(None, "JSONL file of training prompts; None = the built-in task's prompts")
    eval_prompts: str | None = _f(None, "JSONL file of held-out prompts; default: the last eval_size prompts of "
                                        "`prompts` (the last 10% when it has fewer than 2 * eval_size)")
    prompt_field: str = _f("prompt", "JSONL field holding the prompt text")
    chat_template: bool = _f(True, "wrap prompts in the tokenizer's chat template when it has one")
    # --- embedded experiment (used when model is None) -------------------------------------------------------------
    task: str = _f("addition", "built-in task with a verifiable partial-credit reward", choices=TASKS)
    task_digits: int = _f(3, "digits per operand of the addition task (zero-padded: '042+917=0959')")
    task_train_size: int = _f(4096, "number of training prompts the built-in task draws")
    demo_error_rate: float = _f(0.6, "fraction of carrying warm-start demonstrations that drop the carry (imperfect "
                                     "demos leave RL something to fix)")
    sft_steps: int = _f(3000, "supervised warm-start steps on the imperfect demonstrations")
    sft_lr: float = _f(3e-3, "warm-start learning rate (AdamW, cosine decay)")
    sft_batch_size: int = _f(64, "warm-start batch size")
    tiny_hidden_size: int = _f(64, "embedded Llama: hidden size")
    tiny_layers: int = _f(2, "embedded Llama: decoder layers")
    tiny_heads: int = _f(4, "embedded Llama: attention heads")
    # --- RL ---------------------------------------------------------------------------------------------------------
    estimator: str = _f("remax", "advantage estimator: remax (greedy baseline), reinforce (no baseline), rloo, grpo",
                        choices=ESTIMATORS)
    group_size: int = _f(4, "rloo/grpo: samples per prompt (batch_size rows = batch_size/group_size prompts)")
    steps: int = _f(1000, "RL optimizer steps")
    batch_size: int = _f(64, "rows per RL step over all ranks (remax: prompts, each with a sampled + greedy response)")
    rollout_batch_size: int = _f(0, "rows per generate_pairs call (bounds generation memory); 0 = the whole per-rank "
                                    "batch. Each row has its own sampling seed, so results do not depend on it")
    grad_accum: int = _f(1, "micro-batches per step (the per-rank batch is split; the loss is normalized exactly)")
    lr: float = _f(1e-3, "peak learning rate (AdamW)")
    lr_schedule: str = _f("cosine", "learning-rate schedule after warm-up", choices=LR_SCHEDULES)
    warmup_steps: int = _f(50, "linear warm-up steps (Adam's first full-size steps would otherwise knock a "
                                   "warm-started policy back)")
    min_lr_ratio: float = _f(0.1, "cosine/linear schedules decay to lr * min_lr_ratio")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    max_grad_norm: float = _f(1.0, "clip the gradient norm to this; 0 = no clipping")
    max_prompt_length: int = _f(256, "prompts longer than this many tokens are truncated from the left")
    max_new_tokens: int | None = _f(None, "maximum response length in tokens; None = 256, or task_digits + 2 for the "
                                          "embedded experiment (answer + eos + 1 spare)")
    temperature: float = _f(1.0, "sampling temperature (also used for the training log-probs)")
    top_k: int = _f(0, "top-k sampling; 0 = off")
    top_p: float = _f(1.0, "nucleus sampling; 1.0 = off")
    min_p: float = _f(0.0, "min-p sampling; 0.0 = off")
    kl_coef: float = _f(0.0, "KL penalty coefficient to the frozen reference (0 = no reference model is loaded)")
    kl_penalty: str = _f("reward", "'reward': k1 KL shapes the advantages (official ReMax); 'loss': a KL loss term",
                         choices=KL_PENALTIES)
    kl_estimator: str = _f("k3", "KL estimator of the 'loss' penalty and of the logged kl", choices=KL_ESTIMATORS)
    kl_mode: str = _f("sum", "'reward' penalty: KL summed to the end (verl) or one-step (official ReMax)",
                      choices=KL_MODES)
    gamma: float = _f(1.0, "discount of the reward over the response tokens (official ReMax: 0.99)")
    clip_reward: float | None = _f(None, "clip the reward difference / reward to [-c, c]; None = off (official: 5)")
    whiten: bool = _f(False, "whiten the advantages over the batch (single process only)")
    entropy_coef: float = _f(0.0, "entropy bonus coefficient")
    loss_agg_mode: str = _f("token-mean", "how per-token losses are averaged", choices=LOSS_AGG_MODES)
    # --- systems -----------------------------------------------------------------------------------------------------
    device: str = _f("auto", "auto (CUDA when available), cpu or cuda", choices=DEVICES)
    cpu_threads: int = _f(0, "torch threads on CPU; 0 = 1 for the embedded tiny model (its matrices are too small to "
                             "gain from more, and a busy machine makes extra threads thrash), else torch's default")
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
    # --- run directory, checkpoints, logging ------------------------------------------------------------------------
    run_dir: str | None = _f(None, "where metrics, plots and checkpoints go; default runs/<timestamp>")
    resume: str | None = _f(None, "run directory to continue from its latest complete checkpoint")
    save_every: int = _f(50, "checkpoint every N steps (and at the end); 0 = only at the end")
    keep_checkpoints: int = _f(2, "how many complete checkpoints to keep")
    save_final_model: bool = _f(True, "save the final policy (save_pretrained) into RUN_DIR/final")
    eval_every: int = _f(100, "evaluate on the held-out prompts every N steps (always before and after); 0 = only then")
    eval_size: int = _f(256, "number of held-out prompts")
    eval_seed: int = _f(1234, "sampling seed of the evaluation (fixed, so before/after numbers are comparable)")
    eval_batch_size: int = _f(128, "rows per generate_pairs call during evaluation")
    track_grad_var: bool = _f(False, "log grad_var: 0.5*||g_a - g_b||^2 of the two half-batch gradients (trace of the "
                                     "half-batch gradient covariance, an unbiased estimate)")
    log_entropy: bool = _f(True, "log the policy entropy of the sampled tokens (one extra no-grad forward per step; "
                                 "free when entropy_coef > 0)")
    progress: bool = _f(True, "show a tqdm progress bar")
    plot: bool = _f(True, "write reward_curves.png into the run directory at the end")

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------------------------------------------------
    @classmethod
    def field_types(cls) -> dict[str, Any]:
        return typing.get_type_hints(cls)

    @classmethod
    def help(cls) -> str:
        """One line per field: name, type, default and description."""
        types_ = cls.field_types()
        lines = []
        for f in dataclasses.fields(cls):
            t = _type_name(types_[f.name])
            lines.append(f"  --{f.name} ({t}, default {f.default!r}): {f.metadata['help']}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], *, source: str = "config") -> TrainConfig:
        """Build from a mapping (a parsed YAML file); unknown keys and wrong types raise naming the key and source."""
        if not isinstance(values, dict):
            raise TypeError(f"{source}: expected a mapping of field names to values, got {type(values).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"{source}: unknown key(s) {unknown}; run `remax train --help` for the valid fields")
        types_ = cls.field_types()
        typed = {k: _coerce(k, v, types_[k], from_string=False) for k, v in values.items()}
        return cls(**typed)

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with ``changes`` applied (validated like ``from_dict``)."""
        merged = self.to_dict()
        merged.update(changes)
        return TrainConfig.from_dict(merged, source="replace")

    def validate(self) -> None:
        """Range and consistency checks; raises ``ValueError`` naming the field."""
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if choices is not None and getattr(self, f.name) not in choices:
                raise ValueError(f"{f.name}: must be one of {choices}, got {getattr(self, f.name)!r}")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: must be >= 1, got {self.max_new_tokens}")
        positive = ("steps", "batch_size", "grad_accum", "max_prompt_length", "eval_size",
                    "eval_batch_size", "keep_checkpoints", "task_digits", "task_train_size", "sft_batch_size",
                    "tiny_hidden_size", "tiny_layers", "tiny_heads")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        for name in ("cpu_threads", "rollout_batch_size", "warmup_steps", "save_every", "eval_every", "sft_steps",
                     "top_k", "lora_r"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)}")
        for name in ("lr", "sft_lr", "temperature"):
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
        if not 0 <= self.demo_error_rate <= 1:
            raise ValueError(f"demo_error_rate: must be in [0, 1], got {self.demo_error_rate}")
        if self.clip_reward is not None and not self.clip_reward > 0:
            raise ValueError(f"clip_reward: must be > 0 or None, got {self.clip_reward}")
        if self.estimator in ("rloo", "grpo"):
            if self.group_size < 2:
                raise ValueError(f"group_size: {self.estimator} needs >= 2 samples per prompt, got {self.group_size}")
            if self.batch_size % self.group_size:
                raise ValueError(f"batch_size: {self.batch_size} is not a multiple of group_size {self.group_size}")
        if self.tiny_hidden_size % self.tiny_heads:
            raise ValueError(
                f"tiny_hidden_size: {self.tiny_hidden_size} is not a multiple of tiny_heads {self.tiny_heads}"
            )

    @property
    def response_budget(self) -> int:
        """``max_new_tokens``, 256 when unset (the command line sets it for the embedded experiment)."""
        return 256 if self.max_new_tokens is None else self.max_new_tokens

    def with_task_defaults(self) -> TrainConfig:
        """The config the embedded experiment runs (``model`` None): ``max_new_tokens`` = task_digits + 2 if unset."""
        if self.model is None and self.max_new_tokens is None:
            return self.replace(max_new_tokens=self.task_digits + 2)
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
        if self.whiten and world_size > 1:
            raise ValueError("whiten: is computed over one rank's batch; not supported with more than one rank")

    def check_paths(self) -> None:
        """Fail fast on missing local paths (nothing is ever downloaded)."""
        for name in ("model", "tokenizer", "ref_model"):
            path = getattr(self, name)
            if path is not None and not os.path.isdir(path):
                raise ValueError(f"{name}: {path!r} is not a local directory (models are never downloaded)")
        for name in ("prompts", "eval_prompts"):
            path = getattr(self, name)
            if path is not None and not os.path.isfile(path):
                raise ValueError(f"{name}: {path!r} is not a file")
        if self.model is None and self.prompts is not None:
            raise ValueError("prompts: a prompt file needs a policy (--model); the embedded tiny Llama knows only "
                             f"the built-in task {self.task!r}")
        if self.resume is not None and not os.path.isdir(self.resume):
            raise ValueError(f"resume: {self.resume!r} is not a run directory")


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


def parse_overrides(argv: list[str]) -> dict[str, Any]:
    """``["--lr", "1e-4", "--bf16", "false"]`` -> ``{"lr": 1e-4, "bf16": False}``; also ``--key=value``."""
    types_ = TrainConfig.field_types()
    out: dict[str, Any] = {}
    i = 0
    while i < len(argv):
        token = argv[i]
        if not token.startswith("--"):
            raise ValueError(f"unexpected argument {token!r}: overrides are written --key value")
        key, eq, value = token[2:].partition("=")
        key = key.replace("-", "_")
        if key not in types_:
            raise ValueError(f"--{key}: unknown config key; run `remax train --help` for the valid fields")
        if not eq:
            if i + 1 >= len(argv):
                raise ValueError(f"--{key}: missing value")
            value = argv[i + 1]
            i += 1
        out[key] = _coerce(key, value, types_[key], from_string=True)
        i += 1
    return out


def load_config(path: str | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Defaults, then the YAML file at ``path`` (if any), then ``overrides``; validated once at the end."""
    values: dict[str, Any] = {}
    if path is not None:
        import yaml

        if not os.path.isfile(path):
            raise ValueError(f"--config: {path!r} is not a file")
        with open(path) as fh:
            loaded = yaml.safe_load(fh) or {}
        if not isinstance(loaded, dict):
            raise TypeError(f"--config: {path} must hold a mapping of field names to values")
        values.update(loaded)
    values.update(overrides or {})
    return TrainConfig.from_dict(values, source=path or "config")


def save_config(config: TrainConfig, path: str) -> None:
    import yaml

    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as fh:
        yaml.safe_dump(config.to_dict(), fh, sort_keys=False)
    os.replace(tmp, path)
