"""Per-token ops (tidpo.token_logps, tidpo.token_kl): every provider, mode, shape and dtype of the sets."""

from __future__ import annotations

import pytest

from benchmarks.shapes import OPS
from benchmarks.suite import PARAM_NAMES, cell_params, run_cell


@pytest.mark.parametrize(PARAM_NAMES, cell_params(OPS))
def test_op(benchmark, bench_cache, set_name, op, mode, provider, dtype, tokens, vocab):
    run_cell(benchmark, bench_cache, set_name, op, mode, provider, dtype, tokens, vocab)
