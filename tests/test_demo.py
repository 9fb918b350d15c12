"""`tidpo quickstart` (the tiny byte-level tour) runs and its loss decreases."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tidpo.apps.quickstart import IGNORE_INDEX, build_batch, run_quickstart


@pytest.mark.parametrize("loss", ["tis_dpo", "dpo", "tdpo2"])
def test_demo_loss_decreases(loss):
    lines: list[str] = []
    history = run_quickstart(max_steps=12, loss=loss, log=lines.append)
    assert len(history) == 12
    assert history[-1]["loss"] < history[0]["loss"] - 0.05
    assert history[-1]["rewards/margins"] > 0
    assert any("loss" in line for line in lines)


def test_demo_weights_follow_official_alignment():
    lines: list[str] = []
    run_quickstart(max_steps=1, loss="tis_dpo", log=lines.append)
    weight_lines = [line for line in lines if line.startswith("TIS-DPO(P) weights")]
    assert len(weight_lines) == 2
    assert all(line.endswith("<eos>:0.00") for line in weight_lines)


def test_build_batch_masks_prompt_and_padding():
    ids, attention, labels = build_batch(["ab", "abcd"], ["x", "yz"])
    assert ids.shape == labels.shape == attention.shape == (2, 8)
    # "ab " is the prompt (3 bytes), then "x" + EOS; the rest is padding.
    assert labels[0].tolist() == [IGNORE_INDEX] * 3 + [ord("x"), 256] + [IGNORE_INDEX] * 3
    assert attention[0].sum() == 5 and torch.all(labels[1, :5] == IGNORE_INDEX)


def test_demo_command_line():
    out = subprocess.run([sys.executable, "-m", "tidpo", "quickstart", "--max-steps", "2", "--loss", "ipo"],
                         capture_output=True, text=True, check=True)
    assert out.stdout.startswith("tidpo quickstart: loss=ipo") and "->" in out.stdout
    old = subprocess.run([sys.executable, "-m", "tidpo", "quickstart", "--steps", "1", "--lr", "0.001"],
                         capture_output=True, text=True, check=True)
    assert "steps=1 lr=0.001" in old.stdout
    assert "--steps is deprecated" in old.stderr and "use --max-steps" in old.stderr
    bad = subprocess.run([sys.executable, "-m", "tidpo", "quickstart", "--loss", "nope"], capture_output=True,
                         text=True)
    assert bad.returncode == 2 and "invalid choice" in bad.stderr
