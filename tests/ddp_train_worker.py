"""Worker for tests/test_trainer_ddp.py: a few LoRA steps of a loss, run alone or under ``torchrun``.

Usage: ``python tests/ddp_train_worker.py OUT_DIR PER_DEVICE_PAIRS STEPS [LOSS]`` (LOSS: dpo, the default, or
sft). Every process writes its LoRA weights to ``OUT_DIR/lora-rank{RANK}.pt``.
"""

from __future__ import annotations

import os
import sys

import torch

from tidpo.apps.assets import gpt2_tokenizer, tiny_gpt2
from tidpo.trainer import TokenWeightedDPOConfig, TokenWeightedDPOTrainer
from tidpo.trainer.models import apply_lora

# Two pairs: one global batch per step, whatever the number of processes.
ROWS = [
    {"prompt": "The capital of France is", "chosen": " Paris.", "rejected": " a large city in Spain, I think."},
    {"prompt": "Two plus two equals", "chosen": " four, of course.", "rejected": " five."},
]
# Five held-out pairs in batches of 2: on 2 processes the sampler repeats pairs to even out the last batch.
EVAL_ROWS = ROWS + [
    {"prompt": "Water freezes at", "chosen": " zero degrees Celsius.", "rejected": " fifty degrees."},
    {"prompt": "The opposite of hot is", "chosen": " cold.", "rejected": " loud and bright."},
    {"prompt": "A week has", "chosen": " seven days.", "rejected": " nine or ten days, roughly."},
]


def main(out_dir: str, per_device_pairs: int, steps: int, loss: str = "dpo") -> None:
    torch.manual_seed(0)
    model = apply_lora(tiny_gpt2(seed=0), r=4, alpha=8)
    # gloo only when launched by torchrun (accelerate refuses a backend without a process group).
    backend = "gloo" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None
    config = TokenWeightedDPOConfig(
        output_dir=out_dir, use_cpu=True, ddp_backend=backend, per_device_train_batch_size=per_device_pairs,
        max_steps=steps, learning_rate=5e-3, lr_scheduler_type="constant", logging_steps=1, save_strategy="no",
        report_to=[], disable_tqdm=True, seed=0, loss=loss, per_device_eval_batch_size=2,
        **({"beta": 0.5} if loss == "dpo" else {}))
    trainer = TokenWeightedDPOTrainer(model, config, train_dataset=ROWS, eval_dataset=EVAL_ROWS,
                                      processing_class=gpt2_tokenizer())
    trainer.train()
    evaluation = trainer.evaluate()
    lora = {k: v.detach().clone() for k, v in trainer.model.named_parameters() if "lora_" in k}
    rank = int(os.environ.get("RANK", "0"))
    torch.save({"lora": lora, "world_size": trainer.accelerator.num_processes, "evaluation": evaluation,
                "log_history": trainer.state.log_history}, os.path.join(out_dir, f"lora-rank{rank}.pt"))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), *sys.argv[4:5])
