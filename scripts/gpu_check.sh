#!/usr/bin/env bash
# The one command for a CUDA machine: install the package (no network needed), run the test-suite on CUDA tensors
# with compiled Triton kernels, then the benchmarks in both forms (benchmarks.run's JSON and pytest-benchmark's
# JSON) and their plots; logs are tee'd, results land in benchmarks/results/ and $OUT.
#
#   bash scripts/gpu_check.sh                      # tests, then all benchmark families in both forms, then plots
#   bash scripts/gpu_check.sh tests [PYTEST ARGS]  # only the tests (e.g. `tests -x -k token_logprobs`)
#   bash scripts/gpu_check.sh bench [--only F] [--smoke]  # only the benchmarks, both forms (F: a family, repeatable
#                                                  # or comma-separated: logprobs, policy_loss, sampling, generate,
#                                                  # trainer)
#   bash scripts/gpu_check.sh bench-run [RUN ARGS]      # only `python -m benchmarks.run` (e.g. `--only logprobs`)
#   bash scripts/gpu_check.sh bench-pytest [PYTEST ARGS] # only `pytest benchmarks/ --benchmark-only` (e.g. `-k eager`)
#   bash scripts/gpu_check.sh train [KEY VALUE]    # only the trainer's embedded experiment on CUDA (not in `all`)
#   bash scripts/gpu_check.sh compare [KEY VALUE]  # only `remax compare` remax,ppo,grpo,rloo on a 0.5B-shaped model
#                                                  # (examples/compare_0.5b.yaml; not in `all`): table, JSON, plot
#   bash scripts/gpu_check.sh cuda [PYTEST ARGS]   # only the CUDA kernels of csrc/: build, their tests, and
#                                                  # compute-sanitizer memcheck/racecheck/synccheck (sanitizers in `all`)
#   bash scripts/gpu_check.sh --dry-run ...        # print the commands it would run and exit (works without CUDA)
#
# Logs go to $TMPDIR/remax-gpu-check-<time>/. When $OUT is set (the device tool's output folder), the logs, both
# result JSON files and the plots are copied there too.
# Exit status: non-zero when the tests failed, a benchmark family errored (a MISSed target is not an error) or a
# pytest-benchmark test failed; 2 for a usage error or without CUDA.
set -uo pipefail
cd "$(dirname "$0")/.."

usage="usage: bash scripts/gpu_check.sh [--dry-run] [all|tests|bench|bench-run|bench-pytest|train|compare|cuda] [extra args]"
dry_run=0
if [ "${1:-}" = "--dry-run" ]; then
  dry_run=1
  shift
fi
what="${1:-all}"
[ $# -gt 0 ] && shift
case "$what" in
  all) [ $# -eq 0 ] || { echo "gpu_check: extra args need a step first (tests, bench, ...)" >&2; exit 2; } ;;
  tests|bench|bench-run|bench-pytest|train|compare|cuda) ;;
  *) echo "$usage" >&2; exit 2 ;;
esac

# What each benchmark form runs: benchmarks.run's arguments, pytest's paths and arguments.
run_args=()
pytest_paths=(benchmarks/)
pytest_args=()
case "$what" in
  bench-run) run_args=("$@") ;;
  bench-pytest) pytest_args=("$@") ;;
  bench)
    # The options both forms understand, translated: a family is a --only for the runner and a file for pytest.
    families=()
    while [ $# -gt 0 ]; do
      case "$1" in
        --only) [ $# -ge 2 ] || { echo "gpu_check: --only needs a family name" >&2; exit 2; }
                IFS=, read -ra names <<< "$2"; families+=("${names[@]}"); shift 2 ;;
        --only=*) IFS=, read -ra names <<< "${1#--only=}"; families+=("${names[@]}"); shift ;;
        --smoke) run_args+=(--smoke); pytest_args+=(--bench-smoke); shift ;;
        *) echo "gpu_check: bench takes --only FAMILY and --smoke (other options: bench-run or bench-pytest): $1" >&2
           exit 2 ;;
      esac
    done
    if [ ${#families[@]} -gt 0 ]; then
      pytest_paths=()
      for family in "${families[@]}"; do
        if [ ! -f "benchmarks/test_bench_$family.py" ]; then
          echo "gpu_check: unknown benchmark family '$family' (no benchmarks/test_bench_$family.py)" >&2
          exit 2
        fi
        run_args+=(--only "$family")
        pytest_paths+=("benchmarks/test_bench_$family.py")
      done
    fi
    ;;
esac
runs_tests=0; runs_run=0; runs_pytest=0
case "$what" in
  all) runs_tests=1; runs_run=1; runs_pytest=1 ;;
  tests) runs_tests=1 ;;
  bench) runs_run=1; runs_pytest=1 ;;
  bench-run) runs_run=1 ;;
  bench-pytest) runs_pytest=1 ;;
esac

# Compiled kernels on CUDA tensors, never the interpreter; the automatic backend choice, whatever the shell had.
unset TRITON_INTERPRET REMAX_KERNELS_BACKEND
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore

log_dir="${TMPDIR:-/tmp}/remax-gpu-check-$(date -u +%Y%m%dT%H%M%SZ)"
pybench_json="$log_dir/pytest-benchmark.json"

# step LOG CMD...: print the command, run it with its output tee'd to $log_dir/LOG; its exit status.
step() {
  local log="$1"
  shift
  echo "== $*"
  [ "$dry_run" -eq 1 ] && return 0
  "$@" 2>&1 | tee "$log_dir/$log"
  return "${PIPESTATUS[0]}"
}

if [ "$dry_run" -eq 0 ]; then
  mkdir -p "$log_dir"
  echo "logs: $log_dir"
  if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: no CUDA device visible to torch; on a CPU machine run the tests with TRITON_INTERPRET=1" >&2
    exit 2
  fi
  python - <<'EOF' 2>&1 | tee "$log_dir/env.log"
import torch, triton
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}) | triton {triton.__version__} | "
      f"{torch.cuda.get_device_name()} | {torch.cuda.device_count()} device(s)")
EOF

  # The GPU image has torch/triton/transformers but no network: install only our package, against its torch.
  if ! (cd /tmp && python -c "import remax_kernels" 2>/dev/null); then
    echo "== pip install --no-deps --no-build-isolation -e ."
    python -m pip install --no-deps --no-build-isolation -e . 2>&1 | tee "$log_dir/install.log"
    if [ "${PIPESTATUS[0]}" -ne 0 ]; then
      echo "gpu_check: install failed; running from the source tree instead" >&2
      export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
    fi
  fi
fi

test_rc=0
bench_rc=0
pybench_rc=0
train_rc=0
plot_rc=0
if [ "$runs_tests" -eq 1 ]; then
  step pytest.log python -m pytest tests -q "$@"
  test_rc=$?
fi
if [ "$runs_run" -eq 1 ]; then
  step benchmarks.log python -m benchmarks.run ${run_args[@]+"${run_args[@]}"}
  bench_rc=$?
fi
if [ "$runs_pytest" -eq 1 ]; then
  # The same cases through pytest-benchmark: one test per case and provider, CUDA-event timing, extra_info with the
  # ceilings' fractions, peak memory and ratios; the JSON converts to the runner's schema (benchmarks/results.py).
  step pytest-benchmark.log python -m pytest "${pytest_paths[@]}" -q -p no:cacheprovider --benchmark-only \
    "--benchmark-json=$pybench_json" ${pytest_args[@]+"${pytest_args[@]}"}
  pybench_rc=$?
fi
if [ "$what" = train ]; then
  # `remax train` on the GPU: the README's main job, with its step time, tokens/s and peak memory in summary.json.
  step train.log python -m remax train --device cuda --progress false --save_final_model false \
    --run_dir "$log_dir/default-run" "$@"
  train_rc=$?
  [ "$dry_run" -eq 1 ] || rm -rf "$log_dir/default-run/checkpoints" "$log_dir/default-run/initial_policy"
fi
compare_rc=0
if [ "$what" = compare ]; then
  # ReMax against PPO, GRPO and RLOO at equal batch on the GPU: compare.md (the README's table), compare.json, plot.
  step compare.log python -m remax compare --config examples/compare_0.5b.yaml --estimators remax,ppo,grpo,rloo \
    --device cuda --progress false --run_dir "$log_dir/compare" "$@"
  compare_rc=$?
  [ "$dry_run" -eq 1 ] || rm -rf "$log_dir"/compare/*/checkpoints "$log_dir"/compare/*/initial_policy \
    "$log_dir/compare/initial_policy"
fi

# The CUDA kernels of csrc/ (extension remax_kernels._C; the install above builds it where nvcc and a CUDA torch
# exist): build it loudly if it is missing, run their tests (`cuda` only: `all` ran them with the suite), then
# compute-sanitizer on a small case of each kernel, checking only our kernels (names containing "remax").
cuda_rc=0
if [ "$what" = all ] || [ "$what" = cuda ]; then
  if [ "$dry_run" -eq 1 ] || ! python -c "import sys; from remax_kernels import _cuda; sys.exit(not _cuda.available())"; then
    step cuda-build.log env REMAX_KERNELS_BUILD_CUDA=1 python -m pip install --no-deps --no-build-isolation -e . \
      || cuda_rc=1
  fi
  if [ "$what" = cuda ]; then
    step cuda-tests.log python -m pytest -q tests/test_cuda_kernels.py tests/test_cuda_emu.py "$@" || cuda_rc=1
  fi
  for tool in memcheck racecheck synccheck; do
    step "sanitize-$tool.log" compute-sanitizer --tool "$tool" --kernel-name kns=remax --error-exitcode 1 \
      python scripts/cuda_sanitize_case.py || cuda_rc=1
  done
fi
[ "$dry_run" -eq 1 ] && exit 0

# The runner prints "wrote <path>" for the JSON file it wrote.
run_json=""
[ -f "$log_dir/benchmarks.log" ] && run_json=$(sed -n 's/^wrote //p' "$log_dir/benchmarks.log" | tail -n 1)
for json in "$run_json" "$pybench_json"; do
  if [ -n "$json" ] && [ -f "$json" ]; then
    stem=$(basename "$json" .json)
    step "plot-$stem.log" python -m benchmarks.plot "$json" --out "$log_dir/plots/$stem" || plot_rc=1
  fi
done

if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT/logs"
  cp -r "$log_dir" "$OUT/logs/"
  [ -n "$run_json" ] && [ -f "$run_json" ] && cp "$run_json" "$OUT/"
  [ -f "$pybench_json" ] && cp "$pybench_json" "$OUT/"
  if [ -d "$log_dir/plots" ]; then
    cp -r "$log_dir/plots" "$OUT/"
    rm -rf "$OUT/logs/$(basename "$log_dir")/plots"  # once is enough
  fi
  echo "copied logs, results and plots to $OUT"
fi

# A plot failure is reported but does not fail the check: the measurements are in the JSON files.
echo "gpu_check: tests rc=$test_rc, benchmarks rc=$bench_rc, pytest-benchmark rc=$pybench_rc, train rc=$train_rc," \
  "compare rc=$compare_rc, cuda rc=$cuda_rc, plots $([ "$plot_rc" -eq 0 ] && echo ok || echo FAILED)"
[ "$test_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ] && [ "$pybench_rc" -eq 0 ] && [ "$train_rc" -eq 0 ] && \
  [ "$compare_rc" -eq 0 ] && [ "$cuda_rc" -eq 0 ]
