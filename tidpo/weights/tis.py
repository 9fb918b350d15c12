"""TIS-DPO token weights: the official per-response transforms and the paper's exp-clamp form.

Implements docs/methods.md §2.4 (token-weight estimation of TIS-DPO, Liu et al., ICLR 2025).

The contrastive score of a response token is r̂_t = log π⁺(y^t | x, y^{<t}) − log π⁻(y^t | x, y^{<t}).
Two ways to turn it into a weight exist:

- **Released code** (``exlaw/TIS-DPO`` ``preference_datasets.py``): a per-response transform of the
  *signed* score: chosen weights = transform(+r̂), rejected weights = transform(−r̂). The README recipe
  is ``rank_based`` → [0.7, 1.3]. See :func:`transform_scores`.
- **Paper** (Theorem 2 / Eq. 19): w_t = k·exp(μ·clamp(r̂_t, L, U)) with k = 1, μ = +1 for the chosen and
  −1 for the rejected response. See :func:`exp_clamp_weights`.

:func:`tis_dpo_weights` applies either to the stacked pair layout (rows ``[0, B)`` chosen, ``[B, 2B)``
rejected) and handles the signs.

Conventions shared by every function here:

- ``scores`` / ``rhat`` is a floating tensor ``[R, T]``; ``mask`` is a **bool** tensor ``[R, T]`` whose
  True entries are the valid response tokens (masks need not be contiguous). Integer 0/1 masks are
  rejected with a ``TypeError`` rather than converted silently, so that a tensor of token ids or
  labels passed by mistake cannot be read as a mask; convert explicitly with ``mask.bool()``.
- Every transform acts **per row** over that row's valid tokens only. Values at invalid positions are
  never read (they may hold NaN or garbage) and the output is exactly 0.0 there.
- The output is float64 when the scores are float64 and float32 otherwise (half/bfloat16 scores are
  upcast). It is detached: token weights are constants in both official codes.
- Fully vectorised; no host synchronisation, so every function runs on any device. The check that
  valid scores are finite needs to read tensor contents, so it runs only for CPU tensors (or on an
  accelerator when ``TIDPO_CHECK_VALUES=1``, see :mod:`tidpo._validation`).
"""

from __future__ import annotations

import torch

from tidpo._validation import check_number, check_pair_rows, check_positive, check_same_device, value_checks_enabled

__all__ = ["TRANSFORMS", "exp_clamp_weights", "tis_dpo_weights", "transform_scores"]

#: Every method name :func:`tis_dpo_weights` accepts. All but ``"exp_clamp"`` are the official
#: per-response transforms that :func:`transform_scores` implements.
TRANSFORMS: tuple[str, ...] = (
    "origin",
    "binary",
    "threshold",
    "threshold_and_scale",
    "rank_based",
    "random",
    "exp_clamp",
)

_OFFICIAL_TRANSFORMS = TRANSFORMS[:-1]


# ----------------------------------------------------------------------------------------------------
# validation helpers (also used by tidpo.weights.ti)
# ----------------------------------------------------------------------------------------------------


def _check_mask(mask, name: str = "mask") -> torch.Tensor:
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(
            f"{name} must be a bool tensor (True = valid response token), got dtype {mask.dtype}; "
            f"convert an integer 0/1 mask explicitly with {name}.bool()"
        )
    if mask.dim() != 2:
        raise ValueError(f"{name} must have shape [R, T], got {tuple(mask.shape)} ({mask.dim()} dims)")
    return mask


def _check_scores(scores, mask, name: str = "scores", mask_name: str = "mask") -> torch.Tensor:
    """Check a ``[R, T]`` floating score tensor, its bool mask, and (CPU only) finiteness of valid scores."""
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(scores).__name__}")
    if not scores.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {scores.dtype}")
    if scores.dim() != 2:
        raise ValueError(f"{name} must have shape [R, T], got {tuple(scores.shape)} ({scores.dim()} dims)")
    _check_mask(mask, mask_name)
    if tuple(mask.shape) != tuple(scores.shape):
        raise ValueError(
            f"{mask_name} shape {tuple(mask.shape)} does not match {name} shape {tuple(scores.shape)}"
        )
    check_same_device(mask, scores, mask_name, name)
    if value_checks_enabled(scores) and scores.numel() > 0:
        bad = mask & ~torch.isfinite(scores)
        if bool(bad.any()):
            first = tuple(int(i) for i in bad.nonzero()[0])
            raise ValueError(
                f"{name} holds a non-finite value ({float(scores[first])}) at valid position {first}"
            )
    return scores


def _check_order(lo, hi, lo_name: str, hi_name: str, *, strict: bool = False) -> tuple[float, float]:
    lo_v, hi_v = check_number(lo, lo_name), check_number(hi, hi_name)
    if lo_v > hi_v or (strict and lo_v == hi_v):
        rel = "<" if strict else "<="
        raise ValueError(f"{lo_name} must be {rel} {hi_name}, got {lo_name}={lo!r}, {hi_name}={hi!r}")
    return lo_v, hi_v


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _valid_values(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Detached scores in the compute dtype with invalid positions replaced by 0 (garbage never leaks)."""
    s = scores.detach().to(_compute_dtype(scores))
    return torch.where(mask, s, torch.zeros((), dtype=s.dtype, device=s.device))


def _masked(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask, values, torch.zeros((), dtype=values.dtype, device=values.device))


# ----------------------------------------------------------------------------------------------------
# the official transforms
# ----------------------------------------------------------------------------------------------------


def _ascending_rank(keys: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Rank ``0..n-1`` of each valid entry among its row's valid entries, ascending by ``keys``.

    Ties are broken by position (lower position → lower rank). Two stable sorts: first by key, then
    valid-before-invalid, so invalid entries (whose keys must already be finite, e.g. 0) never
    interleave with valid ones. The value at invalid positions is meaningless.
    """
    by_key = torch.argsort(keys, dim=1, stable=True)
    invalid_in_key_order = (~mask).gather(1, by_key).to(torch.uint8)
    valid_first = torch.argsort(invalid_in_key_order, dim=1, stable=True)
    order = by_key.gather(1, valid_first)
    ranks = torch.empty_like(order)
    positions = torch.arange(keys.shape[1], device=keys.device).expand_as(order)
    return ranks.scatter_(1, order, positions)


def _binary(s: torch.Tensor, mask: torch.Tensor, top_percent: float) -> torch.Tensor:
    n = mask.sum(dim=1, keepdim=True)
    k = torch.ceil(n.to(s.dtype) * top_percent / 100.0)  # compute dtype: no float64 on e.g. MPS
    rank_from_top = _ascending_rank(-s, mask)  # ties: lower position first
    return (rank_from_top < k).to(s.dtype)


def _threshold_and_scale(s, min_val, max_val, min_scale, max_scale) -> torch.Tensor:
    clamped = s.clamp(min_val, max_val)
    return min_scale + (clamped - min_val) / (max_val - min_val) * (max_scale - min_scale)


def _rank_based(s: torch.Tensor, mask: torch.Tensor, min_scale: float, max_scale: float) -> torch.Tensor:
    n = mask.sum(dim=1, keepdim=True)
    rank = _ascending_rank(s, mask).to(s.dtype)
    frac = rank / (n - 1).clamp(min=1).to(s.dtype)
    w = min_scale + frac * (max_scale - min_scale)
    return torch.where(n == 1, torch.ones((), dtype=s.dtype, device=s.device), w)


def _random(s, min_scale, max_scale, seed, generator) -> torch.Tensor:
    if seed is not None and generator is not None:
        raise ValueError("pass either seed or generator, not both")
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        generator = torch.Generator(device=s.device).manual_seed(seed)
    elif generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    u = torch.rand(s.shape, generator=generator, dtype=s.dtype, device=s.device)
    return min_scale + u * (max_scale - min_scale)


def _check_method(method) -> str:
    if method == "exp_clamp":
        raise ValueError(
            "method 'exp_clamp' needs the unsigned r̂ and μ: call exp_clamp_weights(rhat, mask, mu, ...) "
            "or tis_dpo_weights(rhat, mask, method='exp_clamp') instead of transform_scores"
        )
    if method not in _OFFICIAL_TRANSFORMS:
        valid = ", ".join(map(repr, _OFFICIAL_TRANSFORMS))
        raise ValueError(f"method must be one of {valid}; got {method!r}")
    return method


def _transform(s, mask, method, *, top_percent, lower, upper, min_val, max_val, min_scale, max_scale,
               seed, generator) -> torch.Tensor:
    """Dispatch on checked inputs; ``s`` is already in the compute dtype with invalid entries zeroed."""
    if method == "origin":
        w = s
    elif method == "binary":
        top_percent = check_number(top_percent, "top_percent", low=0.0, low_open=True, high=100.0)
        w = _binary(s, mask, top_percent)
    elif method == "threshold":
        lower, upper = _check_order(lower, upper, "lower", "upper")
        w = s.clamp(lower, upper)
    elif method == "threshold_and_scale":
        min_val, max_val = _check_order(min_val, max_val, "min_val", "max_val", strict=True)
        min_scale, max_scale = _check_order(min_scale, max_scale, "min_scale", "max_scale")
        w = _threshold_and_scale(s, min_val, max_val, min_scale, max_scale)
    elif method == "rank_based":
        min_scale, max_scale = _check_order(min_scale, max_scale, "min_scale", "max_scale")
        w = _rank_based(s, mask, min_scale, max_scale)
    else:  # "random"
        min_scale, max_scale = _check_order(min_scale, max_scale, "min_scale", "max_scale")
        w = _random(s, min_scale, max_scale, seed, generator)
    return _masked(w, mask)


def transform_scores(
    scores: torch.Tensor,
    mask: torch.Tensor,
    method: str = "rank_based",
    *,
    top_percent: float = 100.0,
    lower: float = -1.0,
    upper: float = 1.0,
    min_val: float = -1.5,
    max_val: float = 1.5,
    min_scale: float = 0.7,
    max_scale: float = 1.3,
    seed: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Apply one of the official TIS-DPO weight transforms to already-signed scores, per response.

    Reproduces ``weight_transform_methods`` of the official code (docs/methods.md §2.4, "Released
    pipeline", step 3). The scores must already carry the sign of μ: chosen rows +r̂, rejected rows −r̂
    (:func:`tis_dpo_weights` does this for the stacked pair layout). With n the number of valid
    tokens of a row and s its valid scores:

    - ``"origin"``: w = s (identity; can be negative).
    - ``"binary"``: the top ⌈n·top_percent/100⌉ valid tokens (largest s; ties → lower position first)
      get 1.0, the others 0.0. ``top_percent=100`` gives all ones, i.e. plain DPO.
    - ``"threshold"``: w = clamp(s, lower, upper).
    - ``"threshold_and_scale"``: c = clamp(s, min_val, max_val);
      w = min_scale + (c − min_val)/(max_val − min_val)·(max_scale − min_scale). A linear stand-in for
      the paper's exp form.
    - ``"rank_based"`` (default; the README recipe): the i-th smallest valid score (i = 0..n−1, ties
      broken by position, stable) gets min_scale + i/(n−1)·(max_scale − min_scale); a row with n = 1
      gets 1.0.
    - ``"random"`` (ablation): w ~ Uniform(min_scale, max_scale) independently per valid token
      (the official random transform's default range is [0.7, 1.3]). Reproducible via ``seed`` (a
      ``torch.Generator`` on the scores' device is built from it) or an explicit ``generator``;
      with neither, torch's global RNG for that device is used.

    Parameters a method does not use are ignored (and not validated).

    Args:
        scores: Signed scores ``[R, T]``, floating. Invalid positions may hold anything.
        mask: Bool ``[R, T]``, True at valid response tokens (need not be contiguous).
        method: One of ``"origin"``, ``"binary"``, ``"threshold"``, ``"threshold_and_scale"``,
            ``"rank_based"``, ``"random"``. ``"exp_clamp"`` is not a transform of signed scores; use
            :func:`exp_clamp_weights` or :func:`tis_dpo_weights`.
        top_percent: ``binary`` only; in (0, 100]. Default 100 (official default).
        lower: ``threshold`` lower clamp bound. Default −1 (official default).
        upper: ``threshold`` upper clamp bound, ≥ lower. Default 1.
        min_val: ``threshold_and_scale`` lower clamp bound. Default −1.5 (official default).
        max_val: ``threshold_and_scale`` upper clamp bound, > min_val. Default 1.5.
        min_scale: Lowest weight of ``threshold_and_scale`` / ``rank_based`` / ``random``. Default 0.7.
        max_scale: Highest weight of those methods, ≥ min_scale. Default 1.3.
        seed: ``random`` only; an int seed. Mutually exclusive with ``generator``.
        generator: ``random`` only; a ``torch.Generator`` on the scores' device.

    Returns:
        Weights ``[R, T]`` (float64 for float64 scores, else float32), detached, 0.0 at invalid
        positions. Rows with no valid token are all zero.

    Raises:
        TypeError: ``scores`` is not a floating tensor, ``mask`` not a bool tensor, or a parameter is
            not a number.
        ValueError: Shape or device mismatch, a bad parameter, a non-finite valid score (checked on CPU
            tensors only, to avoid a host sync), ``method="exp_clamp"`` or an unknown method.
    """
    method = _check_method(method)
    _check_scores(scores, mask)
    return _transform(
        _valid_values(scores, mask), mask, method, top_percent=top_percent, lower=lower, upper=upper,
        min_val=min_val, max_val=max_val, min_scale=min_scale, max_scale=max_scale, seed=seed,
        generator=generator,
    )


# ----------------------------------------------------------------------------------------------------
# the paper's exp-clamp form
# ----------------------------------------------------------------------------------------------------


def _check_mu(mu, rows: int, like: torch.Tensor) -> torch.Tensor:
    """μ as a ``[R, 1]`` tensor in the compute dtype of ``like``."""
    dtype = _compute_dtype(like)
    if isinstance(mu, torch.Tensor):
        if mu.dtype == torch.bool or mu.is_complex():
            raise TypeError(f"mu must be a real tensor, got dtype {mu.dtype}")
        if tuple(mu.shape) != (rows,):
            raise ValueError(
                f"mu must be a number or a tensor of shape [R] = ({rows},), got {tuple(mu.shape)}"
            )
        check_same_device(mu, like, "mu", "rhat")
        if value_checks_enabled(mu) and mu.is_floating_point() and not bool(torch.isfinite(mu).all()):
            raise ValueError("mu holds a non-finite value")
        return mu.detach().to(dtype).unsqueeze(1)
    return torch.full((rows, 1), check_number(mu, "mu"), dtype=dtype, device=like.device)


def _exp_clamp(r: torch.Tensor, mask: torch.Tensor, mu: torch.Tensor, k: float, lower: float,
               upper: float) -> torch.Tensor:
    return _masked(k * torch.exp(mu * r.clamp(lower, upper)), mask)


def _check_exp_params(k, lower, upper) -> tuple[float, float, float]:
    k = check_positive(k, "k")
    lower, upper = _check_order(lower, upper, "lower", "upper")
    return k, lower, upper


def exp_clamp_weights(
    rhat: torch.Tensor,
    mask: torch.Tensor,
    mu: float | torch.Tensor,
    *,
    k: float = 1.0,
    lower: float = -0.5,
    upper: float = 1.5,
) -> torch.Tensor:
    """The TIS-DPO paper's weights w_t = k·exp(μ·clamp(r̂_t, L, U)) (docs/methods.md §2.4, "Paper formula").

    Note the clamp acts on the **unsigned** r̂ and μ carries the sign: μ = +1 for a chosen response
    (w ∈ [k·e^L, k·e^U]), μ = −1 for a rejected one (w ∈ [k·e^{−U}, k·e^{−L}]). k = 1 and μ = ±1 are
    the paper's settings (quoted by the OpenReview reviews). The paper's L and U are **unverified**; the
    defaults L = −0.5, U = 1.5 come from the third-party reimplementation ``tue09/TIS_DPO``
    (``compute_weight.py``), giving chosen weights in [0.61, 4.48] and rejected in [0.22, 1.65].

    Args:
        rhat: r̂ = log π⁺ − log π⁻ per token, floating ``[R, T]``. Invalid positions may hold anything.
        mask: Bool ``[R, T]``, True at valid response tokens.
        mu: A number applied to every row, or a real tensor ``[R]`` (one μ per row, normally ±1).
        k: Positive scale. Default 1.
        lower: Clamp lower bound L. Default −0.5 ([3p], see above).
        upper: Clamp upper bound U, ≥ L. Default 1.5 ([3p]).

    Returns:
        Weights ``[R, T]`` (float64 for float64 ``rhat``, else float32), detached, 0.0 at invalid
        positions.

    Raises:
        TypeError: Non-tensor / non-floating ``rhat``, non-bool ``mask``, non-number parameters or a
            bool/complex ``mu`` tensor.
        ValueError: Shape/device mismatch, ``k <= 0``, ``lower > upper``, a non-finite parameter, or a
            non-finite valid ``rhat`` entry (checked on CPU tensors only).
    """
    _check_scores(rhat, mask, "rhat")
    k, lower, upper = _check_exp_params(k, lower, upper)
    mu_t = _check_mu(mu, rhat.shape[0], rhat)
    return _exp_clamp(_valid_values(rhat, mask), mask, mu_t, k, lower, upper)


# ----------------------------------------------------------------------------------------------------
# the stacked pair layout
# ----------------------------------------------------------------------------------------------------


def _pair_signs(rows: int, like: torch.Tensor) -> torch.Tensor:
    """``[2B, 1]`` column: +1 for the chosen rows [0, B), −1 for the rejected rows [B, 2B)."""
    half = rows // 2
    signs = torch.ones((rows, 1), dtype=like.dtype, device=like.device)
    signs[half:] = -1.0
    return signs


def tis_dpo_weights(
    rhat: torch.Tensor, mask: torch.Tensor, method: str = "rank_based", **params
) -> torch.Tensor:
    """TIS-DPO token weights for a stacked batch of B pairs (rows ``[0, B)`` chosen, ``[B, 2B)`` rejected).

    ``rhat`` is the unsigned contrastive score r̂ = log π⁺ − log π⁻ of every token (docs/methods.md §2.4).
    The official code stores s = −r̂ and uses chosen = transform(−s) = transform(+r̂) and rejected =
    transform(s) = transform(−r̂); the paper uses μ = +1 for chosen and −1 for rejected. So:

    - official ``method`` (see :func:`transform_scores`): chosen rows → transform(+r̂), rejected rows →
      transform(−r̂), each row transformed on its own. Default ``"rank_based"`` with [0.7, 1.3], the
      released README recipe.
    - ``"exp_clamp"`` (paper): chosen rows → k·exp(+clamp(r̂, L, U)), rejected rows →
      k·exp(−clamp(r̂, L, U)); see :func:`exp_clamp_weights`.

    Args:
        rhat: Floating ``[2B, T]``; invalid positions may hold anything.
        mask: Bool ``[2B, T]``, True at valid response tokens.
        method: One of :data:`TRANSFORMS`.
        **params: Keyword parameters of the chosen method: those of :func:`transform_scores`
            (``top_percent``, ``lower``, ``upper``, ``min_val``, ``max_val``, ``min_scale``,
            ``max_scale``, ``seed``, ``generator``) or, for ``"exp_clamp"``, ``k``, ``lower``, ``upper``.

    Returns:
        Weights ``[2B, T]`` (float64 for float64 ``rhat``, else float32), detached, 0.0 at invalid
        positions.

    Raises:
        TypeError: As :func:`transform_scores`, or an unknown keyword parameter.
        ValueError: An odd or zero row count, an unknown method, or anything :func:`transform_scores` /
            :func:`exp_clamp_weights` reject.
    """
    if method not in TRANSFORMS:
        raise ValueError(f"method must be one of {', '.join(map(repr, TRANSFORMS))}; got {method!r}")
    _check_scores(rhat, mask, "rhat")
    check_pair_rows(rhat, "rhat")
    r = _valid_values(rhat, mask)
    signs = _pair_signs(rhat.shape[0], r)
    if method == "exp_clamp":
        unknown = set(params) - {"k", "lower", "upper"}
        if unknown:
            raise TypeError(f"method 'exp_clamp' got unexpected parameter(s): {', '.join(sorted(unknown))}")
        k, lower, upper = _check_exp_params(
            params.get("k", 1.0), params.get("lower", -0.5), params.get("upper", 1.5)
        )
        return _exp_clamp(r, mask, signs, k, lower, upper)
    return _transform_with_defaults(r * signs, mask, method, **params)


def _transform_with_defaults(s, mask, method, *, top_percent=100.0, lower=-1.0, upper=1.0, min_val=-1.5,
                             max_val=1.5, min_scale=0.7, max_scale=1.3, seed=None, generator=None):
    """:func:`_transform` with :func:`transform_scores`' defaults (unknown keywords raise TypeError)."""
    return _transform(s, mask, method, top_percent=top_percent, lower=lower, upper=upper, min_val=min_val,
                      max_val=max_val, min_scale=min_scale, max_scale=max_scale, seed=seed,
                      generator=generator)
