"""Token weights.

- :mod:`tidpo.weights.tis`: TIS-DPO transforms and the paper's exp-clamp form (docs/methods.md §2.4).
- :mod:`tidpo.weights.ti`: TI-DPO Gaussian prior and λ-mix (docs/methods.md §3.1);
  :mod:`tidpo.weights.attribution`: TI-DPO gradient-attribution importance of the current policy.
- :mod:`tidpo.weights.estimate`: TIS-DPO scores ``log pi+ - log pi-`` from a contrastive model pair, the
  weights file (``tidpo estimate-weights``); :mod:`tidpo.weights.visualize`: ``tidpo show-weights``.
"""

from tidpo.weights.attribution import ti_dpo_token_weights, token_importance
from tidpo.weights.estimate import estimate_weights, score_pairs, weights_from_scores
from tidpo.weights.ti import gaussian_prior, mix_importance, normalize_importance
from tidpo.weights.tis import TRANSFORMS, exp_clamp_weights, tis_dpo_weights, transform_scores
from tidpo.weights.visualize import show_weights

__all__ = [
    "TRANSFORMS",
    "estimate_weights",
    "exp_clamp_weights",
    "gaussian_prior",
    "mix_importance",
    "normalize_importance",
    "score_pairs",
    "show_weights",
    "ti_dpo_token_weights",
    "tis_dpo_weights",
    "token_importance",
    "transform_scores",
    "weights_from_scores",
]
