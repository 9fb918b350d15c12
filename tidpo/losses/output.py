"""The output objects of the losses: the loss, and its logging metrics as sums and counts."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import torch

#: A metric as ``(sum, count)``: two detached 0-dim float tensors whose ratio is the metric's mean.
MetricTotal = tuple[torch.Tensor, torch.Tensor]


def metric_total(values: torch.Tensor, count: torch.Tensor | int | None = None) -> MetricTotal:
    """``(sum of values, count)``, detached, float; ``count`` defaults to the number of elements of ``values``.

    An int count becomes a tensor by a fill on the values' device (no host-to-device copy, no sync).
    """
    values = values.detach()
    total = values.float().sum()
    if count is None:
        count = values.numel()
    if isinstance(count, int):
        count = torch.full((), count, dtype=torch.float32, device=values.device)
    return total, count.detach().float()


@dataclass
class LossOutput:
    """A training loss and its metrics.

    Attributes:
        loss: scalar to call ``.backward()`` on.
        metric_totals: ``{key: (sum, count)}``, detached 0-dim float tensors. A metric's value is
            ``sum / count``; keeping the two apart lets a trainer average it exactly over micro-batches,
            evaluation batches of any size and processes (add the sums, add the counts, then divide).
    """

    loss: torch.Tensor
    metric_totals: dict[str, MetricTotal] = field(default_factory=dict, kw_only=True)

    @property
    def metrics(self) -> Mapping[str, torch.Tensor]:
        """Read-only ``{key: sum / count}`` (0-dim tensors; 0 where the count is 0). Nothing calls ``.item()``."""
        return MappingProxyType({key: total / count.clamp(min=1) for key, (total, count) in self.metric_totals.items()})

    @property
    def loss_total(self) -> MetricTotal:
        """``(sum, count)`` whose ratio is ``loss``: here ``(loss, 1)``; subclasses give per-item sums."""
        return metric_total(self.loss)


@dataclass
class PreferenceLossOutput(LossOutput):
    """Result of a preference loss over B pairs.

    Attributes:
        loss: scalar, mean of ``losses`` over pairs; call ``.backward()`` on it.
        losses: ``[B]`` per-pair loss (differentiable).
        chosen_rewards: ``[B]`` implicit reward of the chosen responses (detached; each loss's
            docstring gives its formula).
        rejected_rewards: ``[B]`` implicit reward of the rejected responses (detached).
        metric_totals / metrics: TRL-style keys. Pair metrics, averaged over the B pairs:
            ``rewards/chosen``, ``rewards/rejected``, ``rewards/margins``, ``rewards/accuracies``
            (share of pairs whose chosen reward is strictly higher), ``logps/chosen``,
            ``logps/rejected`` (summed log-probs of a response), ``triplet/loss``. Token metrics,
            averaged over the valid tokens of that side: ``weights/chosen_mean``,
            ``weights/rejected_mean``, ``kl/chosen``, ``kl/rejected`` (the per-token KL term the
            loss uses). Nothing here calls ``.item()``: convert when you log, not on the training step.
    """

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor

    @property
    def loss_total(self) -> MetricTotal:
        """``(sum of the per-pair losses, B)``."""
        return metric_total(self.losses)


@dataclass
class TokenMeanOutput(LossOutput):
    """A loss that is a mean over tokens: ``loss = loss_sum / num_tokens``.

    Attributes:
        loss_sum: the differentiable sum over the tokens, so that a trainer can divide it by the token count of
            a whole global batch instead (gradient accumulation, several processes).
        num_tokens: 0-dim int tensor, the tokens summed.
    """

    loss_sum: torch.Tensor
    num_tokens: torch.Tensor

    @property
    def loss_total(self) -> MetricTotal:
        """``(sum over the tokens, number of tokens)``."""
        return metric_total(self.loss_sum, self.num_tokens)
