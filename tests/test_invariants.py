"""Properties that tie the losses together (checked on the public chunked path, float64)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import tidpo
from tests.conftest import make_labels, make_logits

B, T, V = 3, 7, 53


@pytest.fixture
def batch():
    policy = make_logits((2 * B, T, V), torch.float64).requires_grad_(True)
    ref = make_logits((2 * B, T, V), torch.float64, seed=1)
    labels = make_labels(2 * B, T, V, prompt=2, seed=2)
    weights = torch.rand(2 * B, T, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) + 0.5
    return policy, ref, labels, weights


def _grad(loss, x):
    return torch.autograd.grad(loss, x)[0]


def test_tis_dpo_with_unit_weights_is_dpo(batch):
    policy, ref, labels, _ = batch
    ones = torch.ones(labels.shape, dtype=torch.float64)
    tis = tidpo.tis_dpo_loss(policy, labels, ones, ref_logits=ref, beta=0.2)
    dpo = tidpo.dpo_loss(policy, labels, ref_logits=ref, beta=0.2)
    torch.testing.assert_close(tis.losses, dpo.losses, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(tis.chosen_rewards, dpo.chosen_rewards, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(_grad(tis.loss, policy), _grad(dpo.loss, policy), rtol=1e-12, atol=1e-12)


def test_ti_dpo_without_triplet_and_unit_weights_is_tdpo2(batch):
    policy, ref, labels, _ = batch
    ones = torch.ones(labels.shape, dtype=torch.float64)
    ti = tidpo.ti_dpo_loss(policy, ref, labels, ones, gamma=0.0, beta=0.3, alpha=0.4)
    tdpo = tidpo.tdpo_loss(policy, ref, labels, beta=0.3, alpha=0.4, variant=2)
    torch.testing.assert_close(ti.losses, tdpo.losses, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(_grad(ti.loss, policy), _grad(tdpo.loss, policy), rtol=1e-12, atol=1e-12)


def _swap(x):
    return torch.cat([x[B:], x[:B]])


@pytest.mark.parametrize("which", ["dpo", "tis", "tis_token_level", "tdpo1"])
def test_swapping_chosen_and_rejected_flips_the_margin(batch, which):
    policy, ref, labels, weights = batch
    beta = 0.1

    def run(p, r, y, w):
        if which == "dpo":
            return tidpo.dpo_loss(p, y, ref_logits=r, beta=beta)
        if which == "tdpo1":
            return tidpo.tdpo_loss(p, r, y, beta=beta, variant=1)
        return tidpo.tis_dpo_loss(p, y, w, ref_logits=r, beta=beta, token_level=which == "tis_token_level")

    out = run(policy, ref, labels, weights)
    swapped = run(_swap(policy), _swap(ref), _swap(labels), _swap(weights))
    # loss(z) - loss(-z) = -beta z for the sigmoid loss: the pre-sigmoid margin z flipped sign.
    z = (swapped.losses - out.losses) / beta
    torch.testing.assert_close(F.logsigmoid(beta * z) - F.logsigmoid(-beta * z), beta * z)
    torch.testing.assert_close(-F.logsigmoid(-beta * z), swapped.losses, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(swapped.chosen_rewards, out.rejected_rewards, rtol=1e-12, atol=1e-12)


def test_scaling_weights_scales_the_weighted_margin(batch):
    policy, ref, labels, weights = batch
    beta = 0.1
    base = tidpo.tis_dpo_loss(policy, labels, weights, ref_logits=ref, beta=beta)
    for c in (0.5, 2.0, 3.7):
        scaled = tidpo.tis_dpo_loss(policy, labels, c * weights, ref_logits=ref, beta=beta)
        torch.testing.assert_close(scaled.chosen_rewards - scaled.rejected_rewards,
                                   c * (base.chosen_rewards - base.rejected_rewards), rtol=1e-10, atol=1e-12)


def test_weights_at_ignored_positions_are_not_used(batch):
    policy, ref, labels, weights = batch
    noisy = weights.clone()
    noisy[labels == -100] = 1e6
    a = tidpo.tis_dpo_loss(policy, labels, weights, ref_logits=ref)
    b = tidpo.tis_dpo_loss(policy, labels, noisy, ref_logits=ref)
    torch.testing.assert_close(a.losses, b.losses, rtol=0, atol=0)


def _empty_pair_batch():
    policy = make_logits((4, 5, 11), torch.float64).requires_grad_(True)
    ref = make_logits((4, 5, 11), torch.float64, seed=1)
    labels = make_labels(4, 5, 11, ignore_frac=0.0, seed=2)
    labels[0] = -100  # pair 0: chosen and rejected both empty
    labels[2] = -100
    weights = torch.ones(4, 5, dtype=torch.float64)
    anchor = tidpo.TripletAnchor(make_logits((2, 4, 11), torch.float64, seed=3).requires_grad_(True),
                                 torch.full((2, 4), -100), ref_logps=torch.zeros(2, 4, dtype=torch.float64))
    return policy, ref, labels, weights, anchor


@pytest.mark.parametrize("name,expected", [
    ("sigmoid", torch.log(torch.tensor(2.0, dtype=torch.float64))),
    ("hinge", torch.tensor(1.0, dtype=torch.float64)),
    ("ipo", torch.tensor(1 / (4 * 0.1**2), dtype=torch.float64)),
    ("tdpo2", torch.log(torch.tensor(2.0, dtype=torch.float64))),
    ("tis", torch.log(torch.tensor(2.0, dtype=torch.float64))),
    ("ti", torch.log(torch.tensor(2.0, dtype=torch.float64)) + 0.1 * 1e-3),
])
def test_pair_without_valid_tokens_has_documented_finite_loss_and_zero_grad(name, expected):
    policy, ref, labels, weights, anchor = _empty_pair_batch()
    if name in ("sigmoid", "hinge", "ipo"):
        out = tidpo.dpo_loss(policy, labels, ref_logits=ref, loss_type=name, beta=0.1)
    elif name == "tdpo2":
        out = tidpo.tdpo_loss(policy, ref, labels)
    elif name == "tis":
        out = tidpo.tis_dpo_loss(policy, labels, weights, ref_logits=ref, token_level=True)
    else:
        out = tidpo.ti_dpo_loss(policy, ref, labels, weights, anchor=anchor, gamma=0.1, triplet_margin=1e-3)
    assert torch.isfinite(out.losses).all()
    torch.testing.assert_close(out.losses[0], expected, rtol=1e-12, atol=1e-12)
    grad = _grad(out.loss, policy)
    assert torch.isfinite(grad).all()
    assert torch.all(grad[0] == 0) and torch.all(grad[2] == 0)
    assert grad[1].abs().sum() > 0, "the other pair still learns"
