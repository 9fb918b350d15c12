"""Chunked PyTorch path: per-token log-probs and full-vocab KL without a full-size softmax.

The naive way, ``log_softmax(logits.float()).gather(...)``, holds an fp32 copy of the whole
``[N, V]`` logits plus the log-softmax it saves for backward (two or three times the size of bf16
logits). These autograd functions instead walk over the logits in chunks of at most
``chunk_size`` positions, keep only per-position fp32 values (log-sum-exp, log-prob, KL) and
recompute the softmax chunk by chunk in backward. Peak extra memory is a few ``[chunk, V]``
temporaries plus the gradient itself.

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


def chunked_logps_forward(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int,
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
        lse[idx] = chunk_lse
    return logps, lse


def chunked_logps_backward(logits: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor,
                           grad_logps: torch.Tensor, ignore_index: int, chunk_size: int) -> torch.Tensor:
    """``dlogits = g * (onehot(label) - softmax(logits))`` in the logits' dtype, chunk by chunk."""
    cdtype = lse.dtype
    dlogits = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    for idx in chunk_index(logits.shape, chunk_size):
        valid, safe = _valid_and_safe(labels[idx], ignore_index)
        g = torch.where(valid, grad_logps[idx].to(cdtype), 0.0).unsqueeze(-1)
        if logits.dtype == cdtype:
            # Same dtype: compute straight into the output chunk (no temporary, no extra copy pass).
            grad = torch.sub(logits[idx], lse[idx].unsqueeze(-1), out=dlogits[idx])
        else:
            grad = logits[idx].to(cdtype).sub_(lse[idx].unsqueeze(-1))  # the upcast copy is ours to modify
        grad.exp_().mul_(-g)  # -g * softmax
        grad.scatter_add_(-1, safe.unsqueeze(-1), g)  # + g * onehot(label)
        if logits.dtype != cdtype:
            dlogits[idx] = grad
    return dlogits


class ChunkedTokenLogps(torch.autograd.Function):
    """``logp[i] = x[i, label[i]] - logsumexp(x[i, :])``; 0 where ``label == ignore_index``.

    Forward saves only the logits (by reference), labels and the per-position fp32 log-sum-exp.
    Backward: ``dlogits[i, :] = g[i] * (onehot(label[i]) - softmax(x[i, :]))``, softmax recomputed
    from the logits and the saved log-sum-exp, chunk by chunk.
    """

    @staticmethod
    def forward(ctx, logits, labels, ignore_index: int, chunk_size: int):
        logps, lse = chunked_logps_forward(logits, labels, ignore_index, chunk_size)
        ctx.save_for_backward(logits, labels, lse)
        ctx.ignore_index = ignore_index
        ctx.chunk_size = chunk_size
        ctx.mark_non_differentiable(lse)
        return logps, lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logps, _grad_lse):
        logits, labels, lse = ctx.saved_tensors
        dlogits = chunked_logps_backward(logits, labels, lse, grad_logps, ctx.ignore_index, ctx.chunk_size)
        return dlogits, None, None, None


def _log_softmax_chunk(x: torch.Tensor, cdtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(log_softmax(x), logsumexp(x)) in ``cdtype``; log-softmax form so no probability is logged."""
    xf, is_copy = _upcast(x, cdtype)
    lse = torch.logsumexp(xf, dim=-1)
    logq = xf.sub_(lse.unsqueeze(-1)) if is_copy else xf - lse.unsqueeze(-1)
    return logq, lse


def _kl_terms(logp: torch.Tensor, logq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(p, p * (log p - log q)) with the convention 0 * log 0 = 0 (vocab entries with p == 0)."""
    p = logp.exp()
    terms = torch.where(p > 0, p * (logp - logq), 0.0)
    return p, terms


def _kl_chunk(p_chunk, q_chunk, cdtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(KL(p || q), lse_p, lse_q) of one chunk; its [chunk, V] temporaries die when it returns."""
    logp, lse_p = _log_softmax_chunk(p_chunk, cdtype)
    logq, lse_q = _log_softmax_chunk(q_chunk, cdtype)
    _, terms = _kl_terms(logp, logq)
    return terms.sum(-1), lse_p, lse_q


class ChunkedTokenKL(torch.autograd.Function):
    """Per-position ``KL(p || q) = sum_v p_v (log p_v - log q_v)`` over the full vocabulary.

    ``p = softmax(p_logits)``, ``q = softmax(q_logits)``, both from log-softmax (finite even where a
    probability underflows to 0). 0 where ``label == ignore_index``.

    Gradients (only for the inputs that require them; a reference model's logits never do):
      ``dKL/dq_logits = g * (q - p)``,
      ``dKL/dp_logits = g * p * (log p - log q - KL)``.
    """

    @staticmethod
    def forward(ctx, p_logits, q_logits, labels, ignore_index: int, chunk_size: int):
        cdtype = torch.promote_types(compute_dtype(p_logits), compute_dtype(q_logits))
        kl = torch.zeros(labels.shape, dtype=cdtype, device=p_logits.device)
        lse_p = torch.zeros_like(kl)
        lse_q = torch.zeros_like(kl)
        for idx in chunk_index(p_logits.shape, chunk_size):
            chunk_kl, lse_p[idx], lse_q[idx] = _kl_chunk(p_logits[idx], q_logits[idx], cdtype)
            kl[idx] = torch.where(labels[idx] != ignore_index, chunk_kl, 0.0)
        ctx.save_for_backward(p_logits, q_logits, labels, lse_p, lse_q, kl)
        ctx.ignore_index = ignore_index
        ctx.chunk_size = chunk_size
        return kl

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_kl):
        p_logits, q_logits, labels, lse_p, lse_q, kl = ctx.saved_tensors
        need_p, need_q = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        cdtype = kl.dtype
        dp = torch.empty(p_logits.shape, dtype=p_logits.dtype, device=p_logits.device) if need_p else None
        dq = torch.empty(q_logits.shape, dtype=q_logits.dtype, device=q_logits.device) if need_q else None
        for idx in chunk_index(p_logits.shape, ctx.chunk_size):
            valid = labels[idx] != ctx.ignore_index
            g = torch.where(valid, grad_kl[idx].to(cdtype), 0.0).unsqueeze(-1)
            logp = p_logits[idx].to(cdtype) - lse_p[idx].unsqueeze(-1)
            logq = q_logits[idx].to(cdtype) - lse_q[idx].unsqueeze(-1)
            p = logp.exp()
            if need_q:
                dq[idx] = g * (logq.exp() - p)
            if need_p:
                inner = logp - logq - kl[idx].unsqueeze(-1)
                dp[idx] = g * torch.where(p > 0, p * inner, 0.0)
        return dp, dq, None, None, None
