"""The one table of the losses the trainer computes: what each needs and which config fields it reads.

Config validation (:class:`~tidpo.trainer.TokenWeightedDPOConfig`), the trainer and ``tidpo train --help``
all read :data:`LOSS_REGISTRY`. Adding a loss is one :class:`LossSpec` here plus its loss function.

Each entry's ``compute`` receives a :class:`~tidpo.trainer.batch.TrainingBatch`, which computes what the
loss asks for on first use (the policy logits, the reference as per-token log-probs or full logits, data or
online token weights, anchors) and nothing else.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tidpo.losses import LossOutput, dpo_loss, tdpo_loss, ti_dpo_loss, tis_dpo_loss
from tidpo.losses.output import TokenMeanOutput, per_pair
from tidpo.ops import token_logps

if TYPE_CHECKING:
    from tidpo.trainer.batch import TrainingBatch

#: What a loss needs from the reference model.
REFERENCE_NONE = "none"  # no reference (SFT)
REFERENCE_LOGPS = "logps"  # per-token log-probs of the labels (may be precomputed once)
REFERENCE_LOGITS = "logits"  # the full distribution at every step (KL terms over the vocabulary)
#: Where a loss's token weights come from.
WEIGHTS_NONE, WEIGHTS_DATA, WEIGHTS_ONLINE = "none", "data", "online"
#: What a loss averages over: the pairs (preference losses) or the response tokens (SFT) of the global batch.
MEAN_OVER_PAIRS, MEAN_OVER_TOKENS = "pairs", "tokens"
#: A field read only in some settings: ``(predicate of the config, the settings in words)``.
Condition = tuple[Callable[[object], bool], str]


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
        conditions: fields among ``fields`` read only in some settings (:data:`Condition`): set in other
            settings, they would be ignored, so they must keep their default there too.
        mean_over: :data:`MEAN_OVER_PAIRS` or :data:`MEAN_OVER_TOKENS`: the loss is the mean of its per-item
            losses over the whole global batch (all micro-batches of a gradient-accumulation step, all processes).
    """

    name: str
    summary: str
    compute: Callable[[TrainingBatch], LossOutput]
    reference: str = REFERENCE_LOGPS
    reference_logits_field: str | None = None
    weights: str = WEIGHTS_NONE
    fields: tuple[str, ...] = ()
    conditions: dict[str, Condition] = field(default_factory=dict)
    mean_over: str = MEAN_OVER_PAIRS

    def reads(self, name: str, config) -> bool:
        """Whether the loss reads config field ``name`` under ``config``."""
        if name not in self.fields:
            return False
        condition = self.conditions.get(name)
        return condition is None or bool(condition[0](config))

    def count_items(self, labels, ignore_index: int):
        """The items a collated batch's ``labels`` ``[2B, T]`` hold: its B pairs, or its chosen response tokens."""
        num_pairs = labels.shape[0] // 2
        if self.mean_over == MEAN_OVER_TOKENS:
            return (labels[:num_pairs, 1:] != ignore_index).sum()
        return labels.new_tensor(num_pairs)

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
    anchor = batch.anchor if args.samples_anchors else None
    out = ti_dpo_loss(batch.policy_logits, batch.ref_logits, batch.labels, weights, beta=args.beta,
                      alpha=args.alpha, gamma=args.gamma, triplet_margin=args.triplet_margin, anchor=anchor,
                      kl_coef=args.kl_coef, **batch.op_kwargs)
    out.metric_parts.update(batch.online_weight_metrics)
    return out


def _sft(batch: TrainingBatch) -> LossOutput:
    """Token NLL of the chosen responses: ``sum_t -log pi(y_t)`` over their valid tokens, divided by the count.

    Only the chosen rows go through the model. With ``reverse`` the data's chosen and rejected are swapped
    first, so this trains on the rejected responses: the two SFT models of the TIS-DPO(S) contrastive pair.
    Metrics: ``sft/nll`` (per token), ``logps/chosen`` (per pair) and ``sft/tokens`` (response tokens per pair).
    """
    labels = batch.chosen_labels
    logps = token_logps(batch.chosen_logits, labels, batch.ignore_index, backend=batch.args.loss_backend)
    pair_tokens = (labels != batch.ignore_index).sum(-1)
    pair_nll = -logps.sum(-1)
    return TokenMeanOutput(pair_nll.sum() / pair_tokens.sum().clamp(min=1), pair_loss_sums=pair_nll,
                           pair_tokens=pair_tokens, metric_parts={
                               "sft/nll": per_pair(pair_nll, pair_tokens), "logps/chosen": per_pair(-pair_nll),
                               "sft/tokens": per_pair(pair_tokens)})


# ----------------------------------------------------------------------------------------------------------
# the table

_TI_DPO_FIELDS = ("beta", "alpha", "gamma", "triplet_margin", "ti_lambda", "prior_sigma_div", "ti_importance",
                  "ti_attribution_target", "ti_shared_forward", "importance_scope", "kl_coef",
                  "anchor_max_new_tokens", "anchor_top_k", "anchor_top_p", "anchor_temperature", "anchor_source",
                  "anchor_chosen_fraction", "ti_preset")
_TRIPLET: Condition = (lambda c: c.gamma > 0, "with gamma > 0 (the triplet term and its anchors)")
_TI_DPO_CONDITIONS: dict[str, Condition] = {
    **{name: _TRIPLET for name in ("triplet_margin", "anchor_max_new_tokens", "anchor_top_k", "anchor_top_p",
                                   "anchor_temperature", "anchor_source")},
    "anchor_chosen_fraction": (lambda c: c.gamma > 0 and c.anchor_source == "chosen",
                               "with gamma > 0 and anchor_source='chosen'"),
    "ti_lambda": (lambda c: c.ti_importance == "gradient", "with ti_importance='gradient' (the prior mix)"),
    "prior_sigma_div": (lambda c: c.ti_importance == "gradient", "with ti_importance='gradient' (the prior mix)"),
    **{name: (lambda c: c.ti_importance == "gradient", "with ti_importance='gradient' (the attribution)")
       for name in ("ti_attribution_target", "ti_shared_forward")},
    "importance_scope": (lambda c: c.ti_importance != "uniform", "unless ti_importance='uniform'"),
}
_TIS_DPO_CONDITIONS: dict[str, Condition] = {
    "alpha": (lambda c: c.token_level and c.kl_form != "paper_tdpo1",
              "with token_level and kl_form 'released' or 'paper_tdpo2'"),
    "kl_form": (lambda c: c.token_level, "with token_level"),
}

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
             fields=("beta", "alpha", "token_level", "kl_form", "chosen_weights_column", "rejected_weights_column"),
             conditions=_TIS_DPO_CONDITIONS),
    LossSpec("ti_dpo", "TI-DPO (Yang et al. 2026): online gradient-attribution weights, TDPO2 margin, triplet "
             "loss on policy-sampled anchors", _ti_dpo, reference=REFERENCE_LOGITS, weights=WEIGHTS_ONLINE,
             fields=_TI_DPO_FIELDS, conditions=_TI_DPO_CONDITIONS),
    LossSpec("sft", "token-mean NLL of the chosen responses over the global batch (builds TIS-DPO(S) pairs)",
             _sft, reference=REFERENCE_NONE, mean_over=MEAN_OVER_TOKENS),
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
