"""Precomputed reference log-probs: one pass of the reference model, stored per response token."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from tidpo.ops import token_logps

IGNORE_INDEX = -100


def precompute_reference_logps(trainer, dataset, *, batch_size: int, desc: str = "reference log-probs"):
    """Score every pair of ``dataset`` with the trainer's reference model, once.

    For each item, ``chosen_ref_logps`` / ``rejected_ref_logps`` are lists aligned with
    ``chosen_input_ids`` / ``rejected_input_ids``: ``log ref(y_t | x, y_<t)`` for every response token
    (teacher forcing through the same collator, padding and forward as the training step, so the
    values equal what the live reference computes).

    Args:
        trainer: a :class:`~tidpo.trainer.TokenWeightedDPOTrainer` (its collator, device and
            ``reference_logits``).
        dataset: a :class:`~tidpo.data.PreferenceDataset`.
        batch_size: pairs per forward.

    Returns:
        ``dataset.with_columns(chosen_ref_logps=..., rejected_ref_logps=...)``.
    """
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=trainer.data_collator)
    chosen, rejected = [], []
    show = trainer.is_world_process_zero() and not trainer.args.disable_tqdm
    for batch in tqdm(loader, desc=desc, disable=not show):
        input_ids = batch["input_ids"].to(trainer.args.device)
        attention_mask = batch["attention_mask"].to(trainer.args.device)
        labels = batch["labels"].to(trainer.args.device)[:, 1:]
        logits = trainer.reference_logits(input_ids, attention_mask)[:, :-1]
        with torch.no_grad():
            logps = token_logps(logits, labels, IGNORE_INDEX, backend=trainer.args.loss_backend).float().cpu()
        valid = (labels != IGNORE_INDEX).cpu()
        num_pairs = input_ids.shape[0] // 2
        for row in range(input_ids.shape[0]):
            values = logps[row][valid[row]].tolist()
            (chosen if row < num_pairs else rejected).append(values)
    for i, item in enumerate(dataset):
        for side, values in (("chosen", chosen[i]), ("rejected", rejected[i])):
            if len(values) != len(item[f"{side}_input_ids"]):
                raise RuntimeError(f"item {i}: {len(values)} reference log-probs for {len(item[f'{side}_input_ids'])} "
                                   f"{side} response tokens (a response token at position 0 has no prediction)")
    return dataset.with_columns(chosen_ref_logps=chosen, rejected_ref_logps=rejected)
