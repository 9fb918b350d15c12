"""pytest-benchmark suite: ``pytest benchmarks/ --benchmark-only [-k cpu | -k gpu | -k smoke]``.

Not part of the normal test run (pyproject's ``testpaths = ["tests"]``). See :mod:`benchmarks.suite`.
"""

from __future__ import annotations

import pytest

from benchmarks.cases import GroupCache


@pytest.fixture(scope="session")
def bench_cache():
    """Inputs and provider runners of the current (op, shape, dtype) group, shared by consecutive cells."""
    cache = GroupCache()
    yield cache
    cache.clear()


def pytest_configure(config):
    # Raised inside torch.compile's own imports; not actionable here.
    config.addinivalue_line("filterwarnings", "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
