"""Policy, reference and tokenizer loading (local paths only: a model directory or a run's LoRA adapter), the
embedded tiny Llama, LoRA, and the supervised warm-start of the embedded experiment.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import math
import os
import random
import warnings

import torch

from remax.config import TaskConfig, TrainConfig
from remax.logs import get_logger

logger = get_logger("model")


def set_cpu_threads(config: TrainConfig, device: torch.device) -> None:
    """Apply ``config.cpu_threads`` (see its help) when running on the CPU; warn when a user model runs with
    torch's default of several threads (measured on a 2-core machine: rollout 25.7 s/step vs 0.87 s with 1)."""
    if device.type != "cpu":
        return
    threads = config.cpu_threads or (1 if config.model is None else 0)
    if threads:
        torch.set_num_threads(threads)
    elif torch.get_num_threads() > 1:
        logger.warning(f"running on the CPU with torch's default of {torch.get_num_threads()} threads: generation "
                       "calls the model once per token on small matrices, where extra threads mostly wait, and on a "
                       "small or busy machine runs can be 10-30x slower and erratic. Measure --cpu_threads 1")


@contextlib.contextmanager
def no_hf_progress_bars():
    """No Hugging Face progress bars ("Writing model shards", "Loading weights") inside the block: the run has its
    own progress output."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        yield
        return
    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: 'cuda' was asked for but torch sees no CUDA device")
    return torch.device(name)


def build_tiny_llama(tokenizer, task: TaskConfig, *, seed: int) -> torch.nn.Module:
    """A small ``LlamaForCausalLM`` built from ``task``'s sizes (random init from ``seed``; nothing downloaded)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden = task.hidden_size
    if 0 < task.vocab_size < len(tokenizer):
        raise ValueError(f"task.vocab_size: {task.vocab_size} is smaller than the tokenizer's {len(tokenizer)} tokens")
    llama = LlamaConfig(
        vocab_size=task.vocab_size or len(tokenizer), hidden_size=hidden,
        intermediate_size=task.intermediate_size or 4 * hidden, num_hidden_layers=task.layers,
        num_attention_heads=task.heads, num_key_value_heads=task.kv_heads or task.heads, max_position_embeddings=64,
        tie_word_embeddings=task.tie_embeddings,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(llama)


def load_tokenizer(path: str, *, name: str = "tokenizer"):
    """A tokenizer from a local directory (pad = eos when it has none); one-line ``ValueError`` naming ``name``."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, ImportError) as err:
        found = sorted(os.listdir(path))[:6] if os.path.isdir(path) else []
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{name}: cannot load a tokenizer from {path!r} (it holds {found or 'no files'}; expected "
                         f"tokenizer.json or tokenizer_config.json): {first}") from None
    return ensure_pad_token(tokenizer)


def ensure_pad_token(tokenizer):
    """Pad with the eos token when the tokenizer has no pad token (as Hugging Face generate does)."""
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ValueError("tokenizer: has neither a pad nor an eos token; prompts cannot be padded")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def attention_implementation(choice: str, device: torch.device) -> str:
    """Resolve ``config.attn_implementation``: "auto" = flash-attn's kernels when flash-attn is installed and the
    policy runs on CUDA, else torch SDPA; other values are passed to transformers as they are."""
    if choice != "auto":
        return choice
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def load_causal_lm(path: str, *, name: str = "model", attn_implementation: str = "sdpa",
                   base: str | None = None) -> torch.nn.Module:
    """An HF causal LM from a local directory in float32 (bf16 compute comes from autocast).

    A LoRA adapter directory (``adapter_config.json``, as a LoRA run's ``final/``) loads onto its base model (``base``,
    else the adapter's ``base_model_name_or_path``) as a peft model whose adapters are trainable.
    """
    from transformers import AutoModelForCausalLM

    adapter_config = os.path.join(path, "adapter_config.json")
    if os.path.isfile(adapter_config):
        return _load_adapter(path, adapter_config, name=name, attn_implementation=attn_implementation, base=base)
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"{name}: {path!r} has no config.json: not a Hugging Face model directory")
    try:
        with no_hf_progress_bars():
            model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True,
                                                         attn_implementation=attn_implementation)
    except (OSError, ValueError, ImportError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{name}: cannot load a causal LM from {path!r}: {first}") from None
    # fp32 master weights: optimizer updates stay exact; bf16 speed comes from autocast on CUDA.
    return model.float()


def _load_adapter(path: str, adapter_config: str, *, name: str, attn_implementation: str, base: str | None):
    try:
        from peft import PeftModel
    except ImportError:
        raise ValueError(f"{name}: {path!r} is a LoRA adapter, which needs peft (`pip install peft`)") from None
    with open(adapter_config) as fh:
        base = base or json.load(fh).get("base_model_name_or_path")
    if not base or not os.path.isdir(base):
        raise ValueError(f"{name}: {path!r} is a LoRA adapter whose base model {base!r} is not a local directory; "
                         "evaluate a run's adapter with `remax eval RUN`")
    model = load_causal_lm(base, name=f"{name} (the adapter's base)", attn_implementation=attn_implementation)
    with no_hf_progress_bars(), _no_peft_deprecation_warning():
        return PeftModel.from_pretrained(model, path, is_trainable=True)


@contextlib.contextmanager
def _no_peft_deprecation_warning():
    """peft calls transformers' deprecated ``is_gradient_checkpointing``; nothing a user of remax can act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def lora_config(config: TrainConfig, **extra):
    """The peft ``LoraConfig`` of the run's ``lora_*`` fields (``extra``: e.g. ``task_type``)."""
    try:
        from peft import LoraConfig
    except ImportError:
        raise ValueError("lora_r: LoRA needs peft (`pip install peft`), which is not installed") from None
    targets = [t.strip() for t in config.lora_target_modules.split(",") if t.strip()]
    return LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=targets, **extra)


def apply_lora(model: torch.nn.Module, config: TrainConfig) -> torch.nn.Module:
    """Wrap ``model`` with LoRA adapters (peft) when ``config.lora_r > 0``; only the adapters train."""
    if config.lora_r == 0:
        return model
    lora = lora_config(config, task_type="CAUSAL_LM")
    from peft import get_peft_model

    with _no_peft_deprecation_warning():
        return get_peft_model(model, lora)


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A no-grad deep copy in eval mode: the KL reference when none is given (the policy as RL starts)."""
    ref = copy.deepcopy(model)
    ref.requires_grad_(False)
    return ref.eval()


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    if not hasattr(model, "gradient_checkpointing_enable"):
        raise ValueError("gradient_checkpointing: the policy has no gradient_checkpointing_enable() (not an HF model)")
    # Non-reentrant checkpointing works with frozen inputs (LoRA) and FSDP2. Newer transformers renamed the method
    # (the old name warns); a peft model forwards either name to its base model.
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def sft_warmstart(
    model: torch.nn.Module,
    tokenizer,
    prompts: list[str],
    answers: list[str],
    *,
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
    device: torch.device,
) -> float:
    """Teacher-forced cross-entropy on ``prompt + answer + eos`` (loss on answer and eos only); returns the last loss.

    AdamW with a cosine decay to 0 over ``steps``; batches are drawn with ``random.Random(seed)``.
    """
    texts = [p + a + tokenizer.eos_token for p, a in zip(prompts, answers, strict=True)]
    prompt_lens = [len(tokenizer(p).input_ids) for p in prompts]
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    rng = random.Random(seed)
    model.train()
    loss_value = float("nan")
    tokenizer.padding_side = "right"
    try:
        for step in range(steps):
            idx = [rng.randrange(len(texts)) for _ in range(batch_size)]
            enc = tokenizer([texts[i] for i in idx], padding=True, return_tensors="pt").to(device)
            labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
            for row, i in enumerate(idx):
                labels[row, : prompt_lens[i]] = -100
            loss = model(input_ids=enc.input_ids, attention_mask=enc.attention_mask, labels=labels).loss
            loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            loss_value = loss.item()
            if (step + 1) % max(1, steps // 5) == 0:
                logger.info(f"  warm-start step {step + 1}/{steps}: loss {loss_value:.4f}")
    finally:
        tokenizer.padding_side = "left"
    return loss_value
