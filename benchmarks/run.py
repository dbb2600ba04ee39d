"""Run the benchmark families and write one JSON result file.

    python -m benchmarks.run                      # all families, CUDA; writes benchmarks/results/<gpu>-<date>.json
    python -m benchmarks.run --only logprobs      # one family (repeat --only, or comma-separate, for several)
    python -m benchmarks.run --smoke --out /tmp/x # tiny shapes on the CPU: checks the harness, numbers mean nothing

Each family's cases are printed as they finish, then the issue's targets with PASS/MISS computed from the numbers
just measured. The exit status is 1 when a family failed (an error in one of our ops, not a baseline's), else 0: a
MISSed target is a result, not a failure.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from benchmarks import harness as hz
from benchmarks import registry
from benchmarks.results import SCHEMA_VERSION, write_results

FAMILIES = registry.FAMILIES
RESULTS_DIR = Path(__file__).resolve().parent / "results"


def run_benchmarks(
    *, only: list[str] | None = None, smoke: bool = False, device: str | None = None, log: Callable = print
) -> dict:
    """Measure the ceilings, then each selected family; return the results dict (see README for its schema)."""
    names = list(FAMILIES) if not only else only
    unknown = [n for n in names if n not in FAMILIES]
    if unknown:
        raise ValueError(f"only: unknown families {unknown}; choose from {list(FAMILIES)}")
    s = hz.make_settings(smoke=smoke, device=device)
    env = hz.environment(s)
    log(f"device: {env['device']} | torch {env['torch']} | triton {env['triton']} | CUDA {env['cuda']} | "
        f"{env['date']}{' | SMOKE (numbers mean nothing)' if smoke else ''}")
    ceilings = hz.measure_ceilings(s)
    log(f"ceilings: copy {ceilings['copy_gbps']:.4g} GB/s (read+write) | "
        f"{ceilings['matmul_dtype']} matmul {ceilings['matmul_tflops']:.4g} TFLOP/s {ceilings['matmul_shape']}")

    families: dict[str, dict] = {}
    all_targets: list[dict] = []
    for name in names:
        log(f"\n== {name}")
        start = time.perf_counter()
        entry: dict = {"cases": []}
        try:
            cases = entry["cases"]
            for spec in registry.specs(name, hz.size_of(s)):
                cases.append(hz.run_case(s, ceilings, spec))
                log(hz.format_case(cases[-1]))
            failed = [c["name"] for c in cases if "error" in c["ours"]]
            entry["status"] = "error" if failed else "ok"
            if failed:
                entry["error"] = f"our op failed in: {failed}"
            all_targets += registry.targets(name, cases, hz.size_of(s))
        except hz.FamilySkipped as exc:
            entry.update(status="skipped", reason=str(exc), cases=[])
        except Exception as exc:
            entry.update(status="error", error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
            log(entry["traceback"])
        entry["seconds"] = time.perf_counter() - start
        if entry["status"] != "ok":
            log(f"  {entry['status'].upper()}: {entry.get('reason') or entry.get('error')}")
        families[name] = entry
        hz.free_memory(s)

    if all_targets:
        log("\n== targets" + (" (smoke run: PASS/MISS mean nothing)" if smoke else ""))
        for t in all_targets:
            log(hz.format_target(t))
    return {"schema_version": SCHEMA_VERSION, "environment": env, "ceilings": ceilings, "families": families,
            "targets": all_targets}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", default=None,
                        help=f"family to run (repeatable or comma-separated): {', '.join(FAMILIES)}")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU, torch backend, 2 timed calls")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default: benchmarks/results; a temporary folder with --smoke)")
    args = parser.parse_args(argv)
    only = [n.strip() for item in args.only for n in item.split(",") if n.strip()] if args.only else None
    results = run_benchmarks(only=only, smoke=args.smoke)
    out_dir = args.out or (Path(tempfile.gettempdir()) / "remax-benchmarks-smoke" if args.smoke else RESULTS_DIR)
    path = write_results(results, out_dir)
    print(f"\nwrote {path}")
    return 1 if any(f["status"] == "error" for f in results["families"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
