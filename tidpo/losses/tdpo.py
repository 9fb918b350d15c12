"""TDPO1 / TDPO2: DPO margin minus a sequential full-vocab KL term (docs/methods.md §1)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tidpo import _validation as v
from tidpo._validation import IGNORE_INDEX
from tidpo.losses._common import build_output, kl_metrics, pair_batch, split_pairs
from tidpo.losses.output import PreferenceLossOutput
from tidpo.losses.packing import SequencePacking


def check_tdpo_params(beta, alpha, variant) -> None:
    """The hyper-parameters of :func:`tdpo_loss` (also checked when a :class:`~tidpo.TDPOLoss` is built)."""
    v.check_positive(beta, "beta")
    v.check_non_negative(alpha, "alpha")
    v.check_choice(variant, "variant", (1, 2))


def tdpo_loss(policy_logits: torch.Tensor, ref_logits: torch.Tensor, labels: torch.Tensor, *,
              beta: float = 0.1, alpha: float = 0.5, variant: int = 2, ignore_index: int = IGNORE_INDEX,
              packing: SequencePacking | None = None, backend: str | None = None,
              chunk_size: int | None = None) -> PreferenceLossOutput:
    """Token-level DPO (Zeng et al. 2024), as in the official code (docs/methods.md §1.1).

    With ``m(y) = sum_t rho_t`` and ``K(y) = sum_t KL(ref(.|y<t) || pi(.|y<t))`` over valid tokens:

    - TDPO1: ``z = (m_w - m_l) - (K_l - K_w)``
    - TDPO2: ``z = (m_w - m_l) - alpha (K_l - sg(K_w))`` (stop-gradient on the chosen KL)
    - ``L = -log s(beta z)``; rewards ``beta (m + K)`` (detached), as the official code logs them.

    Args:
        policy_logits: ``[2B, T, V]``; ref_logits: ``[2B, T, V]`` (the KL needs full logits).
        labels: ``[2B, T]``. beta > 0 (default 0.1); alpha >= 0 (default 0.5, TDPO2 only);
        variant: 1 or 2 (default 2).
        packing: :class:`~tidpo.SequencePacking` for packed (padding-free) batches: logits ``[N, V]`` or
            ``[1, N, V]``, every per-token tensor shaped like the labels (``[N]`` / ``[1, N]``).

    Returns:
        :class:`~tidpo.PreferenceLossOutput`; metrics add ``kl/chosen``, ``kl/rejected``. A pair
        with no valid token on either side has ``z = 0``: loss ``log 2``, zero gradient.
    """
    check_tdpo_params(beta, alpha, variant)
    batch = pair_batch(policy_logits, labels, ref_logits=ref_logits, ignore_index=ignore_index,
                       backend=backend, chunk_size=chunk_size, require_ref_logits=True, packing=packing)
    m_w, m_l = split_pairs(batch.weighted_margins)
    k_w, k_l = split_pairs(batch.kl_sums(batch.ref_logits.detach(), batch.policy_logits))
    z = tdpo_margin(m_w, m_l, k_w, k_l, alpha, variant)
    losses = -F.logsigmoid(beta * z)
    return build_output(losses, beta * (m_w + k_w), beta * (m_l + k_l), batch,
                        token_metrics=kl_metrics(k_w, k_l, batch))


def tdpo_margin(m_w, m_l, k_w, k_l, alpha: float, variant: int) -> torch.Tensor:
    """TDPO1 ``(m_w - m_l) - (K_l - K_w)`` or TDPO2 ``(m_w - m_l) - alpha (K_l - sg(K_w))``."""
    if variant == 1:
        return (m_w - m_l) - (k_l - k_w)
    return (m_w - m_l) - alpha * (k_l - k_w.detach())
