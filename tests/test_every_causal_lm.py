"""Every causal-LM class of the installed transformers: remax_kernels' numbers equal the model's own, or a clear
refusal up front.

For each class of transformers' causal-LM auto mapping, built tiny (tests/helpers/every_causal_lm.py):
- ``causal_lm_logprobs`` on left- and right-padded batches, at a temperature, with the entropy, against
  ``log_softmax(model(...).logits / T)``;
- ``causal_lm_policy_loss``'s gradients of every parameter against the same loss on the model's own log-probs;
- ``generate_pairs``: greedy tokens and greedy log-probs against ``model.generate(do_sample=False)`` (its raw
  logits), sampled log-probs against a full forward of the sampled sequences, rollout log-probs against
  ``causal_lm_logprobs``.
A class in HF_REFUSED / ROLLOUT_REFUSED must raise the listed error (type and message) before any work; any other
exception fails. A class in NOT_BUILT is skipped with its reason.
"""

from __future__ import annotations

import inspect

import pytest
import torch
import transformers

from remax_kernels import generate_pairs, policy_loss
from remax_kernels.hf import _backbone, causal_lm_logprobs, causal_lm_policy_loss
from tests.helpers import assert_rel_close
from tests.helpers.every_causal_lm import (
    HF_REFUSED,
    NO_OWN_GRADIENTS,
    NOT_BUILT,
    NOT_CAUSAL_IN_ONE_FORWARD,
    POSITIONS_FROM_MASK,
    ROLLOUT_REFUSED,
    TOKEN_HIGH,
    TOKEN_LOW,
    VOCAB,
    build,
    classes,
)

TEMPERATURE = 0.7
MAX_NEW = 3
# Both sides run the same fp32 model; the fused op's reduction order differs from log_softmax's.
SCALE = 10.0


def _batch(lengths, *, left: bool, seed: int):
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros((len(lengths), width), dtype=torch.int64)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        span = slice(width - n, width) if left else slice(0, n)
        ids[row, span] = torch.randint(TOKEN_LOW, TOKEN_HIGH, (n,), generator=gen)
        mask[row, span] = 1
    return ids, mask


def _model_logits(model, ids, mask):
    # Positions as generate computes them, passed wherever the model takes them: in its forward's signature, or
    # through **kwargs to a backbone that takes them (Whisper's decoder).
    params = inspect.signature(model.forward).parameters
    through_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()) and (
        "position_ids" in inspect.signature(_backbone(model).forward).parameters)
    kwargs = {}
    if "position_ids" in params or through_kwargs:
        kwargs["position_ids"] = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    return model(input_ids=ids, attention_mask=mask, **kwargs).logits.double()


def _reference_logprobs(model, ids, mask, temperature):
    logp_all = torch.log_softmax(_model_logits(model, ids, mask)[:, :-1] / temperature, dim=-1)
    valid = mask[:, 1:].double()
    logp = logp_all.gather(-1, ids[:, 1:, None]).squeeze(-1) * valid
    entropy = -(logp_all.exp() * logp_all).sum(-1) * valid
    return logp, entropy


def _check_hf(model, *, gradients: bool = True):
    for left in (True, False):
        ids, mask = _batch([7, 4], left=left, seed=1)
        with torch.no_grad():
            ref_logp, ref_entropy = _reference_logprobs(model, ids, mask, TEMPERATURE)
            logp, entropy = causal_lm_logprobs(model, ids, mask, temperature=TEMPERATURE, return_entropy=True)
        side = "left" if left else "right"
        assert_rel_close(logp, ref_logp, torch.float32, name=f"{side}-padded logprobs", scale=SCALE)
        assert_rel_close(entropy, ref_entropy, torch.float32, name=f"{side}-padded entropy", scale=SCALE)

    if not gradients:
        return
    prompt, prompt_mask = _batch([4, 3], left=True, seed=2)
    response_mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    response = torch.randint(TOKEN_LOW, TOKEN_HIGH, (2, 4), generator=torch.Generator().manual_seed(3))
    ids = torch.cat([prompt, response * response_mask], dim=1)
    mask = torch.cat([prompt_mask, response_mask], dim=1)
    advantages = torch.tensor([0.8, -1.1])
    params = [p for p in model.parameters() if p.requires_grad]
    ref_logp, _ = _reference_logprobs(model, ids, mask, TEMPERATURE)
    ref_loss, _ = policy_loss(ref_logp[:, -4:], advantages.double(), response_mask)
    ref_grads = torch.autograd.grad(ref_loss, params, allow_unused=True)
    loss, _ = causal_lm_policy_loss(model, ids, mask, response_mask, advantages, temperature=TEMPERATURE)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    assert_rel_close(loss, ref_loss, torch.float32, name="loss", scale=SCALE)
    for (name, _), got, ref in zip(((n, p) for n, p in model.named_parameters() if p.requires_grad), grads, ref_grads,
                                   strict=True):
        if ref is None:
            assert got is None or not bool(got.any()), f"grad {name}: nonzero where the model's own is None"
            continue
        assert got is not None, f"grad {name}: missing"
        assert_rel_close(got, ref, torch.float32, name=f"grad {name}", scale=SCALE)


def _check_rollout(model, *, recompute: bool = True, full_forward: bool = True, padded: bool = True):
    ids, mask = _batch([5, 3] if padded else [5, 5], left=True, seed=4)
    eos = VOCAB + 1  # never emitted: every row runs MAX_NEW steps, as model.generate does
    out = generate_pairs(model, ids, mask, max_new_tokens=MAX_NEW, temperature=TEMPERATURE, eos_token_id=eos,
                         pad_token_id=0, seed=5)
    # A bare generation config: plain greedy decoding, without the logits processors a family's defaults switch on
    # (BART's forced_eos_token_id, no_repeat_ngram_size...), which generate_pairs does not apply.
    # (generate merges the model's own generation_config into the one passed, so the model's is replaced.)
    model.generation_config = transformers.GenerationConfig(
        do_sample=False, max_new_tokens=MAX_NEW, eos_token_id=eos, pad_token_id=0, output_logits=True,
        return_dict_in_generate=True)
    with torch.no_grad():
        hf = model.generate(ids, attention_mask=mask)
    assert torch.equal(out.greedy_ids, hf.sequences), "greedy tokens differ from model.generate(do_sample=False)"
    hf_logp = torch.stack([
        torch.log_softmax(step.double() / TEMPERATURE, -1).gather(-1, token[:, None]).squeeze(-1)
        for step, token in zip(hf.logits, hf.sequences[:, ids.shape[1]:].T, strict=True)
    ], dim=1)
    assert_rel_close(out.greedy_logprobs, hf_logp, torch.float32, name="greedy logprobs", scale=SCALE)
    if full_forward:
        with torch.no_grad():
            full, _ = _reference_logprobs(model, out.sampled_ids, out.sampled_attention_mask, TEMPERATURE)
        assert_rel_close(out.sampled_logprobs, full[:, -MAX_NEW:], torch.float32,
                         name="sampled logprobs vs forward", scale=SCALE)
    if not recompute:  # causal_lm_logprobs refuses this class
        return
    with torch.no_grad():
        recomputed = causal_lm_logprobs(model, out.sampled_ids, out.sampled_attention_mask,
                                        response_mask=out.sampled_response_mask, temperature=TEMPERATURE)
    assert_rel_close(out.sampled_logprobs, recomputed, torch.float32, name="rollout vs causal_lm_logprobs",
                     scale=SCALE)


def _hf_call(model):
    ids, mask = _batch([5, 3], left=True, seed=1)
    causal_lm_logprobs(model, ids, mask)


def _rollout_call(model):
    ids, mask = _batch([5, 3], left=True, seed=4)
    generate_pairs(model, ids, mask, max_new_tokens=MAX_NEW)


def _expect_refusal(table, model_type, call, model):
    error, pattern = table[model_type]
    with pytest.raises(error, match=pattern):
        call(model)


@pytest.mark.parametrize(("model_type", "class_name"), classes(), ids=[mt for mt, _ in classes()])
def test_numbers_equal_the_models_own_or_a_clear_refusal(model_type, class_name):
    if model_type in NOT_BUILT:
        pytest.skip(f"not built tiny: {NOT_BUILT[model_type]}")
    model = build(model_type, class_name)
    if model_type in HF_REFUSED:
        _expect_refusal(HF_REFUSED, model_type, _hf_call, model)
    else:
        _check_hf(model, gradients=model_type not in NO_OWN_GRADIENTS)
    if model_type in ROLLOUT_REFUSED:
        _expect_refusal(ROLLOUT_REFUSED, model_type, _rollout_call, model)
    else:
        _check_rollout(model, recompute=model_type not in HF_REFUSED,
                       full_forward=model_type not in NOT_CAUSAL_IN_ONE_FORWARD,
                       padded=model_type not in POSITIONS_FROM_MASK)


def test_the_tables_name_only_installed_classes():
    installed = {mt for mt, _ in classes()}
    for table in (NOT_BUILT, HF_REFUSED, ROLLOUT_REFUSED, POSITIONS_FROM_MASK, NO_OWN_GRADIENTS,
                  NOT_CAUSAL_IN_ONE_FORWARD):
        assert set(table) <= installed, f"stale entries: {set(table) - installed}"
    assert len(installed) > 100, "the causal-LM mapping looks empty"


def test_readme_lists_the_families_as_the_tables_say():
    import os

    from tests.helpers.every_causal_lm import OPEN_FAILURES, README_BEGIN, README_END, readme_section

    readme = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
    with open(readme) as fh:
        text = fh.read()
    start, end = text.find(README_BEGIN), text.find(README_END)
    assert 0 <= start < end, "README.md has no generated model-families section"
    assert text[start:end + len(README_END)] == readme_section(), (
        "README.md's model-families section is stale: paste `python -m tests.helpers.every_causal_lm`")
    assert set(OPEN_FAILURES) <= {mt for mt, _ in classes()}
