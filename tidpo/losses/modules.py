"""``nn.Module`` wrappers that hold a loss's hyper-parameters (drop-in for a training loop).

Each wrapper has the loss's real keyword signature and checks its hyper-parameters when it is built (with the
same check the loss runs), so ``DPOLoss(beta=-1)`` or a misspelt keyword fails at construction, not at the first
step. Keyword arguments given to a call override the held ones for that call.
"""

from __future__ import annotations

from torch import nn

from tidpo._validation import IGNORE_INDEX, check_choice, check_int
from tidpo.losses.dpo import check_dpo_params, dpo_loss
from tidpo.losses.tdpo import check_tdpo_params, tdpo_loss
from tidpo.losses.ti_dpo import check_ti_dpo_params, ti_dpo_loss
from tidpo.losses.tis_dpo import check_tis_dpo_params, tis_dpo_loss
from tidpo.ops.backend import BACKENDS


class _LossModule(nn.Module):
    """Calls ``_fn(*args, **hyper_parameters, **kwargs)``; keyword arguments of the call win."""

    def __init__(self, fn, ignore_index: int, backend: str | None, chunk_size: int | None, **hyper_parameters):
        super().__init__()
        check_int(ignore_index, "ignore_index")
        if backend is not None:
            check_choice(backend, "backend", BACKENDS)
        if chunk_size is not None:
            check_int(chunk_size, "chunk_size", low=1)
        self._fn = fn
        self.hyper_parameters = {**hyper_parameters, "ignore_index": ignore_index, "backend": backend,
                                 "chunk_size": chunk_size}

    def forward(self, *args, **kwargs):
        return self._fn(*args, **{**self.hyper_parameters, **kwargs})

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.hyper_parameters.items())


class DPOLoss(_LossModule):
    """``DPOLoss(beta, loss_type, label_smoothing)(policy_logits, labels, ref_logps=...)``; see :func:`tidpo.dpo_loss`.

    Raises:
        TypeError / ValueError: an invalid hyper-parameter, at construction.
    """

    def __init__(self, beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0, *,
                 ignore_index: int = IGNORE_INDEX, backend: str | None = None, chunk_size: int | None = None):
        check_dpo_params(beta, loss_type, label_smoothing)
        super().__init__(dpo_loss, ignore_index, backend, chunk_size, beta=beta, loss_type=loss_type,
                         label_smoothing=label_smoothing)


class TDPOLoss(_LossModule):
    """``TDPOLoss(beta, alpha, variant)(policy_logits, ref_logits, labels)``; see :func:`tidpo.tdpo_loss`.

    Raises:
        TypeError / ValueError: an invalid hyper-parameter, at construction.
    """

    def __init__(self, beta: float = 0.1, alpha: float = 0.5, variant: int = 2, *, ignore_index: int = IGNORE_INDEX,
                 backend: str | None = None, chunk_size: int | None = None):
        check_tdpo_params(beta, alpha, variant)
        super().__init__(tdpo_loss, ignore_index, backend, chunk_size, beta=beta, alpha=alpha, variant=variant)


class TISDPOLoss(_LossModule):
    """``TISDPOLoss(beta, ...)(policy_logits, labels, weights, ref_logps=...)``; see :func:`tidpo.tis_dpo_loss`.

    Raises:
        TypeError / ValueError: an invalid hyper-parameter, at construction.
    """

    def __init__(self, beta: float = 0.1, token_level: bool = False, alpha: float = 0.5, kl_form: str = "released",
                 *, ignore_index: int = IGNORE_INDEX, backend: str | None = None, chunk_size: int | None = None):
        check_tis_dpo_params(beta, token_level, alpha, kl_form)
        super().__init__(tis_dpo_loss, ignore_index, backend, chunk_size, beta=beta, token_level=token_level,
                         alpha=alpha, kl_form=kl_form)


class TIDPOLoss(_LossModule):
    """``TIDPOLoss(...)(policy_logits, ref_logits, labels, weights, anchor=...)``; see :func:`tidpo.ti_dpo_loss`.

    Raises:
        TypeError / ValueError: an invalid hyper-parameter, at construction.
    """

    def __init__(self, beta: float = 0.1, alpha: float = 0.5, gamma: float = 0.1, triplet_margin: float = 1e-3,
                 kl_coef: float = 0.0, *, ignore_index: int = IGNORE_INDEX, backend: str | None = None,
                 chunk_size: int | None = None):
        check_ti_dpo_params(beta, alpha, gamma, triplet_margin, kl_coef)
        super().__init__(ti_dpo_loss, ignore_index, backend, chunk_size, beta=beta, alpha=alpha, gamma=gamma,
                         triplet_margin=triplet_margin, kl_coef=kl_coef)
