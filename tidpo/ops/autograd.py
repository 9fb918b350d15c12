"""The autograd functions of the per-token ops: one per op, whatever the backend (the pair reduction's is
:class:`tidpo.ops.sequence.WeightedSequenceLogps`).

Each takes the backend's implementation module (:func:`tidpo.ops.backend.implementation`: the chunked torch
path or the Triton kernels, both with the same functions) and calls its forward and backward; nothing here
depends on which one it is.
"""

from __future__ import annotations

from types import ModuleType

import torch

__all__ = ["TokenKL", "TokenLogps"]


class TokenLogps(torch.autograd.Function):
    """``(logps, lse)``: ``logp[i] = x[i, label[i]] - logsumexp(x[i, :])``, 0 where ``label == ignore_index``.

    Forward saves the logits (by reference, no copy), the labels and the per-position log-sum-exp ``lse``
    (not differentiable). Backward: ``dlogits[i, :] = g[i] * (onehot(label[i]) - softmax(x[i, :]))``, the
    softmax recomputed from the logits and ``lse``; exact zeros at ignored positions. ``inplace=True`` writes
    the gradient over the logits buffer (saves one ``[*, V]`` allocation); it destroys the logits, so it is only
    correct when nothing else saved them for backward.
    """

    @staticmethod
    def forward(ctx, logits, labels, ignore_index: int, impl: ModuleType, chunk_size: int, inplace: bool = False):
        logps, lse = impl.logps_forward(logits, labels, ignore_index, chunk_size)
        ctx.save_for_backward(logits, labels, lse)
        ctx.ignore_index, ctx.impl, ctx.chunk_size, ctx.inplace = ignore_index, impl, chunk_size, inplace
        ctx.mark_non_differentiable(lse)
        return logps, lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logps, _grad_lse):
        logits, labels, lse = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return (None,) * 6
        dlogits = ctx.impl.logps_backward(logits, labels, lse, grad_logps, ctx.ignore_index, ctx.chunk_size,
                                          inplace=ctx.inplace)
        return dlogits, None, None, None, None, None


class TokenKL(torch.autograd.Function):
    """``(kl, lse_p, lse_q)``: per-position ``KL(softmax(p_logits) || softmax(q_logits))``, 0 where
    ``label == ignore_index``, and the two rows' log-sum-exp (not differentiable).

    Forward saves both logits (by reference), the labels and the per-position ``kl``, ``lse_p``, ``lse_q``.
    Backward writes, only for the inputs that require grad, ``dq_logits = g (q - p)`` and
    ``dp_logits = g p (log p - log q - KL)``, each in its input's dtype; exact zeros at ignored positions.
    """

    @staticmethod
    def forward(ctx, p_logits, q_logits, labels, ignore_index: int, impl: ModuleType, chunk_size: int):
        kl, lse_p, lse_q = impl.kl_forward(p_logits, q_logits, labels, ignore_index, chunk_size)
        ctx.save_for_backward(p_logits, q_logits, labels, lse_p, lse_q, kl)
        ctx.ignore_index, ctx.impl, ctx.chunk_size = ignore_index, impl, chunk_size
        ctx.mark_non_differentiable(lse_p, lse_q)
        return kl, lse_p, lse_q

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_kl, _grad_lse_p, _grad_lse_q):
        p_logits, q_logits, labels, lse_p, lse_q, kl = ctx.saved_tensors
        need_p, need_q = bool(ctx.needs_input_grad[0]), bool(ctx.needs_input_grad[1])
        if not (need_p or need_q):
            return (None,) * 6
        dp, dq = ctx.impl.kl_backward(p_logits, q_logits, labels, lse_p, lse_q, kl, grad_kl, ctx.ignore_index,
                                      ctx.chunk_size, need_dp=need_p, need_dq=need_q)
        return dp, dq, None, None, None, None
