#!/usr/bin/env bash
# One GPU session in about 9 minutes: set up, run the GPU tests, run the GPU benchmark set, print the
# markdown table, then run the whole test suite with the time that is left.
#
#   bash benchmarks/gpu_session.sh            (repository root or anywhere; needs a CUDA machine)
#
# Environment:
#   OUT            results directory (default: benchmarks/results): <gpu-slug>-<YYYYMMDD>.json/.md/-*.png
#   BENCH_SET      benchmark set (default: gpu-quick; "gpu" is the full set, which needs more than 9 minutes)
#   TOTAL_SECONDS  budget for the whole session (default: 540)
#   PYTHON_BIN     interpreter to use instead of scripts/bootstrap.sh's
#
# A failing step (a test failure, a benchmark cell, a missing optional package) is reported and the
# session goes on; the exit status is non-zero when the GPU tests or the benchmark run failed. The
# benchmark JSON is rewritten after every group, so a run stopped by the time limit keeps what it measured.
set -euo pipefail
cd "$(dirname "$0")/.."

START=$SECONDS
TOTAL=${TOTAL_SECONDS:-540}
OUT_DIR=${OUT:-benchmarks/results}
BENCH_SET=${BENCH_SET:-gpu-quick}
status=0
left() { echo $(( TOTAL - (SECONDS - START) )); }
say() { printf '\n[gpu_session %4ds] %s\n' "$(( SECONDS - START ))" "$*"; }
min() { if [ "$1" -lt "$2" ]; then echo "$1"; else echo "$2"; fi; }

# 1. Environment -------------------------------------------------------------------------------------
say "setting up"
if [ -n "${PYTHON_BIN:-}" ]; then
  PY=$PYTHON_BIN
elif ! PY=$(bash scripts/bootstrap.sh); then
  echo "scripts/bootstrap.sh failed; falling back to python3 on PATH" >&2
  PY=$(command -v python3)
fi
echo "python: $PY"
"$PY" - <<'EOF' || { echo "CUDA is not available to $PY: nothing to do on this machine" >&2; exit 1; }
import torch
assert torch.cuda.is_available(), "no CUDA device"
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, device {torch.cuda.get_device_name(0)}")
EOF
nvidia-smi --query-gpu=name,memory.total,clocks.max.memory --format=csv 2>/dev/null || true
# Liger-Kernel is an optional baseline: --no-deps so that it can never replace torch / triton.
if ! "$PY" -c "import liger_kernel" >/dev/null 2>&1; then
  timeout 60 "$PY" -m pip install --disable-pip-version-check -q --no-deps liger-kernel \
    || echo "liger-kernel could not be installed (no registry?): its cells will be recorded as skipped"
fi

# 2. GPU tests ----------------------------------------------------------------------------------------
say "GPU tests: pytest -m gpu tests/"
rc=0
timeout "$(min 150 "$(left)")" "$PY" -m pytest -m gpu tests/ -q -p no:cacheprovider || rc=$?
[ "$rc" -eq 0 ] || { echo "GPU tests: exit status $rc"; status=1; }

# 3. Benchmarks ---------------------------------------------------------------------------------------
# The runner stops starting cells after --max-seconds; timeout is the hard stop 60 s later.
BENCH_SECONDS=$(( $(left) - 150 ))
[ "$BENCH_SECONDS" -ge 60 ] || BENCH_SECONDS=60
say "benchmarks: set $BENCH_SET, budget ${BENCH_SECONDS}s, results in $OUT_DIR"
mkdir -p "$OUT_DIR"
rc=0
timeout "$(( BENCH_SECONDS + 60 ))" "$PY" -m benchmarks.run --set "$BENCH_SET" --out "$OUT_DIR" \
  --max-seconds "$BENCH_SECONDS" --markdown || rc=$?
if [ "$rc" -ne 0 ]; then
  echo "benchmark run: exit status $rc; rendering what was saved"
  status=1
  latest=$(ls -t "$OUT_DIR"/*.json 2>/dev/null | head -n 1 || true)
  if [ -n "$latest" ]; then
    "$PY" -m benchmarks.run --from-json "$latest" --markdown || true
  fi
fi

# 4. The whole test suite, with the time that is left ----------------------------------------------------
SUITE_SECONDS=$(( $(left) - 15 ))
if [ "$SUITE_SECONDS" -ge 30 ]; then
  say "whole test suite (stopped after ${SUITE_SECONDS}s)"
  rc=0
  timeout "$SUITE_SECONDS" "$PY" -m pytest tests/ -q -x -p no:cacheprovider || rc=$?
  case "$rc" in
    0) ;;
    124) echo "whole test suite: not finished within ${SUITE_SECONDS}s (time budget)";;
    *) echo "whole test suite: exit status $rc";;
  esac
else
  say "whole test suite skipped: no time left in the ${TOTAL}s budget"
fi

say "done in $(( SECONDS - START ))s; results in $OUT_DIR"
ls -l "$OUT_DIR" || true
exit "$status"
