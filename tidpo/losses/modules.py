"""``nn.Module`` wrappers that hold a loss's hyper-parameters (drop-in for a training loop)."""

from __future__ import annotations

from torch import nn

from tidpo.losses.dpo import dpo_loss
from tidpo.losses.tdpo import tdpo_loss
from tidpo.losses.ti_dpo import ti_dpo_loss
from tidpo.losses.tis_dpo import tis_dpo_loss


class _LossModule(nn.Module):
    """Calls ``_fn(*args, **hyper_parameters, **kwargs)``; keyword arguments of the call win."""

    _fn = staticmethod(lambda *a, **k: None)

    def __init__(self, **hyper_parameters):
        super().__init__()
        self.hyper_parameters = hyper_parameters

    def forward(self, *args, **kwargs):
        return type(self)._fn(*args, **{**self.hyper_parameters, **kwargs})

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.hyper_parameters.items())


class DPOLoss(_LossModule):
    """``DPOLoss(beta, loss_type, ...)(policy_logits, labels, ref_logps=...)``; see :func:`tidpo.dpo_loss`."""

    _fn = staticmethod(dpo_loss)

    def __init__(self, beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
                 ignore_index: int = -100, **kwargs):
        super().__init__(beta=beta, loss_type=loss_type, label_smoothing=label_smoothing,
                         ignore_index=ignore_index, **kwargs)


class TDPOLoss(_LossModule):
    """``TDPOLoss(beta, alpha, variant)(policy_logits, ref_logits, labels)``; see :func:`tidpo.tdpo_loss`."""

    _fn = staticmethod(tdpo_loss)

    def __init__(self, beta: float = 0.1, alpha: float = 0.5, variant: int = 2, ignore_index: int = -100,
                 **kwargs):
        super().__init__(beta=beta, alpha=alpha, variant=variant, ignore_index=ignore_index, **kwargs)


class TISDPOLoss(_LossModule):
    """``TISDPOLoss(beta, ...)(policy_logits, labels, weights, ref_logps=...)``; see :func:`tidpo.tis_dpo_loss`."""

    _fn = staticmethod(tis_dpo_loss)

    def __init__(self, beta: float = 0.1, token_level: bool = False, alpha: float = 0.5,
                 kl_form: str = "released", ignore_index: int = -100, **kwargs):
        super().__init__(beta=beta, token_level=token_level, alpha=alpha, kl_form=kl_form,
                         ignore_index=ignore_index, **kwargs)


class TIDPOLoss(_LossModule):
    """``TIDPOLoss(...)(policy_logits, ref_logits, labels, weights, anchor=...)``; see :func:`tidpo.ti_dpo_loss`."""

    _fn = staticmethod(ti_dpo_loss)

    def __init__(self, beta: float = 0.1, alpha: float = 0.5, gamma: float = 0.1, triplet_margin: float = 1e-3,
                 kl_coef: float = 0.0, ignore_index: int = -100, **kwargs):
        super().__init__(beta=beta, alpha=alpha, gamma=gamma, triplet_margin=triplet_margin, kl_coef=kl_coef,
                         ignore_index=ignore_index, **kwargs)
