"""Per-token log-probs (and entropy) straight from hidden states and the lm-head, without the ``[N, V]`` logits.

``fused_linear_logprobs(hidden, weight, targets)`` equals ``token_logprobs(hidden @ weight.T + bias, targets)``
but only ever holds the logits of one chunk of rows.

The pipeline (this module's ``stream``; also the engine of ``remax_kernels.fused_linear_policy_loss``)
--------------------------------------------------------------------------------------------------------
1. Rows whose target is ``ignore_index`` (prompt, padding after EOS: a quarter to a half of an RL batch) are dropped
   before any matmul: the valid rows are gathered with ``nonzero``, the ONE device-to-host synchronization of a
   call (it needs their count). The forward and the backward each make it once.
2. Per chunk of valid rows: ``logits = hidden[chunk] @ W.T (+ bias)`` by cuBLAS in the compute dtype (bf16/fp16
   tensor cores; fp32 inputs stay fp32 and use TF32 only when torch's matmul precision allows it; under autocast
   the autocast dtype), into one ``[chunk, V]`` buffer.
3. The row kernels of ``token_logprobs`` (``row_forward``: one read of the chunk -> log-prob, entropy, row max and
   log-normalizer; ``row_backward``: one read and one write, the gradient over the logits written IN PLACE).
4. ``grad_hidden[chunk] = dlogits @ W`` and ``grad_W += dlogits^T @ hidden[chunk]`` (fp32 accumulation across
   chunks, a fixed chunk order: bitwise deterministic), ``grad_bias += sum(dlogits)``.

``fused_linear_logprobs`` (any downstream loss): the forward runs steps 1-3 (forward row pass only) and keeps the
per-row statistics; the backward re-runs steps 1-4 with those statistics and the upstream gradients.
``fused_linear_policy_loss`` (a scalar loss): one pass 1-4 in the forward, the per-token upstream gradients coming
from the loss formula (known once the chunk's log-probs are); its backward only scales the stored gradients.

Cost model (N valid rows, hidden size H, vocabulary V, compute dtype of s bytes; one GEMM-equivalent = 2 N H V flops)
------------------------------------------------------------------------------------------------------------------
=================================  =====================  ==========================================================
op                                 GEMM-equivalents       memory traffic besides the GEMMs' operands
=================================  =====================  ==========================================================
fused_linear_logprobs fwd          1                      write + read of the logits: 2 N V s
fused_linear_logprobs fwd + bwd    4 (3 if the logits     fwd + recompute write, read + write in place: 5 N V s;
                                   were kept; they are    fp32 grad_W written by the first chunk's GEMM, read +
                                   recomputed)            written by each later one, cast to the weight's dtype:
                                                          (8 chunks + 2) V H
fused_linear_policy_loss fwd+bwd   3 (the floor)          write, read, read + write: 4 N V s; grad_W as above
=================================  =====================  ==========================================================

At N = 8192, H = 4096, V = 128256, bf16 on an H200 (~790 TFLOP/s bf16 GEMM, ~4.3 TB/s): one GEMM-equivalent is
8.6 TFLOP = 10.9 ms; the logits are 2.1 GB (0.49 ms per pass). Policy loss: 32.7 ms of GEMMs + ~2 ms of row passes
+ ~2.2 ms of grad_W traffic (2 chunks at the default budget: 18 V H = 9.5 GB) = ~1.13x the 3-GEMM floor. ``python -m
benchmarks.model`` prints this table for every benchmark shape.

Peak extra memory (besides inputs and returned gradients): one chunk of logits, ``chunk * V * s`` bytes (1 GiB
budget by default, ``REMAX_KERNELS_CHUNK_MB``), the compute-dtype copy of the weight when its dtype differs
(``V * H * s``), the chunk's hidden rows and grad_hidden rows (``2 * chunk * H * s``), and an fp32 grad_W
accumulator (``4 * V * H``) when the weight gradient is needed. The eager path holds ``[N, V]`` logits in the
compute dtype plus their fp32 log-softmax and its gradient (``>= N * V * (s + 8)`` bytes).

The chunk is ``budget // (V * s)`` rows, never fewer than 512 on CUDA (a GEMM with M >= 512 keeps every SM's
tensor cores busy at these V and H), then evened out so that the chunks are about equal.

Every op is a ``torch.library`` op with a fake implementation and registered autograd:
``remax_kernels::fused_linear_logprobs`` and ``remax_kernels::fused_linear_logprobs_backward``.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

import torch

from remax_kernels._dispatch import check_backend, resolve_backend
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
from remax_kernels.ops.token_logprobs import row_backward, row_forward

CHUNK_ENV_VAR = "REMAX_KERNELS_CHUNK_MB"
BATCH_INVARIANT_ENV_VAR = "REMAX_KERNELS_BATCH_INVARIANT"
# Batch-invariant mode: every lm-head GEMM has exactly this many rows (the last tile zero-padded), so a row's logits
# are computed by the same GEMM call shape whatever the batch, its size and the row's position (see
# ``batch_invariant``). Large enough on CUDA that the tile GEMM stays compute-bound (256 flops per weight byte).
_INVARIANT_ROWS = {"cuda": 256, "cpu": 16}
# Default budget for one chunk of logits, by device type: well under the eager path's [N, V] on a GPU; small on
# the CPU, where the torch row path adds a few fp32 temporaries of the chunk's size.
_DEFAULT_CHUNK_MB = {"cuda": 1024, "cpu": 16}
# Fewer rows than this would leave a GEMM too short to fill the GPU.
_MIN_CHUNK_ROWS = {"cuda": 512, "cpu": 1}


def batch_invariant() -> bool:
    """Whether ``REMAX_KERNELS_BATCH_INVARIANT=1`` asks for batch-invariant lm-head GEMMs (read at call time).

    In this mode every logits GEMM (and grad_hidden GEMM) runs at one fixed shape, ``_INVARIANT_ROWS`` rows at a
    time, so a row's logits do not depend on how many rows share the call or where the row sits in it: on the CPU
    this is tested bitwise; on CUDA it holds when cuBLAS computes every row of a fixed-shape GEMM the same way
    (``tests/test_consistency.py`` checks it on the GPU). Cost: one weight read per tile (compute-bound at 256 rows
    on an H100/H200) and a zero-padded last tile. The row kernels are batch-invariant in every mode (one program per
    row, a fixed reduction order)."""
    return os.environ.get(BATCH_INVARIANT_ENV_VAR, "0").strip().lower() in ("1", "true", "yes", "on")


def fixed_shape_matmul(x: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ weight_t (+ bias)`` computed ``_INVARIANT_ROWS`` rows at a time, the last tile zero-padded."""
    rows = _INVARIANT_ROWS.get(x.device.type, 16)
    out = torch.empty((x.shape[0], weight_t.shape[1]), dtype=x.dtype, device=x.device)
    tile = x.new_zeros((rows, x.shape[1]))
    for start in range(0, x.shape[0], rows):
        n = min(rows, x.shape[0] - start)
        tile[:n] = x[start : start + n]
        if n < rows:
            tile[n:] = 0
        product = tile @ weight_t if bias is None else torch.addmm(bias, tile, weight_t)
        out[start : start + n] = product[:n]
    return out


def compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype the lm-head GEMMs run in: autocast's when it is on for the device, else the inputs' (which must
    then agree). Host-side only, so ``torch.compile`` traces it."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    if weight.dtype != hidden.dtype:
        raise TypeError(
            f"weight: dtype {str(weight.dtype).replace('torch.', '')} does not match hidden's "
            f"{str(hidden.dtype).replace('torch.', '')}; cast them to one dtype (or run under torch.autocast)"
        )
    return hidden.dtype


def chunk_rows(n_rows: int, vocab: int, dtype: torch.dtype, device: torch.device) -> int:
    """Rows per chunk for ``n_rows`` valid rows: the budget's worth of ``[rows, vocab]`` logits in ``dtype``, at
    least the device's minimum, then evened out over the chunks that takes (see the module docstring)."""
    budget_mb = float(os.environ.get(CHUNK_ENV_VAR, _DEFAULT_CHUNK_MB.get(device.type, 16)))
    if not budget_mb > 0:
        raise ValueError(f"{CHUNK_ENV_VAR}: must be a number > 0 (MiB), got {os.environ.get(CHUNK_ENV_VAR)!r}")
    elem = torch.empty((), dtype=dtype).element_size()
    rows = max(int(budget_mb * 2**20) // (vocab * elem), _MIN_CHUNK_ROWS.get(device.type, 1), 1)
    n_chunks = max(1, -(-n_rows // rows))
    return max(1, -(-n_rows // n_chunks))


def _new_buffer(shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Every fp32 buffer that this module fills completely is allocated here (one place for tests to poison)."""
    return torch.empty(shape, dtype=torch.float32, device=device)


@functools.cache
def _fp32_out_gemm_works(device: torch.device) -> bool:
    """Whether cuBLAS takes low-precision operands into an fp32 output accumulated in place (``addmm`` with
    ``out_dtype``, torch >= 2.8), checked once per device on a tiny case."""
    try:
        a = torch.ones(2, 3, dtype=torch.bfloat16, device=device)
        acc = torch.ones(2, 2, dtype=torch.float32, device=device)
        torch.addmm(acc, a, a.T, out_dtype=torch.float32, out=acc)
        return bool((acc == 4).all())
    except (RuntimeError, TypeError, NotImplementedError):
        return False


def _add_product_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, first: bool) -> None:
    """``acc += a @ b`` (``acc = a @ b`` when ``first``) for an fp32 accumulator and operands in the compute dtype,
    accumulated in fp32. ``first`` uses ``beta=0``: the GEMM neither reads ``acc`` nor needs it zero-filled."""
    beta = 0.0 if first else 1.0
    if a.dtype == torch.float32:
        acc.addmm_(a, b, beta=beta)
    elif a.is_cuda and _fp32_out_gemm_works(a.device):
        torch.addmm(acc, a, b, beta=beta, out_dtype=torch.float32, out=acc)
    elif a.is_cuda:  # older torch: the product is rounded to the compute dtype once per chunk
        if first:
            acc.copy_(a @ b)
        else:
            acc += a @ b
    else:
        acc.addmm_(a.float(), b.float(), beta=beta)


class LmHead:
    """One call's lm-head inputs in the compute dtype and its valid rows: what every pass over the chunks needs.

    ``hidden`` ``[N, H]``, ``weight`` ``[V, H]``, ``bias`` ``[V]`` or None (any float dtypes); ``targets`` ``[N]``
    int, rows equal to ``ignore_index`` are skipped; ``softcap`` (0 = off) is applied by the row kernels. Finding the
    valid rows is the call's one device sync.
    """

    def __init__(self, hidden, weight, bias, targets, ignore_index, dtype, temperature, backend, softcap=0.0):
        self.hidden, self.weight, self.bias = hidden, weight, bias
        self.dtype, self.temperature, self.softcap = dtype, temperature, softcap
        self.impl = resolve_backend(backend, hidden.device, op="token_logprobs")  # the row kernel's backend
        self.weight_c = weight.to(dtype)
        self.bias_c = None if bias is None else bias.to(dtype)
        targets = targets.reshape(-1)
        self.rows = (targets != ignore_index).nonzero().squeeze(1)
        self.targets = targets.index_select(0, self.rows).contiguous()
        self.chunk = chunk_rows(self.rows.numel(), weight.shape[0], dtype, hidden.device)
        self.invariant = batch_invariant()

    def chunks(self):
        """``(slice into the valid rows, their row indices, their hidden states in the compute dtype)``."""
        for start in range(0, self.rows.numel(), self.chunk):
            part = slice(start, start + self.chunk)
            rows = self.rows[part]
            yield part, rows, self.hidden.index_select(0, rows).to(self.dtype)

    def logits(self, hidden_c: torch.Tensor) -> torch.Tensor:
        if self.invariant:
            return fixed_shape_matmul(hidden_c, self.weight_c.T, self.bias_c)
        if self.bias_c is None:
            return hidden_c @ self.weight_c.T
        return torch.addmm(self.bias_c, hidden_c, self.weight_c.T)

    def grad_hidden(self, dlogits: torch.Tensor) -> torch.Tensor:
        return fixed_shape_matmul(dlogits, self.weight_c, None) if self.invariant else dlogits @ self.weight_c


Upstream = Callable[[slice, torch.Tensor | None, torch.Tensor | None], tuple[torch.Tensor | None, ...]]


def stream(
    head: LmHead,
    *,
    need_entropy: bool,
    stats: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None,
    upstream: Upstream | None = None,
    needs: tuple[bool, bool, bool] = (False, False, False),
) -> dict[str, torch.Tensor | None]:
    """One pass over the chunks of ``head`` (the module docstring's steps 2-4).

    Args:
        need_entropy: compute (or, with ``stats``, use) the per-row entropy.
        stats: ``(row_max, log_norm, entropy or None)`` per VALID row from an earlier forward: the row pass that
            computes them is skipped. Without it, the forward row pass runs and its results are returned.
        upstream: ``upstream(part, logp_c, entropy_c) -> (grad_logp_c or None, grad_entropy_c or None)``, the
            per-row upstream gradients of the chunk ``part`` (a slice of the valid rows), given its log-probs and
            entropy (None when ``stats`` were given). With it, the gradients of ``needs = (hidden, weight, bias)``
            are computed (none when all three are False; ``upstream`` still sees every chunk).

    Returns:
        ``logp``/``entropy`` ``[n_valid]`` fp32 and ``row_max``/``log_norm`` (without ``stats``);
        ``grad_hidden`` ``[N, H]`` (hidden's dtype, 0 at skipped rows), ``grad_weight`` ``[V, H]`` and
        ``grad_bias`` ``[V]`` (fp32) as requested; absent entries are None.
    """
    n_valid = head.rows.numel()
    device = head.hidden.device
    out: dict[str, torch.Tensor | None] = dict.fromkeys(
        ("logp", "entropy", "row_max", "log_norm", "grad_hidden", "grad_weight", "grad_bias"))
    if stats is None:
        for name in ("logp", "row_max", "log_norm") + (("entropy",) if need_entropy else ()):
            out[name] = _new_buffer((n_valid,), device)
    need_hidden, need_weight, need_bias = needs if upstream is not None else (False, False, False)
    if need_hidden:
        out["grad_hidden"] = torch.zeros(head.hidden.shape, dtype=head.hidden.dtype, device=device)
    if need_weight:
        out["grad_weight"] = _new_buffer(tuple(head.weight.shape), device)  # the first chunk's GEMM writes it
    if need_bias:
        out["grad_bias"] = torch.zeros(head.weight.shape[0], dtype=torch.float32, device=device)

    first_chunk = True
    for part, rows, hidden_c in head.chunks():
        logits = head.logits(hidden_c)
        layout = (logits.shape[0], 0, logits.shape[1])
        targets = head.targets[part]
        if stats is None:
            logp, entropy, row_max, log_norm = row_forward(
                logits, layout, targets, head.temperature, -1, need_entropy, head.impl, softcap=head.softcap)
            out["logp"][part], out["row_max"][part], out["log_norm"][part] = logp, row_max, log_norm
            if need_entropy:
                out["entropy"][part] = entropy
        else:
            logp = None
            row_max, log_norm = stats[0][part], stats[1][part]
            entropy = stats[2][part] if need_entropy else None
        if upstream is None:
            continue
        grad_logp, grad_entropy = upstream(part, logp, entropy)
        if not (need_hidden or need_weight or need_bias):
            continue
        dlogits = row_backward(logits, layout, targets, row_max, log_norm, entropy, grad_logp, grad_entropy,
                               head.temperature, -1, True, head.impl, softcap=head.softcap)
        if need_hidden:
            out["grad_hidden"].index_copy_(0, rows, head.grad_hidden(dlogits).to(head.hidden.dtype))
        if need_weight:
            _add_product_(out["grad_weight"], dlogits.T, hidden_c, first=first_chunk)
        if need_bias:
            out["grad_bias"] += dlogits.sum(0, dtype=torch.float32)
        first_chunk = False
    if need_weight and first_chunk:  # no valid rows: no chunk wrote the weight gradient
        out["grad_weight"].zero_()
    return out


def scatter_rows(values: torch.Tensor, head: LmHead, n_rows: int) -> torch.Tensor:
    """``[n_valid]`` values of the valid rows -> ``[n_rows]`` with 0 at the skipped rows."""
    full = torch.zeros(n_rows, dtype=values.dtype, device=values.device)
    return full.index_copy_(0, head.rows, values)


# ----------------------------------------------------------------------------------------------------------------
# torch.library ops
# ----------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("remax_kernels::fused_linear_logprobs", mutates_args=())
def _forward_op(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
    ignore_index: int, temperature: float, need_entropy: bool, dtype: torch.dtype, backend: str,
    softcap: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden ``[N, H]``, targets ``[N]`` -> fp32 ``[N]`` (logp, entropy or ``[0]``, row_max, log_norm)."""
    if value_checks_enabled(hidden.device):
        check_targets("targets", targets, weight.shape[0], ignore_index)
    n_rows = hidden.shape[0]
    head = LmHead(hidden, weight, bias, targets, ignore_index, dtype, temperature, backend, softcap)
    out = stream(head, need_entropy=need_entropy)
    full = [scatter_rows(out[name], head, n_rows) for name in ("logp", "row_max", "log_norm")]
    entropy = scatter_rows(out["entropy"], head, n_rows) if need_entropy else hidden.new_empty(0, dtype=torch.float32)
    return full[0], entropy, full[1], full[2]


@_forward_op.register_fake
def _(hidden, weight, bias, targets, ignore_index, temperature, need_entropy, dtype, backend, softcap=0.0):
    n = hidden.shape[0]
    new = lambda size: hidden.new_empty(size, dtype=torch.float32)
    return new(n), new(n if need_entropy else 0), new(n), new(n)


@torch.library.custom_op("remax_kernels::fused_linear_logprobs_backward", mutates_args=())
def _backward_op(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
    ignore_index: int, row_max: torch.Tensor, log_norm: torch.Tensor, entropy: torch.Tensor | None,
    grad_logp: torch.Tensor | None, grad_entropy: torch.Tensor | None, temperature: float, dtype: torch.dtype,
    backend: str, need_hidden: bool, need_weight: bool, need_bias: bool, softcap: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients w.r.t. (hidden, weight, bias) in their dtypes; ``[0]`` for the ones not needed."""
    head = LmHead(hidden, weight, bias, targets, ignore_index, dtype, temperature, backend, softcap)
    rows = head.rows
    need_entropy = entropy is not None
    stats = (row_max.index_select(0, rows), log_norm.index_select(0, rows),
             entropy.index_select(0, rows) if need_entropy else None)
    g_logp = None if grad_logp is None else grad_logp.index_select(0, rows).float()
    g_entropy = None if grad_entropy is None else grad_entropy.index_select(0, rows).float()

    def upstream(part, _logp, _entropy):
        return (None if g_logp is None else g_logp[part]), (None if g_entropy is None else g_entropy[part])

    out = stream(head, need_entropy=need_entropy and g_entropy is not None, stats=stats, upstream=upstream,
                 needs=(need_hidden, need_weight, need_bias))
    empty = lambda: hidden.new_empty(0)  # outputs must not alias each other
    grad_weight = out["grad_weight"].to(weight.dtype) if need_weight else empty()
    grad_bias = out["grad_bias"].to(bias.dtype) if need_bias else empty()
    return (out["grad_hidden"] if need_hidden else empty()), grad_weight, grad_bias


@_backward_op.register_fake
def _(hidden, weight, bias, targets, ignore_index, row_max, log_norm, entropy, grad_logp, grad_entropy,
      temperature, dtype, backend, need_hidden, need_weight, need_bias, softcap=0.0):
    empty = lambda: hidden.new_empty(0)
    return (torch.empty_like(hidden) if need_hidden else empty(), torch.empty_like(weight) if need_weight else empty(),
            torch.empty_like(bias) if need_bias else empty())


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, targets, ignore_index, temperature, need_entropy, dtype, backend, *rest = inputs
    softcap = rest[0] if rest else 0.0
    _, entropy, row_max, log_norm = output
    ctx.mark_non_differentiable(row_max, log_norm)
    ctx.save_for_backward(hidden, weight, bias, targets, row_max, log_norm, entropy if need_entropy else None)
    ctx.ignore_index, ctx.temperature, ctx.dtype, ctx.backend = ignore_index, temperature, dtype, backend
    ctx.softcap = softcap
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_logp, grad_entropy, _grad_row_max, _grad_log_norm):
    hidden, weight, bias, targets, row_max, log_norm, entropy = ctx.saved_tensors
    if entropy is None:
        grad_entropy = None  # the [0] placeholder output of a call without entropy
    need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
    if (grad_logp is None and grad_entropy is None) or not (need_hidden or need_weight or need_bias):
        return (None,) * 10
    grad_hidden, grad_weight, grad_bias = torch.ops.remax_kernels.fused_linear_logprobs_backward(
        hidden, weight, bias, targets, ctx.ignore_index, row_max, log_norm,
        entropy if grad_entropy is not None else None, grad_logp, grad_entropy, ctx.temperature, ctx.dtype,
        ctx.backend, need_hidden, need_weight, need_bias and bias is not None, ctx.softcap,
    )
    return (grad_hidden if need_hidden else None, grad_weight if need_weight else None,
            grad_bias if need_bias and bias is not None else None) + (None,) * 7


_forward_op.register_autograd(_backward, setup_context=_setup_context)


def check_lm_head(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[int, int]:
    """Shape/dtype/device checks shared by the fused lm-head ops (host metadata only); returns ``(V, H)``."""
    check_float("hidden", hidden)
    check_float("weight", weight)
    if bias is not None:
        check_float("bias", bias)
    if hidden.dim() < 1:
        raise ValueError("hidden: expected a tensor [..., H] with at least one dimension, got a 0-d tensor")
    if weight.dim() != 2:
        raise ValueError(f"weight: expected a 2-D tensor [V, H], got shape {tuple(weight.shape)}")
    if bias is not None and bias.dtype != weight.dtype:
        raise TypeError(
            f"bias: dtype {str(bias.dtype).replace('torch.', '')} does not match weight's "
            f"{str(weight.dtype).replace('torch.', '')}; cast them to one dtype"
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
    check_same_device(hidden=hidden, weight=weight, bias=bias)
    return vocab, hidden_size


def fused_linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    softcap: float | None = None,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-probs of ``targets`` under ``softmax((hidden @ weight.T + bias) / temperature)``, without the logits.

    The same values as ``token_logprobs(hidden @ weight.T + bias, targets, ...)``, but only one chunk of rows'
    logits ever exists (see the module docstring: the pipeline, its cost model and its memory). Differentiable
    w.r.t. ``hidden``, ``weight`` and ``bias``, through the log-probs and the entropy, with per-token upstream
    gradients; the backward recomputes the logits chunk by chunk. Deterministic: the same inputs give bitwise the
    same outputs and gradients on the same device.

    Args:
        hidden: ``[..., H]`` float32/float16/bfloat16, the last hidden states (e.g. ``[B, T, H]``).
        weight: ``[V, H]``, the lm-head weight; the same dtype as ``hidden`` unless autocast is on.
        targets: ``hidden.shape[:-1]`` int64/int32 token ids in ``[0, V)``, or ``ignore_index``. Values are checked
            on CPU tensors, and on CUDA only with ``REMAX_KERNELS_CHECKS=1`` (it reads device memory).
        bias: optional ``[V]`` lm-head bias, the weight's dtype.
        temperature: > 0; log-probs are taken under ``softmax(logits / temperature)`` (the sampling distribution).
        ignore_index: targets equal to this give log-prob 0, entropy 0 and exactly zero gradient (even if that
            row's hidden state is not finite); their rows never enter a matmul.
        return_entropy: also return the entropy of ``softmax(logits / temperature)`` per token.
        softcap: logit soft-capping, ``None`` (off) or a finite ``c > 0``: ``logits = c * tanh(logits / c)`` before
            the temperature (Gemma-2/3's ``final_logit_softcapping``), applied in the row kernels' passes (no extra
            pass over a chunk), as in ``token_logprobs``.
        backend: the row kernels: ``"auto"`` (CUDA -> Triton, CPU -> torch), ``"triton"``, ``"cuda"`` (the CUDA
            C++ row kernel) or ``"torch"``; see ``remax_kernels._dispatch``. The GEMMs are torch's (cuBLAS on CUDA)
            either way.

    Compute dtype: under ``torch.autocast`` the GEMMs run in the autocast dtype (fp32 inputs are cast once per
    call); otherwise in the inputs' dtype (fp32 uses TF32 only if ``torch.backends.cuda.matmul`` allows it). The
    row math is fp32 always.

    Returns:
        float32 log-probs with ``targets.shape`` (all <= 0), or ``(logprobs, entropy)`` when ``return_entropy``.
        Gradients come in the dtype of ``hidden`` / ``weight`` / ``bias`` (grad_weight accumulated in fp32).

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
    check_index("targets", targets)
    vocab, hidden_size = check_lm_head(hidden, weight, bias)
    check_shape("targets", targets, tuple(hidden.shape[:-1]), "hidden.shape[:-1]")
    check_same_device(hidden=hidden, targets=targets)
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise TypeError(f"ignore_index: expected an int, got {type(ignore_index).__name__}")
    if not isinstance(return_entropy, bool):
        raise TypeError(f"return_entropy: expected a bool, got {type(return_entropy).__name__}")
    temperature = check_temperature("temperature", temperature)
    cap = check_softcap("softcap", softcap)
    check_backend(backend)
    dtype = compute_dtype(hidden, weight)
    logp, entropy, _, _ = _forward_op(hidden.reshape(-1, hidden_size), weight, bias, targets.reshape(-1),
                                      ignore_index, temperature, return_entropy, dtype, backend, cap)
    if return_entropy:
        return logp.view(targets.shape), entropy.view(targets.shape)
    return logp.view(targets.shape)
