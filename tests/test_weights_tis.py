"""TIS-DPO weight transforms (tidpo.weights.tis) against straightforward per-row Python references.

The references below loop over rows and valid tokens in plain Python floats (float64) and implement
docs/methods.md §2.4 directly from its text; they share no code with the implementation.
"""

from __future__ import annotations

import math

import pytest
import torch

from tests.conftest import given, settings, st
from tidpo.weights.tis import TRANSFORMS, exp_clamp_weights, tis_dpo_weights, transform_scores

DETERMINISTIC = ("origin", "binary", "threshold", "threshold_and_scale", "rank_based")


# ----------------------------------------------------------------------------------------------------
# independent reference (python loops, float64)
# ----------------------------------------------------------------------------------------------------


def ref_row(vals: list[float], method: str, p: dict) -> list[float]:
    """Weights of one response's valid tokens, in their order, from docs/methods.md §2.4."""
    n = len(vals)
    if method == "origin":
        return list(vals)
    if method == "binary":
        k = math.ceil(n * p.get("top_percent", 100.0) / 100)
        top = sorted(range(n), key=lambda i: (-vals[i], i))[:k]
        return [1.0 if i in top else 0.0 for i in range(n)]
    if method == "threshold":
        lo, hi = p.get("lower", -1.0), p.get("upper", 1.0)
        return [min(max(v, lo), hi) for v in vals]
    if method == "threshold_and_scale":
        lo, hi = p.get("min_val", -1.5), p.get("max_val", 1.5)
        a, b = p.get("min_scale", 0.7), p.get("max_scale", 1.3)
        return [a + (min(max(v, lo), hi) - lo) / (hi - lo) * (b - a) for v in vals]
    if method == "rank_based":
        a, b = p.get("min_scale", 0.7), p.get("max_scale", 1.3)
        if n == 1:
            return [1.0]
        out = [0.0] * n
        for rank, i in enumerate(sorted(range(n), key=lambda i: (vals[i], i))):
            out[i] = a + rank / (n - 1) * (b - a)
        return out
    if method == "exp_clamp":
        k, lo, hi, mu = p.get("k", 1.0), p.get("lower", -0.5), p.get("upper", 1.5), p["mu"]
        return [k * math.exp(mu * min(max(v, lo), hi)) for v in vals]
    raise AssertionError(method)


def ref_weights(scores: torch.Tensor, mask: torch.Tensor, method: str, signs=None, **p) -> torch.Tensor:
    """Apply ref_row to every row; ``signs[r]`` multiplies the row's scores (or is μ for exp_clamp)."""
    rows, cols = scores.shape
    out = [[0.0] * cols for _ in range(rows)]
    for r in range(rows):
        pos = [t for t in range(cols) if bool(mask[r, t])]
        sign = 1.0 if signs is None else signs[r]
        if method == "exp_clamp":
            w = ref_row([float(scores[r, t]) for t in pos], method, {**p, "mu": sign})
        else:
            w = ref_row([sign * float(scores[r, t]) for t in pos], method, p)
        for t, v in zip(pos, w, strict=True):
            out[r][t] = v
    return torch.tensor(out, dtype=torch.float64)


def make_case(seed: int, rows: int = 8, cols: int = 13, dtype=torch.float32, ties: bool = False):
    """Random scores with random non-contiguous masks; row 0 fully masked, row 1 a single token.

    Invalid positions hold NaN, so any leak shows up in the result.
    """
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(rows, cols, generator=g, dtype=torch.float64) * 1.5
    if ties:
        scores = torch.round(scores * 2) / 2  # few distinct values → many ties
    mask = torch.rand(rows, cols, generator=g) < 0.7
    mask[0] = False
    mask[1] = False
    mask[1, 4] = True
    scores = scores.masked_fill(~mask, float("nan")).to(dtype)
    return scores, mask


def assert_matches(got: torch.Tensor, want: torch.Tensor, mask: torch.Tensor, atol: float = 1e-6):
    assert got.shape == want.shape
    assert torch.isfinite(got).all()
    assert (got[~mask] == 0).all(), "invalid positions must be exactly 0"
    torch.testing.assert_close(got.double(), want, atol=atol, rtol=1e-6)


# ----------------------------------------------------------------------------------------------------
# each transform vs the reference
# ----------------------------------------------------------------------------------------------------

PARAMS = {
    "origin": [{}],
    "binary": [{}, {"top_percent": 30.0}, {"top_percent": 50}, {"top_percent": 1e-3}],
    "threshold": [{}, {"lower": -0.3, "upper": 0.8}],
    "threshold_and_scale": [{}, {"min_val": -2.0, "max_val": 1.8, "min_scale": 0.5, "max_scale": 1.5}],
    "rank_based": [{}, {"min_scale": 0.6, "max_scale": 1.4}, {"min_scale": 1.0, "max_scale": 1.0}],
}
CASES = [(m, p) for m, ps in PARAMS.items() for p in ps]


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize(("method", "params"), CASES)
def test_transform_matches_reference(method, params, ties):
    for seed in range(3):
        scores, mask = make_case(seed, ties=ties)
        got = transform_scores(scores, mask, method, **params)
        assert got.dtype == torch.float32
        assert_matches(got, ref_weights(scores, mask, method, **params), mask)


@pytest.mark.parametrize("method", DETERMINISTIC)
def test_transform_float64_matches_reference_tightly(method):
    scores, mask = make_case(7, rows=6, cols=31, dtype=torch.float64)
    got = transform_scores(scores, mask, method)
    assert got.dtype == torch.float64
    assert_matches(got, ref_weights(scores, mask, method), mask, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_scores_give_float32(dtype):
    scores, mask = make_case(3, dtype=dtype)
    got = transform_scores(scores, mask, "rank_based")
    assert got.dtype == torch.float32
    assert_matches(got, ref_weights(scores.double(), mask, "rank_based"), mask)


def test_all_masked_row_and_single_token_row():
    scores = torch.tensor([[0.5, -2.0, 3.0], [9.0, 9.0, 9.0]])
    mask = torch.tensor([[False, False, False], [False, True, False]])
    for method in DETERMINISTIC + ("random",):
        w = transform_scores(scores, mask, method, seed=0)
        assert (w[0] == 0).all()
        assert (w[1, [0, 2]] == 0).all()
    assert transform_scores(scores, mask, "rank_based")[1, 1] == 1.0
    assert transform_scores(scores, mask, "binary", top_percent=1.0)[1, 1] == 1.0


def test_binary_top_percent_100_all_ones_and_30_percent():
    scores, mask = make_case(11, rows=5, cols=20)
    w = transform_scores(scores, mask, "binary")  # default top_percent=100
    assert torch.equal(w, mask.float())
    row = torch.arange(10.0).flip(0).unsqueeze(0)  # 9, 8, ..., 0
    w30 = transform_scores(row, torch.ones_like(row, dtype=torch.bool), "binary", top_percent=30.0)
    assert w30.tolist() == [[1.0, 1.0, 1.0] + [0.0] * 7]
    # 7 tokens × 30 % = 2.1 → ceil → 3 selected
    w7 = transform_scores(row[:, :7], torch.ones(1, 7, dtype=torch.bool), "binary", top_percent=30.0)
    assert w7.sum() == 3


def test_binary_ties_prefer_lower_position():
    scores = torch.tensor([[1.0, 2.0, 2.0, 0.0, 2.0]])
    mask = torch.ones_like(scores, dtype=torch.bool)
    w = transform_scores(scores, mask, "binary", top_percent=40.0)  # ceil(5·0.4) = 2
    assert w.tolist() == [[0.0, 1.0, 1.0, 0.0, 0.0]]


def test_rank_based_ties_broken_by_position():
    scores = torch.tensor([[1.0, 1.0, 0.0, 1.0, float("nan")]])
    mask = torch.tensor([[True, True, True, True, False]])
    w = transform_scores(scores, mask, "rank_based")
    want = torch.tensor([[0.7 + 0.6 / 3, 0.7 + 1.2 / 3, 0.7, 1.3, 0.0]])
    torch.testing.assert_close(w, want)


def test_rank_based_non_contiguous_mask_ignores_gaps():
    scores = torch.tensor([[5.0, 100.0, -3.0, -100.0, 0.0]])
    mask = torch.tensor([[True, False, True, False, True]])
    w = transform_scores(scores, mask, "rank_based")
    torch.testing.assert_close(w, torch.tensor([[1.3, 0.0, 0.7, 0.0, 1.0]]))


def test_threshold_and_scale_endpoints():
    scores = torch.tensor([[-1.5, 1.5, -9.0, 9.0, 0.0, 0.75]], dtype=torch.float64)
    mask = torch.ones_like(scores, dtype=torch.bool)
    w = transform_scores(scores, mask, "threshold_and_scale")
    want = torch.tensor([[0.7, 1.3, 0.7, 1.3, 1.0, 1.15]], dtype=torch.float64)
    torch.testing.assert_close(w, want, atol=1e-12, rtol=0)


def test_threshold_clamps_to_bounds():
    scores = torch.tensor([[-3.0, -1.0, 0.25, 1.0, 3.0]])
    w = transform_scores(scores, torch.ones_like(scores, dtype=torch.bool), "threshold")
    assert w.tolist() == [[-1.0, -1.0, 0.25, 1.0, 1.0]]


def test_origin_is_identity_on_valid_tokens():
    scores, mask = make_case(5)
    w = transform_scores(scores, mask, "origin")
    assert torch.equal(w[mask], scores[mask])


# ----------------------------------------------------------------------------------------------------
# random transform
# ----------------------------------------------------------------------------------------------------


def test_random_reproducible_in_range_and_masked():
    scores, mask = make_case(2, rows=16, cols=64)
    a = transform_scores(scores, mask, "random", seed=123)
    b = transform_scores(scores, mask, "random", seed=123)
    c = transform_scores(scores, mask, "random", seed=124)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert (a[~mask] == 0).all()
    valid = a[mask]
    assert (valid >= 0.7).all() and (valid <= 1.3).all()
    assert abs(valid.mean().item() - 1.0) < 0.03  # ~700 draws of U(0.7, 1.3): sd of mean ≈ 0.007
    assert valid.unique().numel() > 0.9 * valid.numel()


def test_random_explicit_generator_and_custom_range():
    scores, mask = make_case(4, rows=4, cols=50)
    g1 = torch.Generator().manual_seed(9)
    g2 = torch.Generator().manual_seed(9)
    a = transform_scores(scores, mask, "random", generator=g1, min_scale=0.2, max_scale=0.4)
    b = transform_scores(scores, mask, "random", generator=g2, min_scale=0.2, max_scale=0.4)
    assert torch.equal(a, b)
    assert (a[mask] >= 0.2).all() and (a[mask] <= 0.4).all()
    # the seed is independent of the scores' values
    assert torch.equal(a, transform_scores(scores * 3, mask, "random", generator=torch.Generator().manual_seed(9),
                                           min_scale=0.2, max_scale=0.4))


# ----------------------------------------------------------------------------------------------------
# garbage at invalid positions, dtypes, gradients, empty shapes
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("garbage", [float("nan"), float("inf"), -float("inf"), 1e30])
@pytest.mark.parametrize("method", DETERMINISTIC + ("random",))
def test_garbage_at_masked_positions_does_not_leak(method, garbage):
    scores, mask = make_case(8)
    clean = scores.masked_fill(~mask, 0.0)
    dirty = scores.masked_fill(~mask, garbage)
    a = transform_scores(clean, mask, method, seed=1)
    b = transform_scores(dirty, mask, method, seed=1)
    assert torch.equal(a, b)
    e1 = exp_clamp_weights(dirty, mask, -1.0)
    assert torch.equal(e1, exp_clamp_weights(clean, mask, -1.0))
    pair = tis_dpo_weights(dirty, mask, "exp_clamp")
    assert torch.equal(pair, tis_dpo_weights(clean, mask, "exp_clamp"))


def test_output_is_detached():
    scores = torch.randn(4, 6, requires_grad=True)
    mask = torch.ones(4, 6, dtype=torch.bool)
    for method in DETERMINISTIC:
        assert not transform_scores(scores, mask, method).requires_grad
    assert not exp_clamp_weights(scores, mask, 1.0).requires_grad
    assert not tis_dpo_weights(scores, mask, "exp_clamp").requires_grad


@pytest.mark.parametrize("shape", [(0, 5), (3, 0)])
def test_empty_shapes(shape):
    scores = torch.zeros(shape)
    mask = torch.zeros(shape, dtype=torch.bool)
    for method in DETERMINISTIC + ("random",):
        assert transform_scores(scores, mask, method, seed=0).shape == shape


# ----------------------------------------------------------------------------------------------------
# exp_clamp (paper form)
# ----------------------------------------------------------------------------------------------------


def test_exp_clamp_matches_reference_and_ranges():
    rhat, mask = make_case(12, rows=6, cols=40)
    rhat = rhat * 2  # spread beyond [L, U]
    for mu in (1.0, -1.0):
        w = exp_clamp_weights(rhat, mask, mu)
        assert_matches(w, ref_weights(rhat, mask, "exp_clamp", signs=[mu] * 6), mask)
        lo, hi = sorted((math.exp(mu * -0.5), math.exp(mu * 1.5)))
        assert (w[mask] >= lo - 1e-6).all() and (w[mask] <= hi + 1e-6).all()
        # the range is actually reached at both ends
        assert math.isclose(w[mask].min().item(), lo, rel_tol=1e-6)
        assert math.isclose(w[mask].max().item(), hi, rel_tol=1e-6)
    # μ = +1: chosen weights in [0.61, 4.48]; μ = −1: rejected weights in [0.22, 1.65] (docs/methods.md §2.4)
    assert round(math.exp(-0.5), 2) == 0.61 and round(math.exp(1.5), 2) == 4.48


def test_exp_clamp_per_row_mu_and_params():
    rhat, mask = make_case(13, rows=4, cols=9, dtype=torch.float64)
    mu = torch.tensor([1.0, -1.0, 0.5, -2.0], dtype=torch.float64)
    w = exp_clamp_weights(rhat, mask, mu, k=2.0, lower=-1.0, upper=0.3)
    want = ref_weights(rhat, mask, "exp_clamp", signs=mu.tolist(), k=2.0, lower=-1.0, upper=0.3)
    assert w.dtype == torch.float64
    assert_matches(w, want, mask, atol=1e-12)
    # integer μ tensors are accepted too
    w_int = exp_clamp_weights(rhat, mask, torch.tensor([1, -1, 1, -1]))
    assert_matches(w_int, ref_weights(rhat, mask, "exp_clamp", signs=[1, -1, 1, -1]), mask, atol=1e-12)


# ----------------------------------------------------------------------------------------------------
# stacked pair layout and sign conventions
# ----------------------------------------------------------------------------------------------------


def _swap_halves(x: torch.Tensor) -> torch.Tensor:
    b = x.shape[0] // 2
    return torch.cat([x[b:], x[:b]])


@pytest.mark.parametrize("method", DETERMINISTIC + ("exp_clamp",))
def test_pair_signs_match_reference(method):
    rhat, mask = make_case(21, rows=8, cols=17)
    signs = [1.0] * 4 + [-1.0] * 4  # chosen = transform(+r̂), rejected = transform(−r̂) / μ = ±1
    got = tis_dpo_weights(rhat, mask, method)
    assert_matches(got, ref_weights(rhat, mask, method, signs=signs), mask)


@pytest.mark.parametrize("method", DETERMINISTIC + ("exp_clamp",))
def test_swapping_chosen_and_rejected_flips_signs(method):
    rhat, mask = make_case(22, rows=6, cols=11)
    # rows that move from rejected to chosen (and back) with negated r̂ get the same weights. For
    # exp_clamp this holds only for a symmetric clamp (the clamp acts on the unsigned r̂; μ carries the sign)
    sym = {"lower": -1.0, "upper": 1.0} if method == "exp_clamp" else {}
    w = tis_dpo_weights(rhat, mask, method, **sym)
    w_swapped = tis_dpo_weights(_swap_halves(-rhat), _swap_halves(mask), method, **sym)
    assert torch.equal(w_swapped, _swap_halves(w))
    # and a row moved to the other half without negation is transformed with the other sign
    w_moved = tis_dpo_weights(_swap_halves(rhat), _swap_halves(mask), method)
    signs_moved = [1.0] * 3 + [-1.0] * 3
    assert_matches(w_moved, ref_weights(_swap_halves(rhat), _swap_halves(mask), method, signs=signs_moved),
                   _swap_halves(mask))


def test_pair_rank_based_small_example():
    rhat = torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]])
    mask = torch.ones_like(rhat, dtype=torch.bool)
    w = tis_dpo_weights(rhat, mask)  # default rank_based
    torch.testing.assert_close(w, torch.tensor([[0.7, 1.0, 1.3], [1.3, 1.0, 0.7]]))
    e = tis_dpo_weights(rhat, mask, "exp_clamp")
    torch.testing.assert_close(e[0], torch.exp(torch.tensor([1.0, 1.5, 1.5])))
    torch.testing.assert_close(e[1], torch.exp(-torch.tensor([1.0, 1.5, 1.5])))


def test_pair_params_forwarded_and_random():
    rhat, mask = make_case(23, rows=4, cols=12)
    w = tis_dpo_weights(rhat, mask, "threshold_and_scale", min_scale=0.5, max_scale=1.5, max_val=2.0)
    want = ref_weights(rhat, mask, "threshold_and_scale", signs=[1, 1, -1, -1], min_scale=0.5, max_scale=1.5,
                       max_val=2.0)
    assert_matches(w, want, mask)
    r1 = tis_dpo_weights(rhat, mask, "random", seed=5)
    assert torch.equal(r1, tis_dpo_weights(rhat, mask, "random", seed=5))
    e = tis_dpo_weights(rhat, mask, "exp_clamp", k=2.0, lower=-1.0, upper=1.0)
    assert_matches(e, ref_weights(rhat, mask, "exp_clamp", signs=[1, 1, -1, -1], k=2.0, lower=-1.0, upper=1.0),
                   mask)


def test_transforms_constant():
    assert TRANSFORMS == ("origin", "binary", "threshold", "threshold_and_scale", "rank_based", "random",
                          "exp_clamp")


# ----------------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------------

S = torch.zeros(2, 3)
M = torch.ones(2, 3, dtype=torch.bool)


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"scores": [[0.0]]}, TypeError, "scores"),
        ({"scores": torch.zeros(2, 3, dtype=torch.int64)}, TypeError, "scores"),
        ({"scores": torch.zeros(6)}, ValueError, "scores"),
        ({"mask": torch.ones(2, 3, dtype=torch.int64)}, TypeError, r"mask.*bool"),
        ({"mask": "all"}, TypeError, "mask"),
        ({"mask": torch.ones(2, 4, dtype=torch.bool)}, ValueError, "mask"),
        ({"mask": torch.ones(6, dtype=torch.bool)}, ValueError, "mask"),
        ({"scores": torch.tensor([[0.0, float("nan"), 0.0], [0.0] * 3])}, ValueError, "scores"),
        ({"scores": torch.tensor([[0.0, 0.0, 0.0], [float("inf"), 0.0, 0.0]])}, ValueError, "scores"),
        ({"method": "nope"}, ValueError, r"method.*'origin'.*'rank_based'.*'random'"),
        ({"method": "exp_clamp"}, ValueError, "exp_clamp_weights"),
        ({"method": "binary", "top_percent": 0.0}, ValueError, "top_percent"),
        ({"method": "binary", "top_percent": 100.5}, ValueError, "top_percent"),
        ({"method": "binary", "top_percent": "30"}, TypeError, "top_percent"),
        ({"method": "threshold", "lower": 1.0, "upper": -1.0}, ValueError, "lower"),
        ({"method": "threshold", "upper": float("nan")}, ValueError, "upper"),
        ({"method": "threshold_and_scale", "min_val": 1.0, "max_val": 1.0}, ValueError, "min_val"),
        ({"method": "threshold_and_scale", "min_scale": 1.4}, ValueError, "min_scale"),
        ({"method": "rank_based", "min_scale": 1.4, "max_scale": 1.3}, ValueError, "min_scale"),
        ({"method": "random", "min_scale": 2.0}, ValueError, "min_scale"),
        ({"method": "random", "seed": 1, "generator": torch.Generator()}, ValueError, "seed"),
        ({"method": "random", "seed": 1.5}, TypeError, "seed"),
        ({"method": "random", "generator": 3}, TypeError, "generator"),
    ],
)
def test_transform_scores_validation(kwargs, exc, match):
    args = {"scores": S, "mask": M, **kwargs}
    with pytest.raises(exc, match=match):
        transform_scores(**args)


def test_nan_at_masked_position_is_not_an_error():
    scores = torch.tensor([[0.0, float("nan")]])
    w = transform_scores(scores, torch.tensor([[True, False]]), "origin")
    assert w.tolist() == [[0.0, 0.0]]


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"rhat": torch.zeros(2, 3, dtype=torch.int32)}, TypeError, "rhat"),
        ({"rhat": torch.full((2, 3), float("nan"))}, ValueError, "rhat"),
        ({"mask": torch.ones(2, 3, dtype=torch.uint8)}, TypeError, "mask"),
        ({"mu": torch.ones(3)}, ValueError, "mu"),
        ({"mu": torch.ones(2, dtype=torch.bool)}, TypeError, "mu"),
        ({"mu": "plus"}, TypeError, "mu"),
        ({"mu": float("inf")}, ValueError, "mu"),
        ({"k": 0.0}, ValueError, "k"),
        ({"lower": 2.0}, ValueError, "lower"),
    ],
)
def test_exp_clamp_weights_validation(kwargs, exc, match):
    args = {"rhat": S, "mask": M, "mu": 1.0, **kwargs}
    with pytest.raises(exc, match=match):
        exp_clamp_weights(**args)


@pytest.mark.parametrize(
    ("args", "kwargs", "exc", "match"),
    [
        ((torch.zeros(3, 4), torch.ones(3, 4, dtype=torch.bool)), {}, ValueError, r"rhat.*even"),
        ((torch.zeros(0, 4), torch.ones(0, 4, dtype=torch.bool)), {}, ValueError, "rhat"),
        ((S, M), {"method": "bogus"}, ValueError, r"method.*'exp_clamp'"),
        ((S, M), {"method": "rank_based", "k": 2.0}, TypeError, "k"),
        ((S, M), {"method": "exp_clamp", "top_percent": 3.0}, TypeError, "top_percent"),
        ((S, M), {"method": "exp_clamp", "k": -1.0}, ValueError, "k"),
        ((S, M), {"method": "rank_based", "min_scale": 3.0}, ValueError, "min_scale"),
        ((torch.tensor([[0.0, 1.0, 2.0], [0.0, float("inf"), 0.0]]), M), {}, ValueError, "rhat"),
        ((S, torch.ones(2, 3)), {}, TypeError, "mask"),
    ],
)
def test_tis_dpo_weights_validation(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        tis_dpo_weights(*args, **kwargs)


# ----------------------------------------------------------------------------------------------------
# property test
# ----------------------------------------------------------------------------------------------------


if given is not None:  # hypothesis is installed (a dev dependency)

    @settings(max_examples=50, deadline=None)
    @given(
        rows=st.integers(1, 5),
        cols=st.integers(1, 12),
        seed=st.integers(0, 2**31 - 1),
        method=st.sampled_from(DETERMINISTIC),
    )
    def test_property_masked_zero_and_rank_permutation(rows, cols, seed, method):
        g = torch.Generator().manual_seed(seed)
        scores = torch.round(torch.randn(rows, cols, generator=g) * 4) / 4
        mask = torch.rand(rows, cols, generator=g) < 0.6
        w = transform_scores(scores.masked_fill(~mask, float("nan")), mask, method)
        assert torch.isfinite(w).all()
        assert (w[~mask] == 0).all()
        if method == "rank_based":
            for r in range(rows):
                n = int(mask[r].sum())
                got = sorted(w[r][mask[r]].tolist())
                want = [1.0] if n == 1 else [0.7 + i / (n - 1) * 0.6 for i in range(n)]
                assert got == pytest.approx(want, abs=1e-6)


# ----------------------------------------------------------------------------------------------------
# device-agnostic, no host sync
# ----------------------------------------------------------------------------------------------------


def test_runs_on_meta_device_so_no_host_sync(monkeypatch):
    """Meta tensors have no data: any .item()/bool()/data-dependent branch would raise."""
    monkeypatch.delenv("TIDPO_CHECK_VALUES", raising=False)
    scores = torch.empty(4, 7, device="meta")
    mask = torch.empty(4, 7, device="meta", dtype=torch.bool)
    for method in DETERMINISTIC + ("random",):
        w = transform_scores(scores, mask, method)
        assert w.device.type == "meta" and w.shape == (4, 7) and w.dtype == torch.float32
    for method in TRANSFORMS:
        assert tis_dpo_weights(scores, mask, method).device.type == "meta"
    assert exp_clamp_weights(scores, mask, torch.ones(4, device="meta")).device.type == "meta"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_without_sync(monkeypatch):
    monkeypatch.delenv("TIDPO_CHECK_VALUES", raising=False)
    scores, mask = make_case(31, rows=10, cols=50)
    cs, cm = scores.cuda(), mask.cuda()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = {m: transform_scores(cs, cm, m, top_percent=30.0) for m in DETERMINISTIC}
        pair = {m: tis_dpo_weights(cs, cm, m) for m in TRANSFORMS if m != "random"}
        rnd = transform_scores(cs, cm, "random", seed=0)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for m, w in got.items():
        torch.testing.assert_close(w.cpu(), transform_scores(scores, mask, m, top_percent=30.0))
    for m, w in pair.items():
        torch.testing.assert_close(w.cpu(), tis_dpo_weights(scores, mask, m))
    assert rnd.device.type == "cuda" and (rnd.cpu()[~mask] == 0).all()
