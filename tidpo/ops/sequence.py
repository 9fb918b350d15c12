"""Per-token log-probs together with per-sequence weighted sums, the pair reduction of every loss.

``S_s = sum_{t in s} w_t logp_t`` over the valid tokens of sequence ``s`` (a padded row, or a packed
segment). The backward applies the reduction's gradient per token, ``g_t = dL/dlogp_t + w_t dL/dS_s``,
and turns it into ``dlogits`` in the same pass: inline in the Triton backward kernel, or chunk by
chunk on the torch path. Per-token values are ``[N]`` vectors; nothing ``[N, V]`` is allocated besides
the gradient itself.
"""

from __future__ import annotations

import torch

from tidpo._validation import check_labels, check_logits, check_per_token
from tidpo.ops.backend import resolve_backend
from tidpo.ops.chunked import chunked_logps_backward, chunked_logps_forward, resolve_chunk_size


def sequence_rows(values: torch.Tensor, mask: torch.Tensor,
                  segments: torch.Tensor | None, num_sequences: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token values as one row per sequence: ``([S, L], valid mask [S, L])``.

    Padded input (``segments is None``): ``values``/``mask`` are already ``[S, T]``. Packed input:
    ``values``/``mask`` are ``[N]`` (any shape, flattened) and row ``s`` holds the tokens of sequence
    ``s`` at their packed positions (``L = N``), zero elsewhere. Masked entries never leak. Sums over
    these rows are plain reductions (no atomics): bitwise reproducible.
    """
    if segments is None:
        return torch.where(mask, values, 0.0), mask
    flat_values, flat_mask = values.reshape(-1), mask.reshape(-1)
    members = segments.unsqueeze(0) == torch.arange(num_sequences, device=segments.device).unsqueeze(1)
    members = members & flat_mask.unsqueeze(0)
    return torch.where(members, flat_values.unsqueeze(0), 0.0), members


class WeightedSequenceLogps(torch.autograd.Function):
    """``(logps, S)``: per-token log-probs (shape of ``labels``) and weighted per-sequence sums ``[S]``.

    Both outputs are differentiable; ``weights`` are constants (never differentiated).
    """

    @staticmethod
    def forward(ctx, logits, labels, weights, segments, num_sequences: int, ignore_index: int, backend: str,
                chunk_size: int):
        if backend == "triton":
            from tidpo.kernels.logps import token_logps_fwd

            logps, lse, _ = token_logps_fwd(logits, labels, ignore_index)
        else:
            logps, lse = chunked_logps_forward(logits, labels, ignore_index, chunk_size)
        valid = labels != ignore_index
        w = torch.ones_like(logps) if weights is None else weights.detach().to(logps.dtype)
        sums = sequence_rows(w * logps, valid, segments, num_sequences)[0].sum(-1)
        ctx.save_for_backward(logits, labels, lse, w, segments)
        ctx.ignore_index, ctx.backend, ctx.chunk_size = ignore_index, backend, chunk_size
        return logps, sums

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logps, grad_sums):
        logits, labels, lse, w, segments = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return (None,) * 8
        if ctx.backend == "triton":
            from tidpo.kernels.logps import token_logps_bwd

            dlogits = token_logps_bwd(logits, labels, lse, grad_logps, ctx.ignore_index, seq_grad=grad_sums,
                                      weights=w, segments=segments)
        else:
            per_token = grad_sums[segments].reshape(labels.shape) if segments is not None else grad_sums[:, None]
            grad = grad_logps.to(lse.dtype) + w * per_token.to(lse.dtype)
            dlogits = chunked_logps_backward(logits, labels, lse, grad, ctx.ignore_index, ctx.chunk_size)
        return dlogits, None, None, None, None, None, None, None


def weighted_sequence_logps(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None = None, *,
                            segments: torch.Tensor | None = None, num_sequences: int | None = None,
                            ignore_index: int = -100, backend: str | None = None,
                            chunk_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs and per-sequence weighted sums ``S_s = sum_{t in s, valid} w_t logp_t``.

    Args:
        logits: ``[R, T, V]`` (padded: sequence = row) or, with ``segments``, ``[N, V]`` / ``[1, N, V]``.
        labels: token ids shaped like ``logits[..., 0]``; ``ignore_index`` marks skipped positions.
        weights: constant token weights shaped like ``labels`` (default: all ones).
        segments: int64 sequence index of every position, flattened ``[N]`` (packed batches).
        num_sequences: S (required with ``segments``; padded: R).
        backend, chunk_size: see :func:`tidpo.token_logps`.

    Returns:
        ``(logps, sums)``: fp32 (fp64 for fp64 logits) ``logps`` shaped like ``labels`` and ``sums``
        ``[S]``, both differentiable; the backward applies ``w_t dL/dS_s`` per token inline.
    """
    check_logits(logits, "logits")
    check_labels(labels, logits, ignore_index)
    if weights is not None:
        check_per_token(weights, labels, "weights", finite=True)
    if segments is None:
        if logits.dim() != 3:
            raise ValueError(f"logits must be [R, T, V] without segments, got {tuple(logits.shape)}")
        num_sequences = logits.shape[0]
    elif num_sequences is None:
        raise ValueError("num_sequences is required with segments")
    resolved = resolve_backend(backend, logits, op="logps")
    return WeightedSequenceLogps.apply(logits, labels, weights, segments, num_sequences, ignore_index, resolved,
                                       resolve_chunk_size(chunk_size, logits.shape[-1]))
