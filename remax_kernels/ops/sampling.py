"""One decode step for ReMax rollouts: a sampled token for some rows and a greedy token for the others, in one call.

``sample_and_greedy`` works on logits ``[B, V]``; ``fused_linear_sample_and_greedy`` starts from the last hidden
states ``[B, H]`` and the lm-head ``[V, H]`` and never materializes the logits.

Definitions (both ops, both backends)
-------------------------------------
With ``x`` the row's logits (upcast to fp32; with ``softcap=c``, soft-capped first: ``x = c * tanh(logits / c)``,
``-inf`` kept, as Gemma-2/3's ``final_logit_softcapping`` applies it to the lm-head output) and ``z = x / T`` (fp32
division; greedy rows with ``T == 0`` use ``T = 1`` here):

* greedy rows: ``token = argmax(x)``, ties to the LOWEST index. A true argmax, never "top-k = 1 sampling".
* sampled rows: Gumbel-max over the kept set ``K``: ``token = argmax_{v in K} (z_v + g_v)`` (ties to the lowest index),
  an exact sample from ``softmax(z)`` restricted to ``K`` and renormalized.
* the kept set, applied in Hugging Face's order (top-k, then top-p on the top-k survivors, then min-p):

  - top-k (``0 < k < #finite logits``): ``tau_k`` = the k-th largest ``z`` counting duplicates; keep ``z >= tau_k``.
    Every token tied with the k-th value is kept, so ``|K|`` can exceed ``k`` on exact ties.
  - top-p (``p < 1``): with masses ``exp(z)`` over the top-k survivors (total ``Z_k``), keep ``v`` iff the mass of
    the survivors with ``z`` STRICTLY greater than ``z_v`` is ``< p * Z_k``: the smallest set of largest values
    whose mass reaches ``p``, where a value tied with the last one needed is kept too.
  - min-p (``p_min > 0``): keep ``z_v - max(z) >= log(p_min)``, both sides fp32 (i.e. ``prob_v >= p_min *
    prob_max``).

  ``K`` is the intersection; the row's maximum is always in it.
* noise: ``g_v = -log(-log(u))`` with ``u = ((w >> 9) + 0.5) / 2**23`` (in ``(0, 1)``, so ``g`` is finite) and ``w``
  word ``j = v & 3`` of Philox4x32-10 with key ``(seed & 0xFFFFFFFF, seed >> 32)`` and counter ``(q, r, step, 0)``,
  ``q = v >> 2``: one Philox call serves four consecutive vocabulary entries. With an int ``seed`` the row key
  ``r`` is the row's position in the batch; with a per-row seed tensor ``r = 0``, so a row's token depends only on
  ``(seed[b], step)`` and its own logits, not on its position or on the other rows (rows given the same seed share
  their noise). All backends (Triton, CUDA, torch) draw from this same stream (the torch path evaluates Philox with
  int64 tensor arithmetic), so tokens agree across backends except at floating-point near-ties, where the fp32
  ``log``/division implementations may differ in the last bit.
* log-probs (float32), ``logprobs="processed"``: sampled rows, the log-prob of the token under the distribution it
  was drawn from, ``z_tok - logsumexp(z[K])``; greedy rows, ``log_softmax(z)[tok]`` (temperature applied, no
  truncation; ``T == 0`` rows use ``T = 1``, i.e. the raw softmax). ``logprobs="raw"``: ``log_softmax(x)[tok]``
  for every row.
* invalid rows: a row holding a NaN, or a ``+inf``, or only ``-inf`` values (or whose ``x / T`` overflows) gets
  token 0 and log-prob NaN, never an out-of-range token. ``-inf`` entries in an otherwise valid row are masked
  tokens: they are never chosen.

Kernels (Triton)
----------------
``_sample_kernel``: one program per row. Without truncation, ONE pass over the row: online argmax, online
logsumexp and the Gumbel race together. Philox runs on ``BLOCK_V / 4`` counters per block and its four words are
interleaved (``tl.join`` + reshape), so the race costs ~10 integer multiply rounds per FOUR entries plus two logs
per entry. With truncation, no sort: pass 1 gives max / min / logsumexp; each
threshold (top-k, then top-p) is found exactly by a multi-pivot search over the fp32 values' order-preserving
int32 keys (``NUM_PIVOTS`` thresholds counted per pass, the candidate key range shrinking by ``NUM_PIVOTS`` per pass
and snapping to the nearest values present): the key span (< 2^32) shrinks more than 8-fold per pass, so at most
11 passes each and usually far fewer; min-p is a closed form from the max; a final pass draws the Gumbel race
over ``K`` and sums its mass.

``_fused_sample_kernel``: grid (row blocks, vocabulary splits). Each program computes logit tiles with ``tl.dot`` over
H, then the greedy argmax, online logsumexp and Gumbel race over its split, and writes per-split partials; a
deterministic torch epilogue (argmax over splits, ties to the lowest split; a max / sum-exp merge) combines them.
No locks, no atomics, so results do not depend on scheduling. fp32 inputs use IEEE fp32 dots (not TF32) so the
tokens match sampling from ``hidden @ weight.T`` computed in fp32.
"""

from __future__ import annotations

import math

import torch

from remax_kernels import _cuda
from remax_kernels._dispatch import check_backend, resolve_backend
from remax_kernels._torch_math import logprobs_entropy_chunk, soft_cap
from remax_kernels._triton import jit, tl, triton
from remax_kernels._validate import check_float, check_same_device, check_softcap, check_tensor, value_checks_enabled
from remax_kernels.ops.fused_linear_logprobs import batch_invariant, fixed_shape_matmul
from remax_kernels.ops.token_logprobs import online_softmax_step, row_launch_config, soft_cap_logits, token_logprob

LOGPROB_MODES = ("processed", "raw")
# Thresholds tested per search pass: the candidate key range shrinks ~NUM_PIVOTS-fold per pass.
_NUM_PIVOTS = 8
_U32 = 0xFFFFFFFF
# Philox4x32 round multipliers and Weyl key increments (Salmon et al., SC'11).
_PHILOX_M0, _PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
_PHILOX_W0, _PHILOX_W1 = 0x9E3779B9, 0xBB67AE85
# Elements per fp32 temporary in the torch paths (~4 MiB each).
_TORCH_CHUNK_ELEMS = 1 << 20


# ----------------------------------------------------------------------------------------------------------------------
# Triton device helpers
# ----------------------------------------------------------------------------------------------------------------------


@jit
def _philox4x32(k0, k1, c0, c1, c2, c3):
    # Philox4x32-10 on uint32 lanes; all four output words are used (four vocabulary entries per call).
    for _ in tl.static_range(10):
        hi0 = tl.umulhi(c0, 0xD2511F53)
        hi1 = tl.umulhi(c2, 0xCD9E8D57)
        lo0 = c0 * 0xD2511F53
        lo1 = c2 * 0xCD9E8D57
        c0 = hi1 ^ c1 ^ k0
        c2 = hi0 ^ c3 ^ k1
        c1 = lo1
        c3 = lo0
        k0 = k0 + 0x9E3779B9
        k1 = k1 + 0xBB67AE85
    return c0, c1, c2, c3


@jit
def _gumbel_noise(seed, row_key, step, groups):
    # seed: int64 (scalar or [BB, 1]); row_key: int32 broadcastable to groups; groups: int32 q = v >> 2, shape S.
    # Returns fp32 noise of shape S + (2, 2) whose [..., a, b] is entry 4q + 2a + b: reshaped by the caller to the
    # block (S[-1] * 4 entries), word j of group q lands on entry 4q + j.
    zero = (groups * 0).to(tl.uint32)
    k0 = seed.to(tl.uint32) + zero
    k1 = (seed >> 32).to(tl.uint32) + zero
    c1 = row_key.to(tl.uint32) + zero
    c2 = (zero.to(tl.int64) + step).to(tl.uint32)
    w0, w1, w2, w3 = _philox4x32(k0, k1, groups.to(tl.uint32) + zero, c1, c2, zero)
    word = tl.join(tl.join(w0, w2), tl.join(w1, w3))
    # 23 random bits + 0.5: u in [2^-24, 1 - 2^-24], both exact in fp32, so neither log() sees 0.
    u = ((word >> 9).to(tl.float32) + 0.5) * (1.0 / 8388608.0)
    return -tl.log(-tl.log(u))


@jit
def _ordered_key(z):
    # Monotone map fp32 -> int32 (a < b <=> key(a) < key(b)); -0.0 and +0.0 share key 0 as they compare equal.
    bits = z.to(tl.int32, bitcast=True)
    key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return tl.where(z == 0.0, 0, key)


@jit
def _threshold_search(
    row_ptr, V, t, m, lo_key, hi_key, lo_mass, target, softcap, inv_cap, USE_MASS: tl.constexpr,
    BLOCK_V: tl.constexpr, NUM_PIVOTS: tl.constexpr, SOFTCAP: tl.constexpr,
):
    # Largest value tau (as a key) with F(tau) >= target, F(t) = count (USE_MASS=False) or sum exp(z - m)
    # (USE_MASS=True) over finite z >= t. Invariants: lo_key and hi_key are keys of values present in the row,
    # F(lo_key) >= target, lo_key <= tau <= hi_key; lo_mass = mass(z >= lo_key). hi_key == lo_key on entry means
    # "inactive": no pass is made. Each pass tests NUM_PIVOTS thresholds in (lo, hi] (the last one is hi itself, so
    # every pass makes progress) and snaps the new bounds to the nearest keys present.
    j = tl.arange(0, NUM_PIVOTS).to(tl.int64) + 1
    offs = tl.arange(0, BLOCK_V)
    key_hi_sentinel = 2147483647  # above every finite key (key(+inf) = 0x7F800000)
    key_lo_sentinel = -2147483647 - 1
    while lo_key < hi_key:
        pivots = (lo_key + ((hi_key - lo_key) * j + (NUM_PIVOTS - 1)) // NUM_PIVOTS).to(tl.int32)
        count = tl.zeros([NUM_PIVOTS], tl.int32)
        mass = tl.zeros([NUM_PIVOTS], tl.float32)
        above = tl.full([NUM_PIVOTS], key_hi_sentinel, tl.int32)
        below = tl.full([NUM_PIVOTS], key_lo_sentinel, tl.int32)
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + offs
            x = tl.load(row_ptr + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
            if SOFTCAP:
                x = soft_cap_logits(x, softcap, inv_cap)
            z = x / t
            key = _ordered_key(z)
            finite = z > float("-inf")
            ge = (key[None, :] >= pivots[:, None]) & finite[None, :]
            count += tl.sum(ge.to(tl.int32), 1)
            mass += tl.sum(tl.where(ge, tl.exp(z - m)[None, :], 0.0), 1)
            above = tl.minimum(above, tl.min(tl.where(ge, key[None, :], key_hi_sentinel), 1))
            below = tl.maximum(below, tl.max(tl.where(finite[None, :] & ~ge, key[None, :], key_lo_sentinel), 1))
        if USE_MASS:
            ok = mass >= target
        else:
            ok = count >= target
        jstar = tl.max(tl.where(ok, j, 0), 0)
        new_lo = tl.max(tl.where(j == jstar, above, key_lo_sentinel), 0).to(tl.int64)
        new_mass = tl.sum(tl.where(j == jstar, mass, 0.0), 0)
        new_hi = tl.max(tl.where(j == jstar + 1, below, key_lo_sentinel), 0).to(tl.int64)
        lo_mass = tl.where(jstar > 0, new_mass, lo_mass)
        lo_key = tl.where(jstar > 0, new_lo, lo_key)
        hi_key = tl.where(jstar < NUM_PIVOTS, new_hi, hi_key)
    return lo_key, lo_mass


# ----------------------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------------------


@jit
def _race_step(score, x, v0, offs, best, best_arg, best_x):
    # One block of the Gumbel race: keep the running winner (strict '>': the earlier block wins ties) and its raw
    # logit x, from which the chosen token's log-prob is computed after the pass.
    blk_best = tl.max(score, 0)
    blk_best_arg = tl.argmax(score, 0)
    up = blk_best > best
    best_x = tl.where(up, tl.max(tl.where(offs == blk_best_arg, x, float("-inf")), 0), best_x)
    best_arg = tl.where(up, v0 + blk_best_arg, best_arg)
    best = tl.where(up, blk_best, best)
    return best, best_arg, best_x


@jit
def _sample_kernel(
    logits_ptr, stride_row, greedy_ptr, temp_ptr, top_k_ptr, top_p_ptr, log_min_p_ptr, seed_ptr,
    tokens_ptr, logprobs_ptr, V, step_ptr, softcap,
    KEY_ROW: tl.constexpr, TRUNCATE: tl.constexpr, RAW: tl.constexpr, BLOCK_V: tl.constexpr,
    SEARCH_BLOCK_V: tl.constexpr, NUM_PIVOTS: tl.constexpr, SOFTCAP: tl.constexpr,
):
    # Sampled or greedy token + its log-prob for one row of logits [V].
    # Grid: (B,). Passes over the row: 1 without truncation; with it, 1 + search passes + 1 (see module docstring).
    # SOFTCAP: every pass soft-caps the logits as it loads them (token_logprobs.soft_cap: the same values as the
    # log-prob kernel's), so the cap costs one exp and one division per entry per pass and no extra pass.
    row = tl.program_id(0)
    row_ptr = logits_ptr + row.to(tl.int64) * stride_row
    step = tl.load(step_ptr)  # from device memory: a captured CUDA graph replays with the next step's value
    greedy = tl.load(greedy_ptr + row) != 0
    sampled = ~greedy
    temp = tl.load(temp_ptr + row)
    t = tl.where(temp > 0, temp, 1.0)
    seed = tl.load(seed_ptr + row)
    if KEY_ROW:
        row_key = row
    else:
        row_key = row * 0
    offs = tl.arange(0, BLOCK_V)
    neg_inf = float("-inf")
    inv_cap = 1.0 / softcap if SOFTCAP else 0.0

    inv_t = 1.0 / t
    gmax = tl.full((), neg_inf, tl.float32)
    garg = tl.full((), 0, tl.int32)
    m = tl.full((), neg_inf, tl.float32)  # max of z = x / t: truncation thresholds, overflow check
    s = tl.full((), 0.0, tl.float32)  # sum exp(z - m): truncation masses
    # The reported log-probs come from log-prob kernel's own online softmax (token_logprobs.online_softmax_step over
    # the same blocks), so they equal token_logprobs' bit for bit for the same logits and temperature.
    m_lp = tl.full((), neg_inf, tl.float32)
    s_lp = tl.full((), 0.0, tl.float32)
    unused = tl.full((), 0.0, tl.float32)
    best = tl.full((), neg_inf, tl.float32)
    best_arg = tl.full((), 0, tl.int32)
    best_x = tl.full((), 0.0, tl.float32)
    zmin = tl.full((), float("inf"), tl.float32)
    n_finite = tl.full((), 0, tl.int32)
    n_nan = tl.full((), 0, tl.int32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + offs
        x = tl.load(row_ptr + cols, mask=cols < V, other=neg_inf).to(tl.float32)
        if SOFTCAP:
            x = soft_cap_logits(x, softcap, inv_cap)
        n_nan += tl.sum((x != x).to(tl.int32), 0)
        blk_max = tl.max(x, 0)
        blk_arg = tl.argmax(x, 0)
        # strict '>' keeps the earlier block on ties: lowest index overall
        up = blk_max > gmax
        garg = tl.where(up, v0 + blk_arg, garg)
        gmax = tl.where(up, blk_max, gmax)
        z = x / t
        m_new = tl.maximum(m, tl.max(z, 0))
        if TRUNCATE:
            m_ref = tl.where(m_new == neg_inf, 0.0, m_new)  # all -inf so far: keep s = 0 instead of exp(nan)
            s = s * tl.exp(m - m_ref) + tl.sum(tl.exp(z - m_ref), 0)
        m = m_new
        # "raw": log_softmax(x); "processed": temperature applied (the truncated rows are renormalized below).
        m_lp, s_lp, _ = online_softmax_step(x, cols < V, m_lp, s_lp, unused, 1.0 if RAW else inv_t, False)
        if TRUNCATE:
            finite = z > neg_inf
            zmin = tl.minimum(zmin, tl.min(tl.where(finite, z, float("inf")), 0))
            n_finite += tl.sum(finite.to(tl.int32), 0)
        else:
            if sampled:  # greedy rows skip the Philox work, the bulk of this pass's arithmetic
                noise = _gumbel_noise(seed, row_key, step, v0 // 4 + tl.arange(0, BLOCK_V // 4))
                score = z + tl.reshape(noise, (BLOCK_V,))
                best, best_arg, best_x = _race_step(score, x, v0, offs, best, best_arg, best_x)

    invalid = (n_nan > 0) | (gmax == neg_inf) | (gmax == float("inf")) | (m == float("inf"))
    if TRUNCATE:
        active = sampled & ~invalid
        top_k = tl.load(top_k_ptr + row)
        top_p = tl.load(top_p_ptr + row)
        log_min_p = tl.load(log_min_p_ptr + row)
        key_min = _ordered_key(zmin).to(tl.int64)
        key_max = _ordered_key(m).to(tl.int64)
        k_on = active & (top_k > 0) & (top_k < n_finite)
        tau, mass = _threshold_search(
            row_ptr, V, t, m, key_min, tl.where(k_on, key_max, key_min), s, top_k, softcap, inv_cap,
            USE_MASS=False, BLOCK_V=SEARCH_BLOCK_V, NUM_PIVOTS=NUM_PIVOTS, SOFTCAP=SOFTCAP,
        )
        p_on = active & (top_p < 1.0)
        tau, mass = _threshold_search(
            row_ptr, V, t, m, tau, tl.where(p_on, key_max, tau), mass, top_p * mass, softcap, inv_cap,
            USE_MASS=True, BLOCK_V=SEARCH_BLOCK_V, NUM_PIVOTS=NUM_PIVOTS, SOFTCAP=SOFTCAP,
        )
        # Final pass, sampled valid rows only (a zero-trip loop for the others): Gumbel race over K and K's mass
        # (with the log-prob's d = (x - m_lp) / t, so that a kept set of the whole row renormalizes to nothing).
        s_kept = tl.full((), 0.0, tl.float32)
        m_lp_safe = tl.where(m_lp == neg_inf, 0.0, m_lp)
        for v0 in range(0, tl.where(active, V, 0), BLOCK_V):
            cols = v0 + offs
            x = tl.load(row_ptr + cols, mask=cols < V, other=neg_inf).to(tl.float32)
            if SOFTCAP:
                x = soft_cap_logits(x, softcap, inv_cap)
            z = x / t
            kept = (z > neg_inf) & (_ordered_key(z) >= tau) & (z - m >= log_min_p)
            s_kept += tl.sum(tl.where(kept, tl.exp((x - m_lp_safe) * inv_t), 0.0), 0)
            noise = tl.reshape(_gumbel_noise(seed, row_key, step, v0 // 4 + tl.arange(0, BLOCK_V // 4)), (BLOCK_V,))
            score = tl.where(kept, z + noise, neg_inf)
            best, best_arg, best_x = _race_step(score, x, v0, offs, best, best_arg, best_x)
        if not RAW:
            # Renormalized over K: log(p_tok / P(K)) = log p_tok - log(s_kept / s_lp).
            s_lp = tl.where(sampled & active, tl.where(s_kept > 0, s_kept, 1.0), s_lp)

    token = tl.where(greedy, garg, best_arg)
    logp = token_logprob(tl.where(greedy, gmax, best_x), m_lp, s_lp, 1.0 if RAW else inv_t)
    token = tl.where(invalid, 0, token)
    logp = tl.where(invalid, float("nan"), logp)
    tl.store(tokens_ptr + row, token.to(tl.int64))
    tl.store(logprobs_ptr + row, logp)


@jit
def _fused_sample_kernel(
    hidden_ptr, weight_ptr, bias_ptr, temp_ptr, seed_ptr, part_f_ptr, part_i_ptr,
    B, V, H, stride_hb, stride_wv, step_ptr, v_per_split, n_splits, softcap,
    HAS_BIAS: tl.constexpr, KEY_ROW: tl.constexpr, RAW: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, SOFTCAP: tl.constexpr,
):
    # Logits tiles hidden[rows] @ weight[cols].T (+ bias) over one vocabulary split, reduced on the fly to
    # per-(row, split) partials: Gumbel-race winner (score, index, z, raw logit), greedy max/argmax, logsumexp of
    # z (and of the raw logits when RAW), NaN count. Grid: (cdiv(B, BLOCK_B), n_splits). Reads the split's weight
    # rows once per row block; the [B, V] logits never exist.
    # part_f layout [9, B, n_splits]: best score, z at best, raw logit at best, greedy max, max z, sum exp(z - max z),
    # max x, sum exp(x - max x), nan count. (max, sum) pairs rather than one lse: z_tok - lse would lose the
    # log-sum term when |z| is huge (at 1e36 even log(2) is below the rounding of lse).
    # part_i layout [2, B, n_splits]: best index, greedy index. SOFTCAP: the tile's logits are soft-capped in
    # registers before anything else (the tile's x is the capped logit).
    pid_b = tl.program_id(0)
    pid_s = tl.program_id(1)
    step = tl.load(step_ptr)
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    row_mask = rows < B
    temp = tl.load(temp_ptr + rows, mask=row_mask, other=1.0)
    t = tl.where(temp > 0, temp, 1.0)
    seed = tl.load(seed_ptr + rows, mask=row_mask, other=0)[:, None]
    if KEY_ROW:
        row_key = rows[:, None]
    else:
        row_key = rows[:, None] * 0
    offs_v = tl.arange(0, BLOCK_V)
    offs_h = tl.arange(0, BLOCK_H)
    h_rows = hidden_ptr + rows.to(tl.int64)[:, None] * stride_hb
    neg_inf = float("-inf")

    best = tl.full([BLOCK_B], neg_inf, tl.float32)
    best_arg = tl.zeros([BLOCK_B], tl.int32)
    best_z = tl.zeros([BLOCK_B], tl.float32)
    best_x = tl.zeros([BLOCK_B], tl.float32)
    gmax = tl.full([BLOCK_B], neg_inf, tl.float32)
    garg = tl.zeros([BLOCK_B], tl.int32)
    m = tl.full([BLOCK_B], neg_inf, tl.float32)
    s = tl.zeros([BLOCK_B], tl.float32)
    m_raw = tl.full([BLOCK_B], neg_inf, tl.float32)
    s_raw = tl.zeros([BLOCK_B], tl.float32)
    n_nan = tl.zeros([BLOCK_B], tl.float32)
    v_start = pid_s * v_per_split
    v_end = tl.minimum(v_start + v_per_split, V)
    for v0 in range(v_start, v_end, BLOCK_V):
        cols = v0 + offs_v
        col_mask = cols < v_end
        w_rows = weight_ptr + cols.to(tl.int64)[:, None] * stride_wv
        acc = tl.zeros([BLOCK_B, BLOCK_V], tl.float32)
        for h0 in range(0, H, BLOCK_H):
            hk = h0 + offs_h
            h_mask = hk < H
            a = tl.load(h_rows + hk[None, :], mask=row_mask[:, None] & h_mask[None, :], other=0.0)
            w = tl.load(w_rows + hk[None, :], mask=col_mask[:, None] & h_mask[None, :], other=0.0)
            acc = tl.dot(a, tl.trans(w), acc, input_precision=INPUT_PRECISION)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        if SOFTCAP:
            acc = soft_cap_logits(acc, softcap, 1.0 / softcap)
        x = tl.where(col_mask[None, :], acc, neg_inf)
        n_nan += tl.sum((x != x).to(tl.float32), 1)
        blk_max = tl.max(x, 1)
        blk_arg = tl.argmax(x, 1)
        up = blk_max > gmax
        garg = tl.where(up, v0 + blk_arg, garg)
        gmax = tl.where(up, blk_max, gmax)
        z = x / t[:, None]
        m_new = tl.maximum(m, tl.max(z, 1))
        m_ref = tl.where(m_new == neg_inf, 0.0, m_new)
        s = s * tl.exp(m - m_ref) + tl.sum(tl.exp(z - m_ref[:, None]), 1)
        m = m_new
        if RAW:
            m_raw_new = tl.maximum(m_raw, blk_max)
            m_raw_ref = tl.where(m_raw_new == neg_inf, 0.0, m_raw_new)
            s_raw = s_raw * tl.exp(m_raw - m_raw_ref) + tl.sum(tl.exp(x - m_raw_ref[:, None]), 1)
            m_raw = m_raw_new
        noise = _gumbel_noise(seed, row_key, step, (v0 // 4 + tl.arange(0, BLOCK_V // 4))[None, :])
        score = z + tl.reshape(noise, (BLOCK_B, BLOCK_V))
        blk_best = tl.max(score, 1)
        blk_best_arg = tl.argmax(score, 1)
        at_best = offs_v[None, :] == blk_best_arg[:, None]
        up = blk_best > best
        best_z = tl.where(up, tl.max(tl.where(at_best, z, neg_inf), 1), best_z)
        if RAW:
            best_x = tl.where(up, tl.max(tl.where(at_best, x, neg_inf), 1), best_x)
        best_arg = tl.where(up, v0 + blk_best_arg, best_arg)
        best = tl.where(up, blk_best, best)

    plane = B * n_splits
    out = rows.to(tl.int64) * n_splits + pid_s
    tl.store(part_f_ptr + out, best, mask=row_mask)
    tl.store(part_f_ptr + plane + out, best_z, mask=row_mask)
    tl.store(part_f_ptr + 2 * plane + out, best_x, mask=row_mask)
    tl.store(part_f_ptr + 3 * plane + out, gmax, mask=row_mask)
    tl.store(part_f_ptr + 4 * plane + out, m, mask=row_mask)
    tl.store(part_f_ptr + 5 * plane + out, s, mask=row_mask)
    tl.store(part_f_ptr + 6 * plane + out, m_raw, mask=row_mask)
    tl.store(part_f_ptr + 7 * plane + out, s_raw, mask=row_mask)
    tl.store(part_f_ptr + 8 * plane + out, n_nan, mask=row_mask)
    tl.store(part_i_ptr + out, best_arg, mask=row_mask)
    tl.store(part_i_ptr + plane + out, garg, mask=row_mask)


# ----------------------------------------------------------------------------------------------------------------------
# Torch paths (CPU / backend="torch"): the same definitions and the same Philox stream, chunked over rows/vocabulary
# ----------------------------------------------------------------------------------------------------------------------


def _mulhilo_u32(a: torch.Tensor, multiplier: int) -> tuple[torch.Tensor, torch.Tensor]:
    # a holds uint32 values in int64. The 64-bit product could overflow int64, so split the multiplier in 16-bit
    # halves: every partial product stays below 2^49.
    p0 = a * (multiplier & 0xFFFF)
    p1 = a * (multiplier >> 16)
    lo = (p0 + ((p1 & 0xFFFF) << 16)) & _U32
    hi = ((p0 >> 16) + p1) >> 16
    return hi, lo


def _philox4x32_torch(k0, k1, c0, c1, c2, c3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    for _ in range(10):
        hi0, lo0 = _mulhilo_u32(c0, _PHILOX_M0)
        hi1, lo1 = _mulhilo_u32(c2, _PHILOX_M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + _PHILOX_W0) & _U32
        k1 = (k1 + _PHILOX_W1) & _U32
    return c0, c1, c2, c3


def _gumbel_noise_torch(seed: torch.Tensor, row_key: torch.Tensor, step, v0: int, v1: int) -> torch.Tensor:
    """fp32 Gumbel noise ``[n, v1 - v0]`` of vocabulary entries ``v0..v1-1`` for seeds/row keys ``[n]`` (int64) and
    ``step`` (an int or a one-element int64 tensor): the kernels' stream, one Philox call per group of four."""
    q0, q1 = v0 >> 2, (v1 + 3) >> 2
    shape = (seed.shape[0], q1 - q0)
    c0 = torch.arange(q0, q1, device=seed.device)[None, :].expand(shape)
    zero = torch.zeros(shape, dtype=torch.int64, device=seed.device)
    k0 = (seed & _U32)[:, None] + zero
    k1 = ((seed >> 32) & _U32)[:, None] + zero
    c1 = row_key.to(torch.int64)[:, None] + zero
    words = torch.stack(_philox4x32_torch(k0, k1, c0, c1, zero + step, zero), dim=-1)  # entry 4q + j: word j
    word = words.reshape(shape[0], -1)[:, v0 - 4 * q0 : v1 - 4 * q0]
    u = ((word >> 9).to(torch.float32) + 0.5) * (1.0 / 8388608.0)
    return -torch.log(-torch.log(u))


def _kept_mask_torch(
    z: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, log_min_p: torch.Tensor
) -> torch.Tensor:
    """The kept set of the module docstring for fp32 ``z [n, V]`` (value-based ties). Sorts: CPU-path only."""
    V = z.shape[1]
    finite = z > float("-inf")
    sorted_z = torch.sort(z, dim=1, descending=True).values
    m = sorted_z[:, :1]
    k_on = (top_k > 0) & (top_k < finite.sum(1))
    kth = sorted_z.gather(1, (top_k.clamp(1, V) - 1)[:, None])
    kept = finite & (~k_on[:, None] | (z >= kth))
    p_on = top_p < 1.0
    if bool(p_on.any()):
        survivor = ~k_on[:, None] | (sorted_z >= kth)
        mass = torch.where(survivor, torch.exp(sorted_z - m), 0.0)
        greater = torch.cumsum(mass, 1) - mass
        # Mass strictly above a value = exclusive cumsum at the first position of its tie group.
        first = torch.searchsorted(-sorted_z, -sorted_z, side="left")
        mass_above = greater.gather(1, first)
        n_keep = (survivor & (mass_above < top_p[:, None] * mass.sum(1, keepdim=True))).sum(1)
        tau_p = sorted_z.gather(1, (n_keep.clamp(min=1) - 1)[:, None])
        kept &= ~p_on[:, None] | (z >= tau_p)
    return kept & ((z - m) >= log_min_p[:, None])


def _max_sumexp(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row max and sum exp(values - max) of ``[n, V]`` (-inf rows give (-inf, 0))."""
    top = values.max(1).values
    top_ref = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    return top, torch.exp(values - top_ref[:, None]).sum(1)


def _sample_torch(logits, greedy, temp, top_k, top_p, log_min_p, seed, key_row, step, truncate, raw, softcap):
    B, V = logits.shape
    tokens = torch.empty(B, dtype=torch.int64, device=logits.device)
    logprobs = torch.empty(B, dtype=torch.float32, device=logits.device)
    chunk = max(1, _TORCH_CHUNK_ELEMS // V)
    for r0 in range(0, B, chunk):
        r1 = min(B, r0 + chunk)
        x = soft_cap(logits[r0:r1].float(), softcap)
        g = greedy[r0:r1]
        t = temp[r0:r1]
        t = torch.where(t > 0, t, torch.ones_like(t))
        z = x / t[:, None]
        gmax, gtok = x.max(1).values, x.argmax(1)  # argmax: first maximal index
        kept = z > float("-inf")
        if truncate:
            # NaN rows are invalid (overwritten below); -inf keeps the sort/searchsorted of the mask well-defined
            z_sane = torch.nan_to_num(z, nan=-math.inf, posinf=math.inf, neginf=-math.inf)
            kept = _kept_mask_torch(z_sane, top_k[r0:r1], top_p[r0:r1], log_min_p[r0:r1]) | g[:, None]
        row_key = torch.arange(r0, r1, device=x.device) if key_row else torch.zeros(r1 - r0, dtype=torch.int64)
        score = torch.where(kept, z + _gumbel_noise_torch(seed[r0:r1], row_key.to(x.device), step, 0, V), -math.inf)
        stok = score.argmax(1)
        tok = torch.where(g, gtok, stok)
        # token_logprobs' own chunk math on the same shifted rows: its log-probs, bit for bit.
        shifted = x - torch.where(torch.isfinite(gmax), gmax, torch.zeros_like(gmax))[:, None]
        lp = logprobs_entropy_chunk(shifted, tok, 1.0 if raw else t[:, None], -1, False)[0].clamp(max=0.0)
        if truncate and not raw:
            # Sampled rows: renormalized over the kept set K, log p_tok - log P(K).
            d = shifted / t[:, None]
            kept_mass = torch.logsumexp(torch.where(kept, d, -math.inf), 1) - torch.logsumexp(d, 1)
            lp = torch.where(g, lp, lp - kept_mass)
        invalid = torch.isnan(x).any(1) | ~torch.isfinite(gmax) | (z.max(1).values == math.inf)
        tokens[r0:r1] = torch.where(invalid, 0, tok)
        logprobs[r0:r1] = torch.where(invalid, math.nan, lp)
    return tokens, logprobs


def _log_norm_parts(m: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge per-part (max, sum exp(. - max)) ``[B, P]`` into (M, log S) ``[B]``: logsumexp = M + log S, kept apart
    so callers compute ``(value - M) - log S`` (exact log-count terms even when |values| ~ 1e36)."""
    top = m.max(1).values
    top_ref = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    return top, torch.log((s * torch.exp(m - top_ref[:, None])).sum(1))


def _finalize_fused(greedy, t, best_tok, best_z, best_x, gtok, gmax, m, s, m_raw, s_raw, n_nan, raw):
    """Per-row winners and per-part (max, sum) ``[B, P]`` -> (tokens int64, logprobs fp32), both backends.

    ``m_raw``/``s_raw`` (the raw logits' parts) are only read when ``raw``."""
    t = torch.where(t > 0, t, torch.ones_like(t))
    tok = torch.where(greedy, gtok.to(torch.int64), best_tok.to(torch.int64))
    top, log_sum = _log_norm_parts(m, s)
    if raw:
        top_raw, log_sum_raw = _log_norm_parts(m_raw, s_raw)
        lp = (torch.where(greedy, gmax, best_x) - top_raw) - log_sum_raw
    else:
        lp = (torch.where(greedy, gmax / t, best_z) - top) - log_sum
    invalid = (n_nan > 0) | ~torch.isfinite(gmax) | ~torch.isfinite(top)
    return torch.where(invalid, 0, tok), torch.where(invalid, math.nan, lp)


def _fused_sample_torch(hidden, weight, bias, greedy, temp, seed, key_row, step, raw, softcap):
    B = hidden.shape[0]
    V = weight.shape[0]
    dev = hidden.device
    h = hidden.float()
    t = torch.where(temp > 0, temp, torch.ones_like(temp))
    row_key = torch.arange(B, device=dev) if key_row else torch.zeros(B, dtype=torch.int64, device=dev)
    neg = torch.full((B,), -math.inf, device=dev)
    best, best_z, best_x, gmax = neg.clone(), neg.clone(), neg.clone(), neg.clone()
    parts, raw_parts = [], []  # per vocabulary block: (max, sum exp(. - max)) of z, and of x when raw
    best_tok = torch.zeros(B, dtype=torch.int64, device=dev)
    gtok = torch.zeros(B, dtype=torch.int64, device=dev)
    n_nan = torch.zeros(B, device=dev)
    block = max(1, _TORCH_CHUNK_ELEMS // max(B, 1))
    for v0 in range(0, V, block):
        v1 = min(V, v0 + block)
        x = h @ weight[v0:v1].float().T
        if bias is not None:
            x = x + bias[v0:v1].float()
        x = soft_cap(x, softcap)
        n_nan += torch.isnan(x).sum(1)
        blk_max, blk_arg = x.max(1).values, x.argmax(1)
        up = blk_max > gmax  # strict: earlier block wins ties
        gtok = torch.where(up, blk_arg + v0, gtok)
        gmax = torch.where(up, blk_max, gmax)
        z = x / t[:, None]
        parts.append(_max_sumexp(z))
        if raw:
            raw_parts.append(_max_sumexp(x))
        score = z + _gumbel_noise_torch(seed, row_key, step, v0, v1)
        blk_best, blk_arg = score.max(1).values, score.argmax(1)
        up = blk_best > best
        best_z = torch.where(up, z.gather(1, blk_arg[:, None])[:, 0], best_z)
        best_x = torch.where(up, x.gather(1, blk_arg[:, None])[:, 0], best_x)
        best_tok = torch.where(up, blk_arg + v0, best_tok)
        best = torch.where(up, blk_best, best)
    m, s = (torch.stack(cols, 1) for cols in zip(*parts, strict=True))
    m_raw, s_raw = (torch.stack(cols, 1) for cols in zip(*raw_parts, strict=True)) if raw else (None, None)
    return _finalize_fused(greedy, temp, best_tok, best_z, best_x, gtok, gmax, m, s, m_raw, s_raw, n_nan, raw)


# ----------------------------------------------------------------------------------------------------------------------
# Option parsing and validation
# ----------------------------------------------------------------------------------------------------------------------


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _row_tensor(name: str, value: torch.Tensor, batch: int, device: torch.device, dtypes, kind: str) -> torch.Tensor:
    if value.dtype not in dtypes:
        got = str(value.dtype).replace("torch.", "")
        raise TypeError(f"{name}: a per-row tensor must have a {kind} dtype, got {got}")
    if tuple(value.shape) != (batch,):
        raise ValueError(f"{name}: a per-row tensor must have shape ({batch},) (one per row), got {tuple(value.shape)}")
    if value.device != device:
        raise ValueError(f"{name}: is on {value.device} but the logits are on {device}; move them to one device")
    return value.contiguous()  # the kernels index per-row values with stride 1


_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_INTS = (torch.int64, torch.int32)


def check_sampling_options(*, temperature, top_k, top_p, min_p) -> None:
    """The checks ``sample_and_greedy`` makes of its sampling options, for callers that want them to fail before
    any heavy work (``generate_pairs`` before its prefill); raises ValueError/TypeError naming the option."""
    parse_options(1, 2, torch.device("cpu"), torch.zeros(1, dtype=torch.bool), temperature, top_k, top_p, min_p, 0,
                  "processed")


def parse_options(batch, vocab, device, greedy_mask, temperature, top_k, top_p, min_p, seed, logprobs):
    """Validate the per-call options on the host; returns contiguous per-row tensors ``[B]`` and host-side flags:
    ``(temp, top_k, top_p, log_min_p, seeds, greedy_mask, key_row, truncate)``.

    Scalar options are checked here at no cost. Checks that read tensor VALUES (per-row option tensors in range,
    temperature 0 only at greedy rows) run inside the op, on CPU tensors always and on CUDA only with
    ``REMAX_KERNELS_CHECKS=1`` (``_check_option_values``): nothing here synchronizes with the device.
    """
    check_tensor("greedy_mask", greedy_mask)
    if greedy_mask.dtype != torch.bool:
        raise TypeError(f"greedy_mask: dtype must be bool, got {str(greedy_mask.dtype).replace('torch.', '')}")
    if tuple(greedy_mask.shape) != (batch,):
        raise ValueError(f"greedy_mask: expected shape ({batch},) (one flag per row), got {tuple(greedy_mask.shape)}")
    if greedy_mask.device != device:
        raise ValueError(f"greedy_mask: is on {greedy_mask.device} but the logits are on {device}")
    if logprobs not in LOGPROB_MODES:
        raise ValueError(f"logprobs: must be one of {LOGPROB_MODES}, got {logprobs!r}")

    if isinstance(temperature, torch.Tensor):
        temp = _row_tensor("temperature", temperature, batch, device, _FLOATS, "floating").float()
    elif _is_number(temperature):
        t = float(temperature)
        if t != t or t < 0 or t == math.inf:
            raise ValueError(f"temperature: must be a finite number >= 0, got {temperature!r}")
        if 0 < t < torch.finfo(torch.float32).tiny:
            raise ValueError(f"temperature: {t!r} underflows float32; use a value >= 1.2e-38")
        temp = torch.full((batch,), t, dtype=torch.float32, device=device)
    else:
        raise TypeError(f"temperature: expected a float or a per-row tensor, got {type(temperature).__name__}")

    truncate = False
    if isinstance(top_k, torch.Tensor):
        k = _row_tensor("top_k", top_k, batch, device, _INTS, "integer").clamp(min=-1, max=2**31 - 1).to(torch.int32)
        truncate = True
    elif _is_int(top_k):
        if top_k < 0:
            raise ValueError(f"top_k: must be >= 0 (0 disables it), got {top_k}")
        k = torch.full((batch,), min(top_k, 2**31 - 1), dtype=torch.int32, device=device)
        truncate |= 0 < top_k < vocab
    else:
        raise TypeError(f"top_k: expected an int or a per-row integer tensor, got {type(top_k).__name__}")

    if isinstance(top_p, torch.Tensor):
        p = _row_tensor("top_p", top_p, batch, device, _FLOATS, "floating").float()
        truncate = True
    elif _is_number(top_p):
        if not 0 < float(top_p) <= 1:
            raise ValueError(f"top_p: must be in (0, 1] (1 disables it), got {top_p!r}")
        p = torch.full((batch,), float(top_p), dtype=torch.float32, device=device)
        truncate |= float(top_p) < 1
    else:
        raise TypeError(f"top_p: expected a float or a per-row tensor, got {type(top_p).__name__}")

    if isinstance(min_p, torch.Tensor):
        mp = _row_tensor("min_p", min_p, batch, device, _FLOATS, "floating")
        # log(0) = -inf: disabled. A value outside [0, 1) becomes NaN or >= 0 here and is reported by the op.
        log_min_p = torch.where((mp >= 0) & (mp < 1), torch.log(mp.double()), math.nan).float()
        truncate = True
    elif _is_number(min_p):
        if not 0 <= float(min_p) < 1:
            raise ValueError(f"min_p: must be in [0, 1) (0 disables it), got {min_p!r}")
        log_min_p = torch.full((batch,), math.log(min_p) if min_p > 0 else -math.inf, device=device)
        truncate |= float(min_p) > 0
    else:
        raise TypeError(f"min_p: expected a float or a per-row tensor, got {type(min_p).__name__}")

    if isinstance(seed, torch.Tensor):
        seeds = _row_tensor("seed", seed, batch, device, _INTS, "integer").to(torch.int64)
        key_row = False
    elif _is_int(seed):
        if not -(2**63) <= seed < 2**64:
            raise ValueError(f"seed: must fit in 64 bits, got {seed}")
        signed = seed - 2**64 if seed >= 2**63 else seed
        seeds = torch.full((batch,), signed, dtype=torch.int64, device=device)
        key_row = True
    else:
        raise TypeError(f"seed: expected an int or a per-row int64 tensor, got {type(seed).__name__}")
    return temp, k, p, log_min_p.float(), seeds, greedy_mask.contiguous(), key_row, truncate


def step_tensor(step, device: torch.device) -> torch.Tensor:
    """The decode step as the ops take it: an int64 ``[1]`` tensor on ``device`` (a Python int is filled in on the
    device, no copy from the host; a one-element integer tensor is used as is, its value read by the kernel)."""
    if isinstance(step, torch.Tensor):
        if step.dtype not in _INTS or step.numel() != 1:
            raise ValueError(f"step: a tensor step must be one int64/int32 value, got {step.dtype} {tuple(step.shape)}")
        if step.device != device:
            raise ValueError(f"step: is on {step.device} but the logits are on {device}")
        return step.reshape(1).to(torch.int64)
    if not _is_int(step):
        raise TypeError(f"step: expected an int (the decode position) or a one-element tensor, got "
                        f"{type(step).__name__}")
    if not 0 <= step < 2**32:
        raise ValueError(f"step: must be in [0, 2**32), got {step}")
    return torch.full((1,), step, dtype=torch.int64, device=device)


def _check_option_values(greedy, temp, top_k=None, top_p=None, log_min_p=None, step=None) -> None:
    """The value checks of the per-row options (``parse_options``), with ONE read of the device for all of them."""
    if not value_checks_enabled(greedy.device) or greedy.numel() == 0:
        return
    checks = [
        ("temperature", ~torch.isfinite(temp) | (temp < 0), "values that are NaN, inf or negative"),
        ("temperature", (temp == 0) & ~greedy, "zeros at sampled rows (only greedy rows may have temperature 0)"),
    ]
    if step is not None:
        checks.append(("step", (step < 0) | (step >= 2**32), "values outside [0, 2**32)"))
    if top_k is not None:
        checks += [
            ("top_k", top_k < 0, "negative values"),
            ("top_p", ~((top_p > 0) & (top_p <= 1)), "values outside (0, 1]"),
            ("min_p", ~(log_min_p < 0), "values outside [0, 1)"),
        ]
    counts = torch.stack([bad.sum() for _, bad, _ in checks]).tolist()
    for (name, _, what), n in zip(checks, counts, strict=True):
        if n:
            raise ValueError(f"{name}: {n} {what}")


# ----------------------------------------------------------------------------------------------------------------------
# Public ops
# ----------------------------------------------------------------------------------------------------------------------


def sample_and_greedy(
    logits: torch.Tensor,
    greedy_mask: torch.Tensor,
    *,
    temperature: float | torch.Tensor = 1.0,
    top_k: int | torch.Tensor = 0,
    top_p: float | torch.Tensor = 1.0,
    min_p: float | torch.Tensor = 0.0,
    seed: int | torch.Tensor = 0,
    step: int | torch.Tensor = 0,
    logprobs: str = "processed",
    softcap: float | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick one token per row: greedy argmax where ``greedy_mask`` is True, a seeded sample elsewhere.

    The exact rules (tie-breaking, truncation, the random stream, what log-prob is returned, invalid rows) are in
    this module's docstring; in short:

    Args:
        logits: ``[B, V]`` fp32/fp16/bf16, last dim contiguous (a ``[:, -1, :]`` view of ``[B, T, V]`` is fine).
        greedy_mask: ``[B]`` bool. True: ``argmax(logits)``, ties to the lowest index. False: sampled.
        temperature: float or per-row float tensor ``[B]``; > 0 for sampled rows, >= 0 for greedy rows (it only
            changes their "processed" log-prob; 0 means T = 1 there).
        top_k: int or per-row int tensor ``[B]``; 0 disables. Keeps every value tied with the k-th largest.
        top_p: float or per-row tensor ``[B]`` in (0, 1]; 1 disables. Applied to the top-k survivors.
        min_p: float or per-row tensor ``[B]`` in [0, 1); 0 disables. Keeps ``prob >= min_p * max prob``.
        seed: int (the stream is keyed on (seed, step, row position)) or per-row int64 tensor ``[B]`` (keyed on
            (seed[b], step) only: a row's token then does not depend on the rest of the batch).
        step: int in [0, 2**32), the decode position; use a new step (or seed) for every draw. Or a one-element
            int64 tensor on the logits' device, read by the kernel: a compiled or CUDA-graph-captured decode step
            then replays with each step's value (no recompilation per step).
        logprobs: ``"processed"`` (log-prob under the distribution actually sampled: temperature + truncation,
            renormalized; greedy rows: temperature only) or ``"raw"`` (``log_softmax(logits)``).
        softcap: logit soft-capping, ``None`` (off) or a finite ``c > 0``: the logits are replaced by
            ``c * tanh(logits / c)`` first (``-inf`` kept), and greedy argmax, temperature, top-k / top-p / min-p and
            both log-prob modes apply to the capped logits, as Hugging Face's Gemma-2/3 ``generate`` does. Applied
            as each pass loads the row (no extra pass).
        backend: ``"auto"``, ``"triton"``, ``"cuda"`` (the CUDA kernel of ``csrc/sampling.cuh``; needs the built
            extension and CUDA tensors) or ``"torch"`` (see ``remax_kernels._dispatch``). All backends use the same
            Philox stream; tokens agree except at floating-point near-ties.

    Returns:
        ``(tokens [B] int64, logprobs [B] float32)``. Tokens are always in ``[0, V)``; a row with NaN, ``+inf`` or
        only ``-inf`` logits gets token 0 and log-prob NaN.

    Cost (Triton): one program per row. No truncation: ONE pass over the vocabulary. With top-k / top-p: pass 1,
    up to 11 exact multi-pivot search passes per threshold (usually far fewer; no sort), one sampling pass.
    min-p alone: two passes. Per-row tensor options are range-checked on CPU tensors, on CUDA only with
    ``REMAX_KERNELS_CHECKS=1`` (the check reads device memory); no device sync otherwise. The torch path (CPU)
    sorts each row to find the same thresholds. CUDA (``csrc/sampling.cuh``, one block per row): no
    truncation, one pass; top-k / top-p, a value histogram then one gather of the threshold bins into shared memory
    (3 passes when every candidate fits there, else 4), no sort of the row.

    Example::

        >>> logits = torch.randn(4, 32000)
        >>> greedy = torch.tensor([False, True, False, True])
        >>> tokens, logp = sample_and_greedy(logits, greedy, temperature=0.7, top_p=0.9, seed=1234, step=0)
        >>> tokens.shape, logp.dtype
        (torch.Size([4]), torch.float32)
    """
    check_float("logits", logits)
    if logits.dim() != 2:
        raise ValueError(f"logits: expected a 2-D tensor [B, V], got shape {tuple(logits.shape)}")
    batch, vocab = logits.shape
    if vocab == 0:
        raise ValueError("logits: the vocabulary dimension is empty (V = 0)")
    if logits.stride(1) != 1 and batch > 0 and vocab > 1:
        raise ValueError(f"logits: the last dim must be contiguous (stride 1), got strides {tuple(logits.stride())}")
    device = logits.device
    temp, k, p, log_min_p, seeds, greedy_mask, key_row, truncate = parse_options(
        batch, vocab, device, greedy_mask, temperature, top_k, top_p, min_p, seed, logprobs
    )
    cap = check_softcap("softcap", softcap)
    check_backend(backend)
    return _sample_op(logits.detach(), greedy_mask, temp, k, p, log_min_p, seeds, key_row, step_tensor(step, device),
                      truncate, logprobs == "raw", backend, cap)


def sample_launch_config(device_type: str, vocab: int) -> tuple[int, int, int]:
    """``(BLOCK_V, SEARCH_BLOCK_V, num_warps)`` of ``_sample_kernel``: the row passes use the log-prob row kernel's
    blocks and warps (``token_logprobs.row_launch_config``: same reductions, hence bitwise-equal log-probs); the
    threshold searches test ``NUM_PIVOTS`` pivots on [NUM_PIVOTS, 256] tiles on CUDA. ``scripts/compile_triton.py``
    compiles the CUDA configurations ahead of time and fails on register spills."""
    block_v, num_warps = row_launch_config(vocab)
    if device_type == "cuda":
        return block_v, 256, num_warps
    return block_v, block_v, num_warps  # interpreter: numpy is happiest with one big block


def fused_sample_launch_config(device_type: str, batch: int, vocab: int, sm_count: int, dtype: torch.dtype) -> dict:
    """Block sizes, warps, stages and vocabulary splits of ``_fused_sample_kernel`` (compiled ahead of time by
    ``scripts/compile_triton.py``, which fails on register spills)."""
    if device_type == "cuda":
        # Per thread: the [BLOCK_B, BLOCK_V] fp32 logit tile, its z / exp / score copies and the four-word Philox
        # state of BLOCK_V / 4 groups per row. These sizes stay under 255 registers (ptxas -v, sm_80 and sm_90a);
        # IEEE fp32 dots (no tensor cores) need more registers for the same tile.
        block_b = min(32 if dtype == torch.float32 else 64, max(16, triton.next_power_of_2(batch)))
        block_v = 32 if block_b == 64 or dtype == torch.float32 else 64
        block_h, num_warps, num_stages = 64, 8, 1 if dtype == torch.float32 else 3
        n_row_blocks = triton.cdiv(batch, block_b)
        n_splits = max(1, min(triton.cdiv(vocab, block_v), triton.cdiv(4 * sm_count, n_row_blocks)))
    else:
        block_b, block_v, block_h, num_warps, num_stages = 16, 64, 32, 4, 1
        n_splits = min(4, triton.cdiv(vocab, block_v))
    v_per_split = triton.cdiv(triton.cdiv(vocab, n_splits), block_v) * block_v
    return dict(BLOCK_B=block_b, BLOCK_V=block_v, BLOCK_H=block_h, num_warps=num_warps, num_stages=num_stages,
                v_per_split=v_per_split, n_splits=triton.cdiv(vocab, v_per_split))


# With SOFTCAP the threshold search's [NUM_PIVOTS, SEARCH_BLOCK_V] tiles also hold the capped values: at 256 columns
# ptxas spills the fp16/bf16 truncating raw-log-prob variant on sm_90a (scripts/compile_triton.py), at 128 it does not.
_SOFTCAP_SEARCH_BLOCK_V = 128


def softcap_search_block(search_block_v: int, softcap: bool) -> int:
    """``SEARCH_BLOCK_V`` of ``_sample_kernel`` for a launch with (``softcap=True``) or without soft-capping."""
    return min(search_block_v, _SOFTCAP_SEARCH_BLOCK_V) if softcap else search_block_v


@torch.library.custom_op("remax_kernels::sample_and_greedy", mutates_args=())
def _sample_op(
    logits: torch.Tensor, greedy_mask: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
    top_p: torch.Tensor, log_min_p: torch.Tensor, seeds: torch.Tensor, key_row: bool, step: torch.Tensor,
    truncate: bool, raw: bool, backend: str, softcap: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row options as ``parse_options`` returns them, the step as ``step_tensor`` does, ``softcap`` 0 for off
    -> (tokens int64 ``[B]``, logprobs fp32 ``[B]``)."""
    _check_option_values(greedy_mask, temperature, top_k, top_p, log_min_p, step)
    return _sample_impl(logits, greedy_mask, temperature, top_k, top_p, log_min_p, seeds, key_row, step, truncate,
                        raw, softcap, backend)


def _sample_impl(logits, greedy_mask, temperature, top_k, top_p, log_min_p, seeds, key_row, step, truncate, raw,
                 softcap, backend):
    batch, vocab = logits.shape
    device = logits.device
    if batch == 0:
        return torch.empty(0, dtype=torch.int64, device=device), torch.empty(0, dtype=torch.float32, device=device)
    impl = resolve_backend(backend, device, op="sample_and_greedy")
    if impl == "torch":
        return _sample_torch(logits, greedy_mask, temperature, top_k, top_p, log_min_p, seeds, key_row, step,
                             truncate, raw, softcap)
    if impl == "cuda":
        return _cuda.sample_and_greedy(logits, greedy_mask, temperature, top_k, top_p, log_min_p, seeds, step,
                                       key_row, truncate, raw, softcap=softcap)
    tokens = torch.empty(batch, dtype=torch.int64, device=device)
    out_logprobs = torch.empty(batch, dtype=torch.float32, device=device)
    block_v, search_block_v, num_warps = sample_launch_config(device.type, vocab)
    if device.type == "cuda":
        search_block_v = softcap_search_block(search_block_v, softcap > 0)
    _sample_kernel[(batch,)](
        logits, logits.stride(0), greedy_mask.view(torch.uint8), temperature, top_k, top_p, log_min_p, seeds,
        tokens, out_logprobs, vocab, step, softcap,
        KEY_ROW=key_row, TRUNCATE=truncate, RAW=raw, BLOCK_V=block_v, SEARCH_BLOCK_V=search_block_v,
        NUM_PIVOTS=_NUM_PIVOTS, SOFTCAP=softcap > 0, num_warps=num_warps,
    )
    return tokens, out_logprobs


@_sample_op.register_fake
def _(logits, greedy_mask, temperature, top_k, top_p, log_min_p, seeds, key_row, step, truncate, raw, backend,
      softcap=0.0):
    batch = logits.shape[0]
    return logits.new_empty(batch, dtype=torch.int64), logits.new_empty(batch, dtype=torch.float32)


def fused_linear_sample_and_greedy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    greedy_mask: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float | torch.Tensor = 1.0,
    seed: int | torch.Tensor = 0,
    step: int | torch.Tensor = 0,
    logprobs: str = "processed",
    softcap: float | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``sample_and_greedy(hidden @ weight.T + bias, greedy_mask, ...)`` without materializing the ``[B, V]`` logits.

    Temperature only (no top-k / top-p / min-p). Same rules, same random stream, hence the same tokens as
    ``sample_and_greedy`` on the fp32 logits given the same ``seed``/``step``, up to floating-point near-ties
    (the matmul's summation order differs).

    Args:
        hidden: ``[B, H]`` fp32/fp16/bf16, the last hidden state of each row, last dim contiguous.
        weight: ``[V, H]``, same dtype as ``hidden``, the lm-head weight, last dim contiguous.
        greedy_mask: ``[B]`` bool, True for greedy rows.
        bias: optional ``[V]`` float lm-head bias.
        temperature, seed, step, logprobs, softcap, backend: as in ``sample_and_greedy`` (the cap is applied to each
            logit tile in registers, after the bias).

    Returns:
        ``(tokens [B] int64, logprobs [B] float32)``, as ``sample_and_greedy``.

    Logits are accumulated in fp32 (IEEE fp32 dots for fp32 inputs, no TF32). Memory: O(B * splits) partials.

    Example::

        >>> hidden = torch.randn(4, 64, dtype=torch.float16)
        >>> weight = torch.randn(1000, 64, dtype=torch.float16) * 0.05
        >>> tokens, logp = fused_linear_sample_and_greedy(hidden, weight, torch.tensor([0, 1, 0, 1]).bool(), seed=7)
    """
    check_float("hidden", hidden)
    check_float("weight", weight)
    if hidden.dim() != 2:
        raise ValueError(f"hidden: expected a 2-D tensor [B, H], got shape {tuple(hidden.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"weight: expected a 2-D tensor [V, H], got shape {tuple(weight.shape)}")
    batch, hidden_size = hidden.shape
    vocab = weight.shape[0]
    if weight.shape[1] != hidden_size:
        raise ValueError(f"weight: expected shape [V, {hidden_size}] (hidden's H), got {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight: dtype {weight.dtype} differs from hidden's {hidden.dtype}")
    if vocab == 0 or hidden_size == 0:
        raise ValueError(f"weight: V and H must be > 0, got shape {tuple(weight.shape)}")
    if bias is not None:
        check_float("bias", bias)
        if tuple(bias.shape) != (vocab,):
            raise ValueError(f"bias: expected shape ({vocab},), got {tuple(bias.shape)}")
    for name, t in (("hidden", hidden), ("weight", weight)):
        if t.numel() and t.stride(1) != 1:
            raise ValueError(f"{name}: the last dim must be contiguous (stride 1), got strides {tuple(t.stride())}")
    device = check_same_device(hidden=hidden, weight=weight, bias=bias)
    if bias is not None:
        bias = bias.contiguous().detach()
    temp, _, _, _, seeds, greedy_mask, key_row, _ = parse_options(
        batch, vocab, device, greedy_mask, temperature, 0, 1.0, 0.0, seed, logprobs
    )
    cap = check_softcap("softcap", softcap)
    check_backend(backend)
    return _fused_sample_op(hidden.detach(), weight.detach(), bias, greedy_mask, temp, seeds, key_row,
                            step_tensor(step, device), logprobs == "raw", backend, cap)


@torch.library.custom_op("remax_kernels::fused_linear_sample_and_greedy", mutates_args=())
def _fused_sample_op(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, greedy_mask: torch.Tensor,
    temperature: torch.Tensor, seeds: torch.Tensor, key_row: bool, step: torch.Tensor, raw: bool, backend: str,
    softcap: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row options as ``parse_options`` returns them, the step as ``step_tensor`` does -> (tokens int64
    ``[B]``, logprobs fp32 ``[B]``)."""
    _check_option_values(greedy_mask, temperature, step=step)
    batch, hidden_size = hidden.shape
    vocab = weight.shape[0]
    device = hidden.device
    if batch == 0:
        return torch.empty(0, dtype=torch.int64, device=device), torch.empty(0, dtype=torch.float32, device=device)
    if batch_invariant():
        # The lm-head's fixed-shape GEMM tiles, then the sampling row kernel: a row's token and log-prob are those
        # of sample_and_greedy on the logits fused_linear_logprobs computes for it, bit for bit.
        logits = fixed_shape_matmul(hidden, weight.T, bias)
        off = torch.zeros_like(temperature)
        return _sample_impl(logits, greedy_mask, temperature, off.int(), off + 1, off - math.inf, seeds, key_row, step,
                            False, raw, softcap, backend)
    if resolve_backend(backend, device) == "torch":
        return _fused_sample_torch(hidden, weight, bias, greedy_mask, temperature, seeds, key_row, step, raw,
                                   softcap)
    sm_count = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 0
    cfg = fused_sample_launch_config(device.type, batch, vocab, sm_count, hidden.dtype)
    v_per_split, n_splits = cfg.pop("v_per_split"), cfg.pop("n_splits")
    part_f = torch.empty((9, batch, n_splits), dtype=torch.float32, device=device)
    part_i = torch.empty((2, batch, n_splits), dtype=torch.int32, device=device)
    grid = (triton.cdiv(batch, cfg["BLOCK_B"]), n_splits)
    _fused_sample_kernel[grid](
        hidden, weight, bias if bias is not None else hidden, temperature, seeds, part_f, part_i,
        batch, vocab, hidden_size, hidden.stride(0), weight.stride(0), step, v_per_split, n_splits, softcap,
        HAS_BIAS=bias is not None, KEY_ROW=key_row, RAW=raw, SOFTCAP=softcap > 0,
        INPUT_PRECISION="ieee" if hidden.dtype == torch.float32 else None, **cfg,
    )
    # Deterministic combine over splits: argmax returns the first (lowest-vocabulary) split on ties.
    best_split = part_f[0].argmax(1, keepdim=True)
    greedy_split = part_f[3].argmax(1, keepdim=True)
    pick = lambda t, idx: t.gather(1, idx)[:, 0]
    return _finalize_fused(
        greedy_mask, temperature, pick(part_i[0], best_split), pick(part_f[1], best_split), pick(part_f[2], best_split),
        pick(part_i[1], greedy_split), pick(part_f[3], greedy_split), part_f[4], part_f[5], part_f[6], part_f[7],
        part_f[8].sum(1), raw,
    )


@_fused_sample_op.register_fake
def _(hidden, weight, bias, greedy_mask, temperature, seeds, key_row, step, raw, backend, softcap=0.0):
    batch = hidden.shape[0]
    return hidden.new_empty(batch, dtype=torch.int64), hidden.new_empty(batch, dtype=torch.float32)
