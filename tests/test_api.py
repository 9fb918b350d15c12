"""Public API: module wrappers equal the functions, the README snippet runs, triplet packing."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import tidpo
from tests.conftest import make_labels, make_logits
from tidpo import reference as R
from tidpo.losses.triplet import pack_valid, triplet_loss

ROOT = Path(__file__).resolve().parents[1]


def test_public_names():
    for name in ("token_logps", "token_kl", "dpo_loss", "tdpo_loss", "tis_dpo_loss", "ti_dpo_loss",
                 "PreferenceLossOutput", "TripletAnchor", "DPOLoss", "TDPOLoss", "TISDPOLoss", "TIDPOLoss"):
        assert name in tidpo.__all__ and hasattr(tidpo, name)


def test_readme_snippet_runs():
    """The first python block of the README's "Use in your own loop" section runs as written."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Use in your own loop", 1)
    assert len(section) == 2, "README has no 'Use in your own loop' section"
    snippets = re.findall(r"```python\n(.*?)```", section[1], flags=re.S)
    assert snippets, "README has no python snippet in 'Use in your own loop'"
    namespace: dict = {}
    exec(compile(snippets[0], "README.md", "exec"), namespace)  # noqa: S102 - our own documentation
    out = namespace["out"]
    assert isinstance(out, tidpo.PreferenceLossOutput) and torch.isfinite(out.loss)
    assert namespace["model_logits"].grad is not None


def test_modules_equal_functions():
    policy = make_logits((4, 5, 13), torch.float64)
    ref = make_logits((4, 5, 13), torch.float64, seed=1)
    labels = make_labels(4, 5, 13, seed=2)
    w = torch.rand(4, 5, dtype=torch.float64) + 0.5
    anchor = tidpo.TripletAnchor(make_logits((2, 3, 13), torch.float64, seed=3), make_labels(2, 3, 13, seed=4),
                                 ref_logits=make_logits((2, 3, 13), torch.float64, seed=5))
    pairs = [
        (tidpo.DPOLoss(beta=0.2, loss_type="ipo")(policy, labels, ref_logits=ref),
         tidpo.dpo_loss(policy, labels, ref_logits=ref, beta=0.2, loss_type="ipo")),
        (tidpo.TDPOLoss(alpha=0.3, variant=1)(policy, ref, labels), tidpo.tdpo_loss(policy, ref, labels, alpha=0.3,
                                                                                   variant=1)),
        (tidpo.TISDPOLoss(token_level=True)(policy, labels, w, ref_logits=ref),
         tidpo.tis_dpo_loss(policy, labels, w, ref_logits=ref, token_level=True)),
        (tidpo.TIDPOLoss(gamma=0.5)(policy, ref, labels, w, anchor=anchor),
         tidpo.ti_dpo_loss(policy, ref, labels, w, gamma=0.5, anchor=anchor)),
    ]
    for module_out, fn_out in pairs:
        torch.testing.assert_close(module_out.losses, fn_out.losses, rtol=0, atol=0)
    assert "loss_type='ipo'" in repr(tidpo.DPOLoss(loss_type="ipo"))


def test_pack_valid_moves_valid_entries_to_the_front():
    values = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]])
    mask = torch.tensor([[False, True, False, True], [True, True, True, False]])
    packed, lengths = pack_valid(values, mask, width=5)
    torch.testing.assert_close(packed, torch.tensor([[2.0, 4.0, 0, 0, 0], [5.0, 6.0, 7.0, 0, 0]]))
    assert lengths.tolist() == [2, 3]


@pytest.mark.parametrize("seed", range(5))
def test_triplet_matches_reference_loop_for_unequal_lengths(seed):
    g = torch.Generator().manual_seed(seed)
    B = 4
    widths = (3 + seed, 6, 5 + seed % 3)
    tensors = [torch.randn(B, w, dtype=torch.float64, generator=g, requires_grad=True) for w in widths]
    masks = [torch.rand(B, w, generator=g) < 0.7 for w in widths]
    masks[0][0] = False  # an empty anchor
    args = [x for pair in zip(tensors, masks, strict=True) for x in pair]
    ours = triplet_loss(*args, margin=0.5)
    truth = R.packed_triplet_loss(*args, margin=0.5)
    torch.testing.assert_close(ours, truth, rtol=1e-12, atol=1e-12)
    grads = torch.autograd.grad(ours.sum(), tensors)
    truth_grads = torch.autograd.grad(truth.sum(), tensors)
    for a, b in zip(grads, truth_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert float(ours[0].detach()) == pytest.approx(0.5)
