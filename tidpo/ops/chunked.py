"""Chunked PyTorch path (backend ``"torch"``): per-token log-probs and full-vocab KL without a full-size softmax.

The naive way, ``log_softmax(logits.float()).gather(...)``, holds an fp32 copy of the whole
``[N, V]`` logits plus the log-softmax it saves for backward (two or three times the size of bf16
logits). These functions instead walk over the logits in chunks of at most ``chunk_size``
positions, keep only per-position fp32 values (log-sum-exp, log-prob, KL) and recompute the
softmax chunk by chunk in backward. Peak extra memory is a few ``[chunk, V]`` temporaries plus
the gradient itself. They have the same signatures as the Triton backend's
(:mod:`tidpo.ops.triton_ops`); the autograd functions (:mod:`tidpo.ops.autograd`) call either.

Ignored positions (``label == ignore_index``) get exact zeros (value and gradient), whatever their
logits hold: NaN or +-inf there (a fully masked attention row, an fp16 overflow in padding) never
leak. Their ``lse`` is 0 (a placeholder), as on the Triton backend.

Computation runs in float32 (float64 for float64 logits, so ``torch.autograd.gradcheck`` applies);
outputs are in that compute dtype, gradients are written in the logits' dtype.

Logits may be a strided view (``model_logits[:, :-1]``): chunks are views into it, nothing is
copied at full size.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

# Elements of one chunk's fp32 temporary: 2**21 elements = 8 MiB. Big enough that the Python loop
# costs little next to the vocab work (>= 16 positions per chunk at V = 128256), small enough that
# the temporaries stay far below the size of the logits and near the CPU's caches. Measured on a
# 2-core CPU (torch 2.13, token_logps, N = 2048, V = 32000 bf16): forward 76 ms at 2**21 vs 163 ms at
# 2**23 (fresh 32 MiB buffers fault their pages in on every chunk), forward + backward 210 vs 274 ms;
# at V = 128256 2**21 was within noise of the best setting too.
CHUNK_ELEMENTS = 2**21


def default_chunk_size(vocab_size: int) -> int:
    """Positions per chunk so that one fp32 ``[chunk, V]`` temporary holds ``CHUNK_ELEMENTS``."""
    return max(1, CHUNK_ELEMENTS // max(1, vocab_size))


def resolve_chunk_size(chunk_size: int | None, vocab_size: int) -> int:
    """``chunk_size`` checked, or :func:`default_chunk_size` when None."""
    if chunk_size is None:
        return default_chunk_size(vocab_size)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
    return chunk_size


def compute_dtype(logits: torch.Tensor) -> torch.dtype:
    """float64 logits are computed in float64 (gradcheck); everything else in float32."""
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def chunk_index(shape: torch.Size, chunk_size: int) -> Iterator[tuple]:
    """Yield index tuples that split the positions of ``shape[:-1]`` into chunks.

    ``shape`` is ``[N, V]`` or ``[R, T, V]``. For ``[R, T, V]`` whole rows are grouped while a row
    fits in a chunk; longer rows are split along T. Indexing a tensor with a yielded tuple gives a
    view (no copy) of at most ``chunk_size`` positions.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size}")
    if len(shape) == 2:
        for start in range(0, shape[0], chunk_size):
            yield (slice(start, start + chunk_size),)
        return
    rows, length = shape[0], shape[1]
    if rows == 0 or length == 0:
        return
    if length <= chunk_size:
        rows_per_chunk = chunk_size // length
        for start in range(0, rows, rows_per_chunk):
            yield (slice(start, start + rows_per_chunk),)
        return
    for row in range(rows):
        for start in range(0, length, chunk_size):
            yield (row, slice(start, start + chunk_size))


def _valid_and_safe(labels: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    valid = labels != ignore_index
    # Ignored positions gather column 0 (always in range); their values are masked out afterwards.
    safe = torch.where(valid, labels, torch.zeros_like(labels)).long()
    return valid, safe


def _upcast(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, bool]:
    """``x`` in ``dtype`` and whether that is a fresh copy (safe to modify in place)."""
    y = x.to(dtype)
    return y, y.data_ptr() != x.data_ptr()


def _zero_ignored(grad: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Exact zeros at ignored positions, whatever their logits hold (NaN, +-inf: ``0 * NaN`` would be NaN)."""
    return grad.masked_fill_(~valid.unsqueeze(-1), 0.0)


# ----------------------------------------------------------------------------------------------------------
# per-token log-probs


def logps_forward(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int,
                  chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logps, lse)`` in the compute dtype, chunk by chunk; logps 0 at ignored positions."""
    cdtype = compute_dtype(logits)
    logps = torch.zeros(labels.shape, dtype=cdtype, device=logits.device)
    lse = torch.zeros(labels.shape, dtype=cdtype, device=logits.device)
    for idx in chunk_index(logits.shape, chunk_size):
        x = logits[idx]
        valid, safe = _valid_and_safe(labels[idx], ignore_index)
        chunk_lse = torch.logsumexp(x.to(cdtype), dim=-1)
        target = x.gather(-1, safe.unsqueeze(-1)).squeeze(-1).to(cdtype)
        logps[idx] = torch.where(valid, target - chunk_lse, 0.0)
        lse[idx] = torch.where(valid, chunk_lse, 0.0)
    return logps, lse


def per_token_grad(grad_logps: torch.Tensor, labels: torch.Tensor, seq_grad: torch.Tensor | None,
                   weights: torch.Tensor | None, segments: torch.Tensor | None, cdtype: torch.dtype) -> torch.Tensor:
    """``g_t = dL/dlogp_t + w_t dL/dS_{s(t)}``: the pair reduction's gradient spread back over its tokens.

    ``s(t)`` is the padded row of ``labels`` (``segments`` None) or ``segments[t]``. Segment ids of ignored tokens
    may lie anywhere (they are documented as unused): they are clamped, and ignored positions get no gradient.
    """
    grad = grad_logps.to(cdtype)
    if seq_grad is None:
        return grad
    if segments is None:
        spread = seq_grad.to(cdtype).unsqueeze(-1).expand(labels.shape)
    else:
        index = segments.reshape(labels.shape).long().clamp(0, seq_grad.shape[0] - 1)
        spread = seq_grad.to(cdtype)[index]
    w = torch.ones_like(grad) if weights is None else weights.to(cdtype)
    return grad + w * spread


def logps_backward(logits: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor, grad_logps: torch.Tensor,
                   ignore_index: int, chunk_size: int, *, seq_grad: torch.Tensor | None = None,
                   weights: torch.Tensor | None = None, segments: torch.Tensor | None = None,
                   inplace: bool = False) -> torch.Tensor:
    """``dlogits = g * (onehot(label) - softmax(logits))`` in the logits' dtype, chunk by chunk; exact zeros at
    ignored positions. ``g`` is :func:`per_token_grad`; ``inplace`` writes over the logits."""
    cdtype = lse.dtype
    g_all = per_token_grad(grad_logps, labels, seq_grad, weights, segments, cdtype)
    dlogits = logits if inplace else torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    for idx in chunk_index(logits.shape, chunk_size):
        valid, safe = _valid_and_safe(labels[idx], ignore_index)
        g = torch.where(valid, g_all[idx], 0.0).unsqueeze(-1)
        if logits.dtype == cdtype:
            # Same dtype: compute straight into the output chunk (no temporary, no extra copy pass).
            grad = torch.sub(logits[idx], lse[idx].unsqueeze(-1), out=dlogits[idx])
        else:
            grad = logits[idx].to(cdtype).sub_(lse[idx].unsqueeze(-1))  # the upcast copy is ours to modify
        grad.exp_().mul_(-g)  # -g * softmax
        grad.scatter_add_(-1, safe.unsqueeze(-1), g)  # + g * onehot(label)
        _zero_ignored(grad, valid)
        if logits.dtype != cdtype:
            dlogits[idx] = grad
    return dlogits


# ----------------------------------------------------------------------------------------------------------
# full-vocabulary KL


def _log_softmax_chunk(x: torch.Tensor, cdtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(log_softmax(x), logsumexp(x)) in ``cdtype``; log-softmax form so no probability is logged."""
    xf, is_copy = _upcast(x, cdtype)
    lse = torch.logsumexp(xf, dim=-1)
    logq = xf.sub_(lse.unsqueeze(-1)) if is_copy else xf - lse.unsqueeze(-1)
    return logq, lse


def _kl_terms(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """``p (log p - log q)`` per entry with the convention of :func:`kl_forward`: 0 where ``p`` is 0 in the
    compute dtype (never ``0 * inf``), ``+inf`` where ``p > 0`` and ``q`` is 0 (``log q = -inf``)."""
    p = logp.exp()
    return torch.where(p > 0, p * (logp - logq), 0.0)


def kl_forward(p_logits: torch.Tensor, q_logits: torch.Tensor, labels: torch.Tensor, ignore_index: int,
               chunk_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(kl, lse_p, lse_q)`` chunk by chunk, in fp32 (fp64 if either input is fp64); 0 at ignored positions.

    Convention for -inf logits: an entry whose probability ``p_v`` is 0 in the compute dtype contributes 0; an
    entry with ``p_v > 0`` against ``q_v = 0`` (a -inf q logit) makes the KL ``+inf``.
    """
    cdtype = torch.promote_types(compute_dtype(p_logits), compute_dtype(q_logits))
    kl = torch.zeros(labels.shape, dtype=cdtype, device=p_logits.device)
    lse_p = torch.zeros_like(kl)
    lse_q = torch.zeros_like(kl)
    for idx in chunk_index(p_logits.shape, chunk_size):
        valid = labels[idx] != ignore_index
        logp, chunk_lse_p = _log_softmax_chunk(p_logits[idx], cdtype)
        logq, chunk_lse_q = _log_softmax_chunk(q_logits[idx], cdtype)
        kl[idx] = torch.where(valid, _kl_terms(logp, logq).sum(-1), 0.0)
        lse_p[idx] = torch.where(valid, chunk_lse_p, 0.0)
        lse_q[idx] = torch.where(valid, chunk_lse_q, 0.0)
    return kl, lse_p, lse_q


def kl_backward(p_logits: torch.Tensor, q_logits: torch.Tensor, labels: torch.Tensor, lse_p: torch.Tensor,
                lse_q: torch.Tensor, kl: torch.Tensor, grad_kl: torch.Tensor, ignore_index: int, chunk_size: int,
                *, need_dp: bool, need_dq: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``dq_logits = g (q - p)``, ``dp_logits = g p (log p - log q - KL)`` (0 where ``p`` is 0), each in its
    input's dtype, only where asked for; exact zeros at ignored positions."""
    cdtype = kl.dtype
    dp = torch.empty(p_logits.shape, dtype=p_logits.dtype, device=p_logits.device) if need_dp else None
    dq = torch.empty(q_logits.shape, dtype=q_logits.dtype, device=q_logits.device) if need_dq else None
    for idx in chunk_index(p_logits.shape, chunk_size):
        valid = labels[idx] != ignore_index
        g = torch.where(valid, grad_kl[idx].to(cdtype), 0.0).unsqueeze(-1)
        logp = p_logits[idx].to(cdtype) - lse_p[idx].unsqueeze(-1)
        logq = q_logits[idx].to(cdtype) - lse_q[idx].unsqueeze(-1)
        p = logp.exp()
        if need_dq:
            dq[idx] = _zero_ignored(g * (logq.exp() - p), valid)
        if need_dp:
            positive = p > 0
            inner = torch.where(positive, logp, 0.0) - torch.where(positive, logq, 0.0) - kl[idx].unsqueeze(-1)
            dp[idx] = _zero_ignored(g * torch.where(positive, p * inner, 0.0), valid)
    return dp, dq
