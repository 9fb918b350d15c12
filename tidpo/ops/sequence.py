"""Per-token log-probs together with per-sequence weighted sums, the pair reduction of every loss.

``S_s = sum_{t in s} w_t logp_t`` over the valid tokens of sequence ``s`` (a padded row, or a packed
segment). The backward applies the reduction's gradient per token, ``g_t = dL/dlogp_t + w_t dL/dS_s``,
and turns it into ``dlogits`` in the same pass: inline in the Triton backward kernel, or chunk by
chunk on the torch path. Per-token values are ``[N]`` vectors; nothing ``[N, V]`` is allocated besides
the gradient itself.
"""

from __future__ import annotations

from types import ModuleType

import torch

from tidpo._validation import (
    IGNORE_INDEX,
    check_finite_positions,
    check_int,
    check_labels,
    check_logits,
    check_per_token,
    is_fused_logits,
)
from tidpo.ops.backend import implementation, resolve_backend
from tidpo.ops.chunked import resolve_chunk_size


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


def sequence_sums(values: torch.Tensor, mask: torch.Tensor, segments: torch.Tensor | None,
                  num_sequences: int) -> torch.Tensor:
    """``[S]``: the sum of ``values`` over each sequence's valid tokens (see :func:`sequence_rows`), differentiable.

    Accumulated in float64 and rounded once to the values' dtype, so the padded and the packed layout of the
    same tokens give the same fp32 sums (an fp32 sum depends on the order and number of the zeros around the
    tokens). Devices without float64 (Apple MPS) accumulate in the values' dtype.
    """
    wide = values if values.device.type == "mps" else values.double()
    return sequence_rows(wide, mask, segments, num_sequences)[0].sum(-1).to(values.dtype)


class WeightedSequenceLogps(torch.autograd.Function):
    """``(logps, lse, S)``: per-token log-probs, their log-sum-exp and weighted per-sequence sums ``[num_sequences]``.

    ``S_s = sum_{t in s, valid} w_t logp_t`` (:func:`sequence_sums`: the layout of the tokens, padded rows or
    packed segments, does not show in the result). ``logps`` and ``S`` are
    differentiable; ``weights`` are constants. The backward applies ``w_t dL/dS_s`` per token in the same pass
    that writes ``dlogits`` (inline in the Triton kernel).
    """

    @staticmethod
    def forward(ctx, logits, labels, weights, segments, num_sequences: int, ignore_index: int, impl: ModuleType,
                chunk_size: int):
        logps, lse = impl.logps_forward(logits, labels, ignore_index, chunk_size)
        valid = labels != ignore_index
        w = torch.ones_like(logps) if weights is None else weights.detach().to(logps.dtype)
        sums = sequence_sums(w * logps, valid, segments, num_sequences)
        ctx.save_for_backward(logits, labels, lse, w, segments)
        ctx.ignore_index, ctx.impl, ctx.chunk_size = ignore_index, impl, chunk_size
        ctx.mark_non_differentiable(lse)
        return logps, lse, sums

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logps, _grad_lse, grad_sums):
        logits, labels, lse, w, segments = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return (None,) * 8
        dlogits = ctx.impl.logps_backward(logits, labels, lse, grad_logps, ctx.ignore_index, ctx.chunk_size,
                                          seq_grad=grad_sums, weights=w, segments=segments)
        return dlogits, None, None, None, None, None, None, None


def weighted_sequence_logps(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None = None, *,
                            segments: torch.Tensor | None = None, num_sequences: int | None = None,
                            ignore_index: int = IGNORE_INDEX, backend: str | None = None,
                            chunk_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs and per-sequence weighted sums ``S_s = sum_{t in s, valid} w_t logp_t``.

    Args:
        logits: ``[R, T, V]`` (padded: sequence = row) or, with ``segments``, ``[N, V]`` / ``[1, N, V]``.
        labels: int64/int32 token ids shaped like ``logits[..., 0]``; ``ignore_index`` marks skipped positions.
        weights: constant token weights shaped like ``labels`` (default: all ones).
        segments: integer sequence index of every position, ``[N]`` or ``[1, N]`` (packed batches); ids of
            ignored positions are not used (any value).
        num_sequences: S (required with ``segments``; padded: R).
        backend, chunk_size: see :func:`tidpo.token_logps`.

    Returns:
        ``(logps, sums)``: fp32 (fp64 for fp64 logits) ``logps`` shaped like ``labels`` and ``sums``
        ``[S]`` (accumulated in float64, so padded and packed layouts of the same tokens agree), both
        differentiable; the backward applies ``w_t dL/dS_s`` per token inline.

    Raises:
        TypeError / ValueError: as :func:`tidpo.token_logps`, plus a ``segments`` / ``num_sequences`` mismatch;
        with value checks on, non-finite logits at a valid position (named).
    """
    check_logits(logits, "logits")
    check_labels(labels, logits, ignore_index)
    if weights is not None:
        check_per_token(weights, labels, "weights", finite=True)
    if segments is None:
        if logits.dim() != 3:
            raise ValueError(f"logits must be [R, T, V] without segments, got {tuple(logits.shape)}")
        num_sequences = logits.shape[0]
    else:
        if num_sequences is None:
            raise ValueError("num_sequences is required with segments")
        check_int(num_sequences, "num_sequences", low=1)
        if segments.numel() != labels.numel():
            raise ValueError(f"segments has {segments.numel()} entries for {labels.numel()} labels")
        segments = segments.reshape(-1).long()
    if is_fused_logits(logits):
        # The fused head already folds the per-token gradient into its rows: the weighted sums compose on top.
        from tidpo.ops import token_logps_and_lse

        logps, lse = token_logps_and_lse(logits, labels, ignore_index, backend=backend, chunk_size=chunk_size)
        w = torch.ones_like(logps) if weights is None else weights.detach().to(logps.dtype)
        return logps, sequence_sums(w * logps, labels != ignore_index, segments, num_sequences)
    impl = implementation(resolve_backend(backend, logits, op="logps"))
    logps, lse, sums = WeightedSequenceLogps.apply(logits, labels, weights, segments, num_sequences, ignore_index,
                                                   impl, resolve_chunk_size(chunk_size, logits.shape[-1]))
    check_finite_positions(lse, labels != ignore_index, "logits", "are not finite")
    return logps, sums
