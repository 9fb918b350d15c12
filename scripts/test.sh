#!/usr/bin/env bash
# The test command: set up the environment (scripts/bootstrap.sh), lint, run the test suite.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k chunked -x`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="$(bash scripts/bootstrap.sh)"
"$PY" -m ruff check .
exec "$PY" -m pytest "$@"
