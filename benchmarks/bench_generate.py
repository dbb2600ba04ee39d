"""Rollout benchmark: ``generate_pairs`` against two ``model.generate`` calls (sampled + greedy).

A ~0.5B Qwen2-shaped model (Qwen2-0.5B's config: 24 layers, hidden 896, 14 heads / 2 KV heads, V=151936, tied
embeddings) built from its config with random weights, bf16, SDPA attention; 32 left-padded prompts of 64-128 tokens;
256 new tokens per response, no early stop (no end-of-sequence token), temperature 1, top-p 0.9 (official ReMax).
Reported: time per rollout of the 32 pairs and generated tokens per second (2 * 32 * 256 tokens per rollout), for
the default configuration and for the opt-in decode step compiled whole into a CUDA graph (static cache; CUDA only).
That column decides whether the graph becomes the default on CUDA (``benchmarks/README.md``, "Decisions").
"""

from __future__ import annotations

import dataclasses
import functools

import torch

import remax_kernels as rk
from benchmarks import baselines as bl
from benchmarks import harness as hz

FAMILY = "generate"
FULL = {
    "model": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                  num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=4096,
                  tie_word_embeddings=True, rope_theta=1e6, rms_norm_eps=1e-6),
    "B": 32, "prompt": (64, 128), "new_tokens": 256,
}
SMOKE = {
    "model": dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True),
    "B": 2, "prompt": (3, 5), "new_tokens": 3,
}
SHAPES = {"full": FULL, "smoke": SMOKE}
TOP_P = 0.9
PAD_TOKEN_ID = 0


def case_name(batch: int, new_tokens: int) -> str:
    return f"generate_pairs B={batch} new_tokens={new_tokens}"


def rollout_shape(shapes: dict) -> dict:
    """A rollout case's recorded shape (this family's and the trainer's): batch, prompt lengths, new tokens, model."""
    return {"B": shapes["B"], "prompt_len": list(shapes["prompt"]), "new_tokens": shapes["new_tokens"],
            "model": "Qwen2 from config", **shapes["model"]}


def build_model(config_kwargs: dict, s: hz.Settings):
    """A randomly initialised Qwen2 causal LM on the benchmark device, in the benchmark dtype, eval mode."""
    transformers = bl.optional_import("transformers")
    if isinstance(transformers, str):
        raise hz.FamilySkipped(transformers)
    config = transformers.Qwen2Config(**config_kwargs, pad_token_id=PAD_TOKEN_ID, eos_token_id=None,
                                      bos_token_id=None)
    with torch.device(s.device):
        model = transformers.Qwen2ForCausalLM(config)
    model = model.to(s.dtype).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = PAD_TOKEN_ID
    return model


def left_padded_prompts(batch: int, lengths: tuple[int, int], vocab: int, device: torch.device):
    """Random prompts of random lengths in ``[lengths[0], lengths[1]]``, left-padded: (input_ids, attention_mask)."""
    width = lengths[1]
    n_tokens = torch.randint(lengths[0], lengths[1] + 1, (batch, 1), device=device)
    attention_mask = torch.arange(width, device=device) >= width - n_tokens
    input_ids = torch.randint(1, vocab, (batch, width), device=device).masked_fill(~attention_mask, PAD_TOKEN_ID)
    return input_ids, attention_mask.long()


@dataclasses.dataclass
class Inputs:
    model: torch.nn.Module
    input_ids: torch.Tensor  # [B, P] left-padded
    attention_mask: torch.Tensor  # [B, P]
    new_tokens: int

    def options(self) -> dict:
        return dict(max_new_tokens=self.new_tokens, temperature=1.0, top_p=TOP_P, eos_token_id=None,
                    pad_token_id=PAD_TOKEN_ID, seed=0)


def _hf_twice(s: hz.Settings, x: Inputs):
    @torch.no_grad()
    def hf_twice():
        return bl.hf_generate_twice(x.model, x.input_ids, x.attention_mask, max_new_tokens=x.new_tokens,
                                    temperature=1.0, top_p=TOP_P, pad_token_id=PAD_TOKEN_ID)

    return hf_twice


# The columns of the case, "ours" first (see hz.ProviderFactory). ours_static_cuda_graph is not a baseline but our
# opt-in configuration (static cache + CUDA graphs), timed beside the default so the default can be chosen from
# measurements; its "speedup" entry is its time over the default's.
PROVIDERS: dict[str, hz.ProviderFactory] = {
    "ours": lambda s, x: lambda: rk.generate_pairs(x.model, x.input_ids, x.attention_mask, **x.options()),
    "hf_generate_x2": _hf_twice,
    "ours_static_cuda_graph": lambda s, x: hz.cuda_only(s) or (lambda: rk.generate_pairs(
        x.model, x.input_ids, x.attention_mask, cache_implementation="static", use_cuda_graph=True, **x.options())),
}


def specs(size: str) -> list[hz.CaseSpec]:
    shapes = SHAPES[size]
    return [hz.CaseSpec(
        family=FAMILY, size=size, name=case_name(shapes["B"], shapes["new_tokens"]), op="generate_pairs",
        mode="rollout", shape=rollout_shape(shapes), providers=tuple(PROVIDERS),
        build=functools.partial(_build, shapes=shapes),
    )]


def _build(s: hz.Settings, *, shapes: dict) -> hz.Case:
    model = build_model(shapes["model"], s)
    batch, new_tokens = shapes["B"], shapes["new_tokens"]
    input_ids, attention_mask = left_padded_prompts(batch, shapes["prompt"], shapes["model"]["vocab_size"], s.device)
    x = Inputs(model, input_ids, attention_mask, new_tokens)
    calls = hz.provider_calls(PROVIDERS, s, x)

    def checks():
        rollout = calls["ours"]()
        hf_greedy = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=new_tokens,
                                   min_new_tokens=new_tokens, do_sample=False, pad_token_id=PAD_TOKEN_ID,
                                   eos_token_id=None)
        return {
            "all_rows_full_length": bool((rollout.sampled_lengths == new_tokens).all()
                                         and (rollout.greedy_lengths == new_tokens).all()),
            # bf16 greedy decoding may diverge after a near-tie (2B vs B rows round differently): informative only.
            "greedy_tokens_equal_hf": float((rollout.greedy_ids == hf_greedy).float().mean()),
        }

    generated = 2 * batch * new_tokens
    return hz.Case(
        calls=calls,
        shape={"params": sum(p.numel() for p in model.parameters())},
        inputs_grads_bytes=hz.tensor_bytes(*model.parameters()),
        extra={"checks": hz.check(checks), "top_p": TOP_P, "temperature": 1.0},
        provider_extra=lambda label, entry: {"tokens_per_s": generated / (entry["ms"] / 1e3)},
        # A whole rollout takes seconds: a fixed small number of calls.
        time_kw={} if s.smoke else {"warmup": 1, "reps": 3},
    )


def targets(cases: list[dict], size: str) -> list[dict]:
    shapes = SHAPES[size]
    case = hz.find_case(cases, case_name(shapes["B"], shapes["new_tokens"]))
    hf_ms = hz.baseline_ms(case, "hf_generate_x2")
    graph_ms = hz.baseline_ms(case, "ours_static_cuda_graph")
    return [
        hz.target("generate_pairs (default): speedup over two model.generate calls",
                  hz.ratio(hf_ms, hz.ours_ms(case)), 1.8, higher_is_better=True, unit="x"),
        # Issue 10: the whole decode step as one CUDA graph (forward + sampling + EOS bookkeeping).
        hz.target("generate_pairs (whole-step CUDA graph): speedup over two model.generate calls",
                  hz.ratio(hf_ms, graph_ms), 3.0, higher_is_better=True, unit="x"),
        hz.target("generate_pairs (whole-step CUDA graph): speedup over its own uncompiled default",
                  hz.ratio(hz.ours_ms(case), graph_ms), 1.5, higher_is_better=True, unit="x"),
    ]
