"""``tidpo train``: every ``TrainingArguments`` flag, the method's flags and the model / data / LoRA flags.

Example::

    tidpo train --model PATH --data pairs.jsonl --loss tis_dpo --weights weights.jsonl \\
        --lora-r 16 --lora-alpha 32 --lora-target-modules q_proj v_proj --output-dir out/ \\
        --per-device-train-batch-size 4 --learning-rate 5e-5 --num-train-epochs 1

``tidpo train --help`` lists every flag with its default.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from transformers import HfArgumentParser

from tidpo.trainer.config import TokenWeightedDPOConfig
from tidpo.trainer.run import RunArguments, run_training

#: Defaults for a LoRA run that differ from ``TrainingArguments``' (each can be given on the command line).
CLI_DEFAULTS = {"output_dir": "tidpo-output", "learning_rate": 5e-5, "logging_steps": 10, "save_strategy": "no",
                "per_device_train_batch_size": 4, "per_device_eval_batch_size": 4}


def parse_train_args(argv: list[str]) -> tuple[RunArguments, TokenWeightedDPOConfig]:
    parser = HfArgumentParser((RunArguments, TokenWeightedDPOConfig), prog="tidpo train",
                              description="Train a causal LM with a (token-weighted) preference loss, LoRA by default.")
    parser.set_defaults(**CLI_DEFAULTS)
    run, config = parser.parse_args_into_dataclasses(args=argv)
    return run, config


def format_summary(summary: dict) -> str:
    """The final summary printed by ``tidpo train``: key eval metrics before / after and the saved paths."""
    lines = []
    before, after = summary["eval_before"], summary["eval_after"]
    for key in ("eval_loss", "eval_rewards/margins", "eval_rewards/accuracies"):
        if key in after:
            lines.append(f"{key:<26} {before.get(key, float('nan')):>9.4f} -> {after[key]:>9.4f}")
    train = summary["train"]
    if "train_runtime" in train:
        loss = train.get("train_loss", float("nan"))
        lines.append(f"train time {train['train_runtime']:.1f} s, mean train loss {loss:.4f}")
    for what, path in summary["saved"].items():
        lines.append(f"saved {what}: {path}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    run, config = parse_train_args(sys.argv[1:] if argv is None else argv)
    summary = run_training(run, config)
    print(format_summary(summary))
    if summary["saved"]:
        record = {k: v for k, v in summary.items() if k != "trainer"}
        Path(config.output_dir, "tidpo_summary.json").write_text(json.dumps(record, default=str, indent=1))
    return 0
