"""The ops and losses at their edges, on both backends: the same answers from the chunked torch path (``test_*``,
this process) and the Triton kernels (``interp_*``, run under ``TRITON_INTERPRET=1`` by ``test_interpreter_suite``).

- NaN / +-inf logits at ignored positions: exact zeros (values and gradients), never NaN; at a valid position
  the value checks name it;
- -inf logits in the KL: one convention, whatever the tiling (an entry whose fp32 probability underflows
  contributes 0; representable mass against a -inf reference gives +inf);
- labels: int32 / int64 only;
- packed batches: ``[N]`` and ``[1, N]`` logits, labels and segment ids in any mix, equal to the padded layout;
- KL with policy and reference logits of different dtypes;
- TIS-DPO ``token_level`` rewards as the released code logs them.

The right values are float64 plain torch (``torch.log_softmax``), on inputs whose ignored rows are clean.
"""

from __future__ import annotations

import math

import pytest
import torch

import tidpo
from tests.conftest import IGNORE, assert_within_torch_error, make_labels, make_logits
from tests.kernel_harness import (
    INTERPRET,
    _interpreter_bf16_rounds_to_nearest,  # noqa: F401 - autouse fixture
    given,
    run_interpreter_suite,
    settings,
    st,
)

BACKEND = "triton" if INTERPRET else "torch"
POISONS = [math.nan, math.inf, -math.inf]


# ----------------------------------------------------------------------------------------------------------
# float64 truth


def truth_logps(logits, labels):
    lp = torch.log_softmax(logits.double(), -1)
    valid = labels != IGNORE
    return torch.where(valid, lp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1), 0.0)


def truth_kl(p_logits, q_logits, labels):
    lp, lq = torch.log_softmax(p_logits.double(), -1), torch.log_softmax(q_logits.double(), -1)
    terms = torch.where(lp.exp() > 0, lp.exp() * (lp - lq), 0.0)
    return torch.where(labels != IGNORE, terms.sum(-1), 0.0)


def poisoned(x, valid, poison):
    """``x`` with every ignored position's row replaced by ``poison`` (one entry finite, to mix cases)."""
    out = x.detach().clone()
    out[~valid] = poison
    return out


def grad_of(fn, *inputs):
    leaves = [x.detach().clone().requires_grad_(True) for x in inputs]
    value = fn(*leaves)
    scalar = value if value.dim() == 0 else (value * torch.linspace(0.5, 1.5, value.numel()).reshape(value.shape)
                                             .to(value.dtype)).sum()
    return value.detach(), torch.autograd.grad(scalar, leaves, allow_unused=True)


# ----------------------------------------------------------------------------------------------------------
# 1. non-finite logits at ignored positions


def _ops_give_exact_zeros_at_ignored_positions(poison):
    logits = make_logits((4, 6, 37), seed=1)
    ref = make_logits((4, 6, 37), seed=2)
    labels = make_labels(4, 6, 37, masked_rows=(2,), seed=3)
    valid = labels != IGNORE
    dirty, dirty_ref = poisoned(logits, valid, poison), poisoned(ref, valid, poison)

    values, (grad,) = grad_of(lambda x: tidpo.token_logps(x, labels, backend=BACKEND), dirty)
    want, (want_grad,) = grad_of(lambda x: truth_logps(x, labels), logits.double())
    torch.testing.assert_close(values.double(), want, rtol=1e-5, atol=1e-5)
    assert torch.all(grad[~valid] == 0) and torch.isfinite(grad).all()
    torch.testing.assert_close(grad.double(), want_grad, rtol=1e-5, atol=1e-6)

    for order in ((dirty, dirty_ref), (dirty_ref, dirty)):  # the policy on either side of the KL
        kl, grads = grad_of(lambda p, q: tidpo.token_kl(p, q, labels, backend=BACKEND), *order)
        clean = (logits, ref) if order[0] is dirty else (ref, logits)
        want_kl, want_grads = grad_of(lambda p, q: truth_kl(p, q, labels), *(x.double() for x in clean))
        torch.testing.assert_close(kl.double(), want_kl, rtol=1e-5, atol=1e-5)
        for g, w in zip(grads, want_grads, strict=True):
            assert torch.all(g[~valid] == 0) and torch.isfinite(g).all()
            torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=1e-6)


def _losses_give_exact_zeros_at_ignored_positions(poison):
    from tidpo import reference

    policy, ref = make_logits((4, 6, 37), seed=4), make_logits((4, 6, 37), seed=5)
    labels = make_labels(4, 6, 37, masked_rows=(1,), seed=6)
    valid = labels != IGNORE
    weights = torch.rand(4, 6, generator=torch.Generator().manual_seed(7)) + 0.5
    anchor_logits, anchor_labels = make_logits((2, 5, 37), seed=8), make_labels(2, 5, 37, seed=9)
    anchor_ref = make_logits((2, 5, 37), seed=10)
    cases = {
        "dpo": (lambda p, r: tidpo.dpo_loss(p, labels, ref_logits=r, backend=BACKEND).loss,
                lambda p, r: reference.dpo_loss(p, labels, ref_logits=r)["loss"]),
        "tdpo2": (lambda p, r: tidpo.tdpo_loss(p, r, labels, backend=BACKEND).loss,
                  lambda p, r: reference.tdpo_loss(p, r, labels)["loss"]),
        "tis_dpo": (lambda p, r: tidpo.tis_dpo_loss(p, labels, weights, ref_logits=r, token_level=True,
                                                    backend=BACKEND).loss,
                    lambda p, r: reference.tis_dpo_loss(p, labels, weights, ref_logits=r, token_level=True)["loss"]),
        "ti_dpo": (lambda p, r: tidpo.ti_dpo_loss(p, r, labels, weights, backend=BACKEND, anchor=tidpo.TripletAnchor(
                       anchor_logits, anchor_labels, ref_logits=anchor_ref)).loss,
                   lambda p, r: reference.ti_dpo_loss(p, r, labels, weights, anchor_logits=anchor_logits.double(),
                                                      anchor_labels=anchor_labels,
                                                      anchor_ref_logits=anchor_ref.double())["loss"]),
    }
    for name, (ours, truth) in cases.items():
        loss, (grad, _) = grad_of(ours, poisoned(policy, valid, poison), poisoned(ref, valid, poison))
        want, (want_grad, _) = grad_of(truth, policy.double(), ref.double())
        torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-6, msg=name)
        assert torch.all(grad[~valid] == 0) and torch.isfinite(grad).all(), name
        torch.testing.assert_close(grad.double(), want_grad, rtol=1e-4, atol=1e-6, msg=name)


def _nonfinite_logits_at_a_valid_position_are_named():
    logits = make_logits((2, 4, 11))
    labels = make_labels(2, 4, 11, ignore_frac=0.0)
    logits[1, 2, 5] = math.nan
    with pytest.raises(ValueError, match=r"logits at position \(1, 2\) are not finite"):
        tidpo.token_logps(logits, labels, backend=BACKEND)
    with pytest.raises(ValueError, match=r"q_logits at position \(1, 2\) are not finite"):
        tidpo.token_kl(make_logits((2, 4, 11)), logits, labels, backend=BACKEND)
    everything_masked = make_logits((2, 4, 11))
    everything_masked[0, 1] = -math.inf
    with pytest.raises(ValueError, match=r"logits at position \(0, 1\)"):
        tidpo.dpo_loss(everything_masked, labels, ref_logps=torch.zeros(2, 4), backend=BACKEND)


@pytest.mark.parametrize("poison", POISONS, ids=str)
def test_ops_give_exact_zeros_at_ignored_positions(poison):
    _ops_give_exact_zeros_at_ignored_positions(poison)


@pytest.mark.parametrize("poison", POISONS, ids=str)
def test_losses_give_exact_zeros_at_ignored_positions(poison):
    _losses_give_exact_zeros_at_ignored_positions(poison)


def test_nonfinite_logits_at_a_valid_position_are_named():
    _nonfinite_logits_at_a_valid_position_are_named()


@pytest.mark.interpreter
@pytest.mark.parametrize("poison", POISONS, ids=str)
def interp_ops_give_exact_zeros_at_ignored_positions(poison):
    _ops_give_exact_zeros_at_ignored_positions(poison)


@pytest.mark.interpreter
@pytest.mark.parametrize("poison", POISONS, ids=str)
def interp_losses_give_exact_zeros_at_ignored_positions(poison):
    _losses_give_exact_zeros_at_ignored_positions(poison)


@pytest.mark.interpreter
def interp_nonfinite_logits_at_a_valid_position_are_named():
    _nonfinite_logits_at_a_valid_position_are_named()


# ----------------------------------------------------------------------------------------------------------
# 2. -inf in the KL: one convention whatever the tiling


def _kl_row(gap: float):
    """One position, V = 300: p puts its mass far right (logit ``gap``) but also some on entry 0, where q is -inf.

    With ``gap`` = 200 the fp32 probability of entry 0 under p underflows (e^-200): it contributes 0. With
    ``gap`` = 40 it is representable (e^-40): the KL is +inf. Entry 0 sits in the first tile and the max in a
    later one, so a kernel with small tiles sees the entry before the max (the order that gave NaN).
    """
    p = make_logits((1, 300), seed=11)
    q = make_logits((1, 300), seed=12)
    p[0, 0], p[0, 250] = 0.0, gap
    q[0, 0] = -math.inf
    return p, q, torch.tensor([3])


def _kl_against_minus_inf_follows_one_convention():
    p, q, labels = _kl_row(200.0)
    dropped = p.clone()
    dropped[0, 0] = -math.inf  # the convention: an underflowing entry is the same as one with no mass
    want = truth_kl(dropped, q, labels)
    assert torch.isfinite(want).all()
    torch.testing.assert_close(tidpo.token_kl(p, q, labels, backend=BACKEND).double(), want, rtol=1e-5, atol=1e-5)
    p, q, labels = _kl_row(40.0)
    assert torch.isinf(tidpo.token_kl(p, q, labels, backend=BACKEND)).all()
    # q -inf where p is -inf too: 0 * log(0 / 0) is 0, never NaN; gradients of the policy (q) stay finite.
    q2 = q.clone()
    p2 = p.clone()
    p2[0, 0] = -math.inf
    kl, (dq,) = grad_of(lambda x: tidpo.token_kl(p2, x, labels, backend=BACKEND), q2)
    assert torch.isfinite(kl).all() and not torch.isnan(dq).any()


def test_kl_against_minus_inf_follows_one_convention():
    _kl_against_minus_inf_follows_one_convention()


@pytest.mark.interpreter
def interp_kl_against_minus_inf_follows_one_convention():
    _kl_against_minus_inf_follows_one_convention()


@pytest.mark.interpreter
@pytest.mark.parametrize("block_v", [16, 64, 512])
def interp_kl_kernel_gives_the_same_value_for_any_tile_width(block_v):
    from tidpo.kernels.kl import token_kl_fwd

    p, q, labels = _kl_row(200.0)
    dropped = p.clone()
    dropped[0, 0] = -math.inf
    kl, _, _ = token_kl_fwd(p, q, labels, block_v=block_v)
    torch.testing.assert_close(kl.double(), truth_kl(dropped, q, labels), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# 3. label dtypes


def _narrow_label_dtypes_are_refused():
    logits, ref = make_logits((2, 3, 11)), make_logits((2, 3, 11), seed=1)
    labels = make_labels(2, 3, 11)
    for dtype in (torch.int8, torch.int16, torch.uint8):
        narrow = labels.clamp(min=0).to(dtype)
        for call in (lambda y: tidpo.token_logps(logits, y, backend=BACKEND),
                     lambda y: tidpo.token_kl(logits, ref, y, backend=BACKEND),
                     lambda y: tidpo.dpo_loss(logits, y, ref_logits=ref, backend=BACKEND)):
            with pytest.raises(TypeError, match=r"labels must be an integer tensor of token ids \(int64 or int32\)"):
                call(narrow)
    for dtype in (torch.int32, torch.int64):
        torch.testing.assert_close(tidpo.token_logps(logits, labels.to(dtype), backend=BACKEND).double(),
                                   truth_logps(logits, labels), rtol=1e-5, atol=1e-5)


def test_narrow_label_dtypes_are_refused():
    _narrow_label_dtypes_are_refused()


@pytest.mark.interpreter
def interp_narrow_label_dtypes_are_refused():
    _narrow_label_dtypes_are_refused()


# ----------------------------------------------------------------------------------------------------------
# 4. packed batches: every mix of [N] and [1, N]


def _packed_layout(num_pairs=3, vocab=29, seed=20):
    """A padded batch [2B, T, V] and the same tokens packed: (policy, ref, labels, weights, cu_seqlens, keep)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 7, (2 * num_pairs,), generator=g)
    width = int(lengths.max())
    policy = make_logits((2 * num_pairs, width, vocab), seed=seed)
    ref = make_logits((2 * num_pairs, width, vocab), seed=seed + 1)
    labels = make_labels(2 * num_pairs, width, vocab, ignore_frac=0.2, seed=seed + 2)
    keep = torch.arange(width)[None, :] < lengths[:, None]
    labels[~keep] = IGNORE
    weights = torch.rand(2 * num_pairs, width, generator=g) + 0.5
    cu = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    return policy, ref, labels, weights, cu, keep


def _packed_shapes_equal_the_padded_layout(shapes: str):
    policy, ref, labels, weights, cu, keep = _packed_layout()
    n = int(cu[-1])
    as_n = {"N": lambda x: x, "1N": lambda x: x.unsqueeze(0)}
    logits_shape, labels_shape, segments_shape = shapes.split("-")
    pack = {k: x[keep] for k, x in (("policy", policy), ("ref", ref), ("labels", labels), ("weights", weights))}
    packing = tidpo.SequencePacking.from_cu_seqlens(cu, n)
    if segments_shape == "1N":
        packing = tidpo.SequencePacking(packing.segment_ids.unsqueeze(0), packing.num_pairs)
    packed_labels = as_n[labels_shape](pack["labels"])

    def per_token(x):
        return as_n[labels_shape](x)

    for name in ("dpo", "tdpo2", "tis_dpo"):
        def run(p, r, y, w, packing=None, name=name):
            if name == "dpo":
                return tidpo.dpo_loss(p, y, ref_logits=r, packing=packing, backend=BACKEND)
            if name == "tdpo2":
                return tidpo.tdpo_loss(p, r, y, packing=packing, backend=BACKEND)
            return tidpo.tis_dpo_loss(p, y, w, ref_logits=r, token_level=True, packing=packing, backend=BACKEND)

        padded_leaf = policy.clone().requires_grad_(True)
        padded = run(padded_leaf, ref, labels, weights)
        packed_leaf = as_n[logits_shape](pack["policy"]).clone().requires_grad_(True)
        packed = run(packed_leaf, as_n[logits_shape](pack["ref"]), packed_labels, per_token(pack["weights"]),
                     packing)
        torch.testing.assert_close(packed.losses, padded.losses, rtol=1e-6, atol=1e-7, msg=name)
        torch.testing.assert_close(packed.chosen_rewards, padded.chosen_rewards, rtol=1e-6, atol=1e-7, msg=name)
        (g_padded,) = torch.autograd.grad(padded.loss, padded_leaf)
        (g_packed,) = torch.autograd.grad(packed.loss, packed_leaf)
        torch.testing.assert_close(g_packed.reshape(-1, g_packed.shape[-1]), g_padded[keep], rtol=1e-5, atol=1e-7,
                                   msg=name)


def _ignored_tokens_may_carry_any_segment_id():
    policy, ref, labels, weights, cu, keep = _packed_layout(seed=30)
    n = int(cu[-1])
    packing = tidpo.SequencePacking.from_cu_seqlens(cu, n)
    packed_labels = labels[keep]
    wild = packing.segment_ids.clone()
    wild[packed_labels == IGNORE] = 99  # >= 2B: documented as unused
    wild_packing = tidpo.SequencePacking(wild, packing.num_pairs)
    outs = []
    for p in (packing, wild_packing):
        leaf = policy[keep].clone().requires_grad_(True)
        out = tidpo.tis_dpo_loss(leaf, packed_labels, weights[keep], ref_logits=ref[keep], packing=p, backend=BACKEND)
        outs.append((out.losses.detach(), torch.autograd.grad(out.loss, leaf)[0]))
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=0, atol=0)
    torch.testing.assert_close(outs[1][1], outs[0][1], rtol=0, atol=0)


PACKED_SHAPES = ["N-N-N", "1N-N-N", "1N-1N-N", "N-1N-1N", "1N-1N-1N", "N-N-1N"]


@pytest.mark.parametrize("shapes", PACKED_SHAPES)
def test_packed_shapes_equal_the_padded_layout(shapes):
    _packed_shapes_equal_the_padded_layout(shapes)


def test_ignored_tokens_may_carry_any_segment_id():
    _ignored_tokens_may_carry_any_segment_id()


@pytest.mark.interpreter
@pytest.mark.parametrize("shapes", ["1N-N-N", "N-1N-1N"])
def interp_packed_shapes_equal_the_padded_layout(shapes):
    _packed_shapes_equal_the_padded_layout(shapes)


@pytest.mark.interpreter
def interp_ignored_tokens_may_carry_any_segment_id():
    _ignored_tokens_may_carry_any_segment_id()


def test_packed_and_padded_fp32_sums_are_identical():
    """Per-sequence sums accumulate in float64: the padded and the packed layout give the same fp32 bits."""
    from tidpo.ops.sequence import weighted_sequence_logps

    policy, _, labels, weights, cu, keep = _packed_layout(num_pairs=4, vocab=101, seed=40)
    _, padded = weighted_sequence_logps(policy, labels, weights, backend="torch")
    packing = tidpo.SequencePacking.from_cu_seqlens(cu, int(cu[-1]))
    _, packed = weighted_sequence_logps(policy[keep], labels[keep], weights[keep], segments=packing.segment_ids,
                                        num_sequences=8, backend="torch")
    assert torch.equal(packed, padded)


# ----------------------------------------------------------------------------------------------------------
# 5. KL with logits of two dtypes


def _kl_reads_each_input_in_its_own_dtype(p_dtype, q_dtype):
    p, q = make_logits((3, 5, 300), p_dtype, seed=50), make_logits((3, 5, 300), q_dtype, seed=51)
    labels = make_labels(3, 5, 300, seed=52)
    kl, (dp, dq) = grad_of(lambda a, b: tidpo.token_kl(a, b, labels, backend=BACKEND), p, q)
    want, (want_dp, want_dq) = grad_of(lambda a, b: truth_kl(a, b, labels), p.double(), q.double())
    base, (base_dp, base_dq) = grad_of(lambda a, b: truth_kl(a.float(), b.float(), labels).float(), p.float(),
                                       q.float())
    assert dp.dtype == p_dtype and dq.dtype == q_dtype
    assert_within_torch_error(kl, want, base, atol=1e-6, what="kl")
    # The gradients are stored in each input's dtype: compare with fp32 torch rounded to that dtype.
    assert_within_torch_error(dp, want_dp, base_dp.to(p_dtype), atol=1e-6, what="dp")
    assert_within_torch_error(dq, want_dq, base_dq.to(q_dtype), atol=1e-6, what="dq")


MIXED = [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32), (torch.float16, torch.float32)]


@pytest.mark.parametrize("p_dtype,q_dtype", MIXED, ids=str)
def test_kl_reads_each_input_in_its_own_dtype(p_dtype, q_dtype):
    _kl_reads_each_input_in_its_own_dtype(p_dtype, q_dtype)


@pytest.mark.interpreter
@pytest.mark.parametrize("p_dtype,q_dtype", MIXED, ids=str)
def interp_kl_reads_each_input_in_its_own_dtype(p_dtype, q_dtype):
    _kl_reads_each_input_in_its_own_dtype(p_dtype, q_dtype)


# ----------------------------------------------------------------------------------------------------------
# 6. TIS-DPO token_level rewards, and the checks that had drifted apart


@pytest.mark.parametrize("kl_form", ["released", "paper_tdpo1", "paper_tdpo2"])
def test_tis_dpo_token_level_rewards_are_the_released_ones(kl_form):
    policy, ref = make_logits((4, 5, 23), seed=60), make_logits((4, 5, 23), seed=61)
    labels = make_labels(4, 5, 23, seed=62)
    weights = torch.rand(4, 5, generator=torch.Generator().manual_seed(63)) + 0.5
    out = tidpo.tis_dpo_loss(policy, labels, weights, ref_logits=ref, beta=0.3, token_level=True, kl_form=kl_form)
    valid = labels != IGNORE
    w = torch.where(valid, weights.double(), 0.0)
    margin = (w * (truth_logps(policy, labels) - truth_logps(ref, labels))).sum(-1)
    if kl_form == "released":  # weighted KL(pi || ref), subtracted (trainers.py::tisdpo_loss)
        rewards = 0.3 * (margin - (w * truth_kl(policy, ref, labels)).sum(-1))
    else:  # weighted KL(ref || pi), added, as TDPO logs its rewards
        rewards = 0.3 * (margin + (w * truth_kl(ref, policy, labels)).sum(-1))
    torch.testing.assert_close(out.chosen_rewards.double(), rewards[:2], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.rejected_rewards.double(), rewards[2:], rtol=1e-5, atol=1e-6)


def test_label_smoothing_and_module_hyper_parameters_have_one_check():
    policy, labels = make_logits((2, 3, 11)), make_labels(2, 3, 11)
    with pytest.raises(ValueError, match=r"label_smoothing must be in \[0.0, 0.5\)"):
        tidpo.dpo_loss(policy, labels, ref_logps=torch.zeros(2, 3), label_smoothing=0.5)
    with pytest.raises(ValueError, match=r"beta must be in \(0.0, inf\)"):
        tidpo.DPOLoss(beta=-1)
    with pytest.raises(TypeError, match="betta"):
        tidpo.DPOLoss(betta=3)
    with pytest.raises(ValueError, match="variant must be one of"):
        tidpo.TDPOLoss(variant=3)
    with pytest.raises(ValueError, match="kl_form='paper_tdpo1' selects a KL term"):
        tidpo.TISDPOLoss(kl_form="paper_tdpo1")
    with pytest.raises(ValueError, match="gamma"):
        tidpo.TIDPOLoss(gamma=-1)
    with pytest.raises(ValueError, match="backend must be one of"):
        tidpo.DPOLoss(backend="cuda")
    module = tidpo.DPOLoss(beta=0.2, label_smoothing=0.1)
    torch.testing.assert_close(module(policy, labels, ref_logps=torch.zeros(2, 3)).loss,
                               tidpo.dpo_loss(policy, labels, ref_logps=torch.zeros(2, 3), beta=0.2,
                                              label_smoothing=0.1).loss)


# ----------------------------------------------------------------------------------------------------------
# fuzz: poisons at ignored positions, label dtypes, packed shapes


if given is not None:

    def _fuzz(rows, length, vocab, poison, label_dtype, packed_shape, seed):
        pairs = max(rows // 2, 1)
        policy = make_logits((2 * pairs, length, vocab), seed=seed)
        ref = make_logits((2 * pairs, length, vocab), seed=seed + 1)
        labels = make_labels(2 * pairs, length, vocab, ignore_frac=0.3, seed=seed + 2)
        valid = labels != IGNORE
        if label_dtype in (torch.int8, torch.int16, torch.uint8):
            with pytest.raises(TypeError, match="labels must be an integer tensor"):
                tidpo.dpo_loss(policy, labels.clamp(min=0).to(label_dtype), ref_logits=ref, backend=BACKEND)
            return
        labels = labels.to(label_dtype)
        clean = tidpo.dpo_loss(policy, labels, ref_logits=ref, backend=BACKEND)
        leaf = poisoned(policy, valid, poison).requires_grad_(True)
        dirty = tidpo.dpo_loss(leaf, labels, ref_logits=poisoned(ref, valid, poison), backend=BACKEND)
        torch.testing.assert_close(dirty.losses, clean.losses, rtol=0, atol=0)
        grad = torch.autograd.grad(dirty.loss, leaf)[0]
        assert torch.all(grad[~valid] == 0) and torch.isfinite(grad).all()
        # The same tokens packed ([N] or [1, N]) give the same losses.
        lengths = torch.full((2 * pairs,), length)
        cu = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
        flat = (lambda x: x.reshape(-1, *x.shape[2:])) if packed_shape == "N" else (
            lambda x: x.reshape(1, -1, *x.shape[2:]))
        packed = tidpo.dpo_loss(flat(policy), flat(labels), ref_logits=flat(ref), backend=BACKEND,
                                packing=tidpo.SequencePacking.from_cu_seqlens(cu, 2 * pairs * length))
        torch.testing.assert_close(packed.losses, clean.losses, rtol=1e-6, atol=1e-7)

    _FUZZ = dict(rows=st.integers(2, 4), length=st.integers(1, 5), vocab=st.integers(2, 70),
                 poison=st.sampled_from(POISONS), label_dtype=st.sampled_from(
                     [torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8]),
                 packed_shape=st.sampled_from(["N", "1N"]), seed=st.integers(0, 2**16))

    @settings(max_examples=25, deadline=None, database=None, derandomize=True)
    @given(**_FUZZ)
    def test_fuzz_edges(rows, length, vocab, poison, label_dtype, packed_shape, seed):
        _fuzz(rows, length, vocab, poison, label_dtype, packed_shape, seed)

    @pytest.mark.interpreter
    @settings(max_examples=10, deadline=None, database=None, derandomize=True)
    @given(**_FUZZ)
    def interp_fuzz_edges(rows, length, vocab, poison, label_dtype, packed_shape, seed):
        _fuzz(rows, length, vocab, poison, label_dtype, packed_shape, seed)


@pytest.mark.interpreter
@pytest.mark.skipif(INTERPRET, reason="this test is the driver that starts the interpreter subprocess")
def test_interpreter_suite():
    """Run every ``interp_*`` case above under ``TRITON_INTERPRET=1`` in one subprocess (the Triton backend)."""
    run_interpreter_suite(__file__, globals())
