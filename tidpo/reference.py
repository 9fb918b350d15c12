"""Pure-PyTorch reference of every tidpo op and loss: the truth that kernels and fast paths must match.

Written for clarity, not speed or memory: full ``log_softmax`` over the vocabulary, explicit masks,
Python loops where they make a formula easier to read. Every function takes ``dtype``: the
computation runs in that dtype (``torch.float64`` for ground truth in tests; ``None`` keeps the
logits' own dtype, which is what "plain torch in that dtype" means when tests bound errors).
Nothing here imports the rest of tidpo, so a bug there cannot hide in the reference.

Layout (TRL / DESIGN.md): a batch of B preference pairs is 2B rows, rows ``[0, B)`` chosen and
``[B, 2B)`` rejected; ``logits[:, t]`` predicts ``labels[:, t]``; ``labels == ignore_index`` marks
prompt and padding. Per-token log-ratio ``rho_t = log pi(y_t) - log ref(y_t)`` on valid tokens.

Formulas and their docs/methods.md sections:

- per-token log-prob (§0, §4.1): ``logp_t = x_t[y_t] - logsumexp(x_t)``
- per-position KL (§0): ``KL_t(p||q) = sum_v p_v (log p_v - log q_v)`` from log-softmax values
- DPO (§0, §4.2, TRL): ``u = beta * (sum rho(y_w) - sum rho(y_l))``;
  sigmoid ``-(1-eps) log s(u) - eps log s(-u)``; hinge ``relu(1 - u)``;
  ipo ``(h - 1/(2 beta))^2`` with ``h`` built from per-sequence *mean* log-probs
- TDPO (§1.1): ``m = sum rho``, ``K = sum KL_t(ref||pi)``; TDPO1 ``z = (m_w - m_l) - (K_l - K_w)``;
  TDPO2 ``z = (m_w - m_l) - alpha (K_l - sg(K_w))``; loss ``-log s(beta z)``; rewards ``beta (m + K)``
- TIS-DPO as released (§2.3): ``m^w = sum w_t rho_t``; ``token_level=False``: ``z = m^w_w - m^w_l``;
  ``token_level=True``: ``z = (m^w_w - m^w_l) - alpha (K^w_w - K^w_l)`` with
  ``K^w = sum w_t KL_t(pi||ref)``, no stop-gradient; loss ``-log s(beta z)``; rewards ``beta m^w``
- TIS-DPO, the paper's eta form (§2.2): ``K' = sum w_t KL_t(ref||pi)``;
  ``paper_tdpo1``: ``z = (m^w_w - m^w_l) - (K'_l - K'_w)``;
  ``paper_tdpo2``: ``z = (m^w_w - m^w_l) - alpha (K'_l - sg(K'_w))``
- TI-DPO (§3.2-3.4, official code): ``z = (m^w_w - m^w_l) - alpha (K_l - sg(K_w))`` with the
  *unweighted* ``K = sum KL_t(ref||pi)``; loss ``-log s(beta z) + kl_coef (K_w + K_l)/2 + gamma L_trp``;
  rewards ``beta (m^w + K)``
- triplet (§3.3): packed response-token log-ratio vectors d (anchor), b (chosen), c (rejected),
  ``L_trp = relu(sum_{t<min(n_a,n_w)} (d_t-b_t)^2 - sum_{t<min(n_a,n_l)} (c_t-d_t)^2 + margin)``
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tidpo._validation import IGNORE_INDEX


def _cast(x: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return x if dtype is None else x.to(dtype)


def token_logps(logits, labels, ignore_index=IGNORE_INDEX, dtype=None):
    """``log_softmax(logits)[..., y]``; 0 where ``labels == ignore_index``. Shape of ``labels``."""
    logp_all = torch.log_softmax(_cast(logits, dtype), dim=-1)
    valid = labels != ignore_index
    safe = torch.where(valid, labels, 0).long()
    picked = logp_all.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return torch.where(valid, picked, torch.zeros_like(picked))


def token_kl(p_logits, q_logits, labels, ignore_index=IGNORE_INDEX, dtype=None):
    """``sum_v p_v (log p_v - log q_v)`` per position, with 0·log 0 = 0; 0 at ignored positions."""
    logp = torch.log_softmax(_cast(p_logits, dtype), dim=-1)
    logq = torch.log_softmax(_cast(q_logits, dtype), dim=-1)
    p = logp.exp()
    terms = torch.where(p > 0, p * (logp - logq), torch.zeros_like(p))
    kl = terms.sum(-1)
    return torch.where(labels != ignore_index, kl, torch.zeros_like(kl))


def _split(x):
    half = x.shape[0] // 2
    return x[:half], x[half:]


def _masked_sum(values, mask):
    return torch.where(mask, values, torch.zeros_like(values)).sum(-1)


def _ref_logps(labels, ref_logps, ref_logits, ignore_index, dtype):
    if ref_logps is not None:
        return _cast(ref_logps.detach(), dtype)
    return token_logps(ref_logits.detach(), labels, ignore_index, dtype)


def _outputs(losses, chosen_rewards, rejected_rewards, logits):
    return {
        "loss": losses.mean(),
        "losses": losses,
        "chosen_rewards": chosen_rewards.detach(),
        "rejected_rewards": rejected_rewards.detach(),
        "logits": logits,
    }


def dpo_loss(policy_logits, labels, ref_logps=None, ref_logits=None, beta=0.1, loss_type="sigmoid",
             label_smoothing=0.0, ignore_index=IGNORE_INDEX, dtype=None):
    """DPO as TRL defines ``sigmoid``, ``hinge`` and ``ipo`` (docs/methods.md §0, §4.2).

    Returns a dict with ``loss`` (mean over pairs), ``losses`` ``[B]``, ``chosen_rewards``,
    ``rejected_rewards`` (``beta * (policy - ref)`` of the same per-sequence log-probs the loss
    uses) and ``logits`` (the un-scaled margin ``h``).
    """
    mask = labels != ignore_index
    pol = token_logps(policy_logits, labels, ignore_index, dtype)
    ref = _ref_logps(labels, ref_logps, ref_logits, ignore_index, dtype)
    pol_seq, ref_seq = _masked_sum(pol, mask), _masked_sum(ref, mask)
    if loss_type == "ipo":
        count = mask.sum(-1).clamp(min=1).to(pol_seq.dtype)
        pol_seq, ref_seq = pol_seq / count, ref_seq / count
    pol_w, pol_l = _split(pol_seq)
    ref_w, ref_l = _split(ref_seq)
    h = (pol_w - ref_w) - (pol_l - ref_l)
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}")
    return _outputs(losses, beta * (pol_w - ref_w), beta * (pol_l - ref_l), h)


def tdpo_loss(policy_logits, ref_logits, labels, beta=0.1, alpha=0.5, variant=2,
              ignore_index=IGNORE_INDEX, dtype=None):
    """TDPO1 / TDPO2 (docs/methods.md §1.1); KL is the forward ``KL(ref || policy)``, unweighted."""
    mask = labels != ignore_index
    rho = token_logps(policy_logits, labels, ignore_index, dtype) - _ref_logps(
        labels, None, ref_logits, ignore_index, dtype)
    m_w, m_l = _split(_masked_sum(rho, mask))
    k_w, k_l = _split(_masked_sum(token_kl(ref_logits.detach(), policy_logits, labels, ignore_index, dtype),
                                  mask))
    if variant == 1:
        z = (m_w - m_l) - (k_l - k_w)
    else:
        z = (m_w - m_l) - alpha * (k_l - k_w.detach())
    losses = -F.logsigmoid(beta * z)
    return _outputs(losses, beta * (m_w + k_w), beta * (m_l + k_l), z)


def weighted_logratio_sums(policy_logits, labels, weights, ref_logps=None, ref_logits=None,
                           ignore_index=IGNORE_INDEX, dtype=None):
    """Per-sequence ``sum_t w_t rho_t`` over valid tokens, shape ``[2B]``."""
    mask = labels != ignore_index
    rho = token_logps(policy_logits, labels, ignore_index, dtype) - _ref_logps(
        labels, ref_logps, ref_logits, ignore_index, dtype)
    return _masked_sum(_cast(weights, dtype) * rho, mask)


def tis_dpo_loss(policy_logits, labels, weights, ref_logps=None, ref_logits=None, beta=0.1,
                 token_level=False, alpha=0.5, kl_form="released", ignore_index=IGNORE_INDEX, dtype=None):
    """TIS-DPO as released (docs/methods.md §2.3) or with the paper's eta term (§2.2).

    Rewards: ``beta m^w``; ``beta (m^w - K)`` in the released ``token_level`` branch (weighted KL(pi || ref));
    ``beta (m^w + K')`` with the paper's forms (weighted KL(ref || pi)).
    """
    mask = labels != ignore_index
    w = _cast(weights, dtype)
    m_w, m_l = _split(weighted_logratio_sums(policy_logits, labels, weights, ref_logps, ref_logits,
                                             ignore_index, dtype))
    z = m_w - m_l
    reward_w, reward_l = m_w, m_l
    if token_level:
        ref = ref_logits.detach()
        if kl_form == "released":
            k = _masked_sum(w * token_kl(policy_logits, ref, labels, ignore_index, dtype), mask)
            k_w, k_l = _split(k)
            z = z - alpha * (k_w - k_l)
            reward_w, reward_l = m_w - k_w, m_l - k_l  # the released code logs beta (m^w - K)
        else:
            k = _masked_sum(w * token_kl(ref, policy_logits, labels, ignore_index, dtype), mask)
            k_w, k_l = _split(k)
            z = z - (k_l - k_w) if kl_form == "paper_tdpo1" else z - alpha * (k_l - k_w.detach())
            reward_w, reward_l = m_w + k_w, m_l + k_l  # TDPO's convention for KL(ref || pi) terms
    losses = -F.logsigmoid(beta * z)
    return _outputs(losses, beta * reward_w, beta * reward_l, z)


def packed_triplet_loss(anchor_logratios, anchor_mask, chosen_logratios, chosen_mask,
                        rejected_logratios, rejected_mask, margin):
    """Triplet loss per pair (docs/methods.md §3.3), written as a loop over pairs for clarity.

    Each input is ``[B, T_*]``; valid entries of a row are packed (re-indexed from 0) and compared
    position by position up to the shorter of the two lengths. Returns ``[B]``.
    """
    out = []
    for i in range(anchor_logratios.shape[0]):
        d = anchor_logratios[i][anchor_mask[i]]
        b = chosen_logratios[i][chosen_mask[i]]
        c = rejected_logratios[i][rejected_mask[i]]
        n_pos, n_neg = min(len(d), len(b)), min(len(d), len(c))
        dist_pos = ((d[:n_pos] - b[:n_pos]) ** 2).sum()
        dist_neg = ((c[:n_neg] - d[:n_neg]) ** 2).sum()
        out.append(torch.relu(dist_pos - dist_neg + margin))
    return torch.stack(out)


def ti_dpo_loss(policy_logits, ref_logits, labels, weights, beta=0.1, alpha=0.5, gamma=0.1,
                triplet_margin=1e-3, anchor_logits=None, anchor_labels=None, anchor_ref_logps=None,
                anchor_ref_logits=None, kl_coef=0.0, ignore_index=IGNORE_INDEX, dtype=None):
    """TI-DPO: weighted TDPO2 margin + kl_coef·mean KL + gamma·triplet (docs/methods.md §3.2-3.4)."""
    mask = labels != ignore_index
    w = _cast(weights, dtype)
    rho = token_logps(policy_logits, labels, ignore_index, dtype) - _ref_logps(
        labels, None, ref_logits, ignore_index, dtype)
    m_w, m_l = _split(_masked_sum(w * rho, mask))
    k_w, k_l = _split(_masked_sum(token_kl(ref_logits.detach(), policy_logits, labels, ignore_index, dtype),
                                  mask))
    z = (m_w - m_l) - alpha * (k_l - k_w.detach())
    losses = -F.logsigmoid(beta * z) + kl_coef * 0.5 * (k_w + k_l)
    if gamma > 0:
        a_mask = anchor_labels != ignore_index
        a_rho = token_logps(anchor_logits, anchor_labels, ignore_index, dtype) - _ref_logps(
            anchor_labels, anchor_ref_logps, anchor_ref_logits, ignore_index, dtype)
        rho_w, rho_l = _split(rho)
        mask_w, mask_l = _split(mask)
        losses = losses + gamma * packed_triplet_loss(a_rho, a_mask, rho_w, mask_w, rho_l, mask_l,
                                                      triplet_margin)
    return _outputs(losses, beta * (m_w + k_w), beta * (m_l + k_l), z)
