"""generate_pairs / generate_samples on models whose state is not a plain key/value cache.

One tiny model (built from its config, seeded) per kind of state the decode loop has to carry: linear attention
(Qwen3-Next, Qwen3.5, MiniMax's own cache class), conv state (LFM2), hybrid attention + SSM (Jamba, Bamba,
Nemotron-H, GraniteMoeHybrid, Falcon-H1, Zamba2), SSMs (Mamba, FalconMamba, Mamba2), RWKV's ``state``, state kept
on the modules (RecurrentGemma), no cache at all (OpenAI-GPT: a full re-forward each step), XLNet's ``mems``,
a decoder that takes positions only through ``**kwargs`` (WhisperForCausalLM), sliding-window layers with
soft-capping (Gemma-2), and Llama as the baseline. For each, on left-padded prompts:

- the greedy half equals ``model.generate(do_sample=False)`` token for token, EOS and padding included;
- the sampled log-probs equal the log-softmax of a full forward of the sampled sequences at the chosen tokens;
- ``generate_pairs``'s sampled half equals ``generate_samples`` with the same seed;
- the same with ``cache_implementation="static"`` where the model's state is a transformers Cache, and a clear
  ValueError before any decode step where it is not.

Weights: the output embedding is scaled so the logits have a standard deviation of ~2 (a random tiny model's
softmax is nearly flat otherwise, and a state carried wrongly would barely move the greedy tokens).
"""

from __future__ import annotations

import pytest
import torch
import transformers

from remax_kernels import generate_pairs, generate_samples
from tests.helpers import assert_rel_close
from tests.helpers.tiny_models import EOS_TOKEN_ID, PAD_TOKEN_ID, VOCAB, left_padded_prompts

MAX_NEW = 6
PROMPT_LENGTHS = [5, 7, 3]
TEMPERATURE = 0.9
_COMMON = dict(vocab_size=VOCAB, eos_token_id=EOS_TOKEN_ID, pad_token_id=PAD_TOKEN_ID, bos_token_id=1)
_LLAMA_LIKE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=64, **_COMMON)


def _config(family: str):
    if family == "llama":
        return transformers.LlamaConfig(**_LLAMA_LIKE)
    if family == "qwen3_next":  # layers: linear attention (gated delta rule, conv state), then full attention
        return transformers.Qwen3NextConfig(
            **{**_LLAMA_LIKE, "num_hidden_layers": 4}, head_dim=8, linear_num_value_heads=4, linear_num_key_heads=2,
            linear_key_head_dim=8, linear_value_head_dim=8, num_experts=4, num_experts_per_tok=2,
            moe_intermediate_size=16, shared_expert_intermediate_size=16)
    if family == "jamba":  # a Mamba layer, then an attention layer with experts
        return transformers.JambaConfig(
            **_LLAMA_LIKE, attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1,
            num_experts=2, mamba_d_state=4, mamba_expand=2, mamba_dt_rank=4)
    if family == "bamba":  # Mamba2 layer + attention layer
        return transformers.BambaConfig(
            **_LLAMA_LIKE, attn_layer_indices=[1], mamba_n_heads=4, mamba_d_head=16, mamba_d_state=8,
            mamba_chunk_size=8)
    if family == "qwen3_5":  # Qwen3.5: gated delta-rule linear attention, then full attention
        return transformers.Qwen3_5TextConfig(
            **_LLAMA_LIKE, layer_types=["linear_attention", "full_attention"], head_dim=8, linear_num_value_heads=4,
            linear_num_key_heads=2, linear_key_head_dim=8, linear_value_head_dim=8)
    if family == "lfm2":  # a short-conv layer (conv state only), then attention
        return transformers.Lfm2Config(**_LLAMA_LIKE, layer_types=["conv", "full_attention"], block_ff_dim=64,
                                       block_auto_adjust_ff_dim=False)
    if family == "nemotron_h":
        return transformers.NemotronHConfig(
            **_LLAMA_LIKE, layers_block_type=["mamba", "attention"], mamba_num_heads=4, mamba_head_dim=16,
            ssm_state_size=8, n_groups=1, chunk_size=8, head_dim=8)
    if family == "granitemoehybrid":
        return transformers.GraniteMoeHybridConfig(
            **_LLAMA_LIKE, layer_types=["mamba", "attention"], mamba_n_heads=4, mamba_d_head=16, mamba_d_state=8,
            mamba_chunk_size=8, num_local_experts=2, num_experts_per_tok=1)
    if family == "falcon_h1":  # attention and Mamba2 in parallel in every layer
        return transformers.FalconH1Config(**_LLAMA_LIKE, mamba_n_heads=4, mamba_d_head=16, mamba_d_state=8,
                                           mamba_chunk_size=8, mamba_d_ssm=64, head_dim=8)
    if family == "zamba2":
        return transformers.Zamba2Config(
            **{**_LLAMA_LIKE, "num_hidden_layers": 4}, layers_block_type=["mamba", "hybrid", "mamba", "hybrid"],
            hybrid_layer_ids=[1, 3], mamba_headdim=16, mamba_d_state=8, n_mamba_heads=4, chunk_size=8,
            attention_head_dim=8)
    if family == "minimax":  # lightning (linear) attention in its own cache class, then full attention
        return transformers.MiniMaxConfig(**_LLAMA_LIKE, layer_types=["linear_attention", "full_attention"],
                                          num_local_experts=2, num_experts_per_tok=1, head_dim=8)
    if family in ("mamba", "falcon_mamba"):
        config_class = transformers.MambaConfig if family == "mamba" else transformers.FalconMambaConfig
        return config_class(hidden_size=32, num_hidden_layers=2, state_size=4, expand=2, **_COMMON)
    if family == "mamba2":
        return transformers.Mamba2Config(hidden_size=32, num_hidden_layers=2, num_heads=4, head_dim=16, state_size=8,
                                         n_groups=1, chunk_size=8, expand=2, **_COMMON)
    if family == "rwkv":
        return transformers.RwkvConfig(hidden_size=32, num_hidden_layers=2, attention_hidden_size=32,
                                       intermediate_size=64, context_length=64, **_COMMON)
    if family == "recurrent_gemma":  # recurrent, recurrent, local attention; recurrent state on the modules
        return transformers.RecurrentGemmaConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=1,
            lru_width=32, attention_window_size=16, **_COMMON)
    if family == "openai":
        return transformers.OpenAIGPTConfig(n_embd=32, n_layer=2, n_head=4, n_positions=64, **_COMMON)
    if family == "xlnet":
        return transformers.XLNetConfig(d_model=32, n_layer=2, n_head=4, d_inner=64, **_COMMON)
    if family == "whisper":  # equal layer counts: DynamicCache(config) sizes itself from the encoder's
        return transformers.WhisperConfig(
            d_model=32, decoder_layers=2, decoder_attention_heads=4, decoder_ffn_dim=64, encoder_layers=2,
            encoder_attention_heads=4, encoder_ffn_dim=64, max_target_positions=64, decoder_start_token_id=1,
            **_COMMON)
    if family == "gemma2":  # sliding window shorter than prompt + response; final logit soft-capping
        return transformers.Gemma2Config(**_LLAMA_LIKE, head_dim=8, sliding_window=6, final_logit_softcapping=3.0)
    raise ValueError(family)


# family -> whether its state is a transformers Cache the static path can carry
FAMILIES = {
    "llama": True, "qwen3_next": True, "jamba": True, "bamba": True, "mamba2": True, "gemma2": True, "whisper": True,
    "qwen3_5": True, "lfm2": True, "nemotron_h": True, "granitemoehybrid": True,
    # transformers runs these on a static cache only without torch.compile (_can_compile_fullgraph is False)
    "mamba": False, "falcon_mamba": False, "falcon_h1": False, "zamba2": False, "minimax": False,
    "rwkv": False, "recurrent_gemma": False, "openai": False, "xlnet": False,
}
# MiniMax's own generate and full forward differ on left-padded rows (log-probs ~4e-2 apart; equal without
# padding): prompts of one length.
NO_PADDING = {"minimax"}
# XLNet is bidirectional without a permutation mask: a plain full forward is not its generation distribution.
NO_FULL_FORWARD = {"xlnet"}


def _model(family: str, seed: int = 0):
    config = _config(family)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = (transformers.WhisperForCausalLM(config) if family == "whisper"
                 else transformers.AutoModelForCausalLM.from_config(config))
    model = model.float().eval()
    ids, mask = left_padded_prompts(PROMPT_LENGTHS, seed=seed)
    head = model.get_output_embeddings()
    for _ in range(3):  # tied heads scale the input embedding too, so settle the scale in a few rounds
        with torch.no_grad():
            std = model(input_ids=ids, attention_mask=mask).logits.std()
            head.weight.mul_(2.0 / std)
    return model


def _positions(model, mask):
    """The positions rollout and training give the model: ``cumsum(mask) - 1``, where its forward (or the decoder
    behind its ``**kwargs``) takes them."""
    import inspect

    from remax_kernels.hf import position_ids_from_attention_mask

    takes = "position_ids" in inspect.signature(model.forward).parameters or isinstance(
        model, transformers.WhisperForCausalLM)
    return {"position_ids": position_ids_from_attention_mask(mask)} if takes else {}


def _hf_greedy(family, model, ids, mask, eos):
    # WhisperForCausalLM's generate gives no positions (its forward does not name them): pass the training ones.
    extra = _positions(model, mask) if family == "whisper" else {}
    with torch.no_grad():
        # A forward without a cache gives RecurrentGemma fresh (zero) state on its modules, which its generate would
        # otherwise take over from the last call; the rollouts start from zeros too.
        model(input_ids=ids, attention_mask=mask, use_cache=True)
        return model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=MAX_NEW, eos_token_id=eos,
                              pad_token_id=PAD_TOKEN_ID, **extra)


def _full_forward_logprobs(model, out, temperature=TEMPERATURE):
    """log-softmax(logits / T) of one forward over the sampled prompt + response, at the sampled tokens."""
    mask = out.sampled_attention_mask
    with torch.no_grad():
        logits = model(input_ids=out.sampled_ids, attention_mask=mask, **_positions(model, mask)).logits
    logits = logits[:, out.prompt_length - 1:-1].double() / temperature
    logp = torch.log_softmax(logits, -1).gather(-1, out.sampled_response_ids[..., None]).squeeze(-1)
    return logp.float() * out.sampled_response_mask


@pytest.mark.parametrize("cache_implementation", ["dynamic", "static"])
@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "rwkv"])
def test_rollouts_equal_hf_generate_and_a_full_forward(family, cache_implementation):
    model = _model(family, seed=list(FAMILIES).index(family))
    ids, mask = left_padded_prompts([6, 6, 6] if family in NO_PADDING else PROMPT_LENGTHS, seed=1)
    kwargs = dict(max_new_tokens=MAX_NEW, temperature=TEMPERATURE, pad_token_id=PAD_TOKEN_ID, seed=5,
                  cache_implementation=cache_implementation)
    if cache_implementation == "static" and not FAMILIES[family]:
        with pytest.raises(ValueError, match="cache_implementation: 'static'.*'dynamic'"):
            generate_pairs(model, ids, mask, eos_token_id=[VOCAB + 1], **kwargs)
        return
    # EOS = greedy row 0's third token, so the EOS and padding bookkeeping is exercised.
    free_run = _hf_greedy(family, model, ids, mask, [VOCAB + 1])
    eos = int(free_run[0, ids.shape[1] + 2])
    expected = _hf_greedy(family, model, ids, mask, eos)

    pairs = generate_pairs(model, ids, mask, eos_token_id=eos, **kwargs)
    width = expected.shape[1]
    assert torch.equal(pairs.greedy_ids[:, :width], expected), f"{family}: greedy half != model.generate"
    assert bool((pairs.greedy_ids[:, width:] == PAD_TOKEN_ID).all())
    assert int(pairs.greedy_lengths[0]) <= 3, "row 0 must stop at its EOS"

    samples = generate_samples(model, ids, mask, eos_token_id=eos, **kwargs)
    steps = samples.sampled_ids.shape[1]
    assert torch.equal(samples.sampled_ids, pairs.sampled_ids[:, :steps]), f"{family}: pairs != samples"
    assert_rel_close(samples.sampled_logprobs, pairs.sampled_logprobs[:, : steps - ids.shape[1]], torch.float32,
                     name=f"{family} sampled log-probs, pairs vs samples")
    if family not in NO_FULL_FORWARD:
        assert_rel_close(pairs.sampled_logprobs, _full_forward_logprobs(model, pairs), torch.float32,
                         name=f"{family} sampled log-probs vs a full forward")


def test_module_state_is_not_shared_between_the_halves():
    """RecurrentGemma keeps its recurrent state on its modules: the two halves must not decode from one copy. With
    the greedy half right (above), the sampled half must equal its own rollout alone, prompt by prompt."""
    model = _model("recurrent_gemma", seed=3)
    ids, mask = left_padded_prompts(PROMPT_LENGTHS, seed=2)
    kwargs = dict(max_new_tokens=4, temperature=1.3, eos_token_id=[VOCAB + 1], pad_token_id=PAD_TOKEN_ID,
                  seed=torch.tensor([4, 5, 6]))
    pairs = generate_pairs(model, ids, mask, **kwargs)
    alone = generate_samples(model, ids, mask, **kwargs)
    assert torch.equal(pairs.sampled_ids, alone.sampled_ids)
    assert_rel_close(pairs.sampled_logprobs, alone.sampled_logprobs, torch.float32, name="sampled log-probs")
    assert_rel_close(pairs.sampled_logprobs, _full_forward_logprobs(model, pairs, 1.3), torch.float32,
                     name="sampled log-probs vs a full forward")


def test_static_sliding_window_holds_prompts_longer_than_the_window():
    """Gemma-2's sliding layers (window 6) get a StaticSlidingWindowLayer filled by the model's own prefill, so a
    prompt longer than the window decodes like ``model.generate``."""
    model = _model("gemma2", seed=4)
    ids, mask = left_padded_prompts([10, 8], seed=3)
    expected = _hf_greedy("gemma2", model, ids, mask, [VOCAB + 1])
    out = generate_pairs(model, ids, mask, max_new_tokens=MAX_NEW, eos_token_id=[VOCAB + 1],
                         pad_token_id=PAD_TOKEN_ID, cache_implementation="static")
    assert torch.equal(out.greedy_ids, expected)


def test_rwkv_state_reaches_the_model_and_a_batch_that_would_mix_rows_is_refused():
    """RWKV's state (``state``, not a Cache) is carried: one prompt decodes exactly like ``model.generate`` and its
    full forward. On one-token steps of a batch transformers' RWKV broadcasts each row's state against every other
    row's (hidden states ``[rows, rows, H]``): a batched rollout is refused before any work, not silently wrong."""
    model = _model("rwkv", seed=2)
    ids, mask = left_padded_prompts([6], seed=1)
    expected = _hf_greedy("rwkv", model, ids, mask, [VOCAB + 1])
    kwargs = dict(max_new_tokens=MAX_NEW, eos_token_id=[VOCAB + 1], pad_token_id=PAD_TOKEN_ID)
    greedy_like = generate_samples(model, ids, mask, temperature=1e-4, **kwargs)  # argmax at a tiny temperature
    assert torch.equal(greedy_like.sampled_ids, expected)
    out = generate_samples(model, ids, mask, temperature=TEMPERATURE, seed=3, **kwargs)
    assert_rel_close(out.sampled_logprobs, _full_forward_logprobs(model, out), torch.float32,
                     name="rwkv sampled log-probs vs a full forward")
    with pytest.raises(ValueError, match="mixes the rows of a batch"):
        generate_pairs(model, ids, mask, temperature=TEMPERATURE, **kwargs)
    with pytest.raises(ValueError, match="mixes the rows of a batch"):
        generate_samples(model, ids.repeat(2, 1), mask.repeat(2, 1), **kwargs)
    with pytest.raises(ValueError, match="cache_implementation: 'static'"):
        generate_samples(model, ids, mask, cache_implementation="static", **kwargs)


def test_graph_path_refills_the_held_static_cache_in_place():
    """``use_cuda_graph`` keeps one StaticCache per model (its tensors are a captured graph's addresses): a second
    rollout of the same shape copies its prefill's state into that cache, linear-attention conv and recurrent states
    included, and decodes exactly as a rollout on a fresh cache. (The step is run eagerly here: no GPU on CI.)"""
    from remax_kernels import generation

    model = _model("qwen3_next", seed=6)
    common = dict(max_new_tokens=4, temperature=0.9, top_k=0, top_p=1.0, min_p=0.0, eos_ids=[VOCAB + 1],
                  pad=PAD_TOKEN_ID, seeds=7, static=True, check_every=2)
    graph_like = dict(step_compiler=lambda step: step, **common)
    first_ids, first_mask = left_padded_prompts(PROMPT_LENGTHS, seed=7)
    ids, mask = left_padded_prompts([4, 6, 2], seed=8)
    with torch.no_grad():
        generation._decode(model, first_ids, first_mask, **graph_like)
        held = generation._GRAPH_CACHES[model][1]
        refilled = generation._decode(model, ids, mask, **graph_like)
        assert generation._GRAPH_CACHES[model][1] is held, "the held cache was replaced, not refilled"
        # The graph path left-pads prompts to PROMPT_BUCKET tokens; the same padding on the plain static path.
        padded = generation._bucketed(ids, mask, PAD_TOKEN_ID)
        fresh = generation._decode(model, *padded, step_compiler=None, **common)
    for got, want in zip(refilled, fresh, strict=True):
        assert torch.equal(got, want)


@pytest.mark.parametrize("family", ["qwen3_5", "jamba", "gemma2"])
def test_whole_step_compiles_on_linear_attention_ssm_and_sliding_caches(family):
    """The compiled decode step (``fullgraph=True``, as ``use_cuda_graph`` compiles it) over a StaticCache holding
    linear-attention, Mamba or sliding-window layers gives the eager step's rollout."""
    import functools

    from remax_kernels import generation

    model = _model(family, seed=1)
    ids, mask = left_padded_prompts(PROMPT_LENGTHS, seed=3)
    common = dict(max_new_tokens=4, temperature=0.9, top_k=0, top_p=0.9, min_p=0.0, eos_ids=[VOCAB + 1],
                  pad=PAD_TOKEN_ID, seeds=torch.tensor([11, 12, 13]).repeat(2), static=True, check_every=2)
    torch._dynamo.reset()
    compiled = functools.partial(torch.compile, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        tokens, logprobs, alive = generation._decode(model, ids, mask, step_compiler=lambda step: step, **common)
        tokens_c, logprobs_c, alive_c = generation._decode(model, ids, mask, step_compiler=compiled, **common)
    assert torch.equal(tokens_c, tokens) and torch.equal(alive_c, alive)
    # The compiled forward decomposes some ops (norms, attention), so its logits may round differently.
    torch.testing.assert_close(logprobs_c, logprobs, rtol=1e-5, atol=1e-5)
