"""The CUDA kernels of ``csrc/``, run on the CPU: the SAME kernel source the GPU build compiles, built with the host
compiler against the emulation header ``csrc/emu/cuda_emu.h`` (blocks one after another, a block's threads as
std::threads with real barriers, warp shuffles exchanged across the 32 lanes of a warp) and driven through the C ABI
of ``csrc/emu/emu_abi.cpp`` (``tests/helpers/cuda_emu.py``).

Every result is compared with the float64 references (``tests/helpers/ref_*.py``) and with the Triton kernels
(through the interpreter) on the same inputs: log-probs, entropies and gradients of the row kernel; tokens (exact
Philox stream, so every sampled token is predicted), processed and raw log-probs of the decoding step; ragged
vocabularies, strided rows that start off a 16-byte boundary, -inf/NaN rows, ties, every sampling option, per-row
seeds, in-place backward, and a chi-square test of the sampled distribution. Coverage counters compiled into the
emulation show that the crafted inputs reach each path of the threshold search.

What the emulation cannot show (csrc/README.md has the list): races that this machine's schedule does not expose,
the GPU memory model, warp scheduling, bank conflicts, occupancy, register spills, and the last-bit differences
of the GPU's fast exp. Those are for ``scripts/gpu_check.sh`` (compute-sanitizer, the CUDA tests) and for CI's
``nvcc -Xptxas -v`` report.
"""

from __future__ import annotations

import math

import pytest
import torch

from remax_kernels import sample_and_greedy, token_logprobs
from remax_kernels.ops.sampling import parse_options
from tests.helpers import assert_rel_close, triton_runs_on_cpu
from tests.helpers import cuda_emu as emu
from tests.helpers.ref_logprobs import ref_token_logprobs
from tests.helpers.ref_sampling import (
    SAMPLING_CASES,
    assert_tokens_match,
    check_against_reference,
    chi_square_pvalue,
    ref_processed,
    ref_tokens,
    sampling_options,
)

pytestmark = [
    pytest.mark.skipif(emu.compiler() is None, reason="no host C++ compiler to build the CUDA emulation"),
    # the Triton interpreter evaluates masked-off lanes (0 * -inf, log(0)) and numpy warns about them
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
]

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
IGNORE = -100
CHI2_REJECT_P = 1e-3


@pytest.fixture(scope="module", autouse=True)
def _library():
    emu.library()  # one build per source version (cached across sessions), before any test is timed
    emu.coverage()


def _logits(shape, dtype, *, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype)


# ----------------------------------------------------------------------------------------------------------------------
# The log-prob row kernel
# ----------------------------------------------------------------------------------------------------------------------


def _row_reference(logits, targets, g_logp, g_entropy, temperature):
    """float64 (logp, entropy, grad of sum(g_logp * logp + g_entropy * entropy)), flattened to rows."""
    x = logits.detach().double().requires_grad_(True)
    logp, entropy = ref_token_logprobs(x, targets, temperature=temperature, ignore_index=IGNORE)
    loss = (logp * g_logp.double().view(logp.shape)).sum()
    if g_entropy is not None:
        loss = loss + (entropy * g_entropy.double().view(entropy.shape)).sum()
    (grad,) = torch.autograd.grad(loss, x)
    return logp.reshape(-1).detach(), entropy.reshape(-1).detach(), grad


def _run_rows(logits, targets, temperature, g_logp, g_entropy, *, config, inplace=False):
    """The CUDA forward then backward; returns (logp, row_max, log_norm, entropy, grad)."""
    inv_t = 1.0 / temperature
    need_entropy = g_entropy is not None
    logp, row_max, log_norm, entropy = emu.row_logprobs_forward(logits, targets, inv_t, IGNORE, need_entropy,
                                                                config=config)
    if inplace:
        work = logits.clone()
        logits_in, out = work, work
    else:
        logits_in, out = logits, torch.full_like(logits, float("nan"))
    grad = emu.row_logprobs_backward(
        logits_in, targets, row_max, log_norm, entropy, g_logp.reshape(-1).float().contiguous(),
        None if g_entropy is None else g_entropy.reshape(-1).float().contiguous(), inv_t, IGNORE, out, config=config,
    )
    return logp, row_max, log_norm, entropy, grad


# (config, vocab sizes): config 0 is the production dispatch (a warp per row up to V = 1024, a 256-thread block up to
# 16384, 512 threads above); 1 and 2 are a 64-thread block per row and a warp per row.
ROW_SHAPES = {0: (1003, 3001, 16411), 1: (1, 37, 1000, 4099), 2: (5, 300, 1001)}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("config", sorted(ROW_SHAPES))
def test_row_kernel_matches_reference(config, dtype):
    for i, vocab in enumerate(ROW_SHAPES[config]):
        n = 2 if vocab > 4000 else 5  # the big production rows are slow to emulate (512 threads)
        logits = _logits((n, vocab), dtype, seed=vocab)
        targets = torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(i))
        if n > 2:
            targets[1] = IGNORE
        temperature = (1.0, 0.7, 1.6)[i % 3]
        g_logp, g_entropy = torch.randn(n), torch.randn(n)
        logp, row_max, log_norm, entropy, grad = _run_rows(logits, targets, temperature, g_logp, g_entropy,
                                                           config=config, inplace=(i % 2 == 1))
        ref_logp, ref_entropy, ref_grad = _row_reference(logits, targets, g_logp, g_entropy, temperature)
        valid = targets != IGNORE
        name = f"V={vocab} T={temperature}"
        assert (logp <= 0).all() and (entropy >= 0).all(), name
        assert_rel_close(logp, ref_logp, torch.float32, name=f"logp {name}", scale=2.0)
        assert_rel_close(entropy, ref_entropy, torch.float32, name=f"entropy {name}", scale=2.0)
        x = logits.double()
        assert torch.equal(row_max[valid], logits.float().max(1).values[valid]), f"row_max {name}"
        ref_log_norm = torch.logsumexp((x - x.max(1, keepdim=True).values) / temperature, 1)
        assert_rel_close(log_norm[valid], ref_log_norm[valid], torch.float32, name=f"log_norm {name}", scale=2.0)
        assert (logp[~valid] == 0).all() and (entropy[~valid] == 0).all() and (row_max[~valid] == 0).all()
        assert grad.dtype == dtype
        assert (grad[~valid] == 0).all(), "ignored rows get a zero gradient"
        assert_rel_close(grad, ref_grad, dtype, name=f"grad {name}", scale=2.0)


def _triton_device() -> torch.device:
    """Where the Triton side of a CUDA-vs-Triton comparison runs: CPU tensors through the interpreter, else the GPU
    (the GPU machine runs with the interpreter off); skipped when neither is there."""
    if triton_runs_on_cpu():
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    pytest.skip("the Triton side needs TRITON_INTERPRET=1 or a CUDA device (neither here)")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_kernel_matches_triton(dtype):
    # Same inputs through token_logprobs(backend="triton") (the interpreter, or the GPU) and through the CUDA kernels.
    n, vocab, temperature = 6, 777, 0.8
    logits = _logits((n, vocab), dtype, seed=3)
    targets = torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(4))
    targets[2] = IGNORE
    g_logp, g_entropy = torch.randn(n), torch.randn(n)
    dev = _triton_device()
    x = logits.clone().to(dev).requires_grad_(True)
    t_logp, t_entropy = token_logprobs(x, targets.to(dev), temperature=temperature, return_entropy=True,
                                       backend="triton")
    (t_grad,) = torch.autograd.grad((t_logp * g_logp.to(dev)).sum() + (t_entropy * g_entropy.to(dev)).sum(), x)
    t_logp, t_entropy, t_grad = t_logp.cpu(), t_entropy.cpu(), t_grad.cpu()
    logp, _, _, entropy, grad = _run_rows(logits, targets, temperature, g_logp, g_entropy, config=1)
    assert_rel_close(logp, t_logp.detach(), torch.float32, name="logp vs triton", scale=2.0)
    assert_rel_close(entropy, t_entropy.detach(), torch.float32, name="entropy vs triton", scale=2.0)
    assert_rel_close(grad, t_grad, dtype, name="grad vs triton", scale=2.0)


@pytest.mark.parametrize("config", [1, 2])
def test_row_kernel_strided_views_and_alignment(config):
    # logits[:, :-1] of [B, T, V] with V odd: rows start off 16-byte boundaries (scalar head and tail around the
    # vector loads) and the rows of a contiguous gradient sit differently from the view's (scalar gradient path).
    B, T, vocab = 3, 5, 37
    base = _logits((B, T, vocab), torch.bfloat16, seed=9)
    view = base[:, :-1]
    targets = torch.randint(0, vocab, (B, T - 1), generator=torch.Generator().manual_seed(1))
    targets[0, 2] = IGNORE
    g_logp = torch.randn(B, T - 1)
    emu.coverage()
    logp, row_max, log_norm, _ = emu.row_logprobs_forward(view, targets, 1.0, IGNORE, False, config=config)
    ref_logp, _, ref_grad = _row_reference(view, targets, g_logp, None, 1.0)
    assert_rel_close(logp, ref_logp, torch.float32, name="strided logp", scale=2.0)
    out = torch.full((B, T - 1, vocab), float("nan"), dtype=torch.bfloat16)
    emu.row_logprobs_backward(view, targets, row_max, log_norm, None, g_logp.reshape(-1).contiguous(), None, 1.0,
                              IGNORE, out, config=config)
    assert_rel_close(out, ref_grad, torch.bfloat16, name="strided grad", scale=2.0)
    cov = emu.coverage()
    assert cov["scalar_head"] > 0 and cov["scalar_tail"] > 0 and cov["grad_scalar"] > 0, cov

    # In place over the view: the gradient replaces the view's rows and nothing else of the base tensor.
    work = base.clone()
    emu.row_logprobs_backward(work[:, :-1], targets, row_max, log_norm, None, g_logp.reshape(-1).contiguous(), None,
                              1.0, IGNORE, work[:, :-1], config=config)
    assert torch.equal(work[:, -1], base[:, -1]), "in-place backward wrote outside the view"
    assert torch.equal(work[:, :-1], out)


def test_row_kernel_nan_inf_and_masked_rows():
    vocab = 50
    logits = _logits((5, vocab), torch.float32, seed=5)
    logits[0, 7] = math.nan
    logits[1, 3] = math.inf
    logits[2, :40] = -math.inf  # masked entries: probability 0 (entropy NaN, as the Triton kernel and float64 ref)
    targets = torch.tensor([1, 2, 45, IGNORE, 9])
    logp, row_max, log_norm, entropy = emu.row_logprobs_forward(logits, targets, 1.0, IGNORE, True, config=1)
    ref_logp, ref_entropy = ref_token_logprobs(logits.double(), targets)
    assert math.isnan(logp[0]) and math.isnan(logp[1]), "NaN / +inf rows give NaN"
    assert abs(logp[2].item() - ref_logp[2].item()) < 1e-6
    assert math.isnan(entropy[2].item()) == math.isnan(ref_entropy[2].item())
    assert logp[3].item() == 0.0 and entropy[3].item() == 0.0
    assert abs(logp[4].item() - ref_logp[4].item()) < 1e-5, "bad rows stay isolated"


# ----------------------------------------------------------------------------------------------------------------------
# The decoding step
# ----------------------------------------------------------------------------------------------------------------------


def _cuda_sample(logits, greedy, *, config, seed=0, step=0, logprobs="processed", temperature=1.0, top_k=0, top_p=1.0,
                 min_p=0.0):
    batch, vocab = logits.shape
    temp, k, p, log_min_p, seeds, greedy_mask, key_row, truncate = parse_options(
        batch, vocab, logits.device, greedy, temperature, top_k, top_p, min_p, seed, logprobs
    )
    return emu.sample_and_greedy(logits, greedy_mask, temp, k, p, log_min_p, seeds, step, key_row, truncate,
                                 logprobs == "raw", config=config)


@pytest.mark.parametrize("config", [1, 2])
@pytest.mark.parametrize("name", list(SAMPLING_CASES))
def test_sampler_matches_reference_stream(name, config):
    # config 1 (64 bins, 256 candidates) in fp32; config 2 (32 bins, 32 candidates: boundary and fallback searches
    # at this size) in bf16, whose many exact ties exercise the tie rules of top-k / top-p.
    dtype, vocab = {1: (torch.float32, 257), 2: (torch.bfloat16, 1000)}[config]
    batch = 8
    logits = _logits((batch, vocab), dtype, scale=2.0, seed=vocab)
    greedy = torch.tensor([True, False, False, True, False, False, True, False])
    opts = sampling_options(name, batch, vocab, greedy, "cpu")
    seed = torch.arange(batch) * 1_000_003 - 5 if name in ("top_p", "per_row") else 77
    tokens, logprobs = _cuda_sample(logits, greedy, config=config, seed=seed, step=9, **opts)
    check_against_reference(logits, greedy, tokens, logprobs, opts, seed=seed, step=9)


@pytest.mark.parametrize("dtype", DTYPES)
def test_sampler_production_config(dtype):
    # The configuration the GPU runs (512 threads, 1024 bins, 4096 candidates), once per dtype, every option.
    batch, vocab = 4, 1500
    logits = _logits((batch, vocab), dtype, scale=2.0, seed=11)
    greedy = torch.tensor([False, True, False, False])
    opts = sampling_options("per_row", batch, vocab, greedy, "cpu")
    tokens, logprobs = _cuda_sample(logits, greedy, config=0, seed=torch.arange(batch) + 3, step=2, **opts)
    check_against_reference(logits, greedy, tokens, logprobs, opts, seed=torch.arange(batch) + 3, step=2)


def test_sampler_raw_logprobs_same_tokens():
    batch, vocab = 6, 150
    logits = _logits((batch, vocab), torch.float16, scale=2.0, seed=1)
    greedy = torch.tensor([False, True, False, False, True, False])
    opts = dict(temperature=0.7, top_p=0.8)
    tok_p, _ = _cuda_sample(logits, greedy, config=1, seed=5, step=2, **opts)
    tok_r, lp_r = _cuda_sample(logits, greedy, config=1, seed=5, step=2, logprobs="raw", **opts)
    assert torch.equal(tok_p, tok_r), "the log-prob mode must not change the tokens"
    check_against_reference(logits, greedy, tok_r, lp_r, opts, seed=5, step=2, mode="raw")


@pytest.mark.parametrize("truncate", [False, True])
def test_sampler_matches_triton(truncate):
    # Same inputs through sample_and_greedy(backend="triton") (the interpreter, or the GPU) and the CUDA kernel.
    batch, vocab = 10, 300
    logits = _logits((batch, vocab), torch.bfloat16, scale=2.0, seed=7)
    greedy = torch.arange(batch) % 3 == 0
    opts = dict(temperature=0.9, top_k=40, top_p=0.95) if truncate else dict(temperature=0.9)
    dev = _triton_device()
    tok_t, lp_t = sample_and_greedy(logits.to(dev), greedy.to(dev), seed=13, step=4, backend="triton", **opts)
    tok_t, lp_t = tok_t.cpu(), lp_t.cpu()
    tok_c, lp_c = _cuda_sample(logits, greedy, config=1, seed=13, step=4, **opts)
    assert torch.equal(tok_t[greedy], tok_c[greedy])
    z, kept = ref_processed(logits, greedy, **opts)
    _, scores = ref_tokens(logits, greedy, z, kept, seed=13, step=4)
    assert assert_tokens_match(tok_c, tok_t, scores) <= 1
    assert_rel_close(lp_c, lp_t, torch.float32, name="logprobs cuda vs triton")


def test_sampler_threshold_paths():
    # Inputs crafted for each path of the threshold search with config 2 (32 value bins, 32 list entries), checked
    # against the reference, and the coverage counters show the path was taken.
    vocab = 300
    greedy = torch.zeros(2, dtype=torch.bool)

    def run(logits, opts, path):
        emu.coverage()
        tokens, logprobs = _cuda_sample(logits, greedy, config=2, seed=torch.tensor([3, 4]), step=1, **opts)
        cov = emu.coverage()
        check_against_reference(logits, greedy, tokens, logprobs, opts, seed=torch.tensor([3, 4]), step=1)
        assert cov[path] == 2, f"expected both rows on {path}: {cov}"
        return cov

    base = _logits((2, vocab), torch.float32, scale=2.0, seed=21)
    run(base, dict(top_k=5), "threshold_all")  # the 5 largest fit in the list: race over the list, no final pass
    cov = run(base, dict(top_p=0.9), "threshold_boundary")  # ~100 kept: only the threshold bin is gathered
    assert cov["final_pass"] == 2
    run(base, dict(top_k=60, top_p=0.8), "threshold_boundary")
    # 200 copies of the top value: the top-k bin holds more than the list -> key-histogram fallback
    dup = base.clone()
    dup[:, :200] = dup.max() + 1.0
    run(dup, dict(top_k=10), "threshold_fallback")
    run(dup, dict(top_p=0.5), "threshold_fallback")
    run(dup, dict(top_k=150, top_p=0.5, temperature=0.7), "threshold_fallback")
    run(dup, dict(top_k=230, top_p=0.999), "threshold_boundary")  # the k-th value lies below the duplicates
    # values spread over 400 nats: a top-k past the 64-nat value range lands in the shared last bin -> fallback
    wide = torch.linspace(0.0, -400.0, vocab).expand(2, vocab).contiguous()
    run(wide, dict(top_k=250, temperature=3.0), "threshold_fallback")


def test_sampler_truncation_boundaries_and_ties():
    # The hand-built rows of tests/test_sampling.py: thresholds on tied and signed-zero values.
    neg = -math.inf
    logits = torch.tensor([
        [1.0, 0.0, -0.0, -1.0, -2.0, -3.0],
        [0.0, -1.5, -1.5, -1.4, -3.0, -1.6],
        [2.0, 1.0, 1.0, 1.0, 0.0, -1.0],
        [3.0, 2.0, 2.0, 2.0, 1.0, neg],
    ])
    greedy = torch.zeros(4, dtype=torch.bool)
    opts = dict(top_k=torch.tensor([2, 0, 0, 2]), top_p=torch.tensor([1.0, 1.0, 0.5, 1.0]),
                min_p=torch.tensor([0.0, math.exp(-1.5), 0.0, 0.0]))
    for config in (2, 3):
        for step in range(3):
            tokens, logprobs = _cuda_sample(logits, greedy, config=config, seed=torch.arange(4), step=step, **opts)
            check_against_reference(logits, greedy, tokens, logprobs, opts, seed=torch.arange(4), step=step)
    # greedy ties: the lowest index, also across vector and thread boundaries and at the ragged end
    vocab = 37
    row = _logits((4, vocab), torch.float32, seed=4)
    top = row.max() + 1.0
    row[0, [30, 3, 17]] = top
    row[1] = 0.25
    row[2, [35, 36]] = top
    tokens, _ = _cuda_sample(row, torch.ones(4, dtype=torch.bool), config=3, top_k=2, temperature=0.5)
    assert tokens[:3].tolist() == [3, 0, 35]
    assert tokens[3].item() == int(row[3].argmax())


@pytest.mark.parametrize("truncate", [False, True])
def test_sampler_invalid_rows_and_masked_tokens(truncate):
    vocab = 24
    logits = _logits((8, vocab), torch.float32, seed=12)
    logits[0] = -math.inf
    logits[1, 5] = math.nan
    logits[2, 7] = math.inf
    logits[3] = -math.inf
    logits[3, [4, 19]] = torch.tensor([0.3, -0.2])
    logits[4, 1] = -math.inf
    logits[5] = -math.inf
    logits[5, 11] = 2.0
    logits[6] = 1e30  # x / T overflows at T = 1e-10
    greedy = torch.tensor([True, False, True, False, False, True, False, True])
    temperature = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1e-10, 1.0])
    opts = dict(temperature=temperature, top_p=0.9) if truncate else dict(temperature=temperature)
    seeds = torch.arange(8) + 100
    tokens, logprobs = _cuda_sample(logits, greedy, config=3, seed=seeds, **opts)
    invalid = [0, 1, 2, 6]
    assert tokens[invalid].tolist() == [0] * 4 and torch.isnan(logprobs[invalid]).all()
    valid = torch.tensor([3, 4, 5, 7])
    valid_opts = {k: (v[valid] if torch.is_tensor(v) else v) for k, v in opts.items()}
    check_against_reference(logits[valid], greedy[valid], tokens[valid], logprobs[valid], valid_opts,
                            seed=seeds[valid], step=0)
    assert tokens[5].item() == 11 and abs(logprobs[5].item()) < 1e-6


def test_sampler_deterministic_and_per_row_seeds():
    # The gather into shared memory happens in scheduling order; the sort makes the result independent of it, and
    # a row's token depends only on (its seed, step, its logits).
    batch, vocab = 6, 300
    logits = _logits((batch, vocab), torch.bfloat16, scale=2.0, seed=9)
    greedy = torch.tensor([False, False, True, False, False, False])
    opts = dict(temperature=1.1, top_k=50, top_p=0.9)
    seeds = torch.tensor([5, -3, 2**40 + 1, 77, 0, 2**62])
    first = _cuda_sample(logits, greedy, config=2, seed=seeds, step=3, **opts)
    again = _cuda_sample(logits, greedy, config=2, seed=seeds, step=3, **opts)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    perm = torch.tensor([4, 0, 5, 2, 1, 3])
    permuted = _cuda_sample(logits[perm], greedy[perm], config=2, seed=seeds[perm], step=3, **opts)
    assert torch.equal(permuted[0], first[0][perm]) and torch.equal(permuted[1], first[1][perm])


@pytest.mark.parametrize("opts", [dict(temperature=0.8), dict(temperature=1.3, top_k=5, top_p=0.9)])
def test_sampler_chi_square(opts):
    # 600 draws (one emulated block each; an int seed gives every row position its own stream) from one row of 6
    # logits must follow softmax(z) over the kept set, and never leave it. Fixed seed: deterministic; reject at
    # p < 1e-3. (The exact-stream tests above pin every token; this checks the distribution those tokens follow.)
    n, row = 600, torch.tensor([1.0, 0.2, -0.5, 0.7, -1.2, 0.4])
    logits = row.expand(n, row.numel()).contiguous()
    tokens, _ = _cuda_sample(logits, torch.zeros(n, dtype=torch.bool), config=3, seed=2024, **opts)
    z, kept = ref_processed(row[None], torch.zeros(1, dtype=torch.bool), **opts)
    probs = torch.softmax(torch.where(kept, z, -math.inf), 1)[0]
    counts = torch.bincount(tokens, minlength=row.numel())
    assert counts[~kept[0]].sum() == 0, f"tokens outside the kept set: {counts.tolist()}"
    pvalue = chi_square_pvalue(counts, probs)
    assert pvalue >= CHI2_REJECT_P, f"chi-square p-value {pvalue:.2e} < {CHI2_REJECT_P}"


def test_emulated_kernels_have_no_data_races():
    # csrc/emu/race_check.cpp runs every kernel and path under ThreadSanitizer: an access to shared memory not
    # ordered by a barrier against another thread's is reported (a removed __syncthreads in the row kernel's
    # reduction is, when tried). What TSan does not see here, compute-sanitizer racecheck on a GPU does.
    try:
        proc = emu.race_check()
    except RuntimeError as exc:
        if "tsan" in str(exc).lower() or "sanitize" in str(exc).lower():
            pytest.skip(f"ThreadSanitizer unavailable: {str(exc).splitlines()[-1]}")
        raise
    assert "ThreadSanitizer" not in proc.stderr, proc.stderr[-6000:]
    assert proc.returncode == 0 and "every case ran" in proc.stdout, (proc.returncode, proc.stdout, proc.stderr[-2000:])


# ----------------------------------------------------------------------------------------------------------------------
# Logit soft-capping (softcap > 0: the SOFTCAP instantiations)
# ----------------------------------------------------------------------------------------------------------------------

SOFTCAP = 8.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("config", [0, 1, 2])
def test_row_kernel_softcap_matches_reference(config, dtype):
    # |logits| up to 4-5 caps: the cap bends them; values and the gradient w.r.t. the raw logits, in place too.
    n, vocab, temperature = 5, (1003, 1000, 300)[config], 0.8
    logits = _logits((n, vocab), dtype, scale=1.5 * SOFTCAP, seed=config)
    targets = torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(config))
    targets[1] = IGNORE
    g_logp, g_entropy = torch.randn(n), torch.randn(n)
    inv_t = 1.0 / temperature
    for inplace in (False, True):
        logp, row_max, log_norm, entropy = emu.row_logprobs_forward(logits, targets, inv_t, IGNORE, True,
                                                                    config=config, softcap=SOFTCAP)
        work = logits.clone()
        out = work if inplace else torch.full_like(logits, float("nan"))
        grad = emu.row_logprobs_backward(work, targets, row_max, log_norm, entropy, g_logp, g_entropy, inv_t,
                                         IGNORE, out, config=config, softcap=SOFTCAP)
        x = logits.double().requires_grad_(True)
        ref_logp, ref_entropy = ref_token_logprobs(x, targets, temperature=temperature, ignore_index=IGNORE,
                                                   softcap=SOFTCAP)
        ((ref_logp * g_logp.double()).sum() + (ref_entropy * g_entropy.double()).sum()).backward()
        assert_rel_close(logp, ref_logp, torch.float32, name="logp", scale=4.0)
        assert_rel_close(entropy, ref_entropy, torch.float32, name="entropy", scale=4.0)
        assert_rel_close(grad, x.grad, dtype, name=f"grad (inplace={inplace})", scale=4.0)


@pytest.mark.parametrize("name", ["plain", "combined", "per_row"])
def test_sampler_softcap_matches_reference_stream(name):
    from tests.helpers.ref_logprobs import ref_soft_cap

    batch, vocab = 8, 257
    logits = _logits((batch, vocab), torch.float32, scale=1.5 * SOFTCAP, seed=5)
    greedy = torch.tensor([True, False, False, True, False, False, True, False])
    opts = sampling_options(name, batch, vocab, greedy, "cpu")
    temp, k, p, log_min_p, seeds, greedy_mask, key_row, truncate = parse_options(
        batch, vocab, logits.device, greedy, opts.get("temperature", 1.0), opts.get("top_k", 0), opts.get("top_p", 1.0),
        opts.get("min_p", 0.0), 77, "processed")
    tokens, logprobs = emu.sample_and_greedy(logits, greedy_mask, temp, k, p, log_min_p, seeds, 9, key_row, truncate,
                                             False, config=1, softcap=SOFTCAP)
    check_against_reference(ref_soft_cap(logits, SOFTCAP), greedy, tokens, logprobs, opts, seed=77, step=9)
