"""Logit soft-capping (``softcap=c``: logits -> ``c * tanh(logits / c)`` before the temperature, as Hugging Face's
Gemma-2/3 ``final_logit_softcapping``) in every op that takes logits or hidden states + lm-head: values and gradients
against the float64 references of ``tests/helpers`` (which cap with ``ref_soft_cap``), on logits large enough that
the cap matters (|logits| ~ 2-5x the cap), for the torch path and the Triton kernels (interpreter on the CPU); the
sampling ops' tokens, log-probs and frequencies; and the argument's validation."""

from __future__ import annotations

import math

import pytest
import torch

import remax_kernels as rk
from tests.helpers import assert_rel_close
from tests.helpers.ref_logprobs import ref_fused_linear_logprobs, ref_soft_cap, ref_token_logprobs
from tests.helpers.ref_losses import ref_policy_loss
from tests.helpers.ref_sampling import check_against_reference, chi_square_pvalue, ref_processed

# The interpreter evaluates masked-off lanes too and numpy warns about them; values are compared below.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

BACKENDS = ("triton", "torch")
CAP = 8.0
CHI2_REJECT_P = 1e-3


def _capped_scale_logits(shape, *, dtype=torch.float32, device="cpu", seed=0):
    """Logits with std 1.5 caps: the tails reach 4-5 caps, where the cap bends them most."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * 1.5 * CAP).to(dtype).to(device)


def test_capping_changes_the_answer():
    """Test design: at this scale, the capped log-probs are far from the uncapped ones (a missing cap fails)."""
    logits = _capped_scale_logits((4, 300))
    targets = torch.randint(0, 300, (4,))
    capped, _ = ref_token_logprobs(logits, targets, softcap=CAP)
    plain, _ = ref_token_logprobs(logits, targets)
    assert (capped - plain).abs().max() > 1.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
def test_token_logprobs(backend, inplace, dtype, device):
    logits = _capped_scale_logits((3, 7, 301), dtype=dtype, device=device)
    targets = torch.randint(0, 301, (3, 7), device=device)
    targets[1, 2] = -100
    g_logp, g_ent = torch.randn(3, 6, device=device), torch.randn(3, 6, device=device)
    ref_x = logits.detach().double().requires_grad_()
    ref_lp, ref_ent = ref_token_logprobs(ref_x[:, :-1], targets[:, 1:], temperature=0.7, softcap=CAP)
    ((ref_lp * g_logp).sum() + (ref_ent * g_ent).sum()).backward()

    x = logits.clone().requires_grad_()
    lp, ent = rk.token_logprobs(x[:, :-1] if not inplace else x.clone()[:, :-1], targets[:, 1:], temperature=0.7,
                                softcap=CAP, return_entropy=True, inplace_backward=inplace, backend=backend)
    ((lp * g_logp).sum() + (ent * g_ent).sum()).backward()
    # bf16 inputs are exact in float64; the math is fp32, so fp32 tolerances hold for the values.
    assert_rel_close(lp, ref_lp, torch.float32, name="logp", scale=4.0)
    assert_rel_close(ent, ref_ent, torch.float32, name="entropy", scale=4.0)
    assert_rel_close(x.grad, ref_x.grad, dtype, name="grad", scale=4.0)
    assert (lp <= 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_logprobs_no_cap_is_unchanged(backend, device):
    logits = _capped_scale_logits((5, 200), device=device)
    targets = torch.randint(0, 200, (5,), device=device)
    a = rk.token_logprobs(logits, targets, backend=backend)
    b = rk.token_logprobs(logits, targets, softcap=None, backend=backend)
    assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_logprobs_inf_logits(backend, device):
    """-inf stays masked (probability 0); +inf is capped to the cap like torch.tanh does (finite, not NaN)."""
    logits = _capped_scale_logits((2, 50), device=device)
    logits[0, 3] = -math.inf
    logits[1, 5] = math.inf
    targets = torch.tensor([3, 5], device=device)
    lp = rk.token_logprobs(logits, targets, softcap=CAP, backend=backend)
    ref, _ = ref_token_logprobs(logits.cpu(), targets.cpu(), softcap=CAP)
    assert lp[0] == -math.inf and ref[0] == -math.inf
    assert_rel_close(lp[1:], ref[1:], torch.float32, name="logp at a +inf logit")


def _lm_head(device, *, B=3, T=5, H=24, V=97, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g).to(device)
    weight = (torch.randn(V, H, generator=g) * 1.5 * CAP * H**-0.5).to(device)
    bias = (torch.randn(V, generator=g) * 0.5).to(device)
    targets = torch.randint(0, V, (B, T), generator=g).to(device)
    return hidden, weight, bias, targets


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_linear_logprobs(backend, device):
    hidden, weight, bias, targets = _lm_head(device)
    targets[0, 1] = -100
    g_lp, g_ent = torch.randn(targets.shape, device=device), torch.randn(targets.shape, device=device)
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    lp, ent = rk.fused_linear_logprobs(leaves[0], leaves[1], targets, bias=leaves[2], temperature=1.3, softcap=CAP,
                                       return_entropy=True, backend=backend)
    ((lp * g_lp).sum() + (ent * g_ent).sum()).backward()
    refs = [t.detach().double().requires_grad_() for t in (hidden, weight, bias)]
    ref_lp, ref_ent = ref_fused_linear_logprobs(refs[0], refs[1], targets, bias=refs[2], temperature=1.3, softcap=CAP)
    ((ref_lp * g_lp).sum() + (ref_ent * g_ent).sum()).backward()
    assert_rel_close(lp, ref_lp, torch.float32, name="logp", scale=4.0)
    assert_rel_close(ent, ref_ent, torch.float32, name="entropy", scale=4.0)
    for name, leaf, ref in zip(("hidden", "weight", "bias"), leaves, refs, strict=True):
        assert_rel_close(leaf.grad, ref.grad, torch.float32, name=f"grad {name}", scale=4.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_linear_policy_loss(backend, device):
    hidden, weight, bias, targets = _lm_head(device, seed=1)
    mask = torch.rand(targets.shape, device=device) < 0.7
    mask[0, 0] = True
    adv = torch.randn(targets.shape[0], device=device)
    old = torch.randn(targets.shape, device=device) * 0.1 - 3.0
    opts = dict(clip_ratio=(0.2, 0.28), entropy_coef=0.01)
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    loss, metrics = rk.fused_linear_policy_loss(leaves[0], leaves[1], targets, adv, mask, bias=leaves[2],
                                                temperature=0.9, old_logprobs=old, softcap=CAP, backend=backend,
                                                **opts)
    loss.backward()
    refs = [t.detach().double().requires_grad_() for t in (hidden, weight, bias)]
    ref_lp, ref_ent = ref_fused_linear_logprobs(refs[0], refs[1], targets, bias=refs[2], temperature=0.9, softcap=CAP)
    ref_loss = ref_policy_loss(ref_lp, adv, mask, old_logprobs=old, entropy=ref_ent, **opts)
    ref_loss.backward()
    assert_rel_close(loss, ref_loss, torch.float32, name="loss", scale=4.0)
    for name, leaf, ref in zip(("hidden", "weight", "bias"), leaves, refs, strict=True):
        assert_rel_close(leaf.grad, ref.grad, torch.float32, name=f"grad {name}", scale=4.0)
    # ReMaxLoss carries the cap to the same op.
    loss2, _ = rk.ReMaxLoss(softcap=CAP, temperature=0.9, backend=backend, **opts)(
        hidden, weight, targets, adv, mask, bias=bias, old_logprobs=old)
    assert torch.equal(loss2.detach(), loss.detach())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("config", ["plain", "truncated", "raw"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_sample_and_greedy(backend, config, dtype, device):
    """Tokens (the exact Philox stream) and log-probs against the float64 reference run on the capped logits."""
    batch, vocab = 8, 257
    logits = _capped_scale_logits((batch, vocab), dtype=dtype, device=device, seed=3)
    greedy = torch.tensor([True, False, False, True, False, False, True, False], device=device)
    opts = {"plain": dict(temperature=0.8), "truncated": dict(temperature=1.2, top_k=30, top_p=0.9, min_p=0.01),
            "raw": dict(temperature=0.7, top_p=0.8)}[config]
    mode = "raw" if config == "raw" else "processed"
    tokens, logprobs = rk.sample_and_greedy(logits, greedy, seed=41, step=5, softcap=CAP, logprobs=mode,
                                            backend=backend, **opts)
    check_against_reference(ref_soft_cap(logits.cpu(), CAP), greedy, tokens, logprobs, opts, seed=41, step=5,
                            mode=mode)


@pytest.mark.parametrize("backend", BACKENDS)
def test_greedy_ties_created_by_the_cap(backend, device):
    """Two logits far above the cap both round to ``cap`` in fp32 (as torch.tanh gives them, as HF's greedy sees
    them): the tie goes to the lowest index."""
    logits = torch.zeros(1, 64, device=device)
    logits[0, 40] = 60 * CAP
    logits[0, 20] = 50 * CAP
    capped = CAP * torch.tanh(logits / CAP)
    assert capped[0, 20] == capped[0, 40], "test design: the two logits must saturate to the same fp32 value"
    tokens, logprobs = rk.sample_and_greedy(logits, torch.ones(1, dtype=torch.bool, device=device), softcap=CAP,
                                            backend=backend)
    assert tokens.tolist() == [20]
    assert_rel_close(logprobs, torch.log_softmax(capped.double(), 1)[:, 20], torch.float32)


@pytest.mark.parametrize("opts", [dict(temperature=0.7), dict(temperature=1.1, top_k=12, top_p=0.9)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_sampled_frequencies(backend, opts, device):
    """Frequencies of draws from one row against softmax(cap * tanh(x / cap) / T) over the kept set (fewer draws
    through the Triton interpreter, whose per-row cost dominates the suite's time; still far above the uncapped gap)."""
    vocab, n_draws = 40, 6000 if backend == "torch" else 2000
    row = torch.linspace(-4 * CAP, 4 * CAP, vocab)[torch.randperm(vocab, generator=torch.Generator().manual_seed(0))]
    logits = row.to(device).expand(n_draws, vocab).contiguous()
    greedy = torch.zeros(n_draws, dtype=torch.bool, device=device)
    tokens, _ = rk.sample_and_greedy(logits, greedy, seed=7, step=1, softcap=CAP, backend=backend, **opts)
    z, kept = ref_processed(ref_soft_cap(row[None], CAP), torch.zeros(1, dtype=torch.bool), **opts)
    probs = torch.softmax(torch.where(kept, z, -math.inf), 1)[0]
    counts = torch.bincount(tokens.cpu(), minlength=vocab)
    assert counts[~kept[0]].sum() == 0
    assert chi_square_pvalue(counts, probs) > CHI2_REJECT_P
    # Test design: without the cap the same draws would be rejected (the cap flattens the top of the row).
    z0, kept0 = ref_processed(row[None], torch.zeros(1, dtype=torch.bool), **opts)
    probs0 = torch.softmax(torch.where(kept0, z0, -math.inf), 1)[0]
    assert (probs - probs0).abs().max() > 0.05


@pytest.mark.parametrize("mode", ["processed", "raw"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_linear_sample_and_greedy(backend, mode, device):
    hidden, weight, bias, _ = _lm_head(device, B=1, T=12, H=32, V=333, seed=2)
    hidden = hidden[0]
    greedy = torch.arange(12, device=device) % 3 == 0
    temperature = torch.rand(12, generator=torch.Generator().manual_seed(1)).to(device) + 0.5
    tokens, logprobs = rk.fused_linear_sample_and_greedy(hidden, weight, greedy, bias=bias, temperature=temperature,
                                                         seed=11, step=3, softcap=CAP, logprobs=mode,
                                                         backend=backend)
    logits64 = ref_soft_cap(hidden.double().cpu() @ weight.double().cpu().T + bias.double().cpu(), CAP)
    check_against_reference(logits64, greedy, tokens, logprobs, dict(temperature=temperature), seed=11, step=3,
                            mode=mode)


BAD_SOFTCAPS = [(0.0, ValueError), (-1.0, ValueError), (math.inf, ValueError), (math.nan, ValueError),
                ("30", TypeError), (True, TypeError), (torch.tensor(30.0), TypeError)]


@pytest.mark.parametrize("value,error", BAD_SOFTCAPS)
def test_bad_softcap_is_refused(value, error):
    logits = torch.randn(2, 10)
    targets = torch.randint(0, 10, (2,))
    hidden, weight = torch.randn(1, 2, 4), torch.randn(10, 4)
    mask = torch.ones(1, 2, dtype=torch.bool)
    greedy = torch.zeros(2, dtype=torch.bool)
    calls = [
        lambda: rk.token_logprobs(logits, targets, softcap=value),
        lambda: rk.fused_linear_logprobs(hidden, weight, targets[None], softcap=value),
        lambda: rk.fused_linear_policy_loss(hidden, weight, targets[None], torch.ones(1), mask, softcap=value),
        lambda: rk.ReMaxLoss(softcap=value),
        lambda: rk.sample_and_greedy(logits, greedy, softcap=value),
        lambda: rk.fused_linear_sample_and_greedy(hidden[0], weight, greedy, softcap=value),
    ]
    for call in calls:
        with pytest.raises(error, match="softcap"):
            call()


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_with_softcap(backend, device):
    """The custom ops' schemas carry softcap (a trailing float, default 0 = off): schema, fake tensors, autograd."""
    from remax_kernels.ops.sampling import parse_options, step_tensor

    ops = torch.ops.remax_kernels
    logits = _capped_scale_logits((6, 67), device=device).requires_grad_()
    targets = torch.randint(0, 67, (6,), device=device)
    hidden, weight, bias, t2 = _lm_head(device, B=2, T=3, H=8, V=67)
    flat_h, w = hidden.reshape(6, 8).requires_grad_(), weight.clone().requires_grad_()
    greedy = torch.arange(6, device=device) % 2 == 0
    temp, k, p, log_min_p, seeds, greedy, key_row, truncate = parse_options(
        6, 67, device, greedy, 0.8, 5, 0.9, 0.0, 3, "processed")
    step = step_tensor(1, device)
    cases = [
        (ops.token_logprobs.default, (logits, targets, 0.9, -100, True, backend, CAP), True),
        (ops.fused_linear_logprobs.default, (flat_h, w, None, t2.reshape(-1), -100, 0.8, True, torch.float32,
                                             backend, CAP), True),
        (ops.sample_and_greedy.default, (logits.detach(), greedy, temp, k, p, log_min_p, seeds, key_row, step,
                                         truncate, False, backend, CAP), False),
        (ops.fused_linear_sample_and_greedy.default, (flat_h.detach(), weight, bias, greedy, temp, seeds, key_row,
                                                      step, False, backend, CAP), False),
    ]
    for op, args, autograd in cases:
        tests = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")
        torch.library.opcheck(op, args, test_utils=tests + (("test_autograd_registration",) if autograd else ()))
