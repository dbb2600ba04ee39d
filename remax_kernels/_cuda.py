"""The optional CUDA extension ``remax_kernels._C`` (``csrc/``): a lazy loader and thin launchers of its ops.

Importing ``remax_kernels`` never imports the extension; the first launcher call (or ``available()``) does, and a
missing or broken build raises a ``RuntimeError`` that says how to build it. The extension registers its ops with
``torch.library`` under ``torch.ops.remax_cuda`` (the package's Python custom ops own ``remax_kernels``); this
module adds their fake (meta) implementations so ``torch.compile`` can trace them.

Launchers (CUDA tensors only; the public ops validate user input before calling them, these check only what the
kernels rely on):

- ``row_logprobs_forward`` / ``row_logprobs_backward``: the per-token log-prob / entropy row pass of
  ``token_logprobs`` and of the fused-linear pipeline (the math of the Triton ``_token_logprobs_*_kernel``).
- ``sample_and_greedy``: the decoding step behind ``sample_and_greedy(backend="cuda")``.
"""

from __future__ import annotations

import functools
import importlib

import torch

BUILD_HINT = (
    "build it on a machine with nvcc and a CUDA build of torch: "
    "REMAX_KERNELS_BUILD_CUDA=1 pip install --no-deps --no-build-isolation -e ."
)


@functools.lru_cache(maxsize=1)
def _load():
    """(module, None) once the extension is imported and its fake implementations registered, else (None, reason)."""
    try:
        module = importlib.import_module("remax_kernels._C")
    except ImportError as exc:  # not built, or built against another torch
        return None, f"remax_kernels._C is not importable ({exc})"
    _register_fakes()
    return module, None


def available() -> bool:
    """True when the compiled extension imports (it says nothing about a GPU being present)."""
    return _load()[0] is not None


def require(device: torch.device, what: str) -> None:
    """Raise ``RuntimeError`` unless ``what`` can run its CUDA kernel on tensors on ``device``."""
    if device.type != "cuda":
        raise RuntimeError(f"{what}: backend='cuda' needs CUDA tensors, got tensors on {device}")
    module, reason = _load()
    if module is None:
        raise RuntimeError(f"{what}: backend='cuda' needs the compiled extension, but {reason}; {BUILD_HINT}")


def _register_fakes() -> None:
    @torch.library.register_fake("remax_cuda::row_logprobs_fwd")
    def _(logits, targets, t1, s0, s1, inv_temperature, ignore_index, need_entropy, softcap):
        n = targets.numel()
        new = lambda size: logits.new_empty((size,), dtype=torch.float32)
        return new(n), new(n), new(n), new(n if need_entropy else 0)

    @torch.library.register_fake("remax_cuda::sample_and_greedy")
    def _(logits, greedy, temperature, top_k, top_p, log_min_p, seeds, step, key_row, truncate, raw, softcap):
        batch = logits.shape[0]
        return logits.new_empty((batch,), dtype=torch.int64), logits.new_empty((batch,), dtype=torch.float32)


def row_layout(x: torch.Tensor) -> tuple[int, int, int]:
    """``(T1, s0, s1)``: row ``r`` of ``x`` viewed as ``[-1, V]`` starts ``(r // T1) * s0 + (r % T1) * s1`` elements
    after ``x.data_ptr()`` (the Triton row kernels' addressing, ``token_logprobs._row_layout``); raises
    ``ValueError`` when more than two strides remain (pass a contiguous copy, or an explicit ``layout``)."""
    from remax_kernels.ops.token_logprobs import _row_layout  # lazy: that module imports this one

    layout = _row_layout(x)
    if layout is None:
        raise ValueError(f"the leading dimensions of shape {tuple(x.shape)} / strides {x.stride()} need more than "
                         "two strides; pass a contiguous copy or an explicit layout")
    return layout


def row_logprobs_forward(
    logits: torch.Tensor,
    targets: torch.Tensor,
    inv_temperature: float,
    ignore_index: int,
    need_entropy: bool,
    *,
    layout: tuple[int, int, int] | None = None,
    softcap: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per-row log-prob pass over logits ``[..., V]`` (fp32/fp16/bf16, CUDA, last dim contiguous).

    With ``x`` the logits (soft-capped to ``softcap * tanh(logits / softcap)`` as they are read when ``softcap > 0``;
    0 is off), ``m = max(x)``, ``d = (x - m) * inv_temperature`` and ``s = sum(exp(d))`` per row:
    ``logp = min(d[target] - log(s), 0)``, ``row_max = m``, ``log_norm = log(s)``,
    ``entropy = max(log(s) - sum(exp(d) * d) / s, 0)`` (NaN propagates through the clamps). Rows whose target equals
    ``ignore_index`` get 0 in every output and are not read.

    Args:
        logits: ``[..., V]``; its rows are read in place through ``layout`` (default: ``row_layout(logits)``), so
            views such as ``logits[:, :-1]`` of ``[B, T, V]`` need no copy.
        targets: int64 (int32 is converted) with ``logits.shape[:-1].numel()`` elements, on the same device.
        inv_temperature: ``1 / T``.
        ignore_index: the target value of rows to skip.
        need_entropy: also compute the entropy.
        layout: ``(T1, s0, s1)`` row addressing relative to ``logits.data_ptr()`` (see ``row_layout``).

    Returns:
        fp32 ``[N]`` tensors ``(logp, row_max, log_norm, entropy or None)``; ``row_max``/``log_norm`` are what
        ``row_logprobs_backward`` needs.
    """
    require(logits.device, "row_logprobs_forward")
    t1, s0, s1 = layout if layout is not None else row_layout(logits)
    targets = targets.reshape(-1).to(torch.int64).contiguous()
    logp, row_max, log_norm, entropy = torch.ops.remax_cuda.row_logprobs_fwd(
        logits, targets, t1, s0, s1, float(inv_temperature), int(ignore_index), bool(need_entropy), float(softcap)
    )
    return logp, row_max, log_norm, entropy if need_entropy else None


def row_logprobs_backward(
    logits: torch.Tensor,
    targets: torch.Tensor,
    row_max: torch.Tensor,
    log_norm: torch.Tensor,
    entropy: torch.Tensor | None,
    grad_logp: torch.Tensor | None,
    grad_entropy: torch.Tensor | None,
    inv_temperature: float,
    ignore_index: int,
    out: torch.Tensor,
    *,
    layout: tuple[int, int, int] | None = None,
    out_layout: tuple[int, int, int] | None = None,
    softcap: float = 0.0,
) -> torch.Tensor:
    """Gradient of ``sum(grad_logp * logp + grad_entropy * entropy)`` w.r.t. the logits, written into ``out``.

    ``grad[v] = (g_lp * (1[v == target] - p_v) - g_ent * p_v * (log p_v + H)) * inv_temperature`` with
    ``log p_v = (x_v - row_max) * inv_temperature - log_norm`` (the forward's outputs), rounded to ``out``'s dtype
    (= the logits'); ignored rows get zeros. With ``softcap > 0``, ``x_v`` is the capped logit and the gradient is
    chained to the raw logits (times ``1 - tanh(logits / softcap)^2``).

    Args:
        logits, targets, row_max, log_norm: as in / from ``row_logprobs_forward`` (same ``layout``).
        entropy: the forward's entropy; required when ``grad_entropy`` is given.
        grad_logp, grad_entropy: per-row upstream gradients ``[N]`` (converted to fp32), either may be ``None``.
        inv_temperature, ignore_index: as in the forward.
        out: ``[..., V]`` in the logits' dtype; may be ``logits`` itself with the same layout: the gradient then
            overwrites the logits in place (each element is read before it is written, by the same thread).
        layout, out_layout: row addressing of ``logits`` and ``out`` (default: ``row_layout`` of each).

    Returns:
        ``out``.
    """
    require(logits.device, "row_logprobs_backward")
    t1, s0, s1 = layout if layout is not None else row_layout(logits)
    g1, g0, gs = out_layout if out_layout is not None else row_layout(out)
    flat = lambda t: None if t is None else t.reshape(-1).to(torch.float32).contiguous()
    torch.ops.remax_cuda.row_logprobs_bwd(
        logits, targets.reshape(-1).to(torch.int64).contiguous(), row_max, log_norm, flat(entropy), flat(grad_logp),
        flat(grad_entropy), t1, s0, s1, float(inv_temperature), int(ignore_index), out, g1, g0, gs, float(softcap),
    )
    return out


def sample_and_greedy(
    logits: torch.Tensor,
    greedy_mask: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    log_min_p: torch.Tensor,
    seeds: torch.Tensor,
    step: torch.Tensor | int,
    key_row: bool,
    truncate: bool,
    raw: bool,
    *,
    softcap: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The CUDA decoding step on validated per-row arguments (as ``ops.sampling.parse_options`` returns them):
    logits ``[B, V]`` (last dim contiguous), greedy ``[B]`` bool, temperature / top_p / log_min_p fp32 ``[B]``,
    top_k int32 ``[B]``, seeds int64 ``[B]``, step int64 ``[1]`` on the device (read by the kernel) or an int;
    ``softcap`` > 0 soft-caps the logits as they are read (0: off). Returns
    ``(tokens int64 [B], logprobs fp32 [B])``."""
    require(logits.device, "sample_and_greedy")
    if not isinstance(step, torch.Tensor):
        step = torch.full((1,), int(step), dtype=torch.int64, device=logits.device)
    return torch.ops.remax_cuda.sample_and_greedy(
        logits, greedy_mask, temperature, top_k, top_p, log_min_p, seeds, step, bool(key_row), bool(truncate),
        bool(raw), float(softcap),
    )
