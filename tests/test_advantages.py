"""remax/reinforce/rloo/grpo advantages vs hand-computed cases and float64 loop references (official ReMax, verl)."""

from __future__ import annotations

import pytest
import torch

from remax_kernels import grpo_advantages, reinforce_advantages, remax_advantages, rloo_advantages
from tests.helpers import assert_rel_close
from tests.helpers.ref_losses import (
    ref_discounted_advantages,
    ref_grpo,
    ref_official_remax_returns,
    ref_rloo,
    ref_verl_remax_advantages,
    ref_whiten,
)

F32 = torch.float32


def right_padded_mask(lengths, seq_len):
    """Response masks as rollouts produce them: ones then padding; a 0 length is a row with no response."""
    return torch.arange(seq_len)[None, :] < torch.tensor(lengths)[:, None]


def rollout(lengths=(5, 9, 1, 0, 7), seq_len=9, reward_scale=4.0):
    """Random rewards (often beyond clip 5), a ragged right-padded mask, KL with garbage in the padding."""
    batch = len(lengths)
    sampled = torch.randn(batch) * reward_scale
    greedy = torch.randn(batch) * reward_scale
    mask = right_padded_mask(lengths, seq_len)
    token_kl = torch.randn(batch, seq_len) * 0.3
    token_kl = token_kl.masked_fill(~mask, float("nan"))
    return sampled, greedy, mask, token_kl


# ---------------------------------------------------------------- hand-computed cases


def test_per_sequence_is_clipped_reward_difference():
    r, r_greedy = torch.tensor([1.0, -2.0, 7.0]), torch.tensor([0.5, 4.0, 0.0])
    torch.testing.assert_close(remax_advantages(r, r_greedy), torch.tensor([0.5, -6.0, 7.0]), rtol=0, atol=0)
    torch.testing.assert_close(
        remax_advantages(r, r_greedy, clip_reward=5.0), torch.tensor([0.5, -5.0, 5.0]), rtol=0, atol=0
    )


def test_one_step_hand_case_matches_official_formula():
    # d = 2, 3 response tokens, gamma 0.5: reward term d * 0.5**n_t with n_t = 3, 2, 1 tokens from t to the end.
    mask = torch.tensor([[1, 1, 1, 0]])
    kl = torch.tensor([[0.2, -0.1, 0.3, 9.0]])
    out = remax_advantages(
        torch.tensor([3.0]), torch.tensor([1.0]), response_mask=mask, token_kl=kl, kl_coef=0.1, gamma=0.5,
        kl_mode="one-step",
    )
    expected = torch.tensor([[-0.02 + 0.125 * 2, 0.01 + 0.25 * 2, -0.03 + 0.5 * 2, 0.0]])
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


def test_sum_hand_case_matches_verl_return_to_go():
    mask = torch.tensor([[1, 1, 1, 0]])
    kl = torch.tensor([[0.2, -0.1, 0.3, 9.0]])
    out = remax_advantages(
        torch.tensor([3.0]), torch.tensor([1.0]), response_mask=mask, token_kl=kl, kl_coef=0.1, kl_mode="sum"
    )
    # -0.1 * (KL summed from t to the end) + (r - r_greedy)
    expected = torch.tensor([[-0.04 + 2.0, -0.02 + 2.0, -0.03 + 2.0, 0.0]])
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


def test_mask_without_shaping_broadcasts_the_score():
    r, r_greedy = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 4.0])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    out = remax_advantages(r, r_greedy, response_mask=mask)
    torch.testing.assert_close(out, torch.tensor([[0.5, 0.5, 0.0], [-6.0, -6.0, -6.0]]), rtol=0, atol=0)


# ---------------------------------------------------------------- float64 references


def test_official_remax_settings_match_the_official_code():
    sampled, greedy, mask, token_kl = rollout()
    out = remax_advantages(
        sampled, greedy, response_mask=mask, token_kl=token_kl, kl_coef=0.1, gamma=0.99, clip_reward=5.0,
        kl_mode="one-step",
    )
    ref = ref_official_remax_returns(sampled, greedy, mask, token_kl, kl_coef=0.1, gamma=0.99, clip_reward=5.0)
    assert out.dtype == F32 and out.shape == mask.shape
    assert_rel_close(out, ref, F32, name="official ReMax returns")
    assert (out[~mask] == 0).all()


def test_verl_settings_match_verl():
    sampled, greedy, mask, token_kl = rollout()
    out = remax_advantages(sampled, greedy, response_mask=mask, token_kl=token_kl, kl_coef=0.05, kl_mode="sum")
    ref = ref_verl_remax_advantages(sampled, greedy, mask, token_kl, kl_coef=0.05)
    assert_rel_close(out, ref, F32, name="verl ReMax advantages")


@pytest.mark.parametrize("kl_mode", ["sum", "one-step"])
@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_discounted_shaping_matches_recursion(kl_mode, gamma):
    sampled, greedy, mask, token_kl = rollout()
    # A response with a hole (e.g. a tool output inside the answer): discounting counts response tokens only.
    mask[1, 3:5] = False
    token_kl[1, 3:5] = float("nan")
    out = remax_advantages(
        sampled, greedy, response_mask=mask, token_kl=token_kl, kl_coef=0.2, gamma=gamma, clip_reward=3.0,
        kl_mode=kl_mode,
    )
    score = (sampled.double() - greedy.double()).clamp(-3.0, 3.0)
    ref = ref_discounted_advantages(score, mask, token_kl, kl_coef=0.2, gamma=gamma, kl_mode=kl_mode)
    assert_rel_close(out, ref, F32, name=f"{kl_mode} gamma={gamma}")
    assert (out[~mask] == 0).all()


def test_gamma_without_kl():
    sampled, greedy, mask, _ = rollout()
    out = remax_advantages(sampled, greedy, response_mask=mask, gamma=0.95)
    ref = ref_discounted_advantages(sampled.double() - greedy.double(), mask, None, kl_coef=0.0, gamma=0.95,
                                    kl_mode="sum")
    assert_rel_close(out, ref, F32, name="discounted score")


def test_whitening_per_sequence_and_per_token():
    sampled, greedy, mask, token_kl = rollout()
    seq = remax_advantages(sampled, greedy, clip_reward=5.0, whiten=True)
    assert_rel_close(seq, ref_whiten((sampled.double() - greedy.double()).clamp(-5, 5)), F32, name="whitened [B]")
    assert abs(float(seq.mean())) < 1e-6 and abs(float(seq.std()) - 1) < 1e-5

    tok = remax_advantages(sampled, greedy, response_mask=mask, token_kl=token_kl, kl_coef=0.1, whiten=True)
    raw = ref_verl_remax_advantages(sampled, greedy, mask, token_kl, kl_coef=0.1)
    assert_rel_close(tok, ref_whiten(raw, mask), F32, name="whitened [B, T]")
    assert abs(float(tok[mask].mean())) < 1e-6 and abs(float(tok[mask].std()) - 1) < 1e-5
    assert (tok[~mask] == 0).all()


def test_reinforce_is_remax_with_a_zero_baseline():
    sampled, _, mask, token_kl = rollout()
    kwargs = dict(response_mask=mask, token_kl=token_kl, kl_coef=0.1, gamma=0.99, clip_reward=5.0, kl_mode="one-step")
    torch.testing.assert_close(
        reinforce_advantages(sampled, **kwargs), remax_advantages(sampled, torch.zeros_like(sampled), **kwargs)
    )


@pytest.mark.parametrize("group_size", [2, 4])
def test_rloo_matches_leave_one_out(group_size):
    rewards = torch.randn(8) * 2
    assert_rel_close(rloo_advantages(rewards, group_size), ref_rloo(rewards, group_size), F32, name="rloo")


@pytest.mark.parametrize("scale", [True, False])
@pytest.mark.parametrize("group_size", [2, 4])
def test_grpo_matches_group_normalization(group_size, scale):
    rewards = torch.randn(8) * 2
    out = grpo_advantages(rewards, group_size, scale=scale)
    assert_rel_close(out, ref_grpo(rewards, group_size, scale=scale), F32, name="grpo")


def test_group_advantages_share_the_token_shaping():
    rewards = torch.randn(4)
    mask = right_padded_mask([3, 0, 2, 4], 4)
    token_kl = torch.randn(4, 4)
    for fn in (rloo_advantages, grpo_advantages):
        out = fn(rewards, 2, response_mask=mask, token_kl=token_kl, kl_coef=0.1, kl_mode="one-step")
        ref = ref_discounted_advantages(fn(rewards, 2).double(), mask, token_kl, kl_coef=0.1, gamma=1.0,
                                        kl_mode="one-step")
        assert_rel_close(out, ref, F32, name=fn.__name__)


def test_outputs_are_detached_and_typed():
    sampled = torch.randn(4, requires_grad=True)
    greedy = torch.randn(4)
    assert not remax_advantages(sampled, greedy).requires_grad
    assert remax_advantages(sampled.detach().bfloat16(), greedy.bfloat16()).dtype == F32
    out64 = remax_advantages(sampled.detach().double(), greedy.double(), response_mask=torch.ones(4, 3), gamma=0.9)
    assert out64.dtype == torch.float64


# ---------------------------------------------------------------- bad input


def test_bad_inputs_name_the_argument():
    r = torch.randn(4)
    mask = torch.ones(4, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="sampled_rewards.*NaN"):
        remax_advantages(torch.tensor([1.0, float("nan")]), torch.zeros(2))
    with pytest.raises(ValueError, match="greedy_rewards.*inf"):
        remax_advantages(torch.zeros(2), torch.tensor([float("inf"), 0.0]))
    with pytest.raises(ValueError, match="greedy_rewards.*3.*4"):
        remax_advantages(r, torch.randn(3))
    with pytest.raises(ValueError, match="sampled_rewards.*1-D"):
        remax_advantages(torch.randn(4, 1), torch.randn(4))
    with pytest.raises(TypeError, match="sampled_rewards"):
        remax_advantages([1.0, 2.0], r)
    with pytest.raises(TypeError, match="rewards"):
        reinforce_advantages(torch.ones(4, dtype=torch.int64))
    with pytest.raises(ValueError, match="response_mask.*shape"):
        remax_advantages(r, r, response_mask=torch.ones(3, 3))
    with pytest.raises(ValueError, match="token_kl.*shape"):
        remax_advantages(r, r, response_mask=mask, token_kl=torch.randn(4, 2), kl_coef=0.1)
    with pytest.raises(ValueError, match="token_kl.*NaN"):
        remax_advantages(r, r, response_mask=mask, token_kl=torch.full((4, 3), float("nan")), kl_coef=0.1)
    with pytest.raises(ValueError, match="token_kl.*required"):
        remax_advantages(r, r, response_mask=mask, kl_coef=0.1)
    with pytest.raises(ValueError, match="response_mask.*required"):
        remax_advantages(r, r, gamma=0.99)
    with pytest.raises(ValueError, match="kl_mode.*one-step"):
        remax_advantages(r, r, response_mask=mask, kl_mode="cumulative")
    with pytest.raises(ValueError, match="gamma"):
        remax_advantages(r, r, response_mask=mask, gamma=1.5)
    with pytest.raises(ValueError, match="kl_coef"):
        remax_advantages(r, r, response_mask=mask, token_kl=torch.randn(4, 3), kl_coef=-1.0)
    with pytest.raises(ValueError, match="clip_reward"):
        remax_advantages(r, r, clip_reward=0.0)
    with pytest.raises(TypeError, match="clip_reward.*str"):
        remax_advantages(r, r, clip_reward="5")
    with pytest.raises(TypeError, match="gamma.*NoneType"):
        remax_advantages(r, r, response_mask=mask, gamma=None)
    with pytest.raises(TypeError, match="eps"):
        grpo_advantages(torch.randn(6), 2, eps="tiny")
    with pytest.raises(ValueError, match="whiten.*2"):
        remax_advantages(torch.randn(1), torch.randn(1), whiten=True)
    with pytest.raises(ValueError, match="group_size.*divide"):
        rloo_advantages(torch.randn(6), 4)
    with pytest.raises(ValueError, match="group_size.*>= 2"):
        grpo_advantages(torch.randn(6), 1)
    with pytest.raises(TypeError, match="group_size"):
        grpo_advantages(torch.randn(6), 2.0)
    with pytest.raises(ValueError, match="rewards.*NaN"):
        grpo_advantages(torch.tensor([1.0, float("nan")]), 2)
