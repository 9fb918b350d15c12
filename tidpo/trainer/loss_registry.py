"""The one table of the losses the trainer computes: what each needs and which config fields it reads.

Config validation (:class:`~tidpo.trainer.TokenWeightedDPOConfig`), the trainer and ``tidpo train --help``
all read :data:`LOSS_REGISTRY`. Adding a loss is one :class:`LossSpec` here plus its loss function.

Each entry's ``compute`` receives a :class:`~tidpo.trainer.batch.TrainingBatch`, which computes what the
loss asks for on first use (the policy logits, the reference as per-token log-probs or full logits, data or
online token weights, anchors) and nothing else.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tidpo.losses import LossOutput, dpo_loss, tdpo_loss, ti_dpo_loss, tis_dpo_loss
from tidpo.losses.output import TokenMeanOutput, metric_total
from tidpo.ops import token_logps

if TYPE_CHECKING:
    from tidpo.trainer.batch import TrainingBatch

#: What a loss needs from the reference model.
REFERENCE_NONE = "none"  # no reference (SFT)
REFERENCE_LOGPS = "logps"  # per-token log-probs of the labels (may be precomputed once)
REFERENCE_LOGITS = "logits"  # the full distribution at every step (KL terms over the vocabulary)
#: Where a loss's token weights come from.
WEIGHTS_NONE, WEIGHTS_DATA, WEIGHTS_ONLINE = "none", "data", "online"


@dataclass(frozen=True)
class LossSpec:
    """One trainable loss.

    Attributes:
        name: the ``loss`` value (``--loss``).
        summary: one line for ``--help``: the method and its source.
        compute: ``(batch) -> LossOutput``.
        reference: :data:`REFERENCE_NONE` / :data:`REFERENCE_LOGPS` / :data:`REFERENCE_LOGITS`.
        reference_logits_field: a bool config field that, when True, makes the loss read the reference's
            full distribution (``token_level`` of TIS-DPO).
        weights: :data:`WEIGHTS_NONE` / :data:`WEIGHTS_DATA` (per-token weight columns of the data) /
            :data:`WEIGHTS_ONLINE` (computed from the policy at every step).
        fields: the method fields of the config the loss reads; any other method field must keep its default.
        token_mean: the loss is a mean over the response tokens of the whole global batch (all micro-batches
            of a gradient-accumulation step, all processes), not a mean over pairs.
    """

    name: str
    summary: str
    compute: Callable[[TrainingBatch], LossOutput]
    reference: str = REFERENCE_LOGPS
    reference_logits_field: str | None = None
    weights: str = WEIGHTS_NONE
    fields: tuple[str, ...] = ()
    token_mean: bool = False

    def reference_need(self, config) -> str:
        """What this loss needs from the reference model under ``config``."""
        if self.reference_logits_field is not None and getattr(config, self.reference_logits_field):
            return REFERENCE_LOGITS
        return self.reference


# ----------------------------------------------------------------------------------------------------------
# the loss computations


def _dpo(loss_type: str):
    def compute(batch: TrainingBatch) -> LossOutput:
        args = batch.args
        label_smoothing = args.label_smoothing if loss_type == "sigmoid" else 0.0
        return dpo_loss(batch.policy_logits, batch.labels, ref_logps=batch.ref_logps, beta=args.beta,
                        loss_type=loss_type, label_smoothing=label_smoothing, **batch.op_kwargs)
    return compute


def _tdpo(variant: int):
    def compute(batch: TrainingBatch) -> LossOutput:
        args = batch.args
        alpha = args.alpha if variant == 2 else 0.0
        return tdpo_loss(batch.policy_logits, batch.ref_logits, batch.labels, beta=args.beta, alpha=alpha,
                         variant=variant, **batch.op_kwargs)
    return compute


def _tis_dpo(batch: TrainingBatch) -> LossOutput:
    args = batch.args
    reference = {"ref_logits": batch.ref_logits} if args.token_level else {"ref_logps": batch.ref_logps}
    return tis_dpo_loss(batch.policy_logits, batch.labels, batch.data_weights, beta=args.beta,
                        token_level=args.token_level, alpha=args.alpha, kl_form=args.kl_form, **reference,
                        **batch.op_kwargs)


def _ti_dpo(batch: TrainingBatch) -> LossOutput:
    args = batch.args
    weights = batch.online_weights  # before the anchor: the attribution's time is measured on its own
    anchor = batch.anchor if args.gamma > 0 else None
    out = ti_dpo_loss(batch.policy_logits, batch.ref_logits, batch.labels, weights, beta=args.beta,
                      alpha=args.alpha, gamma=args.gamma, triplet_margin=args.triplet_margin, anchor=anchor,
                      kl_coef=args.kl_coef, **batch.op_kwargs)
    out.metric_totals.update(batch.online_weight_metrics)
    return out


def _sft(batch: TrainingBatch) -> LossOutput:
    """Token NLL of the chosen responses: ``sum_t -log pi(y_t)`` over their valid tokens, divided by the count.

    Only the chosen rows go through the model. With ``reverse`` the data's chosen and rejected are swapped
    first, so this trains on the rejected responses: the two SFT models of the TIS-DPO(S) contrastive pair.
    """
    labels = batch.chosen_labels
    logps = token_logps(batch.chosen_logits, labels, batch.ignore_index, backend=batch.args.loss_backend)
    valid = labels != batch.ignore_index
    count = valid.sum()
    nll_sum = -logps.sum()
    return TokenMeanOutput(nll_sum / count.clamp(min=1), loss_sum=nll_sum, num_tokens=count, metric_totals={
        "sft/nll": metric_total(nll_sum, count), "logps/chosen": metric_total(logps.sum(-1)),
        "sft/tokens": metric_total(count.float(), 1)})


# ----------------------------------------------------------------------------------------------------------
# the table

_TI_DPO_FIELDS = ("beta", "alpha", "gamma", "triplet_margin", "ti_lambda", "prior_sigma_div", "ti_importance",
                  "importance_scope", "kl_coef", "anchor_max_new_tokens", "anchor_top_k", "anchor_top_p",
                  "anchor_temperature", "anchor_source", "anchor_chosen_fraction", "ti_preset")

LOSS_REGISTRY: dict[str, LossSpec] = {spec.name: spec for spec in (
    LossSpec("dpo", "DPO, sigmoid loss (Rafailov et al. 2023); label_smoothing gives conservative DPO",
             _dpo("sigmoid"), fields=("beta", "label_smoothing")),
    LossSpec("ipo", "IPO (Azar et al. 2023), on per-token mean log-ratios as TRL computes it", _dpo("ipo"),
             fields=("beta",)),
    LossSpec("hinge", "hinge loss on the DPO margin (SLiC, Zhao et al. 2023)", _dpo("hinge"), fields=("beta",)),
    LossSpec("tdpo1", "TDPO1 (Zeng et al. 2024): DPO margin minus the sequential KL(ref||pi) difference",
             _tdpo(1), reference=REFERENCE_LOGITS, fields=("beta",)),
    LossSpec("tdpo2", "TDPO2 (Zeng et al. 2024): alpha-weighted sequential KL, stop-gradient on the chosen KL",
             _tdpo(2), reference=REFERENCE_LOGITS, fields=("beta", "alpha")),
    LossSpec("tis_dpo", "TIS-DPO (Liu et al. 2025) as released: per-token weights from the data; token_level "
             "adds the weighted KL branch", _tis_dpo, reference_logits_field="token_level", weights=WEIGHTS_DATA,
             fields=("beta", "alpha", "token_level", "kl_form", "chosen_weights_column", "rejected_weights_column")),
    LossSpec("ti_dpo", "TI-DPO (Yang et al. 2026): online gradient-attribution weights, TDPO2 margin, triplet "
             "loss on policy-sampled anchors", _ti_dpo, reference=REFERENCE_LOGITS, weights=WEIGHTS_ONLINE,
             fields=_TI_DPO_FIELDS),
    LossSpec("sft", "token-mean NLL of the chosen responses over the global batch (builds TIS-DPO(S) pairs)",
             _sft, reference=REFERENCE_NONE, token_mean=True),
)}
LOSSES = tuple(LOSS_REGISTRY)


def method_fields() -> tuple[str, ...]:
    """Every config field some loss reads (a loss that does not read one must leave it at its default)."""
    return tuple(dict.fromkeys(name for spec in LOSS_REGISTRY.values() for name in spec.fields))


def loss_help() -> str:
    """The ``--loss`` help text: each loss, its summary and what it needs."""
    needs = {REFERENCE_NONE: "no reference", REFERENCE_LOGPS: "reference log-probs",
             REFERENCE_LOGITS: "reference logits"}
    parts = []
    for spec in LOSS_REGISTRY.values():
        need = needs[spec.reference]
        if spec.reference_logits_field:
            need += f" (logits with {spec.reference_logits_field})"
        if spec.weights != WEIGHTS_NONE:
            need += f", {spec.weights} token weights"
        if spec.fields:
            need += "; reads " + ", ".join(name for name in spec.fields if name != "ti_preset" and
                                           not name.startswith("anchor_")) + (" and the anchor_* flags" if any(
                                               name.startswith("anchor_") for name in spec.fields) else "")
        parts.append(f"{spec.name}: {spec.summary} [{need}]")
    return "training loss. " + "; ".join(parts)


def readers_of(field_name: str) -> list[str]:
    """The losses that read config field ``field_name``."""
    return [spec.name for spec in LOSS_REGISTRY.values() if field_name in spec.fields]
