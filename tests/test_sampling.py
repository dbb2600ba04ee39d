"""Tests for sample_and_greedy and fused_linear_sample_and_greedy.

Two complementary kinds of checks:

1. Exact-stream checks (few rows, every option, every dtype, both backends): both backends draw from a documented
   Philox stream, so the float64 reference (tests/helpers/ref_sampling.py, an independent numpy Philox + a sort-based
   kept set) predicts every sampled token: the op must return the reference's Gumbel-race winner (allowing only
   float near-ties, |score gap| <= 1e-5 relative, at most one per call) and the float64 log-prob of that token.
   Greedy rows must equal the float64 argmax exactly (lowest index on ties). This pins the truncated set, the tie
   rules and the noise exactly.
2. Chi-square goodness of fit: draws from many rows with the same logits (int seed: each row position is its own
   stream) must follow softmax(logits / T) restricted to the kept set, and never leave it. Reject at p < 1e-3;
   seeds are fixed, so each outcome is deterministic. The Triton interpreter costs ~20 ms per row, so the large
   draw counts run on the torch backend (the same stream) and the interpreter gets a smaller sample; the large
   Triton sample is a CUDA test.
"""

from __future__ import annotations

import math

import pytest
import torch

from remax_kernels import fused_linear_sample_and_greedy, sample_and_greedy
from remax_kernels.ops.sampling import _gumbel_noise_torch, _philox4x32_torch
from tests.helpers import assert_rel_close
from tests.helpers.ref_sampling import (
    SAMPLING_CASES,
    assert_tokens_match,
    check_against_reference,
    chi_square_pvalue,
    ref_gumbel,
    ref_logprobs,
    ref_philox4x32_10,
    ref_processed,
    ref_tokens,
    sampling_options,
)

BACKENDS = ["triton", "torch"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
CHI2_REJECT_P = 1e-3

def _logits(batch, vocab, dtype, device, scale=2.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, vocab, generator=g) * scale).to(dtype).to(device)


def _draws_fit(backend, device, logits_row, opts, n_draws, *, step=0):
    """n_draws rows with the same logits (int seed: one stream per row position), chi-square against the reference."""
    vocab = logits_row.numel()
    logits = logits_row.to(device).expand(n_draws, vocab).contiguous()
    greedy = torch.zeros(n_draws, dtype=torch.bool, device=device)
    tokens, _ = sample_and_greedy(logits, greedy, seed=2024, step=step, backend=backend, **opts)
    z, kept = ref_processed(logits_row[None].cpu(), torch.zeros(1, dtype=torch.bool), **opts)
    probs = torch.softmax(torch.where(kept, z, -math.inf), 1)[0]
    counts = torch.bincount(tokens.cpu(), minlength=vocab)
    assert counts[~kept[0]].sum() == 0, f"tokens outside the kept set: {counts.tolist()} kept {kept[0].tolist()}"
    return chi_square_pvalue(counts, probs), probs


# ----------------------------------------------------------------------------------------------------------------------
# The random stream
# ----------------------------------------------------------------------------------------------------------------------


def test_philox_reference_known_answers_and_torch_stream():
    # Random123's published Philox4x32-10 known-answer vectors pin the reference generator...
    kat = [
        ((0, 0), (0, 0, 0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 2, (0xFFFFFFFF,) * 4, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        ((0xA4093822, 0x299F31D0), (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
         (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
    ]
    for key, counter, words in kat:
        assert tuple(int(w) for w in ref_philox4x32_10(*key, *counter)) == words
    # ...and the torch path's int64 implementation (the kernels' stream on CPU) must agree with it, all four words.
    g = torch.Generator().manual_seed(3)
    args = [torch.randint(0, 2**32, (257,), generator=g, dtype=torch.int64) for _ in range(6)]
    for ours, ref in zip(_philox4x32_torch(*args), ref_philox4x32_10(*(a.numpy() for a in args)), strict=True):
        assert torch.equal(ours, torch.from_numpy(ref.astype("int64")))


def test_stream_uses_all_four_philox_words():
    # Entry v = 4q + j takes word j of the Philox call with counter q: the torch stream over any vocabulary window
    # (offsets that do not start a group of four included) equals the float64 reference's.
    seeds = torch.tensor([5, -3, 2**40 + 1], dtype=torch.int64)
    row_keys = torch.tensor([0, 1, 7])
    ref = ref_gumbel(seeds.tolist(), row_keys.tolist(), 11, 23)
    for v0, v1 in [(0, 23), (5, 23), (6, 7), (3, 16)]:
        ours = _gumbel_noise_torch(seeds, row_keys, 11, v0, v1)
        assert torch.allclose(ours.double(), ref[:, v0:v1], rtol=1e-5, atol=1e-5), (v0, v1)
    # the four entries of a group are four different words, not one word repeated
    assert len(set(ref[0, :4].tolist())) == 4


# ----------------------------------------------------------------------------------------------------------------------
# Exact-stream checks
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("config", list(SAMPLING_CASES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_reference_stream(backend, config, dtype, device):
    # bf16 logits at this scale carry many exact ties: the value-based tie rules of top-k / top-p get exercised.
    vocab = {torch.float32: 257, torch.float16: 100, torch.bfloat16: 1000}[dtype]
    batch = 8
    logits = _logits(batch, vocab, dtype, device, seed=vocab)
    greedy = torch.tensor([True, False, False, True, False, False, True, False], device=device)
    opts = sampling_options(config, batch, vocab, greedy, device)
    seed = torch.arange(batch, device=device) * 1_000_003 - 5 if config in ("top_p", "per_row") else 77
    tokens, logprobs = sample_and_greedy(logits, greedy, seed=seed, step=9, backend=backend, **opts)
    check_against_reference(logits, greedy, tokens, logprobs, opts, seed=seed, step=9)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_raw_logprobs_same_tokens(backend, dtype, device):
    batch, vocab = 6, 150
    logits = _logits(batch, vocab, dtype, device, seed=1)
    greedy = torch.tensor([False, True, False, False, True, False], device=device)
    opts = dict(temperature=0.7, top_p=0.8)
    tok_p, _ = sample_and_greedy(logits, greedy, seed=5, step=2, backend=backend, **opts)
    tok_r, lp_r = sample_and_greedy(logits, greedy, seed=5, step=2, logprobs="raw", backend=backend, **opts)
    assert torch.equal(tok_p, tok_r), "the log-prob mode must not change the tokens"
    check_against_reference(logits, greedy, tok_r, lp_r, opts, seed=5, step=2, mode="raw")


@pytest.mark.parametrize("backend", BACKENDS)
def test_multiblock_vocab(backend, device):
    # V > 4096 = the interpreter's block: the online max / lse / race and the threshold search cross blocks, and a
    # greedy tie spans two blocks.
    batch, vocab = 3, 5000
    logits = _logits(batch, vocab, torch.float32, device, seed=2)
    logits[0, 4500] = logits[0, 10] = logits[0].max() + 1.0
    greedy = torch.tensor([True, False, False], device=device)
    opts = dict(top_k=torch.tensor([0, 50, 3000], device=device), top_p=torch.tensor([1.0, 0.9, 0.5], device=device))
    tokens, logprobs = sample_and_greedy(logits, greedy, seed=3, step=1, backend=backend, **opts)
    assert tokens[0].item() == 10
    check_against_reference(logits, greedy, tokens, logprobs, opts, seed=3, step=1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_truncation_boundaries(backend, device):
    # Hand-built rows whose truncation boundary falls exactly on tied or signed-zero values; the kept set shows
    # in the log-prob normalizer, so a wrong set fails the log-prob check even when the token is right.
    neg = -math.inf
    logits = torch.tensor([
        [1.0, 0.0, -0.0, -1.0, -2.0, -3.0],  # top_k=2: +0 and -0 tie for 2nd place -> 3 kept
        [0.0, -1.5, -1.5, -1.4, -3.0, -1.6],  # min_p=exp(-1.5): z - max == log(min_p) exactly -> kept
        [2.0, 1.0, 1.0, 1.0, 0.0, -1.0],  # top_p=0.5: the 3 tied 1.0s all kept (mass above them < p)
        [3.0, 2.0, 2.0, 2.0, 1.0, neg],  # top_k=2: ties with the 2nd value kept -> 4 kept
    ], device=device)
    greedy = torch.zeros(4, dtype=torch.bool, device=device)
    opts = dict(
        top_k=torch.tensor([2, 0, 0, 2], device=device),
        top_p=torch.tensor([1.0, 1.0, 0.5, 1.0], device=device),
        min_p=torch.tensor([0.0, math.exp(-1.5), 0.0, 0.0], device=device),
    )
    _, kept = ref_processed(logits.cpu(), greedy.cpu(), **{k: v.cpu() for k, v in opts.items()})
    assert kept.tolist() == [
        [True, True, True, False, False, False],
        [True, True, True, True, False, False],
        [True, True, True, True, False, False],
        [True, True, True, True, False, False],
    ]
    seeds = torch.arange(4, device=device)
    for step in range(3):
        tokens, logprobs = sample_and_greedy(logits, greedy, seed=seeds, step=step, backend=backend, **opts)
        check_against_reference(logits, greedy, tokens, logprobs, opts, seed=seeds, step=step)


# ----------------------------------------------------------------------------------------------------------------------
# Greedy rows
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_greedy_ties_lowest_index(backend, dtype, device):
    vocab = 37
    logits = _logits(6, vocab, torch.float32, device, seed=4)
    top = logits.max() + 1.0
    logits[0, [30, 3, 17]] = top  # ties: lowest index wins
    logits[1] = 0.25  # a constant row
    logits[2, [35, 36]] = top  # tie at the ragged end
    logits = logits.to(dtype)
    greedy = torch.tensor([True, True, True, False, True, False], device=device)
    tokens, logprobs = sample_and_greedy(logits, greedy, temperature=0.5, top_k=2, seed=1, backend=backend)
    assert tokens[[0, 1, 2]].tolist() == [3, 0, 35]
    assert tokens[4].item() == int(logits[4].float().argmax())
    check_against_reference(logits, greedy, tokens, logprobs, dict(temperature=0.5, top_k=2), seed=1, step=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_greedy_is_not_top_k_1_sampling(backend, device):
    # mstar #254: top_k=1 keeps every value tied with the max, so it samples among the ties; greedy must not.
    n, vocab = 48, 16
    row = _logits(1, vocab, torch.float32, device, seed=5)[0]
    row[[2, 9, 13]] = row.max() + 1.0
    logits = row.expand(n, vocab).contiguous()
    sampled, _ = sample_and_greedy(logits, torch.zeros(n, dtype=torch.bool, device=device), top_k=1, seed=8,
                                   backend=backend)
    greedy, _ = sample_and_greedy(logits, torch.ones(n, dtype=torch.bool, device=device), seed=8, backend=backend)
    assert set(sampled.tolist()) == {2, 9, 13}
    assert set(greedy.tolist()) == {2}


@pytest.mark.parametrize("backend", BACKENDS)
def test_greedy_rows_with_zero_temperature(backend, device):
    batch, vocab = 4, 64
    logits = _logits(batch, vocab, torch.float32, device, seed=6)
    greedy = torch.tensor([True, False, True, False], device=device)
    temperature = torch.tensor([0.0, 0.8, 0.5, 1.2], device=device)
    tokens, logprobs = sample_and_greedy(logits, greedy, temperature=temperature, seed=2, backend=backend)
    check_against_reference(logits, greedy, tokens, logprobs, dict(temperature=temperature), seed=2, step=0)
    # T == 0 greedy rows report the raw softmax log-prob (T = 1), T > 0 greedy rows log_softmax(logits / T).
    ref = torch.log_softmax(logits.double().cpu(), 1)[0, tokens[0].item()]
    assert abs(logprobs[0].item() - ref.item()) < 1e-5
    ref = torch.log_softmax(logits.double().cpu() / 0.5, 1)[2, tokens[2].item()]
    assert abs(logprobs[2].item() - ref.item()) < 1e-5


def test_backends_agree(device):
    batch, vocab = 10, 300
    logits = _logits(batch, vocab, torch.bfloat16, device, seed=7)
    greedy = torch.arange(batch, device=device) % 3 == 0
    opts = dict(temperature=0.9, top_k=40, top_p=0.95)
    tok_t, lp_t = sample_and_greedy(logits, greedy, seed=13, step=4, backend="triton", **opts)
    tok_c, lp_c = sample_and_greedy(logits, greedy, seed=13, step=4, backend="torch", **opts)
    assert torch.equal(tok_t[greedy], tok_c[greedy]), "greedy rows must be identical across backends"
    z, kept = ref_processed(logits.cpu(), greedy.cpu(), **opts)
    _, scores = ref_tokens(logits.cpu(), greedy.cpu(), z, kept, seed=13, step=4)
    assert assert_tokens_match(tok_t.cpu(), tok_c.cpu(), scores) <= 1
    assert_rel_close(lp_t, lp_c, torch.float32, name="logprobs triton vs torch")


# ----------------------------------------------------------------------------------------------------------------------
# Distribution (chi-square)
# ----------------------------------------------------------------------------------------------------------------------

CHI2_CONFIGS = {
    "plain": dict(),
    "temperature": dict(temperature=0.6),
    "top_k": dict(top_k=4),
    "top_p": dict(top_p=0.7),
    "min_p": dict(min_p=0.15),
    "combined": dict(temperature=1.3, top_k=6, top_p=0.85, min_p=0.05),
}


def _chi2_row(vocab: int = 10) -> torch.Tensor:
    return _logits(1, vocab, torch.float32, "cpu", scale=1.0, seed=11)[0]


@pytest.mark.parametrize("config", list(CHI2_CONFIGS))
def test_distribution_chi_square_torch_backend(config, device):
    pvalue, _ = _draws_fit("torch", device, _chi2_row(), CHI2_CONFIGS[config], 20000)
    assert pvalue >= CHI2_REJECT_P, f"chi-square p-value {pvalue:.2e} < {CHI2_REJECT_P}"


def test_distribution_ties_at_the_top_k_boundary(device):
    # The 3rd and 4th largest values tie: top_k=3 keeps both (4 tokens), with probabilities softmax over the four.
    row = torch.tensor([2.0, 0.5, 1.0, 1.0, -1.0, 1.5, 0.0, -0.5])
    pvalue, probs = _draws_fit("torch", device, row, dict(top_k=3), 20000)
    assert (probs > 0).sum() == 4
    assert pvalue >= CHI2_REJECT_P, f"chi-square p-value {pvalue:.2e}"


@pytest.mark.parametrize("config", ["temperature", "combined"])
def test_distribution_chi_square_triton(config, device):
    # ~20 ms per row under the interpreter: a small sample here, the large one is the CUDA test below.
    n = 20000 if device.type == "cuda" else 240
    pvalue, _ = _draws_fit("triton", device, _chi2_row(8), CHI2_CONFIGS[config], n)
    assert pvalue >= CHI2_REJECT_P, f"chi-square p-value {pvalue:.2e} < {CHI2_REJECT_P}"


@pytest.mark.cuda
@pytest.mark.parametrize("config", list(CHI2_CONFIGS))
def test_distribution_chi_square_triton_large(config, device):
    for step in range(3):
        pvalue, _ = _draws_fit("triton", device, _chi2_row(), CHI2_CONFIGS[config], 200000, step=step)
        assert pvalue >= CHI2_REJECT_P, f"step {step}: chi-square p-value {pvalue:.2e}"


# ----------------------------------------------------------------------------------------------------------------------
# Reproducibility
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_reproducible_and_independent_of_batch_composition(backend, device):
    batch, vocab = 6, 40
    logits = _logits(batch, vocab, torch.float16, device, scale=0.5, seed=9)
    greedy = torch.tensor([False, False, True, False, False, False], device=device)
    opts = dict(temperature=1.1, top_p=0.95)
    seeds = torch.tensor([5, -3, 2**40 + 1, 77, 0, 2**62], device=device)
    tokens, logprobs = sample_and_greedy(logits, greedy, seed=seeds, step=3, backend=backend, **opts)
    again, again_lp = sample_and_greedy(logits, greedy, seed=seeds, step=3, backend=backend, **opts)
    assert torch.equal(tokens, again) and torch.equal(logprobs, again_lp), "same inputs, same seed: same outputs"

    # Per-row seeds: permute the rows and add others; each original row keeps its token and log-prob.
    perm = torch.tensor([4, 0, 5, 2, 1, 3], device=device)
    extra = _logits(3, vocab, torch.float16, device, scale=0.5, seed=10)
    mixed_logits = torch.cat([extra[:1], logits[perm], extra[1:]])
    mixed_greedy = torch.cat([greedy.new_zeros(1), greedy[perm], greedy.new_zeros(2)])
    mixed_seeds = torch.cat([seeds.new_tensor([123]), seeds[perm], seeds.new_tensor([5, 9])])
    mixed, mixed_lp = sample_and_greedy(mixed_logits, mixed_greedy, seed=mixed_seeds, step=3, backend=backend, **opts)
    assert torch.equal(mixed[1:7], tokens[perm])
    assert torch.equal(mixed_lp[1:7], logprobs[perm])

    # An int seed keys the stream on the row position: a row keeps its token when the OTHER rows change.
    base, _ = sample_and_greedy(logits, greedy, seed=31, step=3, backend=backend, **opts)
    changed = logits.clone()
    changed[[0, 5]] = extra[:2]
    other, _ = sample_and_greedy(changed, greedy, seed=31, step=3, backend=backend, **opts)
    assert torch.equal(base[1:5], other[1:5])

    # A new step or seed redraws: flat logits over 40 tokens, 5 sampled rows -> some token changes.
    flat = torch.zeros(batch, vocab, device=device)
    draws = [sample_and_greedy(flat, greedy, seed=s, step=t, backend=backend)[0] for s, t in [(1, 0), (1, 1), (2, 0)]]
    assert not torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_inputs(backend, device):
    # logits as the [:, -1, :] view of [B, T, V] and per-row options as strided views: same as contiguous copies.
    batch, vocab = 5, 50
    logits = _logits(batch * 3, vocab, torch.float32, device, seed=14).view(batch, 3, vocab)[:, -1, :]
    greedy = torch.tensor([True, False, False, True, True, False, False, False, True, True], device=device)[::2]
    g = torch.Generator().manual_seed(15)
    temperature = (torch.rand(2 * batch, generator=g) + 0.5).to(device)[::2]
    top_p = (torch.rand(2 * batch, generator=g) * 0.5 + 0.5).to(device)[::2]
    seeds = torch.arange(2 * batch, device=device)[::2] * 31
    assert not logits.is_contiguous() and not temperature.is_contiguous()
    strided = sample_and_greedy(logits, greedy, temperature=temperature, top_p=top_p, seed=seeds, backend=backend)
    dense = sample_and_greedy(logits.contiguous(), greedy.contiguous(), temperature=temperature.contiguous(),
                              top_p=top_p.contiguous(), seed=seeds.contiguous(), backend=backend)
    assert torch.equal(strided[0], dense[0]) and torch.equal(strided[1], dense[1])
    check_against_reference(logits, greedy, strided[0], strided[1], dict(temperature=temperature, top_p=top_p),
                             seed=seeds, step=0)


# ----------------------------------------------------------------------------------------------------------------------
# Invalid and edge rows
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")  # numpy, on the NaN/inf rows (interpreter)
@pytest.mark.parametrize("truncate", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
def test_invalid_rows_and_masked_tokens(backend, truncate, device):
    vocab = 24
    logits = _logits(8, vocab, torch.float32, device, seed=12)
    logits[0] = -math.inf  # all masked
    logits[1, 5] = math.nan
    logits[2, 7] = math.inf
    logits[3] = -math.inf  # only tokens 4 and 19 allowed
    logits[3, [4, 19]] = torch.tensor([0.3, -0.2], device=device)
    logits[4, 1] = -math.inf
    logits[5] = -math.inf
    logits[5, 11] = 2.0  # a single finite token: greedy and sampled rows must both pick it
    logits[6] = 1e30  # finite logits whose x / T overflows fp32 at T = 1e-10
    greedy = torch.tensor([True, False, True, False, False, True, False, True], device=device)
    temperature = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1e-10, 1.0], device=device)
    opts = dict(temperature=temperature, top_p=0.9) if truncate else dict(temperature=temperature)
    seeds = torch.arange(8, device=device) + 100  # per-row seeds: the valid rows can be checked after slicing
    tokens, logprobs = sample_and_greedy(logits, greedy, seed=seeds, backend=backend, **opts)
    invalid = [0, 1, 2, 6]
    assert tokens[invalid].tolist() == [0] * 4
    assert torch.isnan(logprobs[invalid]).all()
    valid = torch.tensor([3, 4, 5, 7], device=device)
    valid_opts = {k: (v[valid] if torch.is_tensor(v) else v) for k, v in opts.items()}
    check_against_reference(logits[valid], greedy[valid], tokens[valid], logprobs[valid], valid_opts,
                             seed=seeds[valid], step=0)
    assert tokens[5].item() == 11 and abs(logprobs[5].item()) < 1e-6

    # Masked (-inf) tokens are never drawn: 64 draws from row 3 stay in {4, 19}.
    rows = logits[3].expand(64, vocab).contiguous()
    draws, draw_lp = sample_and_greedy(rows, torch.zeros(64, dtype=torch.bool, device=device), seed=6,
                                       backend=backend, **({"top_k": 5} if truncate else {}))
    assert set(draws.tolist()) == {4, 19}
    assert torch.isfinite(draw_lp).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch_and_single_token_vocab(backend, device):
    tokens, logprobs = sample_and_greedy(torch.empty(0, 5, device=device), torch.empty(0, dtype=torch.bool,
                                                                                      device=device), backend=backend)
    assert tokens.shape == (0,) and logprobs.shape == (0,)
    tokens, logprobs = sample_and_greedy(torch.randn(3, 1, device=device), torch.tensor([True, False, False],
                                                                                       device=device),
                                         top_p=0.5, seed=1, backend=backend)
    assert tokens.tolist() == [0, 0, 0] and logprobs.abs().max().item() == 0.0


# ----------------------------------------------------------------------------------------------------------------------
# fused_linear_sample_and_greedy
# ----------------------------------------------------------------------------------------------------------------------


def _fused_inputs(batch, hidden_size, vocab, dtype, device, with_bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, hidden_size, generator=g).to(dtype).to(device)
    weight = (torch.randn(vocab, hidden_size, generator=g) * hidden_size**-0.5 * 2).to(dtype).to(device)
    bias = (torch.randn(vocab, generator=g) * 0.5).to(dtype).to(device) if with_bias else None
    return hidden, weight, bias


def _check_fused(hidden, weight, bias, greedy, *, temperature, seed, step, backend, mode):
    tokens, logprobs = fused_linear_sample_and_greedy(hidden, weight, greedy, bias=bias, temperature=temperature,
                                                      seed=seed, step=step, logprobs=mode, backend=backend)
    vocab = weight.shape[0]
    assert ((tokens >= 0) & (tokens < vocab)).all()
    logits64 = hidden.double() @ weight.double().T + (bias.double() if bias is not None else 0.0)
    # 1) the same tokens as sample_and_greedy on the materialized fp32 logits (same stream), up to near-ties
    logits32 = hidden.float() @ weight.float().T + (bias.float() if bias is not None else 0.0)
    materialized, _ = sample_and_greedy(logits32, greedy, temperature=temperature, seed=seed, step=step,
                                        backend=backend)
    greedy_cpu = greedy.cpu()
    opts = dict(temperature=temperature.cpu() if torch.is_tensor(temperature) else temperature)
    z, kept = ref_processed(logits64.cpu(), greedy_cpu, **opts)
    expected, scores = ref_tokens(logits64.cpu(), greedy_cpu, z, kept,
                                  seed=seed.cpu() if torch.is_tensor(seed) else seed, step=step)
    scores = torch.where(greedy_cpu[:, None], logits64.cpu(), scores)  # greedy rows: near-ties of the logits
    assert assert_tokens_match(tokens.cpu(), materialized.cpu(), scores, name="fused vs materialized") <= 1
    # 2) greedy rows = argmax of the float64 logits, sampled rows = the float64 reference race
    assert assert_tokens_match(tokens.cpu(), expected, scores, name="fused vs float64 reference") <= 1
    ref = ref_logprobs(logits64.cpu(), tokens.cpu(), greedy_cpu, z, kept, mode=mode)
    assert_rel_close(logprobs, ref, torch.float32, name=f"fused logprobs ({mode})", scale=3.0)


@pytest.mark.parametrize("mode", ["processed", "raw"])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_matches_materialized(backend, dtype, with_bias, mode, device):
    # Ragged sizes: 20 rows (block 16), H = 40 (block 32), V = 333 (blocks of 64, several splits).
    batch, hidden_size, vocab = 20, 40, 333
    hidden, weight, bias = _fused_inputs(batch, hidden_size, vocab, dtype, device, with_bias)
    greedy = torch.arange(batch, device=device) % 4 == 1
    temperature = torch.rand(batch, generator=torch.Generator().manual_seed(1)).to(device) + 0.4
    temperature[greedy & (torch.arange(batch, device=device) % 8 == 1)] = 0.0
    seed = 99 if mode == "processed" else torch.arange(batch, device=device) + 2**33
    _check_fused(hidden, weight, bias, greedy, temperature=temperature, seed=seed, step=6, backend=backend, mode=mode)


@pytest.mark.cuda
@pytest.mark.parametrize("batch,vocab,hidden_size", [(8, 32000, 512), (64, 151936, 1024)])
def test_fused_bf16_cuda(batch, vocab, hidden_size, device):
    hidden, weight, bias = _fused_inputs(batch, hidden_size, vocab, torch.bfloat16, device, True)
    greedy = torch.arange(batch, device=device) % 2 == 0
    _check_fused(hidden, weight, bias, greedy, temperature=0.8, seed=5, step=1, backend="triton", mode="processed")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_large_vocab_cuda(dtype, device):
    batch, vocab = 16, 151936
    logits = _logits(batch, vocab, dtype, device, scale=3.0, seed=3)
    greedy = torch.arange(batch, device=device) % 4 == 0
    opts = sampling_options("per_row", batch, vocab, greedy, device)
    tokens, logprobs = sample_and_greedy(logits, greedy, seed=21, step=100, **opts)
    check_against_reference(logits, greedy, tokens, logprobs, opts, seed=21, step=100)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_invalid_rows(backend, device):
    hidden, weight, _ = _fused_inputs(3, 16, 40, torch.float32, device, False, seed=3)
    hidden[1, 2] = math.nan
    tokens, logprobs = fused_linear_sample_and_greedy(hidden, weight, torch.tensor([True, True, False], device=device),
                                                      seed=1, backend=backend)
    assert tokens[1].item() == 0 and math.isnan(logprobs[1].item())
    assert torch.isfinite(logprobs[[0, 2]]).all()


# ----------------------------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------------------------


def _bad_sample_cases(device):
    logits = torch.randn(4, 10, device=device)
    greedy = torch.tensor([True, False, False, True], device=device)
    row = lambda *v, dtype=torch.float32: torch.tensor(v, dtype=dtype, device=device)
    return [
        (dict(logits=logits.long()), TypeError, "logits"),
        (dict(logits=logits[0]), ValueError, "logits"),
        (dict(logits=torch.randn(10, 4, device=device).T), ValueError, "logits"),
        (dict(logits=torch.randn(4, 0, device=device)), ValueError, "logits"),
        (dict(greedy_mask=greedy.long()), TypeError, "greedy_mask"),
        (dict(greedy_mask=greedy[:3]), ValueError, "greedy_mask"),
        (dict(temperature=0.0), ValueError, "temperature"),
        (dict(temperature=-1.0), ValueError, "temperature"),
        (dict(temperature=math.nan), ValueError, "temperature"),
        (dict(temperature=math.inf), ValueError, "temperature"),
        (dict(temperature=row(1.0, 0.0, 1.0, 1.0)), ValueError, "temperature"),  # 0 at a sampled row
        (dict(temperature=row(1.0, math.nan, 1.0, 1.0)), ValueError, "temperature"),
        (dict(temperature=row(1.0, 1.0, 1.0)), ValueError, "temperature"),
        (dict(temperature=row(1, 1, 1, 1, dtype=torch.int64)), TypeError, "temperature"),
        (dict(temperature="hot"), TypeError, "temperature"),
        (dict(temperature=1e-50), ValueError, "temperature"),  # positive, but 0 in fp32
        (dict(top_k=-1), ValueError, "top_k"),
        (dict(top_k=2.5), TypeError, "top_k"),
        (dict(top_k=row(1, -2, 0, 3, dtype=torch.int64)), ValueError, "top_k"),
        (dict(top_k=row(1.0, 2.0, 0.0, 3.0)), TypeError, "top_k"),
        (dict(top_p=0.0), ValueError, "top_p"),
        (dict(top_p=1.5), ValueError, "top_p"),
        (dict(top_p=row(0.5, 0.0, 1.0, 1.0)), ValueError, "top_p"),
        (dict(top_p=row(0.5, 0.5)), ValueError, "top_p"),
        (dict(min_p=1.0), ValueError, "min_p"),
        (dict(min_p=-0.1), ValueError, "min_p"),
        (dict(min_p=row(0.1, 1.0, 0.0, 0.0)), ValueError, "min_p"),
        (dict(seed=1.5), TypeError, "seed"),
        (dict(seed=True), TypeError, "seed"),
        (dict(seed=2**64), ValueError, "seed"),
        (dict(seed=row(1.0, 2.0, 3.0, 4.0)), TypeError, "seed"),
        (dict(seed=row(1, 2, dtype=torch.int64)), ValueError, "seed"),
        (dict(step=-1), ValueError, "step"),
        (dict(step=2**32), ValueError, "step"),
        (dict(step=1.0), TypeError, "step"),
        (dict(logprobs="log"), ValueError, "logprobs"),
        (dict(backend="gpu"), ValueError, "backend"),
    ]


@pytest.mark.parametrize("case", range(37))
def test_bad_input_sample_and_greedy(case, device):
    cases = _bad_sample_cases(device)
    assert len(cases) == 37
    overrides, exc, name = cases[case]
    kwargs = dict(logits=torch.randn(4, 10, device=device), greedy_mask=torch.tensor([True, False, False, True],
                                                                                      device=device))
    kwargs.update(overrides)
    logits, greedy = kwargs.pop("logits"), kwargs.pop("greedy_mask")
    with pytest.raises(exc, match=name):
        sample_and_greedy(logits, greedy, **kwargs)


def test_cuda_backend_needs_cuda_tensors_and_the_extension():
    # backend="cuda" runs csrc/sampling.cuh (tests/test_cuda_emu.py runs it on the CPU, tests/test_cuda_kernels.py on
    # a GPU); here only what it refuses: CPU tensors, and the fused op, which has no CUDA kernel.
    logits, greedy = torch.randn(2, 10), torch.tensor([True, False])
    with pytest.raises(RuntimeError, match="backend='cuda'.*cpu"):
        sample_and_greedy(logits, greedy, backend="cuda")
    with pytest.raises(RuntimeError, match="no CUDA kernel"):
        fused_linear_sample_and_greedy(torch.randn(2, 4), torch.randn(10, 4), greedy, backend="cuda")


@pytest.mark.parametrize("backend", BACKENDS)
def test_huge_per_row_top_k_means_no_truncation(backend, device):
    logits = _logits(3, 30, torch.float32, device, seed=16)
    greedy = torch.zeros(3, dtype=torch.bool, device=device)
    top_k = torch.tensor([2**40, 0, 30], device=device)  # > int32: must not wrap around
    a = sample_and_greedy(logits, greedy, top_k=top_k, seed=torch.arange(3, device=device), backend=backend)
    b = sample_and_greedy(logits, greedy, seed=torch.arange(3, device=device), backend=backend)
    assert torch.equal(a[0], b[0])
    assert_rel_close(a[1], b[1], torch.float32)


def test_zero_temperature_allowed_when_all_greedy(device):
    logits = torch.randn(3, 10, device=device)
    tokens, _ = sample_and_greedy(logits, torch.ones(3, dtype=torch.bool, device=device), temperature=0.0)
    assert torch.equal(tokens, logits.argmax(1))


def test_bad_input_fused(device):
    hidden = torch.randn(4, 8, device=device)
    weight = torch.randn(20, 8, device=device)
    greedy = torch.zeros(4, dtype=torch.bool, device=device)
    cases = [
        (dict(hidden=hidden.long()), TypeError, "hidden"),
        (dict(hidden=hidden[None]), ValueError, "hidden"),
        (dict(weight=torch.randn(20, 7, device=device)), ValueError, "weight"),
        (dict(weight=weight.half()), TypeError, "weight"),
        (dict(weight=torch.randn(8, 20, device=device).T), ValueError, "weight"),
        (dict(bias=torch.randn(19, device=device)), ValueError, "bias"),
        (dict(bias=torch.ones(20, dtype=torch.long, device=device)), TypeError, "bias"),
        (dict(greedy_mask=greedy[:2]), ValueError, "greedy_mask"),
        (dict(temperature=0.0), ValueError, "temperature"),
        (dict(seed="x"), TypeError, "seed"),
        (dict(logprobs="processed_raw"), ValueError, "logprobs"),
    ]
    for overrides, exc, name in cases:
        kwargs = dict(hidden=hidden, weight=weight, greedy_mask=greedy)
        kwargs.update(overrides)
        h, w, g = kwargs.pop("hidden"), kwargs.pop("weight"), kwargs.pop("greedy_mask")
        with pytest.raises(exc, match=name):
            fused_linear_sample_and_greedy(h, w, g, **kwargs)
