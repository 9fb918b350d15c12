"""Packed (padding-free) preference batches: several sequences share one row of tokens.

Padded layout: logits ``[2B, T, V]``, one sequence per row. Packed layout: all tokens of the batch
concatenated, logits ``[N, V]`` or ``[1, N, V]`` with labels ``[N]`` / ``[1, N]``, and a
:class:`SequencePacking` saying which sequence each token belongs to — built from flash-attention
style ``cu_seqlens`` or from per-token segment ids. Sequence ``s`` is chosen response ``s`` for
``s < B`` and rejected response ``s - B`` for ``s >= B`` ("stacked" order, the padded layout's row
order); ``pair_order="interleaved"`` reads sequences as chosen_0, rejected_0, chosen_1, ...

Per-sequence sums are reductions over a ``[N, 2B]`` one-hot mask (``torch.sum``), not
``index_add_``/atomics, so the same input gives a bitwise identical result on every run and device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tidpo import _validation as v

PAIR_ORDERS = ("stacked", "interleaved")


@dataclass(frozen=True)
class SequencePacking:
    """Which sequence each token of a packed batch belongs to.

    Attributes:
        segment_ids: integer ``[N]`` (or ``[1, N]``, matching ``labels``): sequence index of every token,
            in ``[0, 2B)``. Values at ignored tokens (``labels == ignore_index``) are not used.
        num_pairs: B, the number of preference pairs (2B sequences).
        pair_order: ``"stacked"`` (sequences [0, B) chosen, [B, 2B) rejected) or ``"interleaved"``
            (chosen_0, rejected_0, chosen_1, ...).
    """

    segment_ids: torch.Tensor
    num_pairs: int
    pair_order: str = "stacked"

    @classmethod
    def from_cu_seqlens(cls, cu_seqlens: torch.Tensor, num_tokens: int,
                        pair_order: str = "stacked") -> SequencePacking:
        """From cumulative sequence lengths ``[2B + 1]`` (``cu_seqlens[0] = 0``, last = ``num_tokens``).

        Token ``t`` belongs to sequence ``s`` when ``cu_seqlens[s] <= t < cu_seqlens[s + 1]``. No host
        synchronisation: B comes from the tensor's shape, ``num_tokens`` from the caller.
        """
        v.check_tensor(cu_seqlens, "cu_seqlens")
        if cu_seqlens.dim() != 1 or cu_seqlens.is_floating_point() or cu_seqlens.shape[0] < 3:
            raise ValueError(f"cu_seqlens must be a 1-D integer tensor of 2B + 1 >= 3 offsets, got "
                             f"{cu_seqlens.dtype} {tuple(cu_seqlens.shape)}")
        if (cu_seqlens.shape[0] - 1) % 2:
            raise ValueError(f"cu_seqlens has {cu_seqlens.shape[0] - 1} sequences; a preference batch needs an "
                             "even number (B chosen and B rejected)")
        if v.value_checks_enabled(cu_seqlens):
            if int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != num_tokens:
                raise ValueError(f"cu_seqlens must start at 0 and end at num_tokens={num_tokens}, got "
                                 f"{cu_seqlens[0].item()} ... {cu_seqlens[-1].item()}")
            if bool((cu_seqlens[1:] < cu_seqlens[:-1]).any()):
                raise ValueError("cu_seqlens must be non-decreasing")
        positions = torch.arange(num_tokens, device=cu_seqlens.device)
        segment_ids = torch.searchsorted(cu_seqlens[1:].contiguous(), positions, right=True)
        return cls(segment_ids, (cu_seqlens.shape[0] - 1) // 2, pair_order)

    def stacked_segment_ids(self) -> torch.Tensor:
        """Segment ids in stacked order (chosen sequences first), flattened to ``[N]``."""
        seg = self.segment_ids.reshape(-1).long()
        if self.pair_order == "interleaved":
            seg = (seg % 2) * self.num_pairs + seg // 2
        return seg


def check_packing(packing, labels: torch.Tensor, ignore_index: int) -> int:
    """Validate a packing against the labels it annotates; return B.

    ``packing.segment_ids`` and ``labels`` may each be ``[N]`` or ``[1, N]`` (one entry per token either way).
    """
    if not isinstance(packing, SequencePacking):
        raise TypeError(f"packing must be a tidpo.SequencePacking, got {type(packing).__name__}")
    seg = packing.segment_ids
    v.check_tensor(seg, "packing.segment_ids")
    if seg.is_floating_point() or seg.dtype == torch.bool or seg.is_complex():
        raise TypeError(f"packing.segment_ids must be an integer tensor, got {seg.dtype}")
    tokens = labels.numel()
    if tuple(seg.shape) not in ((tokens,), (1, tokens)) or labels.dim() > 2 or (labels.dim() == 2 and
                                                                                  labels.shape[0] != 1):
        raise ValueError(f"packing.segment_ids shape {tuple(seg.shape)} does not match labels shape "
                         f"{tuple(labels.shape)}: packed batches hold N tokens as [N] or [1, N]")
    v.check_same_device(seg, labels, "packing.segment_ids", "labels")
    v.check_int(packing.num_pairs, "packing.num_pairs", low=1)
    v.check_choice(packing.pair_order, "packing.pair_order", PAIR_ORDERS)
    if v.value_checks_enabled(seg) and seg.numel() > 0:
        used = seg.reshape(-1)[labels.reshape(-1) != ignore_index]
        if used.numel() and bool(((used < 0) | (used >= 2 * packing.num_pairs)).any()):
            raise ValueError(f"packing.segment_ids of valid tokens must lie in [0, 2B) = "
                             f"[0, {2 * packing.num_pairs})")
    return packing.num_pairs
