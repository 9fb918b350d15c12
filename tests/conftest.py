"""Shared test helpers: input builders and the error-bound assertion used across the suite."""

from __future__ import annotations

import pytest
import torch

try:  # hypothesis is a dev dependency; where it is missing (the GPU machine) property tests are not defined
    from hypothesis import given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover
    given = settings = st = None

IGNORE = -100


def make_labels(rows: int, length: int, vocab: int, *, ignore_frac: float = 0.25, masked_rows=(),
                prompt: int = 0, seed: int = 0) -> torch.Tensor:
    """Random token ids with ~ignore_frac ignored positions, a masked prompt and fully masked rows."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, vocab, (rows, length), generator=g)
    labels[torch.rand(rows, length, generator=g) < ignore_frac] = IGNORE
    labels[:, :prompt] = IGNORE
    for r in masked_rows:
        labels[r] = IGNORE
    return labels


def make_logits(shape, dtype=torch.float32, *, scale: float = 3.0, seed: int = 0) -> torch.Tensor:
    """Random logits (values rounded to ``dtype``) with a realistic spread of a few nats."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def max_err(value: torch.Tensor, truth: torch.Tensor) -> float:
    return float((value.detach().double() - truth.detach().double()).abs().max())


def assert_within_torch_error(ours, truth, torch_in_dtype, *, c: float = 2.0, atol: float = 1e-6,
                              rtol: float = 1e-6, what=""):
    """|ours - truth| <= c * |torch in the input dtype - truth| + atol + rtol * |truth| (max norms).

    The rtol term (a few fp32 ulps of the largest value) covers summation-order rounding, which can
    put fp32 torch closer to the truth than another correct fp32 computation by luck.
    """
    err, base = max_err(ours, truth), max_err(torch_in_dtype, truth)
    slack = atol + rtol * float(truth.detach().double().abs().max())
    assert err <= c * base + slack, f"{what}: error {err:.3g} > {c} x torch's {base:.3g} + {slack:.1g}"


def assert_rel_close(value, truth, rtol: float, what: str = ""):
    """Max |value - truth| <= rtol * (1 + max |truth|)."""
    err, scale = max_err(value, truth), float(truth.detach().double().abs().max()) + 1.0
    assert err <= rtol * scale, f"{what}: error {err:.3g} > {rtol:.1g} x {scale:.3g}"


@pytest.fixture(autouse=True)
def _deterministic_seed():
    torch.manual_seed(0)
