"""Token weights.

- :mod:`tidpo.weights.tis`: TIS-DPO transforms and the paper's exp-clamp form (METHODS.md §2.4).
- :mod:`tidpo.weights.ti`: TI-DPO Gaussian prior and λ-mix (METHODS.md §3.1).
"""

from tidpo.weights.ti import gaussian_prior, mix_importance, normalize_importance
from tidpo.weights.tis import TRANSFORMS, exp_clamp_weights, tis_dpo_weights, transform_scores

__all__ = [
    "TRANSFORMS",
    "exp_clamp_weights",
    "gaussian_prior",
    "mix_importance",
    "normalize_importance",
    "tis_dpo_weights",
    "transform_scores",
]
