"""The one output object every tidpo loss returns."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class PreferenceLossOutput:
    """Result of a preference loss over B pairs.

    Attributes:
        loss: scalar, mean of ``losses`` over pairs; call ``.backward()`` on it.
        losses: ``[B]`` per-pair loss (differentiable).
        chosen_rewards: ``[B]`` implicit reward of the chosen responses (detached; each loss's
            docstring gives its formula).
        rejected_rewards: ``[B]`` implicit reward of the rejected responses (detached).
        metrics: detached 0-dim tensors for logging, TRL-style keys (``rewards/chosen``,
            ``rewards/margins``, ``rewards/accuracies``, ``logps/chosen``, ...). Nothing here calls
            ``.item()``: convert when you log, not on the training step.
    """

    loss: torch.Tensor
    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
