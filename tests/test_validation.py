"""Every documented input error is raised, with the offending argument named in the message."""

from __future__ import annotations

import importlib
import sys

import pytest
import torch

import tidpo
from tidpo.ops import backend as backend_module
from tidpo.ops.backend import resolve_backend, triton_kernels_available

B, T, V = 2, 4, 9


def _ok():
    policy = torch.randn(2 * B, T, V, requires_grad=True)
    ref = torch.randn(2 * B, T, V)
    labels = torch.randint(0, V, (2 * B, T))
    labels[:, 0] = -100
    weights = torch.ones(2 * B, T)
    return policy, ref, labels, weights


def test_valid_inputs_pass():
    policy, ref, labels, weights = _ok()
    tidpo.tis_dpo_loss(policy, labels, weights, ref_logits=ref).loss.backward()


@pytest.mark.parametrize("call,error,match", [
    (lambda p, r, y, w: tidpo.token_logps(p.long(), y), TypeError, "logits must be a floating-point"),
    (lambda p, r, y, w: tidpo.token_logps("x", y), TypeError, "logits must be a torch.Tensor"),
    (lambda p, r, y, w: tidpo.token_logps(p, y.float()), TypeError, "labels must be an integer"),
    (lambda p, r, y, w: tidpo.token_logps(p[..., 0, 0], y[:, 0]), ValueError, r"logits must have shape"),
    (lambda p, r, y, w: tidpo.token_logps(p, y[:, :-1]), ValueError, "labels shape"),
    (lambda p, r, y, w: tidpo.token_kl(p, r[..., :-1], y), ValueError, "q_logits shape"),
    (lambda p, r, y, w: tidpo.dpo_loss(p[:-1], y[:-1], ref_logits=r[:-1]), ValueError, "even, non-zero number"),
    (lambda p, r, y, w: tidpo.dpo_loss(p[0], y[0], ref_logits=r[0]), ValueError, r"\[2B, T, V\]"),
    (lambda p, r, y, w: tidpo.dpo_loss(p, y), ValueError, "ref_logps"),
    (lambda p, r, y, w: tidpo.dpo_loss(p, y, ref_logits=r, ref_logps=y.float()), ValueError, "not both"),
    (lambda p, r, y, w: tidpo.dpo_loss(p, y, ref_logits=r[:, :-1]), ValueError, "ref_logits shape"),
    (lambda p, r, y, w: tidpo.dpo_loss(p, y, ref_logps=w[:, :-1]), ValueError, "ref_logps shape"),
    (lambda p, r, y, w: tidpo.dpo_loss(p, y, ref_logps=y), TypeError, "ref_logps must be a floating-point"),
    (lambda p, r, y, w: tidpo.tis_dpo_loss(p, y, w[:, :-1], ref_logits=r), ValueError, "weights shape"),
    (lambda p, r, y, w: tidpo.tis_dpo_loss(p, y, w.long(), ref_logits=r), TypeError, "weights must be a floating"),
    (lambda p, r, y, w: tidpo.tis_dpo_loss(p, y, w, ref_logps=w, token_level=True), ValueError, "ref_logits is"),
    (lambda p, r, y, w: tidpo.tis_dpo_loss(p, y, w, ref_logits=r, kl_form="paper"), ValueError, "kl_form"),
    (lambda p, r, y, w: tidpo.tis_dpo_loss(p, y, w, ref_logits=r, kl_form="paper_tdpo1"), ValueError,
     "token_level=True"),
    (lambda p, r, y, w: tidpo.ti_dpo_loss(p, r, y, w), ValueError, "anchor is required"),
    (lambda p, r, y, w: tidpo.ti_dpo_loss(p, r, y, w, anchor=(p, y)), TypeError, "TripletAnchor"),
    (lambda p, r, y, w: tidpo.ti_dpo_loss(p, r, y, w, anchor=tidpo.TripletAnchor(p[:B, :, :-1], y[:B])),
     ValueError, "anchor.logits must have shape"),
    (lambda p, r, y, w: tidpo.ti_dpo_loss(p, r, y, w, anchor=tidpo.TripletAnchor(p[:B], y[:B])),
     ValueError, "exactly one of anchor.ref_logps"),
    (lambda p, r, y, w: tidpo.dpo_loss(p, y, ref_logits=r, beta=0), ValueError, r"beta must be in \(0\.0, inf\)"),
    (lambda p, r, y, w: tidpo.dpo_loss(p, y, ref_logits=r, beta=float("nan")), ValueError, "beta"),
    (lambda p, r, y, w: tidpo.dpo_loss(p, y, ref_logits=r, beta="0.1"), TypeError, "beta must be a number"),
    (lambda p, r, y, w: tidpo.dpo_loss(p, y, ref_logits=r, loss_type="kto"), ValueError, "loss_type"),
    (lambda p, r, y, w: tidpo.dpo_loss(p, y, ref_logits=r, label_smoothing=0.7), ValueError, "label_smoothing"),
    (lambda p, r, y, w: tidpo.dpo_loss(p, y, ref_logits=r, loss_type="ipo", label_smoothing=0.1), ValueError,
     "label_smoothing"),
    (lambda p, r, y, w: tidpo.tdpo_loss(p, r, y, alpha=-1), ValueError, "alpha"),
    (lambda p, r, y, w: tidpo.tdpo_loss(p, r, y, variant=3), ValueError, "variant"),
    (lambda p, r, y, w: tidpo.ti_dpo_loss(p, r, y, w, gamma=-0.1), ValueError, "gamma"),
    (lambda p, r, y, w: tidpo.ti_dpo_loss(p, r, y, w, gamma=0, triplet_margin=-1), ValueError, "triplet_margin"),
    (lambda p, r, y, w: tidpo.token_logps(p, y, chunk_size=0), ValueError, "chunk_size"),
    (lambda p, r, y, w: tidpo.token_logps(p, y, backend="cuda"), ValueError, "backend must be one of"),
])
def test_bad_input_raises(call, error, match):
    policy, ref, labels, weights = _ok()
    with pytest.raises(error, match=match):
        call(policy, ref, labels, weights)


@pytest.mark.parametrize("bad", [9, -1, -7, 1000])
def test_labels_out_of_range(bad):
    policy, ref, labels, _ = _ok()
    labels[1, 2] = bad
    with pytest.raises(ValueError, match=rf"labels holds token id {bad} at index \(1, 2\), outside \[0, 9\)"):
        tidpo.dpo_loss(policy, labels, ref_logits=ref)


def test_custom_ignore_index_is_respected():
    policy, ref, labels, _ = _ok()
    labels[:, 0] = -1
    tidpo.dpo_loss(policy, labels, ref_logits=ref, ignore_index=-1)
    with pytest.raises(ValueError, match="labels holds token id -1"):
        tidpo.dpo_loss(policy, labels, ref_logits=ref)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights(value):
    policy, ref, labels, weights = _ok()
    weights[3, 1] = value
    with pytest.raises(ValueError, match=r"weights holds a non-finite value .* at index \(3, 1\)"):
        tidpo.tis_dpo_loss(policy, labels, weights, ref_logits=ref)


def test_device_mismatch():
    policy, ref, labels, weights = _ok()
    meta = torch.empty(labels.shape, device="meta")
    with pytest.raises(ValueError, match="weights is on meta but labels is on cpu"):
        tidpo.tis_dpo_loss(policy, labels, meta, ref_logits=ref)
    with pytest.raises(ValueError, match="labels is on meta but policy_logits is on cpu"):
        tidpo.dpo_loss(policy, labels.to("meta"), ref_logits=ref)
    with pytest.raises(ValueError, match="ref_logits is on meta"):
        tidpo.dpo_loss(policy, labels, ref_logits=ref.to("meta"))
    anchor = tidpo.TripletAnchor(policy[:B].detach().to("meta"), labels[:B].to("meta"), ref_logps=weights[:B])
    with pytest.raises(ValueError, match="anchor.logits is on meta but policy_logits is on cpu"):
        tidpo.ti_dpo_loss(policy, ref, labels, weights, anchor=anchor)


def test_backend_selection(monkeypatch):
    x = torch.zeros(2, 3)
    monkeypatch.delenv("TIDPO_BACKEND", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    for op in ("logps", "kl"):
        assert resolve_backend(None, x, op=op) == "torch"  # auto: CPU tensors take the chunked torch path
        assert resolve_backend("torch", x, op=op) == "torch"
    with pytest.raises(ValueError, match="op must be one of"):
        resolve_backend("auto", x, op="softmax")
    monkeypatch.setenv("TIDPO_BACKEND", "bogus")
    with pytest.raises(ValueError, match="TIDPO_BACKEND must be one of"):
        resolve_backend(None, x)
    monkeypatch.setenv("TIDPO_BACKEND", "triton")
    # Availability is per op. logps has kernels: on CPU without the interpreter they cannot run.
    assert triton_kernels_available("logps")
    with pytest.raises(RuntimeError, match="backend='triton' needs CUDA tensors"):
        tidpo.token_logps(torch.randn(2, 3), torch.tensor([0, 1]))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_backend("triton", x, op="logps") == "triton"
    # kl has kernels too (tidpo.kernels.kl): resolved per op, and on CPU they still need the interpreter
    # imported from the start; auto never picks them for CPU tensors.
    assert triton_kernels_available("kl")
    assert resolve_backend("triton", x, op="kl") == "triton"
    assert resolve_backend("auto", x, op="kl") == "torch"
    if not importlib.import_module("tidpo.kernels.kl").INTERPRETED:
        with pytest.raises(ValueError, match="p_logits is on cpu; the Triton kernels need CUDA tensors"):
            tidpo.token_kl(torch.randn(2, 3), torch.randn(2, 3), torch.tensor([0, 1]))
    # Kernels without Triton (simulated): an explicit request raises (never a silent fallback), auto takes torch.
    monkeypatch.setattr(backend_module, "triton_kernels_available", lambda op="logps": op != "kl")
    with pytest.raises(RuntimeError, match=r"backend='triton' was requested but Triton is not installed"):
        tidpo.token_kl(torch.randn(2, 3), torch.randn(2, 3), torch.tensor([0, 1]))
    assert resolve_backend("auto", x, op="kl") == "torch"


def test_kernels_that_do_not_import_beside_triton_are_an_error(monkeypatch):
    """A present Triton with unimportable kernels is a broken install: an error, never 'not available'."""
    from tidpo.ops.backend import triton_kernels_available

    monkeypatch.setitem(sys.modules, "tidpo.kernels.kl", None)  # any import of it now raises ImportError
    triton_kernels_available.cache_clear()
    try:
        with pytest.raises(ImportError, match=r"Triton is installed but the fused kernels \(tidpo.kernels.kl\) do "
                                              r"not import"):
            triton_kernels_available("kl")
        with pytest.raises(ImportError, match="do not import"):
            resolve_backend("triton", torch.zeros(2, 3), op="kl")
    finally:
        triton_kernels_available.cache_clear()
