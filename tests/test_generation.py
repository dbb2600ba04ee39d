"""generate_pairs: the greedy half equals Hugging Face generate, the sampled half is seeded and self-consistent.

Tiny fp32 models on the CPU (sample_and_greedy runs through the Triton interpreter there). Each sampling step costs
~0.1 s of interpreter time, so responses are short (<= 8 tokens) and the number of calls is kept small.
"""

from __future__ import annotations

import pytest
import torch

from remax_kernels import PairedRollout, generate_pairs, generate_samples
from remax_kernels.hf import causal_lm_logprobs
from tests.helpers import assert_rel_close
from tests.helpers.tiny_models import FAMILIES, PAD_TOKEN_ID, VOCAB, left_padded_prompts, tiny_causal_lm

MAX_NEW = 8
PROMPT_LENGTHS = [5, 7, 3]  # Mistral's sliding window is 8: prompt + response runs past it


def _hf_greedy(model, input_ids, attention_mask, *, eos_token_id, max_new_tokens=MAX_NEW) -> torch.Tensor:
    return model.generate(
        input_ids, attention_mask=attention_mask, do_sample=False, max_new_tokens=max_new_tokens,
        eos_token_id=eos_token_id, pad_token_id=PAD_TOKEN_ID,
    )


def _eos_hit_by_row0(model, input_ids, attention_mask) -> int:
    """An EOS id that ends greedy row 0 at step 2 (its third token), so EOS handling is always exercised."""
    free_run = _hf_greedy(model, input_ids, attention_mask, eos_token_id=[VOCAB + 1])
    return int(free_run[0, input_ids.shape[1] + 2])


def _check_rollout_invariants(out: PairedRollout, input_ids, attention_mask, eos_ids: list[int], max_new: int):
    batch, prompt_length = input_ids.shape
    steps = out.sampled_response_mask.shape[1]
    assert out.prompt_length == prompt_length and 1 <= steps <= max_new
    eos = torch.tensor(eos_ids)
    for half in ("sampled", "greedy"):
        ids, full_mask = getattr(out, f"{half}_ids"), getattr(out, f"{half}_attention_mask")
        response_mask, logp = getattr(out, f"{half}_response_mask"), getattr(out, f"{half}_logprobs")
        lengths = getattr(out, f"{half}_lengths")
        assert ids.shape == full_mask.shape == (batch, prompt_length + steps) and ids.dtype == torch.int64
        assert response_mask.shape == logp.shape == (batch, steps) and logp.dtype == torch.float32
        assert torch.equal(ids[:, :prompt_length], input_ids), f"{half}: the prompt must be returned unchanged"
        assert torch.equal(full_mask, torch.cat([attention_mask, response_mask], dim=1)), half
        assert torch.equal(getattr(out, f"{half}_response_ids"), ids[:, prompt_length:])
        assert torch.equal(lengths, response_mask.sum(-1)), half
        assert bool((response_mask[:, 1:] <= response_mask[:, :-1]).all()), f"{half}: response mask not a prefix"
        assert bool((lengths >= 1).all())
        response = ids[:, prompt_length:]
        for row in range(batch):
            n = int(lengths[row])
            assert not bool(torch.isin(response[row, : n - 1], eos).any()), f"{half} row {row}: EOS before the end"
            if n < steps:
                assert int(response[row, n - 1]) in eos_ids, f"{half} row {row}: stopped without EOS"
                assert bool((response[row, n:] == PAD_TOKEN_ID).all()), f"{half} row {row}: no pad after EOS"
        assert bool(torch.isfinite(logp).all()) and bool((logp <= 0).all()), half
        assert bool((logp[response_mask == 0] == 0).all()), f"{half}: log-probs past the end must be 0"
    if steps < max_new:  # the loop stopped early, so every row of both halves must have ended with EOS
        for half in ("sampled", "greedy"):
            ids, lengths = getattr(out, f"{half}_ids"), getattr(out, f"{half}_lengths")
            last = ids.gather(1, (prompt_length + lengths - 1)[:, None]).squeeze(1)
            assert bool(torch.isin(last, eos).all()), f"{half}: stopped early with an unfinished row"


@pytest.mark.parametrize("cache_implementation", ["dynamic", "static"])
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_half_equals_hf_generate(family, cache_implementation):
    model = tiny_causal_lm(family, seed=FAMILIES.index(family))
    input_ids, attention_mask = left_padded_prompts(PROMPT_LENGTHS, seed=1)
    eos = _eos_hit_by_row0(model, input_ids, attention_mask)
    expected = _hf_greedy(model, input_ids, attention_mask, eos_token_id=eos)

    out = generate_pairs(
        model, input_ids, attention_mask, max_new_tokens=MAX_NEW, temperature=0.9, eos_token_id=eos,
        pad_token_id=PAD_TOKEN_ID, seed=11, cache_implementation=cache_implementation,
    )
    width = expected.shape[1]
    assert torch.equal(out.greedy_ids[:, :width], expected)
    assert bool((out.greedy_ids[:, width:] == PAD_TOKEN_ID).all())
    assert int(out.greedy_lengths[0]) <= 3, "row 0 must stop at its EOS"
    _check_rollout_invariants(out, input_ids, attention_mask, [eos], MAX_NEW)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_logprobs_equal_a_recomputation_at_the_temperature(family):
    temperature = 0.8
    model = tiny_causal_lm(family, seed=5)
    input_ids, attention_mask = left_padded_prompts(PROMPT_LENGTHS, seed=2)
    # EOS = the tokens greedy decoding emits third: the model favours them, so sampled rows hit them too.
    free_run = _hf_greedy(model, input_ids, attention_mask, eos_token_id=[VOCAB + 1])
    eos_ids = sorted(set(free_run[:, input_ids.shape[1] + 2].tolist()))
    out = generate_pairs(
        model, input_ids, attention_mask, max_new_tokens=MAX_NEW, temperature=temperature, eos_token_id=eos_ids,
        pad_token_id=PAD_TOKEN_ID, seed=3,
    )
    _check_rollout_invariants(out, input_ids, attention_mask, eos_ids, MAX_NEW)
    assert bool((out.sampled_lengths < out.sampled_response_mask.shape[1]).any()), "no sampled row hit EOS"
    for half in ("sampled", "greedy"):
        with torch.no_grad():
            recomputed = causal_lm_logprobs(
                model, getattr(out, f"{half}_ids"), getattr(out, f"{half}_attention_mask"),
                response_mask=getattr(out, f"{half}_response_mask"), temperature=temperature,
            )
        assert_rel_close(getattr(out, f"{half}_logprobs"), recomputed, torch.float32, name=f"{half}_logprobs")


def test_sampled_half_is_reproducible_and_depends_on_the_seed():
    model = tiny_causal_lm("qwen2", seed=2)
    input_ids, attention_mask = left_padded_prompts(PROMPT_LENGTHS, seed=3)
    kwargs = dict(max_new_tokens=6, temperature=1.5, eos_token_id=[VOCAB + 1], pad_token_id=PAD_TOKEN_ID)
    first = generate_pairs(model, input_ids, attention_mask, seed=7, **kwargs)
    again = generate_pairs(model, input_ids, attention_mask, seed=7, **kwargs)
    other = generate_pairs(model, input_ids, attention_mask, seed=8, **kwargs)
    assert torch.equal(first.sampled_ids, again.sampled_ids)
    assert torch.equal(first.sampled_logprobs, again.sampled_logprobs)
    assert not torch.equal(first.sampled_ids, other.sampled_ids)
    assert torch.equal(first.greedy_ids, other.greedy_ids), "the greedy half must not depend on the seed"
    assert not torch.equal(first.sampled_ids, first.greedy_ids), "temperature 1.5 sampling looked greedy"


def test_per_prompt_seeds_make_a_row_independent_of_its_batch():
    model = tiny_causal_lm("llama", seed=3)
    input_ids, attention_mask = left_padded_prompts([6, 6], seed=4)
    kwargs = dict(max_new_tokens=5, temperature=1.3, eos_token_id=[VOCAB + 1], pad_token_id=PAD_TOKEN_ID)
    both = generate_pairs(model, input_ids, attention_mask, seed=torch.tensor([21, 22]), **kwargs)
    for row, seed in enumerate((21, 22)):
        alone = generate_pairs(
            model, input_ids[row:row + 1], attention_mask[row:row + 1], seed=torch.tensor([seed]), **kwargs
        )
        assert torch.equal(alone.sampled_ids[0], both.sampled_ids[row])


def test_top_k_samples_stay_in_the_top_k_and_logprobs_are_renormalized():
    temperature, top_k = 1.5, 3
    model = tiny_causal_lm("mistral", seed=4)
    input_ids, attention_mask = left_padded_prompts(PROMPT_LENGTHS, seed=5)
    out = generate_pairs(
        model, input_ids, attention_mask, max_new_tokens=6, temperature=temperature, top_k=top_k,
        eos_token_id=[VOCAB + 1], pad_token_id=PAD_TOKEN_ID, seed=5,
    )
    prompt_length = out.prompt_length
    mask = out.sampled_attention_mask
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    with torch.no_grad():
        logits = model(input_ids=out.sampled_ids, attention_mask=mask, position_ids=positions).logits
    logits = logits[:, prompt_length - 1:-1].double() / temperature  # the step-t logits predict response token t
    tokens = out.sampled_response_ids
    kth = logits.topk(top_k, dim=-1).values[..., -1:]
    assert bool((logits.gather(-1, tokens[..., None]) >= kth).all()), "a token outside the top-k was sampled"
    kept = logits.masked_fill(logits < kth, float("-inf"))
    expected = torch.log_softmax(kept, dim=-1).gather(-1, tokens[..., None]).squeeze(-1)
    assert_rel_close(out.sampled_logprobs, expected, torch.float32, name="top-k log-probs")


def test_every_row_stopping_ends_the_loop():
    model = tiny_causal_lm("gpt2", seed=6)
    input_ids, attention_mask = left_padded_prompts(PROMPT_LENGTHS, seed=6)
    out = generate_pairs(model, input_ids, attention_mask, max_new_tokens=MAX_NEW, eos_token_id=list(range(VOCAB)))
    assert out.sampled_ids.shape == (3, input_ids.shape[1] + 1)
    assert out.sampled_lengths.tolist() == out.greedy_lengths.tolist() == [1, 1, 1]
    _check_rollout_invariants(out, input_ids, attention_mask, list(range(VOCAB)), MAX_NEW)


def test_defaults_come_from_the_generation_config_and_training_mode_is_restored():
    model = tiny_causal_lm("gpt2", seed=7)  # GPT-2 has dropout: generating in train mode would be random
    input_ids, attention_mask = left_padded_prompts(PROMPT_LENGTHS, seed=7)
    eos = _eos_hit_by_row0(model, input_ids, attention_mask)
    explicit = generate_pairs(
        model, input_ids, attention_mask, max_new_tokens=5, eos_token_id=eos, pad_token_id=PAD_TOKEN_ID, seed=1
    )
    model.generation_config.eos_token_id = [eos]
    model.generation_config.pad_token_id = PAD_TOKEN_ID
    model.train()
    with torch.inference_mode():
        implicit = generate_pairs(model, input_ids, attention_mask, max_new_tokens=5, seed=1)
    assert model.training, "generate_pairs must restore model.training"
    assert int(implicit.greedy_lengths[0]) <= 3
    for name in ("sampled_ids", "greedy_ids", "sampled_logprobs", "sampled_response_mask"):
        assert torch.equal(getattr(implicit, name), getattr(explicit, name)), name


def test_bad_inputs_raise_naming_the_argument():
    model = tiny_causal_lm("llama")
    ids, mask = left_padded_prompts([4, 2], seed=0)
    run = lambda **kw: generate_pairs(model, kw.pop("ids", ids), kw.pop("mask", mask), **{"max_new_tokens": 2, **kw})
    with pytest.raises(ValueError, match="left-padded"):
        run(mask=mask.flip(-1))
    with pytest.raises(ValueError, match="attention_mask"):
        run(mask=torch.zeros_like(mask))
    with pytest.raises(ValueError, match="attention_mask"):
        run(mask=mask[:, 1:])
    with pytest.raises(TypeError, match="input_ids"):
        run(ids=ids.float())
    vocab = model.get_input_embeddings().num_embeddings
    with pytest.raises(ValueError, match=f"input_ids.*vocab size {vocab}"):
        run(ids=ids.masked_fill(mask.bool(), vocab))
    with pytest.raises(ValueError, match="input_ids.*negative"):
        generate_samples(model, ids.masked_fill(mask.bool(), -2), mask, max_new_tokens=2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        run(max_new_tokens=0)
    with pytest.raises(ValueError, match="temperature"):
        run(temperature=0.0)
    with pytest.raises(ValueError, match="top_p"):
        run(top_p=0.0)
    with pytest.raises(ValueError, match="top_k"):
        run(top_k=-1)
    with pytest.raises(ValueError, match="min_p"):
        run(min_p=1.0)
    with pytest.raises(TypeError, match="eos_token_id"):
        run(eos_token_id="</s>")
    with pytest.raises(ValueError, match="seed"):
        run(seed=torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="cache_implementation"):
        run(cache_implementation="paged")
    with pytest.raises(TypeError, match="model"):
        generate_pairs(torch.nn.Linear(2, 2), ids, mask, max_new_tokens=2)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="use_cuda_graph"):
            run(use_cuda_graph=True)


@pytest.mark.cuda
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_cuda_graph_step_matches_the_eager_step(family):
    model = tiny_causal_lm(family, seed=8).cuda()
    input_ids, attention_mask = (t.cuda() for t in left_padded_prompts(PROMPT_LENGTHS, seed=8))
    eos = _eos_hit_by_row0(model, input_ids, attention_mask)
    expected = _hf_greedy(model, input_ids, attention_mask, eos_token_id=eos)
    kwargs = dict(max_new_tokens=MAX_NEW, temperature=0.9, eos_token_id=eos, pad_token_id=PAD_TOKEN_ID, seed=2)
    eager = generate_pairs(model, input_ids, attention_mask, cache_implementation="static", **kwargs)
    for _ in range(2):  # the second call replays the captured graph on the reused static cache
        graphed = generate_pairs(model, input_ids, attention_mask, use_cuda_graph=True, **kwargs)
        assert torch.equal(graphed.greedy_ids[:, : expected.shape[1]], expected)
        assert torch.equal(graphed.greedy_ids, eager.greedy_ids)
        assert torch.equal(graphed.sampled_ids, eager.sampled_ids)
        assert_rel_close(graphed.sampled_logprobs, eager.sampled_logprobs, torch.float32, name="sampled_logprobs")


def test_a_peft_wrapped_policy_decodes_like_the_model_it_wraps():
    # peft's forward takes **kwargs: positions (left padding) and the cache keyword must still reach the model.
    # GPT-2 has absolute positions, so positions not passed would change its outputs (RoPE models would not show it).
    peft = pytest.importorskip("peft")
    model = tiny_causal_lm("gpt2", seed=3)
    input_ids, attention_mask = left_padded_prompts(PROMPT_LENGTHS, seed=4)
    kwargs = dict(max_new_tokens=MAX_NEW, temperature=0.9, eos_token_id=None, pad_token_id=PAD_TOKEN_ID, seed=5)
    expected = generate_pairs(model, input_ids, attention_mask, **kwargs)
    # LoRA's B matrices start at zero: the wrapped model computes the same function.
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True))
    out = generate_pairs(wrapped, input_ids, attention_mask, **kwargs)
    assert torch.equal(out.greedy_ids, expected.greedy_ids)
    assert torch.equal(out.sampled_ids, expected.sampled_ids)
    assert_rel_close(out.sampled_logprobs, expected.sampled_logprobs, torch.float32, name="sampled_logprobs")


def test_whole_step_compiles_without_graph_breaks_and_equals_the_eager_step():
    """The decode step (forward on the static cache, sampling with the step as a device tensor, EOS bookkeeping)
    compiles with fullgraph=True and gives the eager step's rollout token for token (prompts bucketed alike)."""
    import functools

    from remax_kernels import generation

    model = tiny_causal_lm("llama")
    input_ids, attention_mask = left_padded_prompts(PROMPT_LENGTHS, seed=3)
    common = dict(max_new_tokens=6, temperature=0.9, top_k=0, top_p=0.9, min_p=0.0, eos_ids=[VOCAB + 1],
                  pad=PAD_TOKEN_ID, seeds=torch.tensor([11, 12, 13]).repeat(2), static=True, check_every=2)
    compiled = functools.partial(torch.compile, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        eager = generation._decode(model, input_ids, attention_mask, step_compiler=lambda f: f, **common)
        graph = generation._decode(model, input_ids, attention_mask, step_compiler=compiled, **common)
    (tokens, logprobs, alive), (tokens_c, logprobs_c, alive_c) = eager, graph
    assert tokens.shape == (6, 6)
    assert torch.equal(tokens_c, tokens) and torch.equal(alive_c, alive)
    # The compiled model forward decomposes some ops (norms, attention), so its logits may round differently.
    torch.testing.assert_close(logprobs_c, logprobs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("check_every", [1, 3, 16])
def test_checking_for_the_end_every_k_steps_changes_nothing(check_every):
    """The host looks at `finished` every k steps only; the steps run past the last EOS are cut from the result."""
    model = tiny_causal_lm("qwen2")
    input_ids, attention_mask = left_padded_prompts(PROMPT_LENGTHS, seed=4)
    eos = _eos_hit_by_row0(model, input_ids, attention_mask)
    kwargs = dict(max_new_tokens=MAX_NEW, eos_token_id=[eos, 5, 7, 11, 13, 17], seed=8, temperature=1.5)
    reference = generate_pairs(model, input_ids, attention_mask, check_every=1, **kwargs)
    out = generate_pairs(model, input_ids, attention_mask, check_every=check_every, **kwargs)
    for name in ("sampled_ids", "greedy_ids", "sampled_logprobs", "greedy_response_mask"):
        assert torch.equal(getattr(out, name), getattr(reference, name)), name
