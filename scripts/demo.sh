#!/usr/bin/env bash
# The main job on the embedded default: set up the environment, then run `tidpo demo`.
# Extra arguments go to `tidpo demo`, e.g. `bash scripts/demo.sh --max-steps 60 --loss dpo`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="$(bash scripts/bootstrap.sh)"
exec "$PY" -m tidpo.cli demo "$@"
