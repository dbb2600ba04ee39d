"""Compile every Triton kernel of remax-kernels for real GPUs, without one, and report what the hardware would run.

For each kernel, at each launch configuration its op picks on CUDA (block sizes and warps from the op's own
launch-config function, at the benchmark vocabularies and batch sizes; every dtype; the constexpr flags the ops
use), Triton's real compiler builds PTX and a cubin for sm_90a (H100/H200) and sm_80 (A100). Triton's bundled
``ptxas-blackwell -v`` then reports registers, spills and shared memory, and ``cuobjdump -sass`` shows whether the
``tl.dot`` kernels run on tensor cores (HMMA/HGMMA).

    python scripts/compile_triton.py                      # all kernels, both archs -> benchmarks/results/static/
    python scripts/compile_triton.py --only token --out /tmp/static

Exit status 1 when a kernel fails to compile, spills registers (every kernel here is on a hot path), or a bf16/fp16
dot kernel has no tensor-core instruction. CI runs it on a CPU machine (.ci/run). What it cannot tell: speed,
occupancy in practice, or that a launch with other argument values specializes the same way (pointers are given
the 16-byte alignment a real launch detects; integers are compiled unspecialized).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # the real compiler, never the interpreter
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, said out loud to silence its warning

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from remax_kernels.ops import sampling, token_logprobs  # noqa: E402

ARCHS = {"sm_90a": 90, "sm_80": 80}
# Triton's pointer element type names and the torch dtypes they stand for.
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# The vocabularies and batch sizes of the benchmarks (benchmarks/README.md), plus a small vocabulary.
VOCABS = (1000, 32000, 128256, 151936)
DECODE_BATCHES = (1, 32, 256)


@dataclass
class Spec:
    """One kernel at one launch configuration: the compile inputs, and the dtype its results are labelled with."""

    family: str
    kernel: object
    signature: dict[str, str]
    constexprs: dict[str, object]
    num_warps: int
    num_stages: int = 3
    uses_dot: bool = False
    dtype: str = ""

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__ if hasattr(self.kernel, "fn") else self.kernel.__name__


def _signature(kernel, types: dict[str, str]) -> dict[str, str]:
    """``types`` for the kernel's runtime arguments plus "constexpr" for the rest, checked against its real
    parameter list so that a kernel change that this script does not know about fails loudly."""
    names = [p.name for p in kernel.params]
    constexprs = [p.name for p in kernel.params if p.is_constexpr]
    runtime = [n for n in names if n not in constexprs]
    if sorted(types) != sorted(runtime):
        raise SystemExit(f"{kernel.fn.__name__}: parameters {runtime} but this script types {sorted(types)}; update "
                         "scripts/compile_triton.py")
    return {n: types.get(n, "constexpr") for n in names}


def token_logprobs_specs() -> list[Spec]:
    specs = []
    configs = sorted({token_logprobs.row_launch_config(v) for v in VOCABS})
    for (block_v, warps), dt in itertools.product(configs, DTYPES):
        fwd = _signature(token_logprobs._token_logprobs_fwd_kernel, {
            "logits_ptr": f"*{dt}", "targets_ptr": "*i64", "logp_ptr": "*fp32", "row_max_ptr": "*fp32",
            "log_norm_ptr": "*fp32", "entropy_ptr": "*fp32", "V": "i32", "T1": "i32", "stride_0": "i32",
            "stride_1": "i32", "temperature": "fp32", "ignore_index": "i32", "softcap": "fp32"})
        # SOFTCAP (Gemma-2/3 logit soft-capping) doubles the variants: it must not spill either.
        for entropy, softcap in itertools.product((False, True), (False, True)):
            specs.append(Spec("token_logprobs", token_logprobs._token_logprobs_fwd_kernel, fwd,
                              {"BLOCK_V": block_v, "COMPUTE_ENTROPY": entropy, "SOFTCAP": softcap}, warps, dtype=dt))
        bwd = _signature(token_logprobs._token_logprobs_bwd_kernel, {
            "logits_ptr": f"*{dt}", "targets_ptr": "*i64", "row_max_ptr": "*fp32", "log_norm_ptr": "*fp32",
            "entropy_ptr": "*fp32", "grad_logp_ptr": "*fp32", "grad_entropy_ptr": "*fp32", "grad_ptr": f"*{dt}",
            "V": "i32", "T1": "i32", "stride_0": "i32", "stride_1": "i32", "grad_T1": "i32", "grad_stride_0": "i32",
            "grad_stride_1": "i32", "temperature": "fp32", "ignore_index": "i32", "softcap": "fp32"})
        for (g_logp, g_entropy), softcap in itertools.product(((True, False), (True, True), (False, True)),
                                                              (False, True)):
            specs.append(Spec("token_logprobs", token_logprobs._token_logprobs_bwd_kernel, bwd,
                              {"BLOCK_V": block_v, "HAS_GRAD_LOGP": g_logp, "HAS_GRAD_ENTROPY": g_entropy,
                               "SOFTCAP": softcap}, warps, dtype=dt))
    return specs


def sampling_specs() -> list[Spec]:
    specs = []
    for truncate, raw, softcap, dt in itertools.product((False, True), (False, True), (False, True), DTYPES):
        sig = _signature(sampling._sample_kernel, {
            "logits_ptr": f"*{dt}", "stride_row": "i32", "greedy_ptr": "*u8", "temp_ptr": "*fp32",
            "top_k_ptr": "*i32", "top_p_ptr": "*fp32", "log_min_p_ptr": "*fp32", "seed_ptr": "*i64",
            "tokens_ptr": "*i64", "logprobs_ptr": "*fp32", "V": "i32", "step_ptr": "*i64", "softcap": "fp32"})
        for block_v, search_block_v, warps in sorted({sampling.sample_launch_config("cuda", v) for v in VOCABS}):
            specs.append(Spec("sampling", sampling._sample_kernel, sig, {
                "KEY_ROW": False, "TRUNCATE": truncate, "RAW": raw, "BLOCK_V": block_v,
                "SEARCH_BLOCK_V": sampling.softcap_search_block(search_block_v, softcap),
                "NUM_PIVOTS": sampling._NUM_PIVOTS, "SOFTCAP": softcap},
                warps, dtype=dt))
    for dt, torch_dtype in DTYPES.items():
        fused_configs = {}
        for batch in DECODE_BATCHES:
            cfg = sampling.fused_sample_launch_config("cuda", 2 * batch, 151936, 132, torch_dtype)
            fused_configs[tuple(v for k, v in cfg.items() if k not in ("v_per_split", "n_splits"))] = cfg
        for cfg, softcap in itertools.product(fused_configs.values(), (False, True)):
            specs.append(_fused_sample_spec(cfg, dt, softcap))
    return specs


def _fused_sample_spec(cfg: dict, dt: str, softcap: bool) -> Spec:
    sig = _signature(sampling._fused_sample_kernel, {
        "hidden_ptr": f"*{dt}", "weight_ptr": f"*{dt}", "bias_ptr": f"*{dt}", "temp_ptr": "*fp32",
        "seed_ptr": "*i64", "part_f_ptr": "*fp32", "part_i_ptr": "*i32", "B": "i32", "V": "i32", "H": "i32",
        "stride_hb": "i32", "stride_wv": "i32", "step_ptr": "*i64", "v_per_split": "i32", "n_splits": "i32",
        "softcap": "fp32"})
    return Spec("sampling", sampling._fused_sample_kernel, sig, {
        "HAS_BIAS": False, "KEY_ROW": False, "RAW": False, "INPUT_PRECISION": "ieee" if dt == "fp32" else None,
        "BLOCK_B": cfg["BLOCK_B"], "BLOCK_V": cfg["BLOCK_V"], "BLOCK_H": cfg["BLOCK_H"], "SOFTCAP": softcap},
        cfg["num_warps"], cfg["num_stages"], uses_dot=True, dtype=dt)


FAMILIES = {"token": token_logprobs_specs, "sampling": sampling_specs}


@functools.cache
def _specs(family: str) -> list[Spec]:
    return FAMILIES[family]()


def _tool(name: str) -> str:
    """A CUDA binary bundled with Triton (``ptxas-blackwell`` reads the PTX Triton >= 3.5 emits), else PATH's."""
    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    found = str(bundled) if bundled.exists() else shutil.which(name)
    if found is None:
        raise SystemExit(f"{name}: not found next to triton or on PATH")
    return found


def _ptxas_report(ptx: str, arch: str, kernel: str) -> dict:
    """Registers, spills, shared memory and stack of ``kernel`` from ``ptxas -v``."""
    ptxas = _tool("ptxas-blackwell") if (Path(triton.__file__).parent / "backends/nvidia/bin/ptxas-blackwell"
                                         ).exists() else _tool("ptxas")
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        run = subprocess.run([ptxas, "-v", f"--gpu-name={arch}", str(src), "-o", str(Path(tmp) / "k.cubin")],
                             capture_output=True, text=True)
    if run.returncode:
        raise RuntimeError(f"ptxas failed: {run.stderr.strip()[-2000:]}")
    log = run.stderr + run.stdout
    block = log[log.find(kernel):] if kernel in log else log
    number = lambda pattern: int(m.group(1)) if (m := re.search(pattern, block)) else 0
    return {"registers": number(r"Used (\d+) registers"), "spill_stores": number(r"(\d+) bytes spill stores"),
            "spill_loads": number(r"(\d+) bytes spill loads"), "stack_bytes": number(r"(\d+) bytes stack frame"),
            "ptxas_smem_bytes": number(r"(\d+) bytes smem")}


def _tensor_core_ops(cubin: bytes) -> list[str]:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([_tool("cuobjdump"), "-sass", f.name], capture_output=True, text=True).stdout
    return sorted({op for op in re.findall(r"\b(HGMMA|HMMA|WGMMA|IMMA)\b", sass)})


def compile_one(family: str, index: int, arch: str) -> dict:
    """Compile spec ``index`` of ``family`` for ``arch`` (by name: kernels do not pickle into worker processes)."""
    spec = _specs(family)[index]
    row = {"family": spec.family, "kernel": spec.name, "arch": arch, "dtype": spec.dtype,
           "config": {**spec.constexprs, "num_warps": spec.num_warps, "num_stages": spec.num_stages}}
    pointers = [i for i, ty in enumerate(spec.signature.values()) if ty.startswith("*")]
    src = ASTSource(fn=spec.kernel, signature=spec.signature, constexprs=spec.constexprs,
                    attrs={(i,): [["tt.divisibility", 16]] for i in pointers})
    try:
        compiled = triton.compile(src, target=GPUTarget("cuda", ARCHS[arch], 32),
                                  options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})
        row.update(_ptxas_report(compiled.asm["ptx"], arch, spec.name))
        row["shared_bytes"] = compiled.metadata.shared
        row["tensor_cores"] = _tensor_core_ops(compiled.asm["cubin"]) if spec.uses_dot else None
        row["error"] = None
    except Exception as exc:  # noqa: BLE001 - reported as a failed row
        row["error"] = f"{type(exc).__name__}: {str(exc).strip()[-1500:]}"
    return row


def problems(row: dict, uses_dot: bool) -> list[str]:
    if row["error"]:
        return [f"compile error: {row['error']}"]
    found = []
    if row["spill_stores"] or row["spill_loads"]:
        found.append(f"spills {row['spill_stores']} B stored / {row['spill_loads']} B loaded")
    if uses_dot and row["dtype"] in ("fp16", "bf16") and not row["tensor_cores"]:
        found.append("tl.dot without tensor-core instructions")
    return found


def _config_text(config: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in config.items())


def write_reports(rows: list[dict], out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    meta = {"triton": triton.__version__, "archs": list(ARCHS)}
    json_path = out / "triton_kernels.json"
    json_path.write_text(json.dumps({"meta": meta, "kernels": rows}, indent=1) + "\n")
    lines = [
        "# Triton kernels compiled for GPUs (no GPU needed)",
        "",
        f"Written by `python scripts/compile_triton.py` with Triton {triton.__version__}: registers, spills and "
        "shared memory per thread block from `ptxas -v`; tensor-core instructions from `cuobjdump -sass` (for the "
        "`tl.dot` kernels). A spill or a compile error fails CI.",
        "",
        "| kernel | dtype | config | arch | registers | spills (st/ld B) | shared B | tensor cores | status |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        status = "; ".join(r["problems"]) or "ok"
        tc = "-" if r.get("tensor_cores") is None else (", ".join(r["tensor_cores"]) or "none")
        if r["error"]:
            lines.append(f"| {r['kernel']} | {r['dtype']} | {_config_text(r['config'])} | {r['arch']} | - | - | - | "
                         f"- | {status[:120]} |")
            continue
        lines.append(
            f"| {r['kernel']} | {r['dtype']} | {_config_text(r['config'])} | {r['arch']} | {r['registers']} | "
            f"{r['spill_stores']}/{r['spill_loads']} | {r['shared_bytes']} | {tc} | {status} |")
    md_path = out / "triton_kernels.md"
    md_path.write_text("\n".join(lines) + "\n")
    return json_path, md_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", choices=sorted(FAMILIES), help="kernel family (repeatable)")
    parser.add_argument("--arch", action="append", choices=sorted(ARCHS), help="target (repeatable; default both)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "static")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    jobs = [(fam, i, arch) for fam in (args.only or sorted(FAMILIES)) for i in range(len(_specs(fam)))
            for arch in (args.arch or list(ARCHS))]
    with concurrent.futures.ProcessPoolExecutor(max_workers=args.jobs) as pool:
        rows = list(pool.map(compile_one, *zip(*jobs, strict=True)))
    failed = 0
    for (fam, i, _), row in zip(jobs, rows, strict=True):
        row["problems"] = problems(row, _specs(fam)[i].uses_dot)
        failed += bool(row["problems"])
        regs = "-" if row["error"] else row["registers"]
        print(f"{'FAIL' if row['problems'] else 'ok  '} {row['arch']:6} {row['kernel']:28} {row['dtype']:4} "
              f"regs={regs:>3} {_config_text(row['config'])}" + (f"  <- {'; '.join(row['problems'])}"
                                                                 if row["problems"] else ""))
    json_path, md_path = write_reports(rows, args.out)
    print(f"{len(rows)} compiles, {failed} failed; wrote {json_path} and {md_path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
