"""The one benchmark harness: settings, timing, peak memory, device ceilings, case records and printed tables.

Every op family (``bench_*.py``) describes its cases as closures and hands them to :func:`run_case`, which

- warms each function up (first calls compile Triton kernels / ``torch.compile`` graphs and fill the allocator),
- times it with CUDA events around each call, after overwriting a 256 MiB buffer so the L2 cache holds nothing of the
  inputs (the op then reads from HBM as it does inside a training step), and keeps the median (and p20/p80) of
  many calls,
- measures its peak memory with ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, both as the
  absolute peak (inputs included) and net of what was allocated before the call,
- and turns the medians into ratios against each baseline and into achieved GB/s or TFLOP/s as a fraction of the
  ceilings measured in the same run (:func:`measure_ceilings`).

On a CPU machine (``--smoke``) the same code runs with wall-clock timing, tiny shapes, the torch backend and a few
calls: it proves the harness works end to end; its numbers mean nothing.
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
import platform
import re
import statistics
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch

# Bigger than the L2 of current NVIDIA GPUs (50 MiB H100, 60 MiB H200; 96-126 MiB on Blackwell).
_L2_FLUSH_BYTES = 256 * 2**20
MiB = 2**20


@dataclasses.dataclass(frozen=True)
class Settings:
    """How a run measures. Build it with :func:`make_settings`."""

    device: torch.device
    smoke: bool
    dtype: torch.dtype  # bf16 on CUDA (the targets are stated in bf16); fp32 in smoke mode on the CPU
    backend: str  # passed to ops that take ``backend=``: "auto" on CUDA, "torch" in smoke mode
    compile_backend: str  # torch.compile backend of the compiled baselines ("eager" in smoke: no C++ build on CPU)
    warmup: int  # calls before timing
    min_reps: int  # timed calls, at least ...
    max_reps: int  # ... and at most; in between, as many as fit in budget_ms
    budget_ms: float

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


def make_settings(*, smoke: bool, device: torch.device | str | None = None) -> Settings:
    """Full GPU settings, or the smoke settings used on the CPU (and by CI)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() and not smoke else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if smoke:
        return Settings(device, True, torch.float32, "torch", "eager", warmup=1, min_reps=2, max_reps=2, budget_ms=0.0)
    if device.type != "cuda":
        raise RuntimeError("benchmarks: the full run needs a CUDA device; use --smoke on a CPU machine")
    return Settings(device, False, torch.bfloat16, "auto", "inductor", warmup=3, min_reps=10, max_reps=200,
                    budget_ms=1000.0)


def synchronize(s: Settings) -> None:
    if s.cuda:
        torch.cuda.synchronize(s.device)


def free_memory(s: Settings) -> None:
    """Drop cached blocks so one case's leftovers do not count in the next case's peak (CUDA only: the CPU has no
    peak statistics, and a full garbage collection per call would dominate the smoke run)."""
    if s.cuda:
        gc.collect()
        torch.cuda.synchronize(s.device)
        torch.cuda.empty_cache()


def time_fn(fn: Callable[[], Any], s: Settings, *, warmup: int | None = None, reps: int | None = None) -> dict:
    """Median time of ``fn()`` in milliseconds (plus p20/p80 and the number of timed calls).

    ``warmup``/``reps`` override the settings for slow cases (e.g. a whole generation).
    """
    for _ in range(s.warmup if warmup is None else warmup):
        fn()
    synchronize(s)
    if reps is None:
        t0 = time.perf_counter()
        fn()
        synchronize(s)
        estimate_ms = (time.perf_counter() - t0) * 1e3
        reps = int(s.budget_ms / max(estimate_ms, 1e-3))
        reps = max(s.min_reps, min(s.max_reps, reps))
    times = []
    if s.cuda:
        flush = torch.empty(_L2_FLUSH_BYTES, dtype=torch.int8, device=s.device)
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for i in range(reps):
            flush.zero_()
            starts[i].record()
            fn()
            ends[i].record()
        torch.cuda.synchronize(s.device)
        times = [a.elapsed_time(b) for a, b in zip(starts, ends, strict=True)]
        del flush
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return {"ms": statistics.median(times), "ms_p20": _quantile(times, 0.2), "ms_p80": _quantile(times, 0.8),
            "reps": reps}


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def peak_memory(fn: Callable[[], Any], s: Settings) -> dict | None:
    """Peak CUDA memory of one ``fn()`` call; None on the CPU (no allocator statistics there).

    ``peak_bytes`` is the absolute peak (the inputs already allocated count); ``peak_net_bytes`` is that peak minus
    what was allocated just before the call, i.e. what the call itself added at its worst moment. The call's results
    (e.g. returned gradients) are alive until it returns, so they count in both.
    """
    if not s.cuda:
        return None
    free_memory(s)
    torch.cuda.reset_peak_memory_stats(s.device)
    base = torch.cuda.memory_allocated(s.device)
    out = fn()
    torch.cuda.synchronize(s.device)
    peak = torch.cuda.max_memory_allocated(s.device)
    del out
    return {"peak_bytes": peak, "peak_net_bytes": peak - base, "allocated_before_bytes": base}


def measure(fn: Callable[[], Any], s: Settings, *, memory: bool = True, **time_kw) -> dict:
    """Timing (:func:`time_fn`) and, when asked, peak memory (:func:`peak_memory`) of one function."""
    result = time_fn(fn, s, **time_kw)
    result["memory"] = peak_memory(fn, s) if memory else None
    return result


def measure_ceilings(s: Settings) -> dict:
    """The device's practical ceilings, measured now: copy bandwidth and dense bf16 matmul throughput.

    Copy bandwidth counts bytes read plus bytes written by ``dst.copy_(src)`` of a 2 GiB (smoke: 8 MiB) buffer, as
    STREAM does; the matmul is ``8192 x 8192 x 8192`` in bf16 (smoke: 256^3 in fp32), 2*M*N*K flops.
    """
    copy_bytes = 8 * MiB if s.smoke else 2 * 2**30
    copy_t = _time_copy(copy_bytes, s)
    size = 256 if s.smoke else 8192
    mm_dtype = torch.float32 if s.smoke else torch.bfloat16
    mm_t = _time_matmul(size, mm_dtype, s)
    free_memory(s)
    return {
        "copy_bytes": 2 * copy_bytes,
        "copy_ms": copy_t["ms"],
        "copy_gbps": 2 * copy_bytes / copy_t["ms"] / 1e6,
        "matmul_shape": [size, size, size],
        "matmul_dtype": _dtype_name(mm_dtype),
        "matmul_ms": mm_t["ms"],
        "matmul_tflops": 2 * size**3 / mm_t["ms"] / 1e9,
    }


def _time_copy(n_bytes: int, s: Settings) -> dict:
    src = torch.randn(n_bytes // 2, device=s.device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    return time_fn(lambda: dst.copy_(src), s)


def _time_matmul(size: int, dtype: torch.dtype, s: Settings) -> dict:
    a = torch.randn(size, size, device=s.device, dtype=dtype)
    b = torch.randn(size, size, device=s.device, dtype=dtype)
    return time_fn(lambda: a @ b, s)


def environment(s: Settings) -> dict:
    """Device name and versions, recorded with every result file."""
    import triton

    env = {
        "device": torch.cuda.get_device_name(s.device) if s.cuda else f"cpu ({platform.processor() or 'unknown'})",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "smoke": s.smoke,
        "dtype": _dtype_name(s.dtype),
        "backend": s.backend,
        "compile_backend": s.compile_backend,
    }
    try:
        import transformers

        env["transformers"] = transformers.__version__
    except ImportError:
        env["transformers"] = None
    if s.cuda:
        props = torch.cuda.get_device_properties(s.device)
        env["gpu_memory_bytes"] = props.total_memory
        env["sm_count"] = props.multi_processor_count
        env["capability"] = f"{props.major}.{props.minor}"
    return env


def device_slug(env: dict) -> str:
    """File-name-safe device name: 'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    name = "cpu" if env["device"].startswith("cpu") else env["device"]
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


class FamilySkipped(Exception):
    """Raised by a family that cannot run here (e.g. transformers missing); the message is the reason."""


def is_placeholder_error(exc: BaseException) -> bool:
    """True for the ``NotImplementedError`` of an op that has not landed yet (raised inside remax_kernels)."""
    if not isinstance(exc, NotImplementedError):
        return False
    frames = traceback.extract_tb(exc.__traceback__)
    return bool(frames) and "remax_kernels" in frames[-1].filename


def _error_record(exc: BaseException, s: Settings) -> dict:
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        free_memory(s)
        return {"error": "out of memory", "detail": str(exc).splitlines()[0]}
    return {"error": f"{type(exc).__name__}: {exc}".splitlines()[0]}


def run_case(
    s: Settings,
    ceilings: dict,
    *,
    name: str,
    op: str,
    mode: str,
    shape: dict,
    ours: Callable[[], Any],
    baselines: dict[str, Callable[[], Any] | str],
    bytes_moved: int | None = None,
    flops: int | None = None,
    memory: bool = True,
    inputs_grads_bytes: int | None = None,
    extra: dict | None = None,
    time_kw: dict | None = None,
) -> dict:
    """Measure ``ours`` and each baseline; return the case record (a JSON-ready dict).

    Args:
        name: unique, human-readable case name (printed, and used by the targets).
        op, mode, shape: what is measured (e.g. ``"token_logprobs"``, ``"fwd+bwd"``, ``{"N": 8192, "V": 32000}``).
        ours: zero-argument closure running our op once.
        baselines: name -> closure, or name -> string giving why that baseline is skipped (e.g. not installed).
        bytes_moved: the minimum bytes our op must read + write; gives GB/s and the fraction of copy bandwidth.
        flops: the op's useful flops; gives TFLOP/s and the fraction of the matmul ceiling.
        inputs_grads_bytes: bytes of the inputs plus the gradients the call returns, to compare peak memory with.
        extra: anything else worth keeping (correctness checks, notes).

    A placeholder op (``NotImplementedError`` raised in remax_kernels) propagates, so the runner skips the family.
    Any other failure, ours or a baseline's (out of memory included), is recorded in the case as ``{"error": ...}``.
    """
    time_kw = time_kw or {}
    record: dict[str, Any] = {"name": name, "op": op, "mode": mode, "shape": shape, "dtype": _dtype_name(s.dtype)}
    free_memory(s)
    try:
        record["ours"] = measure(ours, s, memory=memory, **time_kw)
    except Exception as exc:
        if is_placeholder_error(exc):
            raise
        record["ours"] = _error_record(exc, s)
    free_memory(s)
    record["baselines"] = {}
    for label, fn in baselines.items():
        if isinstance(fn, str):
            record["baselines"][label] = {"skipped": fn}
            continue
        try:
            record["baselines"][label] = measure(fn, s, memory=memory, **time_kw)
        except Exception as exc:
            record["baselines"][label] = _error_record(exc, s)
        free_memory(s)

    ours_ms = record["ours"].get("ms")
    record["speedup"] = {
        label: b["ms"] / ours_ms for label, b in record["baselines"].items() if "ms" in b and ours_ms
    }
    ours_peak = _peak(record["ours"])
    record["memory_ratio"] = {
        label: _peak(b) / ours_peak for label, b in record["baselines"].items() if _peak(b) and ours_peak
    }
    work: dict[str, Any] = {}
    if bytes_moved is not None:
        work["bytes"] = bytes_moved
        if ours_ms:
            work["gbps"] = bytes_moved / ours_ms / 1e6
            work["frac_copy_bw"] = work["gbps"] / ceilings["copy_gbps"]
    if flops is not None:
        work["flops"] = flops
        if ours_ms:
            work["tflops"] = flops / ours_ms / 1e9
            work["frac_matmul"] = work["tflops"] / ceilings["matmul_tflops"]
    record["work"] = work
    record["inputs_grads_bytes"] = inputs_grads_bytes
    record["extra"] = extra or {}
    return record


def _peak(entry: dict) -> int | None:
    mem = entry.get("memory")
    return mem["peak_bytes"] if mem else None


def target(name: str, measured: float | None, threshold: float, *, higher_is_better: bool, unit: str) -> dict:
    """One issue target: PASS when ``measured`` is on the right side of ``threshold``; None when not measured."""
    if measured is None:
        passed = None
    else:
        passed = measured >= threshold if higher_is_better else measured <= threshold
    return {"target": name, "measured": measured, "threshold": threshold, "higher_is_better": higher_is_better,
            "unit": unit, "pass": passed}


def find_case(cases: list[dict], name: str) -> dict | None:
    return next((c for c in cases if c["name"] == name), None)


def ours_ms(case: dict | None) -> float | None:
    return None if case is None else case["ours"].get("ms")


def baseline_ms(case: dict | None, label: str) -> float | None:
    return None if case is None else case["baselines"].get(label, {}).get("ms")


def peak_bytes(case: dict | None, label: str = "ours") -> int | None:
    if case is None:
        return None
    entry = case["ours"] if label == "ours" else case["baselines"].get(label, {})
    return _peak(entry)


def format_case(case: dict) -> str:
    """Two lines per case: timings with ratios, then throughput and memory."""
    ours = case["ours"]
    parts = [f"ours {_fmt_ms(ours)}"]
    for label, b in case["baselines"].items():
        if "ms" in b:
            ratio = case["speedup"].get(label)
            parts.append(f"{label} {_fmt_ms(b)} ({ratio:.2f}x)" if ratio else f"{label} {_fmt_ms(b)}")
        elif "error" in b:
            parts.append(f"{label} ERROR ({b['error']})")
        else:
            parts.append(f"{label} skipped")
    line = f"  {case['name']}\n    " + " | ".join(parts)
    work = case["work"]
    info = []
    if "gbps" in work:
        info.append(f"{work['gbps']:.0f} GB/s = {100 * work['frac_copy_bw']:.0f}% of copy")
    if "tflops" in work:
        info.append(f"{work['tflops']:.0f} TFLOP/s = {100 * work['frac_matmul']:.0f}% of matmul")
    mem = ours.get("memory")
    if mem:
        info.append(f"peak {mem['peak_bytes'] / MiB:.0f} MiB (net {mem['peak_net_bytes'] / MiB:.0f})")
        for label, ratio in case["memory_ratio"].items():
            info.append(f"{label} peak {ratio:.1f}x ours")
    if case.get("inputs_grads_bytes"):
        info.append(f"inputs+grads {case['inputs_grads_bytes'] / MiB:.0f} MiB")
    if info:
        line += "\n    " + " | ".join(info)
    return line


def _fmt_ms(entry: dict) -> str:
    if "ms" not in entry:
        return f"ERROR ({entry.get('error')})"
    return f"{entry['ms']:.3f} ms"


def format_target(t: dict) -> str:
    verdict = {True: "PASS", False: "MISS", None: "n/a "}[t["pass"]]
    measured = "not measured" if t["measured"] is None else f"{t['measured']:.3g} {t['unit']}"
    side = ">=" if t["higher_is_better"] else "<="
    return f"  [{verdict}] {t['target']}: {measured} (need {side} {t['threshold']:g})"


def check(fn: Callable[[], Any]) -> Any:
    """Run a correctness check (without autograd) for a case's ``extra``; a failure is recorded, not raised."""
    try:
        with torch.no_grad():
            return fn()
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}".splitlines()[0]}


def tensor_bytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().float() - b.detach().float()).abs().max())


def ratio(a: float | None, b: float | None) -> float | None:
    """``a / b``, or None when either was not measured."""
    return a / b if a is not None and b else None
