"""Metrics of the token-weighting experiment: ROC-AUC of token weights against known key tokens, mean ± std."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

__all__ = ["mean_std", "roc_auc", "weight_auc"]

_SIDES = ("chosen", "rejected")


def _as_vector(values, name: str) -> torch.Tensor:
    """``values`` (list or tensor) as a float64 1-D tensor."""
    try:
        vector = torch.as_tensor(values, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as error:
        raise ValueError(f"{name} must be a 1-D list or tensor of numbers ({error})") from error
    if vector.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(vector.shape)}")
    return vector.detach().cpu()


def roc_auc(scores, labels) -> float:
    """Area under the ROC curve of ``scores`` [n] for binary ``labels`` [n] (Mann–Whitney U, ties count 1/2).

    The probability that a random positive scores above a random negative; O(n log n) with average ranks.

    Raises:
        ValueError: the lengths differ, a label is not 0/1, a score is not finite, or a class is empty
            (the message names the argument).
    """
    score = _as_vector(scores, "scores")
    label = _as_vector(labels, "labels")
    if score.numel() != label.numel():
        raise ValueError(f"scores and labels must have the same length, got {score.numel()} and {label.numel()}")
    if not bool(((label == 0) | (label == 1)).all()):
        raise ValueError("labels must all be 0 or 1")
    if not bool(torch.isfinite(score).all()):
        raise ValueError("scores must be finite")
    positives = int(label.sum().item())
    negatives = label.numel() - positives
    if positives == 0 or negatives == 0:
        raise ValueError(f"labels need both classes, got {positives} positive(s) and {negatives} negative(s)")
    _, inverse, counts = torch.unique(score, sorted=True, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    average_rank = ends - (counts.double() - 1) / 2          # 1-based average rank of each distinct score
    rank_sum = average_rank[inverse][label == 1].sum().item()
    u = rank_sum - positives * (positives + 1) / 2
    return float(u / (positives * negatives))


def weight_auc(weight_rows: Sequence[Mapping], label_rows: Sequence[Mapping]) -> float:
    """ROC-AUC of token weights against token labels, pooled over all chosen and rejected responses.

    Args:
        weight_rows: dicts with ``chosen_weights`` / ``rejected_weights`` lists; the first ``len(labels)``
            entries are used (a trailing EOS weight is ignored).
        label_rows: dicts ``{"chosen": [0/1 ...], "rejected": [...]}`` (``SyntheticTask.key_labels``).
    """
    if len(weight_rows) != len(label_rows):
        raise ValueError(f"weight_rows and label_rows must have the same length, got {len(weight_rows)} and "
                         f"{len(label_rows)}")
    scores: list[float] = []
    labels: list[int] = []
    for index, (weights, row_labels) in enumerate(zip(weight_rows, label_rows, strict=True)):
        for side in _SIDES:
            side_labels = list(row_labels[side])
            side_weights = list(weights[f"{side}_weights"])
            if len(side_weights) < len(side_labels):
                raise ValueError(f"weight_rows row {index}: {side}_weights has {len(side_weights)} entries, fewer "
                                 f"than the {len(side_labels)} labels")
            scores.extend(side_weights[:len(side_labels)])
            labels.extend(side_labels)
    return roc_auc(scores, labels)


def mean_std(values) -> tuple[float, float]:
    """``(mean, sample std with ddof=1)`` of ``values``; the std of a single value is 0.

    Raises:
        ValueError: ``values`` is empty.
    """
    data = [float(v) for v in values]
    if not data:
        raise ValueError("values must not be empty")
    mean = sum(data) / len(data)
    if len(data) == 1:
        return mean, 0.0
    variance = sum((v - mean) ** 2 for v in data) / (len(data) - 1)
    return mean, math.sqrt(variance)
