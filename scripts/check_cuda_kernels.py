"""Compile-check the CUDA kernels of csrc/ without a GPU and report their resources.

Each ``csrc/*.cu`` is compiled with nvcc for sm_80 and sm_90a (one process per file, files in parallel) with the
flags the extension build uses, plus ``-Xptxas -v``; the per-kernel registers, spill stores/loads, stack and shared
memory are printed as a table. Exit status 1 on a compile error or on any spill in a kernel entry point (every
kernel of csrc/ is on a hot path; a non-inlined helper such as the sampler's fallback search is reported, not
failed).

``--bindings`` also type-checks ``csrc/bindings.cpp`` against the installed torch's headers (g++ -fsyntax-only): a
CPU build of torch ships every header the binding includes except the generated ``c10/cuda/impl/cuda_cmake_macros.h``,
for which a one-line stand-in is written to a temporary folder. It cannot link or run the binding; it catches API
misuse before a GPU machine builds it.

    python scripts/check_cuda_kernels.py [--bindings] [--json out.json]
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
ARCHS = ("sm_80", "sm_90a")
# What torch.utils.cpp_extension adds to every nvcc command of the extension build.
TORCH_NVCC_DEFINES = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                      "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__"]


def nvcc_command(source: Path, out: Path) -> list[str]:
    gencode = [f"-gencode=arch=compute_{a[3:]},code={a}" for a in ARCHS]
    return ["nvcc", "-std=c++17", "-O3", "-lineinfo", *TORCH_NVCC_DEFINES, *gencode, "-Xptxas", "-v",
            f"-I{CSRC}", "-c", str(source), "-o", str(out)]


def parse_ptxas(text: str) -> list[dict]:
    """Per (function, arch): registers, spills, stack, smem, and whether it is a kernel entry point."""
    rows: dict[tuple[str, str], dict] = {}
    arch, current = None, None
    for line in text.splitlines():
        if m := re.search(r"Compiling entry function '([^']+)' for '(sm_\w+)'", line):
            current, arch = m.group(1), m.group(2)
            rows[(current, arch)] = {"function": current, "arch": arch, "entry": True}
        elif m := re.search(r"Function properties for (\S+)", line):
            current = m.group(1)
            rows.setdefault((current, arch), {"function": current, "arch": arch, "entry": False})
        elif (m := re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)) \
                and current:
            rows[(current, arch)].update(stack=int(m.group(1)), spill_stores=int(m.group(2)),
                                         spill_loads=int(m.group(3)))
        elif (m := re.search(r"Used (\d+) registers", line)) and current:
            row = rows[(current, arch)]
            row["registers"] = int(m.group(1))
            if s := re.search(r"(\d+) bytes smem", line):
                row["smem"] = int(s.group(1))
    return list(rows.values())


def demangle(names: list[str]) -> dict[str, str]:
    if not names or shutil.which("c++filt") is None:
        return {n: n for n in names}
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out, strict=True)) if len(out) == len(names) else {n: n for n in names}


def short_name(name: str) -> str:
    # remax::sampling::sample_kernel<__nv_bfloat16, 512, 1024, 4096>(remax::SampleParams) -> sample_kernel<...>
    name = re.sub(r"\(.*\)$", "", name)
    return re.sub(r"^(\w+::)*", "", name)


def compile_one(source: Path, tmp: Path) -> tuple[Path, int, str]:
    proc = subprocess.run(nvcc_command(source, tmp / (source.name + ".o")), capture_output=True, text=True)
    return source, proc.returncode, proc.stdout + proc.stderr


def check_bindings(tmp: Path) -> tuple[int, str]:
    try:
        import torch
    except ImportError:
        return 0, "skipped: torch not importable"
    include = Path(torch.__file__).parent / "include"
    stub = tmp / "stub" / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True, exist_ok=True)
    (stub / "cuda_cmake_macros.h").write_text("#pragma once\n")  # the generated header a CPU wheel lacks
    homes = [os.environ.get("CUDA_HOME"), "/usr/local/cuda", str(Path(shutil.which("nvcc")).resolve().parents[1])]
    cuda_home = next((h for h in homes if h and Path(h, "include", "cuda_runtime.h").exists()), None)
    if cuda_home is None:
        return 0, "skipped: no CUDA include folder with cuda_runtime.h found (set CUDA_HOME)"
    cmd = ["g++", "-std=c++17", "-fsyntax-only", f"-I{tmp / 'stub'}", f"-I{include}",
           f"-I{include / 'torch/csrc/api/include'}", f"-I{cuda_home}/include",
           f"-I{sysconfig.get_paths()['include']}", f"-I{CSRC}", "-DTORCH_EXTENSION_NAME=_C",
           str(CSRC / "bindings.cpp")]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    errors = "\n".join(line for line in (proc.stdout + proc.stderr).splitlines() if "error" in line)
    return proc.returncode, errors or "ok"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bindings", action="store_true", help="also type-check csrc/bindings.cpp (torch headers)")
    parser.add_argument("--json", type=Path, help="write the per-kernel table here")
    args = parser.parse_args()
    if shutil.which("nvcc") is None:
        print("check_cuda_kernels: nvcc not found; skipped")
        return 0
    sources = sorted(CSRC.glob("*.cu"))
    failed = False
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp_dir, cf.ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        tmp = Path(tmp_dir)
        jobs = [pool.submit(compile_one, s, tmp) for s in sources]
        bindings = pool.submit(check_bindings, tmp) if args.bindings else None
        for job in jobs:
            source, rc, output = job.result()
            if rc != 0:
                failed = True
                print(f"FAILED to compile {source.relative_to(ROOT)}:\n{output[-6000:]}")
                continue
            for row in parse_ptxas(output):
                rows.append({"file": source.name, **row})
        if bindings is not None:
            rc, text = bindings.result()
            print(f"csrc/bindings.cpp type-check against the installed torch headers: {text}")
            failed |= rc != 0
    names = demangle(sorted({r["function"] for r in rows}))
    print(f"{'file':<18} {'arch':<7} {'regs':>4} {'spill st/ld':>11} {'stack':>5} {'smem':>6}  kernel")
    for r in sorted(rows, key=lambda r: (r["file"], short_name(names[r["function"]]), r["arch"])):
        spills = r.get("spill_stores", 0) + r.get("spill_loads", 0)
        hot_spill = r["entry"] and spills > 0
        failed |= hot_spill
        kind = "" if r["entry"] else " (device function)"
        print(f"{r['file']:<18} {r['arch']:<7} {r.get('registers', '-'):>4} "
              f"{r.get('spill_stores', 0):>5}/{r.get('spill_loads', 0):<5} {r.get('stack', 0):>5} "
              f"{r.get('smem', 0):>6}  {short_name(names[r['function']])}{kind}{'  <-- SPILLS' if hot_spill else ''}")
    if args.json:
        args.json.write_text(json.dumps([{**r, "name": names[r["function"]]} for r in rows], indent=1))
    print("check_cuda_kernels: " + ("FAILED" if failed else f"ok ({len(sources)} files, {len(rows)} functions)"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
