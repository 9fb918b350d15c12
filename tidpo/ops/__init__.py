"""Differentiable per-token ops with backend dispatch (chunked torch path, Triton kernels).

Both ops accept logits ``[N, V]`` or ``[R, T, V]`` (any strides, e.g. ``model_logits[:, :-1]``)
and labels of the same leading shape, already shifted so that ``logits[..., t, :]`` predicts
``labels[..., t]``.
"""

from __future__ import annotations

import os

import torch

from tidpo._validation import check_labels, check_logits, check_same_logits_shape
from tidpo.ops.backend import BACKENDS, resolve_backend
from tidpo.ops.chunked import ChunkedTokenKL, ChunkedTokenLogps, resolve_chunk_size

__all__ = ["BACKENDS", "token_logps", "token_logps_and_lse", "token_kl"]


def token_logps_and_lse(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100, *,
                        backend: str | None = None,
                        chunk_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs and the per-position log-sum-exp (see :func:`token_logps`).

    Returns:
        ``(logps, lse)``, both fp32 (fp64 for fp64 logits) with the shape of ``labels``; ``lse`` is
        not differentiable. At ignored positions ``lse`` is unspecified: the row's log-sum-exp on the
        torch path, 0 on the Triton path (the kernel skips ignored rows).
    """
    check_logits(logits, "logits")
    check_labels(labels, logits, ignore_index)
    if resolve_backend(backend, logits, op="logps") == "triton":
        from tidpo.ops.triton_ops import TritonTokenLogps  # imports Triton only when used

        return TritonTokenLogps.apply(logits, labels, ignore_index)
    return ChunkedTokenLogps.apply(logits, labels, ignore_index, resolve_chunk_size(chunk_size, logits.shape[-1]))


def token_logps(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100, *,
                backend: str | None = None, chunk_size: int | None = None) -> torch.Tensor:
    """Per-token log-probabilities of ``labels`` under ``softmax(logits)``, differentiable.

    ``logp[..., t] = logits[..., t, y_t] - logsumexp_v logits[..., t, v]`` (METHODS.md §0, §4.1),
    computed in fp32 from logits of any float dtype, without materialising the vocab softmax.

    Args:
        logits: ``[N, V]`` or ``[R, T, V]``, float16/bfloat16/float32/float64, any strides.
        labels: integer ``[N]`` or ``[R, T]``; ``ignore_index`` marks prompt/padding positions.
        ignore_index: label value of positions to skip (their log-prob is 0 and gets no gradient).
        backend: ``"auto"`` | ``"torch"`` | ``"triton"``; default from ``TIDPO_BACKEND`` (else auto).
        chunk_size: positions per chunk on the torch path (default: 8 MiB fp32 temporaries).

    Returns:
        fp32 tensor shaped like ``labels`` (fp64 for fp64 logits), 0 at ignored positions.

    Example:
        >>> logits = torch.randn(2, 5, 11, requires_grad=True)
        >>> labels = torch.randint(0, 11, (2, 5)); labels[:, :2] = -100
        >>> token_logps(logits, labels).sum().backward()
    """
    logps, _ = token_logps_and_lse(logits, labels, ignore_index, backend=backend, chunk_size=chunk_size)
    return logps


def _kl_backend(backend: str | None, p_logits: torch.Tensor, q_logits: torch.Tensor) -> str:
    """The backend for ``token_kl``: ``"auto"`` takes the kernels only when BOTH logits suit them.

    The kernels take two logits of one dtype, each with unit stride along V; under ``"auto"`` a pair that
    does not fit (e.g. bf16 policy, fp32 reference) runs on the chunked torch path. An explicit
    ``"triton"`` never falls back: the launcher raises with the reason.
    """
    resolved = resolve_backend(backend, p_logits, op="kl")
    requested = backend if backend is not None else os.environ.get("TIDPO_BACKEND", "auto")
    q_fits = q_logits.dtype == p_logits.dtype and resolve_backend("auto", q_logits, op="kl") == "triton"
    if resolved == "triton" and requested == "auto" and not q_fits:
        return "torch"
    return resolved


def token_kl(p_logits: torch.Tensor, q_logits: torch.Tensor, labels: torch.Tensor,
             ignore_index: int = -100, *, backend: str | None = None,
             chunk_size: int | None = None) -> torch.Tensor:
    """Per-position ``KL(p || q)`` over the full vocabulary, differentiable w.r.t. either input.

    ``KL_t = sum_v p_v (log p_v - log q_v)`` with ``p = softmax(p_logits[t])``,
    ``q = softmax(q_logits[t])`` (METHODS.md §0, §1.1). Computed from log-softmax values, so it
    stays finite when a probability underflows to 0 (the ``softmax().log()`` form gives NaN).

    TDPO / TI-DPO use ``KL(ref || policy)``: ``token_kl(ref_logits, policy_logits, labels)``.
    TIS-DPO's ``token_level`` branch uses ``KL(policy || ref)``: ``token_kl(policy_logits, ref_logits, ...)``.

    Args:
        p_logits, q_logits: ``[N, V]`` or ``[R, T, V]`` of equal shape, any float dtype and strides
            (the Triton kernels take float32/float16/bfloat16, one dtype for both, unit stride along V;
            ``"auto"`` uses the chunked torch path for a pair that does not fit).
        labels: integer ``[N]`` or ``[R, T]``; only positions with ``labels != ignore_index`` count.
        backend, chunk_size: see :func:`token_logps`.

    Returns:
        fp32 tensor shaped like ``labels`` (fp64 if either input is fp64), 0 at ignored positions.
    """
    check_logits(p_logits, "p_logits")
    check_logits(q_logits, "q_logits")
    check_same_logits_shape(q_logits, p_logits, "q_logits", "p_logits")
    check_labels(labels, p_logits, ignore_index, logits_name="p_logits")
    if _kl_backend(backend, p_logits, q_logits) == "triton":
        from tidpo.ops.triton_ops import TritonTokenKL  # imports Triton only when used

        return TritonTokenKL.apply(p_logits, q_logits, labels, ignore_index)
    return ChunkedTokenKL.apply(p_logits, q_logits, labels, ignore_index,
                                resolve_chunk_size(chunk_size, p_logits.shape[-1]))
