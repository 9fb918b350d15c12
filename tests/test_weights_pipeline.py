"""The documented TIS-DPO pipeline (examples/tis_dpo_pipeline.sh) end to end on the embedded default.

Variant P (one SmolLM2 model, the official harmless / harmful prompts) with a handful of pairs and one
step per training run: export pairs -> estimate-weights (train and held-out) -> show-weights -> train
--loss tis_dpo. The S and D builders (`train --loss sft|dpo [--reverse] --merge-adapter`) are run on
the tiny model in tests/test_train_cli.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_prompt_based_pipeline_on_embedded_default(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "PY": sys.executable,
           "PAIRS": "6", "HELDOUT": "4", "STEPS": "1"}
    proc = subprocess.run(["bash", str(ROOT / "examples" / "tis_dpo_pipeline.sh"), "P", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    rows = [json.loads(line) for line in (tmp_path / "weights-P-pairs.jsonl").read_text().splitlines()]
    assert len(rows) == 6
    for row in rows:
        for side in ("chosen", "rejected"):
            assert len(row[f"{side}_weights"]) == len(row[f"{side}_scores"]) == len(row[f"{side}_tokens"]) > 0
            assert all(0.7 - 1e-6 <= w <= 1.3 + 1e-6 for w in row[f"{side}_weights"])  # rank_based [0.7, 1.3]
    view = tmp_path / "weights-P-view"
    assert (view / "weights.html").is_file() and (view / "weights_tokens.png").read_bytes()[:4] == b"\x89PNG"
    summary = json.loads((tmp_path / "tis-dpo-P" / "tidpo_summary.json").read_text())
    assert any(k.startswith("eval_weights/") for k in summary["eval_after"])  # weighted held-out evaluation
    assert (tmp_path / "tis-dpo-P" / "adapter_model.safetensors").is_file()
