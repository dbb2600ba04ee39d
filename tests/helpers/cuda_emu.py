"""Run the CUDA kernels of ``csrc/`` on the CPU: build ``csrc/emu/emu_abi.cpp`` (the kernels' own source compiled
against the emulation header ``csrc/emu/cuda_emu.h``) with the host C++ compiler, load it with ctypes, and call
its C ABI on CPU tensors.

The shared library is built once per source version: it is cached under ``$REMAX_KERNELS_EMU_CACHE`` (default: a
``remax-kernels-emu`` folder in the temp dir) in a subfolder named by the hash of every file under ``csrc/`` and the
compiler command, and written atomically, so concurrent sessions never load a half-written file.

``config`` selects the launch configuration: 0 is the production dispatch (``csrc/*.cu``: the configurations the
GPU runs, chosen from the vocabulary size), the others are small explicit configurations (see ``emu_abi.cpp``)
whose few threads keep the emulation fast while running the same kernel code.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from remax_kernels._cuda import row_layout  # the launchers' row addressing, so the emulation runs it too

CSRC = Path(__file__).resolve().parents[2] / "csrc"
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_FLAGS = ["-std=c++20", "-O2", "-pthread", "-shared", "-fPIC", "-fno-strict-aliasing", "-DREMAX_KERNELS_EMU"]

# Row-kernel configs: 0 production, 1 a 64-thread block per row, 2 a warp per row (two rows per 64-thread block).
ROW_CONFIGS = (0, 1, 2)
# Sampler configs: 0 production (512 threads, 1024 bins, 4096 candidates); 1: 64 threads, 64 bins, 256 candidates;
# 2: 64 threads, 32 bins, 32 candidates (small enough that the boundary and fallback paths of the threshold search
# run on small vocabularies); 3: one warp, 32 bins, 64 candidates (the cheapest to emulate).
SAMPLE_CONFIGS = (0, 1, 2, 3)
# Coverage points, as numbered in csrc/common.cuh (enum Cover).
COVER = {"scalar_head": 0, "scalar_tail": 1, "grad_scalar": 2, "race_in_pass1": 3, "threshold_all": 4,
         "threshold_boundary": 5, "threshold_fallback": 6, "final_pass": 7}


def compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


def _source_hash(cmd: list[str]) -> str:
    h = hashlib.sha256(" ".join(cmd).encode())
    for path in sorted(p for p in CSRC.rglob("*") if p.is_file() and p.suffix in {".h", ".cuh", ".cu", ".cpp"}):
        h.update(str(path.relative_to(CSRC)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def _build(source: str, flags: list[str], name: str) -> Path:
    """Compile ``csrc/emu/<source>`` with ``flags`` into the cache (once per source version); returns the path."""
    cxx = compiler()
    if cxx is None:
        raise RuntimeError("no host C++ compiler (g++) found to build the CUDA emulation")
    cache = Path(os.environ.get("REMAX_KERNELS_EMU_CACHE", Path(tempfile.gettempdir()) / "remax-kernels-emu"))
    base_cmd = [cxx, *flags, f"-I{CSRC}", str(CSRC / "emu" / source)]
    out_dir = cache / _source_hash(base_cmd)
    path = out_dir / name
    if not path.exists():
        out_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".tmp", dir=out_dir)
        os.close(fd)
        try:
            proc = subprocess.run([*base_cmd, "-o", tmp], capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"building {source} failed:\n{proc.stderr[-4000:]}")
            os.chmod(tmp, 0o755)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return path


@functools.lru_cache(maxsize=1)
def library() -> ctypes.CDLL:
    """The emulation library, built on first use (~10 s of g++), then reused from the cache."""
    lib = ctypes.CDLL(str(_build("emu_abi.cpp", _FLAGS, "librk_emu.so")))
    _declare(lib)
    return lib


def race_check() -> subprocess.CompletedProcess:
    """Build ``csrc/emu/race_check.cpp`` with ThreadSanitizer (cached) and run it; raises ``RuntimeError`` when
    the build fails (e.g. no libtsan)."""
    flags = ["-std=c++20", "-O1", "-g", "-pthread", "-fno-strict-aliasing", "-fsanitize=thread",
             "-DREMAX_KERNELS_EMU"]
    exe = _build("race_check.cpp", flags, "race_check")
    return subprocess.run([str(exe)], capture_output=True, text=True, env={**os.environ, "TSAN_OPTIONS": ""})


def _declare(lib: ctypes.CDLL) -> None:
    i32, i64, f32, ptr = ctypes.c_int, ctypes.c_int64, ctypes.c_float, ctypes.c_void_p
    lib.rk_emu_row_logprobs_fwd.argtypes = [
        i32, i32, ptr, i64, i64, i64, i64, i64, ptr, i64, f32, ptr, ptr, ptr, ptr, f32,
    ]
    lib.rk_emu_row_logprobs_bwd.argtypes = [
        i32, i32, ptr, i64, i64, i64, i64, i64, ptr, i64, f32, ptr, ptr, ptr, ptr, ptr, ptr, i64, i64, i64, f32,
    ]
    lib.rk_emu_sample.argtypes = [
        i32, i32, ptr, i64, i64, i64, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ctypes.c_bool, ctypes.c_bool,
        ctypes.c_bool, ptr, ptr, f32,
    ]
    for fn in (lib.rk_emu_row_logprobs_fwd, lib.rk_emu_row_logprobs_bwd, lib.rk_emu_sample):
        fn.restype = i32
    lib.rk_emu_coverage.argtypes = [ptr]
    lib.rk_emu_coverage.restype = None


def coverage() -> dict[str, int]:
    """How often each coverage point ran since the last call (per row for the sampler's points); resets them."""
    out = torch.zeros(16, dtype=torch.int64)
    library().rk_emu_coverage(_ptr(out))
    return {name: int(out[i]) for name, i in COVER.items()}


def _ptr(t: torch.Tensor | None):
    return None if t is None else ctypes.c_void_p(t.data_ptr())


def _check(rc: int, what: str) -> None:
    if rc != 0:
        raise RuntimeError(f"{what}: emulated launch returned {rc}")


def row_logprobs_forward(logits, targets, inv_temperature, ignore_index, need_entropy, *, config=0, softcap=0.0):
    """-> fp32 (logp, row_max, log_norm, entropy or None), each ``logits.shape[:-1]`` flattened (``softcap`` 0: off)."""
    assert logits.stride(-1) == 1
    n, vocab = logits.shape[:-1].numel(), logits.shape[-1]
    targets = targets.reshape(-1).to(torch.int64).contiguous()
    logp, row_max, log_norm = (torch.full((n,), float("nan")) for _ in range(3))
    entropy = torch.full((n,), float("nan")) if need_entropy else None
    t1, s0, s1 = row_layout(logits)
    rc = library().rk_emu_row_logprobs_fwd(
        DTYPE_CODES[logits.dtype], config, _ptr(logits), t1, s0, s1, n, vocab, _ptr(targets), ignore_index,
        inv_temperature, _ptr(logp), _ptr(row_max), _ptr(log_norm), _ptr(entropy), softcap,
    )
    _check(rc, "row_logprobs_forward")
    return logp, row_max, log_norm, entropy


def row_logprobs_backward(logits, targets, row_max, log_norm, entropy, grad_logp, grad_entropy, inv_temperature,
                          ignore_index, out, *, config=0, softcap=0.0):
    """Writes the gradient into ``out`` (same shape as ``logits``; may be ``logits`` itself) and returns it."""
    n, vocab = logits.shape[:-1].numel(), logits.shape[-1]
    targets = targets.reshape(-1).to(torch.int64).contiguous()
    t1, s0, s1 = row_layout(logits)
    g1, g0, gs = row_layout(out)
    rc = library().rk_emu_row_logprobs_bwd(
        DTYPE_CODES[logits.dtype], config, _ptr(logits), t1, s0, s1, n, vocab, _ptr(targets), ignore_index,
        inv_temperature, _ptr(row_max), _ptr(log_norm), _ptr(entropy), _ptr(grad_logp), _ptr(grad_entropy),
        _ptr(out), g1, g0, gs, softcap,
    )
    _check(rc, "row_logprobs_backward")
    return out


def sample_and_greedy(logits, greedy, temperature, top_k, top_p, log_min_p, seeds, step, key_row, truncate, raw,
                      *, config=0, softcap=0.0):
    """The CUDA decoding step on CPU tensors; per-row arguments as ``sampling.parse_options`` returns them."""
    batch, vocab = logits.shape
    tokens = torch.full((batch,), -1, dtype=torch.int64)
    logprobs = torch.full((batch,), float("nan"))
    args = [t.contiguous() for t in (greedy.view(torch.uint8), temperature.float(), top_k.to(torch.int32),
                                      top_p.float(), log_min_p.float(), seeds.to(torch.int64),
                                      torch.as_tensor(step, dtype=torch.int64).reshape(1))]
    rc = library().rk_emu_sample(
        DTYPE_CODES[logits.dtype], config, _ptr(logits), logits.stride(0), batch, vocab, *(_ptr(a) for a in args),
        key_row, truncate, raw, _ptr(tokens), _ptr(logprobs), softcap,
    )
    _check(rc, "sample_and_greedy")
    return tokens, logprobs
