"""TIS-DPO: DPO with per-token importance weights on the log-ratios (docs/methods.md §2)."""

from __future__ import annotations

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

KL_FORMS = ("released", "paper_tdpo1", "paper_tdpo2")


def check_tis_dpo_params(beta, token_level, alpha, kl_form) -> None:
    """The hyper-parameters of :func:`tis_dpo_loss` (also checked when a :class:`~tidpo.TISDPOLoss` is built)."""
    v.check_positive(beta, "beta")
    v.check_non_negative(alpha, "alpha")
    v.check_choice(kl_form, "kl_form", KL_FORMS)
    if not isinstance(token_level, bool):
        raise TypeError(f"token_level must be a bool, got {type(token_level).__name__}")
    if kl_form != "released" and not token_level:
        raise ValueError(f"kl_form={kl_form!r} selects a KL term; it needs token_level=True")


def tis_dpo_loss(policy_logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor, *,
                 ref_logps: torch.Tensor | None = None, ref_logits: torch.Tensor | None = None,
                 beta: float = 0.1, token_level: bool = False, alpha: float = 0.5,
                 kl_form: str = "released", ignore_index: int = IGNORE_INDEX,
                 packing: SequencePacking | None = None, backend: str | None = None,
                 chunk_size: int | None = None) -> PreferenceLossOutput:
    """Token-level importance-sampling DPO (Liu et al., ICLR 2025).

    Weighted margin ``m^w(y) = sum_t w_t rho_t`` over valid tokens (weights are constants).

    As released (``kl_form="released"``, docs/methods.md §2.3):

    - ``token_level=False`` (default): ``z = m^w_w - m^w_l``; ``L = -log s(beta z)`` — DPO with
      token-weighted log-ratios, no KL term. With all weights 1 this is DPO.
    - ``token_level=True``: ``z = (m^w_w - m^w_l) - alpha (K_w - K_l)`` with
      ``K = sum_t w_t KL(pi || ref)_t``: policy-first KL, sign (chosen - rejected), no stop-gradient,
      exactly as the official code.

    The paper's eta term (docs/methods.md §2.2; exact notation unverified), ``token_level=True`` with
    ``K' = sum_t w_t KL(ref || pi)_t``:

    - ``kl_form="paper_tdpo1"``: ``z = (m^w_w - m^w_l) - (K'_l - K'_w)``
    - ``kl_form="paper_tdpo2"``: ``z = (m^w_w - m^w_l) - alpha (K'_l - sg(K'_w))``

    Rewards (detached), as the released code logs them: ``beta m^w(y)``; with ``token_level=True``
    ``beta (m^w(y) - K(y))`` (the weighted log-ratio sum minus the weighted KL); with the paper's forms
    ``beta (m^w(y) + K'(y))``, TDPO's convention for its KL(ref || pi) terms.

    Args:
        policy_logits: ``[2B, T, V]``; labels: ``[2B, T]``.
        weights: ``[2B, T]`` token weights aligned with ``labels`` (values at ignored positions are
            not used); see :mod:`tidpo.weights` for the TIS-DPO transforms.
        ref_logps / ref_logits: the reference, exactly one; ``token_level=True`` needs ``ref_logits``.
        beta > 0 (0.1); alpha >= 0 (0.5, token_level only); kl_form: see above.
        packing: :class:`~tidpo.SequencePacking` for packed (padding-free) batches: logits ``[N, V]`` or
            ``[1, N, V]``, every per-token tensor shaped like the labels (``[N]`` / ``[1, N]``).

    Returns:
        :class:`~tidpo.PreferenceLossOutput`; metrics add ``weights/*`` (and ``kl/*`` with
        ``token_level``). A pair with no valid token on either side: loss ``log 2``, zero gradient.
    """
    check_tis_dpo_params(beta, token_level, alpha, kl_form)
    if weights is None:
        raise TypeError("weights must be a torch.Tensor of token weights shaped like labels, got None")
    batch = pair_batch(policy_logits, labels, ref_logps=ref_logps, ref_logits=ref_logits, weights=weights,
                       ignore_index=ignore_index, backend=backend, chunk_size=chunk_size,
                       require_ref_logits=token_level, packing=packing)
    m_w, m_l = split_pairs(batch.weighted_margins)
    z = m_w - m_l
    reward_w, reward_l = m_w, m_l
    token_metrics = weight_metrics(batch.weights, batch)
    if token_level:
        ref, policy = batch.ref_logits.detach(), batch.policy_logits
        if kl_form == "released":
            k_w, k_l = split_pairs(batch.kl_sums(policy, ref, weighted=True))
            z = z - alpha * (k_w - k_l)
            # The released code logs m^w - K^w in this branch (its rewards include the weighted KL).
            reward_w, reward_l = m_w - k_w, m_l - k_l
        else:
            k_w, k_l = split_pairs(batch.kl_sums(ref, policy, weighted=True))
            z = z - (k_l - k_w) if kl_form == "paper_tdpo1" else z - alpha * (k_l - k_w.detach())
            # TDPO's convention for its sequential KL(ref || pi) terms: m + K'.
            reward_w, reward_l = m_w + k_w, m_l + k_l
        token_metrics.update(kl_metrics(k_w, k_l, batch))
    losses = -F.logsigmoid(beta * z)
    return build_output(losses, beta * reward_w, beta * reward_l, batch, token_metrics=token_metrics)
