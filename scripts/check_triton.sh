#!/usr/bin/env bash
# Run the kernels' interpreter and compile-only tests against another Triton release (outside CI: it unpacks a
# Triton wheel of a few hundred MB), e.g. the one on the GPU machine:
#
#   bash scripts/check_triton.sh 3.6.0 [pytest args]
#
# The release goes into .triton-VERSION/ (with a numpy it accepts) and shadows the environment's own through
# PYTHONPATH, so the project's environment is left as it is. Triton 3.6's interpreter calls numpy APIs that
# numpy 2.4 removed, hence NUMPY_SPEC (default "numpy<2.4"); the compiled kernels do not use numpy.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=${1:?usage: bash scripts/check_triton.sh TRITON_VERSION [pytest args]}
shift
PY="$(bash scripts/bootstrap.sh)"
DIR=".triton-$VERSION"
if [ ! -d "$DIR/triton" ]; then
  echo "[tidpo] unpacking triton==$VERSION and ${NUMPY_SPEC:-numpy<2.4} into $DIR" >&2
  "$PY" -m pip install -q --disable-pip-version-check --no-deps --target "$DIR" "triton==$VERSION" \
    "${NUMPY_SPEC:-numpy<2.4}"
fi
export PYTHONPATH="$PWD/$DIR${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c "import numpy, triton; print(f'triton {triton.__version__} ({triton.__file__}), numpy {numpy.__version__}')"
exec "$PY" -m pytest -p no:cacheprovider -m "interpreter or compile_only" tests/test_kernels_logps.py \
  tests/test_kernels_kl.py tests/test_edges.py "$@"
