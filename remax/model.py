"""Policy, reference and tokenizer loading (local paths only), the embedded tiny Llama, LoRA, and the supervised
warm-start of the embedded experiment.
"""

from __future__ import annotations

import copy
import importlib.util
import math
import random

import torch

from remax.config import TrainConfig


def set_cpu_threads(config: TrainConfig, device: torch.device) -> None:
    """Apply ``config.cpu_threads`` (see its help) when running on the CPU."""
    if device.type != "cpu":
        return
    threads = config.cpu_threads or (1 if config.model is None else 0)
    if threads:
        torch.set_num_threads(threads)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: 'cuda' was asked for but torch sees no CUDA device")
    return torch.device(name)


def build_tiny_llama(tokenizer, config: TrainConfig) -> torch.nn.Module:
    """A small ``LlamaForCausalLM`` built from a config (random init from ``config.seed``; nothing downloaded)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden = config.tiny_hidden_size
    llama = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=4 * hidden,
        num_hidden_layers=config.tiny_layers, num_attention_heads=config.tiny_heads,
        num_key_value_heads=config.tiny_heads, max_position_embeddings=64, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        return LlamaForCausalLM(llama)


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    return ensure_pad_token(AutoTokenizer.from_pretrained(path, local_files_only=True))


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


def load_causal_lm(path: str, *, name: str = "model", attn_implementation: str = "sdpa") -> torch.nn.Module:
    """An HF causal LM from a local directory in float32 (bf16 compute comes from autocast)."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True,
                                                     attn_implementation=attn_implementation)
    except (OSError, ValueError, ImportError) as err:
        raise ValueError(f"{name}: cannot load a causal LM from {path!r}: {err}") from err
    # fp32 master weights: optimizer updates stay exact; bf16 speed comes from autocast on CUDA.
    return model.float()


def apply_lora(model: torch.nn.Module, config: TrainConfig) -> torch.nn.Module:
    """Wrap ``model`` with LoRA adapters (peft) when ``config.lora_r > 0``; only the adapters train."""
    if config.lora_r == 0:
        return model
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ValueError("lora_r: LoRA needs peft (`pip install peft`), which is not installed") from None
    targets = [t.strip() for t in config.lora_target_modules.split(",") if t.strip()]
    lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=targets, task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A no-grad deep copy in eval mode: the KL reference when none is given (the policy as RL starts)."""
    ref = copy.deepcopy(model)
    ref.requires_grad_(False)
    return ref.eval()


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    if not hasattr(model, "gradient_checkpointing_enable"):
        raise ValueError("gradient_checkpointing: the policy has no gradient_checkpointing_enable() (not an HF model)")
    # Non-reentrant checkpointing works with frozen inputs (LoRA) and FSDP2.
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


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
    log=print,
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
            if log is not None and (step + 1) % max(1, steps // 5) == 0:
                log(f"  warm-start step {step + 1}/{steps}: loss {loss_value:.4f}")
    finally:
        tokenizer.padding_side = "left"
    return loss_value
