"""Where the loss's backward may stop when TI-DPO's attribution shares the policy forward (docs/methods.md §3.1).

The shared forward starts from the input embeddings as autograd leaves, so that the attribution can take their
gradient. The loss's backward would then also run down to them, through every block, although with LoRA on the
last blocks only nothing below the first adapted block has a parameter to train: with SmolLM2-135M and LoRA on
its last 8 of 30 blocks that is 22 blocks of backward for nothing. :class:`FrozenPrefixGate` puts an identity
on the residual stream at the input of the first decoder layer that trains, whose backward passes the gradient
only while the attribution runs: in the loss's backward the blocks below receive no gradient, and autograd's
nodes skip their work on an undefined gradient.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn


class _GateState:
    __slots__ = ("open",)

    def __init__(self):
        self.open = False


class _Gate(torch.autograd.Function):
    """Identity; the backward passes the gradient only while ``state.open``."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, state: _GateState) -> torch.Tensor:
        ctx.state = state
        return hidden.view_as(hidden)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return (grad if ctx.state.open else None), None


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a ``transformers`` model, in forward order (``GradientCheckpointingLayer``)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [module for module in model.modules() if isinstance(module, GradientCheckpointingLayer)]


class FrozenPrefixGate:
    """The gate at the first trainable decoder layer of ``model``, where one is useful and safe.

    It is placed only when every parameter that trains lies in that layer or a later one (LoRA on the last
    blocks): then no gradient is needed below it, except the attribution's. Otherwise (all layers train, a
    trained embedding, head or norm, or no ``transformers`` decoder layers found) :attr:`layer` is None and
    nothing is installed: the loss's backward runs all the way down, which is correct, only slower.
    """

    def __init__(self, model: nn.Module):
        self.layer: nn.Module | None = None
        #: The gated layer's index among the :func:`decoder_layers`, or 0 without a gate.
        self.index = 0
        self._state = _GateState()
        layers = decoder_layers(model)
        #: How many :func:`decoder_layers` there are (a vision tower's count too, in a vision-language model).
        self.layer_count = len(layers)
        trains = [any(p.requires_grad for p in layer.parameters()) for layer in layers]
        if not any(trains) or trains[0]:
            return
        first = trains.index(True)
        inside = {id(p) for layer in layers[first:] for p in layer.parameters()}
        if all(id(p) in inside for p in model.parameters() if p.requires_grad):
            self.layer, self.index = layers[first], first

    def _hook(self, module, args, kwargs):
        if args:
            return (_Gate.apply(args[0], self._state), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": _Gate.apply(kwargs["hidden_states"], self._state)}

    @contextlib.contextmanager
    def installed(self):
        """Forwards run inside put the gate on the layer's input (nothing without a layer)."""
        handle = None if self.layer is None else self.layer.register_forward_pre_hook(self._hook, with_kwargs=True)
        try:
            yield
        finally:
            if handle is not None:
                handle.remove()

    @contextlib.contextmanager
    def open(self):
        """Backward passes inside send the gradient through the gate (the attribution); closed again after."""
        self._state.open = True
        try:
            yield
        finally:
            self._state.open = False
