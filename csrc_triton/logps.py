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

import contextlib

import torch
import triton
import triton.language as tl

__all__ = [
    "INTERPRETED",
    "LABEL_DTYPES",
    "LOGITS_DTYPES",
    "compile_signatures",
    "kernel_config",
    "token_logps_bwd",
    "token_logps_fwd",
]

LOGITS_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
LABEL_DTYPES = (torch.int64, torch.int32)

# Largest vocabulary tile. The kernels stream memory: each element is loaded once, costs one exp and
# a few FMAs, and the tile's max/sum reductions (cross-warp, through shared memory) are paid once per
# tile. Large tiles amortise those reductions and the loop overhead and keep many 16-byte loads in
# flight per thread; 8192 fp32 values over 16 warps (512 threads) is 16 values per thread per live
# temporary, which fits the register file without spilling. Real vocabularies (32000-256000) are
# 4-32 tiles per row, and rows (N = batch * length, thousands) fill the GPU many times over.
MAX_BLOCK_V = 8192


def kernel_config(vocab: int) -> tuple[int, int]:
    """``(BLOCK_V, num_warps)`` for a vocabulary of ``vocab`` entries.

    ``BLOCK_V = min(next_pow2(V), 8192)``; warps grow with the tile so each thread holds 16 values
    (several independent 16-byte loads in flight to hide latency, few enough registers -- 32 to 60
    per thread, no spills on sm_80/sm_90 -- for two or more programs per SM). Fixed configs, no
    autotuning; chosen from the kernels' structure (bandwidth-bound streaming), not yet tuned on a GPU.
    """
    block = min(triton.next_power_of_2(max(int(vocab), 1)), MAX_BLOCK_V)
    block = max(block, 16)
    warps = max(1, min(16, block // 512))  # 16 values per thread: 8192 -> 16 warps, 4096 -> 8, 2048 -> 4
    return block, warps


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


def _is_interpreted(kernel) -> bool:
    return not isinstance(kernel, triton.runtime.JITFunction)


# True when this module was imported with TRITON_INTERPRET=1: the kernels then run on CPU tensors in
# the Triton interpreter (tests), and only there.
INTERPRETED = _is_interpreted(_token_logps_fwd_kernel)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


def _check_logits(logits, name: str = "logits") -> None:
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dtype not in LOGITS_DTYPES:
        raise TypeError(
            f"{name} must be float32, float16 or bfloat16 for the Triton kernels, got {logits.dtype} "
            "(use backend='torch' for other dtypes)"
        )
    if logits.dim() not in (2, 3):
        raise ValueError(f"{name} must have shape [N, V] or [R, T, V], got {tuple(logits.shape)}")
    if logits.shape[-1] < 1:
        raise ValueError(f"{name} has an empty vocabulary dimension: shape {tuple(logits.shape)}")
    if logits.shape[-1] > 1 and logits.stride(-1) != 1:
        raise ValueError(
            f"{name} must have unit stride along the vocabulary (last) dimension, got strides "
            f"{tuple(logits.stride())}; the kernels read rows in place and never copy the logits"
        )


def _check_runnable(logits: torch.Tensor, name: str = "logits") -> None:
    """Last check (so every other argument error shows on CPU too): can the kernels run here?"""
    if logits.device.type != "cuda" and not (INTERPRETED and logits.device.type == "cpu"):
        raise ValueError(
            f"{name} is on {logits.device}; the Triton kernels need CUDA tensors "
            "(or CPU tensors with TRITON_INTERPRET=1 set before tidpo.kernels is imported)"
        )


def _check_per_position(x, logits: torch.Tensor, name: str, dtypes, kind: str, logits_name: str = "logits") -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must be {kind} ({allowed}), got {x.dtype}")
    if tuple(x.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"{name} shape {tuple(x.shape)} does not match {logits_name} shape {tuple(logits.shape)} "
            f"without its vocabulary dimension ({tuple(logits.shape[:-1])})"
        )
    if x.device != logits.device:
        raise ValueError(f"{name} is on {x.device} but {logits_name} is on {logits.device}")


def _check_ignore_index(ignore_index) -> int:
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    return ignore_index


def _config(vocab: int, block_v: int | None, num_warps: int | None) -> tuple[int, int]:
    block, warps = kernel_config(vocab)
    if block_v is not None:
        if isinstance(block_v, bool) or not isinstance(block_v, int) or block_v < 16 or block_v & (block_v - 1):
            raise ValueError(f"block_v must be a power of two >= 16, got {block_v!r}")
        block = block_v
    if num_warps is not None:
        if isinstance(num_warps, bool) or not isinstance(num_warps, int) or num_warps not in (1, 2, 4, 8, 16, 32):
            raise ValueError(f"num_warps must be a power of two in [1, 32], got {num_warps!r}")
        warps = num_warps
    return block, warps


def _on_device(x: torch.Tensor):
    """Launch on ``x``'s GPU (Triton launches on the current device, which may be another one)."""
    return torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext()


def _row_strides(x: torch.Tensor) -> tuple[int, int, int]:
    """``(T, stride_r, stride_t)`` so that position ``pid`` is row ``(pid // T, pid % T)``."""
    if x.dim() == 2:
        return max(x.shape[0], 1), 0, x.stride(0)
    return max(x.shape[1], 1), x.stride(0), x.stride(1)


def _rows_overlap(x: torch.Tensor) -> bool:
    """Whether two positions of ``x`` share memory (e.g. an ``expand``-ed tensor)."""
    dims = sorted((x.stride(d), x.shape[d]) for d in range(x.dim() - 1) if x.shape[d] > 1)
    extent = x.shape[-1]  # elements spanned by one position (unit stride along V)
    for stride, size in dims:
        if stride < extent:
            return True
        extent = stride * (size - 1) + extent
    return False


def token_logps_fwd(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100, *,
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
    _check_logits(logits)
    _check_per_position(labels, logits, "labels", LABEL_DTYPES, "an integer tensor of token ids")
    ignore_index = _check_ignore_index(ignore_index)
    block, warps = _config(logits.shape[-1], block_v, num_warps)
    _check_runnable(logits)

    labels_c = labels.contiguous()  # [N] ints: tiny next to the logits
    logps = torch.empty(labels.shape, dtype=torch.float32, device=logits.device)
    lse = torch.empty_like(logps)
    entropy = torch.empty_like(logps) if with_entropy else None
    n = labels.numel()
    if n == 0:
        return logps, lse, entropy
    T, stride_r, stride_t = _row_strides(logits)
    with _on_device(logits):
        _token_logps_fwd_kernel[(n,)](
            logits, labels_c, logps, lse, entropy if with_entropy else logps,
            T, logits.shape[-1], stride_r, stride_t, ignore_index,
            BLOCK_V=block, HAS_ENTROPY=bool(with_entropy), num_warps=warps, enable_fp_fusion=True,
        )
    return logps, lse, entropy


def token_logps_bwd(logits: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor, grad_logps: torch.Tensor,
                    ignore_index: int = -100, *, seq_grad: torch.Tensor | None = None,
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
    _check_logits(logits)
    _check_per_position(labels, logits, "labels", LABEL_DTYPES, "an integer tensor of token ids")
    _check_per_position(lse, logits, "lse", (torch.float32,), "the float32 log-sum-exp from the forward")
    _check_per_position(grad_logps, logits, "grad_logps", (torch.float32, torch.float16, torch.bfloat16,
                                                           torch.float64), "floating point")
    ignore_index = _check_ignore_index(ignore_index)
    if inplace and _rows_overlap(logits):
        raise ValueError("logits has overlapping rows (e.g. expand()-ed); inplace=True cannot write into it")
    block, warps = _config(logits.shape[-1], block_v, num_warps)
    _check_runnable(logits)

    labels_c = labels.contiguous()
    weights_c, segments_c, seq_grad_c = _sequence_args(logits, labels, seq_grad, weights, segments)
    lse_c = lse.contiguous()
    grad_c = grad_logps.to(torch.float32).contiguous()  # [N]: the sum's expanded grad has stride 0
    dlogits = logits if inplace else torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    n = labels.numel()
    if n == 0:
        return dlogits
    T, stride_r, stride_t = _row_strides(logits)
    _, stride_dr, stride_dt = _row_strides(dlogits)
    with _on_device(logits):
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
        _check_per_position(segments, logits, "segments", LABEL_DTYPES, "an integer tensor of sequence ids")
        segments = segments.to(torch.int64).contiguous()
    if weights is None:
        weights = torch.ones(labels.shape, dtype=torch.float32, device=logits.device)
    else:
        _check_per_position(weights, logits, "weights", (torch.float32, torch.float16, torch.bfloat16,
                                                         torch.float64), "floating point")
    return weights.to(torch.float32).contiguous(), segments, seq_grad.to(torch.float32).contiguous()


# ----------------------------------------------------------------------------------------------
# Compile signatures (compile-only tests: triton.compile every variant without a GPU)
# ----------------------------------------------------------------------------------------------

_TRITON_DTYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
                 torch.int64: "i64", torch.int32: "i32"}


def compile_signatures(vocab: int = 128256) -> list[dict]:
    """Every kernel variant as ``triton.compile`` inputs, for a vocabulary of ``vocab``.

    One entry per (kernel, logits dtype, labels dtype[, HAS_ENTROPY]) with keys ``name``, ``fn``
    (the ``JITFunction``), ``signature`` (argument name -> Triton type, ``"constexpr"`` for constexprs),
    ``constexprs``, ``attrs`` (16-byte alignment of the pointers, as the JIT specialises torch
    allocations) and ``options`` (``num_warps`` from :func:`kernel_config`, FP fusion as launched). Use as
    ``triton.compile(ASTSource(e["fn"], e["signature"], e["constexprs"], e["attrs"]), target=...,
    options=e["options"])``. Strides are i64 (the N * V > 2**31 case); options match the launchers.
    """
    if _is_interpreted(_token_logps_fwd_kernel):
        raise RuntimeError("compile_signatures needs the compiled kernels; unset TRITON_INTERPRET")
    block, warps = kernel_config(vocab)
    aligned = [["tt.divisibility", 16]]
    options = {"num_warps": warps, "enable_fp_fusion": True}
    out = []
    for ldt in LOGITS_DTYPES:
        x = "*" + _TRITON_DTYPE[ldt]
        for ydt in LABEL_DTYPES:
            y = "*" + _TRITON_DTYPE[ydt]
            for has_entropy in (False, True):
                names = ["logits_ptr", "labels_ptr", "logps_ptr", "lse_ptr", "entropy_ptr"]
                sig = dict(zip(names, [x, y, "*fp32", "*fp32", "*fp32"], strict=True))
                sig.update(T="i32", V="i32", stride_r="i64", stride_t="i64", ignore_index="i32",
                           BLOCK_V="constexpr", HAS_ENTROPY="constexpr")
                out.append({
                    "name": f"fwd[{_TRITON_DTYPE[ldt]},{_TRITON_DTYPE[ydt]},entropy={has_entropy}]",
                    "fn": _token_logps_fwd_kernel, "signature": sig,
                    "constexprs": {"BLOCK_V": block, "HAS_ENTROPY": has_entropy},
                    "attrs": {(i,): aligned for i in range(len(names))}, "options": options,
                })
            names = ["logits_ptr", "labels_ptr", "lse_ptr", "grad_ptr", "dlogits_ptr", "weights_ptr",
                     "segments_ptr", "seq_grad_ptr"]
            sig = dict(zip(names, [x, y, "*fp32", "*fp32", x, "*fp32", "*i64", "*fp32"], strict=True))
            sig.update(T="i32", V="i32", stride_r="i64", stride_t="i64", stride_dr="i64", stride_dt="i64",
                       ignore_index="i32", BLOCK_V="constexpr", HAS_SEQ_GRAD="constexpr", HAS_SEGMENTS="constexpr")
            # Plain backward, pair reduction over padded rows, pair reduction over packed segments.
            for seq_grad, segments in ((False, False), (True, False), (True, True)):
                out.append({
                    "name": f"bwd[{_TRITON_DTYPE[ldt]},{_TRITON_DTYPE[ydt]},seq_grad={seq_grad},segments={segments}]",
                    "fn": _token_logps_bwd_kernel, "signature": sig,
                    "constexprs": {"BLOCK_V": block, "HAS_SEQ_GRAD": seq_grad, "HAS_SEGMENTS": segments},
                    "attrs": {(i,): aligned for i in range(len(names))}, "options": options,
                })
    return out
