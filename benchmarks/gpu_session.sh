#!/usr/bin/env bash
# One GPU session in at most 5 minutes, offline, with the machine's own Python: prove the Triton kernels run,
# run the GPU tests, measure the benchmark set, and leave at most 8 files in $OUT.
#
#   bash benchmarks/gpu_session.sh               on a CUDA machine
#   bash benchmarks/gpu_session.sh --rehearsal   on CPU: every step at toy size (tests/test_gpu_session.py)
#
# Nothing is installed into the Python environment (it may be read-only) and nothing is downloaded: tidpo is
# imported from this checkout (PYTHONPATH; `tidpo` exposes csrc_triton/ as tidpo.kernels there), and optional
# baselines come only from wheels in .whl/ (e.g. liger_kernel-*.whl), unpacked into a scratch folder.
#
# Steps, in order; the first one is a gate:
#   1. environment: versions, device, driver; `import tidpo` must resolve to this checkout
#   2. kernel check (python -m benchmarks.gpu_check): the kernels import and match a float64 reference on the
#      Triton backend -- otherwise the session STOPS with exit status 1, since every later number would be
#      meaningless
#   3. GPU tests: pytest -m gpu, verbose, with a JUnit XML (rehearsal: collected only)
#   4. fused LM head (python -m benchmarks.fused_head --device cuda): tidpo's fused head vs the materialised
#      head vs TRL's / Liger's where their wheels are in .whl/, N = 4096, H = 2048, V = 128256, fp32 and bf16,
#      at most 120 s, its files rewritten after every op (rehearsal: toy size on CPU)
#   5. benchmark: python -m benchmarks.run, losses first and every op's first shape before any op's second,
#      within the time left (rehearsal: the smoke set on CPU); plots are drawn later, on CPU, from the JSON:
#      python -m benchmarks.run --from-json OUT/bench.json
#   6. only with FULL_SUITE=1: the whole test suite with the time that is left
#
# Environment:
#   OUT             results folder (default: benchmarks/results/gpu-session); files: session.log,
#                   gpu-tests.xml, fused-head.json, fused-head.md, bench.json, bench.md (and suite.xml with
#                   FULL_SUITE=1)
#   PYTHON_BIN      interpreter (default: python3 on PATH)
#   BUDGET_SECONDS  the whole session (default: 300)
#   BENCH_SET       benchmark set (default: gpu-quick; the rehearsal uses smoke)
#   FULL_SUITE=1    also run the whole test suite with the time left (off by default)
#
# Exit status: 0 when every step passed, 1 when the kernel check failed (the session stopped there) or the GPU
# tests or the benchmark failed.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

REHEARSAL=0
case "${1:-}" in
  --rehearsal) REHEARSAL=1 ;;
  "") ;;
  *) echo "usage: bash benchmarks/gpu_session.sh [--rehearsal]" >&2; exit 2 ;;
esac

START=$SECONDS
BUDGET=${BUDGET_SECONDS:-300}
OUT_DIR=${OUT:-benchmarks/results/gpu-session}
PY=${PYTHON_BIN:-python3}
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/tidpo-gpu-session.XXXXXX")
# Everything below also goes to the run log, which exists even when a step fails; on exit the log is flushed.
exec > >(tee "$OUT_DIR/session.log") 2>&1
TEE_PID=$!
finish() { rm -rf "$SCRATCH"; exec 1>&- 2>&-; wait "$TEE_PID" 2>/dev/null; }
trap finish EXIT

left() { echo $(( BUDGET - (SECONDS - START) )); }
say() { printf '\n[gpu_session %4ds] %s\n' "$(( SECONDS - START ))" "$*"; }
status=0

# 1. Environment ---------------------------------------------------------------------------------------------
say "environment (rehearsal=$REHEARSAL, budget ${BUDGET}s, results in $OUT_DIR)"
export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
PYPATH="$ROOT"
wheels=$(ls "$ROOT"/.whl/*.whl 2>/dev/null | grep -Ev '/(torch|triton|nvidia_[^/]*)-[^/]*\.whl$' || true)
if [ -n "$wheels" ]; then
  # --no-deps --target: the baselines land in a scratch folder; torch and triton can never be replaced.
  # shellcheck disable=SC2086
  if timeout 90 "$PY" -m pip install -q --no-index --no-deps --target "$SCRATCH/site" $wheels; then
    PYPATH="$ROOT:$SCRATCH/site"
    echo "optional baselines from .whl/: $(basename -a $wheels | tr '\n' ' ')"
  else
    echo "the wheels in .whl/ could not be unpacked: the baselines they hold are recorded as skipped"
  fi
fi
export PYTHONPATH="$PYPATH${PYTHONPATH:+:$PYTHONPATH}"
"$PY" - "$ROOT" <<'EOF' || { echo "environment: FAILED (see above)"; exit 1; }
import importlib.util, pathlib, platform, sys
import torch
root = pathlib.Path(sys.argv[1]).resolve()
import tidpo
where = pathlib.Path(tidpo.__file__).resolve().parent
assert where == root / "tidpo", f"`import tidpo` finds {where}, not this checkout's {root / 'tidpo'}"
versions = {"python": platform.python_version(), "torch": torch.__version__, "CUDA": torch.version.cuda}
for name in ("triton", "numpy", "transformers", "liger_kernel", "trl"):
    spec = importlib.util.find_spec(name)
    versions[name] = getattr(__import__(name), "__version__", "?") if spec else "not installed"
print("; ".join(f"{k} {v}" for k, v in versions.items()))
print("device:", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device visible")
print("tidpo:", where)
EOF
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.memory --format=csv 2>/dev/null || true

# 2. Kernel check (gate) -------------------------------------------------------------------------------------
say "kernel check"
if [ "$REHEARSAL" = 1 ]; then
  TRITON_INTERPRET=1 timeout 120 "$PY" -m benchmarks.gpu_check --device cpu
else
  timeout 120 "$PY" -m benchmarks.gpu_check --device cuda
fi
rc=$?
if [ "$rc" -ne 0 ]; then
  say "STOP: the kernel check failed (exit status $rc); nothing else was run"
  exit 1
fi

# 3. GPU tests -----------------------------------------------------------------------------------------------
# Only the files that hold GPU tests are collected: the others need packages a GPU machine may lack, and
# collecting them costs time that the benchmark needs.
GPU_TESTS=$(grep -l "mark.gpu" tests/test_*.py | tr '\n' ' ')
say "GPU tests: pytest -m gpu $GPU_TESTS"
if [ "$REHEARSAL" = 1 ]; then
  # On CPU the GPU tests would all skip: collecting them proves they import here (no hypothesis, peft, ...).
  # shellcheck disable=SC2086
  timeout 120 "$PY" -m pytest -m gpu $GPU_TESTS -p no:cacheprovider --collect-only -q \
    --junitxml "$OUT_DIR/gpu-tests.xml" | tee "$SCRATCH/collected.txt"
  rc=${PIPESTATUS[0]}
  collected=$(grep -Eo '^[0-9]+(/[0-9]+)? tests? collected' "$SCRATCH/collected.txt" | grep -Eo '^[0-9]+' || echo 0)
  if [ "$rc" -ne 0 ] || [ "$collected" -eq 0 ]; then
    echo "GPU tests: collection failed (exit status $rc, $collected collected)"; status=1
  fi
else
  # shellcheck disable=SC2086
  timeout "$(( $(left) > 150 ? 150 : $(left) ))" "$PY" -m pytest -m gpu $GPU_TESTS -v -p no:cacheprovider \
    -o junit_family=xunit2 --junitxml "$OUT_DIR/gpu-tests.xml"
  rc=$?
  # 5 = nothing collected: a GPU session that tests nothing is a failure too.
  [ "$rc" -eq 0 ] || { echo "GPU tests: exit status $rc"; status=1; }
fi

# 4. Fused LM head -------------------------------------------------------------------------------------------
# Its files are rewritten after every op, so a run stopped by the timeout keeps the cells it measured.
if [ "$REHEARSAL" = 1 ]; then
  FUSED=(--device cpu --tokens 64 --hidden 16 --vocab 301 --repeats 1)
else
  FUSED=(--device cuda --dtypes float32,bfloat16 --repeats 3)
fi
say "fused LM head: ${FUSED[*]}"
timeout 120 "$PY" -m benchmarks.fused_head "${FUSED[@]}" --out "$OUT_DIR" --name fused-head
rc=$?
[ "$rc" -eq 0 ] || { echo "fused LM head benchmark: exit status $rc"; status=1; }

# 5. Benchmark -----------------------------------------------------------------------------------------------
# The runner stops starting cells after --max-seconds; timeout is the hard stop 30 s later.
if [ "$REHEARSAL" = 1 ]; then
  BENCH=(--set smoke --device cpu --providers tidpo,eager)
else
  BENCH=(--set "${BENCH_SET:-gpu-quick}")
fi
BENCH_SECONDS=$(( $(left) - 45 ))
[ "$BENCH_SECONDS" -ge 20 ] || BENCH_SECONDS=20
say "benchmark: ${BENCH[*]}, ${BENCH_SECONDS}s"
timeout "$(( BENCH_SECONDS + 30 ))" "$PY" -m benchmarks.run "${BENCH[@]}" --out "$OUT_DIR" --name bench \
  --max-seconds "$BENCH_SECONDS" --no-plots --markdown
rc=$?
if [ "$rc" -ne 0 ]; then
  echo "benchmark: exit status $rc"; status=1
  # Killed by the hard stop: render what the JSON holds (it is rewritten after every group).
  [ -f "$OUT_DIR/bench.json" ] && "$PY" -m benchmarks.run --from-json "$OUT_DIR/bench.json" --no-plots --markdown
fi

# 6. The whole suite, only when asked ------------------------------------------------------------------------
if [ "${FULL_SUITE:-0}" = 1 ]; then
  SUITE_SECONDS=$(( $(left) - 10 ))
  if [ "$SUITE_SECONDS" -ge 30 ]; then
    say "whole test suite (stopped after ${SUITE_SECONDS}s)"
    timeout "$SUITE_SECONDS" "$PY" -m pytest tests/ -q -x -p no:cacheprovider --junitxml "$OUT_DIR/suite.xml" \
      | tail -n 40
  else
    say "whole test suite skipped: no time left in the ${BUDGET}s budget"
  fi
fi

say "done in $(( SECONDS - START ))s, exit status $status; files in $OUT_DIR:"
ls -l "$OUT_DIR"
exit "$status"
