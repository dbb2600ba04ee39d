"""Tiny Hugging Face causal LMs built from configs (no download), seeded, for the HF-helper and generation tests.

Every model has 2 layers, hidden size 32 and a vocabulary of VOCAB tokens, so one forward pass costs well under a
millisecond and the Triton interpreter can run the lm-head kernels on its outputs quickly. The weights are drawn
with a larger ``initializer_range`` than the families' default (0.02): with the default the logits of a random
model are nearly flat, top-1/top-2 gaps shrink to ~1e-6 and the greedy token becomes a coin toss between
numerically equivalent computations. With 0.2 the gaps are orders of magnitude above fp32 rounding.
"""

from __future__ import annotations

import torch
import transformers

FAMILIES = ("llama", "qwen2", "mistral", "gpt2")
VOCAB = 96
EOS_TOKEN_ID = 3
PAD_TOKEN_ID = 0
_INIT_RANGE = 0.2


def tiny_config(family: str, *, tie_word_embeddings: bool | None = None) -> transformers.PretrainedConfig:
    """The config of a 2-layer, hidden-32 model of ``family`` (one of FAMILIES)."""
    common = dict(vocab_size=VOCAB, eos_token_id=EOS_TOKEN_ID, pad_token_id=PAD_TOKEN_ID, bos_token_id=1)
    if family == "gpt2":
        # GPT-2 always ties its lm-head to the token embedding.
        return transformers.GPT2Config(
            n_embd=32, n_layer=2, n_head=4, n_positions=64, initializer_range=_INIT_RANGE, **common
        )
    llama_like = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=64, initializer_range=_INIT_RANGE, **common,
    )
    if family == "llama":
        return transformers.LlamaConfig(tie_word_embeddings=bool(tie_word_embeddings), **llama_like)
    if family == "qwen2":
        # Qwen2 has biases on q/k/v; small Qwen2 checkpoints tie their embeddings.
        tie = True if tie_word_embeddings is None else tie_word_embeddings
        return transformers.Qwen2Config(tie_word_embeddings=tie, **llama_like)
    if family == "mistral":
        # A sliding window shorter than prompt + response exercises the sliding-window cache and mask.
        return transformers.MistralConfig(tie_word_embeddings=bool(tie_word_embeddings), sliding_window=8, **llama_like)
    raise ValueError(f"family: expected one of {FAMILIES}, got {family!r}")


def tiny_causal_lm(
    family: str, *, seed: int = 0, tie_word_embeddings: bool | None = None, lm_head_bias: bool = False
) -> transformers.PreTrainedModel:
    """A float32 model of ``family`` in eval mode, with weights drawn from ``seed`` (the global RNG is untouched).

    ``lm_head_bias=True`` swaps in an untied lm-head with a random bias (no family here has one; it tests that the
    helpers pass the bias through).
    """
    config = tiny_config(family, tie_word_embeddings=tie_word_embeddings)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
        if lm_head_bias:
            head = torch.nn.Linear(config.hidden_size if family != "gpt2" else config.n_embd, VOCAB, bias=True)
            torch.nn.init.normal_(head.weight, std=_INIT_RANGE)
            torch.nn.init.normal_(head.bias, std=1.0)
            model.config.tie_word_embeddings = False
            model.set_output_embeddings(head)
    return model.float().eval()


def left_padded_prompts(
    lengths: list[int], *, seed: int = 0, low: int = 4, pad_token_id: int = PAD_TOKEN_ID
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` ``[B, max(lengths)]`` int64: random tokens in ``[low, VOCAB)`` (never EOS or
    pad), left-padded with ``pad_token_id`` to the longest prompt."""
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    input_ids = torch.full((len(lengths), width), pad_token_id, dtype=torch.int64)
    attention_mask = torch.zeros((len(lengths), width), dtype=torch.int64)
    for row, n in enumerate(lengths):
        input_ids[row, width - n:] = torch.randint(low, VOCAB, (n,), generator=gen)
        attention_mask[row, width - n:] = 1
    return input_ids, attention_mask
