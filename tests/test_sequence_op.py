"""weighted_sequence_logps (torch path): per-token log-probs + weighted per-sequence sums vs float64."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import assert_rel_close, assert_within_torch_error, make_labels, make_logits
from tidpo import reference as R
from tidpo.ops.sequence import weighted_sequence_logps


def _truth(logits, labels, weights, seq_of_token, num_sequences, g_tok, g_seq):
    """Reference: sums by an explicit loop over sequences, gradients by float64 autograd."""
    x = logits.detach().double().requires_grad_(True)
    logps = R.token_logps(x, labels)
    flat_seq = seq_of_token.reshape(-1)
    contrib = (weights.double() * logps).reshape(-1)
    sums = torch.stack([contrib[flat_seq == s].sum() for s in range(num_sequences)])
    (grad,) = torch.autograd.grad((logps * g_tok).sum() + (sums * g_seq).sum(), x)
    return logps, sums, grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_values_and_gradients(dtype, layout):
    R_, T, V = 4, 7, 301
    full = make_logits((R_, T + 1, V), dtype)
    labels = make_labels(R_, T, V, masked_rows=(2,), seed=1)
    weights = torch.rand(R_, T, generator=torch.Generator().manual_seed(2)) + 0.5
    g_tok = torch.randn(R_, T, dtype=torch.float64)
    g_seq = torch.randn(R_, dtype=torch.float64)
    if layout == "padded":
        logits, lab, w, seg, seq_of_token = full[:, :-1], labels, weights, None, torch.arange(R_)[:, None].expand(R_, T)
        gt = g_tok
    else:
        logits = full[:, :-1].reshape(-1, V)
        lab, w, gt = labels.reshape(-1), weights.reshape(-1), g_tok.reshape(-1)
        seg = torch.tensor([3, 0, 2, 1]).repeat_interleave(T)  # sequences in another order than the rows
        seq_of_token = seg
    x = logits.detach().clone().requires_grad_(True)
    logps, sums = weighted_sequence_logps(x, lab, w, segments=seg, num_sequences=R_, chunk_size=5)
    (grad,) = torch.autograd.grad((logps * gt.float()).sum() + (sums * g_seq.float()).sum(), x)
    t_logps, t_sums, t_grad = _truth(logits, lab, w, seq_of_token, R_, gt, g_seq)
    assert_rel_close(logps, t_logps, 2e-6, "logps")
    assert_rel_close(sums, t_sums, 2e-6, "sums")
    base_in = logits.detach().clone().requires_grad_(True)
    base_logps = R.token_logps(base_in, lab)
    base_sums = torch.stack([(w.to(base_logps.dtype) * base_logps).reshape(-1)[seq_of_token.reshape(-1) == s].sum()
                             for s in range(R_)])
    (base_grad,) = torch.autograd.grad((base_logps * gt.to(base_logps.dtype)).sum()
                                       + (base_sums * g_seq.to(base_logps.dtype)).sum(), base_in)
    assert_within_torch_error(grad, t_grad, base_grad, atol=1e-6, what="dlogits")


def test_unit_weights_sum_is_plain_sequence_sum():
    logits = make_logits((3, 5, 17), torch.float64)
    labels = make_labels(3, 5, 17, seed=3)
    logps, sums = weighted_sequence_logps(logits, labels)
    torch.testing.assert_close(sums, logps.sum(-1), rtol=1e-12, atol=1e-12)


def test_argument_errors():
    logits, labels = torch.randn(6, 9), torch.randint(0, 9, (6,))
    with pytest.raises(ValueError, match=r"logits must be \[R, T, V\] without segments"):
        weighted_sequence_logps(logits, labels)
    with pytest.raises(ValueError, match="num_sequences is required"):
        weighted_sequence_logps(logits, labels, segments=torch.zeros(6, dtype=torch.long))
    with pytest.raises(ValueError, match="weights shape"):
        weighted_sequence_logps(logits[None], labels[None], torch.ones(5))
