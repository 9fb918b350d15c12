"""Temporary model state shared by the no-dropout passes (reference forward, attribution, sampling, scoring)."""

from __future__ import annotations

import contextlib

from torch import nn


@contextlib.contextmanager
def eval_mode(*models: nn.Module):
    """Put the models in eval mode (no dropout), restoring each one's training flag afterwards."""
    unique = list({id(m): m for m in models}.values())
    modes = [m.training for m in unique]
    try:
        for model in unique:
            model.eval()
        yield
    finally:
        for model, mode in zip(unique, modes, strict=True):
            model.train(mode)
