"""Every training run of the experiment goes through :class:`~tidpo.trainer.TokenWeightedDPOTrainer`.

Runs of one cell share the tokenisation (done once per data variant), the data order (a seeded sequence of
permutations, fed in order: ``train_sampling_strategy="sequential"``), the steps, learning rate, β, batch
size and seed; only the method's own fields differ.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from transformers import PrinterCallback, TrainerCallback

from tidpo.data import PreferenceDataset, tokenize_preference_rows
from tidpo.trainer import TokenWeightedDPOConfig, TokenWeightedDPOTrainer
from tidpo.trainer.loss_registry import LOSS_REGISTRY

__all__ = ["RewardCurve", "ordered_dataset", "run_trainer", "tokenize_rows"]

#: Sequence limits: far above the task's lengths, so nothing is ever truncated.
MAX_LENGTH = 64
MAX_PROMPT_LENGTH = 16


def tokenize_rows(rows: list[dict], tokenizer) -> PreferenceDataset:
    """Tokenise preference rows (with their weight columns, if any) as the trainer would."""
    return tokenize_preference_rows(rows, tokenizer, max_length=MAX_LENGTH, max_prompt_length=MAX_PROMPT_LENGTH,
                                    progress=False)


def ordered_dataset(dataset: PreferenceDataset, *, steps: int, batch_size: int, seed: int) -> PreferenceDataset:
    """The items of ``steps`` batches: concatenated seeded permutations of ``dataset`` (epoch after epoch).

    The permutation depends only on ``seed`` and ``len(dataset)``, so every method of a cell (and every
    noise level of a seed) sees the pairs in the same order.
    """
    generator = torch.Generator().manual_seed(seed)
    needed = steps * batch_size
    order: list[int] = []
    while len(order) < needed:
        order.extend(torch.randperm(len(dataset), generator=generator).tolist())
    return PreferenceDataset([dataset[i] for i in order[:needed]])


class RewardCurve(TrainerCallback):
    """Mean hidden reward of sampled responses every ``every`` steps (step 0 and the last step included).

    ``measure(model) -> float`` must not touch the global RNG state (the evaluator forks it), so the curve
    does not change the training run.
    """

    def __init__(self, measure, every: int):
        self.measure, self.every = measure, every
        self.steps: list[int] = []
        self.rewards: list[float] = []

    def _record(self, step: int, model) -> None:
        if not self.steps or self.steps[-1] != step:
            self.steps.append(step)
            self.rewards.append(self.measure(model))

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._record(0, model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every == 0 or state.global_step == state.max_steps:
            self._record(state.global_step, model)

    def as_dict(self) -> dict:
        return {"step": list(self.steps), "reward": list(self.rewards)}


def run_trainer(model, dataset: PreferenceDataset, tokenizer, *, loss: str, steps: int, lr: float, config,
                seed: int, work_dir: str | Path, ref_model=None, callbacks=(), **method) -> dict:
    """Train ``model`` in place with ``TokenWeightedDPOTrainer`` on ``dataset`` fed in order.

    Args:
        dataset: the already ordered items (:func:`ordered_dataset`), ``steps * config.batch_size`` of them.
        loss / method: ``TokenWeightedDPOConfig`` fields of the method (e.g. ``gamma=0.0``).
        ref_model: the frozen reference (``None`` for SFT).

    Returns:
        ``{"seconds": train seconds, "setup_seconds": trainer construction, "train_loss": mean loss}``.
    """
    start = time.perf_counter()
    # The experiment's settings, for the losses that read them (a loss refuses a field it does not read).
    shared = {"beta": config.beta, "anchor_max_new_tokens": config.max_response_length + 1}
    method = {**{k: v for k, v in shared.items() if k in LOSS_REGISTRY[loss].fields}, **method}
    args = TokenWeightedDPOConfig(
        output_dir=str(work_dir), loss=loss, max_steps=steps, learning_rate=lr,
        per_device_train_batch_size=config.batch_size, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, max_grad_norm=1.0, seed=seed, data_seed=seed, report_to=[], save_strategy="no",
        logging_strategy="no", disable_tqdm=True, use_cpu=True, train_sampling_strategy="sequential",
        dataloader_num_workers=0, max_length=MAX_LENGTH, max_prompt_length=MAX_PROMPT_LENGTH, **method)
    trainer = TokenWeightedDPOTrainer(model, args, train_dataset=dataset, processing_class=tokenizer,
                                      ref_model=ref_model, callbacks=list(callbacks))
    trainer.remove_callback(PrinterCallback)
    setup = time.perf_counter() - start
    result = trainer.train()
    model.eval()
    return {"seconds": time.perf_counter() - start - setup, "setup_seconds": setup,
            "train_loss": float(result.training_loss)}
