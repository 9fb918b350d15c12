"""The reference model: the frozen copy of a policy, and reference log-probs precomputed once."""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from tidpo.data.collator import next_token
from tidpo.ops import token_logps


def placement_of(model: nn.Module) -> str | None:
    """Why ``model`` cannot be copied or moved as a whole (``copy.deepcopy`` + ``.to``), or ``None`` if it can.

    Quantised weights (bitsandbytes, GPTQ, AWQ, ... — ``transformers`` sets ``hf_quantizer`` or
    ``is_loaded_in_4bit`` / ``is_loaded_in_8bit``) cannot be moved with ``.to``, and a model dispatched over
    several devices by ``device_map`` (``hf_device_map``) would be gathered onto one.
    """
    if getattr(model, "hf_quantizer", None) is not None or getattr(model, "is_loaded_in_4bit", False) \
            or getattr(model, "is_loaded_in_8bit", False):
        return "quantised"
    device_map = getattr(model, "hf_device_map", None)
    if isinstance(device_map, dict) and len({str(device) for device in device_map.values()}) > 1:
        return f"dispatched over several devices by device_map ({sorted({str(d) for d in device_map.values()})})"
    return None


def frozen_copy(model: nn.Module) -> nn.Module:
    """A frozen deep copy of ``model``, the reference of a full (non-PEFT) fine-tune.

    Raises:
        ValueError: ``model`` is quantised or dispatched over devices (:func:`placement_of`); the message says
            what to pass instead.
    """
    reason = placement_of(model)
    if reason is not None:
        raise ValueError(
            f"the policy is {reason}, so the trainer cannot make its reference as a frozen copy of it: pass the "
            "reference explicitly (ref_model=..., tidpo train --ref-model PATH), or train a PEFT adapter "
            "(e.g. LoRA) so that the reference is the same model with its adapter disabled (no copy at all)")
    return copy.deepcopy(model)


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
    ignore_index = trainer.ignore_index
    chosen, rejected = [], []
    show = trainer.is_world_process_zero() and not trainer.args.disable_tqdm
    for batch in tqdm(loader, desc=desc, disable=not show):
        input_ids = batch["input_ids"].to(trainer.args.device)
        attention_mask = batch["attention_mask"].to(trainer.args.device)
        labels = next_token(batch["labels"].to(trainer.args.device), ignore_index)
        logits = trainer.reference_logits(input_ids, attention_mask)
        with torch.no_grad():
            logps = token_logps(logits, labels, ignore_index, backend=trainer.args.loss_backend).float().cpu()
        valid = (labels != ignore_index).cpu()
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
