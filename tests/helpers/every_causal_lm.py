"""Every causal LM of the installed transformers, built tiny from its config class (no download).

``build(model_type)`` takes the config class's defaults and shrinks them (hidden 32, 2 layers, vocabulary VOCAB,
hybrid layer patterns cut to one layer of each kind) with a few per-family overrides, gives every logit transform
the config has (remax_kernels.hf.LOGIT_TRANSFORMS) a value whose effect is far above fp32 rounding, and rescales the
output embedding so the logits' standard deviation is ~2: with near-uniform logits a missing transform, a wrong
position or a dropped cache entry would hide below the tolerance.

The tables at the bottom say what each class is expected to do; tests/test_every_causal_lm.py checks it and
README.md's "Model families" section is rendered from them (``readme_section()``).
"""

from __future__ import annotations

import torch
import transformers
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from remax_kernels.hf import LOGIT_TRANSFORMS

VOCAB = 96
# Config fields shrunk wherever a config class has them.
SIZES = {
 "vocab_size": VOCAB, "hidden_size": 32, "n_embd": 32, "d_model": 32, "embed_dim": 32, "dim": 32, "n_embed": 32,
 "emb_dim": 32,
 "intermediate_size": 64, "ffn_dim": 64, "n_inner": 64, "d_ff": 64, "decoder_ffn_dim": 64, "encoder_ffn_dim": 64,
 "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32, "d_inner": 64, "inner_hidden_size": 64,
 "num_hidden_layers": 2, "n_layer": 2, "num_layers": 2, "n_layers": 2, "decoder_layers": 2, "encoder_layers": 2,
 "num_attention_heads": 4, "n_head": 4, "num_heads": 4, "n_heads": 4, "decoder_attention_heads": 4,
 "encoder_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "max_position_embeddings": 64,
 "n_positions": 64, "n_ctx": 64, "num_experts": 4, "n_routed_experts": 4, "num_local_experts": 4,
 "num_experts_per_tok": 2, "moe_num_experts": 4, "kv_lora_rank": 16, "q_lora_rank": 16, "qk_rope_head_dim": 8,
 "qk_nope_head_dim": 8, "v_head_dim": 8, "rotary_dim": 8, "unpadded_vocab_size": VOCAB, "vision_config": None,
}
# Families whose defaults do not shrink by SIZES alone (head counts that must match, hybrid layer schedules...).
_MLA = dict(num_key_value_heads=4)
_MAMBA = dict(mamba_n_heads=4, mamba_d_head=16, mamba_d_state=16, mamba_chunk_size=16)
OVERRIDES = {
    **{mt: _MLA for mt in ("axk1", "axk2", "deepseek_v2", "deepseek_v3", "deepseek_v32", "glm4_moe_lite",
                           "glm_moe_dsa", "minicpm3", "youtu", "longcat_flash", "dots3_note",
                           "bailing_hybrid")},
    "kimi_linear": dict(num_key_value_heads=4, num_experts_per_token=2),
    "axk1": dict(num_key_value_heads=4, n_group=1, topk_group=1),
    "dots1": dict(n_shared_experts=1),
    "ernie4_5_moe": dict(moe_k=2),
    "gemma3n_text": dict(num_kv_shared_layers=0, vocab_size_per_layer_input=VOCAB, hidden_size_per_layer_input=8),
    "gemma4_text": dict(vocab_size_per_layer_input=VOCAB, hidden_size_per_layer_input=8),
    "gemma4_assistant": dict(hidden_size_per_layer_input=0),
    "gpt_neo": dict(attention_types=[[["global", "local"], 1]]),
    "bamba": dict(_MAMBA, attn_layer_indices=[1]),
    "granitemoehybrid": dict(_MAMBA, layer_types=["linear_attention", "full_attention"]),
    "jamba": dict(attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1,
                  mamba_dt_rank=8, use_mamba_kernels=False),
    "zamba": dict(attn_layer_period=2, attn_layer_offset=1, mamba_dt_rank=8, use_mamba_kernels=False,
                  num_hidden_layers=4, layers_block_type=["linear_attention", "hybrid"] * 2),
    "zamba2": dict(mamba_headdim=16, n_mamba_heads=4, mamba_d_state=16, hybrid_layer_ids=[1],
                   use_mamba_kernels=False),
    "kolibri1_1": dict(head_dim=16, hidden_size=64),
    "lfm2_moe": dict(layer_types=["conv", "full_attention"], num_dense_layers=1),
    "mamba2": dict(head_dim=16, n_groups=1, state_size=16, chunk_size=16),
    "xlstm": dict(num_heads=2),
    "zaya": dict(num_experts_per_tok=1),
    "dory": dict(layer_types=["sliding_attention", "full_attention"], num_hidden_layers=2, n_input_layers=1,
                 n_output_layers=1),
    "qwen4_exp": dict(indexer_n_heads=2, indexer_kv_heads=1, indexer_head_dim=8, indexer_budget=16,
                      indexer_compress_ratio=4),
    "xlm": dict(causal=True),  # XLM is a masked LM unless causal
    "blt": dict(encoder_hash_byte_group_vocab=64),
    "roc_bert": dict(shape_vocab_size=32, pronunciation_vocab_size=32),
    "reformer": dict(is_decoder=True, axial_pos_embds_dim=(16, 16), axial_pos_shape=(8, 8), attention_head_size=8,
                     feed_forward_size=64, attn_layers=["local", "lsh"], local_attn_chunk_length=8,
                     lsh_attn_chunk_length=8, num_buckets=4),
}
SUB_OVERRIDES: dict[str, dict] = {}


def shrink(cfg_cls, extra=None):
    """``cfg_cls`` with its defaults shrunk (SIZES, one layer per kind of a hybrid schedule) and ``extra`` on top;
    sub-configs with a hidden size (text, vision, audio towers) shrunk the same way."""
    base = cfg_cls()
    d = base.to_dict()
    kw = {k: v for k, v in SIZES.items() if k in d and k != "vision_config"}
    for k in getattr(cfg_cls, "sub_configs", {}):
        sub_default = getattr(base, k, None)
        if sub_default is not None and hasattr(sub_default, "to_dict") and "hidden_size" in sub_default.to_dict():
            kw[k] = shrink(type(sub_default), SUB_OVERRIDES.get(type(sub_default).__name__))
    for t, v in (("pad_token_id", 0), ("bos_token_id", 1), ("eos_token_id", 2)):
        kw[t] = v
    kw["initializer_range"] = 0.2
    if "is_decoder" in d:  # BERT-style classes are causal LMs only as decoders (else their attention is bidirectional)
        kw["is_decoder"] = True
    for key in ("layer_types", "layers_block_type", "block_types"):
        if isinstance(d.get(key), list) and d[key]:
            kinds = list(dict.fromkeys(d[key]))
            n = max(2, len(kinds))
            kw[key] = (kinds * n)[:n]
            for layers in ("num_hidden_layers", "num_layers", "n_layer"):
                if layers in d:
                    kw[layers] = n
            for other in ("mlp_layer_types",):
                if isinstance(d.get(other), list):
                    kw[other] = d[other][:n]
    kw.update(extra or {})
    return cfg_cls(**kw)


# A value per kind of logit transform whose effect on O(1) logits is far above fp32 rounding.
_VISIBLE = {"multiply": 1.7, "divide": 0.6, "softcap": 1.5, "divide_hidden": 0.5, "vocab_limit": VOCAB - 8}
# Prompt tokens are drawn from [TOKEN_LOW, TOKEN_HIGH): no special token, and below a limited vocabulary.
TOKEN_LOW, TOKEN_HIGH = 4, VOCAB - 8


def classes() -> list[tuple[str, str]]:
    """``(model_type, class name)`` of every causal LM in transformers' auto mapping, one per class."""
    seen, out = set(), []
    for model_type, name in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items():
        if name not in seen:
            seen.add(name)
            out.append((model_type, name))
    return out


def _visible_transforms(config) -> None:
    for sub in {id(config): config, id(config.get_text_config()): config.get_text_config()}.values():
        for entry in LOGIT_TRANSFORMS:
            if getattr(sub, entry.field, None) is not None or (entry.kind == "softcap" and hasattr(sub, entry.field)):
                try:
                    setattr(sub, entry.field, _VISIBLE[entry.kind])
                except AttributeError:  # a read-only property (MiniCPM3's logits_scaling, unused by its head)
                    pass


def build(model_type: str, class_name: str, *, seed: int = 0) -> transformers.PreTrainedModel:
    """The tiny fp32 model of ``class_name`` in eval mode, logits rescaled to a standard deviation ~2."""
    cls = getattr(transformers, class_name)
    config = shrink(cls.config_class, OVERRIDES.get(model_type))
    _visible_transforms(config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(config).float().eval()
        if model_type == "xmod":
            model.set_default_language("en_XX")
        ids = torch.randint(TOKEN_LOW, TOKEN_HIGH, (2, 8))
        head = model.get_output_embeddings()
        if isinstance(head, torch.nn.Linear):
            # The raw head output (before any transform), seen by a hook on the head.
            raw = []
            hook = head.register_forward_hook(lambda module, args, out: raw.append(out.float().std()))
            with torch.no_grad():
                model(input_ids=ids)
                hook.remove()
                std = float(raw[-1])
                head.weight.mul_(2.0 / std)
                if head.bias is not None:
                    head.bias.mul_(2.0 / std)
    return model


# Classes not built tiny, with why.
NOT_BUILT: dict[str, str] = {
    "blt": "BltConfig is per component (patcher, local encoder/decoder, global transformer) with no "
           "num_hidden_layers to shrink",
    "dbrx": "DbrxConfig's attn_config / ffn_config sub-configs do not rebuild from shrunk fields (rope_theta)",
    "cohere_compass_text": "its rotary embedding looks up rope_parameters['full_attention'], which the text "
                           "config's defaults do not have",
    "gemma4_assistant": "a drafting model: its text sub-config rejects the shrunk per-layer inputs",
    "gemma4_unified_assistant": "a drafting model: its forward needs the target model's shared_kv_states",
    "gemma3n": "Gemma3nForConditionalGeneration's vision tower needs timm, which is not installed",
    "kolibri1_1": "its NVFP4 KV rounding and index heads need head_dim >= 16 and more query heads per key head "
                  "than a tiny model has",
    "reformer": "its LSH / local attention needs sequence lengths that are multiples of the chunk length",
    "xlstm": "its mLSTM state and value head sizes disagree at every tiny size tried (matC shape check; with "
             "embedding_dim shrunk too, a factor of 2 in the chunkwise kernel)",
}
# Classes causal_lm_logprobs / causal_lm_policy_loss refuse: (exception type, message pattern).
HF_REFUSED: dict[str, tuple[type, str]] = {
    "prophetnet": (ValueError, "n-gram stream"),
    "musicgen": (ValueError, "one lm-head per audio codebook"),
    "musicgen_melody": (ValueError, "one lm-head per audio codebook"),
    # attn_type="uni" would make it causal, but XLNet's own forward then fails on batches (a broadcast error).
    "xlnet": (ValueError, "attn_type='bi' attends to later tokens"),
}
# Classes whose one-forward logits see later tokens: a full forward is no reference for the rollout's log-probs.
NOT_CAUSAL_IN_ONE_FORWARD: dict[str, str] = {"xlnet": "XLNet's default attn_type='bi'"}
# Classes whose own backward cannot serve as the reference (log-probs are still checked).
NO_OWN_GRADIENTS: dict[str, str] = {
    "rwkv": "RwkvForCausalLM's own forward modifies in place a tensor its backward needs (autograd error)",
    "reformer": "ReformerModelWithLMHead refuses a backward outside train mode, and train mode draws random LSH "
                "hashes",
    "gemma3n_text": "Gemma3nForCausalLM's own gradient of embed_tokens is NaN at this tiny size",
}
# Classes generate_pairs refuses.
ROLLOUT_REFUSED: dict[str, tuple[type, str]] = {
    "rwkv": (ValueError, "mixes the rows of a batch on one-token steps"),
    "cpmant": (ValueError, "cached one-token steps disagree with its own full forward"),
    "prophetnet": (ValueError, "n-gram stream"),
    "xlm": (ValueError, "cached steps disagree with its own full forward"),
    "mpt": (ValueError, "do not reproduce its own model.generate"),
    "musicgen": (ValueError, "one token per audio codebook"),
    "musicgen_melody": (ValueError, "one token per audio codebook"),
}
# Classes whose positions come from the attention mask in generate_pairs (cumsum - 1, as training computes them) but
# not in their own model.generate (which counts pad slots): greedy tokens are compared on prompts without padding.
POSITIONS_FROM_MASK: dict[str, str] = {
    mt: "positions only through **kwargs: model.generate counts left-pad slots, training and generate_pairs do not"
    for mt in ("git", "whisper")
}
# Classes whose numbers differ today (the parametrized test fails for them; they are not marked xfail). Listed here
# for README.md only, with what differs.
OPEN_FAILURES: dict[str, str] = {}

README_BEGIN = "<!-- model-families: generated by `python -m tests.helpers.every_causal_lm`; do not edit -->"
README_END = "<!-- model-families: end -->"


def readme_section() -> str:
    """README.md's "Model families" section, rendered from the tables above and remax_kernels.hf's."""
    from remax_kernels.hf import _REFUSED_HEADS

    names = dict(classes())
    supported = sorted(names[mt] for mt in names
                       if mt not in NOT_BUILT and mt not in HF_REFUSED and mt not in ROLLOUT_REFUSED
                       and mt not in OPEN_FAILURES)
    lines = [README_BEGIN, "", f"Checked by `tests/test_every_causal_lm.py` over every class of transformers "
             f"{transformers.__version__}'s causal-LM auto mapping ({len(names)} classes), each built tiny: "
             "log-probs (left/right padding, temperature, entropy) and loss gradients against the model's own "
             "logits, greedy tokens and log-probs against `model.generate`, sampled and rollout log-probs against "
             "full forwards.", "",
             f"**Equal to Hugging Face's own numbers ({len(supported)}):** " + ", ".join(supported) + ".", "",
             "**Logit transforms read from the config** (`remax_kernels.hf.LOGIT_TRANSFORMS`; any other "
             "logit-looking config field that the model's code names is refused):", "",
             "| config field | applied as | families |", "|---|---|---|"]
    lines += [f"| `{e.field}` | {e.kind} | {e.families} |" for e in LOGIT_TRANSFORMS]
    lines += ["", "**Refused by `causal_lm_logprobs` / `causal_lm_policy_loss`, before any work:**", ""]
    lines += [f"- {names[mt]}: {_REFUSED_HEADS.get(names[mt], HF_REFUSED[mt][1])}" for mt in sorted(HF_REFUSED)]
    lines += ["", "**Refused by `generate_pairs` / `generate_samples`, before any work:**", ""]
    lines += [f"- {names[mt]}: {pattern}" for mt, (_, pattern) in sorted(ROLLOUT_REFUSED.items())]
    if OPEN_FAILURES:
        lines += ["", "**Differ today (open; the test fails for them):**", ""]
        lines += [f"- {names[mt]}: {why}" for mt, why in sorted(OPEN_FAILURES.items())]
    lines += ["", "**Not built tiny (untested here):**", ""]
    lines += [f"- {names[mt]}: {why}" for mt, why in sorted(NOT_BUILT.items())]
    lines += ["", README_END]
    return "\n".join(lines)


if __name__ == "__main__":
    print(readme_section())
