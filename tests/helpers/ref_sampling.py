"""Float64 references for sample_and_greedy / fused_linear_sample_and_greedy.

Written independently of the package: Philox4x32-10 in numpy uint64 arithmetic (checked against the Random123
known-answer vectors in the tests), the kept set (temperature, top-k, top-p, min-p) by sorting float64 values, and
the Gumbel race in float64 on the same random words. The definitions implemented here are the ones stated in the
docstring of ``remax_kernels/ops/sampling.py``:

* ``z = logits / T`` (greedy rows with ``T == 0`` use ``T = 1``).
* top-k: keep ``z >= `` the k-th largest value (duplicates counted), when ``0 < k < #finite``.
* top-p on the top-k survivors: keep ``v`` iff the survivors' mass with ``z > z_v`` (strictly) is ``< p * total``.
* min-p: keep ``z_v - max(z) >= float32(log(min_p))``.
* noise ``g = -log(-log(((w >> 9) + 0.5) / 2**23))``, ``w`` = word ``v & 3`` of Philox(key=(seed lo, seed hi),
  counter=(v >> 2, row key, step, 0)) (one Philox call per four vocabulary entries); row key = row position for an
  int seed, 0 for a per-row seed tensor.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from tests.helpers import assert_rel_close

_M32 = np.uint64(0xFFFFFFFF)


def ref_philox4x32_10(k0, k1, c0, c1, c2, c3) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Philox4x32-10 (Salmon et al. 2011) on broadcastable arrays of uint32 values; returns the 4 output words."""
    k0, k1, c0, c1, c2, c3 = np.broadcast_arrays(*(np.asarray(a, dtype=np.uint64) for a in (k0, k1, c0, c1, c2, c3)))
    for _ in range(10):
        p0 = c0 * np.uint64(0xD2511F53)  # both factors < 2^32: the uint64 product is exact
        p1 = c2 * np.uint64(0xCD9E8D57)
        c0, c1, c2, c3 = (
            ((p1 >> np.uint64(32)) ^ c1 ^ k0) & _M32,
            p1 & _M32,
            ((p0 >> np.uint64(32)) ^ c3 ^ k1) & _M32,
            p0 & _M32,
        )
        k0 = (k0 + np.uint64(0x9E3779B9)) & _M32
        k1 = (k1 + np.uint64(0xBB67AE85)) & _M32
    return c0, c1, c2, c3


def ref_gumbel(seeds, row_keys, step: int, vocab: int) -> torch.Tensor:
    """float64 Gumbel noise ``[n, vocab]`` for per-row seeds and row keys (sequences of Python ints)."""
    seeds = np.array([int(s) & 0xFFFFFFFFFFFFFFFF for s in seeds], dtype=np.uint64)[:, None]
    row_keys = np.array([int(r) for r in row_keys], dtype=np.uint64)[:, None]
    groups = np.arange((vocab + 3) // 4, dtype=np.uint64)[None, :]
    words = ref_philox4x32_10(seeds & _M32, seeds >> np.uint64(32), groups, row_keys, step, 0)
    # entry v = 4q + j takes word j of group q
    word = np.stack(words, axis=-1).reshape(len(seeds), -1)[:, :vocab]
    u = ((word >> np.uint64(9)).astype(np.float64) + 0.5) / 2.0**23
    return torch.from_numpy(-np.log(-np.log(u)))


def _per_row(value, batch: int, dtype) -> list:
    if isinstance(value, torch.Tensor):
        return [dtype(v) for v in value.tolist()]
    return [dtype(value)] * batch


def ref_processed(logits, greedy_mask, *, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0):
    """Returns ``(z float64 [B, V], kept bool [B, V])``; greedy rows keep every finite entry (no truncation)."""
    batch, vocab = logits.shape
    temps = _per_row(temperature, batch, float)
    ks, ps, min_ps = _per_row(top_k, batch, int), _per_row(top_p, batch, float), _per_row(min_p, batch, float)
    greedy = greedy_mask.tolist()
    x = logits.detach().double().cpu()
    z = torch.stack([x[b] / (temps[b] if temps[b] > 0 else 1.0) for b in range(batch)]) if batch else x
    kept = torch.zeros(batch, vocab, dtype=torch.bool)
    for b in range(batch):
        row = z[b]
        keep = row > -math.inf
        if not greedy[b]:
            finite_vals = torch.sort(row[keep], descending=True).values
            if 0 < ks[b] < finite_vals.numel():
                keep &= row >= finite_vals[ks[b] - 1]
            top = row.max()
            if ps[b] < 1.0:
                mass = torch.where(keep, torch.exp(row - top), torch.zeros_like(row))
                values, inverse = torch.unique(row[keep], sorted=True, return_inverse=True)  # ascending
                mass_per_value = torch.zeros_like(values).index_add_(0, inverse, mass[keep])
                # mass of strictly greater values = suffix sum over the ascending unique values, excluding self
                above = torch.flip(torch.cumsum(torch.flip(mass_per_value, [0]), 0), [0]) - mass_per_value
                keep_kept = above[inverse] < ps[b] * mass.sum()
                new_keep = torch.zeros_like(keep)
                new_keep[keep] = keep_kept
                keep = new_keep
            if min_ps[b] > 0:
                keep &= (row - top) >= float(np.float32(math.log(min_ps[b])))  # the ops compare with fp32 log(min_p)
        kept[b] = keep
    return z, kept


def ref_logprobs(logits, tokens, greedy_mask, z, kept, *, mode: str = "processed") -> torch.Tensor:
    """float64 log-prob of ``tokens`` [B]: under softmax(z) restricted to ``kept`` ("processed") or softmax(logits)."""
    idx = tokens.cpu().long()[:, None]
    if mode == "raw":
        values, kept = logits.detach().double().cpu(), torch.ones_like(kept)
    else:
        values = z
    masked = torch.where(kept, values, torch.full_like(values, -math.inf))
    top = masked.max(1, keepdim=True).values
    # shift by the max first: at |logits| ~ 1e36, z - logsumexp(z) would lose the log(count) term even in float64
    return ((values.gather(1, idx) - top) - torch.log(torch.exp(masked - top).sum(1, keepdim=True)))[:, 0]


def ref_tokens(logits, greedy_mask, z, kept, *, seed=0, step: int = 0):
    """Expected tokens [B] (int64) and the float64 race scores [B, V] (-inf outside the kept set).

    Greedy rows: first index of the maximum logit. Sampled rows: argmax of z + g over the kept set.
    """
    batch, vocab = z.shape
    if isinstance(seed, torch.Tensor):
        seeds, row_keys = seed.tolist(), [0] * batch
    else:
        seeds, row_keys = [seed] * batch, list(range(batch))
    scores = torch.where(kept, z + ref_gumbel(seeds, row_keys, step, vocab), torch.full_like(z, -math.inf))
    greedy = greedy_mask.cpu()
    x = logits.detach().double().cpu()
    tokens = torch.where(greedy, x.argmax(1), scores.argmax(1))
    return tokens, scores


def assert_tokens_match(tokens, expected, scores, *, rtol: float = 1e-5, name: str = "tokens") -> int:
    """tokens == expected, except where the expected winner and the returned token are a float near-tie in
    ``scores`` (float64 race scores or logits): |s[tok] - s[exp]| <= rtol * (1 + |s[exp]|). Returns the number of
    such near-tie rows (callers bound it)."""
    tokens, expected = tokens.cpu(), expected.cpu()
    assert tokens.shape == expected.shape, f"{name}: shape {tuple(tokens.shape)} != {tuple(expected.shape)}"
    diff = (tokens != expected).nonzero().flatten().tolist()
    for b in diff:
        s_tok, s_exp = scores[b, tokens[b]].item(), scores[b, expected[b]].item()
        assert abs(s_tok - s_exp) <= rtol * (1 + abs(s_exp)), (
            f"{name}: row {b}: got {int(tokens[b])} (score {s_tok!r}), expected {int(expected[b])} (score {s_exp!r})"
        )
    return len(diff)


# Sampling-option cases shared by the Triton/torch and the CUDA-emulation tests: scalar options, and "per_row" for
# per-row tensors (built by ``sampling_options``).
SAMPLING_CASES = {
    "plain": dict(),
    "temperature": dict(temperature=0.6),
    "top_k": dict(top_k=7),
    "top_p": dict(top_p=0.75),
    "min_p": dict(min_p=0.08),
    "combined": dict(temperature=1.3, top_k=20, top_p=0.9, min_p=0.02),
    "per_row": None,
}


def sampling_options(name: str, batch: int, vocab: int, greedy: torch.Tensor, device) -> dict:
    """The options of case ``name``; for "per_row", seeded per-row tensors on ``device`` with each option off in
    some row (top_k 0 in row 0, top_p 1 in row 1, min_p 0 in row 2) and T = 0 at the greedy rows."""
    if name != "per_row":
        return dict(SAMPLING_CASES[name])
    g = torch.Generator().manual_seed(batch * 1000 + vocab)
    temperature = torch.rand(batch, generator=g) * 1.5 + 0.3
    temperature[greedy.cpu()] = 0.0  # greedy rows may have T = 0
    top_k = torch.randint(0, vocab + 3, (batch,), generator=g)
    top_k[0] = 0
    top_p = torch.rand(batch, generator=g) * 0.9 + 0.05
    top_p[1] = 1.0
    min_p = torch.rand(batch, generator=g) * 0.2
    min_p[2] = 0.0
    return {k: v.to(device) for k, v in dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p).items()}


def check_against_reference(logits, greedy, tokens, logprobs, opts, *, seed, step, mode: str = "processed"):
    """Every token and log-prob of one sampling call (any backend, any device) against the float64 reference:
    greedy rows exactly the first argmax, sampled rows the reference stream's winner up to one float near-tie, every
    token inside the kept set, log-probs (``mode`` "processed" or "raw") within fp32 tolerance. Returns the
    reference's ``(z, kept)``."""
    vocab = logits.shape[1]
    assert tokens.dtype == torch.int64 and logprobs.dtype == torch.float32
    assert ((tokens >= 0) & (tokens < vocab)).all(), f"tokens out of range [0, {vocab}): {tokens.tolist()}"
    ref_opts = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in opts.items()}
    greedy_cpu = greedy.cpu()
    z, kept = ref_processed(logits.cpu(), greedy_cpu, **ref_opts)
    expected, scores = ref_tokens(logits.cpu(), greedy_cpu, z, kept, seed=seed.cpu() if torch.is_tensor(seed) else seed,
                                  step=step)
    tokens = tokens.cpu()
    assert torch.equal(tokens[greedy_cpu], expected[greedy_cpu]), "greedy rows must be the exact first argmax"
    near_ties = assert_tokens_match(tokens[~greedy_cpu], expected[~greedy_cpu], scores[~greedy_cpu])
    assert near_ties <= 1, f"{near_ties} near-tie mismatches"
    assert kept.gather(1, tokens[:, None]).all(), "a token outside the kept set was returned"
    ref = ref_logprobs(logits.cpu(), tokens, greedy_cpu, z, kept, mode=mode)
    assert_rel_close(logprobs, ref, torch.float32, name=f"logprobs ({mode})")
    return z, kept


def chi_square_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson chi-square goodness of fit over the categories with probs > 0; returns the p-value.

    Categories whose expected count is below 5 are pooled (smallest first) until every bin expects >= 5, the usual
    condition for the chi-square approximation.
    """
    n = counts.sum().double()
    support = (probs > 0).nonzero().flatten()
    order = support[torch.argsort(probs[support])]
    expected = (n * probs[order].double()).tolist()
    observed = counts[order].double().tolist()
    while len(expected) > 1 and expected[0] < 5:
        # Pop first, then add: `expected[1] += expected.pop(0)` would add into the element after the next one (the
        # target's index is taken before the pop shifts the list) and fail once two bins are left.
        smallest_e, smallest_o = expected.pop(0), observed.pop(0)
        expected[0] += smallest_e
        observed[0] += smallest_o
        order_pairs = sorted(zip(expected, observed, strict=True))
        expected, observed = [e for e, _ in order_pairs], [o for _, o in order_pairs]
    assert len(expected) >= 2, "test design: need at least two bins"
    exp_t, obs_t = torch.tensor(expected, dtype=torch.float64), torch.tensor(observed, dtype=torch.float64)
    stat = ((obs_t - exp_t) ** 2 / exp_t).sum()
    dof = torch.tensor(float(len(expected) - 1), dtype=torch.float64)
    return torch.special.gammaincc(dof / 2, stat / 2).item()
