"""Per-token log-probs (and entropy) straight from hidden states and the lm-head, without the ``[N, V]`` logits.

``fused_linear_logprobs(hidden, weight, targets)`` equals ``token_logprobs(hidden @ weight.T + bias, targets)``
but only ever holds a tile (Triton) or a chunk of rows (torch) of the logits.

Triton path (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``):
- forward: ``_fwd_partials_kernel`` over a 2-D grid (token blocks x vocabulary splits). Each program streams its
  vocabulary range tile by tile (``tl.dot`` over H in BLOCK_H steps, fp32 accumulation), keeps an online
  logsumexp, and writes per-split partials to ``[splits, N]`` fp32 buffers: max m, sum exp(z - m),
  sum exp(z - m) (z - m) (for the entropy, kept relative to m so that no large terms cancel) and the target's logit
  (0 when the target is in another split). Torch merges the partials with fixed-shape reductions. No locks and no
  atomics, so the result is bitwise reproducible (cut-cross-entropy's spin-lock merge is not).
- backward: two deterministic kernels that recompute the logit tiles instead of storing them.
  ``_bwd_hidden_kernel`` (one program per token block) loops over the vocabulary and accumulates
  grad_hidden = dlogits @ W; ``_bwd_weight_kernel`` (one program per vocabulary block) loops over the tokens and
  accumulates grad_weight = dlogits^T @ hidden and grad_bias = sum dlogits. Each program owns its output rows, so
  nothing is shared between programs. Only hidden/weight/bias/targets and ``[N]`` lse/entropy are saved.
- cost: 5 N*H*V matmul-equivalents (forward, two recomputes, two gradient products) against 3 for an unfused
  matmul + log_softmax. The two recomputes are the price of determinism without atomics: one fused backward
  kernel would have to add both gradients across programs. An atomics-based variant (one recompute, 4 N*H*V) is a
  GPU-tuning follow-up, as is keeping grad tiles on-chip: the gradient accumulators ``[BLOCK_N, H]`` /
  ``[BLOCK_V, H]`` do not fit in registers for real H, so each program read-modify-writes its own rows of an
  fp32 scratch buffer once per tile of the loop (extra ``8 * N*H * V/BLOCK_V`` + ``8 * V*H * N/BLOCK_N`` bytes of
  mostly-L2 traffic).

torch path (CPU tensors, or ``backend="torch"``): the same autograd.Function over chunks of rows; each chunk's
logits ``[chunk, V]`` are formed, shifted by their row max (for the entropy, as above), reduced with
``_torch_math`` and dropped; backward recomputes them. The chunk is sized from ``_TORCH_CHUNK_BYTES`` of fp32
logits, so extra memory is O(chunk x V) (about 5x the budget in temporaries), never O(N x V).

Both paths: ignored rows (``ignore_index``) give exactly zero gradient even when their hidden state is NaN/inf
(padding); gradients accumulate in fp32 and are written in the input dtype; dlogits enter the gradient matmuls
in the input dtype (as with autograd through ``hidden @ weight.T``).

Math (z = logits / T, p = softmax(z), lse = logsumexp(z), H = entropy):
  logp = z[target] - lse,  H = lse - sum_v p_v z_v
  d/dlogits = g_logp * (onehot - p) / T  -  g_entropy * p * (z - lse + H) / T
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch.autograd.function import once_differentiable

from remax_kernels._dispatch import interpreter_enabled, resolve_backend
from remax_kernels._torch_math import grad_logits_chunk, logprobs_entropy_chunk
from remax_kernels._triton import jit, tl, triton
from remax_kernels._validate import (
    check_float,
    check_index,
    check_same_device,
    check_shape,
    check_targets,
    check_temperature,
)

# Ignored rows reach the kernels and the torch chunks with this target (never a vocabulary column).
_NO_TARGET = -1
# fp32 logits per chunk of the torch path; temporaries are a few times this (~5x in backward).
_TORCH_CHUNK_BYTES = 16 * 2**20


def _new_buffer(shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Every fp32 buffer that this module fills completely is allocated here (one place for tests to poison)."""
    return torch.empty(shape, dtype=torch.float32, device=device)


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------------


@jit
def _logits_tile(
    hidden_ptr, weight_ptr, bias_ptr, offs_n, offs_v, mask_n, mask_v, hidden_size,
    stride_hn, stride_hh, stride_wv, stride_wh, temperature,
    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    # z = (hidden[offs_n] @ weight[offs_v].T + bias[offs_v]) / T as an fp32 [BLOCK_N, BLOCK_V] tile; one pass over
    # the H columns of both operands. Masked-off rows/columns read zeros (callers mask the result).
    offs_h = tl.arange(0, BLOCK_H)
    h_rows = hidden_ptr + offs_n.to(tl.int64)[:, None] * stride_hn
    w_cols = weight_ptr + offs_v.to(tl.int64)[None, :] * stride_wv
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for h0 in range(0, hidden_size, BLOCK_H):
        cur_h = h0 + offs_h
        mask_h = cur_h < hidden_size
        a = tl.load(h_rows + cur_h[None, :].to(tl.int64) * stride_hh, mask=mask_n[:, None] & mask_h[None, :], other=0.0)
        b = tl.load(w_cols + cur_h[:, None].to(tl.int64) * stride_wh, mask=mask_h[:, None] & mask_v[None, :], other=0.0)
        if DOT_FP32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        # "ieee": fp32 inputs must not silently drop to tf32 (it would cost ~3 digits); no effect on fp16/bf16.
        acc = tl.dot(a, b, acc, input_precision="ieee")
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_v, mask=mask_v, other=0.0).to(tl.float32)[None, :]
    return acc / temperature


@jit
def _dlogits_tile(
    z, offs_v, mask_v, row_ok, targets, lse, entropy, grad_logp, grad_entropy, temperature,
    HAS_GRAD_LOGP: tl.constexpr, HAS_GRAD_ENTROPY: tl.constexpr,
):
    # d(sum g_logp*logp + g_entropy*entropy)/dlogits for one fp32 tile; exactly 0 outside the vocabulary and in
    # ignored or out-of-range rows (even when their logits are NaN).
    p = tl.exp(z - lse[:, None])
    d = tl.zeros(z.shape, dtype=tl.float32)
    if HAS_GRAD_LOGP:
        onehot = tl.where(offs_v[None, :] == targets[:, None], 1.0, 0.0)
        d += grad_logp[:, None] * (onehot - p)
    if HAS_GRAD_ENTROPY:
        d -= grad_entropy[:, None] * p * (z - lse[:, None] + entropy[:, None])
    return tl.where(row_ok[:, None] & mask_v[None, :], d / temperature, 0.0)


@jit
def _fwd_partials_kernel(
    hidden_ptr, weight_ptr, bias_ptr, targets_ptr,
    part_max_ptr, part_sumexp_ptr, part_sumexp_dz_ptr, part_target_ptr,
    n_rows, vocab, hidden_size, v_per_split,
    stride_hn, stride_hh, stride_wv, stride_wh, temperature,
    HAS_BIAS: tl.constexpr, NEED_ENTROPY: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, DOT_FP32: tl.constexpr,
):
    # Partials of one (token block, vocabulary split), with m = max_v z: m, sum_v exp(z - m),
    # sum_v exp(z - m) * (z - m) and z[target] (0 if the target is outside the split), each an fp32 [BLOCK_N] row
    # of a [splits, N] buffer. Keeping z - m (<= 0) rather than z makes the entropy log(S) - sum p (z - m) a sum
    # of non-negative terms: no cancellation between lse and sum p z when the logits are large.
    # Grid (cdiv(N, BLOCK_N), splits); reads this block's hidden rows once per vocabulary tile and the split's
    # weight rows once.
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < n_rows
    targets = tl.load(targets_ptr + offs_n, mask=mask_n, other=-1)
    v_start = split * v_per_split
    v_end = tl.minimum(v_start + v_per_split, vocab)

    run_max = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    sum_exp = tl.zeros((BLOCK_N,), dtype=tl.float32)
    sum_exp_dz = tl.zeros((BLOCK_N,), dtype=tl.float32)
    target_z = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for v0 in range(v_start, v_end, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        mask_v = offs_v < v_end
        z = _logits_tile(
            hidden_ptr, weight_ptr, bias_ptr, offs_n, offs_v, mask_n, mask_v, hidden_size,
            stride_hn, stride_hh, stride_wv, stride_wh, temperature,
            HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_H, DOT_FP32,
        )
        z = tl.where(mask_v[None, :], z, float("-inf"))
        # Every split starts with a tile holding >= 1 real column, so new_max is finite for finite logits.
        new_max = tl.maximum(run_max, tl.max(z, axis=1))
        rescale = tl.exp(run_max - new_max)
        e = tl.exp(z - new_max[:, None])
        if NEED_ENTROPY:
            # Re-base sum e (z - old max) on the new max: sum e' (z - new) = rescale * (sum_exp_dz + delta * sum_exp).
            # delta is 0 before the first tile (and -inf * 0 would be NaN); padded columns contribute 0 * 0.
            delta = tl.where(sum_exp > 0, run_max - new_max, 0.0)
            sum_exp_dz = rescale * (sum_exp_dz + delta * sum_exp) + tl.sum(
                e * tl.where(mask_v[None, :], z - new_max[:, None], 0.0), axis=1
            )
        sum_exp = sum_exp * rescale + tl.sum(e, axis=1)
        target_z += tl.sum(tl.where(offs_v[None, :] == targets[:, None], z, 0.0), axis=1)
        run_max = new_max

    out = split.to(tl.int64) * n_rows + offs_n
    tl.store(part_max_ptr + out, run_max, mask=mask_n)
    tl.store(part_sumexp_ptr + out, sum_exp, mask=mask_n)
    if NEED_ENTROPY:
        tl.store(part_sumexp_dz_ptr + out, sum_exp_dz, mask=mask_n)
    tl.store(part_target_ptr + out, target_z, mask=mask_n)


@jit
def _row_state(
    targets_ptr, lse_ptr, entropy_ptr, grad_logp_ptr, grad_entropy_ptr, offs_n, mask_n,
    HAS_GRAD_LOGP: tl.constexpr, HAS_GRAD_ENTROPY: tl.constexpr,
):
    # What both backward kernels need per token row; ignored rows (target < 0) get zero incoming gradients.
    targets = tl.load(targets_ptr + offs_n, mask=mask_n, other=-1)
    row_ok = mask_n & (targets >= 0)
    lse = tl.load(lse_ptr + offs_n, mask=mask_n, other=0.0)
    entropy = tl.zeros_like(lse)
    grad_logp = tl.zeros_like(lse)
    grad_entropy = tl.zeros_like(lse)
    if HAS_GRAD_LOGP:
        grad_logp = tl.load(grad_logp_ptr + offs_n, mask=row_ok, other=0.0)
    if HAS_GRAD_ENTROPY:
        entropy = tl.load(entropy_ptr + offs_n, mask=row_ok, other=0.0)
        grad_entropy = tl.load(grad_entropy_ptr + offs_n, mask=row_ok, other=0.0)
    return targets, row_ok, lse, entropy, grad_logp, grad_entropy


@jit
def _bwd_hidden_kernel(
    hidden_ptr, weight_ptr, bias_ptr, targets_ptr, lse_ptr, entropy_ptr, grad_logp_ptr, grad_entropy_ptr,
    grad_hidden_ptr,
    n_rows, vocab, hidden_size,
    stride_hn, stride_hh, stride_wv, stride_wh, temperature,
    HAS_BIAS: tl.constexpr, HAS_GRAD_LOGP: tl.constexpr, HAS_GRAD_ENTROPY: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, DOT_FP32: tl.constexpr,
):
    # grad_hidden[rows] = dlogits[rows, :] @ W, accumulated in an fp32 [N, H] buffer (zero-initialized) that only
    # this program touches. Grid (cdiv(N, BLOCK_N),); per vocabulary tile: one recompute pass over H, then one
    # read-modify-write pass over this block's grad_hidden rows and the tile's weight rows.
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < n_rows
    targets, row_ok, lse, entropy, grad_logp, grad_entropy = _row_state(
        targets_ptr, lse_ptr, entropy_ptr, grad_logp_ptr, grad_entropy_ptr, offs_n, mask_n,
        HAS_GRAD_LOGP, HAS_GRAD_ENTROPY,
    )

    offs_h = tl.arange(0, BLOCK_H)
    gh_rows = grad_hidden_ptr + offs_n.to(tl.int64)[:, None] * hidden_size
    for v0 in range(0, vocab, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        mask_v = offs_v < vocab
        z = _logits_tile(
            hidden_ptr, weight_ptr, bias_ptr, offs_n, offs_v, mask_n, mask_v, hidden_size,
            stride_hn, stride_hh, stride_wv, stride_wh, temperature,
            HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_H, DOT_FP32,
        )
        d = _dlogits_tile(
            z, offs_v, mask_v, row_ok, targets, lse, entropy, grad_logp, grad_entropy, temperature,
            HAS_GRAD_LOGP, HAS_GRAD_ENTROPY,
        ).to(weight_ptr.dtype.element_ty)
        if DOT_FP32:
            d = d.to(tl.float32)
        w_rows = weight_ptr + offs_v.to(tl.int64)[:, None] * stride_wv
        # The previous tile's stores to these rows may come from other threads of this program (the store and
        # the load need not share a register layout): make them visible before reading.
        tl.debug_barrier()
        for h0 in range(0, hidden_size, BLOCK_H):
            cur_h = h0 + offs_h
            mask_h = cur_h < hidden_size
            w = tl.load(w_rows + cur_h[None, :].to(tl.int64) * stride_wh, mask=mask_v[:, None] & mask_h[None, :],
                        other=0.0)
            if DOT_FP32:
                w = w.to(tl.float32)
            gh_mask = mask_n[:, None] & mask_h[None, :]
            gh = tl.load(gh_rows + cur_h[None, :], mask=gh_mask, other=0.0)
            gh = tl.dot(d, w, gh, input_precision="ieee")
            tl.store(gh_rows + cur_h[None, :], gh, mask=gh_mask)


@jit
def _bwd_weight_kernel(
    hidden_ptr, weight_ptr, bias_ptr, targets_ptr, lse_ptr, entropy_ptr, grad_logp_ptr, grad_entropy_ptr,
    grad_weight_ptr, grad_bias_ptr,
    n_rows, vocab, hidden_size,
    stride_hn, stride_hh, stride_wv, stride_wh, temperature,
    HAS_BIAS: tl.constexpr, HAS_GRAD_LOGP: tl.constexpr, HAS_GRAD_ENTROPY: tl.constexpr,
    NEED_GRAD_WEIGHT: tl.constexpr, NEED_GRAD_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, DOT_FP32: tl.constexpr,
):
    # grad_weight[cols] = dlogits[:, cols]^T @ hidden (fp32 [V, H] buffer, zero-initialized, rows owned by this
    # program) and grad_bias[cols] = sum_n dlogits[n, cols] (fp32 registers). Grid (cdiv(V, BLOCK_V),); per token
    # tile: one recompute pass over H, then one read-modify-write pass over this block's grad_weight rows.
    pid = tl.program_id(0)
    offs_v = pid * BLOCK_V + tl.arange(0, BLOCK_V)
    mask_v = offs_v < vocab
    offs_h = tl.arange(0, BLOCK_H)
    gw_rows = grad_weight_ptr + offs_v.to(tl.int64)[:, None] * hidden_size
    grad_bias = tl.zeros((BLOCK_V,), dtype=tl.float32)
    for n0 in range(0, n_rows, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < n_rows
        targets, row_ok, lse, entropy, grad_logp, grad_entropy = _row_state(
            targets_ptr, lse_ptr, entropy_ptr, grad_logp_ptr, grad_entropy_ptr, offs_n, mask_n,
            HAS_GRAD_LOGP, HAS_GRAD_ENTROPY,
        )
        z = _logits_tile(
            hidden_ptr, weight_ptr, bias_ptr, offs_n, offs_v, mask_n, mask_v, hidden_size,
            stride_hn, stride_hh, stride_wv, stride_wh, temperature,
            HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_H, DOT_FP32,
        )
        d = _dlogits_tile(
            z, offs_v, mask_v, row_ok, targets, lse, entropy, grad_logp, grad_entropy, temperature,
            HAS_GRAD_LOGP, HAS_GRAD_ENTROPY,
        )
        if NEED_GRAD_BIAS:
            grad_bias += tl.sum(d, axis=0)
        if NEED_GRAD_WEIGHT:
            d_t = tl.trans(d.to(hidden_ptr.dtype.element_ty))
            if DOT_FP32:
                d_t = d_t.to(tl.float32)
            h_rows = hidden_ptr + offs_n.to(tl.int64)[:, None] * stride_hn
            tl.debug_barrier()  # see _bwd_hidden_kernel: the previous tile's stores must be visible
            for h0 in range(0, hidden_size, BLOCK_H):
                cur_h = h0 + offs_h
                mask_h = cur_h < hidden_size
                # Ignored rows read as 0, so padding with non-finite hidden states cannot reach grad_weight.
                h = tl.load(h_rows + cur_h[None, :].to(tl.int64) * stride_hh, mask=row_ok[:, None] & mask_h[None, :],
                            other=0.0)
                if DOT_FP32:
                    h = h.to(tl.float32)
                gw_mask = mask_v[:, None] & mask_h[None, :]
                gw = tl.load(gw_rows + cur_h[None, :], mask=gw_mask, other=0.0)
                gw = tl.dot(d_t, h, gw, input_precision="ieee")
                tl.store(gw_rows + cur_h[None, :], gw, mask=gw_mask)
    if NEED_GRAD_BIAS:
        tl.store(grad_bias_ptr + offs_v, grad_bias, mask=mask_v)


# ----------------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Blocks:
    block_n: int
    block_v: int
    block_h: int
    v_per_split: int  # a multiple of block_v: vocabulary columns per forward program
    num_warps: int
    num_stages: int


@functools.lru_cache(maxsize=8)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _pick_blocks(n_rows: int, vocab: int, dtype: torch.dtype, device: torch.device, *, backward: bool) -> _Blocks:
    """Fixed block sizes from the shapes (no autotuning: it cannot run under the interpreter)."""
    if device.type != "cuda":
        # Interpreter: every tl op is a numpy call per program, so small tiles keep tests fast; two tiles per split
        # exercise both the in-program online logsumexp and the cross-split merge.
        block_n, block_v, block_h = 16, 32, 32
        return _Blocks(block_n, block_v, block_h, v_per_split=2 * block_v, num_warps=4, num_stages=1)
    # Chosen (untimed) as the largest tiles that compile for sm_90 without register spills: the fp32 "ieee" dot
    # runs on FMA units and needs far more registers than the 16-bit tensor-core dot; the backward holds the
    # dlogits tile next to the grad tile. Timed tuning on a GPU is a follow-up.
    if dtype == torch.float32:
        block_n, block_v, block_h = 64, 64, 16
    else:
        block_n, block_v, block_h = 64, 128, 32 if backward else 64
    row_blocks = triton.cdiv(n_rows, block_n)
    v_tiles = triton.cdiv(vocab, block_v)
    # Forward: split the vocabulary until there are ~2 programs per SM; more splits only add merge work.
    index = device.index if device.index is not None else torch.cuda.current_device()
    splits = max(1, min(v_tiles, triton.cdiv(2 * _sm_count(index), row_blocks)))
    v_per_split = triton.cdiv(v_tiles, splits) * block_v
    return _Blocks(block_n, block_v, block_h, v_per_split, num_warps=8, num_stages=2 if dtype == torch.float32 else 3)


def _dot_fp32(dtype: torch.dtype, device: torch.device) -> bool:
    # The interpreter's tl.dot is wrong for bf16 operands: upcast there (GPU runs keep the bf16 tensor-core dot).
    return dtype == torch.bfloat16 and device.type == "cpu" and interpreter_enabled()


def _triton_forward(hidden, weight, bias, targets, temperature, need_entropy):
    n_rows, hidden_size = hidden.shape
    vocab = weight.shape[0]
    blocks = _pick_blocks(n_rows, vocab, hidden.dtype, hidden.device, backward=False)
    splits = triton.cdiv(vocab, blocks.v_per_split)
    part_max, part_sumexp, part_target = (_new_buffer((splits, n_rows), hidden.device) for _ in range(3))
    part_sumexp_dz = _new_buffer((splits, n_rows), hidden.device) if need_entropy else part_max
    grid = (triton.cdiv(n_rows, blocks.block_n), splits)
    _fwd_partials_kernel[grid](
        hidden, weight, bias if bias is not None else hidden, targets,
        part_max, part_sumexp, part_sumexp_dz, part_target,
        n_rows, vocab, hidden_size, blocks.v_per_split,
        hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1), temperature,
        HAS_BIAS=bias is not None, NEED_ENTROPY=need_entropy,
        BLOCK_N=blocks.block_n, BLOCK_V=blocks.block_v, BLOCK_H=blocks.block_h,
        DOT_FP32=_dot_fp32(hidden.dtype, hidden.device),
        num_warps=blocks.num_warps, num_stages=blocks.num_stages,
    )
    # Merge of the [splits, N] partials: fixed-shape torch reductions, so deterministic.
    row_max = part_max.max(dim=0).values
    rescale = torch.exp(part_max - row_max)
    sum_exp = (part_sumexp * rescale).sum(dim=0)
    log_sum_exp = torch.log(sum_exp)
    lse = row_max + log_sum_exp
    logp = part_target.sum(dim=0) - lse
    entropy = None
    if need_entropy:
        # sum_v exp(z - M) (z - M) = sum_splits rescale * (sum_exp_dz + (m - M) * sum_exp), with M the row max.
        sum_exp_dz = (rescale * (part_sumexp_dz + (part_max - row_max) * part_sumexp)).sum(dim=0)
        entropy = log_sum_exp - sum_exp_dz / sum_exp
    return logp, entropy, (lse,)


def _triton_backward(hidden, weight, bias, targets, stats, entropy, grad_logp, grad_entropy, temperature, needs):
    (lse,) = stats
    need_hidden, need_weight, need_bias = needs
    n_rows, hidden_size = hidden.shape
    vocab = weight.shape[0]
    blocks = _pick_blocks(n_rows, vocab, hidden.dtype, hidden.device, backward=True)
    common = dict(
        HAS_BIAS=bias is not None, HAS_GRAD_LOGP=grad_logp is not None, HAS_GRAD_ENTROPY=grad_entropy is not None,
        BLOCK_N=blocks.block_n, BLOCK_V=blocks.block_v, BLOCK_H=blocks.block_h,
        DOT_FP32=_dot_fp32(hidden.dtype, hidden.device), num_warps=blocks.num_warps, num_stages=blocks.num_stages,
    )
    # Unused pointer slots get any valid tensor; the constexpr flags keep the kernels from touching them.
    args = (
        hidden, weight, bias if bias is not None else lse, targets, lse,
        entropy if entropy is not None else lse,
        grad_logp if grad_logp is not None else lse,
        grad_entropy if grad_entropy is not None else lse,
    )
    scalars = (n_rows, vocab, hidden_size, hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
               temperature)
    grad_hidden = grad_weight = grad_bias = None
    if need_hidden:
        grad_hidden = torch.zeros((n_rows, hidden_size), dtype=torch.float32, device=hidden.device)
        _bwd_hidden_kernel[(triton.cdiv(n_rows, blocks.block_n),)](*args, grad_hidden, *scalars, **common)
        grad_hidden = grad_hidden.to(hidden.dtype)
    if need_weight or need_bias:
        grad_weight = (torch.zeros((vocab, hidden_size), dtype=torch.float32, device=hidden.device)
                       if need_weight else lse)
        grad_bias = _new_buffer((vocab,), hidden.device) if need_bias else lse
        _bwd_weight_kernel[(triton.cdiv(vocab, blocks.block_v),)](
            *args, grad_weight, grad_bias, *scalars,
            NEED_GRAD_WEIGHT=need_weight, NEED_GRAD_BIAS=need_bias, **common,
        )
        grad_weight = grad_weight.to(weight.dtype) if need_weight else None
        grad_bias = grad_bias.to(bias.dtype) if need_bias else None
    return grad_hidden, grad_weight, grad_bias


# ----------------------------------------------------------------------------------------------------------------
# torch path (chunked over rows)
# ----------------------------------------------------------------------------------------------------------------


def _torch_chunk_rows(vocab: int) -> int:
    return max(1, _TORCH_CHUNK_BYTES // (4 * vocab))


def _shifted_chunk_logits(hidden_chunk, weight, bias, row_max=None):
    """fp32 ``logits - row_max`` for a chunk of rows; ``row_max`` defaults to the chunk's own row maxima.

    The matmul runs in the input dtype, as ``hidden @ weight.T`` would (an fp32 copy of a large weight would cost
    V*H*4 bytes). Log-probs and entropy do not change under a per-row shift, but with logits <= 0 the entropy
    lse - sum p z is a sum of two non-negative terms instead of a difference of two large ones.
    """
    logits = hidden_chunk @ weight.T if bias is None else torch.addmm(bias, hidden_chunk, weight.T)
    logits = logits.float()
    if row_max is None:
        row_max = logits.amax(dim=-1)
    logits -= row_max.unsqueeze(-1)
    return logits, row_max


def _torch_forward(hidden, weight, bias, targets, temperature, need_entropy):
    n_rows = hidden.shape[0]
    logp = _new_buffer((n_rows,), hidden.device)
    lse_shifted = _new_buffer((n_rows,), hidden.device)
    row_max = _new_buffer((n_rows,), hidden.device)
    entropy = _new_buffer((n_rows,), hidden.device) if need_entropy else None
    chunk = _torch_chunk_rows(weight.shape[0])
    for start in range(0, n_rows, chunk):
        rows = slice(start, start + chunk)
        logits, row_max[rows] = _shifted_chunk_logits(hidden[rows], weight, bias)
        lp, ent, lse = logprobs_entropy_chunk(logits, targets[rows], temperature, _NO_TARGET, need_entropy)
        logp[rows], lse_shifted[rows] = lp, lse
        if need_entropy:
            entropy[rows] = ent
        del logits, lp, ent, lse
    return logp, entropy, (lse_shifted, row_max)


def _torch_backward(hidden, weight, bias, targets, stats, entropy, grad_logp, grad_entropy, temperature, needs):
    lse_shifted, row_max = stats
    need_hidden, need_weight, need_bias = needs
    n_rows, hidden_size = hidden.shape
    vocab = weight.shape[0]
    grad_hidden = torch.empty((n_rows, hidden_size), dtype=hidden.dtype, device=hidden.device) if need_hidden else None
    grad_weight = torch.zeros((vocab, hidden_size), dtype=torch.float32, device=hidden.device) if need_weight else None
    grad_bias = torch.zeros((vocab,), dtype=torch.float32, device=hidden.device) if need_bias else None
    chunk = _torch_chunk_rows(vocab)
    for start in range(0, n_rows, chunk):
        rows = slice(start, start + chunk)
        tg = targets[rows]
        # Shift by the forward's row max so the saved (shifted) lse applies as is.
        logits, _ = _shifted_chunk_logits(hidden[rows], weight, bias, row_max[rows])
        g = grad_logits_chunk(
            logits, tg, lse_shifted[rows], None if entropy is None else entropy[rows],
            None if grad_logp is None else grad_logp[rows], None if grad_entropy is None else grad_entropy[rows],
            temperature, _NO_TARGET,
        )
        del logits
        ignored = (tg == _NO_TARGET).unsqueeze(-1)
        # Ignored rows give 0 * p, which is NaN when their logits are: force exact zeros.
        g.masked_fill_(ignored, 0.0)
        if need_hidden:
            grad_hidden[rows] = g.to(hidden.dtype) @ weight
        if need_weight:
            grad_weight.addmm_(g.T, hidden[rows].float().masked_fill(ignored, 0.0))
        if need_bias:
            grad_bias += g.sum(dim=0)
        del g
    return (
        grad_hidden,
        None if grad_weight is None else grad_weight.to(weight.dtype),
        None if grad_bias is None else grad_bias.to(bias.dtype),
    )


# ----------------------------------------------------------------------------------------------------------------
# autograd glue and the public function
# ----------------------------------------------------------------------------------------------------------------


class _FusedLinearLogprobs(torch.autograd.Function):
    """hidden ``[N, H]``, weight ``[V, H]``, bias ``[V]`` or None, targets ``[N]`` int32 (-1 = ignored) ->
    fp32 logp ``[N]`` (and entropy ``[N]`` when ``need_entropy``).

    Saved for backward: the inputs, the entropy, and the backend's ``[N]`` statistics (Triton: lse; torch: lse of
    the max-shifted logits and the row max).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, need_entropy, backend):
        if hidden.shape[0] == 0:
            logp = torch.zeros(0, dtype=torch.float32, device=hidden.device)
            entropy, stats = (logp.clone() if need_entropy else None), ()
        elif backend == "triton":
            logp, entropy, stats = _triton_forward(hidden, weight, bias, targets, temperature, need_entropy)
        else:
            logp, entropy, stats = _torch_forward(hidden, weight, bias, targets, temperature, need_entropy)
        ignored = targets == _NO_TARGET
        logp = logp.masked_fill(ignored, 0.0)
        if need_entropy:
            entropy = entropy.masked_fill(ignored, 0.0)
        ctx.save_for_backward(hidden, weight, bias, targets, entropy, *stats)
        ctx.temperature = temperature
        ctx.backend = backend
        ctx.set_materialize_grads(False)
        return (logp, entropy) if need_entropy else logp

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads):
        hidden, weight, bias, targets, entropy, *stats = ctx.saved_tensors
        grad_logp = grads[0]
        grad_entropy = grads[1] if len(grads) > 1 else None
        needs = tuple(ctx.needs_input_grad[:3])
        none_tail = (None, None, None, None)
        if grad_logp is None and grad_entropy is None:
            return (None, None, None) + none_tail
        grad_logp = None if grad_logp is None else grad_logp.float().contiguous()
        grad_entropy = None if grad_entropy is None else grad_entropy.float().contiguous()
        if hidden.shape[0] == 0:
            grad_hidden = torch.zeros_like(hidden) if needs[0] else None
            grad_weight = torch.zeros_like(weight) if needs[1] else None
            grad_bias = torch.zeros_like(bias) if needs[2] else None
        else:
            backward_impl = _triton_backward if ctx.backend == "triton" else _torch_backward
            grad_hidden, grad_weight, grad_bias = backward_impl(
                hidden, weight, bias, targets, stats, entropy, grad_logp, grad_entropy, ctx.temperature, needs
            )
        return (grad_hidden, grad_weight, grad_bias) + none_tail


def fused_linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-probs of ``targets`` under ``softmax((hidden @ weight.T + bias) / temperature)``, without the logits.

    The same values as ``token_logprobs(hidden @ weight.T + bias, targets, ...)``, but the ``[N, V]`` logits are
    never stored: the Triton kernels work on tiles, the torch path on chunks of rows. Differentiable w.r.t.
    ``hidden``, ``weight`` and ``bias``, through the log-probs and the entropy, with per-token upstream gradients;
    the backward recomputes the logits. Deterministic: the same inputs give bitwise the same outputs and gradients.

    Args:
        hidden: ``[..., H]`` float32/float16/bfloat16, the last hidden states (e.g. ``[B, T, H]``).
        weight: ``[V, H]``, same dtype and device as ``hidden``: the lm-head weight.
        targets: ``hidden.shape[:-1]`` int64/int32 token ids in ``[0, V)``, or ``ignore_index``.
        bias: optional ``[V]`` lm-head bias, same dtype as ``hidden``.
        temperature: > 0; log-probs are taken under ``softmax(logits / temperature)`` (the sampling distribution).
        ignore_index: targets equal to this give log-prob 0, entropy 0 and exactly zero gradient (even if that
            row's hidden state is not finite).
        return_entropy: also return the entropy of ``softmax(logits / temperature)`` per token.
        backend: ``"auto"`` (CUDA -> Triton, CPU -> torch), ``"triton"`` or ``"torch"``; see
            ``remax_kernels._dispatch``.

    Returns:
        float32 log-probs with ``targets.shape`` (all <= 0), or ``(logprobs, entropy)`` when ``return_entropy``.
        Gradients are written in the dtype of ``hidden`` / ``weight`` / ``bias`` (accumulated in fp32).

    Memory: the Triton path keeps ``[N]`` lse/entropy for backward and uses fp32 scratch of ``N*H`` and ``V*H``
    floats while computing gradients; the torch path allocates O(chunk x V) temporaries (16 MiB of fp32 logits per
    chunk, a few times that in temporaries).

    Example::

        >>> import torch, remax_kernels as rk
        >>> hidden = torch.randn(2, 5, 64, requires_grad=True)
        >>> lm_head = torch.nn.Linear(64, 1000, bias=False)
        >>> targets = torch.randint(0, 1000, (2, 5))
        >>> logp, entropy = rk.fused_linear_logprobs(hidden, lm_head.weight, targets, return_entropy=True)
        >>> logp.shape, logp.dtype
        (torch.Size([2, 5]), torch.float32)
        >>> (logp.sum() + 0.01 * entropy.sum()).backward()
    """
    check_float("hidden", hidden)
    check_float("weight", weight)
    check_index("targets", targets)
    if bias is not None:
        check_float("bias", bias)
    if hidden.dim() < 1:
        raise ValueError("hidden: expected a tensor [..., H] with at least one dimension, got a 0-d tensor")
    if weight.dim() != 2:
        raise ValueError(f"weight: expected a 2-D tensor [V, H], got shape {tuple(weight.shape)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.dtype != hidden.dtype:
            raise TypeError(
                f"{name}: dtype {str(t.dtype).replace('torch.', '')} does not match hidden's "
                f"{str(hidden.dtype).replace('torch.', '')}; cast them to one dtype"
            )
    vocab, hidden_size = weight.shape
    if hidden.shape[-1] != hidden_size:
        raise ValueError(
            f"hidden, weight: hidden size mismatch: hidden.shape[-1] = {hidden.shape[-1]} but weight is [V, H] = "
            f"{tuple(weight.shape)}"
        )
    if hidden_size == 0:
        raise ValueError("hidden: hidden size H must be > 0")
    if vocab == 0:
        raise ValueError("weight: vocabulary size V must be > 0")
    if bias is not None:
        check_shape("bias", bias, (vocab,), "[V], V = weight.shape[0]")
    check_shape("targets", targets, tuple(hidden.shape[:-1]), "hidden.shape[:-1]")
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise TypeError(f"ignore_index: expected an int, got {type(ignore_index).__name__}")
    if not isinstance(return_entropy, bool):
        raise TypeError(f"return_entropy: expected a bool, got {type(return_entropy).__name__}")
    temperature = check_temperature("temperature", temperature)
    device = check_same_device(hidden=hidden, weight=weight, targets=targets, bias=bias)
    impl = resolve_backend(backend, device)
    check_targets("targets", targets, vocab, ignore_index)

    kernel_targets = targets.reshape(-1).masked_fill(targets.reshape(-1) == ignore_index, _NO_TARGET)
    kernel_targets = kernel_targets.to(torch.int32).contiguous()
    out = _FusedLinearLogprobs.apply(
        hidden.reshape(-1, hidden_size), weight, bias, kernel_targets, temperature, return_entropy, impl
    )
    if return_entropy:
        return out[0].view(targets.shape), out[1].view(targets.shape)
    return out.view(targets.shape)
