"""policy_loss: values, gradients and metrics vs a float64 loop reference, for every option combination."""

from __future__ import annotations

import pytest
import torch

from remax_kernels import policy_loss
from remax_kernels.losses import KL_ESTIMATORS, LOSS_AGG_MODES
from tests.helpers import assert_rel_close
from tests.helpers.ref_losses import ref_kl, ref_policy_loss

F32 = torch.float32
CLIPS = {
    "reinforce": dict(),
    "ratio": dict(use_old=True),
    "ppo": dict(use_old=True, clip_ratio=0.2),
    "clip-higher+dual": dict(use_old=True, clip_ratio=(0.2, 0.28), clip_ratio_c=3.0),
}


def batch(B=4, T=6, *, per_token_adv=False, lengths=(6, 3, 0, 5), dtype=F32):
    """Random rollout tensors; row 2 has no response tokens; the padding holds garbage, never zeros."""
    logp = (-torch.rand(B, T) * 3).to(dtype)
    old = logp.float() + torch.randn(B, T) * 0.3  # ratios spread enough that both clip bounds are hit
    ref = logp.float() + torch.randn(B, T) * 0.5
    entropy = torch.rand(B, T) * 2
    adv = torch.randn(B, T) if per_token_adv else torch.randn(B)
    mask = torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]
    return logp, adv, mask, old.to(dtype), ref.to(dtype), entropy.to(dtype)


def run_both(logp, adv, mask, old, ref, entropy, *, use_old=False, **opts):
    """(loss, metrics, grad_logp, grad_entropy) ours and (loss, grad_logp, grad_entropy) of the float64 reference."""
    lp = logp.clone().requires_grad_()
    ent = entropy.clone().requires_grad_()
    loss, metrics = policy_loss(lp, adv, mask, old_logprobs=old if use_old else None, ref_logprobs=ref, entropy=ent,
                                **opts)
    loss.backward()
    lp64 = logp.double().requires_grad_()
    ent64 = entropy.double().requires_grad_()
    ref_loss = ref_policy_loss(lp64, adv, mask, old_logprobs=old if use_old else None, ref_logprobs=ref,
                               entropy=ent64, **opts)
    ref_loss.backward()
    return (loss, metrics, lp.grad, ent.grad), (ref_loss, lp64.grad, ent64.grad)


@pytest.mark.parametrize("clip", list(CLIPS))
@pytest.mark.parametrize("kl_estimator", KL_ESTIMATORS)
@pytest.mark.parametrize("loss_agg_mode", LOSS_AGG_MODES)
def test_matches_reference(loss_agg_mode, kl_estimator, clip):
    inputs = batch(per_token_adv=clip == "ppo")
    ours, ref = run_both(*inputs, loss_agg_mode=loss_agg_mode, kl_estimator=kl_estimator, kl_coef=0.1,
                         entropy_coef=0.01, **CLIPS[clip])
    loss, metrics, g_logp, g_ent = ours
    assert loss.dtype == F32 and loss.dim() == 0
    assert_rel_close(loss, ref[0], F32, name="loss")
    assert_rel_close(g_logp, ref[1], F32, name="d loss / d logprobs")
    assert_rel_close(g_ent, ref[2], F32, name="d loss / d entropy")
    mask = inputs[2]
    assert (g_logp[~mask] == 0).all() and (g_ent[~mask] == 0).all()


def test_clipping_is_exercised():
    """The reference comparison above means something only if both clip branches and the dual clip are hit."""
    logp, adv, mask, old, ref, entropy = batch(per_token_adv=True)
    _, metrics = policy_loss(logp, adv, mask, old_logprobs=old, clip_ratio=0.2, clip_ratio_c=1.05)
    assert 0.1 < float(metrics["clip_frac"]) < 0.9
    assert float(metrics["clip_frac_lower"]) > 0


def test_reinforce_gradient_is_minus_advantage_over_token_count():
    """The official ReMax loss sum(-A logp m) / sum(m): its gradient is -A m / sum(m), exactly."""
    logp, adv, mask, *_ = batch()
    lp = logp.clone().requires_grad_()
    loss, _ = policy_loss(lp, adv, mask)
    loss.backward()
    n = mask.sum()
    torch.testing.assert_close(loss, (-(adv[:, None] * logp) * mask).sum() / n)
    torch.testing.assert_close(lp.grad, -adv[:, None].expand_as(logp) * mask / n)


def test_on_policy_ratio_gives_the_reinforce_gradient():
    logp, adv, mask, *_ = batch()
    grads = []
    for opts in (dict(), dict(old_logprobs=logp.detach(), clip_ratio=0.2)):
        lp = logp.clone().requires_grad_()
        policy_loss(lp, adv, mask, **opts)[0].backward()
        grads.append(lp.grad)
    torch.testing.assert_close(grads[0], grads[1])


def test_old_logprobs_is_treated_as_a_constant():
    """Passing the same graph tensor as old_logprobs must not cancel the gradient (ratio's denominator is detached)."""
    logp, adv, mask, *_ = batch()
    lp = logp.clone().requires_grad_()
    policy_loss(lp, adv, mask, old_logprobs=lp, clip_ratio=0.2)[0].backward()
    torch.testing.assert_close(lp.grad, -adv[:, None].expand_as(logp) * mask / mask.sum())


@pytest.mark.parametrize("loss_agg_mode", LOSS_AGG_MODES)
def test_empty_rows_contribute_nothing(loss_agg_mode):
    logp, adv, mask, old, ref, entropy = batch()
    opts = dict(loss_agg_mode=loss_agg_mode, old_logprobs=old, clip_ratio=0.2, ref_logprobs=ref, kl_coef=0.1)
    full, _ = policy_loss(logp, adv, mask, **opts)
    # Changing everything in the empty row changes nothing.
    logp2, adv2, old2 = logp.clone(), adv.clone(), old.clone()
    logp2[2], adv2[2], old2[2] = -50.0, 1e6, 50.0
    again, _ = policy_loss(logp2, adv2, mask, **{**opts, "old_logprobs": old2})
    torch.testing.assert_close(full, again, rtol=0, atol=0)


@pytest.mark.parametrize("loss_agg_mode", LOSS_AGG_MODES)
def test_all_rows_empty_gives_zero_loss_and_finite_grads(loss_agg_mode):
    logp, adv, mask, old, ref, entropy = batch()
    lp = logp.clone().requires_grad_()
    ent = entropy.clone().requires_grad_()
    loss, metrics = policy_loss(lp, adv, torch.zeros_like(mask), old_logprobs=old, clip_ratio=0.2, ref_logprobs=ref,
                                kl_coef=0.1, entropy=ent, entropy_coef=0.01, loss_agg_mode=loss_agg_mode)
    loss.backward()
    assert float(loss.detach()) == 0.0
    assert (lp.grad == 0).all() and (ent.grad == 0).all()
    assert all(torch.isfinite(v) for v in metrics.values())


def test_padding_garbage_never_reaches_loss_or_grads():
    logp, adv, mask, old, ref, entropy = batch(per_token_adv=True)
    dirty = [t.clone() for t in (logp, adv, old, ref, entropy)]
    for t, bad in zip(dirty, (float("-inf"), float("nan"), float("nan"), float("inf"), float("nan")), strict=True):
        t[~mask] = bad
    results = []
    for lp0, a, o, r, e in ((logp, adv, old, ref, entropy), dirty):
        lp, ent = lp0.clone().requires_grad_(), e.clone().requires_grad_()
        loss, metrics = policy_loss(lp, a, mask, old_logprobs=o, clip_ratio=0.2, ref_logprobs=r, kl_coef=0.1,
                                    entropy=ent, entropy_coef=0.01)
        loss.backward()
        results.append((loss, lp.grad, ent.grad, metrics))
    (clean_loss, clean_g, clean_ge, clean_m), (loss, g, ge, m) = results
    torch.testing.assert_close(loss, clean_loss, rtol=0, atol=0)
    torch.testing.assert_close(g, clean_g, rtol=0, atol=0)
    torch.testing.assert_close(ge, clean_ge, rtol=0, atol=0)
    for k in clean_m:
        torch.testing.assert_close(m[k], clean_m[k], rtol=0, atol=0)


@pytest.mark.parametrize("kl_estimator", KL_ESTIMATORS)
def test_extreme_log_ratios_stay_finite(kl_estimator):
    logp, adv, mask, *_ = batch(per_token_adv=True)
    gap = torch.where(torch.rand_like(logp) < 0.5, -60.0, 60.0)
    old, ref = logp + gap, logp - gap
    ours, refs = run_both(logp, adv, mask, old, ref, torch.rand_like(logp), use_old=True, kl_estimator=kl_estimator,
                          kl_coef=0.1, clip_ratio_c=3.0)
    loss, metrics, g, _ = ours
    assert torch.isfinite(loss) and torch.isfinite(g).all()
    assert all(torch.isfinite(v) for v in metrics.values())
    assert_rel_close(loss, refs[0], F32, name="loss")
    assert_rel_close(g, refs[1], F32, name="grad")


def test_loss_agg_norm_is_the_constant_divisor():
    """Dr. GRPO as verl >= 0.8 computes it: sum(L * m) / (B * norm), norm = T by default."""
    logp, adv, mask, *_ = batch()
    default, _ = policy_loss(logp, adv, mask, loss_agg_mode="seq-mean-token-sum-norm")
    normed, _ = policy_loss(logp, adv, mask, loss_agg_mode="seq-mean-token-sum-norm", loss_agg_norm=1000.0)
    total = (-(adv[:, None] * logp) * mask).sum()
    batch_size = logp.shape[0]
    torch.testing.assert_close(default, total / (batch_size * logp.shape[1]))
    torch.testing.assert_close(normed, total / (batch_size * 1000.0))


@pytest.mark.parametrize("loss_agg_mode", LOSS_AGG_MODES)
def test_loss_does_not_grow_with_the_batch(loss_agg_mode):
    """Every mode is a mean over the batch: the same rows twice give the same loss and per-token gradients half as
    large (no batch-size-dependent learning rate)."""
    logp, adv, mask, *_ = batch()
    lp, lp2 = logp.clone().requires_grad_(), torch.cat([logp, logp]).requires_grad_()
    one, _ = policy_loss(lp, adv, mask, loss_agg_mode=loss_agg_mode)
    two, _ = policy_loss(lp2, torch.cat([adv, adv]), torch.cat([mask, mask]), loss_agg_mode=loss_agg_mode)
    torch.testing.assert_close(two, one)
    one.backward()
    two.backward()
    torch.testing.assert_close(lp2.grad[: logp.shape[0]] * 2, lp.grad)


def test_metrics():
    logp, adv, mask, old, ref, entropy = batch()
    loss, m = policy_loss(logp.requires_grad_(), adv, mask, old_logprobs=old, clip_ratio=0.2, clip_ratio_c=3.0,
                          ref_logprobs=ref, kl_estimator="k1", entropy=entropy, loss_agg_mode="seq-mean-token-sum")
    assert set(m) == {"pg_loss", "logprob_mean", "adv_mean", "adv_std", "response_tokens", "kl", "entropy", "ppo_kl",
                      "clip_frac", "clip_frac_lower"}
    assert all(v.dim() == 0 and not v.requires_grad for v in m.values())
    sel = mask
    a = adv[:, None].expand_as(logp)[sel].double()
    torch.testing.assert_close(m["logprob_mean"].double(), logp.detach()[sel].double().mean())
    torch.testing.assert_close(m["kl"].double(), ref_kl(logp.detach(), ref, "k1")[sel].double().mean())
    torch.testing.assert_close(m["entropy"].double(), entropy[sel].double().mean())
    torch.testing.assert_close(m["ppo_kl"].double(), (old - logp.detach())[sel].double().mean())
    torch.testing.assert_close(m["adv_mean"].double(), a.mean())
    torch.testing.assert_close(m["adv_std"].double(), a.std(unbiased=False))
    assert float(m["response_tokens"]) == float(mask.sum())
    # No KL/entropy coefficient: the loss is the policy-gradient part alone.
    torch.testing.assert_close(m["pg_loss"], loss.detach())
    ratio = torch.exp(logp.detach() - old)
    clipped = ((ratio < 0.8) & (adv[:, None] < 0)) | ((ratio > 1.2) & (adv[:, None] > 0))
    torch.testing.assert_close(m["clip_frac"].double(), clipped[sel].double().mean())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_compute_in_fp32(dtype):
    logp, adv, mask, old, ref, entropy = batch(dtype=dtype)
    ours, refs = run_both(logp, adv, mask, old, ref, entropy, use_old=True, clip_ratio=0.2, kl_coef=0.1,
                          entropy_coef=0.01)
    loss, _, g, _ = ours
    assert loss.dtype == F32 and g.dtype == dtype
    # Inputs are the same low-precision values in both; only the gradient's final rounding to dtype differs.
    assert_rel_close(loss, refs[0], F32, name="loss")
    assert_rel_close(g, refs[1], dtype, name="grad")


def test_verl_kl_estimator_names_are_accepted():
    logp, adv, mask, _, ref, _ = batch()
    for alias, name in (("kl", "k1"), ("mse", "k2"), ("low_var_kl", "k3")):
        a, _ = policy_loss(logp, adv, mask, ref_logprobs=ref, kl_coef=0.1, kl_estimator=alias)
        b, _ = policy_loss(logp, adv, mask, ref_logprobs=ref, kl_coef=0.1, kl_estimator=name)
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_bad_inputs_name_the_argument():
    logp, adv, mask, old, ref, entropy = batch()
    with pytest.raises(ValueError, match=r"advantages.*\(3,\).*\(4, 6\)"):
        policy_loss(logp, adv[:3], mask)
    with pytest.raises(ValueError, match=r"response_mask.*\(4, 5\).*\(4, 6\)"):
        policy_loss(logp, adv, mask[:, :5])
    with pytest.raises(ValueError, match=r"old_logprobs.*\(4, 5\)"):
        policy_loss(logp, adv, mask, old_logprobs=old[:, :5])
    with pytest.raises(ValueError, match="logprobs.*2-D"):
        policy_loss(logp[0], adv, mask)
    with pytest.raises(TypeError, match="logprobs"):
        policy_loss(logp.long(), adv, mask)
    with pytest.raises(TypeError, match="response_mask"):
        policy_loss(logp, adv, mask.to(torch.complex64))
    with pytest.raises(ValueError, match="loss_agg_mode.*token-mean.*seq-mean-token-sum-norm"):
        policy_loss(logp, adv, mask, loss_agg_mode="mean")
    with pytest.raises(ValueError, match="kl_estimator.*k1.*k2.*k3"):
        policy_loss(logp, adv, mask, ref_logprobs=ref, kl_coef=0.1, kl_estimator="k4")
    with pytest.raises(ValueError, match="advantages.*NaN"):
        policy_loss(logp, torch.tensor([0.0, float("nan"), 1.0, 1.0]), mask)
    with pytest.raises(ValueError, match="old_logprobs.*required"):
        policy_loss(logp, adv, mask, clip_ratio=0.2)
    with pytest.raises(ValueError, match="ref_logprobs.*required"):
        policy_loss(logp, adv, mask, kl_coef=0.1)
    with pytest.raises(ValueError, match="entropy.*required"):
        policy_loss(logp, adv, mask, entropy_coef=0.1)
    with pytest.raises(ValueError, match="loss_agg_norm"):
        policy_loss(logp, adv, mask, loss_agg_norm=10.0)
    with pytest.raises(ValueError, match="clip_ratio"):
        policy_loss(logp, adv, mask, old_logprobs=old, clip_ratio=1.5)
    with pytest.raises(ValueError, match="clip_ratio_c"):
        policy_loss(logp, adv, mask, old_logprobs=old, clip_ratio_c=0.5)
    with pytest.raises(TypeError, match="clip_ratio.*str"):
        policy_loss(logp, adv, mask, old_logprobs=old, clip_ratio="0.2")
    with pytest.raises(TypeError, match="kl_coef.*NoneType"):
        policy_loss(logp, adv, mask, ref_logprobs=ref, kl_coef=None)
    with pytest.raises(TypeError, match="rollout_is_cap.*tensor"):
        policy_loss(logp, adv, mask, rollout_logprobs=old, rollout_is_cap=torch.tensor(2.0))


@pytest.mark.parametrize("clip", ["reinforce", "ppo"])
def test_truncated_importance_sampling_matches_reference(clip):
    """rollout_is_cap weights each token's policy-gradient term by min(pi / pi_rollout, cap), a constant."""
    logp, adv, mask, old, ref, entropy = batch(per_token_adv=True)
    rollout = logp + torch.randn_like(logp) * 0.5  # ratios on both sides of the cap
    ours, refs = run_both(logp, adv, mask, old, ref, entropy, rollout_logprobs=rollout, rollout_is_cap=1.5,
                          kl_coef=0.1, **CLIPS[clip])
    loss, metrics, g_logp, _ = ours
    assert_rel_close(loss, refs[0], F32, name="loss")
    assert_rel_close(g_logp, refs[1], F32, name="d loss / d logprobs")
    ratio = torch.exp(logp - rollout)[mask]
    torch.testing.assert_close(metrics["rollout_is_clipped"], (ratio > 1.5).float().mean())
    assert 0 < float(metrics["rollout_is_clipped"]) < 1


def test_rollout_mismatch_metrics():
    """Given the rollout's log-probs, the metrics measure |logp - rollout| (mean, max) and the ratio's spread; an
    exact match reads 0 and 1; the loss is unchanged without rollout_is_cap."""
    logp, adv, mask, *_ = batch()
    gap = torch.randn_like(logp) * 0.01
    plain, _ = policy_loss(logp, adv, mask)
    loss, m = policy_loss(logp, adv, mask, rollout_logprobs=logp + gap)
    torch.testing.assert_close(loss, plain, rtol=0, atol=0)
    torch.testing.assert_close(m["rollout_abs_diff"], gap[mask].abs().mean())
    torch.testing.assert_close(m["rollout_abs_diff_max"], gap[mask].abs().max())
    torch.testing.assert_close(m["rollout_is_ratio"], torch.exp(-gap[mask]).mean())
    torch.testing.assert_close(m["rollout_is_ratio_std"], torch.exp(-gap[mask]).std(unbiased=False))
    _, exact = policy_loss(logp, adv, mask, rollout_logprobs=logp.clone())
    assert float(exact["rollout_abs_diff_max"]) == 0.0 and float(exact["rollout_is_ratio"]) == 1.0
    with pytest.raises(ValueError, match="rollout_logprobs.*required"):
        policy_loss(logp, adv, mask, rollout_is_cap=2.0)
    with pytest.raises(ValueError, match="rollout_is_cap"):
        policy_loss(logp, adv, mask, rollout_logprobs=logp, rollout_is_cap=0.0)
