"""The output objects of the losses: the loss, and its logging metrics as per-pair sums and counts."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import torch

#: A metric's parts: ``(sums [n], counts [n])``, detached float tensors with one entry per pair (per step for
#: timings). Its value is ``sums.sum() / counts.sum()``.
MetricParts = tuple[torch.Tensor, torch.Tensor]


def per_pair(values: torch.Tensor, counts: torch.Tensor | None = None) -> MetricParts:
    """Parts of a metric from per-pair ``values`` ``[B]`` (and their counts, default 1 each), detached, float."""
    values = values.detach().float().reshape(-1)
    counts = torch.ones_like(values) if counts is None else counts.detach().float().reshape(-1)
    return values, counts


@dataclass
class LossOutput:
    """A training loss and its metrics.

    Attributes:
        loss: scalar to call ``.backward()`` on: the mean of the per-item losses (items: pairs, or the response
            tokens of a token-mean loss).
        metric_parts: ``{key: (sums, counts)}``, detached ``[B]`` float tensors, one entry per pair. A metric's
            value is ``sums.sum() / counts.sum()``: a pair metric has count 1 per pair, a token metric the pair's
            token count. Keeping them per pair lets a trainer average exactly over micro-batches, evaluation
            batches of any size and processes — and drop the duplicate pairs a distributed sampler pads with.
    """

    loss: torch.Tensor
    metric_parts: dict[str, MetricParts] = field(default_factory=dict, kw_only=True)

    @property
    def metric_totals(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``{key: (sum, count)}`` (0-dim tensors) over the batch."""
        return {key: (sums.sum(), counts.sum()) for key, (sums, counts) in self.metric_parts.items()}

    @property
    def metrics(self) -> Mapping[str, torch.Tensor]:
        """Read-only ``{key: sum / count}`` (0-dim tensors; 0 where the count is 0). Nothing calls ``.item()``."""
        return MappingProxyType({key: total / count.clamp(min=1) for key, (total, count) in self.metric_totals.items()})

    def item_sum(self) -> torch.Tensor:
        """The differentiable sum of the per-item losses (``loss`` is it divided by :attr:`num_items`)."""
        raise NotImplementedError

    @property
    def num_items(self) -> torch.Tensor:
        """How many items ``loss`` averages over (0-dim)."""
        raise NotImplementedError

    def loss_parts(self) -> MetricParts:
        """The loss as per-pair parts (sums, counts), like a metric: its exact mean over any batching."""
        raise NotImplementedError


@dataclass
class PreferenceLossOutput(LossOutput):
    """Result of a preference loss over B pairs.

    Attributes:
        loss: scalar, mean of ``losses`` over pairs; call ``.backward()`` on it.
        losses: ``[B]`` per-pair loss (differentiable).
        chosen_rewards: ``[B]`` implicit reward of the chosen responses (detached; each loss's
            docstring gives its formula).
        rejected_rewards: ``[B]`` implicit reward of the rejected responses (detached).
        metric_parts / metric_totals / metrics: TRL-style keys. Pair metrics, averaged over the B pairs:
            ``rewards/chosen``, ``rewards/rejected``, ``rewards/margins``, ``rewards/accuracies``
            (share of pairs whose chosen reward is strictly higher), ``logps/chosen``,
            ``logps/rejected`` (summed log-probs of a response), ``logps/accuracies`` (share of pairs whose
            chosen response has the higher summed log-prob: the policy's own preference), ``triplet/loss``.
            Token metrics, averaged over the valid tokens of that side: ``weights/chosen_mean``,
            ``weights/rejected_mean``, ``kl/chosen``, ``kl/rejected`` (the per-token KL term the
            loss uses). Nothing here calls ``.item()``: convert when you log, not on the training step.
    """

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor

    def item_sum(self) -> torch.Tensor:
        return self.losses.sum()

    @property
    def num_items(self) -> torch.Tensor:
        return torch.full((), self.losses.shape[0], dtype=torch.float32, device=self.losses.device)

    def loss_parts(self) -> MetricParts:
        return per_pair(self.losses)


@dataclass
class TokenMeanOutput(LossOutput):
    """A loss that is a mean over the response tokens of B pairs: ``loss = sum(token_losses) / num_tokens``.

    Attributes:
        pair_loss_sums: ``[B]`` differentiable per-pair sums of the token losses, so that a trainer can divide
            their total by the token count of a whole global batch instead (gradient accumulation, processes).
        pair_tokens: ``[B]`` the tokens each pair contributes.
    """

    pair_loss_sums: torch.Tensor
    pair_tokens: torch.Tensor

    def item_sum(self) -> torch.Tensor:
        return self.pair_loss_sums.sum()

    @property
    def num_items(self) -> torch.Tensor:
        return self.pair_tokens.sum().float()

    def loss_parts(self) -> MetricParts:
        return per_pair(self.pair_loss_sums, self.pair_tokens)
