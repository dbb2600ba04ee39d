"""Triton, imported once and optionally.

The torch paths (CPU tensors) need no Triton, so an op module must import without it: ``jit`` is then a no-op
decorator and the kernels are plain (never called) functions; ``resolve_backend`` refuses ``backend="triton"``.
Kernel modules use ``from __future__ import annotations`` so that ``tl.constexpr`` annotations are not evaluated
when ``tl`` is None.
"""

from __future__ import annotations

try:
    import triton
    import triton.language as tl

    jit = triton.jit
except ImportError:
    triton = None
    tl = None

    def jit(fn):
        return fn


__all__ = ["jit", "tl", "triton"]
