"""Losses end-to-end from logits (DPO, TDPO2, TIS-DPO, TI-DPO without triplet): every provider and mode."""

from __future__ import annotations

import pytest

from benchmarks.shapes import LOSSES
from benchmarks.suite import PARAM_NAMES, cell_params, run_cell


@pytest.mark.parametrize(PARAM_NAMES, cell_params(LOSSES))
def test_loss(benchmark, bench_cache, set_name, op, mode, provider, dtype, tokens, vocab):
    run_cell(benchmark, bench_cache, set_name, op, mode, provider, dtype, tokens, vocab)
