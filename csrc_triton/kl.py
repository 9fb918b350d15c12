"""Fused per-position ``KL(p || q)`` over the full vocabulary: one read of both rows (forward), gradients (backward).

``p = softmax(p_logits[i])``, ``q = softmax(q_logits[i])``, ``KL_i = sum_v p_v (log p_v - log q_v)``.
One Triton program per position (row):

- forward streams the p row ``a`` and the q row ``b`` together in ``BLOCK_V`` tiles, each element read
  once, and keeps in fp32 an online softmax for each row (running max ``m_p`` / ``m_q`` and running
  sums ``s_p = sum exp(a - m_p)``, ``s_q = sum exp(b - m_q)``) plus ``A = sum exp(a - m_p) (a - b)``,
  rescaled with ``s_p`` whenever ``m_p`` grows. At the end ``A / s_p = E_p[a - b]`` and

      ``KL = E_p[a - b] - lse_p + lse_q = A / s_p + (m_q - m_p) + (log s_q - log s_p)``

  (the maxima are subtracted from each other before the logs are added, so large logits lose no
  precision to ``m + log s`` roundings). Stores ``kl``, ``lse_p = m_p + log s_p`` and
  ``lse_q = m_q + log s_q`` (fp32).
- backward re-reads both rows and, with ``g`` the fp32 upstream gradient, ``log p = a - lse_p``,
  ``log q = b - lse_q``, writes (computed in fp32, stored in the logits' dtype, into fresh contiguous
  ``[*, V]`` tensors) only the gradients asked for (constexpr ``NEED_DP`` / ``NEED_DQ``; one pass
  reads each row once whichever is asked):

      ``dq_logits = g (q - p)``,        ``dp_logits = g p (log p - log q - KL)``  (0 where p == 0).

Either input may be the policy: TDPO / TI-DPO differentiate ``q`` (``KL(ref || policy)``), TIS-DPO's
token-level branch differentiates ``p`` (``KL(policy || ref)``).

-inf logits (a masked vocabulary), the same convention as the torch path whatever the tiling: an entry whose
``p_v`` is 0 in fp32 contributes 0 (never ``0 * inf = NaN``) — also when it had mass against the running max
of an earlier tile and a later max makes it underflow —, tiles that are entirely -inf so far leave the running
values at 0, and logit gaps beyond fp32's ``exp`` range (> 104 nats) stay finite: nothing is computed as
``log(softmax)``. ``p_v > 0`` where ``q_v == 0`` gives ``KL = +inf``, as it should.

Ignored positions (``label == ignore_index``) do no vocabulary work in forward: ``kl = 0`` and
``lse_p = lse_q = 0`` (placeholders). Backward writes zero gradient rows there without reading the
logits. Labels are only compared with ``ignore_index`` (their value is not otherwise used).

Logits: ``[N, V]`` or ``[R, T, V]``, both of the same shape, each in its own dtype (fp32/fp16/bf16: fp32
policy logits beside a bf16 reference are read as they are, the math is fp32 either way) and with its own
leading strides (e.g. the view ``policy_logits[:, :-1]`` next to a contiguous reference: read where they
lie, never copied), unit stride along V. Offsets are int64 (``program_id`` is widened before any stride
multiply), so N * V > 2**31 is safe.

The launchers only check arguments, allocate, pick the grid and launch: tensors in, tensors out,
no host synchronisation.
"""

from __future__ import annotations

import functools

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
    check_runnable,
    compile_entries,
    is_interpreted,
    on_device,
    row_strides,
    tile_config,
)
from ._launch import check_per_position as _check_per_position_of

__all__ = [
    "INTERPRETED",
    "compile_signatures",
    "kernel_config",
    "token_kl_bwd",
    "token_kl_fwd",
]

# Largest vocabulary tile: half of the log-prob kernels' 8192. Every tile holds TWO rows in flight (p
# and q, loaded together), and each has its own exp / running values (forward) or p, q and two
# gradients (backward), so the live fp32 temporaries per element roughly double. Half the tile at the
# same warp count keeps the per-thread register budget of the log-prob kernels (8 values per thread
# per row, 16 in all; no spills on sm_80/sm_90, checked by the compile-only tests) while each program
# still moves 2 x 4096 elements per step, i.e. as many bytes in flight as a logps tile.
MAX_BLOCK_V = 4096


#: Values of each row's tile a thread holds (16 in all): 4096 -> 16 warps, 2048 -> 8, 1024 -> 4, <= 256 -> 1.
VALUES_PER_THREAD = 8


def kernel_config(vocab: int, block_v: int | None = None, num_warps: int | None = None) -> tuple[int, int]:
    """``(BLOCK_V, num_warps)`` for a vocabulary of ``vocab`` entries (``block_v`` / ``num_warps`` override).

    ``BLOCK_V = min(next_pow2(V), 4096)`` (at least 16); ``num_warps = BLOCK_V / 256`` in [1, 16]: each
    thread holds 8 values of each row (16 in all, as in the log-prob kernels). Fixed configs, no
    autotuning; chosen from the kernels' structure (bandwidth-bound streaming), not yet tuned on a GPU.
    """
    return tile_config(vocab, MAX_BLOCK_V, VALUES_PER_THREAD, block_v, num_warps)


@triton.jit(do_not_specialize=["ignore_index"])
def _token_kl_fwd_kernel(
    p_ptr,  # [*, V] p logits, any leading strides, unit stride along V
    q_ptr,  # [*, V] q logits, same shape and dtype as p, its own leading strides
    labels_ptr,  # [N] contiguous int32/int64 (only compared with ignore_index)
    kl_ptr,  # [N] fp32 out
    lse_p_ptr,  # [N] fp32 out
    lse_q_ptr,  # [N] fp32 out
    T,  # positions per leading row (N for 2-D logits)
    V,
    stride_pr,
    stride_pt,
    stride_qr,
    stride_qt,
    ignore_index,
    BLOCK_V: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)  # int64 before any stride multiply
    label = tl.load(labels_ptr + pid).to(tl.int64)
    if label == ignore_index:
        # Ignored position: no vocabulary work; the lse are placeholders (see module docstring).
        tl.store(kl_ptr + pid, 0.0)
        tl.store(lse_p_ptr + pid, 0.0)
        tl.store(lse_q_ptr + pid, 0.0)
        return

    r = pid // T
    t = pid - r * T
    p_row = p_ptr + r * stride_pr + t * stride_pt
    q_row = q_ptr + r * stride_qr + t * stride_qt
    offs = tl.arange(0, BLOCK_V)

    m_p = float("-inf")  # running max of a
    s_p = 0.0  # running sum of exp(a - m_p)
    acc = 0.0  # running sum of exp(a - m_p) * (a - b)
    m_q = float("-inf")  # running max of b
    s_q = 0.0  # running sum of exp(b - m_q)
    for start in range(0, V, BLOCK_V):
        cols = start + offs
        mask = cols < V
        a = tl.load(p_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
        b = tl.load(q_row + cols, mask=mask, other=float("-inf")).to(tl.float32)

        new_mp = tl.maximum(m_p, tl.max(a, axis=0))
        # While every value seen is -inf, shift by 0 instead of the max: no -inf - (-inf) = NaN, and
        # alpha = exp(-inf) = 0 and e = 0 leave the running values at 0.
        shift_p = tl.where(new_mp == float("-inf"), 0.0, new_mp)
        alpha_p = tl.exp(m_p - shift_p)
        e_p = tl.exp(a - shift_p)
        # p_v = 0 (a = -inf, masked lanes, or exp underflow) contributes 0: select before subtracting,
        # so no -inf - (-inf) = NaN and no 0 * inf is ever formed (b = -inf where p_v > 0 gives +inf).
        p_pos = e_p > 0.0
        d = tl.where(p_pos, a, 0.0) - tl.where(p_pos, b, 0.0)
        # When the max jumps so far that alpha_p underflows to 0, the earlier entries' probabilities are 0 in
        # fp32: they contribute 0, as they would have in one tile (never +inf * 0 = NaN from an earlier -inf q).
        acc = tl.where(alpha_p > 0.0, acc * alpha_p, 0.0) + tl.sum(e_p * d, axis=0)
        s_p = s_p * alpha_p + tl.sum(e_p, axis=0)
        m_p = new_mp

        new_mq = tl.maximum(m_q, tl.max(b, axis=0))
        shift_q = tl.where(new_mq == float("-inf"), 0.0, new_mq)
        s_q = s_q * tl.exp(m_q - shift_q) + tl.sum(tl.exp(b - shift_q), axis=0)
        m_q = new_mq

    log_sp = tl.log(s_p)
    log_sq = tl.log(s_q)
    kl = acc / s_p + (m_q - m_p) + (log_sq - log_sp)
    tl.store(kl_ptr + pid, kl)
    tl.store(lse_p_ptr + pid, m_p + log_sp)
    tl.store(lse_q_ptr + pid, m_q + log_sq)


@triton.jit(do_not_specialize=["ignore_index"])
def _token_kl_bwd_kernel(
    p_ptr,  # [*, V] as in forward
    q_ptr,  # [*, V] as in forward
    labels_ptr,  # [N] contiguous int32/int64
    lse_p_ptr,  # [N] fp32, from forward
    lse_q_ptr,  # [N] fp32, from forward
    kl_ptr,  # [N] fp32, from forward
    grad_ptr,  # [N] fp32 upstream gradient of kl
    dp_ptr,  # [*, V] out, logits dtype (only written with NEED_DP)
    dq_ptr,  # [*, V] out, logits dtype, same strides as dp (only written with NEED_DQ)
    T,
    V,
    stride_pr,
    stride_pt,
    stride_qr,
    stride_qt,
    stride_dr,
    stride_dt,
    ignore_index,
    BLOCK_V: tl.constexpr,
    NEED_DP: tl.constexpr,
    NEED_DQ: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)  # int64 before any stride multiply
    label = tl.load(labels_ptr + pid).to(tl.int64)
    r = pid // T
    t = pid - r * T
    out_off = r * stride_dr + t * stride_dt
    offs = tl.arange(0, BLOCK_V)
    if label == ignore_index:
        # No gradient; neither the logits nor the (placeholder) per-position values are read.
        for start in range(0, V, BLOCK_V):
            cols = start + offs
            mask = cols < V
            if NEED_DP:
                tl.store(dp_ptr + out_off + cols, tl.zeros([BLOCK_V], dtype=dp_ptr.dtype.element_ty), mask=mask)
            if NEED_DQ:
                tl.store(dq_ptr + out_off + cols, tl.zeros([BLOCK_V], dtype=dq_ptr.dtype.element_ty), mask=mask)
        return

    p_row = p_ptr + r * stride_pr + t * stride_pt
    q_row = q_ptr + r * stride_qr + t * stride_qt
    g = tl.load(grad_ptr + pid)
    lse_p = tl.load(lse_p_ptr + pid)
    lse_q = tl.load(lse_q_ptr + pid)
    if NEED_DP:
        kl = tl.load(kl_ptr + pid)
    for start in range(0, V, BLOCK_V):
        cols = start + offs
        mask = cols < V
        a = tl.load(p_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
        b = tl.load(q_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
        logp = a - lse_p
        logq = b - lse_q
        p = tl.exp(logp)
        if NEED_DQ:
            dq = g * (tl.exp(logq) - p)
            tl.store(dq_ptr + out_off + cols, dq.to(dq_ptr.dtype.element_ty), mask=mask)
        if NEED_DP:
            # p = 0 (a = -inf, masked lanes, underflow): 0. Select before subtracting, so no
            # -inf - (-inf) = NaN and no 0 * inf is ever formed.
            p_pos = p > 0.0
            inner = tl.where(p_pos, logp, 0.0) - tl.where(p_pos, logq, 0.0) - kl
            dp = g * tl.where(p_pos, p * inner, 0.0)
            tl.store(dp_ptr + out_off + cols, dp.to(dp_ptr.dtype.element_ty), mask=mask)


# True when this module was imported with TRITON_INTERPRET=1 (kernels run on CPU tensors, tests only).
INTERPRETED = is_interpreted(_token_kl_fwd_kernel)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


def _check_pair(p_logits, q_logits) -> None:
    """Both logits readable by the kernels (each in its own dtype), of one shape and on one device."""
    check_kernel_logits(p_logits, "p_logits")
    check_kernel_logits(q_logits, "q_logits")
    if tuple(q_logits.shape) != tuple(p_logits.shape):
        raise ValueError(
            f"q_logits shape {tuple(q_logits.shape)} does not match p_logits shape {tuple(p_logits.shape)}"
        )
    if q_logits.device != p_logits.device:
        raise ValueError(f"q_logits is on {q_logits.device} but p_logits is on {p_logits.device}")


# Per-position arguments (labels, lse_p, lse_q, kl, grad_kl) are checked against p_logits, named so in messages.
_check_per_position = functools.partial(_check_per_position_of, logits_name="p_logits")
_LABELS_KIND = "an integer tensor of token ids"


def token_kl_fwd(p_logits: torch.Tensor, q_logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX,
                 *, block_v: int | None = None,
                 num_warps: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-position ``KL(softmax(p_logits) || softmax(q_logits))``; one read of each logits row.

    Args:
        p_logits, q_logits: ``[N, V]`` or ``[R, T, V]`` of one shape, each float32/float16/bfloat16 (the two
            may differ), unit stride along V; leading strides may differ between them.
        labels: int64 or int32, shape ``p_logits.shape[:-1]``; positions equal to ``ignore_index`` are skipped.
        ignore_index: label of positions to skip (``kl = lse_p = lse_q = 0`` there).
        block_v, num_warps: override :func:`kernel_config` (tests, tuning).

    Returns:
        ``(kl, lse_p, lse_q)``: fp32 tensors shaped like ``labels``; the lse are 0 (placeholders) at
        ignored positions.
    """
    _check_pair(p_logits, q_logits)
    _check_per_position(labels, p_logits, "labels", LABEL_DTYPES, _LABELS_KIND)
    ignore_index = check_ignore_index(ignore_index)
    block, warps = kernel_config(p_logits.shape[-1], block_v, num_warps)
    check_runnable(p_logits, INTERPRETED, "p_logits")

    labels_c = labels.contiguous()  # [N] ints: tiny next to the logits
    kl = torch.empty(labels.shape, dtype=torch.float32, device=p_logits.device)
    lse_p = torch.empty_like(kl)
    lse_q = torch.empty_like(kl)
    n = labels.numel()
    if n == 0:
        return kl, lse_p, lse_q
    T, stride_pr, stride_pt = row_strides(p_logits)
    _, stride_qr, stride_qt = row_strides(q_logits)
    with on_device(p_logits):
        _token_kl_fwd_kernel[(n,)](
            p_logits, q_logits, labels_c, kl, lse_p, lse_q,
            T, p_logits.shape[-1], stride_pr, stride_pt, stride_qr, stride_qt, ignore_index,
            BLOCK_V=block, num_warps=warps, enable_fp_fusion=True,
        )
    return kl, lse_p, lse_q


def token_kl_bwd(p_logits: torch.Tensor, q_logits: torch.Tensor, labels: torch.Tensor, lse_p: torch.Tensor,
                 lse_q: torch.Tensor, kl: torch.Tensor, grad_kl: torch.Tensor, ignore_index: int = IGNORE_INDEX, *,
                 need_dp: bool = True, need_dq: bool = True, block_v: int | None = None,
                 num_warps: int | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients of ``sum_i g_i KL_i`` w.r.t. the logits asked for; zero rows where ignored.

    ``dq_logits = g (q - p)``, ``dp_logits = g p (log p - log q - KL)``; both rows are read once
    whichever is asked for.

    Args:
        p_logits, q_logits, labels, ignore_index: as given to :func:`token_kl_fwd`.
        lse_p, lse_q, kl: the fp32 outputs of :func:`token_kl_fwd`.
        grad_kl: upstream gradient of ``kl`` (any float dtype and strides; read as fp32).
        need_dp, need_dq: which gradients to compute (at least one).

    Returns:
        ``(dp_logits, dq_logits)``, each a fresh contiguous ``[*, V]`` tensor in its input's dtype, or
        None where not asked for.
    """
    _check_pair(p_logits, q_logits)
    _check_per_position(labels, p_logits, "labels", LABEL_DTYPES, _LABELS_KIND)
    for name, x in (("lse_p", lse_p), ("lse_q", lse_q), ("kl", kl)):
        _check_per_position(x, p_logits, name, (torch.float32,), "the float32 output of token_kl_fwd")
    _check_per_position(grad_kl, p_logits, "grad_kl", FLOAT_DTYPES, "floating point")
    ignore_index = check_ignore_index(ignore_index)
    for name, flag in (("need_dp", need_dp), ("need_dq", need_dq)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
    if not (need_dp or need_dq):
        raise ValueError("need_dp and need_dq are both False: there is no gradient to compute")
    block, warps = kernel_config(p_logits.shape[-1], block_v, num_warps)
    check_runnable(p_logits, INTERPRETED, "p_logits")

    dp = torch.empty(p_logits.shape, dtype=p_logits.dtype, device=p_logits.device) if need_dp else None
    dq = torch.empty(q_logits.shape, dtype=q_logits.dtype, device=q_logits.device) if need_dq else None
    n = labels.numel()
    if n == 0:
        return dp, dq
    labels_c = labels.contiguous()
    grad_c = grad_kl.to(torch.float32).contiguous()  # [N]: the sum's expanded grad has stride 0
    T, stride_pr, stride_pt = row_strides(p_logits)
    _, stride_qr, stride_qt = row_strides(q_logits)
    out = dp if dp is not None else dq
    _, stride_dr, stride_dt = row_strides(out)  # dp and dq: fresh, contiguous, one shape
    with on_device(p_logits):
        _token_kl_bwd_kernel[(n,)](
            p_logits, q_logits, labels_c, lse_p.contiguous(), lse_q.contiguous(), kl.contiguous(), grad_c,
            dp if dp is not None else out, dq if dq is not None else out,
            T, p_logits.shape[-1], stride_pr, stride_pt, stride_qr, stride_qt, stride_dr, stride_dt, ignore_index,
            BLOCK_V=block, NEED_DP=bool(need_dp), NEED_DQ=bool(need_dq), num_warps=warps, enable_fp_fusion=True,
        )
    return dp, dq


# ----------------------------------------------------------------------------------------------
# Compile signatures (compile-only tests: triton.compile every variant without a GPU)
# ----------------------------------------------------------------------------------------------

GRAD_FLAGS = ((True, False), (False, True), (True, True))  # (NEED_DP, NEED_DQ) as the launcher takes them
# Each kernel's arguments, in order, with their Triton types ("{p}" / "{q}" / "{labels}": the variant's dtypes).
_FWD_ARGS = {"p_ptr": "*{p}", "q_ptr": "*{q}", "labels_ptr": "*{labels}", "kl_ptr": "*fp32", "lse_p_ptr": "*fp32",
             "lse_q_ptr": "*fp32", "T": "i32", "V": "i32", "stride_pr": "i64", "stride_pt": "i64",
             "stride_qr": "i64", "stride_qt": "i64", "ignore_index": "i32", "BLOCK_V": "constexpr"}
_BWD_ARGS = {"p_ptr": "*{p}", "q_ptr": "*{q}", "labels_ptr": "*{labels}", "lse_p_ptr": "*fp32", "lse_q_ptr": "*fp32",
             "kl_ptr": "*fp32", "grad_ptr": "*fp32", "dp_ptr": "*{p}", "dq_ptr": "*{q}", "T": "i32", "V": "i32",
             "stride_pr": "i64", "stride_pt": "i64", "stride_qr": "i64", "stride_qt": "i64", "stride_dr": "i64",
             "stride_dt": "i64", "ignore_index": "i32", "BLOCK_V": "constexpr", "NEED_DP": "constexpr",
             "NEED_DQ": "constexpr"}
# Mixed pairs compiled too: an fp32 policy (accelerate's convert_outputs_to_fp32) beside a half-precision
# reference, and the reverse (TIS-DPO's KL(policy || ref) puts the policy first). Labels int64 for these.
_MIXED = [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32), (torch.float32, torch.float16),
          (torch.float16, torch.float32)]


def compile_signatures(vocab: int = 128256) -> list[dict]:
    """Every kernel variant as ``triton.compile`` inputs, for a vocabulary of ``vocab``.

    One entry per (kernel, p dtype, q dtype, labels dtype[, (NEED_DP, NEED_DQ)]): both logits in one dtype
    with either labels dtype, and the mixed pairs :data:`_MIXED` (see
    :func:`tidpo.kernels._launch.compile_entries` for the keys). Options match the launchers.
    """
    if is_interpreted(_token_kl_fwd_kernel):
        raise RuntimeError("compile_signatures needs the compiled kernels; unset TRITON_INTERPRET")
    block, warps = kernel_config(vocab)
    combos = [(x, x, y) for x in LOGITS_DTYPES for y in LABEL_DTYPES] + [(p, q, torch.int64) for p, q in _MIXED]
    roles = {"p": tuple(c[0] for c in combos), "q": tuple(c[1] for c in combos), "labels": tuple(c[2] for c in combos)}
    common = {"dtype_roles": roles, "constexprs": {"BLOCK_V": block},
              "options": {"num_warps": warps, "enable_fp_fusion": True}}
    forward = compile_entries(_token_kl_fwd_kernel, _FWD_ARGS, {}, name="fwd", **common)
    backward = [e for e in compile_entries(_token_kl_bwd_kernel, _BWD_ARGS,
                                           {"NEED_DP": (False, True), "NEED_DQ": (False, True)}, name="bwd",
                                           **common)
                if e["constexprs"]["NEED_DP"] or e["constexprs"]["NEED_DQ"]]
    return forward + backward
