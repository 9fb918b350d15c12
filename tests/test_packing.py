"""Packed (padding-free) batches give exactly the padded results; segment sums are deterministic."""

from __future__ import annotations

import pytest
import torch

import tidpo
from tests.conftest import IGNORE, make_labels, make_logits
from tidpo import SequencePacking

B, T, V = 3, 8, 41


def _padded():
    policy = make_logits((2 * B, T, V), torch.float64)
    ref = make_logits((2 * B, T, V), torch.float64, seed=1)
    labels = make_labels(2 * B, T, V, prompt=2, seed=2)
    labels[4] = IGNORE  # a rejected response with no valid token
    weights = torch.rand(2 * B, T, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) + 0.5
    return policy, ref, labels, weights


def _pack(rows_order, lengths, *tensors):
    """Concatenate row r[:lengths[r]] of each tensor in ``rows_order``; returns packed tensors + cu_seqlens."""
    packed = [torch.cat([t[r, : lengths[r]] for r in rows_order]) for t in tensors]
    cu = torch.tensor([0] + [lengths[r] for r in rows_order]).cumsum(0)
    return packed, cu


LOSSES = {
    "dpo": lambda p, r, y, w, **k: tidpo.dpo_loss(p, y, ref_logits=r, **k),
    "ipo": lambda p, r, y, w, **k: tidpo.dpo_loss(p, y, ref_logits=r, loss_type="ipo", **k),
    "tdpo1": lambda p, r, y, w, **k: tidpo.tdpo_loss(p, r, y, variant=1, **k),
    "tis": lambda p, r, y, w, **k: tidpo.tis_dpo_loss(p, y, w, ref_logits=r, **k),
    "tis_token_level": lambda p, r, y, w, **k: tidpo.tis_dpo_loss(p, y, w, ref_logits=r, token_level=True, **k),
    "ti_dpo_no_triplet": lambda p, r, y, w, **k: tidpo.ti_dpo_loss(p, r, y, w, gamma=0.0, **k),
}


@pytest.mark.parametrize("order", ["stacked", "interleaved"])
@pytest.mark.parametrize("name", list(LOSSES))
def test_packed_equals_padded(name, order):
    policy, ref, labels, weights = _padded()
    lengths = [T - (r % 3) for r in range(2 * B)]  # unequal lengths, trailing padding dropped
    for r, n in enumerate(lengths):
        labels[r, n:] = IGNORE
    rows = list(range(2 * B)) if order == "stacked" else [i for b in range(B) for i in (b, B + b)]
    policy = policy.requires_grad_(True)
    padded = LOSSES[name](policy, ref, labels, weights)
    (p_packed, r_packed, y_packed, w_packed), cu = _pack(rows, lengths, policy, ref, labels, weights)
    packing = SequencePacking.from_cu_seqlens(cu, int(cu[-1]), pair_order=order)
    packed = LOSSES[name](p_packed.unsqueeze(0), r_packed.unsqueeze(0), y_packed.unsqueeze(0),
                          w_packed.unsqueeze(0), packing=SequencePacking(packing.segment_ids.unsqueeze(0), B, order))
    torch.testing.assert_close(packed.losses, padded.losses, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(packed.chosen_rewards, padded.chosen_rewards, rtol=1e-12, atol=1e-12)
    for key, value in padded.metrics.items():
        torch.testing.assert_close(packed.metrics[key], value, rtol=1e-12, atol=1e-12, msg=key)
    g_padded = torch.autograd.grad(padded.loss, policy)[0]
    g_packed = torch.autograd.grad(packed.loss, policy)[0]
    torch.testing.assert_close(g_packed, g_padded, rtol=1e-12, atol=1e-12)


def test_packed_ti_dpo_triplet_equals_padded():
    policy, ref, labels, weights = _padded()
    policy = policy.requires_grad_(True)
    anchor = tidpo.TripletAnchor(make_logits((B, 5, V), torch.float64, seed=9), make_labels(B, 5, V, seed=10),
                                 ref_logits=make_logits((B, 5, V), torch.float64, seed=11))
    padded = tidpo.ti_dpo_loss(policy, ref, labels, weights, anchor=anchor, gamma=0.5)
    (p_packed, r_packed, y_packed, w_packed), cu = _pack(range(2 * B), [T] * (2 * B), policy, ref, labels, weights)
    packed = tidpo.ti_dpo_loss(p_packed, r_packed, y_packed, w_packed, anchor=anchor, gamma=0.5,
                               packing=SequencePacking.from_cu_seqlens(cu, int(cu[-1])))
    torch.testing.assert_close(packed.losses, padded.losses, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(packed.metrics["triplet/loss"], padded.metrics["triplet/loss"])
    torch.testing.assert_close(torch.autograd.grad(packed.loss, policy)[0],
                               torch.autograd.grad(padded.loss, policy)[0], rtol=1e-12, atol=1e-12)


def test_segment_reduction_is_bitwise_deterministic():
    policy, ref, labels, weights = _padded()
    (p_packed, r_packed, y_packed, w_packed), cu = _pack(range(2 * B), [T] * (2 * B), policy.float(),
                                                        ref.float(), labels, weights.float())
    p_packed.requires_grad_(True)
    packing = SequencePacking.from_cu_seqlens(cu, int(cu[-1]))
    runs = []
    for _ in range(2):
        out = tidpo.tis_dpo_loss(p_packed, y_packed, w_packed, ref_logits=r_packed, packing=packing)
        runs.append((out.losses.detach(), torch.autograd.grad(out.loss, p_packed)[0]))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


def test_from_cu_seqlens_segment_ids():
    packing = SequencePacking.from_cu_seqlens(torch.tensor([0, 2, 2, 5, 6]), 6)
    assert packing.segment_ids.tolist() == [0, 0, 2, 2, 2, 3] and packing.num_pairs == 2
    inter = SequencePacking(torch.tensor([0, 1, 2, 3]), 2, "interleaved")
    assert inter.stacked_segment_ids().tolist() == [0, 2, 1, 3]


@pytest.mark.parametrize("make,error,match", [
    (lambda y: SequencePacking.from_cu_seqlens(torch.tensor([0, 3, 6]).float(), 6), ValueError, "cu_seqlens"),
    (lambda y: SequencePacking.from_cu_seqlens(torch.tensor([0, 3, 6, 9]), 9), ValueError, "even number"),
    (lambda y: SequencePacking.from_cu_seqlens(torch.tensor([0, 3, 6]), 7), ValueError, "end at num_tokens=7"),
    (lambda y: SequencePacking.from_cu_seqlens(torch.tensor([0, 4, 3]), 3), ValueError, "non-decreasing"),
])
def test_bad_cu_seqlens(make, error, match):
    with pytest.raises(error, match=match):
        make(None)


@pytest.mark.parametrize("packing,error,match", [
    ((torch.zeros(6, dtype=torch.long), 1), TypeError, "packing must be a tidpo.SequencePacking"),
    (SequencePacking(torch.zeros(5, dtype=torch.long), 1), ValueError, "packing.segment_ids shape"),
    (SequencePacking(torch.zeros(6), 1), TypeError, "packing.segment_ids must be an integer"),
    (SequencePacking(torch.tensor([0, 0, 1, 1, 2, 2]), 1), ValueError, r"in \[0, 2B\) = \[0, 2\)"),
    (SequencePacking(torch.tensor([0, 0, 0, 1, 1, 1]), 0), ValueError, "num_pairs"),
    (SequencePacking(torch.tensor([0, 0, 0, 1, 1, 1]), 1, "zigzag"), ValueError, "pair_order"),
])
def test_bad_packing(packing, error, match):
    logits = torch.randn(6, 7)
    labels = torch.randint(0, 7, (6,))
    with pytest.raises(error, match=match):
        tidpo.dpo_loss(logits, labels, ref_logps=torch.zeros(6), packing=packing)


def test_padded_layout_refuses_two_dim_logits_and_packed_refuses_many_rows():
    with pytest.raises(ValueError, match="or pass packing="):
        tidpo.dpo_loss(torch.randn(6, 7), torch.zeros(6, dtype=torch.long), ref_logps=torch.zeros(6))
    packing = SequencePacking(torch.zeros(2, 3, dtype=torch.long), 1)
    with pytest.raises(ValueError, match=r"packed policy_logits must have shape \[N, V\] or \[1, N, V\]"):
        tidpo.dpo_loss(torch.randn(2, 3, 7), torch.zeros(2, 3, dtype=torch.long), ref_logps=torch.zeros(2, 3),
                       packing=packing)
