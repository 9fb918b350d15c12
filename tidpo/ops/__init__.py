"""Differentiable per-token ops with backend dispatch (chunked torch path, Triton kernels).

Both ops accept logits ``[N, V]`` or ``[R, T, V]`` (any strides, e.g. ``model_logits[:, :-1]``)
and labels of the same leading shape, already shifted so that ``logits[..., t, :]`` predicts
``labels[..., t]``. One autograd function per op (:mod:`tidpo.ops.autograd`) calls the chosen backend's
implementation (:func:`tidpo.ops.backend.implementation`).
"""

from __future__ import annotations

import os

import torch

from tidpo._validation import (
    IGNORE_INDEX,
    check_finite_positions,
    check_labels,
    check_logits,
    check_same_logits_shape,
    is_fused_logits,
)
from tidpo.ops.autograd import TokenKL, TokenLogps
from tidpo.ops.backend import BACKENDS, check_fused_backend, implementation, resolve_backend
from tidpo.ops.chunked import resolve_chunk_size
from tidpo.ops.fused_head import fused_token_kl, fused_token_logps
from tidpo.ops.lm_head import FusedLogits, LMHead

__all__ = ["BACKENDS", "FusedLogits", "LMHead", "token_kl", "token_logps", "token_logps_and_lse"]


def token_logps_and_lse(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX, *,
                        backend: str | None = None,
                        chunk_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs and the per-position log-sum-exp (see :func:`token_logps`).

    Returns:
        ``(logps, lse)``, both fp32 (fp64 for fp64 logits) with the shape of ``labels``; ``lse`` is
        not differentiable and 0 (a placeholder) at ignored positions on every backend.
    """
    check_logits(logits, "logits")
    check_labels(labels, logits, ignore_index)
    if is_fused_logits(logits):
        check_fused_backend(backend)
        logps, lse = fused_token_logps(logits, labels, ignore_index, chunk_size)
    else:
        impl = implementation(resolve_backend(backend, logits, op="logps"))
        logps, lse = TokenLogps.apply(logits, labels, ignore_index, impl,
                                      resolve_chunk_size(chunk_size, logits.shape[-1]))
    check_finite_positions(lse, labels != ignore_index, "logits", "are not finite")
    return logps, lse


def token_logps(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX, *,
                backend: str | None = None, chunk_size: int | None = None) -> torch.Tensor:
    """Per-token log-probabilities of ``labels`` under ``softmax(logits)``, differentiable.

    ``logp[..., t] = logits[..., t, y_t] - logsumexp_v logits[..., t, v]`` (docs/methods.md §0, §4.1),
    computed in fp32 from logits of any float dtype, without materialising the vocab softmax.

    Ignored positions (``labels == ignore_index``) give exactly 0 and receive exactly 0 gradient on every
    backend, whatever their logits hold (NaN or +-inf there, e.g. a fully masked attention row or an fp16
    overflow in padding, never leak). At valid positions non-finite logits propagate as in PyTorch; the value
    checks (always on CPU, on an accelerator with ``TIDPO_CHECK_VALUES=1``) refuse them, naming the position.

    Args:
        logits: ``[N, V]`` or ``[R, T, V]``, float16/bfloat16/float32/float64, any strides; or
            :class:`FusedLogits` (``LMHead(...)(hidden)``): the same values computed from the hidden states tile by
            tile, never held whole (:mod:`tidpo.ops.fused_head`).
        labels: int64 or int32 ``[N]`` or ``[R, T]``; ``ignore_index`` marks prompt/padding positions.
        ignore_index: label value of positions to skip.
        backend: ``"auto"`` | ``"torch"`` | ``"triton"``; default from ``TIDPO_BACKEND`` (else auto).
        chunk_size: positions per chunk on the torch path (default: 8 MiB fp32 temporaries).

    Returns:
        fp32 tensor shaped like ``labels`` (fp64 for fp64 logits), 0 at ignored positions.

    Raises:
        TypeError: non-float logits, labels not int64/int32. ValueError: shapes or devices that do not match,
        a label outside ``[0, V)`` (value checks), non-finite logits at a valid position (value checks).

    Example:
        >>> logits = torch.randn(2, 5, 11, requires_grad=True)
        >>> labels = torch.randint(0, 11, (2, 5)); labels[:, :2] = -100
        >>> token_logps(logits, labels).sum().backward()
    """
    logps, _ = token_logps_and_lse(logits, labels, ignore_index, backend=backend, chunk_size=chunk_size)
    return logps


def _kl_backend(backend: str | None, p_logits: torch.Tensor, q_logits: torch.Tensor) -> str:
    """The backend for ``token_kl``: ``"auto"`` takes the kernels when both logits are CUDA tensors they read
    (float32/float16/bfloat16 — each in its own dtype — with unit stride along V); an explicit ``"triton"``
    never falls back (the launcher raises with the reason)."""
    resolved = resolve_backend(backend, p_logits, op="kl")
    requested = backend if backend is not None else os.environ.get("TIDPO_BACKEND", "auto")
    if resolved == "triton" and requested == "auto" and resolve_backend("auto", q_logits, op="kl") != "triton":
        return "torch"
    return resolved


def token_kl(p_logits: torch.Tensor, q_logits: torch.Tensor, labels: torch.Tensor,
             ignore_index: int = IGNORE_INDEX, *, backend: str | None = None,
             chunk_size: int | None = None) -> torch.Tensor:
    """Per-position ``KL(p || q)`` over the full vocabulary, differentiable w.r.t. either input.

    ``KL_t = sum_v p_v (log p_v - log q_v)`` with ``p = softmax(p_logits[t])``,
    ``q = softmax(q_logits[t])`` (docs/methods.md §0, §1.1). Computed from log-softmax values, so it
    stays finite when a probability underflows to 0 (the ``softmax().log()`` form gives NaN).

    -inf logits (a masked vocabulary), one convention on every backend and for any tiling: an entry whose
    ``p_v`` is 0 in fp32 (a -inf p logit, or an underflow) contributes 0; an entry with ``p_v > 0`` against a
    -inf q logit (``q_v = 0``) makes ``KL_t = +inf``. Never NaN from -inf entries. Ignored positions give exactly 0
    and receive exactly 0 gradient, whatever their logits hold.

    TDPO / TI-DPO use ``KL(ref || policy)``: ``token_kl(ref_logits, policy_logits, labels)``.
    TIS-DPO's ``token_level`` branch uses ``KL(policy || ref)``: ``token_kl(policy_logits, ref_logits, ...)``.

    Args:
        p_logits, q_logits: ``[N, V]`` or ``[R, T, V]`` of equal shape (or both :class:`FusedLogits`, e.g. the
            reference's and the policy's heads on their hidden states), any float dtypes (they may differ, e.g.
            fp32 policy logits beside a bf16 reference: each is read in its own dtype) and strides (the Triton
            kernels need unit stride along V; ``"auto"`` uses the chunked torch path for a float64 input or one
            without it).
        labels: int64 or int32 ``[N]`` or ``[R, T]``; only positions with ``labels != ignore_index`` count.
        backend, chunk_size: see :func:`token_logps`.

    Returns:
        fp32 tensor shaped like ``labels`` (fp64 if either input is fp64), 0 at ignored positions.

    Raises:
        As :func:`token_logps`, for either input; with value checks on, a row of either logits with NaN or
        +inf, or all -inf, at a valid position.
    """
    check_logits(p_logits, "p_logits")
    check_logits(q_logits, "q_logits")
    check_same_logits_shape(q_logits, p_logits, "q_logits", "p_logits")
    check_labels(labels, p_logits, ignore_index, logits_name="p_logits")
    if is_fused_logits(p_logits) != is_fused_logits(q_logits):
        raise TypeError("p_logits and q_logits must both be logits tensors or both FusedLogits (an LM head and its "
                        "hidden states), not one of each")
    if is_fused_logits(p_logits):
        check_fused_backend(backend)
        kl, lse_p, lse_q = fused_token_kl(p_logits, q_logits, labels, ignore_index, chunk_size)
    else:
        impl = implementation(_kl_backend(backend, p_logits, q_logits))
        kl, lse_p, lse_q = TokenKL.apply(p_logits, q_logits, labels, ignore_index, impl,
                                         resolve_chunk_size(chunk_size, p_logits.shape[-1]))
    valid = labels != ignore_index
    check_finite_positions(lse_p, valid, "p_logits", "are not finite")
    check_finite_positions(lse_q, valid, "q_logits", "are not finite")
    return kl
