"""Fused Triton per-token log-prob kernels (``tidpo.kernels.logps``) and ``TritonTokenLogps``.

Three kinds of tests, by marker (the machinery they share, and why it is built this way, is in
``tests/kernel_harness.py``; read its module docstring):

- ``interpreter``: the kernels run on CPU in the Triton interpreter and are checked against the float64
  reference (forward logp / lse / entropy, backward dlogits) and against the chunked torch path. They
  are collected only in the ONE ``TRITON_INTERPRET=1`` pytest subprocess that ``test_interpreter_suite``
  runs on this very file with ``-o python_functions=interp_*`` (only the ``interp_*`` functions there,
  only the ``test_*`` ones here); in that subprocess the interpreter's fp32 -> bf16 cast is made to
  round to nearest like the GPU (the harness's ``_interpreter_bf16_rounds_to_nearest``, imported here).
- ``compile_only``: every kernel variant is compiled with ``triton.compile`` for sm_80 and sm_90
  (no GPU needed: Triton ships ``ptxas``), which catches everything the interpreter does not
  (types, layouts, register spills).
- ``gpu``: the same value/gradient checks at realistic shapes on a CUDA device; skipped without one.

Shapes on purpose: V = 7 (tiny, odd, one partial tile), V = 100 with 64-wide tiles and V = 1031 with
256-wide tiles (several tiles, the last one partial; test-only ``block_v`` override), V = 1031 in one
default 2048-wide tile (2-D logits), V = 32000 (realistic, 4 default 8192-wide tiles, few rows).
"""

from __future__ import annotations

import importlib

import pytest
import torch

from tests.conftest import IGNORE, assert_rel_close, assert_within_torch_error, make_labels, make_logits
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
    requires_cuda,
    run_interpreter_suite,
    settings,
    st,
)
from tests.kernel_harness import logits_case as _case
from tidpo import reference as R

# Only a missing Triton skips these tests; kernels that do not import beside Triton fail them.
pytest.importorskip("triton", reason="Triton is not installed")
kernels = importlib.import_module("tidpo.kernels.logps")
token_logps_fwd, token_logps_bwd = kernels.token_logps_fwd, kernels.token_logps_bwd


# ----------------------------------------------------------------------------------------------
# Shared checks (used by the interpreter and the GPU tests)
# ----------------------------------------------------------------------------------------------


def _entropy64(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE) -> torch.Tensor:
    """``-sum_v p_v log p_v`` in float64 with 0 log 0 = 0; 0 at ignored positions."""
    logp = torch.log_softmax(logits.detach().double(), -1)
    p = logp.exp()
    h = -torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(-1)
    return torch.where(labels != ignore_index, h, torch.zeros_like(h))


def _check_against_reference(logits, labels, grad_out, *, block_v=None, ignore_index=IGNORE, rel=1e-5):
    """Kernel forward (logp, lse, entropy) and backward vs float64 on the same values and torch in dtype."""
    dtype, valid = logits.dtype, labels != ignore_index
    logps, lse, ent = token_logps_fwd(logits, labels, ignore_index, with_entropy=True, block_v=block_v)
    logps2, lse2, no_ent = token_logps_fwd(logits, labels, ignore_index, block_v=block_v)
    assert no_ent is None and torch.equal(logps, logps2) and torch.equal(lse, lse2), "HAS_ENTROPY changed logps"
    assert logps.dtype == lse.dtype == ent.dtype == torch.float32 and logps.shape == labels.shape

    x64 = logits.detach().double()
    assert_rel_close(logps, R.token_logps(x64, labels, ignore_index), rel, "logps")
    assert_rel_close(lse, torch.where(valid, torch.logsumexp(x64, -1), 0.0), rel, "lse")
    assert_rel_close(ent, _entropy64(x64, labels, ignore_index), rel, "entropy")
    for name, out in (("logps", logps), ("lse", lse), ("entropy", ent)):
        assert torch.all(out[~valid] == 0), f"{name} must be 0 at ignored positions"

    dlogits = token_logps_bwd(logits, labels, lse, grad_out.float(), ignore_index, block_v=block_v)
    assert dlogits.dtype == dtype and dlogits.shape == logits.shape and dlogits.is_contiguous()
    truth_in = x64.clone().requires_grad_(True)
    (truth_grad,) = torch.autograd.grad(R.token_logps(truth_in, labels, ignore_index), truth_in, grad_out.double())
    base_in = logits.detach().clone().requires_grad_(True)
    base = R.token_logps(base_in, labels, ignore_index)
    (base_grad,) = torch.autograd.grad(base, base_in, grad_out.to(base.dtype))
    assert_within_torch_error(dlogits, truth_grad, base_grad, atol=1e-6, what=f"dlogits {dtype}")
    assert torch.all(dlogits[~valid] == 0), "ignored positions must get a zero gradient row"


def _inplace_gives_same_gradient(dtype, device="cpu", shape=(3, 9, 300), backend="triton"):
    from tidpo.ops.autograd import TokenLogps
    from tidpo.ops.backend import implementation

    rows, length, vocab = shape
    w = make_logits(shape, dtype).to(device).requires_grad_(True)
    labels = make_labels(rows, length - 1, vocab, masked_rows=(1,)).to(device)
    g = torch.randn(rows, length - 1, device=device)
    grads, bases = [], []
    for inplace in (False, True):
        base = w * 1  # a non-leaf the op may overwrite, like a model's output logits
        out, _ = TokenLogps.apply(base[:, :-1], labels, IGNORE, implementation(backend), 64, inplace)
        (grad,) = torch.autograd.grad(out, w, g)
        grads.append(grad)
        bases.append(base.detach())
    assert torch.equal(grads[0], grads[1]), "in-place backward must give the same gradient"
    assert torch.equal(bases[0], w.detach()), "the default backward must leave the logits intact"
    assert torch.equal(bases[1][:, :-1], grads[1][:, :-1]), "in place: the logits buffer now holds dlogits"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_inplace_gives_same_gradient_on_the_torch_path(dtype):
    """The one autograd function takes ``inplace`` on either backend; the chunked path writes over the logits too."""
    _inplace_gives_same_gradient(dtype, backend="torch")


# ----------------------------------------------------------------------------------------------
# Interpreter tests: collected only inside test_interpreter_suite's TRITON_INTERPRET=1 subprocess
# ----------------------------------------------------------------------------------------------


@pytest.mark.interpreter
def interp_bf16_cast_rounds_to_nearest():
    """The kernel's bf16 store rounds like torch (RTNE): an exact check through the backward kernel.

    Proves the harness's ``_interpreter_bf16_rounds_to_nearest`` patch is in effect.
    """
    vocab = 4096
    logits = torch.zeros(1, vocab, dtype=torch.bfloat16)  # p = 1/V for every entry
    labels = torch.tensor([0])
    # g * (1 - 1/V) = 1 + 2**-8 + 2**-10: 0.625 bf16 ulp above 1, so RTNE gives 1 + 2**-7, truncation 1.
    g = torch.tensor([(1.0 + 2**-8 + 2**-10) / (1 - 1 / vocab)])
    _, lse, _ = token_logps_fwd(logits, labels)
    dlogits = token_logps_bwd(logits, labels, lse, g)
    assert float(dlogits[0, 0]) == 1.0 + 2**-7, float(dlogits[0, 0])



@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,block_v", INTERP_SHAPES, ids=lambda v: str(v))
def interp_values_and_grads(dtype, shape, block_v):
    logits, labels, grad_out = _case(shape, dtype)
    _check_against_reference(logits, labels, grad_out, block_v=block_v)


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def interp_triton_backend_matches_torch_backend(dtype):
    """tidpo.token_logps / dpo_loss: backend='triton' (kernels) == backend='torch' (chunked path)."""
    import tidpo
    from tidpo.ops import token_logps_and_lse

    logits, labels, grad_out = _case((4, 6, 1031), dtype, masked_rows=(2,), seed=3)
    outs, grads = [], []
    for backend in ("triton", "torch"):
        x = logits.detach().clone().requires_grad_(True)
        out = tidpo.token_logps(x, labels, backend=backend)
        (grad,) = torch.autograd.grad(out, x, grad_out.float())
        outs.append(out)
        grads.append(grad)
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grads[0], grads[1])  # dtype-aware defaults: a rounding step in dtype
    _, lse_triton = token_logps_and_lse(logits, labels, backend="triton")
    _, lse_torch = token_logps_and_lse(logits, labels, backend="torch")
    valid = labels != IGNORE
    torch.testing.assert_close(lse_triton[valid], lse_torch[valid], rtol=1e-6, atol=1e-6)
    assert torch.all(lse_triton[~valid] == 0)

    ref = make_logits(logits.shape, dtype, seed=9)
    losses = []
    for backend in ("triton", "torch"):
        x = logits.detach().clone().requires_grad_(True)
        res = tidpo.dpo_loss(x, labels, ref_logits=ref, beta=0.1, backend=backend)
        losses.append((res.loss, torch.autograd.grad(res.loss, x)[0]))
    torch.testing.assert_close(losses[0][0], losses[1][0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(losses[0][1], losses[1][1])


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["rows", "segments"])
def interp_pair_reduction_applied_inline(dtype, layout):
    """bwd with seq_grad: g_t = grad_t + w_t * seq_grad[seq(t)], inline == the plain bwd given that g."""
    logits, labels, grad_out = _case((4, 6, 300), dtype, masked_rows=(1,), seed=5)
    g = torch.Generator().manual_seed(6)
    weights = torch.rand(labels.shape, generator=g) + 0.5
    seq_grad = torch.randn(4, generator=g)
    _, lse, _ = token_logps_fwd(logits, labels, block_v=64)
    if layout == "rows":
        flat_logits, flat_labels, flat_w, flat_grad = logits, labels, weights, grad_out.float()
        segments, per_token = None, seq_grad[:, None].expand(labels.shape)
        flat_lse = lse
    else:  # the same positions seen as one packed row with segment ids, sequences in reversed order
        flat_logits, flat_labels = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)
        flat_w, flat_grad, flat_lse = weights.reshape(-1), grad_out.float().reshape(-1), lse.reshape(-1)
        segments = (3 - torch.arange(4)).repeat_interleave(labels.shape[1])
        per_token = seq_grad[segments]
    fused = token_logps_bwd(flat_logits, flat_labels, flat_lse, flat_grad, seq_grad=seq_grad, weights=flat_w,
                            segments=segments, block_v=64)
    explicit = token_logps_bwd(flat_logits, flat_labels, flat_lse, flat_grad + flat_w * per_token.reshape(-1)
                               if segments is not None else flat_grad + flat_w * per_token, block_v=64)
    torch.testing.assert_close(fused, explicit, rtol=0, atol=0)


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def interp_weighted_losses_triton_equals_torch(dtype):
    """TIS-DPO and TI-DPO (fused pair reduction, padded and packed) give the torch path's results."""
    import tidpo

    logits, labels, _ = _case((4, 6, 300), dtype, masked_rows=(1,), seed=7)
    ref = make_logits(logits.shape, dtype, seed=8)
    weights = torch.rand(labels.shape, generator=torch.Generator().manual_seed(9)) + 0.5
    packing = tidpo.SequencePacking(torch.arange(4).repeat_interleave(labels.shape[1]), 2)
    results = {}
    for backend in ("triton", "torch"):
        for layout in ("padded", "packed"):
            x = logits.detach().clone().requires_grad_(True)
            if layout == "padded":
                out = tidpo.tis_dpo_loss(x, labels, weights, ref_logits=ref, backend=backend)
            else:
                out = tidpo.tis_dpo_loss(x.reshape(-1, x.shape[-1]), labels.reshape(-1), weights.reshape(-1),
                                         ref_logits=ref.reshape(-1, ref.shape[-1]), packing=packing, backend=backend)
            results[backend, layout] = (out.losses.detach(), torch.autograd.grad(out.loss, x)[0])
    for layout in ("padded", "packed"):
        (la, ga), (lb, gb) = results["triton", layout], results["torch", layout]
        torch.testing.assert_close(la, lb, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(ga, gb)


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def interp_inplace_gives_same_gradient(dtype):
    _inplace_gives_same_gradient(dtype)


@pytest.mark.interpreter
def interp_deterministic():
    logits, labels, grad_out = _case((3, 4, 1031), torch.bfloat16)
    runs = []
    for _ in range(2):
        logps, lse, ent = token_logps_fwd(logits, labels, with_entropy=True, block_v=256)
        runs.append((logps, lse, ent, token_logps_bwd(logits, labels, lse, grad_out, block_v=256)))
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b), "two runs must be bitwise equal"


@pytest.mark.interpreter
def interp_underflow_and_minus_inf_tiles_stay_finite():
    """Gaps > 104 nats (exp underflows in fp32) and whole -inf tiles (masked vocabulary) give no NaN."""
    V, block = 64, 16
    x = torch.zeros(4, V)
    x[0, 0] = 150.0  # every other token has probability exp(-150) = 0 in fp32
    x[1, :32] = float("-inf")  # the first two tiles are entirely -inf: m stays -inf for two steps
    x[1, 40] = 150.0
    x[2, :16] = -1e4  # an early tile far below the later max: its terms rescale to exactly 0
    x[2, 50] = 30.0
    x[3, 5::7] = float("-inf")  # scattered -inf entries in every tile
    labels = torch.tensor([3, 33, 2, 4])
    grad_out = torch.tensor([1.0, -2.0, 0.5, 1.5], dtype=torch.float64)
    logps, lse, ent = token_logps_fwd(x, labels, with_entropy=True, block_v=block)
    for name, out in (("logps", logps), ("lse", lse), ("entropy", ent)):
        assert torch.isfinite(out).all(), f"{name}: {out}"
    assert float(logps[0]) == pytest.approx(-150.0, rel=1e-6)
    assert float(logps[1]) == pytest.approx(-150.0, rel=1e-6)
    _check_against_reference(x, labels, grad_out, block_v=block, rel=1e-6)
    dlogits = token_logps_bwd(x, labels, lse, grad_out.float(), block_v=block)
    assert torch.isfinite(dlogits).all()
    assert torch.all(dlogits[1, :32] == 0) and torch.all(dlogits[3, 5::7] == 0), "p = 0 at -inf logits"


@pytest.mark.interpreter
def interp_int32_labels_and_custom_ignore_index():
    logits, labels, grad_out = _case((3, 5, 100), torch.float32)
    labels = torch.where(labels == IGNORE, -1, labels)
    ref = token_logps_fwd(logits, labels, -1, block_v=32)
    got = token_logps_fwd(logits, labels.int(), -1, block_v=32)
    assert torch.equal(ref[0], got[0]) and torch.equal(ref[1], got[1])
    _check_against_reference(logits, labels.int(), grad_out, block_v=32, ignore_index=-1)
    # -100 is an ordinary (out-of-range) label when ignore_index is -1: flagged as NaN, never read.
    labels[0, 0] = IGNORE
    assert torch.isnan(token_logps_fwd(logits, labels, -1)[0][0, 0])


@pytest.mark.interpreter
def interp_empty_and_fully_masked():
    logits = make_logits((2, 3, 11), torch.float16)
    labels = torch.full((2, 3), IGNORE)
    logps, lse, ent = token_logps_fwd(logits, labels, with_entropy=True)
    assert torch.all(logps == 0) and torch.all(lse == 0) and torch.all(ent == 0)
    assert torch.all(token_logps_bwd(logits, labels, lse, torch.ones(2, 3)) == 0)
    empty = make_logits((0, 11), torch.float32)
    out = token_logps_fwd(empty, torch.zeros(0, dtype=torch.long))
    assert out[0].shape == (0,) and token_logps_bwd(empty, torch.zeros(0, dtype=torch.long), out[1],
                                                    out[0]).shape == (0, 11)


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
        layout=st.sampled_from(["3d", "3d-strided", "2d"]),
        seed=st.integers(0, 2**16),
    )
    def interp_fuzz_shapes_masks_dtypes(dtype, rows, length, vocab, block_v, ignore_frac, layout, seed):
        full = make_logits((rows, length + 1, vocab), dtype, seed=seed)
        logits = {"3d": full[:, 1:].contiguous(), "3d-strided": full[:, :-1], "2d": full[0]}[layout]
        labels = make_labels(rows, length + 1, vocab, ignore_frac=ignore_frac, seed=seed + 1)
        labels = labels[0] if layout == "2d" else labels[:, :-1]
        grad_out = torch.randn(labels.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        _check_against_reference(logits, labels, grad_out, block_v=block_v)


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
    # 3 logits dtypes x 2 label dtypes x (fwd, fwd+entropy, bwd, bwd+rows reduction, bwd+segments reduction)
    check_compile_signatures(kernels, SIGNATURES, count=30,
                             constexprs={"BLOCK_V", "HAS_ENTROPY", "HAS_SEQ_GRAD", "HAS_SEGMENTS"},
                             why="only block sizes and categorical flags are constexpr; runtime scalars stay runtime")


def test_kernel_config():
    assert kernels.kernel_config(7) == (16, 1)
    assert kernels.kernel_config(1031) == (2048, 4)
    assert kernels.kernel_config(4096) == (4096, 8)
    assert kernels.kernel_config(32000) == (8192, 16)
    assert kernels.kernel_config(128256) == (8192, 16)


# ----------------------------------------------------------------------------------------------
# Launcher argument errors (normal process: every check runs before the device check)
# ----------------------------------------------------------------------------------------------


def _fwd_errors():
    x = make_logits((2, 3, 11), torch.float32)
    y = make_labels(2, 3, 11)
    return [
        ((x.tolist(), y), TypeError, "logits must be a torch.Tensor"),
        ((x.double(), y), TypeError, "logits must be float32, float16 or bfloat16"),
        ((x.long(), y), TypeError, "logits must be float32"),
        ((x[0, 0], y), ValueError, r"logits must have shape \[N, V\] or \[R, T, V\]"),
        ((x.unsqueeze(0), y), ValueError, "logits must have shape"),
        ((x[..., :0], y), ValueError, "logits has an empty vocabulary"),
        ((x.transpose(1, 2)[:, :3], y), ValueError, "logits must have unit stride along the vocabulary"),
        ((x, y.float()), TypeError, "labels must be an integer tensor"),
        ((x, y.to(torch.int16)), TypeError, "labels must be an integer tensor"),
        ((x, y[:, :2]), ValueError, "labels shape"),
        ((x, y.to("meta")), ValueError, "labels is on meta but logits is on cpu"),
        ((x, y, 1.5), TypeError, "ignore_index must be an int"),
    ]


@pytest.mark.parametrize("args,exc,match", _fwd_errors())
def test_fwd_launcher_argument_errors(args, exc, match):
    with pytest.raises(exc, match=match):
        token_logps_fwd(*args)


def test_bwd_launcher_argument_errors():
    x = make_logits((2, 3, 11), torch.bfloat16)
    y = make_labels(2, 3, 11)
    lse, g = torch.zeros(2, 3), torch.ones(2, 3)
    cases = [
        ((x, y, lse.double(), g), {}, TypeError, "lse must be the float32 log-sum-exp"),
        ((x, y, lse[:, :2], g), {}, ValueError, "lse shape"),
        ((x, y, lse, g.long()), {}, TypeError, "grad_logps must be floating point"),
        ((x, y, lse, g[0]), {}, ValueError, "grad_logps shape"),
        ((x, y, lse, g, -100.0), {}, TypeError, "ignore_index must be an int"),
        ((x[:1].expand(2, 3, 11), y, lse, g), {"inplace": True}, ValueError,
         "logits has overlapping rows"),
        ((x, y, lse, g), {"block_v": 48}, ValueError, "block_v must be a power of two"),
        ((x, y, lse, g), {"num_warps": 3}, ValueError, "num_warps must be"),
    ]
    for args, kwargs, exc, match in cases:
        with pytest.raises(exc, match=match):
            token_logps_bwd(*args, **kwargs)


@pytest.mark.skipif(INTERPRET, reason="CPU tensors are allowed under the interpreter")
def test_cpu_tensors_need_the_interpreter():
    x, y = make_logits((2, 11), torch.float32), torch.tensor([1, 2])
    with pytest.raises(ValueError, match="logits is on cpu; the Triton kernels need CUDA tensors"):
        token_logps_fwd(x, y)
    with pytest.raises(ValueError, match="logits is on cpu"):
        token_logps_bwd(x, y, torch.zeros(2), torch.ones(2))


def test_rows_overlap():
    from tidpo.kernels._launch import rows_overlap

    x = torch.zeros(3, 5, 7)
    assert not rows_overlap(x)
    assert not rows_overlap(x[:, :-1])
    assert not rows_overlap(torch.zeros(5, 3, 7).transpose(0, 1))
    assert rows_overlap(torch.zeros(1, 5, 7).expand(3, 5, 7))
    assert rows_overlap(torch.zeros(3, 7).unsqueeze(1).expand(3, 4, 7))
    assert not rows_overlap(torch.zeros(1, 1, 7).expand(1, 1, 7))


# ----------------------------------------------------------------------------------------------
# GPU: the same checks at realistic shapes (skipped without CUDA)
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,block_v", [((4, 256, 32000), None), ((2, 64, 128256), None),
                                           ((8, 128, 5003), 1024), ((300, 1031), None)], ids=str)
@pytest.mark.gpu
@requires_cuda
def test_gpu_values_and_grads(dtype, shape, block_v):
    logits, labels, grad_out = _case(shape, dtype, device="cuda")
    _check_against_reference(logits, labels, grad_out, block_v=block_v)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.gpu
@requires_cuda
def test_gpu_backend_dispatch_and_inplace(dtype):
    import tidpo
    from tidpo.ops.backend import resolve_backend, triton_kernels_available

    logits, labels, grad_out = _case((4, 128, 32000), dtype, device="cuda")
    assert resolve_backend("auto", logits, op="logps") == "triton"
    if not triton_kernels_available("kl"):
        assert resolve_backend("auto", logits, op="kl") == "torch"
    outs = []
    for backend in ("triton", "torch"):
        x = logits.detach().clone().requires_grad_(True)
        out = tidpo.token_logps(x, labels, backend=backend)
        outs.append((out, torch.autograd.grad(out, x, grad_out.float())[0]))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outs[0][1], outs[1][1])
    _inplace_gives_same_gradient(dtype, "cuda", shape=(4, 65, 32000))
    runs = [token_logps_fwd(logits, labels, with_entropy=True) for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True)), "two runs must be bitwise equal"


@pytest.mark.slow
@pytest.mark.gpu
@requires_cuda
def test_gpu_more_than_2_31_elements():
    """N * V > 2**31: int64 offsets. Checked on the last rows, where int32 offsets would wrap."""
    vocab, n = 128256, 2**31 // 128256 + 64
    if torch.cuda.get_device_properties(0).total_memory < 3 * n * vocab * 2 + 2**30:
        pytest.skip("not enough GPU memory for two bf16 [N, 128256] tensors")
    logits = torch.empty(n, vocab, dtype=torch.bfloat16, device="cuda")
    logits.normal_(0, 3, generator=torch.Generator("cuda").manual_seed(0))
    labels = torch.randint(0, vocab, (n,), device="cuda")
    logps, lse, _ = token_logps_fwd(logits, labels)
    tail = slice(n - 64, n)
    truth = R.token_logps(logits[tail].double(), labels[tail])
    assert_rel_close(logps[tail], truth, 1e-5, "logps beyond 2**31 elements")
    dlogits = token_logps_bwd(logits, labels, lse, torch.ones(n, device="cuda"))
    x = logits[tail].double().requires_grad_(True)
    (truth_grad,) = torch.autograd.grad(R.token_logps(x, labels[tail]).sum(), x)
    assert (dlogits[tail].double() - truth_grad).abs().max() < 1e-2
