"""Every public loss (chunked torch path) against the float64 reference, forward and backward.

Inputs: fp32 / bf16 / fp16 policy logits, strided views (model_logits[:, :-1]), 25 % ignored
positions, a pair whose chosen response is fully masked, chunk sizes that do and do not divide the
number of positions.
"""

from __future__ import annotations

import pytest
import torch

import tidpo
from tests.conftest import assert_rel_close, assert_within_torch_error, make_labels, make_logits
from tidpo import reference as R

B, T, V = 3, 9, 1031
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _inputs(dtype, seed=0):
    full = make_logits((2 * B, T + 1, V), dtype, seed=seed).requires_grad_(True)
    ref_full = make_logits((2 * B, T + 1, V), dtype, seed=seed + 1)
    labels = make_labels(2 * B, T, V, prompt=2, masked_rows=(1,), seed=seed + 2)
    g = torch.Generator().manual_seed(seed + 3)
    weights = torch.rand(2 * B, T, generator=g) * 0.6 + 0.7
    anchor_logits = make_logits((B, T - 2, V), dtype, seed=seed + 4).requires_grad_(True)
    anchor_ref = make_logits((B, T - 2, V), dtype, seed=seed + 5)
    anchor_labels = make_labels(B, T - 2, V, prompt=1, seed=seed + 6)
    return full, ref_full, labels, weights, anchor_logits, anchor_ref, anchor_labels


def _cases():
    """(name, ours(policy, ref, labels, weights, anchor, anchor_ref, anchor_labels, chunk), reference(...))."""
    yield ("dpo_sigmoid",
           lambda p, r, y, w, a, ar, al, c: tidpo.dpo_loss(p, y, ref_logits=r, beta=0.1, chunk_size=c),
           lambda p, r, y, w, a, ar, al: R.dpo_loss(p, y, ref_logits=r, beta=0.1))
    yield ("dpo_ipo",
           lambda p, r, y, w, a, ar, al, c: tidpo.dpo_loss(p, y, ref_logits=r, beta=0.5, loss_type="ipo", chunk_size=c),
           lambda p, r, y, w, a, ar, al: R.dpo_loss(p, y, ref_logits=r, beta=0.5, loss_type="ipo"))
    yield ("dpo_hinge",
           lambda p, r, y, w, a, ar, al, c: tidpo.dpo_loss(p, y, ref_logits=r, beta=0.05, loss_type="hinge",
                                                           chunk_size=c),
           lambda p, r, y, w, a, ar, al: R.dpo_loss(p, y, ref_logits=r, beta=0.05, loss_type="hinge"))
    for variant in (1, 2):
        yield (f"tdpo{variant}",
               lambda p, r, y, w, a, ar, al, c, v=variant: tidpo.tdpo_loss(p, r, y, variant=v, chunk_size=c),
               lambda p, r, y, w, a, ar, al, v=variant: R.tdpo_loss(p, r, y, variant=v))
    for token_level, kl_form in ((False, "released"), (True, "released"), (True, "paper_tdpo1"),
                                 (True, "paper_tdpo2")):
        yield (f"tis_{token_level}_{kl_form}",
               lambda p, r, y, w, a, ar, al, c, t=token_level, k=kl_form: tidpo.tis_dpo_loss(
                   p, y, w, ref_logits=r, token_level=t, kl_form=k, chunk_size=c),
               lambda p, r, y, w, a, ar, al, t=token_level, k=kl_form: R.tis_dpo_loss(
                   p, y, w, ref_logits=r, token_level=t, kl_form=k))
    yield ("ti_dpo",
           lambda p, r, y, w, a, ar, al, c: tidpo.ti_dpo_loss(
               p, r, y, w, gamma=0.3, triplet_margin=0.01, kl_coef=0.05,
               anchor=tidpo.TripletAnchor(a, al, ref_logits=ar), chunk_size=c),
           lambda p, r, y, w, a, ar, al: R.ti_dpo_loss(
               p, r, y, w, gamma=0.3, triplet_margin=0.01, kl_coef=0.05, anchor_logits=a, anchor_labels=al,
               anchor_ref_logits=ar))


CASES = list(_cases())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name,ours_fn,ref_fn", CASES, ids=[c[0] for c in CASES])
def test_loss_matches_reference(name, ours_fn, ref_fn, dtype):
    full, ref_full, labels, weights, a, ar, al = _inputs(dtype)
    chunk = 4  # does not divide T = 9
    out = ours_fn(full[:, :-1], ref_full[:, :-1], labels, weights, a, ar, al, chunk)
    grads = torch.autograd.grad(out.loss, (full, a), allow_unused=True)

    def run_reference(cast):
        f = full.detach().to(cast).requires_grad_(True) if cast else full.detach().clone().requires_grad_(True)
        aa = a.detach().to(cast).requires_grad_(True) if cast else a.detach().clone().requires_grad_(True)
        rr, arr = (ref_full.to(cast), ar.to(cast)) if cast else (ref_full, ar)
        w = weights.to(cast) if cast else weights
        res = ref_fn(f[:, :-1], rr[:, :-1], labels, w, aa, arr, al)
        return res, torch.autograd.grad(res["loss"], (f, aa), allow_unused=True)

    truth, truth_grads = run_reference(torch.float64)
    base, base_grads = run_reference(None)

    assert out.loss.dtype == torch.float32
    assert_rel_close(out.losses, truth["losses"], 1e-5, f"{name} losses")
    assert_rel_close(out.chosen_rewards, truth["chosen_rewards"], 1e-5, f"{name} chosen rewards")
    assert_rel_close(out.rejected_rewards, truth["rejected_rewards"], 1e-5, f"{name} rejected rewards")
    assert_within_torch_error(out.loss, truth["loss"], base["loss"], atol=1e-6, what=f"{name} loss")
    for ours_g, truth_g, base_g, label in zip(grads, truth_grads, base_grads, ("policy", "anchor"), strict=True):
        if truth_g is None:
            assert ours_g is None or torch.all(ours_g == 0)
            continue
        assert ours_g.dtype == dtype
        assert_within_torch_error(ours_g, truth_g, base_g, atol=1e-7, what=f"{name} d{label}")


@pytest.mark.parametrize("name,ours_fn,ref_fn", CASES, ids=[c[0] for c in CASES])
def test_chunk_size_does_not_change_the_result(name, ours_fn, ref_fn):
    full, ref_full, labels, weights, a, ar, al = _inputs(torch.float32, seed=10)
    outs = []
    for chunk in (1, 3, 9, 10_000):
        out = ours_fn(full[:, :-1], ref_full[:, :-1], labels, weights, a, ar, al, chunk)
        outs.append((out.loss.detach(), torch.autograd.grad(out.loss, full)[0]))
    for loss, grad in outs[1:]:
        torch.testing.assert_close(loss, outs[0][0], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(grad, outs[0][1], rtol=1e-5, atol=1e-8)


def test_precomputed_ref_logps_equal_ref_logits():
    full, ref_full, labels, weights, *_ = _inputs(torch.float32, seed=20)
    ref_logps = tidpo.token_logps(ref_full[:, :-1], labels)
    for fn in (lambda **k: tidpo.dpo_loss(full[:, :-1], labels, **k),
               lambda **k: tidpo.tis_dpo_loss(full[:, :-1], labels, weights, **k)):
        a, b = fn(ref_logits=ref_full[:, :-1]), fn(ref_logps=ref_logps)
        torch.testing.assert_close(a.losses, b.losses)
        torch.testing.assert_close(a.metrics["rewards/margins"], b.metrics["rewards/margins"])


def test_reference_gets_no_gradient():
    full, ref_full, labels, weights, *_ = _inputs(torch.float32, seed=30)
    ref_full = ref_full.requires_grad_(True)
    out = tidpo.tdpo_loss(full[:, :-1], ref_full[:, :-1], labels)
    out.loss.backward()
    assert ref_full.grad is None
    out = tidpo.tis_dpo_loss(full[:, :-1], labels, weights, ref_logits=ref_full[:, :-1], token_level=True)
    out.loss.backward()
    assert ref_full.grad is None


def test_metrics_are_detached_tensors_with_trl_keys():
    full, ref_full, labels, weights, a, ar, al = _inputs(torch.float32, seed=40)
    out = tidpo.ti_dpo_loss(full[:, :-1], ref_full[:, :-1], labels, weights,
                            anchor=tidpo.TripletAnchor(a, al, ref_logits=ar))
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
                "logps/rejected", "kl/chosen", "kl/rejected", "weights/chosen_mean", "triplet/loss"):
        value = out.metrics[key]
        assert isinstance(value, torch.Tensor) and value.dim() == 0 and not value.requires_grad, key
    assert out.losses.shape == (B,) and out.chosen_rewards.shape == (B,)
    accuracy = (out.chosen_rewards > out.rejected_rewards).float().mean()
    assert float(out.metrics["rewards/accuracies"]) == pytest.approx(float(accuracy))
