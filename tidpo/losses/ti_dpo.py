"""TI-DPO: token-importance-weighted TDPO2 margin plus a triplet loss (docs/methods.md §3)."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from tidpo import _validation as v
from tidpo._validation import IGNORE_INDEX
from tidpo.losses._common import (
    build_output,
    kl_metrics,
    pair_batch,
    split_pairs,
    weight_metrics,
)
from tidpo.losses.output import PreferenceLossOutput
from tidpo.losses.packing import SequencePacking
from tidpo.losses.tdpo import tdpo_margin
from tidpo.losses.triplet import triplet_loss
from tidpo.ops import token_logps


class TripletAnchor(NamedTuple):
    """The anchor response of each pair, sampled from the policy (one row per pair).

    Attributes:
        logits: ``[B, Ta, V]`` policy logits of prompt + anchor (differentiable).
        labels: ``[B, Ta]`` anchor token ids, ``ignore_index`` on prompt and padding.
        ref_logps: ``[B, Ta]`` reference per-token log-probs of the anchor, or
        ref_logits: ``[B, Ta, V]`` reference logits (exactly one of the two).
    """

    logits: torch.Tensor
    labels: torch.Tensor
    ref_logps: torch.Tensor | None = None
    ref_logits: torch.Tensor | None = None


def anchor_log_ratios(anchor: TripletAnchor, num_pairs: int, policy_logits: torch.Tensor, ignore_index: int,
                      backend, chunk_size) -> tuple[torch.Tensor, torch.Tensor]:
    """Validated ``([B, Ta] log pi - log ref, [B, Ta] mask)`` of the anchor responses."""
    if not isinstance(anchor, TripletAnchor):
        raise TypeError(f"anchor must be a tidpo.TripletAnchor, got {type(anchor).__name__}")
    v.check_logits(anchor.logits, "anchor.logits")
    v.check_same_device(anchor.logits, policy_logits, "anchor.logits", "policy_logits")
    vocab = policy_logits.shape[-1]
    if anchor.logits.dim() != 3 or anchor.logits.shape[0] != num_pairs or anchor.logits.shape[-1] != vocab:
        raise ValueError(
            f"anchor.logits must have shape [B={num_pairs}, Ta, V={vocab}], got {tuple(anchor.logits.shape)}"
        )
    v.check_labels(anchor.labels, anchor.logits, ignore_index, "anchor.labels", "anchor.logits")
    if (anchor.ref_logps is None) == (anchor.ref_logits is None):
        raise ValueError("anchor needs exactly one of anchor.ref_logps and anchor.ref_logits")
    policy = token_logps(anchor.logits, anchor.labels, ignore_index, backend=backend, chunk_size=chunk_size)
    if anchor.ref_logits is not None:
        v.check_logits(anchor.ref_logits, "anchor.ref_logits")
        v.check_same_logits_shape(anchor.ref_logits, anchor.logits, "anchor.ref_logits", "anchor.logits")
        with torch.no_grad():
            ref = token_logps(anchor.ref_logits, anchor.labels, ignore_index, backend=backend,
                              chunk_size=chunk_size)
    else:
        ref = v.check_per_token(anchor.ref_logps, anchor.labels, "anchor.ref_logps").detach()
    mask = anchor.labels != ignore_index
    return torch.where(mask, policy - ref.to(policy.dtype), 0.0), mask


def check_ti_dpo_params(beta, alpha, gamma, triplet_margin, kl_coef) -> None:
    """The hyper-parameters of :func:`ti_dpo_loss` (also checked when a :class:`~tidpo.TIDPOLoss` is built)."""
    v.check_positive(beta, "beta")
    for value, name in ((alpha, "alpha"), (gamma, "gamma"), (triplet_margin, "triplet_margin"), (kl_coef, "kl_coef")):
        v.check_non_negative(value, name)


def ti_dpo_loss(policy_logits: torch.Tensor, ref_logits: torch.Tensor, labels: torch.Tensor,
                weights: torch.Tensor, *, beta: float = 0.1, alpha: float = 0.5, gamma: float = 0.1,
                triplet_margin: float = 1e-3, anchor: TripletAnchor | None = None, kl_coef: float = 0.0,
                ignore_index: int = IGNORE_INDEX, packing: SequencePacking | None = None, backend: str | None = None,
                chunk_size: int | None = None) -> PreferenceLossOutput:
    """Token-importance guided DPO (Yang et al., ICLR 2026), as in the official code.

    With ``m^w(y) = sum_t w_t rho_t`` and the *unweighted* ``K(y) = sum_t KL(ref || pi)_t``:

    - ``z = (m^w_w - m^w_l) - alpha (K_l - sg(K_w))`` (a TDPO2 margin with weighted log-ratios, §3.2)
    - ``L = -log s(beta z) + kl_coef (K_w + K_l) / 2 + gamma L_triplet`` (§3.4)
    - ``L_triplet``: :func:`tidpo.losses.triplet.triplet_loss` on the packed per-token log-ratio
      vectors of the anchor, chosen and rejected responses (§3.3).

    Rewards: ``beta (m^w + K)`` (detached), the TDPO code's convention.

    Defaults follow the paper's table (beta 0.1, alpha 0.5, gamma 0.1); the margin (not in the
    paper) is the official config's 0.001. The official config uses beta 0.2, gamma 0.001.

    Args:
        policy_logits, ref_logits: ``[2B, T, V]``; labels: ``[2B, T]``.
        weights: ``[2B, T]`` token weights (e.g. :func:`tidpo.weights.mix_importance`), constants.
        anchor: :class:`TripletAnchor`; required when ``gamma > 0`` (pass ``gamma=0`` for TI-DPO
            without the triplet term).
        packing: :class:`~tidpo.SequencePacking` for packed (padding-free) batches: logits ``[N, V]`` or
            ``[1, N, V]``, every per-token tensor shaped like the labels (``[N]`` / ``[1, N]``).

    Returns:
        :class:`~tidpo.PreferenceLossOutput`; metrics add ``kl/*``, ``weights/*`` and
        ``triplet/loss``. A pair with no valid token anywhere: loss ``log 2 + gamma * margin``
        (the triplet hinge keeps its margin), zero gradient.
    """
    check_ti_dpo_params(beta, alpha, gamma, triplet_margin, kl_coef)
    if gamma > 0 and anchor is None:
        raise ValueError("anchor is required when gamma > 0 (pass a TripletAnchor, or gamma=0 to drop the "
                         "triplet term)")
    if weights is None:
        raise TypeError("weights must be a torch.Tensor of token weights shaped like labels, got None")
    batch = pair_batch(policy_logits, labels, ref_logits=ref_logits, weights=weights, ignore_index=ignore_index,
                       backend=backend, chunk_size=chunk_size, require_ref_logits=True, packing=packing)
    rho = batch.log_ratios
    m_w, m_l = split_pairs(batch.weighted_margins)
    k_w, k_l = split_pairs(batch.kl_sums(batch.ref_logits.detach(), batch.policy_logits))
    losses = -F.logsigmoid(beta * tdpo_margin(m_w, m_l, k_w, k_l, alpha, variant=2))
    if kl_coef > 0:
        losses = losses + kl_coef * 0.5 * (k_w + k_l)
    token_metrics = {**kl_metrics(k_w, k_l, batch), **weight_metrics(batch.weights, batch)}
    pair_metrics = {}
    if anchor is not None and gamma > 0:
        a_rho, a_mask = anchor_log_ratios(anchor, batch.num_pairs, batch.policy_logits, ignore_index, backend,
                                          chunk_size)
        rho_rows, mask_rows = batch.rows(rho)
        rho_w, rho_l = split_pairs(rho_rows)
        mask_w, mask_l = split_pairs(mask_rows)
        trip = triplet_loss(a_rho, a_mask, rho_w, mask_w, rho_l, mask_l, triplet_margin)
        losses = losses + gamma * trip
        pair_metrics["triplet/loss"] = trip
    return build_output(losses, beta * (m_w + k_w), beta * (m_l + k_l), batch, pair_metrics=pair_metrics,
                        token_metrics=token_metrics)
