"""Per-token log-probs (and entropy) of the taken tokens, straight from logits, with a one-pass Triton kernel.

``token_logprobs(logits, targets)`` returns ``log_softmax(logits / T)[targets]`` without materializing the
``[N, V]`` log-softmax, in fp32, and optionally the entropy of the same distribution. Its backward makes one more
pass over the logits and writes ``d/d logits`` directly (optionally into the logits' own storage).

In this file, in order: the Triton kernels; the row layout and launchers; ``row_forward`` / ``row_backward``, the
row passes for every backend (also run by the fused lm-head pipeline between its GEMMs); a chunked torch path for
CPU tensors; the ``torch.library`` ops with their fake implementations and autograd; the public function.

Row layout. The kernels address row ``r`` of a ``[..., V]`` tensor at ``(r // T1) * s0 + (r % T1) * s1`` elements
from its data pointer, so a view such as ``logits[:, :-1]`` of a ``[B, T, V]`` tensor (rows of one sequence are
``V`` apart, sequences ``T * V`` apart) is read in place. Leading dimensions are collapsed first where their
strides allow; only a view that still needs three or more leading strides, or whose last dimension is not
contiguous, is copied (documented in ``token_logprobs``).
"""

from __future__ import annotations

import torch

from remax_kernels import _cuda
from remax_kernels._dispatch import check_backend, resolve_backend
from remax_kernels._torch_math import grad_logits_chunk, logprobs_entropy_chunk, soft_cap, soft_cap_grad
from remax_kernels._triton import jit, tl, triton
from remax_kernels._validate import (
    check_float,
    check_index,
    check_same_device,
    check_shape,
    check_softcap,
    check_targets,
    check_temperature,
    value_checks_enabled,
)

# The vocabulary block one program reads per loop step, and its warps: 16 fp32 values per thread (two 16-byte
# loads of bf16). The sampling kernel reads its rows with the same blocks, warps and online-softmax step
# (``online_softmax_step``), so the log-probs both report for a token agree bit for bit (tests/test_consistency.py).
ROW_BLOCK_V = 2048
ROW_NUM_WARPS = 4
# The torch path materializes at most about this many fp32 elements per temporary (16 MiB): rows are processed
# in chunks of max(1, _TORCH_CHUNK_ELEMENTS // V).
_TORCH_CHUNK_ELEMENTS = 1 << 22


@jit
def tanh_fp32(u):
    # tanh(u) = 1 - 2 / (exp(2u) + 1): one exp and one division (the SFU's), exact limits +-1 where exp overflows
    # to inf or underflows to 0; absolute error a few fp32 ulps of 1, which is what the logits need (softmax is
    # shift-invariant, so what matters is the absolute error of cap * tanh, ~cap * 1e-7).
    return 1.0 - 2.0 / (tl.exp(2.0 * u) + 1.0)


@jit
def soft_cap_logits(x, cap, inv_cap):
    # Logit soft-capping cap * tanh(x / cap), applied to the raw logits as they are loaded (before the temperature),
    # as Gemma-2/3's final_logit_softcapping. -inf stays -inf (masked tokens and masked lanes stay masked).
    return tl.where(x == float("-inf"), x, cap * tanh_fp32(x * inv_cap))


@jit
def online_softmax_step(x, mask, m, s, w, inv_temperature, COMPUTE_ENTROPY: tl.constexpr):
    # One block of the online softmax of a row, relative to the running max m of the RAW logits x (before the
    # temperature): s = sum exp(d), w = sum exp(d) * d with d = (x - m) * inv_temperature, rescaled when m grows.
    # Masked lanes hold -inf (exp gives 0). Shared by the log-prob and the sampling kernels.
    m_new = tl.maximum(m, tl.max(x, axis=0))
    # While every value so far is -inf, shift by 0 instead of -inf to avoid inf - inf = NaN.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    shift = tl.where(m == float("-inf"), 0.0, (m - m_safe) * inv_temperature)
    scale = tl.exp(shift)
    d = (x - m_safe) * inv_temperature
    e = tl.exp(d)
    if COMPUTE_ENTROPY:
        w = scale * (w + s * shift) + tl.sum(tl.where(mask, e * d, 0.0), axis=0)
    s = s * scale + tl.sum(e, axis=0)
    return m_new, s, w


@jit
def token_logprob(x_target, m, s, inv_temperature):
    # log softmax(x / T)[target] from online_softmax_step's (m, s); never > 0 (see the forward kernel).
    logp = (x_target - m) * inv_temperature - tl.log(s)
    # logp <= 0 holds exactly in real arithmetic (x_target <= m, s >= 1); an approximate log of s ~ 1 must not make
    # it +1e-7 (positive log-probs broke RL training: verl #2656). tl.where, not tl.minimum: NaN propagates.
    return tl.where(logp > 0.0, 0.0, logp)


@jit
def _token_logprobs_fwd_kernel(
    logits_ptr,
    targets_ptr,
    logp_ptr,
    row_max_ptr,
    log_norm_ptr,
    entropy_ptr,
    V,
    T1,
    stride_0,
    stride_1,
    temperature,
    ignore_index,
    softcap,
    BLOCK_V: tl.constexpr,
    COMPUTE_ENTROPY: tl.constexpr,
    SOFTCAP: tl.constexpr,
):
    # Per row, with x = logits, m = max(x), d = (x - m) / T, s = sum exp(d):
    #   logp = d[target] - log(s),  entropy = log(s) - sum exp(d) * d / s    (softmax(x / T) is that of d).
    # Grid: (N,), one program per row. Memory: ONE pass over the row's logits (plus one scalar load of the
    # target's logit). Online softmax in fp32: m, s and, for the entropy, w = sum exp(d) * d are rescaled
    # whenever m grows. Everything stays relative to the max, taken on x before dividing by T, rather than as
    # lse = logsumexp(x / T) and sum(p * x / T): at |x| ~ 1000 those round to fp32 at |x|'s scale and their
    # difference loses the digits logp and entropy need; x - m is exact for the entries that matter.
    # m and log(s) are saved separately for the backward. Ignored rows (target == ignore_index) skip the loop
    # and get logp = entropy = m = log(s) = 0. SOFTCAP: x is cap * tanh(raw / cap) of the loaded logits (m, s, w
    # are those of the capped row), computed in the same pass.
    row = tl.program_id(0).to(tl.int64)
    inv_temperature = 1.0 / temperature  # on the device, as the sampling kernel computes it
    inv_cap = 1.0 / softcap if SOFTCAP else 0.0
    base = (row // T1) * stride_0 + (row % T1) * stride_1
    target = tl.load(targets_ptr + row).to(tl.int64)
    valid = target != ignore_index
    # Targets are range-checked on the host only on request (it needs a device sync): an out-of-range one must
    # not read outside the row, and gives a NaN log-prob instead.
    in_range = (target >= 0) & (target < V)
    x_target = tl.load(logits_ptr + base + target, mask=valid & in_range, other=float("nan")).to(tl.float32)
    if SOFTCAP:
        x_target = soft_cap_logits(x_target, softcap, inv_cap)

    offs = tl.arange(0, BLOCK_V)
    m = float("-inf")
    s = 0.0
    w = 0.0
    v_end = tl.where(valid, V, 0)
    for start in range(0, v_end, BLOCK_V):
        cols = start + offs
        mask = cols < V
        x = tl.load(logits_ptr + base + cols, mask=mask, other=float("-inf")).to(tl.float32)
        if SOFTCAP:
            x = soft_cap_logits(x, softcap, inv_cap)
        m, s, w = online_softmax_step(x, mask, m, s, w, inv_temperature, COMPUTE_ENTROPY)

    log_s = tl.log(s)
    logp = token_logprob(x_target, m, s, inv_temperature)
    tl.store(logp_ptr + row, tl.where(valid, logp, 0.0))
    tl.store(row_max_ptr + row, tl.where(valid, m, 0.0))
    tl.store(log_norm_ptr + row, tl.where(valid, log_s, 0.0))
    if COMPUTE_ENTROPY:
        entropy = log_s - w / s
        entropy = tl.where(entropy < 0.0, 0.0, entropy)  # >= 0 exactly in real arithmetic (w <= 0), as logp <= 0
        tl.store(entropy_ptr + row, tl.where(valid, entropy, 0.0))

@jit
def _token_logprobs_bwd_kernel(
    logits_ptr,
    targets_ptr,
    row_max_ptr,
    log_norm_ptr,
    entropy_ptr,
    grad_logp_ptr,
    grad_entropy_ptr,
    grad_ptr,
    V,
    T1,
    stride_0,
    stride_1,
    grad_T1,
    grad_stride_0,
    grad_stride_1,
    temperature,
    ignore_index,
    softcap,
    BLOCK_V: tl.constexpr,
    HAS_GRAD_LOGP: tl.constexpr,
    HAS_GRAD_ENTROPY: tl.constexpr,
    SOFTCAP: tl.constexpr,
):
    # grad = (g_lp * (onehot(target) - p) - g_ent * p * (log p + H)) / T for every vocabulary entry, with
    # log p = (x - m) / T - log(s) from the forward's saved m and log(s), per-row upstream gradients g_lp,
    # g_ent and the forward's entropy H (the formulas of _torch_math with z - lse = log p).
    # Grid: (N,), one program per row. Memory: one read of the logits and one write of the gradient, which
    # may be the logits' own storage (in-place: each block is read before it is overwritten, by the same
    # program). Ignored rows do not read the logits and get an all-zero gradient row. SOFTCAP: x is the capped
    # logit y = cap * tanh(raw / cap), recomputed from the loaded raw logit in the same pass, and the gradient is
    # chained through dy/draw = 1 - tanh(raw / cap)^2.
    row = tl.program_id(0).to(tl.int64)
    inv_temperature = 1.0 / temperature
    inv_cap = 1.0 / softcap if SOFTCAP else 0.0
    base = (row // T1) * stride_0 + (row % T1) * stride_1
    grad_base = (row // grad_T1) * grad_stride_0 + (row % grad_T1) * grad_stride_1
    target = tl.load(targets_ptr + row).to(tl.int64)
    valid = target != ignore_index
    m = tl.load(row_max_ptr + row)
    log_s = tl.load(log_norm_ptr + row)
    if HAS_GRAD_LOGP:
        g_logp = tl.load(grad_logp_ptr + row).to(tl.float32)
    if HAS_GRAD_ENTROPY:
        g_entropy = tl.load(grad_entropy_ptr + row).to(tl.float32)
        entropy = tl.load(entropy_ptr + row)

    offs = tl.arange(0, BLOCK_V)
    v_read = tl.where(valid, V, 0)
    for start in range(0, V, BLOCK_V):
        cols = start + offs
        mask = cols < V
        x = tl.load(logits_ptr + base + cols, mask=cols < v_read, other=0.0).to(tl.float32)
        if SOFTCAP:
            tanh_x = tanh_fp32(x * inv_cap)
            x = tl.where(x == float("-inf"), x, softcap * tanh_x)
        log_p = (x - m) * inv_temperature - log_s
        p = tl.exp(log_p)
        grad = tl.zeros([BLOCK_V], dtype=tl.float32)
        if HAS_GRAD_LOGP:
            grad += g_logp * (tl.where(cols == target, 1.0, 0.0) - p)
        if HAS_GRAD_ENTROPY:
            grad -= g_entropy * p * (log_p + entropy)
        if SOFTCAP:
            grad = grad * (1.0 - tanh_x * tanh_x)
        grad = tl.where(valid, grad * inv_temperature, 0.0)
        tl.store(grad_ptr + grad_base + cols, grad.to(grad_ptr.dtype.element_ty), mask=mask)


def _row_layout(x: torch.Tensor) -> tuple[int, int, int] | None:
    """``(T1, s0, s1)`` such that row ``r`` of ``x.reshape(-1, V)`` starts ``(r // T1) * s0 + (r % T1) * s1``
    elements after ``x.data_ptr()``; ``None`` when the leading dimensions need more than two strides.

    Leading dimensions of size 1 are dropped and neighbours ``(a, sa), (b, sb)`` with ``sa == b * sb`` are merged,
    so any contiguous tensor, and views such as ``x[:, :-1]`` or ``x[::2]``, get a layout without a copy.
    """
    if x.shape[:-1].numel() == 0:
        return 1, 0, 0
    merged: list[tuple[int, int]] = []
    for size, stride in zip(x.shape[:-1], x.stride()[:-1], strict=True):
        if size == 1:
            continue
        if merged and merged[-1][1] == size * stride:
            merged[-1] = (merged[-1][0] * size, stride)
        else:
            merged.append((size, stride))
    if not merged:
        return 1, 0, 0
    if len(merged) == 1:
        return merged[0][0], 0, merged[0][1]
    if len(merged) == 2:
        return merged[1][0], merged[0][1], merged[1][1]
    return None


def _contiguous_layout(layout: tuple[int, int, int], vocab_size: int) -> tuple[int, int, int]:
    """The layout of a contiguous tensor of the same shape, split into blocks of the same ``T1`` as ``layout`` (so
    that chunk walks over both line up row for row)."""
    t1 = layout[0]
    return t1, t1 * vocab_size, vocab_size


def _needs_copy(logits: torch.Tensor) -> bool:
    """Host-side metadata only: True when the kernels cannot address the rows of ``logits`` in place."""
    return _row_layout(logits) is None or (logits.stride(-1) != 1 and logits.shape[-1] > 1)


def _readable_rows(logits: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """``logits`` itself and its row layout, or (only when no two-stride layout exists or the last dimension is
    not contiguous) a contiguous copy and its layout."""
    if _needs_copy(logits):
        logits = logits.contiguous()
    return logits, _row_layout(logits)


def row_launch_config(vocab_size: int) -> tuple[int, int]:
    """``(BLOCK_V, num_warps)`` of the row kernels (and of the sampling kernel's passes) for a vocabulary of
    ``vocab_size``: whole rows up to ``ROW_BLOCK_V``, else ``ROW_BLOCK_V``-wide steps; >= 4 (four entries per
    Philox call in the sampling kernel)."""
    block_v = max(4, min(triton.next_power_of_2(vocab_size), ROW_BLOCK_V))
    # 16 values per thread: at 1024 values and 4 warps ptxas holds the sampling kernel's search state in fewer
    # registers and spills (scripts/compile_triton.py).
    return block_v, max(1, min(ROW_NUM_WARPS, block_v // 512))


# ----------------------------------------------------------------------------------------------------------------
# Row passes, one entry point per direction for every backend. The fused lm-head pipeline
# (``fused_linear_logprobs.py``) runs these same functions between its GEMMs.
# ----------------------------------------------------------------------------------------------------------------


def row_forward(
    logits: torch.Tensor, layout: tuple[int, int, int], targets: torch.Tensor, temperature: float,
    ignore_index: int, need_entropy: bool, impl: str, *, softcap: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """One pass over rows of ``logits`` (addressed through ``layout``) -> fp32 ``[N]``
    ``(logp, entropy or None, row_max, log_norm)``, with ``log p_v = (x_v - row_max) / T - log_norm``.

    ``softcap > 0``: ``x`` is the capped logit ``softcap * tanh(logits / softcap)`` (``row_max`` is its max), computed
    in the same pass; 0 is off.

    ``targets`` is a contiguous ``[N]`` int tensor; rows whose target is ``ignore_index`` get zeros everywhere.
    ``impl`` is ``"triton"``, ``"cuda"`` (the CUDA C++ row kernel of ``csrc/``) or ``"torch"`` (see ``_dispatch``).
    """
    if impl == "triton":
        return _triton_forward(logits, layout, targets, temperature, ignore_index, need_entropy, softcap)
    if impl == "cuda":
        logp, row_max, log_norm, entropy = _cuda.row_logprobs_forward(
            logits, targets, 1.0 / temperature, ignore_index, need_entropy, layout=layout, softcap=softcap)
        return logp, entropy, row_max, log_norm
    return _torch_forward(logits, layout, targets, temperature, ignore_index, need_entropy, softcap)


def row_backward(
    logits: torch.Tensor, layout: tuple[int, int, int], targets: torch.Tensor, row_max: torch.Tensor,
    log_norm: torch.Tensor, entropy: torch.Tensor | None, grad_logp: torch.Tensor | None,
    grad_entropy: torch.Tensor | None, temperature: float, ignore_index: int, inplace: bool, impl: str, *,
    softcap: float = 0.0,
) -> torch.Tensor:
    """d(sum grad_logp * logp + grad_entropy * entropy) / d logits, in the logits' dtype, from the forward's
    ``row_max``/``log_norm``/``entropy`` (with the forward's ``softcap``: the gradient w.r.t. the raw logits).
    ``inplace=True`` writes it over ``logits`` itself (each block is read before it is overwritten) and returns
    ``logits``; else a new tensor shaped like ``logits``, contiguous."""
    if inplace:
        grad, grad_layout = logits, layout
    else:
        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        grad_layout = _contiguous_layout(layout, logits.shape[-1])
    if impl == "cuda":
        return _cuda.row_logprobs_backward(logits, targets, row_max, log_norm, entropy, grad_logp, grad_entropy,
                                           1.0 / temperature, ignore_index, grad, layout=layout,
                                           out_layout=grad_layout, softcap=softcap)
    backward = _triton_backward if impl == "triton" else _torch_backward
    backward(logits, layout, targets, row_max, log_norm, entropy, grad_logp, grad_entropy, temperature, ignore_index,
             grad, grad_layout, softcap)
    return grad


def _triton_forward(logits, layout, targets, temperature, ignore_index, need_entropy, softcap):
    n, vocab_size = targets.numel(), logits.shape[-1]
    logp, row_max, log_norm = (torch.empty(n, dtype=torch.float32, device=logits.device) for _ in range(3))
    entropy = torch.empty(n, dtype=torch.float32, device=logits.device) if need_entropy else None
    if n == 0:
        return logp, entropy, row_max, log_norm
    block_v, num_warps = row_launch_config(vocab_size)
    t1, s0, s1 = layout
    _token_logprobs_fwd_kernel[(n,)](
        logits, targets, logp, row_max, log_norm, entropy if need_entropy else logp,
        vocab_size, t1, s0, s1, temperature, ignore_index, softcap,
        BLOCK_V=block_v, COMPUTE_ENTROPY=need_entropy, SOFTCAP=softcap > 0, num_warps=num_warps,
    )
    return logp, entropy, row_max, log_norm


def _triton_backward(logits, layout, targets, row_max, log_norm, entropy, grad_logp, grad_entropy, temperature,
                     ignore_index, grad, grad_layout, softcap):
    n, vocab_size = targets.numel(), logits.shape[-1]
    if n == 0:
        return
    block_v, num_warps = row_launch_config(vocab_size)
    t1, s0, s1 = layout
    g_t1, g_s0, g_s1 = grad_layout
    unused = row_max  # a valid pointer for the arguments a constexpr flag switches off
    _token_logprobs_bwd_kernel[(n,)](
        logits, targets, row_max, log_norm, unused if entropy is None else entropy,
        unused if grad_logp is None else grad_logp, unused if grad_entropy is None else grad_entropy, grad,
        vocab_size, t1, s0, s1, g_t1, g_s0, g_s1, temperature, ignore_index, softcap,
        BLOCK_V=block_v, HAS_GRAD_LOGP=grad_logp is not None, HAS_GRAD_ENTROPY=grad_entropy is not None,
        SOFTCAP=softcap > 0, num_warps=num_warps,
    )


def _row_chunks(logits: torch.Tensor, layout: tuple[int, int, int], chunk_rows: int):
    """Yield ``(first_row, view)`` covering all rows in order: ``view`` is a ``[a, b, V]`` view (never a copy) of
    ``a * b <= chunk_rows`` consecutive rows, read through the same two-stride layout as the kernels."""
    n, vocab_size = logits.shape[:-1].numel(), logits.shape[-1]
    t1, s0, s1 = layout
    rows3 = logits.as_strided((n // t1, t1, vocab_size), (s0, s1, logits.stride(-1)))
    if t1 >= chunk_rows:
        for i in range(rows3.shape[0]):
            for j in range(0, t1, chunk_rows):
                yield i * t1 + j, rows3[i : i + 1, j : j + chunk_rows]
    else:
        step = max(1, chunk_rows // t1)
        for i in range(0, rows3.shape[0], step):
            yield i * t1, rows3[i : i + step]


def _capped_chunk(view: torch.Tensor, softcap: float) -> torch.Tensor:
    """fp32 ``[n, V]`` rows of ``view``, soft-capped when ``softcap > 0``."""
    return soft_cap(view.reshape(-1, view.shape[-1]).float(), softcap)


def _shifted_chunk(rows: torch.Tensor, row_max: torch.Tensor) -> torch.Tensor:
    """fp32 ``[n, V]`` rows minus their max: log-probs and entropy do not change, but the chunk math's
    ``lse - sum(p * z)`` then subtracts numbers near 0, not near the logits' scale (|z| ~ 1000 would cost 3 digits)."""
    return rows - row_max.unsqueeze(-1)


def _torch_chunk_rows(vocab_size: int) -> int:
    return max(1, _TORCH_CHUNK_ELEMENTS // vocab_size)


def _torch_forward(logits, layout, targets, temperature, ignore_index, need_entropy, softcap):
    n = targets.numel()
    logp, log_norm, row_max = (torch.empty(n, dtype=torch.float32, device=logits.device) for _ in range(3))
    entropy = torch.empty(n, dtype=torch.float32, device=logits.device) if need_entropy else None
    for r0, view in _row_chunks(logits, layout, _torch_chunk_rows(logits.shape[-1])):
        r1 = r0 + view.shape[0] * view.shape[1]
        rows = _capped_chunk(view, softcap)
        row_max[r0:r1] = rows.amax(dim=-1)
        chunk = _shifted_chunk(rows, row_max[r0:r1])
        # The chunk is shifted by its row max, so the lse this returns is log_norm (the kernel's definition).
        lp, ent, ls = logprobs_entropy_chunk(chunk, targets[r0:r1], temperature, ignore_index, need_entropy)
        # Exact bounds that rounding could cross by an ulp (see the forward kernel); clamp keeps NaN.
        logp[r0:r1], log_norm[r0:r1] = lp.clamp_(max=0.0), ls
        if need_entropy:
            entropy[r0:r1] = ent.clamp_(min=0.0)
    return logp, entropy, row_max, log_norm


def _torch_backward(logits, layout, targets, row_max, log_norm, entropy, grad_logp, grad_entropy, temperature,
                    ignore_index, grad, grad_layout, softcap):
    chunk_rows = _torch_chunk_rows(logits.shape[-1])
    # Both generators walk the rows in the same order and chunk sizes, so the chunk pairs line up; in the in-place
    # case each chunk is read (and upcast to fp32) before the same rows are overwritten.
    chunk_pairs = zip(_row_chunks(logits, layout, chunk_rows), _row_chunks(grad, grad_layout, chunk_rows),
                      strict=True)
    for (r0, view), (_, grad_view) in chunk_pairs:
        r1 = r0 + view.shape[0] * view.shape[1]
        chunk = _shifted_chunk(_capped_chunk(view, softcap), row_max[r0:r1])
        g = grad_logits_chunk(
            chunk, targets[r0:r1], log_norm[r0:r1], None if entropy is None else entropy[r0:r1],
            None if grad_logp is None else grad_logp[r0:r1], None if grad_entropy is None else grad_entropy[r0:r1],
            temperature, ignore_index,
        )
        if softcap:
            g *= soft_cap_grad(view.reshape(g.shape).float(), softcap)
        grad_view.copy_(g.view(grad_view.shape))


# ----------------------------------------------------------------------------------------------------------------
# torch.library ops: one forward op, two backward ops (new buffer / in place), autograd wiring
# ----------------------------------------------------------------------------------------------------------------


def _forward_impl(logits, targets, temperature, ignore_index, need_entropy, backend, softcap):
    if value_checks_enabled(logits.device):
        check_targets("targets", targets, logits.shape[-1], ignore_index)
    rows, layout = _readable_rows(logits)
    logp, entropy, row_max, log_norm = row_forward(
        rows, layout, targets.reshape(-1).contiguous(), temperature, ignore_index, need_entropy,
        resolve_backend(backend, logits.device, op="token_logprobs"), softcap=softcap,
    )
    return logp, entropy if need_entropy else logp.new_empty(0), row_max, log_norm


def _forward_fake(logits, targets, temperature, ignore_index, need_entropy, backend, softcap=0.0):
    n = targets.numel()
    new = lambda size: logits.new_empty(size, dtype=torch.float32)
    return new(n), new(n if need_entropy else 0), new(n), new(n)


@torch.library.custom_op("remax_kernels::token_logprobs", mutates_args=())
def _token_logprobs_op(
    logits: torch.Tensor, targets: torch.Tensor, temperature: float, ignore_index: int, need_entropy: bool,
    backend: str, softcap: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> fp32 ``[N]`` (logp, entropy (``[0]`` when not needed), row_max, log_norm), N = targets.numel()."""
    return _forward_impl(logits, targets, temperature, ignore_index, need_entropy, backend, softcap)


# The in-place variant differs only in its backward; a second op keeps each op's autograd formula fixed (what
# torch.compile needs), and the public function chooses between them from host-side metadata.
@torch.library.custom_op("remax_kernels::token_logprobs_inplace_backward", mutates_args=())
def _token_logprobs_inplace_op(
    logits: torch.Tensor, targets: torch.Tensor, temperature: float, ignore_index: int, need_entropy: bool,
    backend: str, softcap: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``remax_kernels::token_logprobs`` whose backward overwrites the logits with their gradient."""
    return _forward_impl(logits, targets, temperature, ignore_index, need_entropy, backend, softcap)


_token_logprobs_op.register_fake(_forward_fake)
_token_logprobs_inplace_op.register_fake(_forward_fake)


@torch.library.custom_op("remax_kernels::token_logprobs_backward", mutates_args=())
def _token_logprobs_backward_op(
    logits: torch.Tensor, targets: torch.Tensor, row_max: torch.Tensor, log_norm: torch.Tensor,
    entropy: torch.Tensor | None, grad_logp: torch.Tensor | None, grad_entropy: torch.Tensor | None,
    temperature: float, ignore_index: int, backend: str, softcap: float = 0.0,
) -> torch.Tensor:
    """-> the gradient w.r.t. ``logits`` in a new contiguous tensor of the logits' shape and dtype."""
    rows, layout = _readable_rows(logits)
    return row_backward(
        rows, layout, targets.reshape(-1).contiguous(), row_max, log_norm, entropy, grad_logp, grad_entropy,
        temperature, ignore_index, False, resolve_backend(backend, logits.device, op="token_logprobs"),
        softcap=softcap,
    ).view(logits.shape)


@_token_logprobs_backward_op.register_fake
def _(logits, targets, row_max, log_norm, entropy, grad_logp, grad_entropy, temperature, ignore_index, backend,
      softcap=0.0):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


@torch.library.custom_op("remax_kernels::token_logprobs_backward_", mutates_args=("logits",))
def _token_logprobs_backward_inplace_op(
    logits: torch.Tensor, targets: torch.Tensor, row_max: torch.Tensor, log_norm: torch.Tensor,
    entropy: torch.Tensor | None, grad_logp: torch.Tensor | None, grad_entropy: torch.Tensor | None,
    temperature: float, ignore_index: int, backend: str, softcap: float = 0.0,
) -> None:
    """The same gradient, written over ``logits`` (which must not need a copy: see ``_needs_copy``)."""
    row_backward(
        logits, _row_layout(logits), targets.reshape(-1).contiguous(), row_max, log_norm, entropy, grad_logp,
        grad_entropy, temperature, ignore_index, True, resolve_backend(backend, logits.device, op="token_logprobs"),
        softcap=softcap,
    )


def _setup_context(ctx, inputs, output):
    logits, targets, temperature, ignore_index, need_entropy, backend, *rest = inputs
    softcap = rest[0] if rest else 0.0
    _, entropy, row_max, log_norm = output
    ctx.mark_non_differentiable(row_max, log_norm)
    ctx.save_for_backward(logits, targets, row_max, log_norm, entropy if need_entropy else None)
    ctx.temperature, ctx.softcap, ctx.ignore_index, ctx.backend = temperature, softcap, ignore_index, backend
    ctx.set_materialize_grads(False)


def _flat_grad(g: torch.Tensor | None) -> torch.Tensor | None:
    return None if g is None else g.reshape(-1).float().contiguous()


def _backward(ctx, grad_logp, grad_entropy, _grad_row_max, _grad_log_norm):
    logits, targets, row_max, log_norm, entropy = ctx.saved_tensors
    if entropy is None:
        grad_entropy = None  # the [0] placeholder output of a call without entropy
    if grad_logp is None and grad_entropy is None:
        return None, None, None, None, None, None, None
    args = (targets, row_max, log_norm, entropy, _flat_grad(grad_logp), _flat_grad(grad_entropy), ctx.temperature,
            ctx.ignore_index, ctx.backend, ctx.softcap)
    if getattr(ctx, "inplace_backward", False):
        torch.ops.remax_kernels.token_logprobs_backward_(logits, *args)
        grad = logits
    else:
        grad = torch.ops.remax_kernels.token_logprobs_backward(logits, *args)
    return grad, None, None, None, None, None, None


def _setup_context_inplace(ctx, inputs, output):
    _setup_context(ctx, inputs, output)
    ctx.inplace_backward = True


_token_logprobs_op.register_autograd(_backward, setup_context=_setup_context)
_token_logprobs_inplace_op.register_autograd(_backward, setup_context=_setup_context_inplace)


def token_logprobs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    inplace_backward: bool = False,
    softcap: float | None = None,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of each target token under ``softmax(logits / temperature)``, without a ``[N, V]`` log-softmax.

    Args:
        logits: ``[..., V]`` float32/float16/bfloat16, any number of leading dimensions, any vocabulary size.
            A view whose last dimension is contiguous, e.g. ``logits[:, :-1]`` of a ``[B, T, V]`` tensor, is read in
            place. It is copied only when its leading dimensions cannot be described by two strides after merging
            (e.g. a permuted 4-D view) or its last dimension is not contiguous.
        targets: int64/int32 with shape ``logits.shape[:-1]``, on the same device; each value in ``[0, V)`` or equal
            to ``ignore_index`` (checked on CPU tensors; on CUDA only with ``REMAX_KERNELS_CHECKS=1``, since it
            reads device memory).
        temperature: ``> 0``; log-probs and entropy are those of ``softmax(logits / temperature)``, the distribution
            the tokens were sampled from.
        ignore_index: targets equal to it get log-prob 0, entropy 0 and a zero gradient.
        return_entropy: also return the entropy of ``softmax(logits / temperature)`` per token.
        softcap: logit soft-capping: ``None`` (off) or a finite ``c > 0``; the logits are replaced by
            ``c * tanh(logits / c)`` BEFORE the temperature (Gemma-2/3's ``final_logit_softcapping``, which Hugging Face
            applies to the lm-head output), so log-probs and entropy are those of ``softmax(c * tanh(logits / c) / T)``
            and the gradient is w.r.t. the raw logits. Computed inside the same row passes (no extra pass). ``-inf``
            logits stay ``-inf``; ``+inf`` becomes ``c``.
        inplace_backward: write the gradient into the logits' own storage instead of a new ``[..., V]`` buffer.
            The backward then OVERWRITES ``logits`` (and returns that storage as the gradient), so the logits must
            not be used after ``backward()`` and the graph cannot be backpropagated twice. If the logits need a
            copy to be read (see above), the gradient goes to a new buffer and ``logits`` stay intact.
        backend: ``"auto"``, ``"triton"``, ``"cuda"`` (the CUDA C++ row kernel; needs the built extension) or
            ``"torch"`` (see ``remax_kernels._dispatch``). The torch path
            processes rows in chunks, so its extra memory is ``O(chunk x V)`` fp32 in forward and backward.

    Returns:
        ``logprobs``: float32, shape ``targets.shape``, always ``<= 0`` (0 at ignored positions); or, with
        ``return_entropy=True``, ``(logprobs, entropy)`` with ``entropy`` float32 in ``[0, log V]``. Both are
        differentiable w.r.t. ``logits`` (per-token upstream gradients are applied token by token). A row containing
        NaN or +inf gives NaN in that row only.

    Cost (Triton, one program per row): forward ONE read of the logits; backward one read and one write. The
    forward keeps ``O(N)`` floats (row max, log-normalizer, entropy) for the backward plus a reference to
    ``logits``. No device-to-host synchronization. It is the ``torch.library`` op ``remax_kernels::token_logprobs``
    (fake implementation and autograd registered), so ``torch.compile(fullgraph=True)`` and CUDA graphs see one
    node; under autocast the logits are read in the dtype they come in (the math is fp32 either way).

    Example::

        >>> logits = torch.randn(2, 5, 1000, requires_grad=True)
        >>> targets = torch.randint(0, 1000, (2, 5))
        >>> logp, entropy = token_logprobs(logits, targets, temperature=0.7, return_entropy=True)
        >>> logp.shape, entropy.shape
        (torch.Size([2, 5]), torch.Size([2, 5]))
        >>> (logp.sum() + 0.01 * entropy.sum()).backward()
    """
    check_float("logits", logits)
    check_index("targets", targets)
    check_same_device(logits=logits, targets=targets)
    if logits.dim() == 0:
        raise ValueError("logits: expected shape [..., V] with at least one dimension, got a 0-d tensor")
    vocab_size = logits.shape[-1]
    if vocab_size == 0:
        raise ValueError(f"logits: the vocabulary (last) dimension is empty, shape {tuple(logits.shape)}")
    check_shape("targets", targets, logits.shape[:-1], "logits.shape[:-1]")
    temperature = check_temperature("temperature", temperature)
    cap = check_softcap("softcap", softcap)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index: expected an int, got {type(ignore_index).__name__}")
    for name, flag in (("return_entropy", return_entropy), ("inplace_backward", inplace_backward)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name}: expected a bool, got {type(flag).__name__}")
    if inplace_backward and any(st == 0 and sz > 1 for sz, st in zip(logits.shape, logits.stride(), strict=True)):
        raise ValueError(
            "inplace_backward: logits has a stride-0 (expanded) dimension, so rows share memory and cannot each hold "
            "their own gradient; pass inplace_backward=False"
        )
    check_backend(backend)
    op = _token_logprobs_inplace_op if inplace_backward and not _needs_copy(logits) else _token_logprobs_op
    logp, entropy, _, _ = op(logits, targets, temperature, ignore_index, return_entropy, backend, cap)
    shape = targets.shape
    return (logp.view(shape), entropy.view(shape)) if return_entropy else logp.view(shape)
