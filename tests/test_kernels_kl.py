"""Fused Triton per-position KL kernels (``tidpo.kernels.kl``) and ``TritonTokenKL``.

Same structure as ``tests/test_kernels_logps.py``, on the machinery shared in ``tests/kernel_harness.py``
(read its module docstring for the why):

- ``interpreter``: the kernels run on CPU in the Triton interpreter, in ONE ``python -m pytest``
  subprocess started by ``test_interpreter_suite`` with ``TRITON_INTERPRET=1`` set from the start and
  ``-o python_functions=interp_*`` (only the ``interp_*`` functions are collected there, only the
  ``test_*`` ones here). Checked against the float64 reference ``tidpo.reference.token_kl`` on the same
  rounded values (forward ``kl`` / ``lse_p`` / ``lse_q``; backward ``dp`` / ``dq`` for every
  ``(NEED_DP, NEED_DQ)``), against the chunked torch path (``tidpo.token_kl`` and the public TDPO /
  TIS-DPO losses with ``backend="triton"`` vs ``"torch"``), for determinism, -inf / underflow rows and a
  bounded fuzz. The interpreter's fp32 -> bf16 cast is made to round to nearest like the GPU (the
  harness's ``_interpreter_bf16_rounds_to_nearest``, imported here).
- ``compile_only``: every kernel variant is compiled with ``triton.compile`` for sm_80 and sm_90 (no GPU
  needed), checked for a non-empty cubin and no register spills.
- ``gpu``: the same value/gradient checks at realistic shapes on a CUDA device; skipped without one.

Shapes on purpose: V = 7 (tiny, odd, one partial tile), V = 100 with 64-wide tiles and V = 1031 with
256-wide tiles (several tiles, the last one partial; test-only ``block_v`` override), V = 1031 in one
default 2048-wide tile (2-D logits), V = 32000 (realistic, 8 default 4096-wide tiles, few rows). ``p`` is
a strided view (``full[:, :-1]``) and ``q`` a contiguous tensor, so the two inputs have different strides.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from tests.conftest import IGNORE, assert_rel_close, assert_within_torch_error, make_labels, make_logits, max_err
from tests.kernel_harness import (
    DTYPES,
    INTERP_SHAPES,
    INTERPRET,
    _interpreter_bf16_rounds_to_nearest,  # noqa: F401 - an autouse fixture: in effect in this module once imported
    check_compile_signatures,
    check_compiles,
    check_small_vocab_compiles,
    fresh_triton_cache_fixture,  # noqa: F401 - provides the ``fresh_triton_cache`` fixture
    given,
    logits_case,
    requires_cuda,
    run_interpreter_suite,
    settings,
    st,
)
from tidpo import reference as R

# Only a missing Triton skips these tests; kernels that do not import beside Triton fail them.
pytest.importorskip("triton", reason="Triton is not installed")
kernels = importlib.import_module("tidpo.kernels.kl")
token_kl_fwd, token_kl_bwd = kernels.token_kl_fwd, kernels.token_kl_bwd
GRAD_FLAGS = kernels.GRAD_FLAGS  # (need_dp, need_dq): p is the policy, q is the policy, both


# ----------------------------------------------------------------------------------------------
# Shared checks (used by the interpreter and the GPU tests)
# ----------------------------------------------------------------------------------------------


def _grads64(p, q, labels, grad_out, ignore_index=IGNORE):
    """Float64 autograd of the reference KL w.r.t. both logits (the truth for the gradients)."""
    p_in = p.detach().double().requires_grad_(True)
    q_in = q.detach().double().requires_grad_(True)
    return torch.autograd.grad(R.token_kl(p_in, q_in, labels, ignore_index), (p_in, q_in), grad_out.double())


def _grads64_closed_form(p, q, labels, grad_out, ignore_index=IGNORE):
    """``g p (log p - log q - KL)`` and ``g (q - p)`` in float64, with 0 where p == 0.

    For rows with -inf logits, where autograd through the reference's ``where(p > 0, ...)`` gives NaN
    (0 * (-inf - -inf) in the unselected branch).
    """
    logp = torch.log_softmax(p.detach().double(), -1)
    logq = torch.log_softmax(q.detach().double(), -1)
    kl = R.token_kl(p.detach().double(), q.detach().double(), labels, ignore_index).unsqueeze(-1)
    g = torch.where(labels != ignore_index, grad_out.double(), 0.0).unsqueeze(-1)
    pr = logp.exp()
    dp = g * torch.where(pr > 0, pr * (logp - logq - kl), 0.0)
    return dp, g * (logq.exp() - pr)


def _check_against_reference(p, q, labels, grad_out, *, block_v=None, ignore_index=IGNORE, rel=1e-5):
    """Kernel forward (kl, lse_p, lse_q) and backward (every flag pair) vs float64 and torch in dtype."""
    dtype, valid = p.dtype, labels != ignore_index
    kl, lse_p, lse_q = token_kl_fwd(p, q, labels, ignore_index, block_v=block_v)
    assert kl.dtype == lse_p.dtype == lse_q.dtype == torch.float32 and kl.shape == labels.shape
    p64, q64 = p.detach().double(), q.detach().double()
    assert_rel_close(kl, R.token_kl(p64, q64, labels, ignore_index), rel, "kl")
    assert_rel_close(lse_p, torch.where(valid, torch.logsumexp(p64, -1), 0.0), rel, "lse_p")
    assert_rel_close(lse_q, torch.where(valid, torch.logsumexp(q64, -1), 0.0), rel, "lse_q")
    for name, out in (("kl", kl), ("lse_p", lse_p), ("lse_q", lse_q)):
        assert torch.all(out[~valid] == 0), f"{name} must be 0 at ignored positions"

    truth = _grads64(p, q, labels, grad_out, ignore_index)
    p_in = p.detach().clone().requires_grad_(True)
    q_in = q.detach().clone().requires_grad_(True)
    base_kl = R.token_kl(p_in, q_in, labels, ignore_index)  # torch in the inputs' dtype
    base = torch.autograd.grad(base_kl, (p_in, q_in), grad_out.to(base_kl.dtype))
    both = token_kl_bwd(p, q, labels, lse_p, lse_q, kl, grad_out.float(), ignore_index, block_v=block_v)
    for need_dp, need_dq in GRAD_FLAGS:
        got = token_kl_bwd(p, q, labels, lse_p, lse_q, kl, grad_out, ignore_index, need_dp=need_dp,
                           need_dq=need_dq, block_v=block_v)
        for name, need, g, full in (("dp", need_dp, got[0], both[0]), ("dq", need_dq, got[1], both[1])):
            if not need:
                assert g is None, f"{name} was not asked for"
                continue
            # The flags only skip work: one gradient alone is bitwise the one computed with both.
            assert torch.equal(g, full), f"{name} differs between need flags {need_dp, need_dq}"
    for name, got, t, b in (("dp", both[0], truth[0], base[0]), ("dq", both[1], truth[1], base[1])):
        assert got.dtype == dtype and got.shape == p.shape and got.is_contiguous(), name
        assert_within_torch_error(got, t, b, atol=1e-6, what=f"{name} {dtype}")
        assert torch.all(got[~valid] == 0), f"{name}: ignored positions must get a zero gradient row"


def _case(shape, dtype, *, strided=True, masked_rows=(1,), seed=0, device="cpu"):
    """``p`` (a strided ``[:, :-1]`` view for 3-D when ``strided``), contiguous ``q``, labels, grads.

    ``p``, the labels and the grads are the harness's :func:`~tests.kernel_harness.logits_case`.
    """
    p, labels, grad_out = logits_case(shape, dtype, strided=strided, masked_rows=masked_rows, seed=seed,
                                      device=device)
    q = make_logits(shape, dtype, seed=seed + 3)
    return p, q.to(device), labels, grad_out


def _backend_matches_torch(dtype, device="cpu", shape=(4, 6, 1031), rtol=1e-6):
    """tidpo.token_kl and the TDPO / TIS-DPO losses: backend='triton' == backend='torch' (chunked path)."""
    import tidpo

    p, q, labels, grad_out = _case(shape, dtype, masked_rows=(2,), seed=3, device=device)
    for grad_p, grad_q in ((True, False), (False, True), (True, True)):
        results = []
        for backend in ("triton", "torch"):
            p_in = p.detach().clone().requires_grad_(grad_p)
            q_in = q.detach().clone().requires_grad_(grad_q)
            out = tidpo.token_kl(p_in, q_in, labels, backend=backend)
            wrt = [x for x in (p_in, q_in) if x.requires_grad]
            results.append((out, torch.autograd.grad(out, wrt, grad_out.to(out.dtype))))
        (out_t, grads_t), (out_c, grads_c) = results
        assert out_t.dtype == out_c.dtype == torch.float32
        torch.testing.assert_close(out_t, out_c, rtol=rtol, atol=rtol)
        for a, b in zip(grads_t, grads_c, strict=True):
            assert a.dtype == b.dtype == dtype
            torch.testing.assert_close(a, b)  # dtype-aware defaults: a rounding step in dtype

    policy = p.detach()
    weights = torch.rand(labels.shape, generator=torch.Generator().manual_seed(5)).to(device)
    losses = {
        "tdpo1": lambda x, be: tidpo.tdpo_loss(x, q, labels, beta=0.1, variant=1, backend=be),
        "tdpo2": lambda x, be: tidpo.tdpo_loss(x, q, labels, beta=0.1, backend=be),
        "tis_released": lambda x, be: tidpo.tis_dpo_loss(x, labels, weights, ref_logits=q, beta=0.1,
                                                         token_level=True, backend=be),
        "tis_tdpo1": lambda x, be: tidpo.tis_dpo_loss(x, labels, weights, ref_logits=q, beta=0.1,
                                                      token_level=True, kl_form="paper_tdpo1", backend=be),
    }
    for name, fn in losses.items():
        results = []
        for backend in ("triton", "torch"):
            x = policy.clone().requires_grad_(True)
            res = fn(x, backend)
            results.append((res.loss, torch.autograd.grad(res.loss, x)[0], res.metrics["kl/chosen"]))
        torch.testing.assert_close(results[0][0], results[1][0], rtol=rtol, atol=rtol, msg=name)
        torch.testing.assert_close(results[0][2], results[1][2], rtol=rtol, atol=rtol, msg=name)
        torch.testing.assert_close(results[0][1], results[1][1], msg=name)


# ----------------------------------------------------------------------------------------------
# Interpreter tests: collected only inside test_interpreter_suite's TRITON_INTERPRET=1 subprocess
# ----------------------------------------------------------------------------------------------


@pytest.mark.interpreter
def interp_bf16_cast_rounds_to_nearest():
    """The kernel's bf16 store rounds like torch (RTNE): an exact check through the dq kernel.

    Proves the harness's ``_interpreter_bf16_rounds_to_nearest`` patch is in effect.
    """
    p = torch.full((1, 64), float("-inf"), dtype=torch.bfloat16)
    q = p.clone()
    p[0, 1] = 0.0  # p = onehot(1), q = onehot(0), both exact (lse = 0): dq = g * (q - p) = (g, -g, 0...)
    q[0, 0] = 0.0
    labels = torch.tensor([0])
    g = torch.tensor([1.0 + 2**-8 + 2**-10])  # 0.625 bf16 ulp above 1: RTNE gives 1 + 2**-7, truncation 1
    kl, lse_p, lse_q = token_kl_fwd(p, q, labels)
    assert float(kl[0]) == float("inf")  # p > 0 where q == 0
    _, dq = token_kl_bwd(p, q, labels, lse_p, lse_q, kl, g, need_dp=False)
    assert float(dq[0, 0]) == 1.0 + 2**-7 and float(dq[0, 1]) == -(1.0 + 2**-7), dq[0, :2]
    assert torch.all(dq[0, 2:] == 0)


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,block_v", INTERP_SHAPES, ids=lambda v: str(v))
def interp_values_and_grads(dtype, shape, block_v):
    p, q, labels, grad_out = _case(shape, dtype)
    _check_against_reference(p, q, labels, grad_out, block_v=block_v)


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def interp_triton_backend_matches_torch_backend(dtype):
    """token_kl(p, q) with grads for p, q, both; TDPO and TIS-DPO token_level losses: triton == torch."""
    _backend_matches_torch(dtype)


@pytest.mark.interpreter
def interp_independent_leading_strides():
    """p a ``[:, 1:]`` view, q a ``transpose(0, 1)`` of a ``[T, R, V]`` tensor: each read where it lies."""
    rows, length, vocab = 3, 5, 100
    p = make_logits((rows, length + 1, vocab), seed=1)[:, 1:]
    q = make_logits((length, rows, vocab), seed=2).transpose(0, 1)
    assert p.stride() != q.stride() and not q.is_contiguous()
    labels = make_labels(rows, length, vocab, seed=3)
    grad_out = torch.randn(rows, length, dtype=torch.float64)
    _check_against_reference(p, q, labels, grad_out, block_v=32)
    got = token_kl_fwd(p, q, labels, block_v=32)
    assert all(torch.equal(a, b) for a, b in zip(got, token_kl_fwd(p.contiguous(), q.contiguous(), labels,
                                                                   block_v=32), strict=True))


@pytest.mark.interpreter
def interp_identical_and_close_distributions():
    """KL(p || p) is exactly 0 with zero gradients; for p ~ q the fp32 error is no worse than torch's."""
    p, _, labels, grad_out = _case((3, 4, 1031), torch.float32)
    kl, lse_p, lse_q = token_kl_fwd(p, p, labels, block_v=256)
    assert torch.all(kl == 0) and torch.equal(lse_p, lse_q)
    dp, dq = token_kl_bwd(p, p, labels, lse_p, lse_q, kl, grad_out, block_v=256)
    assert torch.all(dp == 0) and torch.all(dq == 0)

    # policy ~ reference (the usual case in training): KL ~ 1e-4, a small difference of large terms.
    q = (p.double() + 0.01 * torch.randn(p.shape, dtype=torch.float64)).float()
    truth = R.token_kl(p.double(), q.double(), labels)
    kl, *_ = token_kl_fwd(p, q, labels, block_v=256)
    torch_fp32 = R.token_kl(p, q, labels)
    assert 0 < float(truth.max()) < 1e-3
    assert max_err(kl, truth) <= 2 * max_err(torch_fp32, truth) + 1e-7, (max_err(kl, truth),
                                                                         max_err(torch_fp32, truth))


@pytest.mark.interpreter
def interp_deterministic():
    p, q, labels, grad_out = _case((3, 4, 1031), torch.bfloat16)
    runs = []
    for _ in range(2):
        kl, lse_p, lse_q = token_kl_fwd(p, q, labels, block_v=256)
        runs.append((kl, lse_p, lse_q, *token_kl_bwd(p, q, labels, lse_p, lse_q, kl, grad_out, block_v=256)))
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b), "two runs must be bitwise equal"


@pytest.mark.interpreter
def interp_underflow_and_minus_inf_tiles_stay_finite():
    """Gaps > 104 nats (exp underflows in fp32) and whole -inf tiles (masked vocabulary) give no NaN."""
    V, block = 64, 16
    p, q = torch.zeros(5, V), torch.zeros(5, V)
    p[0, 0], q[0, 1] = 150.0, 150.0  # p ~ onehot(0), q ~ onehot(1): every other probability is exp(-150) = 0
    p[1, :32] = float("-inf")  # p's first two tiles entirely -inf: m_p stays -inf for two steps
    p[1, 40] = 150.0
    q[1, :16] = float("-inf")
    q[1, 50] = 30.0
    p[2, :16], q[2, 16:32] = -1e4, -1e4  # an early tile far below the later max: rescales to exactly 0
    p[2, 50] = 30.0
    p[3, 5::7] = q[3, 5::7] = float("-inf")  # scattered -inf in both (p = q = 0 there)
    p[3, 3::7] = float("-inf")  # and in p only (p = 0, q > 0)
    p[4] = q[4] = torch.linspace(-1e4, 1e4, V)  # identical rows with a huge spread: KL = 0
    labels = torch.tensor([3, 33, 2, 4, 0])
    grad_out = torch.tensor([1.0, -2.0, 0.5, 1.5, 1.0], dtype=torch.float64)

    naive_p, naive_q = p.softmax(-1), q.softmax(-1)  # the softmax().log() form: NaN here
    assert torch.isnan((naive_p * (naive_p.log() - naive_q.log())).sum(-1)[0])

    kl, lse_p, lse_q = token_kl_fwd(p, q, labels, block_v=block)
    for name, out in (("kl", kl), ("lse_p", lse_p), ("lse_q", lse_q)):
        assert torch.isfinite(out).all(), f"{name}: {out}"
    truth = R.token_kl(p.double(), q.double(), labels)
    assert_rel_close(kl, truth, 1e-6, "kl")
    assert float(kl[0]) == pytest.approx(150.0, rel=1e-6) and float(kl[4]) == 0.0
    dp, dq = token_kl_bwd(p, q, labels, lse_p, lse_q, kl, grad_out, block_v=block)
    assert torch.isfinite(dp).all() and torch.isfinite(dq).all()
    truth_dp, truth_dq = _grads64_closed_form(p, q, labels, grad_out)
    assert max_err(dp, truth_dp) <= 1e-6 and max_err(dq, truth_dq) <= 1e-6
    assert torch.all(dp[1, :32] == 0) and torch.all(dp[3, 5::7] == 0) and torch.all(dq[3, 5::7] == 0)
    assert torch.all(dq[1, :16] == 0), "p = q = 0 at -inf logits: no gradient"

    # Finite rows agree with the float64 autograd of the reference too (and torch in fp32).
    finite = torch.tensor([0, 2, 4])
    _check_against_reference(p[finite], q[finite], labels[finite], grad_out[finite], block_v=block, rel=1e-6)

    # p > 0 where q == 0: KL(p || q) = +inf, as in the reference.
    q_zero = torch.zeros(1, V)
    q_zero[0, 7] = float("-inf")
    kl_inf, *_ = token_kl_fwd(torch.zeros(1, V), q_zero, torch.tensor([0]), block_v=block)
    assert float(kl_inf[0]) == float("inf") == float(R.token_kl(torch.zeros(1, V).double(), q_zero.double(),
                                                                torch.tensor([0]))[0])


@pytest.mark.interpreter
def interp_int32_labels_and_custom_ignore_index():
    p, q, labels, grad_out = _case((3, 5, 100), torch.float32)
    labels = torch.where(labels == IGNORE, -1, labels)
    ref = token_kl_fwd(p, q, labels, -1, block_v=32)
    got = token_kl_fwd(p, q, labels.int(), -1, block_v=32)
    assert all(torch.equal(a, b) for a, b in zip(ref, got, strict=True))
    _check_against_reference(p, q, labels.int(), grad_out, block_v=32, ignore_index=-1)
    # -100 is an ordinary label when ignore_index is -1: the position counts (labels are not gathered).
    labels[0, 0] = IGNORE
    kl, *_ = token_kl_fwd(p, q, labels, -1)
    assert float(kl[0, 0]) == pytest.approx(float(R.token_kl(p[0, 0].double(), q[0, 0].double(),
                                                             torch.tensor(0))), rel=1e-5)


@pytest.mark.interpreter
def interp_empty_and_fully_masked():
    p, q = make_logits((2, 3, 11), torch.float16), make_logits((2, 3, 11), torch.float16, seed=1)
    labels = torch.full((2, 3), IGNORE)
    kl, lse_p, lse_q = token_kl_fwd(p, q, labels)
    assert torch.all(kl == 0) and torch.all(lse_p == 0) and torch.all(lse_q == 0)
    dp, dq = token_kl_bwd(p, q, labels, lse_p, lse_q, kl, torch.ones(2, 3))
    assert torch.all(dp == 0) and torch.all(dq == 0)
    empty = make_logits((0, 11), torch.float32)
    y = torch.zeros(0, dtype=torch.long)
    out = token_kl_fwd(empty, empty, y)
    assert all(o.shape == (0,) for o in out)
    dp, dq = token_kl_bwd(empty, empty, y, *out[1:], out[0], out[0])
    assert dp.shape == dq.shape == (0, 11)


def _every_public_loss():
    """(name, call(policy, ref, labels, weights, anchor, backend)) for every public loss and variant."""
    import tidpo

    return [
        ("dpo", lambda p, r, y, w, a, b: tidpo.dpo_loss(p, y, ref_logits=r, backend=b)),
        ("ipo", lambda p, r, y, w, a, b: tidpo.dpo_loss(p, y, ref_logits=r, loss_type="ipo", backend=b)),
        ("hinge", lambda p, r, y, w, a, b: tidpo.dpo_loss(p, y, ref_logits=r, loss_type="hinge", backend=b)),
        ("tdpo1", lambda p, r, y, w, a, b: tidpo.tdpo_loss(p, r, y, variant=1, backend=b)),
        ("tdpo2", lambda p, r, y, w, a, b: tidpo.tdpo_loss(p, r, y, variant=2, backend=b)),
        ("tis", lambda p, r, y, w, a, b: tidpo.tis_dpo_loss(p, y, w, ref_logits=r, backend=b)),
        ("tis_token_level", lambda p, r, y, w, a, b: tidpo.tis_dpo_loss(p, y, w, ref_logits=r, token_level=True,
                                                                        backend=b)),
        ("tis_paper_tdpo2", lambda p, r, y, w, a, b: tidpo.tis_dpo_loss(p, y, w, ref_logits=r, token_level=True,
                                                                        kl_form="paper_tdpo2", backend=b)),
        ("ti_dpo", lambda p, r, y, w, a, b: tidpo.ti_dpo_loss(p, r, y, w, anchor=a, gamma=0.5, kl_coef=0.1,
                                                              backend=b)),
    ]


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def interp_every_public_loss_triton_equals_torch(dtype):
    """Every public loss: backend='triton' (logp + KL kernels, inline pair reduction) == backend='torch'."""
    import tidpo

    logits, ref, labels, _ = _case((4, 6, 300), dtype, masked_rows=(1,), seed=21)  # strided policy view
    weights = torch.rand(labels.shape, generator=torch.Generator().manual_seed(23)) + 0.5
    anchor_logits = make_logits((2, 5, 300), dtype, seed=24)
    anchor = tidpo.TripletAnchor(anchor_logits, make_labels(2, 5, 300, seed=25),
                                 ref_logits=make_logits((2, 5, 300), dtype, seed=26))
    for name, call in _every_public_loss():
        results = []
        for backend in ("triton", "torch"):
            x = logits.detach().clone().requires_grad_(True)
            a = anchor._replace(logits=anchor_logits.detach().clone().requires_grad_(True))
            out = call(x, ref, labels, weights, a, backend)
            grads = torch.autograd.grad(out.loss, (x, a.logits), allow_unused=True)
            results.append((out.losses.detach(), grads))
        (la, ga), (lb, gb) = results
        torch.testing.assert_close(la, lb, rtol=1e-5, atol=1e-6, msg=name)
        for g_triton, g_torch in zip(ga, gb, strict=True):
            if g_torch is None:
                assert g_triton is None or torch.all(g_triton == 0), name
            else:
                torch.testing.assert_close(g_triton, g_torch, msg=name)


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def interp_autograd_only_differentiates_what_requires_grad(dtype):
    """TokenKL on the kernels: gradients only for the inputs that need them (a reference model's never do)."""
    from tidpo.ops.autograd import TokenKL
    from tidpo.ops.backend import implementation

    p, q, labels, grad_out = _case((2, 3, 100), dtype)
    kl, lse_p, lse_q = token_kl_fwd(p, q, labels)
    both = token_kl_bwd(p, q, labels, lse_p, lse_q, kl, grad_out)
    for grad_p, grad_q in GRAD_FLAGS:
        p_in = p.detach().clone().requires_grad_(grad_p)
        q_in = q.detach().clone().requires_grad_(grad_q)
        out, _, _ = TokenKL.apply(p_in, q_in, labels, IGNORE, implementation("triton"), 64)
        assert out.requires_grad
        out.backward(grad_out.float())
        assert (p_in.grad is None) == (not grad_p) and (q_in.grad is None) == (not grad_q)
        if grad_p:
            assert torch.equal(p_in.grad, both[0])
        if grad_q:
            assert torch.equal(q_in.grad, both[1])


if given is not None:

    @pytest.mark.interpreter
    @settings(max_examples=15, deadline=None, database=None, derandomize=True)
    @given(
        dtype=st.sampled_from(DTYPES),
        rows=st.integers(1, 3),
        length=st.integers(1, 6),
        vocab=st.integers(1, 300),
        block_v=st.sampled_from([None, 16, 32, 64]),
        ignore_frac=st.sampled_from([0.0, 0.25, 0.6, 1.0]),
        layout=st.sampled_from(["3d", "p-strided", "q-strided", "both-strided", "2d"]),
        scale=st.sampled_from([0.01, 3.0, 20.0]),
        seed=st.integers(0, 2**16),
    )
    def interp_fuzz_shapes_masks_dtypes(dtype, rows, length, vocab, block_v, ignore_frac, layout, scale, seed):
        full_p = make_logits((rows, length + 1, vocab), dtype, scale=scale, seed=seed)
        full_q = make_logits((rows, length + 1, vocab), dtype, scale=scale, seed=seed + 7)

        def pick(full, strided):
            return full[:, :-1] if strided else full[:, 1:].contiguous()

        if layout == "2d":
            p, q = full_p[0], full_q[0]
        else:
            p = pick(full_p, layout in ("p-strided", "both-strided"))
            q = pick(full_q, layout in ("q-strided", "both-strided"))
        labels = make_labels(rows, length + 1, vocab, ignore_frac=ignore_frac, seed=seed + 1)
        labels = labels[0] if layout == "2d" else labels[:, :-1]
        grad_out = torch.randn(labels.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        _check_against_reference(p, q, labels, grad_out, block_v=block_v)


@pytest.mark.interpreter
@pytest.mark.skipif(INTERPRET, reason="this test is the driver that starts the interpreter subprocess")
def test_interpreter_suite():
    """Run every ``interp_*`` case above under ``TRITON_INTERPRET=1`` in one subprocess (see module doc)."""
    run_interpreter_suite(__file__, globals())


# ----------------------------------------------------------------------------------------------
# Compile-only: every kernel variant for sm_80 and sm_90 without a GPU
# ----------------------------------------------------------------------------------------------

SIGNATURES = [] if INTERPRET else kernels.compile_signatures()
SMALL_SIGNATURES = [] if INTERPRET else kernels.compile_signatures(vocab=100)  # BLOCK_V 128, 1 warp


@pytest.mark.compile_only
@pytest.mark.skipif(INTERPRET, reason="kernels are interpreted in this process; nothing to compile")
@pytest.mark.parametrize("capability", [80, 90])
@pytest.mark.parametrize("entry", SIGNATURES, ids=[e["name"] for e in SIGNATURES])
def test_compiles_for_sm80_sm90(entry, capability, fresh_triton_cache, tmp_path):
    check_compiles(entry, capability, tmp_path)


@pytest.mark.compile_only
@pytest.mark.skipif(INTERPRET, reason="kernels are interpreted in this process; nothing to compile")
@pytest.mark.parametrize("entry", SMALL_SIGNATURES, ids=[e["name"] for e in SMALL_SIGNATURES])
def test_compiles_small_vocab_config(entry, fresh_triton_cache):
    check_small_vocab_compiles(entry)


def test_compile_signatures_cover_every_variant():
    # (3 one-dtype pairs x 2 label dtypes + 4 mixed pairs with int64 labels) x (fwd, bwd dp, bwd dq, bwd dp+dq)
    check_compile_signatures(kernels, SIGNATURES, count=40, constexprs={"BLOCK_V", "NEED_DP", "NEED_DQ"},
                             why="runtime scalars stay runtime")


def test_kernel_config():
    assert kernels.kernel_config(1) == (16, 1)
    assert kernels.kernel_config(7) == (16, 1)
    assert kernels.kernel_config(1031) == (2048, 8)
    assert kernels.kernel_config(4096) == (4096, 16)
    assert kernels.kernel_config(32000) == (4096, 16)
    assert kernels.kernel_config(128256) == (4096, 16)


# ----------------------------------------------------------------------------------------------
# Launcher argument errors (normal process: every check runs before the device check)
# ----------------------------------------------------------------------------------------------


def _fwd_errors():
    p = make_logits((2, 3, 11), torch.float32)
    q = make_logits((2, 3, 11), torch.float32, seed=1)
    y = make_labels(2, 3, 11)
    not_unit = torch.zeros(2, 11, 3).transpose(1, 2)  # shape (2, 3, 11), stride 3 along V
    return [
        ((p.tolist(), q, y), TypeError, "p_logits must be a torch.Tensor"),
        ((p, q.tolist(), y), TypeError, "q_logits must be a torch.Tensor"),
        ((p.double(), q.double(), y), TypeError, "p_logits must be float32, float16 or bfloat16"),
        ((p, q.double(), y), TypeError, "q_logits must be float32, float16 or bfloat16"),
        ((p[0, 0], q[0, 0], y), ValueError, r"p_logits must have shape \[N, V\] or \[R, T, V\]"),
        ((p, q[0], y), ValueError, r"q_logits shape \(3, 11\) does not match p_logits shape \(2, 3, 11\)"),
        ((p[..., :0], q[..., :0], y), ValueError, "p_logits has an empty vocabulary"),
        ((p, not_unit, y), ValueError, "q_logits must have unit stride along the vocabulary"),
        ((not_unit, q, y), ValueError, "p_logits must have unit stride along the vocabulary"),
        ((p, q.to("meta"), y), ValueError, "q_logits is on meta but p_logits is on cpu"),
        ((p, q, y.float()), TypeError, "labels must be an integer tensor"),
        ((p, q, y.to(torch.int16)), TypeError, "labels must be an integer tensor"),
        ((p, q, y[:, :2]), ValueError, r"labels shape \(2, 2\) does not match p_logits shape"),
        ((p, q, y.to("meta")), ValueError, "labels is on meta but p_logits is on cpu"),
        ((p, q, y, 1.5), TypeError, "ignore_index must be an int"),
    ]


@pytest.mark.parametrize("args,exc,match", _fwd_errors())
def test_fwd_launcher_argument_errors(args, exc, match):
    with pytest.raises(exc, match=match):
        token_kl_fwd(*args)


def test_bwd_launcher_argument_errors():
    p = make_logits((2, 3, 11), torch.bfloat16)
    q = make_logits((2, 3, 11), torch.bfloat16, seed=1)
    y = make_labels(2, 3, 11)
    lse, kl, g = torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 3)
    cases = [
        ((p, q, y, lse.double(), lse, kl, g), {}, TypeError, "lse_p must be the float32 output of token_kl_fwd"),
        ((p, q, y, lse, lse[:, :2], kl, g), {}, ValueError, "lse_q shape"),
        ((p, q, y, lse, lse, kl.half(), g), {}, TypeError, "kl must be the float32 output"),
        ((p, q, y, lse, lse, kl, g.long()), {}, TypeError, "grad_kl must be floating point"),
        ((p, q, y, lse, lse, kl, g[0]), {}, ValueError, "grad_kl shape"),
        ((p, q, y, lse, lse, kl, g, -100.0), {}, TypeError, "ignore_index must be an int"),
        ((p, q, y, lse, lse, kl, g), {"need_dp": False, "need_dq": False}, ValueError,
         "need_dp and need_dq are both False"),
        ((p, q, y, lse, lse, kl, g), {"need_dq": 1}, TypeError, "need_dq must be a bool"),
        ((p, q, y, lse, lse, kl, g), {"block_v": 48}, ValueError, "block_v must be a power of two"),
        ((p, q, y, lse, lse, kl, g), {"num_warps": 3}, ValueError, "num_warps must be"),
    ]
    for args, kwargs, exc, match in cases:
        with pytest.raises(exc, match=match):
            token_kl_bwd(*args, **kwargs)


@pytest.mark.skipif(INTERPRET, reason="CPU tensors are allowed under the interpreter")
def test_cpu_tensors_need_the_interpreter():
    p, q, y = make_logits((2, 11)), make_logits((2, 11), seed=1), torch.tensor([1, 2])
    with pytest.raises(ValueError, match="p_logits is on cpu; the Triton kernels need CUDA tensors"):
        token_kl_fwd(p, q, y)
    with pytest.raises(ValueError, match="p_logits is on cpu"):
        token_kl_bwd(p, q, y, torch.zeros(2), torch.zeros(2), torch.zeros(2), torch.ones(2))


def test_auto_backend_needs_both_logits_to_suit_the_kernels(monkeypatch):
    """``auto`` runs a pair the kernels cannot take (float64, q not unit-stride) on the torch path and a mixed
    fp32 / bf16 pair on the kernels (each read in its own dtype); an explicit ``triton`` keeps the request (the
    launcher then names the problem)."""
    import tidpo.ops as ops

    def fake_resolve(backend, logits, op="logps"):  # resolve_backend as on a CUDA machine
        assert op == "kl"
        if backend in (None, "auto"):
            fits = logits.dtype in (torch.float32, torch.float16, torch.bfloat16) and logits.stride(-1) == 1
            return "triton" if fits else "torch"
        return backend

    monkeypatch.setattr(ops, "resolve_backend", fake_resolve)
    monkeypatch.delenv("TIDPO_BACKEND", raising=False)
    bf16, fp32 = torch.zeros(2, 3, dtype=torch.bfloat16), torch.zeros(2, 3)
    assert ops._kl_backend("auto", bf16, bf16) == "triton"
    assert ops._kl_backend(None, bf16, bf16) == "triton"
    assert ops._kl_backend("auto", bf16, fp32) == "triton"
    assert ops._kl_backend("auto", fp32, bf16) == "triton"
    assert ops._kl_backend("auto", fp32, fp32.double()) == "torch"
    assert ops._kl_backend("auto", fp32, torch.zeros(3, 2).t()) == "torch"
    assert ops._kl_backend("triton", bf16, fp32) == "triton"
    assert ops._kl_backend("torch", bf16, bf16) == "torch"
    monkeypatch.setenv("TIDPO_BACKEND", "triton")
    assert ops._kl_backend(None, bf16, fp32.double()) == "triton"
    monkeypatch.setenv("TIDPO_BACKEND", "auto")
    assert ops._kl_backend(None, bf16, fp32.double()) == "torch"


# ----------------------------------------------------------------------------------------------
# GPU: the same checks at realistic shapes (skipped without CUDA)
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,block_v", [((4, 128, 32000), None), ((2, 32, 128256), None),
                                           ((8, 128, 5003), 1024), ((300, 1031), None)], ids=str)
@pytest.mark.gpu
@requires_cuda
def test_gpu_values_and_grads(dtype, shape, block_v):
    p, q, labels, grad_out = _case(shape, dtype, device="cuda")
    _check_against_reference(p, q, labels, grad_out, block_v=block_v)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.gpu
@requires_cuda
def test_gpu_backend_dispatch(dtype):
    from tidpo.ops.backend import resolve_backend

    p, q, labels, grad_out = _case((4, 128, 32000), dtype, device="cuda")
    assert resolve_backend("auto", p, op="kl") == "triton"
    _backend_matches_torch(dtype, "cuda", shape=(4, 64, 32000), rtol=1e-5)
    runs = []
    for _ in range(2):
        kl, lse_p, lse_q = token_kl_fwd(p, q, labels)
        runs.append((kl, lse_p, lse_q, *token_kl_bwd(p, q, labels, lse_p, lse_q, kl, grad_out)))
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True)), "two runs must be bitwise equal"


@pytest.mark.slow
@pytest.mark.gpu
@requires_cuda
def test_gpu_more_than_2_31_elements():
    """N * V > 2**31: int64 offsets. Checked on the last rows, where int32 offsets would wrap."""
    vocab, n = 128256, 2**31 // 128256 + 64
    if torch.cuda.get_device_properties(0).total_memory < 5 * n * vocab * 2 + 2**30:
        pytest.skip("not enough GPU memory for four bf16 [N, 128256] tensors")
    gen = torch.Generator("cuda").manual_seed(0)
    p = torch.empty(n, vocab, dtype=torch.bfloat16, device="cuda").normal_(0, 3, generator=gen)
    q = torch.empty(n, vocab, dtype=torch.bfloat16, device="cuda").normal_(0, 3, generator=gen)
    labels = torch.zeros(n, dtype=torch.long, device="cuda")
    kl, lse_p, lse_q = token_kl_fwd(p, q, labels)
    tail = slice(n - 64, n)
    assert_rel_close(kl[tail], R.token_kl(p[tail].double(), q[tail].double(), labels[tail]), 1e-5,
                     "kl beyond 2**31 elements")
    g = torch.ones(n, device="cuda")
    dp, dq = token_kl_bwd(p, q, labels, lse_p, lse_q, kl, g)
    truth_dp, truth_dq = _grads64(p[tail], q[tail], labels[tail], g[tail])
    assert max_err(dp[tail], truth_dp) < 1e-2 and max_err(dq[tail], truth_dq) < 1e-2
