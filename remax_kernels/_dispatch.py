"""The one place that decides which implementation of an op runs.

Rules, in order:
1. an explicit ``backend="triton"`` or ``backend="torch"`` argument wins;
2. else the environment variable ``REMAX_KERNELS_BACKEND`` (``auto``/``triton``/``torch``), read at call time;
3. else ``auto``: CUDA tensors run the Triton kernel; CPU tensors run the torch implementation, unless
   ``TRITON_INTERPRET=1`` was set before Triton was imported, in which case CPU tensors run the Triton kernel
   through the interpreter (how the test-suite exercises the real kernel code without a GPU).
"""

from __future__ import annotations

import functools
import os

import torch

BACKENDS = ("auto", "triton", "torch")
BACKEND_ENV_VAR = "REMAX_KERNELS_BACKEND"


def interpreter_enabled() -> bool:
    """True when Triton kernels run through the CPU interpreter (``TRITON_INTERPRET`` set truthy)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _requested_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend: must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        return backend
    env = os.environ.get(BACKEND_ENV_VAR, "auto").strip().lower() or "auto"
    if env not in BACKENDS:
        raise ValueError(f"{BACKEND_ENV_VAR}: must be one of {BACKENDS}, got {env!r}")
    return env


def resolve_backend(backend: str, device: torch.device) -> str:
    """Return ``"triton"`` or ``"torch"`` for an op whose tensors live on ``device``.

    Raises ``ValueError`` for an unknown backend name and ``RuntimeError`` when Triton is asked for but cannot run
    on ``device`` (not installed, or CPU tensors without the interpreter).
    """
    choice = _requested_backend(backend)
    can_run_triton = triton_available() and (device.type == "cuda" or (device.type == "cpu" and interpreter_enabled()))
    if choice == "auto":
        return "triton" if can_run_triton else "torch"
    if choice == "triton" and not can_run_triton:
        if not triton_available():
            raise RuntimeError("backend='triton' was requested but triton is not installed")
        raise RuntimeError(
            f"backend='triton' was requested for tensors on {device}; Triton runs on CUDA tensors, or on CPU tensors "
            "when TRITON_INTERPRET=1 is set before remax_kernels is imported"
        )
    return choice


def check_backend(backend) -> str:
    """``backend`` must be one of ``BACKENDS`` (checked on the host before any work; the op resolves "auto" itself)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend: must be one of {BACKENDS}, got {backend!r}")
    return backend
