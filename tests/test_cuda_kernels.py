"""The compiled CUDA kernels of ``csrc/`` (extension ``remax_kernels._C``) on a GPU, at production sizes: against
the float64 references, the Triton kernels and the torch path on the same inputs. CUDA-only (``@pytest.mark.cuda``);
the same kernel source runs on every CI machine under the CPU emulation (tests/test_cuda_emu.py).

``scripts/gpu_check.sh`` builds the extension before running these; without it they are skipped with the reason.
"""

from __future__ import annotations

import math

import pytest
import torch

from remax_kernels import _cuda, sample_and_greedy, token_logprobs
from remax_kernels.ops.sampling import parse_options
from tests.helpers import assert_rel_close
from tests.helpers.ref_logprobs import ref_token_logprobs
from tests.helpers.ref_sampling import (
    assert_tokens_match,
    check_against_reference,
    chi_square_pvalue,
    ref_processed,
    ref_tokens,
)

pytestmark = pytest.mark.cuda
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
IGNORE = -100
CHI2_REJECT_P = 1e-3


@pytest.fixture(scope="module", autouse=True)
def _extension():
    if not _cuda.available():
        pytest.skip(f"remax_kernels._C is not built ({_cuda.BUILD_HINT})")


def _logits(shape, dtype, *, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype).cuda()


def _cuda_sample(logits, greedy, *, seed=0, step=0, logprobs="processed", temperature=1.0, top_k=0, top_p=1.0,
                 min_p=0.0):
    batch, vocab = logits.shape
    temp, k, p, log_min_p, seeds, greedy_mask, key_row, truncate = parse_options(
        batch, vocab, logits.device, greedy, temperature, top_k, top_p, min_p, seed, logprobs
    )
    return _cuda.sample_and_greedy(logits, greedy_mask, temp, k, p, log_min_p, seeds, step, key_row, truncate,
                                   logprobs == "raw")


# ----------------------------------------------------------------------------------------------------------------------
# The decoding step
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("vocab", [32000, 151936])
@pytest.mark.parametrize("dtype", DTYPES)
def test_sampler_matches_reference_at_full_vocabulary(dtype, vocab):
    batch = 16
    logits = _logits((batch, vocab), dtype, seed=vocab)
    greedy = (torch.arange(batch) % 4 == 0).cuda()
    g = torch.Generator().manual_seed(1)
    opts = dict(temperature=(torch.rand(batch, generator=g) + 0.4).cuda(),
                top_k=torch.tensor([0, 50, 0, 1000] * 4).cuda(), top_p=torch.tensor([1.0, 0.9, 0.5, 1.0] * 4).cuda(),
                min_p=torch.tensor([0.0, 0.0, 0.0, 0.05] * 4).cuda())
    tokens, logprobs = _cuda_sample(logits, greedy, seed=21, step=100, **opts)
    check_against_reference(logits, greedy, tokens, logprobs, opts, seed=21, step=100)
    tokens, logprobs = _cuda_sample(logits, greedy, seed=21, step=100, logprobs="raw", **opts)
    check_against_reference(logits, greedy, tokens, logprobs, opts, seed=21, step=100, mode="raw")


@pytest.mark.parametrize("opts", [dict(), dict(top_p=0.9), dict(top_k=50, top_p=0.95, temperature=0.7)])
def test_sampler_agrees_with_triton_and_torch(opts):
    batch, vocab = 64, 128256
    logits = _logits((batch, vocab), torch.bfloat16, seed=2)
    greedy = (torch.arange(batch) % 2 == 1).cuda()
    tok_c, lp_c = _cuda_sample(logits, greedy, seed=5, step=3, **opts)
    z, kept = ref_processed(logits.cpu(), greedy.cpu(), **opts)
    _, scores = ref_tokens(logits.cpu(), greedy.cpu(), z, kept, seed=5, step=3)
    for backend in ("triton", "torch"):
        tok, lp = sample_and_greedy(logits, greedy, seed=5, step=3, backend=backend, **opts)
        assert torch.equal(tok[greedy], tok_c[greedy]), backend
        assert assert_tokens_match(tok_c.cpu(), tok.cpu(), scores, name=f"cuda vs {backend}") <= 1
        assert_rel_close(lp_c, lp, torch.float32, name=f"logprobs cuda vs {backend}")


def test_sampler_threshold_paths_at_full_size():
    # 1024 value bins and a 4096-entry list: top-k 50 fits the list (race over it), top-p 0.9 of 3 * N(0, 1) keeps
    # ~4% of 151936 (threshold bins only), 6000 copies of the max exceed the list (key-histogram fallback).
    vocab = 151936
    logits = _logits((4, vocab), torch.float32, seed=3)
    logits[3, :6000] = logits[3].max() + 0.5
    greedy = torch.zeros(4, dtype=torch.bool).cuda()
    for opts in (dict(top_k=50), dict(top_p=0.9), dict(top_k=100, top_p=0.8), dict(top_p=0.99, min_p=0.001)):
        tokens, logprobs = _cuda_sample(logits, greedy, seed=torch.arange(4).cuda(), step=1, **opts)
        check_against_reference(logits, greedy, tokens, logprobs, opts, seed=torch.arange(4), step=1)


def test_sampler_is_deterministic_and_rows_are_independent():
    batch, vocab = 32, 50000
    logits = _logits((batch, vocab), torch.bfloat16, seed=4)
    greedy = (torch.arange(batch) % 3 == 0).cuda()
    seeds = (torch.arange(batch) * 7919 - 3).cuda()
    opts = dict(top_k=200, top_p=0.9, temperature=1.2)
    first = _cuda_sample(logits, greedy, seed=seeds, step=9, **opts)
    again = _cuda_sample(logits, greedy, seed=seeds, step=9, **opts)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    perm = torch.randperm(batch, generator=torch.Generator().manual_seed(0)).cuda()
    permuted = _cuda_sample(logits[perm], greedy[perm], seed=seeds[perm], step=9, **opts)
    assert torch.equal(permuted[0], first[0][perm]) and torch.equal(permuted[1], first[1][perm])


@pytest.mark.parametrize("opts", [dict(temperature=0.6), dict(temperature=1.3, top_k=6, top_p=0.85, min_p=0.05)])
def test_sampler_chi_square_large(opts):
    row = torch.randn(10, generator=torch.Generator().manual_seed(11))
    n = 200000
    for step in range(3):
        tokens, _ = _cuda_sample(row.cuda().expand(n, 10).contiguous(), torch.zeros(n, dtype=torch.bool).cuda(),
                                 seed=2024, step=step, **opts)
        z, kept = ref_processed(row[None], torch.zeros(1, dtype=torch.bool), **opts)
        probs = torch.softmax(torch.where(kept, z, -math.inf), 1)[0]
        counts = torch.bincount(tokens.cpu(), minlength=10)
        assert counts[~kept[0]].sum() == 0
        pvalue = chi_square_pvalue(counts, probs)
        assert pvalue >= CHI2_REJECT_P, f"step {step}: chi-square p-value {pvalue:.2e}"


def test_sampler_invalid_rows():
    vocab = 40000
    logits = _logits((4, vocab), torch.float32, seed=6)
    logits[0] = -math.inf
    logits[1, 123] = math.nan
    logits[2, 7] = math.inf
    greedy = torch.tensor([False, True, False, False]).cuda()
    tokens, logprobs = _cuda_sample(logits, greedy, top_p=0.9, seed=1)
    assert tokens[:3].tolist() == [0, 0, 0] and torch.isnan(logprobs[:3]).all()
    assert torch.isfinite(logprobs[3])


def test_ops_pass_opcheck():
    logits = _logits((5, 3000), torch.bfloat16, seed=7)
    greedy = torch.tensor([True, False, False, True, False]).cuda()
    temp, k, p, log_min_p, seeds, greedy_mask, key_row, truncate = parse_options(
        5, 3000, logits.device, greedy, 0.9, 20, 0.9, 0.0, 3, "processed"
    )
    torch.library.opcheck(torch.ops.remax_cuda.sample_and_greedy.default,
                          (logits, greedy_mask, temp, k, p, log_min_p, seeds, 1, key_row, truncate, False),
                          test_utils=("test_schema", "test_faketensor"))
    targets = torch.randint(0, 3000, (5,)).cuda()
    torch.library.opcheck(torch.ops.remax_cuda.row_logprobs_fwd.default, (logits, targets, 5, 0, 3000, 1.0, -100, True),
                          test_utils=("test_schema", "test_faketensor"))


# ----------------------------------------------------------------------------------------------------------------------
# The log-prob row kernel
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("vocab", [1000, 32000, 151936])
@pytest.mark.parametrize("dtype", DTYPES)
def test_row_kernel_matches_triton_and_reference(dtype, vocab):
    n, temperature = 64, 0.8
    logits = _logits((n, vocab), dtype, seed=vocab)
    targets = torch.randint(0, vocab, (n,)).cuda()
    targets[::7] = IGNORE
    g_lp, g_ent = torch.randn(n).cuda(), torch.randn(n).cuda()
    logp, row_max, log_norm, entropy = _cuda.row_logprobs_forward(logits, targets, 1 / temperature, IGNORE, True)
    grad = _cuda.row_logprobs_backward(logits, targets, row_max, log_norm, entropy, g_lp, g_ent, 1 / temperature,
                                       IGNORE, torch.empty_like(logits))
    x = logits.double().requires_grad_(True)
    ref_lp, ref_ent = ref_token_logprobs(x, targets, temperature=temperature, ignore_index=IGNORE)
    (ref_grad,) = torch.autograd.grad((ref_lp * g_lp.double()).sum() + (ref_ent * g_ent.double()).sum(), x)
    assert_rel_close(logp, ref_lp, torch.float32, name="logp", scale=2.0)
    assert_rel_close(entropy, ref_ent, torch.float32, name="entropy", scale=2.0)
    assert_rel_close(grad, ref_grad, dtype, name="grad", scale=2.0)
    y = logits.clone().requires_grad_(True)
    t_lp, t_ent = token_logprobs(y, targets, temperature=temperature, return_entropy=True, backend="triton")
    (t_grad,) = torch.autograd.grad((t_lp * g_lp).sum() + (t_ent * g_ent).sum(), y)
    assert_rel_close(logp, t_lp, torch.float32, name="logp vs triton", scale=2.0)
    assert_rel_close(grad, t_grad, dtype, name="grad vs triton", scale=2.0)
    # In place: the gradient replaces the logits, same values.
    work = logits.clone()
    _cuda.row_logprobs_backward(work, targets, row_max, log_norm, entropy, g_lp, g_ent, 1 / temperature, IGNORE, work)
    assert torch.equal(work, grad)


def test_row_kernel_strided_view():
    B, T, vocab = 4, 9, 32001  # odd V: rows off 16-byte boundaries
    base = _logits((B, T, vocab), torch.bfloat16, seed=8)
    view = base[:, :-1]
    targets = torch.randint(0, vocab, (B, T - 1)).cuda()
    logp, row_max, log_norm, _ = _cuda.row_logprobs_forward(view, targets, 1.0, IGNORE, False)
    ref_lp, _ = ref_token_logprobs(view.double(), targets)
    assert_rel_close(logp, ref_lp.reshape(-1), torch.float32, name="strided logp", scale=2.0)
    g_lp = torch.randn(B * (T - 1)).cuda()
    out = _cuda.row_logprobs_backward(view, targets, row_max, log_norm, None, g_lp, None, 1.0, IGNORE,
                                      torch.empty(B, T - 1, vocab, dtype=torch.bfloat16, device="cuda"))
    x = view.double().requires_grad_(True)
    (ref_grad,) = torch.autograd.grad((ref_token_logprobs(x, targets)[0] * g_lp.view(B, T - 1).double()).sum(), x)
    assert_rel_close(out, ref_grad, torch.bfloat16, name="strided grad", scale=2.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backend_cuda_through_the_public_log_prob_ops(dtype):
    """token_logprobs and the lm-head ops with backend="cuda" run the CUDA row kernel and agree with Triton."""
    from remax_kernels import fused_linear_logprobs

    logits = _logits((3, 17, 32003), dtype).requires_grad_()
    targets = torch.randint(0, 32003, (3, 16), device="cuda")
    outs = {}
    for backend in ("cuda", "triton"):
        x = logits.detach().clone().requires_grad_()
        logp, ent = token_logprobs(x[:, :-1], targets, temperature=0.8, return_entropy=True, backend=backend)
        (logp.sum() + ent.sum()).backward()
        outs[backend] = (logp, ent, x.grad)
    for a, b in zip(outs["cuda"], outs["triton"], strict=True):
        assert_rel_close(a, b, dtype, name="cuda vs triton")
    hidden = torch.randn(40, 256, device="cuda", dtype=dtype)
    weight = torch.randn(32003, 256, device="cuda", dtype=dtype) / 16
    t = torch.randint(0, 32003, (40,), device="cuda")
    a = fused_linear_logprobs(hidden, weight, t, backend="cuda")
    b = fused_linear_logprobs(hidden, weight, t, backend="triton")
    assert_rel_close(a, b, dtype, name="fused cuda vs triton")
