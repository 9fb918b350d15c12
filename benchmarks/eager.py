"""PyTorch eager baselines, computed the way TRL-style trainers compute them.

These functions are the ``eager`` provider of the benchmarks, and, wrapped in ``torch.compile``, the
``compile`` provider. They are plain differentiable PyTorch: autograd records every full-vocab
intermediate, which is exactly the time and memory cost tidpo's ops avoid.

Per-token log-prob (TRL's ``selective_log_softmax``), looping over dim 0 (the 2B sequences) to bound
the size of each full-vocab temporary:

- float32 / float64: ``logits.gather(-1, y) - stack([logsumexp(row) for row in logits])``
- bfloat16 / float16: ``stack([log_softmax(row).gather(-1, y_row) for row in logits])`` (the
  log-sum-exp form loses precision in half precision, so TRL takes the log-softmax per row); the
  result stays in the logits' dtype.

Ignored labels (``-100``) are replaced by 0 before the gather and their log-probs set to 0 afterwards.

Per-position KL, ``p`` = reference logits (constants), ``q`` = policy logits::

    KL_t(p || q) = sum_v softmax(p.float()) * (log_softmax(p.float()) - log_softmax(q.float()))

then 0 at ignored positions.

Losses (rows [0, B) chosen ``w``, [B, 2B) rejected ``l``; sums over valid tokens; ``rho_t`` =
policy log-prob minus reference log-prob; ``s`` = sigmoid; same definitions as ``tidpo.reference``):

- DPO (``ref_logps`` given): ``h = sum rho(y_w) - sum rho(y_l)``; ``L = mean(-log s(beta h))``
- TDPO2 (``ref_logits``): ``m = sum rho``, ``K = sum KL_t(ref || policy)``,
  ``z = (m_w - m_l) - alpha (K_l - sg(K_w))``; ``L = mean(-log s(beta z))``
- TIS-DPO (weights, ``ref_logps``): ``m^w = sum w_t rho_t``; ``z = m^w_w - m^w_l``; ``L = mean(-log s(beta z))``
- TI-DPO without the triplet term (gamma = 0, kl_coef = 0; weights, ``ref_logits``):
  ``z = (m^w_w - m^w_l) - alpha (K_l - sg(K_w))`` with the unweighted ``K``; ``L = mean(-log s(beta z))``

With ``ref_logits`` the reference log-probs are computed with the same per-token function under
``torch.no_grad()``, as a trainer computes its reference pass.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
BETA = 0.1
ALPHA = 0.5


# ------------------------------------------------------------------------------ per-token pieces

def selective_log_softmax(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``log_softmax(logits)[..., index]`` computed as TRL does, looping over dim 0 (see module doc).

    ``logits`` ``[R, T, V]``, ``index`` ``[R, T]`` of valid token ids. Returns ``[R, T]`` in the
    logits' dtype.
    """
    if logits.dtype in (torch.float32, torch.float64):
        picked = logits.gather(-1, index.unsqueeze(-1)).squeeze(-1)
        lse = torch.stack([torch.logsumexp(logits[r], dim=-1) for r in range(logits.shape[0])])
        return picked - lse
    rows = []
    for r in range(logits.shape[0]):
        row_logps = torch.log_softmax(logits[r], dim=-1)
        rows.append(row_logps.gather(-1, index[r].unsqueeze(-1)).squeeze(-1))
    return torch.stack(rows)


def _masked_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs of ``labels`` (0 where ignored) and the valid mask; ``[R, T, V]`` logits."""
    mask = labels != IGNORE_INDEX
    safe = labels.masked_fill(~mask, 0)
    return selective_log_softmax(logits, safe).masked_fill(~mask, 0.0), mask


def token_logps(logits: torch.Tensor, labels: torch.Tensor, rows: int = 2 * 4) -> torch.Tensor:
    """Per-token log-probs of ``[N, V]`` (or ``[R, T, V]``) logits, 0 at ignored positions.

    ``[N, V]`` logits are viewed as ``[rows, N / rows, V]`` (the 2B sequences a trainer would hand
    over) so that TRL's loop runs over sequences, not over single positions; a view, not a copy.
    """
    if logits.dim() == 2:
        n, v = logits.shape
        r = rows if n % rows == 0 else 1
        logps, _ = _masked_logps(logits.view(r, n // r, v), labels.view(r, n // r))
        return logps.reshape(n)
    return _masked_logps(logits, labels)[0]


def token_kl(p_logits: torch.Tensor, q_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``KL_t(p || q)`` per position in float32, 0 at ignored positions (``p`` = reference)."""
    p32, q32 = p_logits.float(), q_logits.float()
    kl = (torch.softmax(p32, -1) * (torch.log_softmax(p32, -1) - torch.log_softmax(q32, -1))).sum(-1)
    return kl.masked_fill(labels == IGNORE_INDEX, 0.0)


def _ref_logps_from_logits(ref_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return _masked_logps(ref_logits.detach(), labels)[0]


def _split(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    half = x.shape[0] // 2
    return x[:half], x[half:]


# ------------------------------------------------------------------------- loss formulas (from logps)

def dpo_from_logps(policy_logps, mask, ref_logps, beta: float = BETA) -> torch.Tensor:
    """DPO sigmoid loss from per-token policy log-probs ``[2B, T]`` (0 where masked)."""
    rho = policy_logps - ref_logps.masked_fill(~mask, 0.0)
    h_w, h_l = _split(rho.sum(-1))
    return -F.logsigmoid(beta * (h_w - h_l)).mean()


def tis_dpo_from_logps(policy_logps, mask, weights, ref_logps, beta: float = BETA) -> torch.Tensor:
    """TIS-DPO (as released, ``token_level=False``) from per-token policy log-probs ``[2B, T]``."""
    rho = (policy_logps - ref_logps).masked_fill(~mask, 0.0)
    m_w, m_l = _split((weights * rho).sum(-1))
    return -F.logsigmoid(beta * (m_w - m_l)).mean()


def tdpo2_from_parts(policy_logps, mask, ref_logps, kl, beta: float = BETA, alpha: float = ALPHA,
                     weights=None) -> torch.Tensor:
    """TDPO2 (``weights=None``) or TI-DPO without triplet (``weights`` given) from per-token parts."""
    rho = (policy_logps - ref_logps).masked_fill(~mask, 0.0)
    if weights is not None:
        rho = weights * rho
    m_w, m_l = _split(rho.sum(-1))
    k_w, k_l = _split(kl.sum(-1))
    z = (m_w - m_l) - alpha * (k_l - k_w.detach())
    return -F.logsigmoid(beta * z).mean()


# -------------------------------------------------------------------------- losses from logits

def dpo_loss(policy_logits, labels, ref_logps, beta: float = BETA) -> torch.Tensor:
    logps, mask = _masked_logps(policy_logits, labels)
    return dpo_from_logps(logps, mask, ref_logps, beta)


def tdpo2_loss(policy_logits, ref_logits, labels, beta: float = BETA, alpha: float = ALPHA) -> torch.Tensor:
    logps, mask = _masked_logps(policy_logits, labels)
    ref = _ref_logps_from_logits(ref_logits, labels)
    kl = token_kl(ref_logits.detach(), policy_logits, labels)
    return tdpo2_from_parts(logps, mask, ref, kl, beta, alpha)


def tis_dpo_loss(policy_logits, labels, weights, ref_logps, beta: float = BETA) -> torch.Tensor:
    logps, mask = _masked_logps(policy_logits, labels)
    return tis_dpo_from_logps(logps, mask, weights, ref_logps, beta)


def ti_dpo_loss(policy_logits, ref_logits, labels, weights, beta: float = BETA, alpha: float = ALPHA) -> torch.Tensor:
    logps, mask = _masked_logps(policy_logits, labels)
    ref = _ref_logps_from_logits(ref_logits, labels)
    kl = token_kl(ref_logits.detach(), policy_logits, labels)
    return tdpo2_from_parts(logps, mask, ref, kl, beta, alpha, weights=weights)
