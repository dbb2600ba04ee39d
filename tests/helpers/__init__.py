"""Shared test helpers: tolerances (written once, here) and comparison functions.

Float64 reference implementations live next to this file, one module per op family (ref_logprobs.py, ...).
"""

from __future__ import annotations

import torch

# Relative-norm tolerances ||out - ref|| / ||ref|| by input dtype (see the test plan).
REL_TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2, torch.float64: 1e-10}
# Absolute slack for outputs whose reference norm is tiny (e.g. log-probs near 0).
ABS_TOL = {torch.float32: 1e-6, torch.float16: 1e-4, torch.bfloat16: 1e-3, torch.float64: 1e-12}


def triton_runs_on_cpu() -> bool:
    """True when CPU tensors can take the Triton path: triton is installed and its interpreter is on (the default
    on a machine without a GPU, tests/conftest.py; off on the GPU machine)."""
    from remax_kernels._dispatch import interpreter_enabled, triton_available

    return triton_available() and interpreter_enabled()


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out = out.detach().double().cpu()
    ref = ref.detach().double().cpu()
    denom = ref.norm().item()
    return (out - ref).norm().item() / max(denom, 1e-30)


def assert_rel_close(
    out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, *, name: str = "output", scale: float = 1.0
):
    """Assert out ~ ref within the dtype's relative-norm tolerance (times `scale`), with a small absolute slack."""
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    assert torch.isfinite(out.detach().cpu().double()).all() or not torch.isfinite(ref.cpu().double()).all(), (
        f"{name}: non-finite values where the reference is finite"
    )
    out_d, ref_d = out.detach().double().cpu(), ref.detach().double().cpu()
    diff = (out_d - ref_d).norm().item()
    bound = REL_TOL[dtype] * scale * ref_d.norm().item() + ABS_TOL[dtype] * scale * max(ref_d.numel(), 1) ** 0.5
    assert diff <= bound, (
        f"{name}: ||out-ref|| = {diff:.3e} > bound {bound:.3e} (rel err {rel_err(out, ref):.3e}, {dtype})"
    )


def poison_like(shape, dtype, device) -> torch.Tensor:
    """A NaN-filled buffer: outputs written into it prove every element was written."""
    return torch.full(shape, float("nan"), dtype=dtype, device=device)
