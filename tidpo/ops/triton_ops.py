"""Triton backend (``"triton"``): the fused kernels of ``tidpo.kernels`` behind the backend interface.

Same functions and signatures as the chunked torch path (:mod:`tidpo.ops.chunked`); ``chunk_size`` is not
used (the kernels stream each row in tiles). Importing this module imports Triton and the kernels;
:mod:`tidpo.ops` does so only when the backend resolves to ``"triton"``.
"""

from __future__ import annotations

import torch

from tidpo.kernels.kl import token_kl_bwd, token_kl_fwd
from tidpo.kernels.logps import token_logps_bwd, token_logps_fwd

__all__ = ["kl_backward", "kl_forward", "logps_backward", "logps_forward"]


def logps_forward(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int,
                  chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    logps, lse, _ = token_logps_fwd(logits, labels, ignore_index)
    return logps, lse


def logps_backward(logits: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor, grad_logps: torch.Tensor,
                   ignore_index: int, chunk_size: int, *, seq_grad: torch.Tensor | None = None,
                   weights: torch.Tensor | None = None, segments: torch.Tensor | None = None,
                   inplace: bool = False) -> torch.Tensor:
    if segments is not None:
        segments = segments.reshape(labels.shape)  # packed [N] ids next to [1, N] labels, or the reverse
    return token_logps_bwd(logits, labels, lse, grad_logps, ignore_index, seq_grad=seq_grad, weights=weights,
                           segments=segments, inplace=inplace)


def kl_forward(p_logits: torch.Tensor, q_logits: torch.Tensor, labels: torch.Tensor, ignore_index: int,
               chunk_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return token_kl_fwd(p_logits, q_logits, labels, ignore_index)


def kl_backward(p_logits: torch.Tensor, q_logits: torch.Tensor, labels: torch.Tensor, lse_p: torch.Tensor,
                lse_q: torch.Tensor, kl: torch.Tensor, grad_kl: torch.Tensor, ignore_index: int, chunk_size: int,
                *, need_dp: bool, need_dq: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    return token_kl_bwd(p_logits, q_logits, labels, lse_p, lse_q, kl, grad_kl, ignore_index, need_dp=need_dp,
                        need_dq=need_dq)
