"""Autograd functions over the fused Triton kernels (``tidpo.kernels``).

Importing this module imports Triton and the kernels; :mod:`tidpo.ops` does so only when the
backend resolves to ``"triton"``.
"""

from __future__ import annotations

import torch

from tidpo.kernels.kl import token_kl_bwd, token_kl_fwd
from tidpo.kernels.logps import token_logps_bwd, token_logps_fwd

__all__ = ["TritonTokenKL", "TritonTokenLogps"]


class TritonTokenLogps(torch.autograd.Function):
    """``logp[i] = x[i, label[i]] - logsumexp(x[i, :])``; 0 where ``label == ignore_index``.

    Same contract as :class:`tidpo.ops.chunked.ChunkedTokenLogps` (fp32 ``(logps, lse)``, ``lse``
    not differentiable), computed by the fused kernels: forward reads the logits once (online
    log-sum-exp) and saves only the logits (by reference, no copy), the labels and the fp32 ``lse``;
    backward reads them again and writes ``dlogits = g * (onehot(label) - softmax(x))`` in the
    logits' dtype. One difference: ``lse`` is 0 at ignored positions (the kernel skips their row).

    ``inplace=True`` writes the gradient over the logits buffer (saves one ``[*, V]`` allocation);
    it destroys the logits, so it is only correct when nothing else saved them for backward.
    """

    @staticmethod
    def forward(ctx, logits, labels, ignore_index: int = -100, inplace: bool = False):
        logps, lse, _ = token_logps_fwd(logits, labels, ignore_index)
        ctx.save_for_backward(logits, labels, lse)
        ctx.ignore_index = ignore_index
        ctx.inplace = inplace
        ctx.mark_non_differentiable(lse)
        return logps, lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logps, _grad_lse):
        logits, labels, lse = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        dlogits = token_logps_bwd(logits, labels, lse, grad_logps, ctx.ignore_index, inplace=ctx.inplace)
        return dlogits, None, None, None


class TritonTokenKL(torch.autograd.Function):
    """Per-position ``KL(softmax(p_logits) || softmax(q_logits))``; 0 where ``label == ignore_index``.

    Same contract as :class:`tidpo.ops.chunked.ChunkedTokenKL` (fp32 ``kl``), computed by the fused
    kernels: forward reads each logits row once (online softmax of both rows plus ``E_p[a - b]``) and
    saves the two logits (by reference, no copy), the labels and the fp32 ``kl``, ``lse_p``, ``lse_q``;
    backward reads both rows again and writes, only for the inputs that require grad,
    ``dq_logits = g (q - p)`` and ``dp_logits = g p (log p - log q - KL)`` in the logits' dtype.
    Both logits must have one dtype (float32/float16/bfloat16).
    """

    @staticmethod
    def forward(ctx, p_logits, q_logits, labels, ignore_index: int = -100):
        kl, lse_p, lse_q = token_kl_fwd(p_logits, q_logits, labels, ignore_index)
        ctx.save_for_backward(p_logits, q_logits, labels, lse_p, lse_q, kl)
        ctx.ignore_index = ignore_index
        return kl

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_kl):
        p_logits, q_logits, labels, lse_p, lse_q, kl = ctx.saved_tensors
        need_p, need_q = bool(ctx.needs_input_grad[0]), bool(ctx.needs_input_grad[1])
        if not (need_p or need_q):
            return None, None, None, None
        dp, dq = token_kl_bwd(p_logits, q_logits, labels, lse_p, lse_q, kl, grad_kl, ctx.ignore_index,
                              need_dp=need_p, need_dq=need_q)
        return dp, dq, None, None
