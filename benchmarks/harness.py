"""The one benchmark harness: settings, cases, timing, peak memory, device ceilings, case records and printed tables.

Every op family (``bench_*.py``) lists its cases as :class:`CaseSpec` objects (names, shapes and provider labels,
nothing allocated); a spec's ``build`` allocates the inputs and returns a :class:`Case` with one zero-argument call
per provider (ours, the baselines, the peers, our own options). Two runners measure the same cases:
``python -m benchmarks.run`` through :func:`run_case`, and pytest-benchmark (``benchmarks/test_bench_*.py``, one
test per case and provider, same warm-up, L2 flush and CUDA-event timing). :func:`run_case`

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


def warm_up(fn: Callable[[], Any], s: Settings, *, warmup: int | None = None, reps: int | None = None) -> int:
    """Call ``fn`` ``warmup`` times, then return how many timed calls to make: ``reps`` when given, else as many as
    fit in the settings' time budget (estimated from one more call), within ``[min_reps, max_reps]``.

    ``warmup``/``reps`` override the settings for slow cases (e.g. a whole generation).
    """
    for _ in range(s.warmup if warmup is None else warmup):
        fn()
    synchronize(s)
    if reps is not None:
        return reps
    t0 = time.perf_counter()
    fn()
    synchronize(s)
    estimate_ms = (time.perf_counter() - t0) * 1e3
    return max(s.min_reps, min(s.max_reps, int(s.budget_ms / max(estimate_ms, 1e-3))))


def l2_flush_buffer(s: Settings) -> torch.Tensor | None:
    """A buffer bigger than the L2 cache; ``buffer.zero_()`` before a timed call evicts the call's inputs from L2.
    None on the CPU (its caches are not flushed: smoke numbers mean nothing anyway)."""
    return torch.empty(_L2_FLUSH_BYTES, dtype=torch.int8, device=s.device) if s.cuda else None


def timing_summary(times_ms: list[float]) -> dict:
    """Median, p20 and p80 of the timed calls (ms) and their number: the timing part of a provider's record."""
    return {"ms": statistics.median(times_ms), "ms_p20": _quantile(times_ms, 0.2),
            "ms_p80": _quantile(times_ms, 0.8), "reps": len(times_ms)}


def time_fn(fn: Callable[[], Any], s: Settings, *, warmup: int | None = None, reps: int | None = None) -> dict:
    """Median time of ``fn()`` in milliseconds (plus p20/p80 and the number of timed calls); see :func:`warm_up`."""
    reps = warm_up(fn, s, warmup=warmup, reps=reps)
    times = []
    if s.cuda:
        flush = l2_flush_buffer(s)
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
    return timing_summary(times)


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


def measure(fn: Callable[[], Any], s: Settings, **time_kw) -> dict:
    """Timing (:func:`time_fn`) and peak memory (:func:`peak_memory`) of one function."""
    result = time_fn(fn, s, **time_kw)
    result["memory"] = peak_memory(fn, s)
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
        "matmul_dtype": dtype_name(mm_dtype),
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
        "dtype": dtype_name(s.dtype),
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


def dtype_name(dtype: torch.dtype) -> str:
    """The dtype as result files write it: torch.bfloat16 -> "bfloat16"."""
    return str(dtype).replace("torch.", "")


class FamilySkipped(Exception):
    """Raised by a family that cannot run here (e.g. transformers missing); the message is the reason."""


def _error_record(exc: BaseException, s: Settings) -> dict:
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        free_memory(s)
        return {"error": "out of memory", "detail": str(exc).splitlines()[0]}
    return {"error": f"{type(exc).__name__}: {exc}".splitlines()[0]}


SIZES = ("full", "smoke")  # full: the GPU shapes of the targets; smoke: tiny shapes for the CPU

# How a family builds one provider's call from a built case's inputs: the zero-argument call, or a string saying why
# that provider cannot run here (not installed, CUDA only, not applicable to this mode).
ProviderFactory = Callable[[Settings, Any], "Callable[[], Any] | str"]


def size_of(s: Settings) -> str:
    return "smoke" if s.smoke else "full"


@dataclasses.dataclass(frozen=True, eq=False)
class CaseSpec:
    """One benchmark case as both runners list it: names, shapes and provider labels; nothing is allocated.

    ``providers`` are the entries measured, ``"ours"`` first, in measuring order (an entry that overwrites the
    inputs, e.g. an in-place backward, comes last). ``build(settings)`` allocates the inputs and returns the
    :class:`Case` whose ``calls`` have exactly these labels.
    """

    family: str
    size: str  # one of SIZES
    name: str  # unique, human-readable (printed, used by the targets and as the pytest-benchmark group)
    op: str
    mode: str
    shape: dict
    providers: tuple[str, ...]
    build: Callable[[Settings], Case]

    @property
    def test_id(self) -> str:
        """The case's pytest id: the name with characters ``-k`` expressions cannot hold squeezed out."""
        return re.sub(r"[^\w.+-]+", "-", self.name.replace("=", "")).strip("-")


@dataclasses.dataclass(eq=False)
class Case:
    """A built case: its inputs allocated and one call (or skip reason) per provider.

    bytes_moved: the minimum bytes our op must read + write; gives GB/s and the fraction of copy bandwidth.
    flops: the op's useful flops; gives TFLOP/s and the fraction of the matmul ceiling.
    inputs_grads_bytes: bytes of the inputs plus the gradients the call returns, to compare peak memory with.
    shape: shape facts known only once built (a parameter count, a random response length), added to the spec's.
    extra: correctness checks (run at build time, against the eager baseline) and notes.
    provider_extra: ``(label, timing entry) -> dict`` of facts derived from one provider's measurement (tokens/s);
        stored as ``extra[key][label]``.
    time_kw: ``warmup``/``reps`` overrides for slow cases (a whole rollout).
    close: releases what the case holds beyond its tensors (temporary folders).
    """

    calls: dict[str, Callable[[], Any] | str]
    bytes_moved: int | None = None
    flops: int | None = None
    inputs_grads_bytes: int | None = None
    shape: dict = dataclasses.field(default_factory=dict)
    extra: dict = dataclasses.field(default_factory=dict)
    provider_extra: Callable[[str, dict], dict] | None = None
    time_kw: dict = dataclasses.field(default_factory=dict)
    close: Callable[[], None] | None = None


def provider_calls(providers: dict[str, ProviderFactory], s: Settings, inputs: Any) -> dict:
    """Each provider's call (or skip reason) on one case's inputs, in the table's order."""
    return {label: make(s, inputs) for label, make in providers.items()}


def cuda_only(s: Settings) -> str | None:
    """The skip reason of a provider that needs a CUDA device, or None on one: ``cuda_only(s) or (lambda: ...)``."""
    return None if s.cuda else "CUDA only"


def cuda_extension_only(s: Settings) -> str | None:
    """The skip reason of a provider that runs the CUDA kernels of csrc/ (a CUDA device and the built extension)."""
    from remax_kernels import _cuda

    return cuda_only(s) or (None if _cuda.available() else f"remax_kernels._C not built ({_cuda.BUILD_HINT})")


def build_case(spec: CaseSpec, s: Settings) -> Case:
    """``spec.build(s)``, checked: the built calls carry exactly the spec's provider labels, in its order."""
    case = spec.build(s)
    if tuple(case.calls) != spec.providers:
        raise RuntimeError(f"{spec.name}: built providers {tuple(case.calls)} != declared {spec.providers}")
    return case


def work_metrics(ms: float | None, ceilings: dict, *, bytes_moved: int | None, flops: int | None) -> dict:
    """The op's minimum work and, for a time ``ms``, the achieved rate and its fraction of the device ceiling."""
    work: dict[str, Any] = {}
    if bytes_moved is not None:
        work["bytes"] = bytes_moved
        if ms:
            work["gbps"] = bytes_moved / ms / 1e6
            work["frac_copy_bw"] = work["gbps"] / ceilings["copy_gbps"]
    if flops is not None:
        work["flops"] = flops
        if ms:
            work["tflops"] = flops / ms / 1e9
            work["frac_matmul"] = work["tflops"] / ceilings["matmul_tflops"]
    return work


def compare(record: dict, ceilings: dict, *, bytes_moved: int | None, flops: int | None) -> dict:
    """Fill a case record's ``speedup``, ``memory_ratio`` (each baseline over ours) and ``work`` (ours) in place."""
    ours_ms = record["ours"].get("ms")
    record["speedup"] = {
        label: b["ms"] / ours_ms for label, b in record["baselines"].items() if "ms" in b and ours_ms
    }
    ours_peak = _peak(record["ours"])
    record["memory_ratio"] = {
        label: _peak(b) / ours_peak for label, b in record["baselines"].items() if _peak(b) and ours_peak
    }
    record["work"] = work_metrics(ours_ms, ceilings, bytes_moved=bytes_moved, flops=flops)
    return record


def run_case(s: Settings, ceilings: dict, spec: CaseSpec) -> dict:
    """Build the case, measure every provider in turn; return the case record (a JSON-ready dict).

    :class:`FamilySkipped` from the build propagates, so the runner skips the family. A failure of a call, ours or a
    baseline's (out of memory included), is recorded in the case as ``{"error": ...}``; a provider that cannot run
    here as ``{"skipped": ...}``.
    """
    free_memory(s)
    case = build_case(spec, s)
    try:
        entries: dict[str, dict] = {}
        for label, call in case.calls.items():
            if isinstance(call, str):
                entries[label] = {"skipped": call}
                continue
            free_memory(s)
            try:
                entries[label] = measure(call, s, **case.time_kw)
            except Exception as exc:
                entries[label] = _error_record(exc, s)
            if case.provider_extra is not None and "ms" in entries[label]:
                for key, value in case.provider_extra(label, entries[label]).items():
                    case.extra.setdefault(key, {})[label] = value
    finally:
        if case.close is not None:
            case.close()
    record: dict[str, Any] = {"name": spec.name, "op": spec.op, "mode": spec.mode,
                              "shape": {**spec.shape, **case.shape}, "dtype": dtype_name(s.dtype),
                              "ours": entries.pop("ours"), "baselines": entries}
    compare(record, ceilings, bytes_moved=case.bytes_moved, flops=case.flops)
    record["inputs_grads_bytes"] = case.inputs_grads_bytes
    record["extra"] = case.extra
    free_memory(s)
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
