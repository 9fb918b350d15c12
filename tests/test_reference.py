"""The reference itself against independent float64 computations (explicit sums, hand formulas)."""

from __future__ import annotations

import math

import pytest
import torch

from tests.conftest import IGNORE, make_labels, make_logits
from tidpo import reference as R


def explicit_logp(row, label):
    """log p(label) = x[label] - log(sum exp(x - max)) - max, by hand."""
    m = max(row)
    return row[label] - (m + math.log(sum(math.exp(v - m) for v in row)))


def explicit_kl(p_row, q_row):
    def probs(row):
        m = max(row)
        e = [math.exp(v - m) for v in row]
        return [x / sum(e) for x in e]

    p, q = probs(p_row), probs(q_row)
    return sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q, strict=True) if pi > 0)


def test_token_logps_matches_explicit_sums():
    logits = make_logits((3, 4, 7), torch.float64)
    labels = make_labels(3, 4, 7, masked_rows=(1,))
    out = R.token_logps(logits, labels)
    for r in range(3):
        for t in range(4):
            lab = int(labels[r, t])
            want = 0.0 if lab == IGNORE else explicit_logp(logits[r, t].tolist(), lab)
            assert float(out[r, t]) == pytest.approx(want, abs=1e-12)


def test_token_kl_matches_explicit_sums_both_directions():
    p = make_logits((2, 5, 6), torch.float64, seed=1)
    q = make_logits((2, 5, 6), torch.float64, seed=2)
    labels = make_labels(2, 5, 6, seed=3)
    for a, b in ((p, q), (q, p)):
        out = R.token_kl(a, b, labels)
        for r in range(2):
            for t in range(5):
                want = 0.0 if labels[r, t] == IGNORE else explicit_kl(a[r, t].tolist(), b[r, t].tolist())
                assert float(out[r, t]) == pytest.approx(want, abs=1e-12)


def _sums(logits, ref, labels):
    """Per-row sums of log-ratios, computed with explicit loops."""
    out = []
    for r in range(labels.shape[0]):
        s = 0.0
        for t in range(labels.shape[1]):
            lab = int(labels[r, t])
            if lab != IGNORE:
                s += explicit_logp(logits[r, t].tolist(), lab) - float(ref[r, t])
        out.append(s)
    return out


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo"])
def test_dpo_matches_hand_formula(loss_type):
    B, T, V = 2, 5, 6
    logits = make_logits((2 * B, T, V), torch.float64)
    ref = -torch.rand(2 * B, T, dtype=torch.float64)
    labels = make_labels(2 * B, T, V, seed=4)
    beta, eps = 0.3, (0.1 if loss_type == "sigmoid" else 0.0)
    out = R.dpo_loss(logits, labels, ref_logps=ref, beta=beta, loss_type=loss_type, label_smoothing=eps)
    s = _sums(logits, ref, labels)
    if loss_type == "ipo":
        counts = [max(1, int((labels[r] != IGNORE).sum())) for r in range(2 * B)]
        s = [v / c for v, c in zip(s, counts, strict=True)]
    for i in range(B):
        h = s[i] - s[B + i]
        if loss_type == "sigmoid":
            want = -(1 - eps) * math.log(1 / (1 + math.exp(-beta * h))) - eps * math.log(1 / (1 + math.exp(beta * h)))
        elif loss_type == "hinge":
            want = max(0.0, 1 - beta * h)
        else:
            want = (h - 1 / (2 * beta)) ** 2
        assert float(out["losses"][i]) == pytest.approx(want, abs=1e-10)
        assert float(out["chosen_rewards"][i]) == pytest.approx(beta * s[i], abs=1e-10)


def test_tdpo_values_match_hand_formula():
    B, T, V = 2, 4, 5
    pol = make_logits((2 * B, T, V), torch.float64, seed=5)
    ref = make_logits((2 * B, T, V), torch.float64, seed=6)
    labels = make_labels(2 * B, T, V, seed=7)
    ref_lp = R.token_logps(ref, labels)
    m = _sums(pol, ref_lp, labels)
    kl = [sum(explicit_kl(ref[r, t].tolist(), pol[r, t].tolist()) for t in range(T) if labels[r, t] != IGNORE)
          for r in range(2 * B)]
    beta, alpha = 0.2, 0.7
    for variant in (1, 2):
        out = R.tdpo_loss(pol, ref, labels, beta=beta, alpha=alpha, variant=variant)
        for i in range(B):
            coef = 1.0 if variant == 1 else alpha
            z = (m[i] - m[B + i]) - coef * (kl[B + i] - kl[i])
            assert float(out["losses"][i]) == pytest.approx(math.log1p(math.exp(-beta * z)), abs=1e-10)
            assert float(out["chosen_rewards"][i]) == pytest.approx(beta * (m[i] + kl[i]), abs=1e-10)


def test_tdpo2_stop_gradient_on_chosen_kl():
    """TDPO2's gradient w.r.t. chosen logits has no KL part: -beta s(-beta z) * d m_w / d x_w."""
    B, T, V = 1, 3, 4
    pol = make_logits((2 * B, T, V), torch.float64, seed=8).requires_grad_(True)
    ref = make_logits((2 * B, T, V), torch.float64, seed=9)
    labels = torch.tensor([[1, 2, IGNORE], [0, 3, 1]])
    beta = 0.5
    out = R.tdpo_loss(pol, ref, labels, beta=beta, alpha=0.5, variant=2)
    (grad,) = torch.autograd.grad(out["loss"], pol)
    z = float(out["logits"][0].detach())
    coef = -beta / (1 + math.exp(beta * z))
    softmax = torch.softmax(pol.detach()[0], -1)
    for t in range(T):
        want = torch.zeros(V, dtype=torch.float64)
        if labels[0, t] != IGNORE:
            want = -softmax[t].clone()
            want[labels[0, t]] += 1
        torch.testing.assert_close(grad[0, t], coef * want, rtol=1e-10, atol=1e-12)


def test_gradcheck_shows_where_stop_gradients_are():
    """Losses without stop-gradient pass gradcheck; TDPO2 (sg on the chosen KL) must not."""
    B, T, V = 1, 3, 5
    pol = make_logits((2 * B, T, V), torch.float64, seed=10).requires_grad_(True)
    ref = make_logits((2 * B, T, V), torch.float64, seed=11)
    labels = make_labels(2 * B, T, V, ignore_frac=0.0, seed=12)
    w = torch.rand(2 * B, T, dtype=torch.float64) + 0.5
    assert torch.autograd.gradcheck(lambda x: R.token_logps(x, labels), (pol,))
    assert torch.autograd.gradcheck(lambda x: R.token_kl(x, ref, labels), (pol,))
    assert torch.autograd.gradcheck(lambda x: R.token_kl(ref, x, labels), (pol,))
    assert torch.autograd.gradcheck(lambda x: R.dpo_loss(x, labels, ref_logits=ref)["loss"], (pol,))
    assert torch.autograd.gradcheck(lambda x: R.tdpo_loss(x, ref, labels, variant=1)["loss"], (pol,))
    assert torch.autograd.gradcheck(
        lambda x: R.tis_dpo_loss(x, labels, w, ref_logits=ref, token_level=True)["loss"], (pol,))
    assert not torch.autograd.gradcheck(lambda x: R.tdpo_loss(x, ref, labels, variant=2)["loss"], (pol,),
                                        raise_exception=False)


def test_tis_token_level_released_sign_and_direction():
    """Released branch: z = (m_w - m_l) - alpha (K_w - K_l), K = sum w KL(pi || ref)."""
    B, T, V = 1, 4, 6
    pol = make_logits((2 * B, T, V), torch.float64, seed=13)
    ref = make_logits((2 * B, T, V), torch.float64, seed=14)
    labels = make_labels(2 * B, T, V, seed=15, ignore_frac=0.0)
    w = torch.rand(2 * B, T, dtype=torch.float64) + 0.5
    alpha = 0.5
    ref_lp = R.token_logps(ref, labels)
    m = [sum(float(w[r, t]) * (explicit_logp(pol[r, t].tolist(), int(labels[r, t])) - float(ref_lp[r, t]))
             for t in range(T)) for r in range(2)]
    k = [sum(float(w[r, t]) * explicit_kl(pol[r, t].tolist(), ref[r, t].tolist()) for t in range(T))
         for r in range(2)]
    out = R.tis_dpo_loss(pol, labels, w, ref_logits=ref, token_level=True, alpha=alpha)
    assert float(out["logits"][0]) == pytest.approx((m[0] - m[1]) - alpha * (k[0] - k[1]), abs=1e-10)
    k_paper = [sum(float(w[r, t]) * explicit_kl(ref[r, t].tolist(), pol[r, t].tolist()) for t in range(T))
               for r in range(2)]
    out1 = R.tis_dpo_loss(pol, labels, w, ref_logits=ref, token_level=True, kl_form="paper_tdpo1")
    assert float(out1["logits"][0]) == pytest.approx((m[0] - m[1]) - (k_paper[1] - k_paper[0]), abs=1e-10)


def test_packed_triplet_matches_hand_computation():
    a = torch.tensor([[0.0, 1.0, 2.0, 9.0]], dtype=torch.float64)
    a_mask = torch.tensor([[False, True, True, False]])
    b = torch.tensor([[5.0, 0.5, 7.0]], dtype=torch.float64)
    b_mask = torch.tensor([[True, False, True]])
    c = torch.tensor([[3.0, 4.0, -1.0]], dtype=torch.float64)
    c_mask = torch.tensor([[True, True, True]])
    # packed: d = [1, 2], b = [5, 7], c = [3, 4, -1]; pos over 2, neg over 2.
    dist_pos = (1 - 5) ** 2 + (2 - 7) ** 2
    dist_neg = (3 - 1) ** 2 + (4 - 2) ** 2
    out = R.packed_triplet_loss(a, a_mask, b, b_mask, c, c_mask, margin=0.25)
    assert float(out[0]) == pytest.approx(max(0.0, dist_pos - dist_neg + 0.25))
