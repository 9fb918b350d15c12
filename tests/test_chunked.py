"""The chunked torch path (tidpo.ops) against the float64 reference: values and gradients.

Shapes on purpose: V = 7 (tiny), 1031 (odd prime, not a power of 2), 4099 (crosses several chunk
boundaries with small chunks); chunk sizes that divide N and that do not; 25 % ignored positions and
fully masked rows; strided logits (model_logits[:, :-1]).
"""

from __future__ import annotations

import pytest
import torch

from tests.conftest import (
    IGNORE,
    assert_rel_close,
    assert_within_torch_error,
    make_labels,
    make_logits,
)
from tidpo import reference as R
from tidpo import token_kl, token_logps
from tidpo.ops import token_logps_and_lse
from tidpo.ops.chunked import chunk_index, default_chunk_size

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _truth_and_torch(fn, inputs, dtype):
    """Reference in float64 on the very same (rounded) values, and plain torch in ``dtype``."""
    truth_in = [x.detach().double().requires_grad_(x.requires_grad) for x in inputs]
    torch_in = [x.detach().clone().requires_grad_(x.requires_grad) for x in inputs]
    return fn(truth_in), truth_in, fn(torch_in), torch_in


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,chunk", [((6, 5, 7), 4), ((6, 5, 7), 5), ((3, 9, 1031), 4), ((2, 7, 4099), 3),
                                         ((4, 3, 1031), None)])
def test_token_logps_values_and_grads(dtype, shape, chunk):
    R_, T, V = shape
    logits = make_logits(shape, dtype).requires_grad_(True)
    labels = make_labels(R_, T, V, masked_rows=(1,))
    grad_out = torch.randn(R_, T, dtype=torch.float64)

    ours = token_logps(logits, labels, chunk_size=chunk)
    assert ours.dtype == torch.float32 and ours.shape == labels.shape
    (ours_grad,) = torch.autograd.grad(ours, logits, grad_out.float())
    assert ours_grad.dtype == dtype

    truth, (t_in,), base, (b_in,) = _truth_and_torch(lambda x: R.token_logps(x[0], labels), [logits], dtype)
    (truth_grad,) = torch.autograd.grad(truth, t_in, grad_out)
    (base_grad,) = torch.autograd.grad(base, b_in, grad_out.to(base.dtype))

    # Forward: fp32 compute from the dtype's values must match float64 on the same values to ~1e-6.
    assert_rel_close(ours, truth, 2e-6, "logps")
    assert_within_torch_error(ours, truth, base, what="logps")
    assert_within_torch_error(ours_grad, truth_grad, base_grad, atol=1e-6, what="dlogits")
    assert torch.all(ours[labels == IGNORE] == 0)
    assert torch.all(ours_grad[1] == 0), "a fully masked row must get zero gradient"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("policy_first", [False, True])
def test_token_kl_values_and_grads(dtype, policy_first):
    R_, T, V = 4, 6, 1031
    policy = make_logits((R_, T, V), dtype, seed=1).requires_grad_(True)
    ref = make_logits((R_, T, V), dtype, seed=2)
    labels = make_labels(R_, T, V, masked_rows=(2,), seed=3)
    grad_out = torch.randn(R_, T, dtype=torch.float64)

    def kl(inputs):
        pol, rf = inputs
        return (R.token_kl(pol, rf, labels) if policy_first else R.token_kl(rf, pol, labels))

    ours = token_kl(policy, ref, labels, chunk_size=5) if policy_first else token_kl(ref, policy, labels, chunk_size=5)
    (ours_grad,) = torch.autograd.grad(ours, policy, grad_out.float())
    truth, (t_pol, _), base, (b_pol, _) = _truth_and_torch(kl, [policy, ref], dtype)
    (truth_grad,) = torch.autograd.grad(truth, t_pol, grad_out)
    (base_grad,) = torch.autograd.grad(base, b_pol, grad_out.to(base.dtype))

    assert_rel_close(ours, truth, 2e-6, "kl")
    assert_within_torch_error(ours, truth, base, what="kl")
    assert_within_torch_error(ours_grad, truth_grad, base_grad, atol=1e-6, what="dkl")
    assert torch.all(ours[labels == IGNORE] == 0)


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 64])
def test_strided_logits_are_read_in_place(chunk):
    """logits[:, :-1] (a non-contiguous view) gives the same values and gradients as a copy."""
    full = make_logits((3, 8, 33), torch.float64).requires_grad_(True)
    labels = make_labels(3, 7, 33, seed=4)
    view = full[:, :-1]
    assert not view.is_contiguous()
    out = token_logps(view, labels, chunk_size=chunk)
    (grad,) = torch.autograd.grad(out.sum(), full)
    truth = R.token_logps(full.detach()[:, :-1], labels)
    torch.testing.assert_close(out, truth, rtol=1e-12, atol=1e-12)
    truth_full = full.detach().clone().requires_grad_(True)
    (truth_grad,) = torch.autograd.grad(R.token_logps(truth_full[:, :-1], labels).sum(), truth_full)
    torch.testing.assert_close(grad, truth_grad, rtol=1e-12, atol=1e-12)
    assert torch.all(grad[:, -1] == 0)


def test_two_dim_logits_and_chunking_of_rows():
    logits = make_logits((37, 101), torch.float64).requires_grad_(True)
    labels = make_labels(1, 37, 101, seed=5)[0]
    for chunk in (1, 5, 36, 37, 100):
        out = token_logps(logits, labels, chunk_size=chunk)
        torch.testing.assert_close(out, R.token_logps(logits.detach(), labels), rtol=1e-12, atol=1e-12)


def test_chunk_index_covers_every_position_exactly_once():
    for shape, chunk in [((5, 7, 3), 3), ((5, 7, 3), 7), ((5, 7, 3), 15), ((2, 9, 3), 4), ((11, 3), 4)]:
        seen = torch.zeros(shape[:-1], dtype=torch.long)
        for idx in chunk_index(torch.Size(shape), chunk):
            part = seen[idx]
            assert part.numel() <= chunk
            seen[idx] += 1
        assert torch.all(seen == 1), (shape, chunk)
    assert default_chunk_size(128256) == 2**21 // 128256


def test_gradcheck_float64_chunked_ops():
    x = make_logits((2, 4, 9), torch.float64).requires_grad_(True)
    y = make_logits((2, 4, 9), torch.float64, seed=1).requires_grad_(True)
    labels = make_labels(2, 4, 9, seed=2)
    for chunk in (1, 3, 8):
        assert torch.autograd.gradcheck(lambda a, c=chunk: token_logps(a, labels, chunk_size=c), (x,))
        assert torch.autograd.gradcheck(lambda a, b, c=chunk: token_kl(a, b, labels, chunk_size=c), (x, y))


def test_lse_output_matches_logsumexp():
    logits = make_logits((3, 5, 17), torch.bfloat16)
    labels = make_labels(3, 5, 17, ignore_frac=0.0)
    _, lse = token_logps_and_lse(logits, labels, chunk_size=4)
    torch.testing.assert_close(lse, torch.logsumexp(logits.double(), -1).float(), rtol=1e-6, atol=1e-6)


def test_underflowing_probabilities_stay_finite():
    """Logit gaps > 104 nats: exp underflows to 0 in fp32. Log-softmax forms stay finite and exact."""
    V = 50
    policy = torch.zeros(2, 3, V)
    policy[..., 0] = 150.0  # every other token has probability exp(-150) -> 0 in fp32
    ref = torch.zeros(2, 3, V)
    ref[..., 1] = 120.0
    labels = torch.tensor([[0, 5, IGNORE], [1, 2, 3]])
    naive = (torch.softmax(ref, -1) * (torch.softmax(ref, -1).log() - torch.softmax(policy, -1).log())).sum(-1)
    assert not torch.isfinite(naive).all(), "the softmax().log() form is expected to break here"
    policy.requires_grad_(True)
    for p_logits, q_logits in ((ref, policy), (policy, ref)):
        kl = token_kl(p_logits, q_logits, labels)
        truth = R.token_kl(p_logits.detach().double(), q_logits.detach().double(), labels)
        assert torch.isfinite(kl).all()
        assert_rel_close(kl, truth, 1e-6, "kl under underflow")
        (grad,) = torch.autograd.grad(kl.sum(), policy)
        assert torch.isfinite(grad).all()
    logps = token_logps(policy, labels)
    assert torch.isfinite(logps).all()
    assert float(logps[0, 1].detach()) == pytest.approx(-150.0, rel=1e-6)


def test_minus_inf_logits_in_masked_vocab_entries():
    """Vocab entries at -inf (masked vocabulary) have p = 0 and contribute nothing (0 log 0 = 0)."""
    p = make_logits((2, 3, 11), torch.float32)
    q = make_logits((2, 3, 11), torch.float32, seed=1)
    p[..., -3:] = float("-inf")
    q[..., -3:] = float("-inf")
    labels = make_labels(2, 3, 8, ignore_frac=0.0)
    kl = token_kl(p, q.requires_grad_(True), labels)
    truth = R.token_kl(p.double(), q.detach().double(), labels)
    assert torch.isfinite(kl).all()
    assert_rel_close(kl, truth, 1e-6)
    (grad,) = torch.autograd.grad(kl.sum(), q)
    assert torch.isfinite(grad).all()
