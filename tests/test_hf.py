"""remax_kernels.hf: log-probs and policy loss of Hugging Face causal LMs through the backbone + fused lm-head.

References run the same model in float64 (a deep copy) through its ordinary ``forward`` and full logits. Every
comparison covers the values and the gradients of ALL parameters.
"""

from __future__ import annotations

import copy

import pytest
import torch
import transformers

from remax_kernels import policy_loss
from remax_kernels.hf import causal_lm_logprobs, causal_lm_policy_loss
from tests.helpers import assert_rel_close
from tests.helpers.tiny_models import VOCAB, left_padded_prompts, tiny_causal_lm

TEMPERATURE = 0.7
_SMALL = dict(
    vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, initializer_range=0.2,
)


def _model(case: str) -> transformers.PreTrainedModel:
    if case == "granite":  # logits / logits_scaling
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return transformers.GraniteForCausalLM(transformers.GraniteConfig(logits_scaling=2.5, **_SMALL)).eval()
    if case == "cohere":  # logits * logit_scale
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return transformers.CohereForCausalLM(transformers.CohereConfig(logit_scale=0.5, **_SMALL)).eval()
    family, _, variant = case.partition("-")
    return tiny_causal_lm(
        family, seed=1, tie_word_embeddings=True if variant == "tied" else None, lm_head_bias=variant == "bias"
    )


def _positions(attention_mask: torch.Tensor) -> torch.Tensor:
    return (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)


def _eager_logprobs(model, input_ids, attention_mask, temperature):
    """float64 (logprobs, entropy) [B, L-1] from the model's own full logits, 0 where the target is padding."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=_positions(attention_mask)).logits
    logp_all = torch.log_softmax(logits[:, :-1].double() / temperature, dim=-1)
    valid = attention_mask[:, 1:].double()
    logp = logp_all.gather(-1, input_ids[:, 1:, None]).squeeze(-1) * valid
    entropy = -(logp_all.exp() * logp_all).sum(-1) * valid
    return logp, entropy


def _grads(model) -> dict[str, torch.Tensor]:
    return {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}


def _assert_same_grads(model, ref_model):
    got, ref = _grads(model), _grads(ref_model)
    assert set(got) == set(ref), f"parameters with a gradient differ: {set(got) ^ set(ref)}"
    for name in ref:
        assert_rel_close(got[name], ref[name], torch.float32, name=f"grad {name}")


CASES = ["llama", "llama-tied", "llama-bias", "qwen2", "mistral", "gpt2", "granite", "cohere"]


@pytest.mark.parametrize("case", CASES)
def test_logprobs_entropy_and_gradients_match_the_float64_model(case):
    model = _model(case)
    ref_model = copy.deepcopy(model).double()
    input_ids, attention_mask = left_padded_prompts([6, 9, 3], seed=2)
    w_logp = torch.randn(3, 8, dtype=torch.float64)
    w_entropy = torch.randn(3, 8, dtype=torch.float64)

    ref_logp, ref_entropy = _eager_logprobs(ref_model, input_ids, attention_mask, TEMPERATURE)
    (ref_logp * w_logp + ref_entropy * w_entropy).sum().backward()
    logp, entropy = causal_lm_logprobs(
        model, input_ids, attention_mask, temperature=TEMPERATURE, return_entropy=True
    )
    (logp.double() * w_logp + entropy.double() * w_entropy).sum().backward()

    assert logp.dtype == entropy.dtype == torch.float32 and logp.shape == (3, 8)
    assert_rel_close(logp, ref_logp, torch.float32, name="logprobs")
    assert_rel_close(entropy, ref_entropy, torch.float32, name="entropy")
    assert bool((logp[attention_mask[:, 1:] == 0] == 0).all()), "padding targets must give log-prob 0"
    _assert_same_grads(model, ref_model)


def test_response_window_and_explicit_positions():
    model = _model("qwen2")
    prompt_ids, prompt_mask = left_padded_prompts([4, 6], seed=3)
    # prompt (left-padded) + response (right-padded), as generate_pairs returns them
    response = torch.randint(4, VOCAB, (2, 5))
    response_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    input_ids = torch.cat([prompt_ids, response.masked_fill(response_mask == 0, 0)], dim=1)
    attention_mask = torch.cat([prompt_mask, response_mask], dim=1)
    with torch.no_grad():
        full = causal_lm_logprobs(model, input_ids, attention_mask, temperature=TEMPERATURE)
        window = causal_lm_logprobs(
            model, input_ids, attention_mask, response_mask=response_mask, temperature=TEMPERATURE
        )
        aligned_mask = torch.cat([torch.zeros(2, 5, dtype=torch.int64), response_mask], dim=1)
        aligned = causal_lm_logprobs(
            model, input_ids, attention_mask, response_mask=aligned_mask, temperature=TEMPERATURE
        )
        ref, _ = _eager_logprobs(copy.deepcopy(model).double(), input_ids, attention_mask, TEMPERATURE)
    assert window.shape == (2, 5) and aligned.shape == (2, 10) and not window.requires_grad
    assert_rel_close(full, ref, torch.float32, name="full")
    assert_rel_close(window, ref[:, -5:] * response_mask, torch.float32, name="window")
    assert_rel_close(aligned, ref * aligned_mask, torch.float32, name="aligned")

    # Explicit positions replace the mask-derived ones: arange gives what model(input_ids) computes by default.
    ids, mask = left_padded_prompts([7, 7], seed=4)
    arange = torch.arange(7).expand(2, 7)
    with torch.no_grad():
        got = causal_lm_logprobs(model, ids, mask, position_ids=arange)
        logits = model(input_ids=ids).logits[:, :-1].double()
    expected = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    assert_rel_close(got, expected, torch.float32, name="explicit positions")


@pytest.mark.parametrize("case", ["llama", "gpt2"])
def test_policy_loss_matches_policy_loss_on_float64_logprobs(case):
    model = _model(case)
    ref_model = copy.deepcopy(model).double()
    prompt_ids, prompt_mask = left_padded_prompts([3, 5, 4], seed=5)
    response_mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0]])
    response = torch.randint(4, VOCAB, (3, 6)).masked_fill(response_mask == 0, 0)
    input_ids = torch.cat([prompt_ids, response], dim=1)
    attention_mask = torch.cat([prompt_mask, response_mask], dim=1)
    advantages = torch.tensor([0.7, -1.2, 0.4])
    old_logprobs = -torch.rand(3, 6) * 3
    ref_logprobs = -torch.rand(3, 6) * 3
    options = dict(old_logprobs=old_logprobs, clip_ratio=0.2, ref_logprobs=ref_logprobs, kl_coef=0.1)

    logp64, _ = _eager_logprobs(ref_model, input_ids, attention_mask, TEMPERATURE)
    ref_loss, ref_metrics = policy_loss(
        logp64[:, -6:], advantages.double(), response_mask,
        **{k: v.double() if isinstance(v, torch.Tensor) else v for k, v in options.items()},
    )
    ref_loss.backward()
    loss, metrics = causal_lm_policy_loss(
        model, input_ids, attention_mask, response_mask, advantages, temperature=TEMPERATURE, **options
    )
    loss.backward()
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert_rel_close(loss, ref_loss, torch.float32, name="loss")
    for name in ("pg_loss", "kl", "clip_frac", "logprob_mean"):
        assert_rel_close(metrics[name], ref_metrics[name], torch.float32, name=name)
    _assert_same_grads(model, ref_model)


def test_softcapping_family_matches_its_own_logits():
    # final_logit_softcapping=1.5 on logits of std ~3: the cap changes every log-prob by far more than fp32 rounding.
    config = transformers.Gemma2Config(head_dim=8, final_logit_softcapping=1.5, **_SMALL)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = transformers.Gemma2ForCausalLM(config).eval()
    ids, mask = left_padded_prompts([6, 6], seed=0)  # unpadded: Gemma-2's float64 eager attention NaNs on padding
    ref_logp, ref_entropy = _eager_logprobs(copy.deepcopy(model).double(), ids, mask, TEMPERATURE)
    logp, entropy = causal_lm_logprobs(model, ids, mask, temperature=TEMPERATURE, return_entropy=True)
    assert_rel_close(logp, ref_logp, torch.float32, name="logprobs")
    assert_rel_close(entropy, ref_entropy, torch.float32, name="entropy")


def test_bad_inputs_raise_naming_the_argument():
    model = _model("llama")
    ids, mask = left_padded_prompts([5, 3], seed=0)
    with pytest.raises(TypeError, match="input_ids"):
        causal_lm_logprobs(model, ids.float(), mask)
    with pytest.raises(ValueError, match="input_ids"):
        causal_lm_logprobs(model, ids[:, :1], mask[:, :1])
    with pytest.raises(ValueError, match="attention_mask"):
        causal_lm_logprobs(model, ids, mask[:, 1:])
    with pytest.raises(TypeError, match="attention_mask"):
        causal_lm_logprobs(model, ids, mask.float())
    with pytest.raises(ValueError, match="response_mask"):
        causal_lm_logprobs(model, ids, mask, response_mask=torch.ones(2, 5))
    with pytest.raises(ValueError, match="position_ids"):
        causal_lm_logprobs(model, ids, mask, position_ids=torch.zeros(2, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="temperature"):
        causal_lm_logprobs(model, ids, mask, temperature=0.0)
    with pytest.raises(TypeError, match="temperature"):
        causal_lm_logprobs(model, ids, mask, temperature="1.0")
    with pytest.raises(ValueError, match=f"input_ids.*vocab size {VOCAB}"):
        causal_lm_logprobs(model, ids.masked_fill(ids == ids.max(), VOCAB + 3), mask)
    with pytest.raises(ValueError, match="input_ids.*negative"):
        causal_lm_policy_loss(model, ids.masked_fill(ids == ids.max(), -1), mask, torch.ones(2, 4), torch.zeros(2))
    with pytest.raises(TypeError, match="model"):
        causal_lm_logprobs(torch.nn.Linear(3, 3), ids, mask)
    with pytest.raises(ValueError, match="model"):
        causal_lm_logprobs(model.get_decoder(), ids, mask)
    with pytest.raises(ValueError, match="response_mask"):
        causal_lm_policy_loss(model, ids, mask, torch.ones(2, 5), torch.zeros(2))


class _AdaptedHead(torch.nn.Linear):
    """Stands for a LoRA-wrapped or quantized lm-head: its output is not ``x @ weight.T + bias``."""

    def forward(self, x):
        return super().forward(x) * 2


def test_an_lm_head_that_is_not_a_plain_linear_is_refused():
    model = _model("llama")
    model.set_output_embeddings(_AdaptedHead(32, VOCAB, bias=False))
    ids, mask = left_padded_prompts([4], seed=0)
    with pytest.raises(ValueError, match="model: .*not a plain torch.nn.Linear"):
        causal_lm_logprobs(model, ids, mask)


def test_position_ids_skip_left_padding_and_reject_non_tensors():
    from remax_kernels.hf import position_ids_from_attention_mask

    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    expected = torch.tensor([[1, 1, 0, 1, 2], [0, 1, 2, 3, 4]])
    assert torch.equal(position_ids_from_attention_mask(mask), expected)
    assert torch.equal(position_ids_from_attention_mask(mask.bool()), expected)
    with pytest.raises(TypeError, match="attention_mask"):
        position_ids_from_attention_mask([[1, 1]])


def _peft_llama(**lora):
    peft = pytest.importorskip("peft")
    model = _model("llama")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        wrapped = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, **lora))
        for name, param in wrapped.named_parameters():
            if "lora_B" in name:  # peft starts B at zero: a random B makes the low-rank term visible
                torch.nn.init.normal_(param, std=0.3)
            if "modules_to_save" in name:
                param.data.add_(torch.randn_like(param) * 0.3)
    return wrapped


@pytest.mark.parametrize("case", ["lora-lm-head", "lora-everywhere", "modules-to-save"])
def test_peft_lm_heads_give_the_wrapped_models_numbers_and_gradients(case):
    lora = {"lora-lm-head": dict(target_modules=["lm_head"]),
            "lora-everywhere": dict(target_modules=["q_proj", "v_proj", "lm_head"]),
            "modules-to-save": dict(target_modules=["q_proj"], modules_to_save=["lm_head"])}[case]
    model = _peft_llama(**lora)
    ids, mask = left_padded_prompts([6, 4], seed=3)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert any("lm_head" in n for n, _ in trainable), "the lm-head's adapter must be trainable"
    ref_logp, ref_entropy = _eager_logprobs(model, ids, mask, TEMPERATURE)
    ref_grads = torch.autograd.grad((ref_logp + ref_entropy).sum(), [p for _, p in trainable])
    logp, entropy = causal_lm_logprobs(model, ids, mask, temperature=TEMPERATURE, return_entropy=True)
    grads = torch.autograd.grad((logp + entropy).sum(), [p for _, p in trainable])
    assert_rel_close(logp, ref_logp, torch.float32, name="logprobs", scale=10)
    assert_rel_close(entropy, ref_entropy, torch.float32, name="entropy", scale=10)
    for (name, _), got, ref in zip(trainable, grads, ref_grads, strict=True):
        assert_rel_close(got, ref, torch.float32, name=f"grad {name}", scale=10)


def test_a_lora_variant_on_the_lm_head_is_refused_naming_it():
    model = _peft_llama(target_modules=["lm_head"], use_dora=True)
    ids, mask = left_padded_prompts([4], seed=0)
    with pytest.raises(ValueError, match="model: its LoRA lm-head uses a LoRA variant"):
        causal_lm_logprobs(model, ids, mask)


def test_an_unknown_logit_transform_named_by_the_models_code_is_refused(monkeypatch):
    import remax_kernels.hf as hf

    model = _model("cohere")
    ids, mask = left_padded_prompts([4], seed=0)
    known = tuple(entry for entry in hf.LOGIT_TRANSFORMS if entry.field != "logit_scale")
    monkeypatch.setattr(hf, "LOGIT_TRANSFORMS", known)
    with pytest.raises(ValueError, match="config.logit_scale=0.5, which looks like a logit transform"):
        causal_lm_logprobs(model, ids, mask)


def test_lora_dropout_on_the_lm_head_is_applied_in_train_mode():
    # lora_dropout=1.0 drops the whole low-rank input in train mode: the log-probs are the base head's; in eval mode
    # dropout is off and the adapter counts.
    model = _peft_llama(target_modules=["lm_head"])
    model.base_model.model.lm_head.lora_dropout["default"] = torch.nn.Dropout(1.0)
    model.eval()
    ids, mask = left_padded_prompts([6, 4], seed=3)
    with torch.no_grad():
        with model.disable_adapter():
            base, _ = _eager_logprobs(model, ids, mask, TEMPERATURE)
        adapted, _ = _eager_logprobs(model, ids, mask, TEMPERATURE)
        eval_logp = causal_lm_logprobs(model, ids, mask, temperature=TEMPERATURE)
        model.train()
        train_logp = causal_lm_logprobs(model, ids, mask, temperature=TEMPERATURE)
    assert_rel_close(eval_logp, adapted, torch.float32, name="eval mode", scale=10)
    assert_rel_close(train_logp, base, torch.float32, name="train mode, everything dropped", scale=10)
    assert not torch.allclose(base, adapted, atol=1e-3), "the adapter must change the log-probs"


def test_a_masked_lm_config_is_refused():
    from tests.helpers.every_causal_lm import build

    model = build("xlm", "XLMWithLMHeadModel")
    model.config.causal = False
    ids, mask = left_padded_prompts([4], seed=0)
    with pytest.raises(ValueError, match="model: XLMWithLMHeadModel with causal=False is a masked LM"):
        causal_lm_logprobs(model, ids, mask)
