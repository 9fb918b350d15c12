"""Autograd functions over the fused Triton kernels (``tidpo.kernels``).

Importing this module imports Triton and the kernels; :mod:`tidpo.ops` does so only when the
backend resolves to ``"triton"``.
"""

from __future__ import annotations

import torch

from tidpo.kernels.logps import token_logps_bwd, token_logps_fwd

__all__ = ["TritonTokenLogps"]


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
