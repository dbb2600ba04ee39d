"""Build script: the pure-Python package always; the optional `remax_kernels._C` CUDA extension when it can.

REMAX_KERNELS_BUILD_CUDA controls the extension:
  "auto" (default)  build it when torch with CUDA support and nvcc are both present, else skip quietly;
  "1"               build it or fail loudly (use with `pip install --no-build-isolation .`);
  "0"               never build it.
Nothing here queries a GPU, runs git or downloads anything: the build is the same on any machine with the same
toolchain. The extension is built for sm_80 and sm_90 (A100, H100/H200) unless TORCH_CUDA_ARCH_LIST (e.g. "9.0a")
names other target architectures.
"""

from __future__ import annotations

import glob
import os
import shutil
import sys

from setuptools import setup

CSRC = "csrc"


def _want_cuda() -> tuple[bool, str]:
    flag = os.environ.get("REMAX_KERNELS_BUILD_CUDA", "auto").strip().lower()
    if flag not in ("auto", "0", "1"):
        raise SystemExit(f"REMAX_KERNELS_BUILD_CUDA must be auto, 0 or 1, got {flag!r}")
    if flag == "0":
        return False, "REMAX_KERNELS_BUILD_CUDA=0"
    sources = glob.glob(os.path.join(CSRC, "*.cu")) + glob.glob(os.path.join(CSRC, "*.cpp"))
    reasons = []
    if not sources:
        reasons.append("csrc/ has no sources")
    try:
        import torch

        if torch.version.cuda is None:
            reasons.append(f"torch {torch.__version__} is a CPU build")
    except ImportError:
        reasons.append("torch is not importable in the build environment (use --no-build-isolation)")
    if not (os.environ.get("CUDA_HOME") or shutil.which("nvcc")):
        reasons.append("nvcc not found")
    if reasons:
        if flag == "1":
            raise SystemExit("REMAX_KERNELS_BUILD_CUDA=1 but the extension cannot be built: " + "; ".join(reasons))
        return False, "; ".join(reasons)
    return True, ""


def _extensions():
    build, why = _want_cuda()
    if not build:
        print(f"remax-kernels: skipping the CUDA extension ({why})", file=sys.stderr)
        return [], {}
    # Without it torch would pick the architecture of the GPU it sees at build time.
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    ext = CUDAExtension(
        name="remax_kernels._C",
        sources=sorted(glob.glob(os.path.join(CSRC, "*.cu")) + glob.glob(os.path.join(CSRC, "*.cpp"))),
        include_dirs=[os.path.abspath(CSRC)],
        # No --use_fast_math: the kernels choose their fast intrinsics (__expf) explicitly, and the Gumbel noise
        # needs the accurate logf near u = 1 to match the Triton and torch streams. -lineinfo: compute-sanitizer
        # reports source lines.
        extra_compile_args={"cxx": ["-O3", "-std=c++17"], "nvcc": ["-O3", "-std=c++17", "-lineinfo"]},
    )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
