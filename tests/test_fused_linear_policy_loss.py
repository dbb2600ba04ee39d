"""fused_linear_policy_loss / ReMaxLoss vs a float64 eager composition: materialized logits, log_softmax, gather,
then the loss formula. Loss, metrics and the gradients for hidden, weight and bias; Triton (interpreter on CPU) and
torch backends; fp32/fp16 here, bf16 on a GPU (the interpreter's bf16 tl.dot is wrong)."""

from __future__ import annotations

import pytest
import torch

import remax_kernels.losses as losses_module
from remax_kernels import ReMaxLoss, fused_linear_policy_loss
from tests.helpers import assert_rel_close
from tests.helpers.ref_logprobs import ref_fused_linear_logprobs
from tests.helpers.ref_losses import ref_policy_loss

CASES = {
    # The paper's loss: REINFORCE, token mean, per-sequence advantages, with a bias.
    "remax": dict(bias=True),
    # PPO-style: ratio, clip-higher + dual clip, k3 KL, entropy bonus, per-token advantages, temperature.
    "ppo-kl-entropy": dict(
        per_token_adv=True, temperature=0.7, use_old=True, clip_ratio=(0.2, 0.28), clip_ratio_c=3.0, kl_coef=0.1,
        kl_estimator="k3", entropy_coef=0.01, loss_agg_mode="seq-mean-token-mean",
    ),
    "k2-sum-norm": dict(bias=True, kl_coef=0.05, kl_estimator="k2", loss_agg_mode="seq-mean-token-sum-norm",
                        loss_agg_norm=16.0),
    # Truncated importance sampling against the rollout's log-probs.
    "tis": dict(per_token_adv=True, use_rollout=True, rollout_is_cap=1.2),
}


def make_inputs(dtype, device, *, B=3, T=5, H=40, V=97, per_token_adv=False, bias=False):
    """Ragged sizes (V, H not multiples of a block), one row without response tokens, garbage targets in the padding."""
    hidden = torch.randn(B, T, H, device=device).to(dtype)
    weight = (torch.randn(V, H, device=device) * H**-0.5).to(dtype)
    b = (torch.randn(V, device=device) * 0.1).to(dtype) if bias else None
    lengths = torch.tensor([T, 2, 0][:B] + [T] * max(B - 3, 0), device=device)
    mask = torch.arange(T, device=device)[None, :] < lengths[:, None]
    targets = torch.randint(0, V, (B, T), device=device).masked_fill(~mask, -1)
    targets[0, 0] = V - 1  # the last vocabulary entry, at the ragged edge of the last block
    adv = torch.randn(B, T, device=device) if per_token_adv else torch.randn(B, device=device)
    return hidden, weight, b, targets, mask, adv


def reference(hidden, weight, bias, targets, mask, adv, *, temperature=1.0, old=None, ref=None, **opts):
    """float64: (loss, logprobs, entropy) with grads flowing to the float64 leaves hidden/weight/bias."""
    logp, entropy = ref_fused_linear_logprobs(hidden, weight, targets.masked_fill(~mask, -100), bias=bias,
                                              temperature=temperature)
    loss = ref_policy_loss(logp, adv, mask, old_logprobs=old, ref_logprobs=ref, entropy=entropy, **opts)
    return loss, logp, entropy


def run_case(case, dtype, device, backend):
    opts = dict(CASES[case])
    per_token_adv, use_bias, use_old, use_rollout = (opts.pop(k, False) for k in ("per_token_adv", "bias", "use_old",
                                                                                   "use_rollout"))
    temperature = opts.pop("temperature", 1.0)
    hidden, weight, bias, targets, mask, adv = make_inputs(dtype, device, per_token_adv=per_token_adv, bias=use_bias)
    leaves64 = [t.detach().double().requires_grad_() if t is not None else None for t in (hidden, weight, bias)]
    with torch.no_grad():
        logp0, _ = ref_fused_linear_logprobs(*leaves64[:2], targets.masked_fill(~mask, -100), bias=leaves64[2],
                                             temperature=temperature)
    old = (logp0 + 0.3 * torch.randn_like(logp0)).float() if use_old else None
    ref_lp = (logp0 + 0.5 * torch.randn_like(logp0)).float() if opts.get("kl_coef") else None
    rollout = (logp0 + 0.3 * torch.randn_like(logp0)).float() if use_rollout else None
    if use_rollout:
        opts["rollout_logprobs"] = rollout

    ref_loss, ref_logp, ref_ent = reference(*leaves64, targets, mask, adv, temperature=temperature, old=old,
                                            ref=ref_lp, **opts)
    ref_loss.backward()

    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (hidden, weight, bias)]
    loss, metrics = fused_linear_policy_loss(
        leaves[0], leaves[1], targets, adv, mask, bias=leaves[2], temperature=temperature, old_logprobs=old,
        ref_logprobs=ref_lp, backend=backend, **opts,
    )
    loss.backward()
    return dict(loss=loss, metrics=metrics, leaves=leaves, ref_loss=ref_loss, leaves64=leaves64, ref_logp=ref_logp,
                ref_ent=ref_ent, mask=mask, opts=opts)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_eager_float64_composition(case, dtype, backend, device):
    r = run_case(case, dtype, device, backend)
    assert r["loss"].dtype == torch.float32
    assert_rel_close(r["loss"], r["ref_loss"], dtype, name="loss")
    for name, ours, ref in zip(("hidden", "weight", "bias"), r["leaves"], r["leaves64"], strict=True):
        if ours is None:
            continue
        assert ours.grad is not None and ours.grad.dtype == dtype, f"grad {name}"
        assert_rel_close(ours.grad, ref.grad, dtype, name=f"grad {name}")
    # Tokens outside the response send no gradient into their hidden states.
    assert (r["leaves"][0].grad[~r["mask"]] == 0).all()
    mask = r["mask"]
    # The log-probs the loss saw are the reference's (and <= 0: verl #2656's positive log-probs would show here).
    assert float(r["metrics"]["logprob_mean"]) <= 0
    torch.testing.assert_close(r["metrics"]["logprob_mean"].double().cpu(), r["ref_logp"].detach()[mask].mean().cpu(),
                               rtol=1e-3 if dtype == torch.float16 else 1e-5, atol=1e-4)
    assert "entropy" in r["metrics"]  # always reported: the row pass computes it at no extra memory traffic
    if "entropy" in r["metrics"]:
        torch.testing.assert_close(r["metrics"]["entropy"].double().cpu(), r["ref_ent"].detach()[mask].mean().cpu(),
                                   rtol=1e-3 if dtype == torch.float16 else 1e-5, atol=1e-4)


# The interpreter's numpy reductions warn about the NaN rows that the kernel computes and then ignores.
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_padding_hidden_states_never_reach_the_gradient(backend, device):
    """Non-response positions go to the kernel as ignore_index: even NaN hidden states there change nothing."""
    hidden, weight, bias, targets, mask, adv = make_inputs(torch.float32, device, bias=True)
    dirty = hidden.clone()
    dirty[~mask] = float("nan")
    results = []
    for h0 in (hidden, dirty):
        h, w, b = h0.clone().requires_grad_(), weight.clone().requires_grad_(), bias.clone().requires_grad_()
        loss, _ = fused_linear_policy_loss(h, w, targets, adv, mask, bias=b, entropy_coef=0.01, backend=backend)
        loss.backward()
        results.append((loss.detach(), h.grad, w.grad, b.grad))
    for clean, noisy in zip(*results, strict=True):
        assert torch.isfinite(noisy).all()
        torch.testing.assert_close(noisy, clean, rtol=0, atol=0)


def test_module_matches_functional(device):
    hidden, weight, bias, targets, mask, adv = make_inputs(torch.float32, device, bias=True)
    opts = dict(temperature=0.8, kl_coef=0.1, kl_estimator="k1", loss_agg_mode="seq-mean-token-sum")
    ref_lp = torch.randn(targets.shape, device=device) - 2
    module = ReMaxLoss(**opts, backend="torch")
    loss_m, metrics_m = module(hidden, weight, targets, adv, mask, bias=bias, ref_logprobs=ref_lp)
    loss_f, metrics_f = fused_linear_policy_loss(hidden, weight, targets, adv, mask, bias=bias, ref_logprobs=ref_lp,
                                                 backend="torch", **opts)
    torch.testing.assert_close(loss_m, loss_f, rtol=0, atol=0)
    assert metrics_m.keys() == metrics_f.keys()
    assert "kl_coef=0.1" in repr(module)


def test_backends_agree(device):
    hidden, weight, bias, targets, mask, adv = make_inputs(torch.float32, device, per_token_adv=True, bias=True)
    grads = []
    for backend in ("triton", "torch"):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss, _ = fused_linear_policy_loss(h, w, targets, adv, mask, bias=bias, entropy_coef=0.02, backend=backend)
        loss.backward()
        grads.append((loss.detach(), h.grad, w.grad))
    for ours, theirs in zip(*grads, strict=True):
        assert_rel_close(ours, theirs, torch.float32, name="triton vs torch")


def test_bad_inputs_fail_before_the_kernel(device, monkeypatch):
    hidden, weight, bias, targets, mask, adv = make_inputs(torch.float32, device)
    # Every check below must fire before any log-prob work starts.
    bad_targets = targets.clone()
    bad_targets[0, 1] = weight.shape[0] + 3
    def no_kernel(*args, **kwargs):
        raise AssertionError("the lm-head pipeline ran on bad input")

    monkeypatch.setattr(losses_module, "stream", no_kernel)
    with pytest.raises(ValueError, match="targets.*vocab"):  # value checks run in the op, before the pipeline
        fused_linear_policy_loss(hidden, weight, bad_targets, adv, mask)
    with pytest.raises(ValueError, match="hidden.*3-D"):
        fused_linear_policy_loss(hidden[0], weight, targets, adv, mask)
    with pytest.raises(ValueError, match=r"targets.*\(3, 4\).*\(3, 5\)"):
        fused_linear_policy_loss(hidden, weight, targets[:, :4], adv, mask)
    with pytest.raises(TypeError, match="targets"):
        fused_linear_policy_loss(hidden, weight, targets.float(), adv, mask)
    with pytest.raises(ValueError, match=r"response_mask.*\(3, 4\)"):
        fused_linear_policy_loss(hidden, weight, targets, adv, mask[:, :4])
    with pytest.raises(ValueError, match=r"old_logprobs.*\(3, 4\)"):
        fused_linear_policy_loss(hidden, weight, targets, adv, mask, old_logprobs=torch.zeros(3, 4, device=device))
    with pytest.raises(ValueError, match="loss_agg_mode.*token-mean"):
        fused_linear_policy_loss(hidden, weight, targets, adv, mask, loss_agg_mode="sum")
    bad_targets[0, 1] = -5
    with pytest.raises(ValueError, match="targets.*negative"):
        fused_linear_policy_loss(hidden, weight, bad_targets, adv, mask)
    with pytest.raises(ValueError, match=r"advantages.*\(2,\)"):
        fused_linear_policy_loss(hidden, weight, targets, adv[:2], mask)
    with pytest.raises(ValueError, match="ref_logprobs.*required"):
        fused_linear_policy_loss(hidden, weight, targets, adv, mask, kl_coef=0.1)
    with pytest.raises(ValueError, match="kl_estimator.*k3"):
        ReMaxLoss(kl_estimator="full")
    with pytest.raises(ValueError, match="temperature"):
        ReMaxLoss(temperature=0.0)
    with pytest.raises(ValueError, match="backend"):
        ReMaxLoss(backend="gpu")
    with pytest.raises(TypeError, match="kl_coeff.*not a loss option"):
        ReMaxLoss(kl_coeff=0.1)


@pytest.mark.cuda
@pytest.mark.parametrize("case", list(CASES))
def test_bf16_on_gpu_large_vocab(case):
    """bf16 at a realistic vocabulary: the kernel's error vs float64 must be within ~2x plain torch's bf16 error."""
    device = torch.device("cuda")
    # No old log-probs here (the ratio terms are elementwise on [B, T], covered above): the kernel is what is tested.
    opts = {k: v for k, v in CASES[case].items()
            if k not in ("use_old", "clip_ratio", "clip_ratio_c", "use_rollout", "rollout_is_cap")}
    per_token_adv, use_bias = opts.pop("per_token_adv", False), opts.pop("bias", False)
    temperature = opts.pop("temperature", 1.0)
    hidden, weight, bias, targets, mask, adv = make_inputs(torch.bfloat16, device, B=4, T=64, H=512, V=32003,
                                                           per_token_adv=per_token_adv, bias=use_bias)
    ref_lp = None
    if opts.get("kl_coef"):
        ref_lp = torch.randn(targets.shape, device=device) - 3

    def grads_of(h, w, b, fn):
        leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (h, w, b)]
        loss = fn(*leaves)
        loss.backward()
        return [loss.detach()] + [t.grad for t in leaves if t is not None]

    def eager(h, w, b):  # plain torch in the inputs' dtype: the error budget
        logits = h @ w.T + (b if b is not None else 0)
        logp = torch.log_softmax(logits.float() / temperature, -1)
        lp = logp.gather(-1, targets.masked_fill(~mask, 0)[..., None]).squeeze(-1)
        ent = -(logp.exp() * logp).sum(-1)
        return ref_policy_loss(lp, adv, mask, ref_logprobs=ref_lp, entropy=ent, **opts).float()

    def ours(h, w, b):
        return fused_linear_policy_loss(h, w, targets, adv, mask, bias=b, temperature=temperature,
                                        ref_logprobs=ref_lp, backend="triton", **opts)[0]

    def exact(h, w, b):
        logp, ent = ref_fused_linear_logprobs(h, w, targets.masked_fill(~mask, -100), bias=b, temperature=temperature)
        return ref_policy_loss(logp, adv, mask, ref_logprobs=ref_lp, entropy=ent, **opts)

    leaves64 = [t.double() if t is not None else None for t in (hidden, weight, bias)]
    exact_vals = grads_of(*leaves64, exact)
    for name, o, e, x in zip(("loss", "hidden", "weight", "bias"), grads_of(hidden, weight, bias, ours),
                             grads_of(hidden, weight, bias, eager), exact_vals, strict=False):
        err_ours = (o.double() - x).norm() / x.norm()
        err_torch = (e.double() - x).norm() / x.norm()
        assert err_ours <= 2 * err_torch + 1e-3, f"{name}: kernel rel err {err_ours:.2e} vs torch bf16 {err_torch:.2e}"
