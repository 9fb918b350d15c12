"""Controlled experiment "does token weighting work?" on a synthetic preference task with a known token reward.

- :mod:`tidpo.apps.experiment.task`: :class:`TaskConfig` / :class:`SyntheticTask`, the task (vocabulary, hidden
  token reward, base generator, preference pairs, oracle scores and key-token labels).
- :mod:`tidpo.apps.experiment.metrics`: :func:`roc_auc`, :func:`weight_auc`, :func:`mean_std`.

The names are re-exported lazily, so ``import tidpo.apps.experiment`` stays light.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "TaskConfig": "tidpo.apps.experiment.task",
    "SyntheticTask": "tidpo.apps.experiment.task",
    "roc_auc": "tidpo.apps.experiment.metrics",
    "weight_auc": "tidpo.apps.experiment.metrics",
    "mean_std": "tidpo.apps.experiment.metrics",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
