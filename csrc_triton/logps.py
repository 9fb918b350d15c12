"""Fused per-token log-probs: online log-sum-exp + target logit (forward), dlogits (backward).

One Triton program per position (row of the logits):

- forward reads the row once in ``BLOCK_V`` tiles, keeps a running max ``m`` and running sum
  ``s = sum exp(x - m)`` in fp32 (online softmax), gathers ``x[label]`` with one scalar load and
  stores ``logp = x[label] - lse`` and ``lse = m + log s`` (fp32). With ``HAS_ENTROPY`` the same pass
  also keeps ``u = sum exp(x - m) * (x - m)`` and stores the per-token entropy
  ``H = -sum p log p = log s - u / s`` (two non-negative terms: no cancellation when H is small).
- backward re-reads the row and writes ``dlogits = g * (onehot(label) - exp(x - lse))``, computed
  in fp32 and stored in the logits' dtype, into a fresh contiguous ``[*, V]`` tensor or, opt-in,
  over the logits themselves. With ``HAS_SEQ_GRAD`` the pair reduction's gradient is applied inline:
  ``g_t = grad_t + w_t * dL/dS[seq(t)]`` for per-sequence weighted sums ``S_s = sum_{t in s} w_t logp_t``
  (``seq`` = padded row, or packed segment id with ``HAS_SEGMENTS``).

Ignored positions (``label == ignore_index``) do no vocabulary work in forward: ``logp = 0``,
``lse = 0`` (a placeholder, not the row's log-sum-exp: nothing downstream needs it and computing it
would cost a full read of the row) and ``H = 0``. Backward never reads their ``lse``; it writes a
zero gradient row without reading the logits.

A label outside ``[0, V)`` (and not ``ignore_index``) is not read out of bounds: its ``logp`` is NaN.
(Value checks are the caller's job; ``tidpo._validation`` does them on CPU or when asked.)

Logits: ``[N, V]`` or ``[R, T, V]``, fp32/fp16/bf16, any strides for the leading dimensions (e.g. the
view ``model_logits[:, :-1]``: it is read where it lies, never copied), unit stride along V.
Offsets are int64 (``program_id`` is widened before any stride multiply), so N * V > 2**31 is safe.

The launchers only check arguments, allocate, pick the grid and launch: tensors in, tensors out,
no host synchronisation.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tidpo._validation import IGNORE_INDEX

from ._launch import (
    FLOAT_DTYPES,
    LABEL_DTYPES,
    LOGITS_DTYPES,
    check_ignore_index,
    check_kernel_logits,
    check_per_position,
    check_runnable,
    compile_entries,
    is_interpreted,
    on_device,
    row_strides,
    rows_overlap,
    tile_config,
)

__all__ = [
    "INTERPRETED",
    "LABEL_DTYPES",
    "LOGITS_DTYPES",
    "compile_signatures",
    "kernel_config",
    "token_logps_bwd",
    "token_logps_fwd",
]

# Largest vocabulary tile. The kernels stream memory: each element is loaded once, costs one exp and
# a few FMAs, and the tile's max/sum reductions (cross-warp, through shared memory) are paid once per
# tile. Large tiles amortise those reductions and the loop overhead and keep many 16-byte loads in
# flight per thread; 8192 fp32 values over 16 warps (512 threads) is 16 values per thread per live
# temporary, which fits the register file without spilling. Real vocabularies (32000-256000) are
# 4-32 tiles per row, and rows (N = batch * length, thousands) fill the GPU many times over.
MAX_BLOCK_V = 8192


#: Values of a tile each thread holds: 8192 -> 16 warps, 4096 -> 8, 2048 -> 4.
VALUES_PER_THREAD = 16


def kernel_config(vocab: int, block_v: int | None = None, num_warps: int | None = None) -> tuple[int, int]:
    """``(BLOCK_V, num_warps)`` for a vocabulary of ``vocab`` entries (``block_v`` / ``num_warps`` override).

    ``BLOCK_V = min(next_pow2(V), 8192)``; warps grow with the tile so each thread holds 16 values
    (several independent 16-byte loads in flight to hide latency, few enough registers -- 32 to 60
    per thread, no spills on sm_80/sm_90 -- for two or more programs per SM). Fixed configs, no
    autotuning; chosen from the kernels' structure (bandwidth-bound streaming), not yet tuned on a GPU.
    """
    return tile_config(vocab, MAX_BLOCK_V, VALUES_PER_THREAD, block_v, num_warps)


@triton.jit(do_not_specialize=["ignore_index"])
def _token_logps_fwd_kernel(
    logits_ptr,  # [*, V] any leading strides, unit stride along V
    labels_ptr,  # [N] contiguous int32/int64
    logps_ptr,  # [N] fp32 out
    lse_ptr,  # [N] fp32 out
    entropy_ptr,  # [N] fp32 out (only written with HAS_ENTROPY)
    T,  # positions per leading row (N for 2-D logits)
    V,
    stride_r,
    stride_t,
    ignore_index,
    BLOCK_V: tl.constexpr,
    HAS_ENTROPY: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)  # int64 before any stride multiply
    label = tl.load(labels_ptr + pid).to(tl.int64)
    if label == ignore_index:
        # Ignored position: no vocabulary work. lse = 0 is a placeholder (see module docstring).
        tl.store(logps_ptr + pid, 0.0)
        tl.store(lse_ptr + pid, 0.0)
        if HAS_ENTROPY:
            tl.store(entropy_ptr + pid, 0.0)
        return

    r = pid // T
    t = pid - r * T
    row_ptr = logits_ptr + r * stride_r + t * stride_t
    offs = tl.arange(0, BLOCK_V)

    m = float("-inf")  # running max
    s = 0.0  # running sum of exp(x - m)
    u = 0.0  # running sum of exp(x - m) * (x - m)   (entropy only)
    for start in range(0, V, BLOCK_V):
        cols = start + offs
        x = tl.load(row_ptr + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        new_m = tl.maximum(m, tl.max(x, axis=0))
        # While every value seen is -inf (padding or a masked vocabulary), shift by 0 instead of
        # new_m so that no -inf - (-inf) = NaN appears; then alpha = exp(-inf) = 0 and e = 0.
        shift = tl.where(new_m == float("-inf"), 0.0, new_m)
        alpha = tl.exp(m - shift)
        e = tl.exp(x - shift)
        if HAS_ENTROPY:
            # sum e^(x - shift)(x - shift) = alpha * (u + (m - shift) * s) for the old terms; the
            # (m - shift) factor is 0 while m == -inf (then s == u == 0 too).
            dm = tl.where(m == float("-inf"), 0.0, m - shift)
            # e == 0 where x == -inf: 0 * (-inf) would be NaN, the term is 0.
            xs = tl.where(e > 0.0, x - shift, 0.0)
            u = alpha * (u + dm * s) + tl.sum(e * xs, axis=0)
        s = s * alpha + tl.sum(e, axis=0)
        m = new_m

    lse = m + tl.log(s)
    in_range = (label >= 0) & (label < V)
    target = tl.load(row_ptr + label, mask=in_range, other=float("nan")).to(tl.float32)
    tl.store(logps_ptr + pid, target - lse)
    tl.store(lse_ptr + pid, lse)
    if HAS_ENTROPY:
        tl.store(entropy_ptr + pid, tl.log(s) - u / s)


@triton.jit(do_not_specialize=["ignore_index"])
def _token_logps_bwd_kernel(
    logits_ptr,  # [*, V] as in forward
    labels_ptr,  # [N] contiguous int32/int64
    lse_ptr,  # [N] fp32, from forward
    grad_ptr,  # [N] fp32 upstream gradient of logps
    dlogits_ptr,  # [*, V] out, logits dtype (the logits buffer itself when in place)
    weights_ptr,  # [N] fp32 token weights w_t (read only with HAS_SEQ_GRAD)
    segments_ptr,  # [N] int64 sequence of each position (read only with HAS_SEGMENTS)
    seq_grad_ptr,  # [S] fp32 upstream gradient of the per-sequence weighted sums (HAS_SEQ_GRAD)
    T,
    V,
    stride_r,
    stride_t,
    stride_dr,
    stride_dt,
    ignore_index,
    BLOCK_V: tl.constexpr,
    HAS_SEQ_GRAD: tl.constexpr,
    HAS_SEGMENTS: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)  # int64 before any stride multiply
    label = tl.load(labels_ptr + pid).to(tl.int64)
    r = pid // T
    t = pid - r * T
    out_ptr = dlogits_ptr + r * stride_dr + t * stride_dt
    offs = tl.arange(0, BLOCK_V)
    if label == ignore_index:
        # No gradient; neither the logits nor lse (a placeholder here) are read.
        zeros = tl.zeros([BLOCK_V], dtype=dlogits_ptr.dtype.element_ty)
        for start in range(0, V, BLOCK_V):
            cols = start + offs
            tl.store(out_ptr + cols, zeros, mask=cols < V)
        return

    row_ptr = logits_ptr + r * stride_r + t * stride_t
    g = tl.load(grad_ptr + pid)
    if HAS_SEQ_GRAD:
        # The pair reduction S_s = sum_{t in s} w_t logp_t, applied inline: dL/dlogp_t += w_t dL/dS_s.
        # The sequence is the padded row r, or the packed segment id.
        if HAS_SEGMENTS:
            seq = tl.load(segments_ptr + pid)
        else:
            seq = r
        g += tl.load(weights_ptr + pid) * tl.load(seq_grad_ptr + seq)
    lse = tl.load(lse_ptr + pid)
    for start in range(0, V, BLOCK_V):
        cols = start + offs
        mask = cols < V
        x = tl.load(row_ptr + cols, mask=mask, other=float("-inf")).to(tl.float32)
        p = tl.exp(x - lse)
        onehot = tl.where(cols == label, 1.0, 0.0)
        d = g * (onehot - p)
        tl.store(out_ptr + cols, d.to(dlogits_ptr.dtype.element_ty), mask=mask)


# True when this module was imported with TRITON_INTERPRET=1: the kernels then run on CPU tensors in
# the Triton interpreter (tests), and only there.
INTERPRETED = is_interpreted(_token_logps_fwd_kernel)
_LABELS_KIND = "an integer tensor of token ids"


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


def token_logps_fwd(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX, *,
                    with_entropy: bool = False, block_v: int | None = None,
                    num_warps: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per-token ``logp``, ``lse`` (and entropy) of ``logits`` at ``labels``; one read of the logits.

    Args:
        logits: ``[N, V]`` or ``[R, T, V]``, float32/float16/bfloat16, unit stride along V.
        labels: int64 or int32, shape ``logits.shape[:-1]``.
        ignore_index: label of positions to skip (``logp = lse = H = 0`` there).
        with_entropy: also return the per-token entropy ``-sum_v p_v log p_v`` (fp32).
        block_v, num_warps: override :func:`kernel_config` (tests, tuning).

    Returns:
        ``(logps, lse, entropy)``: fp32 tensors shaped like ``labels``; ``entropy`` is None unless
        ``with_entropy``. ``lse`` is 0 (a placeholder) at ignored positions.
    """
    check_kernel_logits(logits)
    check_per_position(labels, logits, "labels", LABEL_DTYPES, _LABELS_KIND)
    ignore_index = check_ignore_index(ignore_index)
    block, warps = kernel_config(logits.shape[-1], block_v, num_warps)
    check_runnable(logits, INTERPRETED)

    labels_c = labels.contiguous()  # [N] ints: tiny next to the logits
    logps = torch.empty(labels.shape, dtype=torch.float32, device=logits.device)
    lse = torch.empty_like(logps)
    entropy = torch.empty_like(logps) if with_entropy else None
    n = labels.numel()
    if n == 0:
        return logps, lse, entropy
    T, stride_r, stride_t = row_strides(logits)
    with on_device(logits):
        _token_logps_fwd_kernel[(n,)](
            logits, labels_c, logps, lse, entropy if with_entropy else logps,
            T, logits.shape[-1], stride_r, stride_t, ignore_index,
            BLOCK_V=block, HAS_ENTROPY=bool(with_entropy), num_warps=warps, enable_fp_fusion=True,
        )
    return logps, lse, entropy


def token_logps_bwd(logits: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor, grad_logps: torch.Tensor,
                    ignore_index: int = IGNORE_INDEX, *, seq_grad: torch.Tensor | None = None,
                    weights: torch.Tensor | None = None, segments: torch.Tensor | None = None,
                    inplace: bool = False, block_v: int | None = None, num_warps: int | None = None) -> torch.Tensor:
    """``dlogits = g * (onehot(label) - softmax(logits))`` per position; 0 rows where ignored.

    ``g_t = grad_logps_t`` plus, with ``seq_grad``, the weighted pair reduction's gradient applied
    inline: ``g_t += w_t * seq_grad[s(t)]`` where ``S_s = sum_{t in s} w_t logp_t`` is the per-sequence
    weighted sum and ``s(t)`` the padded row of position t (3-D logits) or ``segments[t]`` (packed).

    Args:
        logits, labels, ignore_index: as given to :func:`token_logps_fwd`.
        lse: the fp32 log-sum-exp returned by :func:`token_logps_fwd`.
        grad_logps: upstream gradient of ``logps`` (any float dtype and strides; read as fp32).
        seq_grad: ``[S]`` upstream gradient of the per-sequence weighted sums (optional).
        weights: token weights shaped like ``labels`` (with ``seq_grad``; default all ones).
        segments: integer sequence index of every position, shaped like ``labels`` (with ``seq_grad``;
            default: the row of 3-D logits).
        inplace: write the gradient over ``logits`` and return ``logits``. Off by default: it
            destroys the logits, so anything else that saved them for its own backward (another loss
            term, a KL on the same logits) silently gets wrong gradients. Only for a caller that owns
            the logits and uses them nowhere else.

    Returns:
        ``dlogits`` in the logits' dtype: a fresh contiguous ``[*, V]`` tensor, or ``logits`` itself
        when ``inplace``.
    """
    check_kernel_logits(logits)
    check_per_position(labels, logits, "labels", LABEL_DTYPES, _LABELS_KIND)
    check_per_position(lse, logits, "lse", (torch.float32,), "the float32 log-sum-exp from the forward")
    check_per_position(grad_logps, logits, "grad_logps", FLOAT_DTYPES, "floating point")
    ignore_index = check_ignore_index(ignore_index)
    if inplace and rows_overlap(logits):
        raise ValueError("logits has overlapping rows (e.g. expand()-ed); inplace=True cannot write into it")
    block, warps = kernel_config(logits.shape[-1], block_v, num_warps)
    check_runnable(logits, INTERPRETED)

    labels_c = labels.contiguous()
    weights_c, segments_c, seq_grad_c = _sequence_args(logits, labels, seq_grad, weights, segments)
    lse_c = lse.contiguous()
    grad_c = grad_logps.to(torch.float32).contiguous()  # [N]: the sum's expanded grad has stride 0
    dlogits = logits if inplace else torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    n = labels.numel()
    if n == 0:
        return dlogits
    T, stride_r, stride_t = row_strides(logits)
    _, stride_dr, stride_dt = row_strides(dlogits)
    with on_device(logits):
        _token_logps_bwd_kernel[(n,)](
            logits, labels_c, lse_c, grad_c, dlogits,
            weights_c if weights_c is not None else grad_c,  # unread placeholders without HAS_SEQ_GRAD
            segments_c if segments_c is not None else labels_c,
            seq_grad_c if seq_grad_c is not None else grad_c,
            T, logits.shape[-1], stride_r, stride_t, stride_dr, stride_dt, ignore_index,
            BLOCK_V=block, HAS_SEQ_GRAD=seq_grad_c is not None, HAS_SEGMENTS=segments_c is not None,
            num_warps=warps, enable_fp_fusion=True,
        )
    return dlogits


def _sequence_args(logits, labels, seq_grad, weights, segments):
    """Checked, contiguous ``(weights fp32, segments int64, seq_grad fp32)`` (None where unused)."""
    if seq_grad is None:
        if weights is not None or segments is not None:
            raise ValueError("weights and segments are only used with seq_grad; pass seq_grad too")
        return None, None, None
    if not isinstance(seq_grad, torch.Tensor) or seq_grad.dim() != 1 or not seq_grad.is_floating_point():
        raise TypeError("seq_grad must be a 1-D floating-point tensor [S] (one entry per sequence)")
    if seq_grad.device != logits.device:
        raise ValueError(f"seq_grad is on {seq_grad.device} but logits is on {logits.device}")
    if segments is None:
        if logits.dim() != 3 or seq_grad.shape[0] != logits.shape[0]:
            raise ValueError(f"seq_grad has {seq_grad.shape[0]} entries; without segments it needs one per row of "
                             f"3-D logits (shape {tuple(logits.shape)})")
    else:
        check_per_position(segments, logits, "segments", LABEL_DTYPES, "an integer tensor of sequence ids")
        segments = segments.to(torch.int64).contiguous()
    if weights is None:
        weights = torch.ones(labels.shape, dtype=torch.float32, device=logits.device)
    else:
        check_per_position(weights, logits, "weights", FLOAT_DTYPES, "floating point")
    return weights.to(torch.float32).contiguous(), segments, seq_grad.to(torch.float32).contiguous()


# ----------------------------------------------------------------------------------------------
# Compile signatures (compile-only tests: triton.compile every variant without a GPU)
# ----------------------------------------------------------------------------------------------

# Each kernel's arguments, in order, with their Triton types ("{logits}" / "{labels}": the variant's dtypes).
# Strides are i64 (the N * V > 2**31 case).
_FWD_ARGS = {"logits_ptr": "*{logits}", "labels_ptr": "*{labels}", "logps_ptr": "*fp32", "lse_ptr": "*fp32",
             "entropy_ptr": "*fp32", "T": "i32", "V": "i32", "stride_r": "i64", "stride_t": "i64",
             "ignore_index": "i32", "BLOCK_V": "constexpr", "HAS_ENTROPY": "constexpr"}
_BWD_ARGS = {"logits_ptr": "*{logits}", "labels_ptr": "*{labels}", "lse_ptr": "*fp32", "grad_ptr": "*fp32",
             "dlogits_ptr": "*{logits}", "weights_ptr": "*fp32", "segments_ptr": "*i64", "seq_grad_ptr": "*fp32",
             "T": "i32", "V": "i32", "stride_r": "i64", "stride_t": "i64", "stride_dr": "i64", "stride_dt": "i64",
             "ignore_index": "i32", "BLOCK_V": "constexpr", "HAS_SEQ_GRAD": "constexpr", "HAS_SEGMENTS": "constexpr"}


def compile_signatures(vocab: int = 128256) -> list[dict]:
    """Every kernel variant as ``triton.compile`` inputs, for a vocabulary of ``vocab``.

    One entry per (kernel, logits dtype, labels dtype, flags): the forward with and without entropy; the
    backward plain, with the pair reduction over padded rows, and over packed segments (see
    :func:`tidpo.kernels._launch.compile_entries` for the keys). Options match the launchers.
    """
    if is_interpreted(_token_logps_fwd_kernel):
        raise RuntimeError("compile_signatures needs the compiled kernels; unset TRITON_INTERPRET")
    block, warps = kernel_config(vocab)
    options = {"num_warps": warps, "enable_fp_fusion": True}
    pairs = [(x, y) for x in LOGITS_DTYPES for y in LABEL_DTYPES]
    roles = {"logits": tuple(x for x, _ in pairs), "labels": tuple(y for _, y in pairs)}
    common = {"dtype_roles": roles, "constexprs": {"BLOCK_V": block}, "options": options}
    forward = compile_entries(_token_logps_fwd_kernel, _FWD_ARGS, {"HAS_ENTROPY": (False, True)}, name="fwd",
                              **common)
    # Plain backward, pair reduction over padded rows, pair reduction over packed segments.
    backward = [e for e in compile_entries(_token_logps_bwd_kernel, _BWD_ARGS,
                                           {"HAS_SEQ_GRAD": (False, True), "HAS_SEGMENTS": (False, True)},
                                           name="bwd", **common)
                if e["constexprs"]["HAS_SEQ_GRAD"] or not e["constexprs"]["HAS_SEGMENTS"]]
    return forward + backward
