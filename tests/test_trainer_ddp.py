"""DDP through torchrun (gloo, 2 CPU processes): gradients are synchronised by the Trainer's engine.

After N steps both ranks must hold identical LoRA weights, equal (within fp tolerance) to a
single-process run on the same global batch: one pair per rank vs both pairs in one process.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("ddp_train_worker.py")
ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd: list[str]) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["dpo", "sft"])
def test_ddp_two_ranks_match_single_process(tmp_path, loss):
    """DPO: a mean over pairs. SFT: a mean over the response tokens of the global batch — the two ranks hold
    responses of 3 and 6 tokens, so a mean of per-rank means would move the weights differently."""
    steps = 3
    ddp_dir, single_dir = tmp_path / "ddp", tmp_path / "single"
    ddp_dir.mkdir()
    single_dir.mkdir()
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
          "--master_port", str(_free_port()), str(WORKER), str(ddp_dir), "1", str(steps), loss])
    _run([sys.executable, str(WORKER), str(single_dir), "2", str(steps), loss])

    rank0 = torch.load(ddp_dir / "lora-rank0.pt")
    rank1 = torch.load(ddp_dir / "lora-rank1.pt")
    single = torch.load(single_dir / "lora-rank0.pt")
    assert rank0["world_size"] == rank1["world_size"] == 2 and single["world_size"] == 1
    assert rank0["lora"].keys() == single["lora"].keys() and len(single["lora"]) > 0
    moved = 0.0
    for name, value in single["lora"].items():
        # Same collective result on both ranks: bitwise.
        torch.testing.assert_close(rank0["lora"][name], rank1["lora"][name], rtol=0, atol=0)
        # Same global batch as one process; Adam's normalisation amplifies last-bit differences of
        # the gradient means a little, hence 1e-5 against updates of ~1e-2.
        torch.testing.assert_close(rank0["lora"][name], value, rtol=1e-4, atol=1e-5)
        if "lora_B" in name:  # initialised at zero: its size is the training update
            moved = max(moved, float(value.abs().max()))
    assert moved > 1e-3, "the LoRA weights barely moved: the comparison would prove nothing"
    # The logged metrics are reduced over ranks: the DDP run logs the single run's numbers.
    ddp_losses = [h["loss"] for h in rank0["log_history"] if "loss" in h]
    single_losses = [h["loss"] for h in single["log_history"] if "loss" in h]
    assert ddp_losses == pytest.approx(single_losses, rel=1e-4, abs=1e-5)
    # Evaluation over 5 pairs in batches of 2: the pairs the sampler repeats on one rank are not counted.
    metrics = [k for k in single["evaluation"] if k.startswith(("eval_rewards/", "eval_logps/", "eval_sft/"))]
    assert metrics and "eval_loss" in single["evaluation"]
    for key in [*metrics, "eval_loss"]:
        assert rank0["evaluation"][key] == pytest.approx(single["evaluation"][key], rel=1e-4, abs=1e-5), key
