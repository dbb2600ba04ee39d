"""The one place that decides which implementation of an op runs.

Rules, in order:
1. an explicit ``backend="triton"``, ``"cuda"`` or ``"torch"`` argument wins;
2. else the environment variable ``REMAX_KERNELS_BACKEND`` (``auto``/``triton``/``cuda``/``torch``), read at call
   time;
3. else ``auto``: CUDA tensors run the faster of the op's compiled kernels as measured on a GPU (``AUTO_ON_CUDA``,
   the numbers are in ``benchmarks/README.md``; Triton where unmeasured); CPU tensors run the torch implementation,
   unless ``TRITON_INTERPRET=1`` was set before Triton was imported, in which case CPU tensors run the Triton kernel
   through the interpreter (how the test-suite exercises the real kernel code without a GPU).

``"cuda"`` selects the hand-written CUDA kernels of the optional extension ``remax_kernels._C`` (``csrc/``, loaded
by ``remax_kernels._cuda``). Only the ops listed in ``AUTO_ON_CUDA`` have one: asking for ``backend="cuda"`` on
another op, on CPU tensors, or without the built extension raises ``RuntimeError``; ``REMAX_KERNELS_BACKEND=cuda``
on an op without a CUDA kernel, or on CPU tensors, falls back to ``auto``.
"""

from __future__ import annotations

import functools
import os

import torch

BACKENDS = ("auto", "triton", "cuda", "torch")
BACKEND_ENV_VAR = "REMAX_KERNELS_BACKEND"

# The ops with a CUDA kernel (csrc/), and what "auto" runs for them on CUDA tensors: "cuda" only once a GPU
# measurement shows it faster than Triton (benchmarks/README.md, "auto on CUDA"). Unmeasured: "triton".
AUTO_ON_CUDA = {"sample_and_greedy": "triton", "token_logprobs": "triton"}


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
    if check_backend(backend) != "auto":
        return backend
    env = os.environ.get(BACKEND_ENV_VAR, "auto").strip().lower() or "auto"
    if env not in BACKENDS:
        raise ValueError(f"{BACKEND_ENV_VAR}: must be one of {BACKENDS}, got {env!r}")
    return env


def _cuda_extension_available() -> bool:
    from remax_kernels import _cuda  # lazy: importing the package never loads the extension

    return _cuda.available()


def resolve_backend(backend: str, device: torch.device, *, op: str | None = None) -> str:
    """Return ``"triton"``, ``"cuda"`` or ``"torch"`` for the op ``op`` whose tensors live on ``device``.

    ``"cuda"`` is returned only for ops listed in ``AUTO_ON_CUDA`` (callers without a CUDA kernel pass no ``op``).
    Raises ``ValueError`` for an unknown backend name and ``RuntimeError`` when the backend asked for cannot run
    (Triton not installed or CPU tensors without the interpreter; CUDA for an op without a CUDA kernel, on CPU
    tensors, or without the built extension).
    """
    choice = _requested_backend(backend)
    if choice == "cuda":
        from_env = backend == "auto"
        if op not in AUTO_ON_CUDA or device.type != "cuda":
            if not from_env:
                what = f"{op or 'this op'} has no CUDA kernel" if op not in AUTO_ON_CUDA else f"tensors are on {device}"
                raise RuntimeError(
                    f"backend='cuda' was requested but {what}; CUDA kernels exist for {sorted(AUTO_ON_CUDA)} on "
                    "CUDA tensors"
                )
            choice = "auto"
        elif not _cuda_extension_available():
            from remax_kernels._cuda import BUILD_HINT

            raise RuntimeError(f"backend='cuda' was requested but remax_kernels._C is not built; {BUILD_HINT}")
        else:
            return "cuda"
    can_run_triton = triton_available() and (device.type == "cuda" or (device.type == "cpu" and interpreter_enabled()))
    if choice == "auto":
        if device.type == "cuda" and AUTO_ON_CUDA.get(op) == "cuda" and _cuda_extension_available():
            return "cuda"
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
