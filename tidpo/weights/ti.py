"""TI-DPO token weights: Gaussian position prior, importance normalisation and the λ-mix.

Implements the prior/mix math of docs/methods.md §3.1 (TI-DPO, Yang et al., arXiv 2505.19653v3, Eqs. 7–8,
and the released ``gracefulning/TIDPO`` ``trainers.py::_compute_token_importance_weights``). The raw
importance scores themselves (gradient L1 norms, Eqs. 5–6) are computed by
:func:`tidpo.weights.attribution.token_importance`; it and :func:`~tidpo.weights.attribution.ti_dpo_token_weights`
(attribution + mix) are also reachable here as ``tidpo.weights.ti.token_importance`` / ``ti_dpo_token_weights``.

Conventions are those of :mod:`tidpo.weights.tis`: ``scores`` floating ``[R, T]``, ``mask`` **bool**
``[R, T]`` (True = valid token; integer masks are rejected, convert with ``mask.bool()``), everything per
row over the valid tokens only, invalid positions never read and exactly 0.0 in the output, float64 in →
float64 out (float32 otherwise), detached, vectorised, no host synchronisation (the finiteness check on
valid scores runs for CPU tensors only, or with ``TIDPO_CHECK_VALUES=1``).

Paper vs code defaults (docs/methods.md §3.5): the paper uses λ = 0.7 and σ = T/4 (``sigma_div=4``), the
defaults here; the official code config uses λ = 0.2 (``lambda_importance``) and σ = T/8
(``prior_sigma_div: 8.0``).
"""

from __future__ import annotations

import torch

from tidpo._validation import check_number, check_positive
from tidpo.weights.tis import _check_mask, _check_scores, _valid_values

__all__ = ["gaussian_prior", "mix_importance", "normalize_importance"]

_ATTRIBUTION_NAMES = ("token_importance", "ti_dpo_token_weights")


def __getattr__(name: str):
    # The attribution module imports this one (for the mix): resolve its names lazily, not at import.
    if name in _ATTRIBUTION_NAMES:
        from tidpo.weights import attribution

        return getattr(attribution, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _safe_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den where den > 0, else 0 (no NaN from empty rows)."""
    ok = den > 0
    return torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.zeros_like(num))


def _prior(mask: torch.Tensor, sigma_div: float, dtype: torch.dtype) -> torch.Tensor:
    n = mask.sum(dim=1, keepdim=True).to(dtype)
    t = (mask.cumsum(dim=1) - 1).to(dtype)  # index among the row's valid tokens
    mu = (n - 1) / 2
    sigma = (n / sigma_div).clamp(min=1.0)
    p = torch.exp(-0.5 * ((t - mu) / sigma) ** 2)
    p = torch.where(mask, p, torch.zeros((), dtype=dtype, device=mask.device))
    return _safe_div(p, p.sum(dim=1, keepdim=True))


def gaussian_prior(
    mask: torch.Tensor, sigma_div: float = 4.0, *, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Gaussian position prior over each row's valid tokens, normalised to sum 1 (TI-DPO Eq. 7).

    For a row with n valid tokens, t = 0..n−1 indexes the valid tokens in order (``cumsum(mask) − 1``, so
    a span may start anywhere in the row; a non-contiguous mask is indexed over its valid tokens):

        μ = (n − 1)/2,   σ = max(1, n / sigma_div),   P(t) = exp(−½((t − μ)/σ)²) / Σ_t' exp(−½((t' − μ)/σ)²)

    The paper (docs/methods.md §3.1, Eq. 7) uses σ = T/4, i.e. ``sigma_div=4`` (the default); the official
    code uses ``prior_sigma_div=8`` and the same ``max(1, ·)`` floor. The paper calls P "unnormalized";
    like the official code we normalise it so it mixes with a distribution.

    Args:
        mask: Bool ``[R, T]``, True at valid tokens.
        sigma_div: σ = max(1, n / sigma_div); > 0. Default 4 (paper).
        dtype: Floating output dtype. Default float32.

    Returns:
        ``[R, T]`` in ``dtype``: the prior at valid tokens (each non-empty row sums to 1, peaks at the
        middle of its valid span and is symmetric about it), 0.0 elsewhere; rows with no valid token
        are all zero.

    Raises:
        TypeError: ``mask`` is not a bool tensor, or ``dtype`` is not a floating dtype.
        ValueError: ``mask`` is not 2-D, or ``sigma_div <= 0`` / not finite.
    """
    _check_mask(mask)
    sigma_div = check_positive(sigma_div, "sigma_div")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    return _prior(mask, sigma_div, dtype)


def _normalize(s: torch.Tensor) -> torch.Tensor:
    """Clamp at 0 and divide by the row sum (zero rows stay zero); ``s`` has invalid entries zeroed."""
    i = s.clamp(min=0)
    return _safe_div(i, i.sum(dim=1, keepdim=True))


def normalize_importance(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """I_norm = max(I, 0) / Σ_valid max(I, 0) per row (TI-DPO step 3, docs/methods.md §3.1).

    The clamp at 0 follows the official code (gradient L1 norms are non-negative anyway).

    Args:
        scores: Raw importance I, floating ``[R, T]``; invalid positions may hold anything.
        mask: Bool ``[R, T]``, True at valid tokens.

    Returns:
        ``[R, T]`` (float64 for float64 scores, else float32): each row sums to 1 over its valid tokens,
        0.0 at invalid positions. A row whose clamped scores are all 0 (or that has no valid token)
        is all zero; :func:`mix_importance` falls back to the prior for such rows.

    Raises:
        TypeError: Non-floating ``scores`` or non-bool ``mask``.
        ValueError: Shape/device mismatch or a non-finite valid score (checked on CPU tensors only).
    """
    _check_scores(scores, mask)
    return _normalize(_valid_values(scores, mask))


def mix_importance(
    scores: torch.Tensor, mask: torch.Tensor, lam: float = 0.7, sigma_div: float = 4.0
) -> torch.Tensor:
    """TI-DPO token weights from raw importance scores: λ-mix with the Gaussian prior, mean 1 per row.

    Per row with n valid tokens (docs/methods.md §3.1, paper Eq. 8 plus the official code's rescale):

        I_norm = max(I, 0) / Σ max(I, 0)                     (the prior alone if Σ max(I, 0) = 0)
        W      = λ·I_norm + (1 − λ)·P_prior                  (P_prior = :func:`gaussian_prior`)
        w      = n · W / Σ W                                 (mean weight 1 over the valid tokens)

    The ×n rescale is the official code's (it keeps the DPO margin's scale). Differences from the
    official code, on purpose: a row with n = 1 gets weight 1.0 (the code gives 0 for n ≤ 1, which
    silently drops single-token responses; we keep the mean-1 invariant), and there is no silent
    all-ones fallback on errors. Rows with n = 0 are all zero. The fallback to the prior when all scores
    are 0 uses ``torch.where`` (no host sync).

    Defaults λ = 0.7 and ``sigma_div=4`` (σ = n/4) follow the paper (Table B13, Eq. 7); the official code
    config uses λ = 0.2 and ``sigma_div=8``.

    Args:
        scores: Raw importance I (e.g. gradient L1 norms), floating ``[R, T]``; invalid positions may
            hold anything.
        mask: Bool ``[R, T]``, True at valid tokens.
        lam: λ ∈ [0, 1], the weight of the importance term. Default 0.7 (paper).
        sigma_div: Prior width divisor, > 0. Default 4 (paper).

    Returns:
        Weights ``[R, T]`` (float64 for float64 scores, else float32), detached, mean 1 over each
        non-empty row's valid tokens, 0.0 at invalid positions.

    Raises:
        TypeError: Non-floating ``scores``, non-bool ``mask``, non-number ``lam`` / ``sigma_div``.
        ValueError: Shape/device mismatch, ``lam`` outside [0, 1], ``sigma_div <= 0``, or a non-finite
            valid score (checked on CPU tensors only).
    """
    _check_scores(scores, mask)
    lam = check_number(lam, "lam", low=0.0, high=1.0)
    sigma_div = check_positive(sigma_div, "sigma_div")
    s = _valid_values(scores, mask)
    prior = _prior(mask, sigma_div, s.dtype)
    i_norm = _normalize(s)
    has_signal = i_norm.sum(dim=1, keepdim=True) > 0
    mixed = torch.where(has_signal, lam * i_norm + (1.0 - lam) * prior, prior)
    n = mask.sum(dim=1, keepdim=True).to(s.dtype)
    return _safe_div(mixed, mixed.sum(dim=1, keepdim=True)) * n
