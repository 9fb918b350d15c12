"""TI-DPO prior and λ-mix (tidpo.weights.ti) against straightforward per-row Python references.

The references loop over rows and valid tokens in plain Python floats (float64) and implement
docs/methods.md §3.1 directly from its text; they share no code with the implementation.
"""

from __future__ import annotations

import math

import pytest
import torch

from tests.conftest import given, settings, st
from tidpo.weights.ti import gaussian_prior, mix_importance, normalize_importance

# ----------------------------------------------------------------------------------------------------
# independent reference (python loops, float64)
# ----------------------------------------------------------------------------------------------------


def ref_prior_row(n: int, sigma_div: float) -> list[float]:
    if n == 0:
        return []
    mu, sigma = (n - 1) / 2, max(1.0, n / sigma_div)
    p = [math.exp(-0.5 * ((t - mu) / sigma) ** 2) for t in range(n)]
    total = sum(p)
    return [v / total for v in p]


def ref_mix_row(vals: list[float], lam: float, sigma_div: float) -> list[float]:
    n = len(vals)
    if n == 0:
        return []
    prior = ref_prior_row(n, sigma_div)
    clamped = [max(v, 0.0) for v in vals]
    total = sum(clamped)
    if total == 0:
        mixed = prior
    else:
        mixed = [lam * c / total + (1 - lam) * p for c, p in zip(clamped, prior, strict=True)]
    s = sum(mixed)
    return [n * m / s for m in mixed]


def ref_norm_row(vals: list[float]) -> list[float]:
    clamped = [max(v, 0.0) for v in vals]
    total = sum(clamped)
    return [c / total if total > 0 else 0.0 for c in clamped]


def per_row(mask: torch.Tensor, fn, scores: torch.Tensor | None = None) -> torch.Tensor:
    rows, cols = mask.shape
    out = [[0.0] * cols for _ in range(rows)]
    for r in range(rows):
        pos = [t for t in range(cols) if bool(mask[r, t])]
        vals = [float(scores[r, t]) for t in pos] if scores is not None else [0.0] * len(pos)
        for t, v in zip(pos, fn(vals), strict=True):
            out[r][t] = v
    return torch.tensor(out, dtype=torch.float64)


def make_case(seed: int, rows: int = 7, cols: int = 15, dtype=torch.float32, contiguous: bool = False):
    """Non-negative-ish importance scores (some negative), row 0 empty, row 1 a single token.

    Masks are random (non-contiguous) or random contiguous spans starting anywhere; invalid positions
    hold NaN so that any leak shows up.
    """
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(rows, cols, generator=g, dtype=torch.float64) * 3 - 0.5
    if contiguous:
        mask = torch.zeros(rows, cols, dtype=torch.bool)
        for r in range(rows):
            start = int(torch.randint(0, cols, (1,), generator=g))
            end = int(torch.randint(start, cols + 1, (1,), generator=g))
            mask[r, start:end] = True
    else:
        mask = torch.rand(rows, cols, generator=g) < 0.65
    mask[0] = False
    mask[1] = False
    mask[1, 6] = True
    return scores.masked_fill(~mask, float("nan")).to(dtype), mask


# ----------------------------------------------------------------------------------------------------
# Gaussian prior
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("contiguous", [False, True])
@pytest.mark.parametrize("sigma_div", [4.0, 8.0, 0.5, 2])
def test_prior_matches_reference(sigma_div, contiguous):
    _, mask = make_case(1, rows=9, cols=40, contiguous=contiguous)
    got = gaussian_prior(mask, sigma_div)
    assert got.dtype == torch.float32
    want = per_row(mask, lambda v: ref_prior_row(len(v), sigma_div))
    torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=1e-5)
    assert (got[~mask] == 0).all()
    got64 = gaussian_prior(mask, sigma_div, dtype=torch.float64)
    assert got64.dtype == torch.float64
    torch.testing.assert_close(got64, want, atol=1e-13, rtol=0)


def test_prior_sums_to_one_and_empty_row_is_zero():
    _, mask = make_case(2, rows=10, cols=33)
    p = gaussian_prior(mask, dtype=torch.float64)
    sums = p.sum(dim=1)
    assert sums[0] == 0 and torch.isfinite(p).all()
    torch.testing.assert_close(sums[1:], torch.ones(9, dtype=torch.float64))
    assert p[1, 6] == 1.0


@pytest.mark.parametrize(("start", "n"), [(0, 9), (5, 9), (11, 4), (3, 10), (0, 20)])
def test_prior_peaks_mid_span_and_is_symmetric(start, n):
    mask = torch.zeros(1, 20, dtype=torch.bool)
    mask[0, start:start + n] = True
    p = gaussian_prior(mask, dtype=torch.float64)[0]
    span = p[start:start + n]
    torch.testing.assert_close(span, span.flip(0), atol=1e-15, rtol=0)  # symmetric about the middle
    mid = start + (n - 1) / 2
    assert int(p.argmax()) in {math.floor(mid), math.ceil(mid)}
    # strictly decreasing away from the middle
    right = span[n // 2:]
    assert (right[1:] < right[:-1]).all()


def test_prior_sigma_floor_of_one():
    mask = torch.ones(1, 3, dtype=torch.bool)  # n/4 = 0.75 → σ = 1
    p = gaussian_prior(mask, 4.0, dtype=torch.float64)[0]
    e = math.exp(-0.5)
    torch.testing.assert_close(p, torch.tensor([e, 1.0, e], dtype=torch.float64) / (1 + 2 * e))


# ----------------------------------------------------------------------------------------------------
# normalize_importance
# ----------------------------------------------------------------------------------------------------


def test_normalize_importance_matches_reference():
    scores, mask = make_case(3, rows=8, cols=20)
    scores[2] = -1.0  # all negative → all-zero row
    got = normalize_importance(scores, mask)
    want = per_row(mask, ref_norm_row, scores)
    torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=1e-5)
    assert (got[~mask] == 0).all()
    assert (got[2] == 0).all()


# ----------------------------------------------------------------------------------------------------
# mix_importance
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("contiguous", [False, True])
@pytest.mark.parametrize(("lam", "sigma_div"), [(0.7, 4.0), (0.2, 8.0), (0.0, 4.0), (1.0, 4.0), (0.5, 1)])
def test_mix_matches_reference(lam, sigma_div, contiguous):
    for seed in range(3):
        scores, mask = make_case(seed, rows=8, cols=25, contiguous=contiguous)
        got = mix_importance(scores, mask, lam, sigma_div)
        assert got.dtype == torch.float32
        want = per_row(mask, lambda v, lam=lam, sd=sigma_div: ref_mix_row(v, lam, sd), scores)
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
        assert (got[~mask] == 0).all()


def test_mix_float64_keeps_float64():
    scores, mask = make_case(4, dtype=torch.float64)
    got = mix_importance(scores, mask)
    assert got.dtype == torch.float64
    want = per_row(mask, lambda v: ref_mix_row(v, 0.7, 4.0), scores)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_mix_half_gives_float32(dtype):
    scores, mask = make_case(4, dtype=dtype)
    assert mix_importance(scores, mask).dtype == torch.float32


def test_mix_mean_one_over_valid_tokens():
    scores, mask = make_case(5, rows=12, cols=30)
    w = mix_importance(scores, mask).double()
    n = mask.sum(1)
    means = w.sum(1)[n > 0] / n[n > 0]
    torch.testing.assert_close(means, torch.ones_like(means))


def test_mix_lambda_extremes():
    scores = torch.tensor([[1.0, 3.0, 0.0, 4.0, 2.0]], dtype=torch.float64)
    mask = torch.ones_like(scores, dtype=torch.bool)
    n = 5
    i_norm = scores / scores.sum()
    torch.testing.assert_close(mix_importance(scores, mask, lam=1.0), n * i_norm)
    prior = torch.tensor([ref_prior_row(5, 4.0)], dtype=torch.float64)
    torch.testing.assert_close(mix_importance(scores, mask, lam=0.0), n * prior)


def test_mix_all_zero_or_negative_scores_give_prior():
    mask = torch.tensor([[False, True, True, True, True, False]])
    prior = torch.tensor([[0.0] + ref_prior_row(4, 4.0) + [0.0]], dtype=torch.float64)
    for row in ([0.0] * 6, [-1.0, -2.0, 0.0, -0.5, -3.0, 7.0]):
        scores = torch.tensor([row], dtype=torch.float64)
        for lam in (0.0, 0.7, 1.0):
            torch.testing.assert_close(mix_importance(scores, mask, lam=lam), 4 * prior)


def test_mix_negative_scores_clamped():
    mask = torch.ones(1, 4, dtype=torch.bool)
    neg = torch.tensor([[-5.0, 2.0, 3.0, -0.1]])
    zero = torch.tensor([[0.0, 2.0, 3.0, 0.0]])
    assert torch.equal(mix_importance(neg, mask), mix_importance(zero, mask))
    assert torch.equal(mix_importance(neg, mask, lam=1.0), torch.tensor([[0.0, 1.6, 2.4, 0.0]]))


def test_mix_single_token_and_empty_rows():
    scores = torch.tensor([[0.0, 5.0, 0.0], [0.0, 0.0, 0.0], [1.0, 2.0, 3.0]])
    mask = torch.tensor([[False, True, False], [False, False, True], [False, False, False]])
    w = mix_importance(scores, mask)
    assert w.tolist() == [[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 0.0]]


@pytest.mark.parametrize("garbage", [float("nan"), float("inf"), -float("inf"), 1e30])
def test_garbage_at_masked_positions_does_not_leak(garbage):
    scores, mask = make_case(6)
    clean = scores.masked_fill(~mask, 0.0)
    dirty = scores.masked_fill(~mask, garbage)
    assert torch.equal(mix_importance(dirty, mask), mix_importance(clean, mask))
    assert torch.equal(normalize_importance(dirty, mask), normalize_importance(clean, mask))


def test_output_is_detached():
    scores = torch.rand(3, 5, requires_grad=True)
    mask = torch.ones(3, 5, dtype=torch.bool)
    assert not mix_importance(scores, mask).requires_grad
    assert not normalize_importance(scores, mask).requires_grad


@pytest.mark.parametrize("shape", [(0, 5), (3, 0)])
def test_empty_shapes(shape):
    mask = torch.zeros(shape, dtype=torch.bool)
    assert gaussian_prior(mask).shape == shape
    assert mix_importance(torch.zeros(shape), mask).shape == shape


# ----------------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------------

S = torch.rand(2, 3)
M = torch.ones(2, 3, dtype=torch.bool)


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"scores": [[1.0]]}, TypeError, "scores"),
        ({"scores": torch.ones(2, 3, dtype=torch.int32)}, TypeError, "scores"),
        ({"scores": torch.ones(2, 3, 1)}, ValueError, "scores"),
        ({"mask": torch.ones(2, 3, dtype=torch.int64)}, TypeError, r"mask.*bool"),
        ({"mask": torch.ones(3, 2, dtype=torch.bool)}, ValueError, "mask"),
        ({"scores": torch.tensor([[1.0, float("nan"), 1.0], [1.0] * 3])}, ValueError, "scores"),
        ({"scores": torch.tensor([[1.0, float("inf"), 1.0], [1.0] * 3])}, ValueError, "scores"),
        ({"lam": -0.1}, ValueError, "lam"),
        ({"lam": 1.5}, ValueError, "lam"),
        ({"lam": float("nan")}, ValueError, "lam"),
        ({"lam": "0.7"}, TypeError, "lam"),
        ({"sigma_div": 0.0}, ValueError, "sigma_div"),
        ({"sigma_div": -4.0}, ValueError, "sigma_div"),
        ({"sigma_div": float("inf")}, ValueError, "sigma_div"),
    ],
)
def test_mix_importance_validation(kwargs, exc, match):
    args = {"scores": S, "mask": M, **kwargs}
    with pytest.raises(exc, match=match):
        mix_importance(**args)


@pytest.mark.parametrize(
    ("args", "kwargs", "exc", "match"),
    [
        ((torch.ones(2, 3, dtype=torch.uint8),), {}, TypeError, "mask"),
        (([[True]],), {}, TypeError, "mask"),
        ((torch.ones(6, dtype=torch.bool),), {}, ValueError, "mask"),
        ((M, 0.0), {}, ValueError, "sigma_div"),
        ((M,), {"dtype": torch.int64}, TypeError, "dtype"),
    ],
)
def test_gaussian_prior_validation(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        gaussian_prior(*args, **kwargs)


def test_normalize_importance_validation():
    with pytest.raises(TypeError, match="mask"):
        normalize_importance(S, M.float())
    with pytest.raises(ValueError, match="scores"):
        normalize_importance(torch.full((2, 3), float("nan")), M)


# ----------------------------------------------------------------------------------------------------
# property test
# ----------------------------------------------------------------------------------------------------


if given is not None:  # hypothesis is installed (a dev dependency)

    @settings(max_examples=50, deadline=None)
    @given(
        rows=st.integers(1, 5),
        cols=st.integers(1, 16),
        seed=st.integers(0, 2**31 - 1),
        lam=st.floats(0.0, 1.0),
        sigma_div=st.floats(0.25, 16.0),
        zero_frac=st.floats(0.0, 1.0),
    )
    def test_property_mean_one_and_masked_zero(rows, cols, seed, lam, sigma_div, zero_frac):
        g = torch.Generator().manual_seed(seed)
        scores = torch.rand(rows, cols, generator=g, dtype=torch.float64) * 2 - 0.3
        scores = scores.masked_fill(torch.rand(rows, cols, generator=g) < zero_frac, 0.0)
        mask = torch.rand(rows, cols, generator=g) < 0.6
        w = mix_importance(scores.masked_fill(~mask, float("nan")), mask, lam, sigma_div)
        assert torch.isfinite(w).all()
        assert (w[~mask] == 0).all()
        assert (w >= 0).all()
        n = mask.sum(1)
        for r in range(rows):
            if n[r] > 0:
                assert float(w[r].sum() / n[r]) == pytest.approx(1.0, abs=1e-12)
            else:
                assert (w[r] == 0).all()
        p = gaussian_prior(mask, sigma_div, dtype=torch.float64)
        assert (p[~mask] == 0).all()
        assert p.sum(1)[n > 0].sub(1).abs().max().item() < 1e-12 if (n > 0).any() else True


# ----------------------------------------------------------------------------------------------------
# device-agnostic, no host sync
# ----------------------------------------------------------------------------------------------------


def test_runs_on_meta_device_so_no_host_sync(monkeypatch):
    """Meta tensors have no data: any .item()/bool()/data-dependent branch would raise."""
    monkeypatch.delenv("TIDPO_CHECK_VALUES", raising=False)
    scores = torch.empty(3, 9, device="meta")
    mask = torch.empty(3, 9, device="meta", dtype=torch.bool)
    for out in (gaussian_prior(mask), mix_importance(scores, mask), normalize_importance(scores, mask)):
        assert out.device.type == "meta" and out.shape == (3, 9) and out.dtype == torch.float32


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_without_sync(monkeypatch):
    monkeypatch.delenv("TIDPO_CHECK_VALUES", raising=False)
    scores, mask = make_case(9, rows=10, cols=50)
    cs, cm = scores.cuda(), mask.cuda()
    torch.cuda.set_sync_debug_mode("error")
    try:
        prior, mixed = gaussian_prior(cm), mix_importance(cs, cm)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.testing.assert_close(prior.cpu(), gaussian_prior(mask))
    torch.testing.assert_close(mixed.cpu(), mix_importance(scores, mask))
