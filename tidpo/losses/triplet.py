"""TI-DPO's triplet loss on packed per-token log-ratio vectors (docs/methods.md §3.3)."""

from __future__ import annotations

import torch


def pack_valid(values: torch.Tensor, mask: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Move each row's valid entries to the front, in order: ``[R, T] -> ([R, width], lengths [R])``.

    The i-th valid entry of a row lands at column i; columns past the row's length are 0.
    Differentiable w.r.t. ``values``; no host sync (the width is given, not computed).
    """
    rows, length = values.shape
    spill = max(width, length)  # invalid entries are written to this extra column, then dropped
    target = torch.where(mask, mask.long().cumsum(-1) - 1, spill)
    src = torch.where(mask, values, 0.0)
    out = values.new_zeros(rows, spill + 1).scatter(1, target, src)
    return out[:, :width], mask.sum(-1)


def triplet_loss(anchor_logratios: torch.Tensor, anchor_mask: torch.Tensor,
                 chosen_logratios: torch.Tensor, chosen_mask: torch.Tensor,
                 rejected_logratios: torch.Tensor, rejected_mask: torch.Tensor,
                 margin: float) -> torch.Tensor:
    """Per-pair triplet loss pulling the anchor toward the chosen response, away from the rejected.

    Response-token log-ratio vectors d (anchor), b (chosen), c (rejected) are packed (re-indexed
    from 0 over valid tokens) and aligned by index up to the shorter length (official code):

    ``L = relu( sum_{t < min(n_a, n_w)} (d_t - b_t)^2 - sum_{t < min(n_a, n_l)} (c_t - d_t)^2 + margin )``

    Args:
        *_logratios: ``[B, T_*]`` per-token ``log pi - log ref`` (lengths may differ per input).
        *_mask: bool ``[B, T_*]``, True on response tokens.
        margin: alpha_trp >= 0.

    Returns:
        ``[B]``. An anchor with no valid token gives ``relu(margin)`` and zero gradient.
    """
    width = max(anchor_logratios.shape[1], chosen_logratios.shape[1], rejected_logratios.shape[1])
    d, n_a = pack_valid(anchor_logratios, anchor_mask, width)
    b, n_w = pack_valid(chosen_logratios, chosen_mask, width)
    c, n_l = pack_valid(rejected_logratios, rejected_mask, width)
    index = torch.arange(width, device=d.device)
    pos = index < torch.minimum(n_a, n_w).unsqueeze(-1)
    neg = index < torch.minimum(n_a, n_l).unsqueeze(-1)
    dist_pos = torch.where(pos, (d - b) ** 2, 0.0).sum(-1)
    dist_neg = torch.where(neg, (c - d) ** 2, 0.0).sum(-1)
    return torch.relu(dist_pos - dist_neg + margin)
