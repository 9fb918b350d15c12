"""DPO with TRL's ``sigmoid`` (default), ``ipo`` and ``hinge`` losses, from logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tidpo import _validation as v
from tidpo._validation import IGNORE_INDEX
from tidpo.losses._common import build_output, pair_batch, split_pairs
from tidpo.losses.output import PreferenceLossOutput
from tidpo.losses.packing import SequencePacking

DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge")


def preference_losses(h: torch.Tensor, beta: float, loss_type: str, label_smoothing: float) -> torch.Tensor:
    """Per-pair loss from the un-scaled margin ``h`` (TRL's ``logits``).

    - ``sigmoid``: ``-(1 - eps) log s(beta h) - eps log s(-beta h)`` (eps = label_smoothing, cDPO)
    - ``hinge``: ``relu(1 - beta h)``
    - ``ipo``: ``(h - 1 / (2 beta))^2``
    """
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * h)
        if label_smoothing > 0:
            losses = (1 - label_smoothing) * losses - label_smoothing * F.logsigmoid(-beta * h)
        return losses
    if loss_type == "hinge":
        return torch.relu(1 - beta * h)
    return (h - 1 / (2 * beta)) ** 2


def check_dpo_params(beta, loss_type, label_smoothing) -> None:
    """The hyper-parameters of :func:`dpo_loss` (also checked when a :class:`~tidpo.DPOLoss` is built).

    ``label_smoothing`` lies in ``[0, 0.5)``: at 0.5 the two labels weigh the same and no preference is left.
    """
    v.check_positive(beta, "beta")
    v.check_choice(loss_type, "loss_type", DPO_LOSS_TYPES)
    v.check_number(label_smoothing, "label_smoothing", low=0.0, high=0.5, high_open=True)
    if label_smoothing > 0 and loss_type != "sigmoid":
        raise ValueError(f"label_smoothing applies to loss_type='sigmoid' only, got loss_type={loss_type!r}")


def dpo_loss(policy_logits: torch.Tensor, labels: torch.Tensor, *, ref_logps: torch.Tensor | None = None,
             ref_logits: torch.Tensor | None = None, beta: float = 0.1, loss_type: str = "sigmoid",
             label_smoothing: float = 0.0, ignore_index: int = IGNORE_INDEX,
             packing: SequencePacking | None = None, backend: str | None = None,
             chunk_size: int | None = None) -> PreferenceLossOutput:
    """Direct Preference Optimisation from policy logits (docs/methods.md §0, §4.2; TRL's definitions).

    With per-sequence sums ``S(y) = sum_t [log pi(y_t) - log ref(y_t)]`` over valid tokens,
    ``h = S(y_w) - S(y_l)`` and:

    - ``sigmoid``: ``L = -log s(beta h)`` (``label_smoothing`` eps gives cDPO)
    - ``hinge``: ``L = relu(1 - beta h)``
    - ``ipo``: ``L = (h - 1/(2 beta))^2`` with ``S`` the per-sequence *mean* instead of the sum

    Rewards: ``beta * S(y)`` (per-token mean for ``ipo``), detached.

    Args:
        policy_logits: ``[2B, T, V]`` (rows [0, B) chosen, [B, 2B) rejected), any float dtype;
            may be a strided view such as ``model_logits[:, :-1]``.
        labels: ``[2B, T]`` token ids, ``ignore_index`` on prompt and padding.
        ref_logps: ``[2B, T]`` precomputed reference per-token log-probs, or their per-sequence sums ``[2B]``
            (as TRL's ``precompute_ref_log_probs`` stores them; padded layout), or
        ref_logits: ``[2B, T, V]`` reference logits (exactly one of the two).
        beta: inverse temperature (> 0). Default 0.1.
        loss_type: ``"sigmoid"`` | ``"ipo"`` | ``"hinge"``.
        label_smoothing: cDPO's eps in [0, 0.5) (sigmoid only).
        backend, chunk_size: see :func:`tidpo.token_logps`.
        packing: :class:`~tidpo.SequencePacking` for packed (padding-free) batches: logits ``[N, V]`` or
            ``[1, N, V]``, every per-token tensor shaped like the labels (``[N]`` / ``[1, N]``).

    Returns:
        :class:`~tidpo.PreferenceLossOutput`. A pair whose two responses have no valid token has
        ``h = 0``: loss ``log 2`` (sigmoid), ``1`` (hinge), ``1/(4 beta^2)`` (ipo), zero gradient.
    """
    check_dpo_params(beta, loss_type, label_smoothing)
    batch = pair_batch(policy_logits, labels, ref_logps=ref_logps, ref_logits=ref_logits,
                       ignore_index=ignore_index, backend=backend, chunk_size=chunk_size, packing=packing)
    scores = batch.weighted_margins
    if loss_type == "ipo":
        scores = scores / batch.counts().clamp(min=1)
    s_w, s_l = split_pairs(scores)
    losses = preference_losses(s_w - s_l, beta, loss_type, label_smoothing)
    return build_output(losses, beta * s_w, beta * s_l, batch)
