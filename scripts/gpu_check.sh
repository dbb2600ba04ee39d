#!/usr/bin/env bash
# The one command for a CUDA machine: install the package (no network needed), run the test-suite on CUDA tensors
# with compiled Triton kernels, then the benchmarks; logs are tee'd, results land in benchmarks/results/.
#
#   bash scripts/gpu_check.sh                    # tests, then all benchmark families
#   bash scripts/gpu_check.sh tests [PYTEST ARGS] # only the tests (e.g. `tests -x -k token_logprobs`)
#   bash scripts/gpu_check.sh bench [RUN ARGS]    # only the benchmarks (e.g. `bench --only logprobs`)
#   bash scripts/gpu_check.sh train [KEY VALUE]   # only the trainer's embedded experiment on CUDA (not in `all`)
#
# Logs go to $TMPDIR/remax-gpu-check-<time>/. When $OUT is set (the device tool's output folder), the logs and the
# result JSON are copied there too.
# Exit status: non-zero when the tests failed or a benchmark family errored (a MISSed target is not an error).
set -uo pipefail
cd "$(dirname "$0")/.."

what="${1:-all}"
[ $# -gt 0 ] && shift
case "$what" in
  all) [ $# -eq 0 ] || { echo "gpu_check: extra args need 'tests' or 'bench' first" >&2; exit 2; } ;;
  tests|bench|train) ;;
  *) echo "usage: bash scripts/gpu_check.sh [all|tests|bench|train] [extra args]" >&2; exit 2 ;;
esac

# Compiled kernels on CUDA tensors, never the interpreter; the automatic backend choice, whatever the shell had.
unset TRITON_INTERPRET REMAX_KERNELS_BACKEND
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore

log_dir="${TMPDIR:-/tmp}/remax-gpu-check-$(date -u +%Y%m%dT%H%M%SZ)"
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

test_rc=0
bench_rc=0
train_rc=0
if [ "$what" = all ] || [ "$what" = tests ]; then
  echo "== python -m pytest tests -q $*"
  python -m pytest tests -q "$@" 2>&1 | tee "$log_dir/pytest.log"
  test_rc=${PIPESTATUS[0]}
fi
if [ "$what" = all ] || [ "$what" = bench ]; then
  echo "== python -m benchmarks.run $*"
  python -m benchmarks.run "$@" 2>&1 | tee "$log_dir/benchmarks.log"
  bench_rc=${PIPESTATUS[0]}
fi
if [ "$what" = train ]; then
  # `remax train` on the GPU: the README's main job, with its step time, tokens/s and peak memory in summary.json.
  echo "== python -m remax train --device cuda --progress false $*"
  python -m remax train --device cuda --progress false --save_final_model false --run_dir "$log_dir/default-run" \
    "$@" 2>&1 | tee "$log_dir/train.log"
  train_rc=${PIPESTATUS[0]}
  rm -rf "$log_dir/default-run/checkpoints" "$log_dir/default-run/initial_policy"
fi

if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT/logs"
  cp -r "$log_dir" "$OUT/logs/"
  if [ -f "$log_dir/benchmarks.log" ]; then
    # The runner prints "wrote <path>" for the JSON file it wrote.
    result=$(sed -n 's/^wrote //p' "$log_dir/benchmarks.log" | tail -n 1)
    [ -n "$result" ] && [ -f "$result" ] && cp "$result" "$OUT/"
  fi
  echo "copied logs and results to $OUT"
fi

echo "gpu_check: tests rc=$test_rc, benchmarks rc=$bench_rc, train rc=$train_rc"
[ "$test_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ] && [ "$train_rc" -eq 0 ]
