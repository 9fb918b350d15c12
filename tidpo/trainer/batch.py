"""``TrainingBatch``: what a loss may read of one collated batch, each piece computed on first use.

A loss in :data:`~tidpo.trainer.loss_registry.LOSS_REGISTRY` asks for what it needs — the policy logits, the
reference as per-token log-probs or as full logits, the data's token weights, TI-DPO's online weights and
anchors — and the batch computes exactly that, once.
"""

from __future__ import annotations

import time
from functools import cached_property

import torch
from torch import nn

from tidpo.losses import TripletAnchor
from tidpo.losses.output import per_pair
from tidpo.ops import token_logps
from tidpo.trainer.anchors import chosen_prefix_context, sample_anchors
from tidpo.trainer.fused_head import FUSED_KWARG
from tidpo.weights.attribution import ti_dpo_token_weights, weight_entropy


def next_token(values: torch.Tensor, fill) -> torch.Tensor:
    """``[R, T]`` per-position values moved one step left, ``fill`` in the last column: position ``t`` then
    holds what ``logits[:, t]`` predicts, so the logits go to the losses whole.

    (Slicing ``logits[:, :-1]`` instead would make autograd allocate and zero-fill a second ``[R, T, V]``
    gradient for the slice on every backward.)
    """
    return torch.cat([values[:, 1:], values.new_full((values.shape[0], 1), fill)], dim=1)


def model_logits(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, fused: bool):
    """``[R, T, V]`` logits of ``model`` (no slice), or with ``fused`` the last hidden state under its LM head
    (:class:`tidpo.FusedLogits`, see :mod:`tidpo.trainer.fused_head`)."""
    extra = {FUSED_KWARG: True} if fused else {}
    return model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **extra).logits


class TrainingBatch:
    """One collated batch (the :class:`~tidpo.data.PreferenceCollator` layout) seen through the trainer.

    Args:
        trainer: the :class:`~tidpo.trainer.TokenWeightedDPOTrainer` (reference model, tokenizer, settings).
        model: the policy as the Trainer passes it (possibly wrapped by DDP / FSDP).
        inputs: the batch tensors, on the model's device.
    """

    def __init__(self, trainer, model: nn.Module, inputs: dict[str, torch.Tensor]):
        self.trainer, self.model, self.inputs = trainer, model, inputs
        self.args = trainer.args
        self.ignore_index: int = trainer.ignore_index
        #: Keyword arguments every tidpo op / loss call of the trainer takes.
        self.op_kwargs = {"ignore_index": self.ignore_index, "backend": self.args.loss_backend}
        self.num_pairs = inputs["input_ids"].shape[0] // 2
        #: TI-DPO on CPU: wall time of the attribution (set when the online weights are computed).
        self.attribution_seconds: float | None = None

    # -- policy ------------------------------------------------------------------------------------------
    @cached_property
    def labels(self) -> torch.Tensor:
        """``[2B, T]``: the labels of ``policy_logits``, position ``t`` the token that ``logits[:, t]`` predicts
        (:func:`next_token`; the last position predicts nothing)."""
        return next_token(self.inputs["labels"], self.ignore_index)

    @cached_property
    def policy_logits(self) -> torch.Tensor:
        """``[2B, T, V]``: one forward of the policy over the 2B rows (:class:`tidpo.FusedLogits` with
        ``fused_lm_head``)."""
        return self._forward(self.model, self.inputs["input_ids"], self.inputs["attention_mask"])

    @cached_property
    def chosen_labels(self) -> torch.Tensor:
        """``[B, T]``: the labels of the chosen rows."""
        return self.labels[:self.num_pairs]

    @cached_property
    def chosen_logits(self) -> torch.Tensor:
        """``[B, T, V]``: the policy over the chosen rows only (the rejected half is not run)."""
        if "policy_logits" in self.__dict__:
            return self.policy_logits[:self.num_pairs]
        rows = slice(0, self.num_pairs)
        return self._forward(self.model, self.inputs["input_ids"][rows], self.inputs["attention_mask"][rows])

    def _forward(self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        return model_logits(model, input_ids, attention_mask, fused=self.args.fused_lm_head)

    # -- reference ---------------------------------------------------------------------------------------
    @cached_property
    def ref_logits(self) -> torch.Tensor:
        """``[2B, T, V]`` reference logits (no grad, in the policy's precision context; fused with
        ``fused_lm_head``)."""
        return self.trainer.reference_logits(self.inputs["input_ids"], self.inputs["attention_mask"])

    @cached_property
    def ref_logps(self) -> torch.Tensor:
        """``[2B, T]`` reference log-probs of the labels: precomputed with the data, else from the reference.

        Without a need for the full logits, they are reduced right away and the ``[2B, T, V]`` logits freed.
        """
        if "ref_logps" in self.inputs:
            return next_token(self.inputs["ref_logps"], 0.0)
        logits = self.__dict__.get("ref_logits")
        if logits is None:
            logits = self.trainer.reference_logits(self.inputs["input_ids"], self.inputs["attention_mask"])
        with torch.no_grad():
            return token_logps(logits, self.labels, **self.op_kwargs)

    # -- token weights -----------------------------------------------------------------------------------
    @cached_property
    def data_weights(self) -> torch.Tensor:
        """``[2B, T]`` token weights from the data's weight columns."""
        weights = self.inputs.get("weights")
        if weights is None:
            raise ValueError(f"loss={self.args.loss!r} needs per-token weights, but the batch has none: give the "
                             f"data {self.args.chosen_weights_column!r} / {self.args.rejected_weights_column!r} "
                             "columns (tidpo train --weights PATH)")
        return next_token(weights, 0.0)

    @cached_property
    def online_weights(self) -> torch.Tensor:
        """``[2B, T]`` TI-DPO weights: attribution of the current policy mixed with the Gaussian prior."""
        args = self.args
        start = time.perf_counter()
        weights = ti_dpo_token_weights(
            self.trainer.accelerator.unwrap_model(self.model), self.inputs["input_ids"],
            self.inputs["attention_mask"], self.inputs["labels"], lam=args.ti_lambda, sigma_div=args.prior_sigma_div,
            scope=args.importance_scope, ignore_index=self.ignore_index, importance=args.ti_importance)
        weights = next_token(weights, 0.0)
        if weights.device.type == "cpu":
            # Wall time is only meaningful where kernels run synchronously (CPU); on an accelerator it
            # would need a host sync per step.
            self.attribution_seconds = time.perf_counter() - start
        return weights

    @property
    def online_weight_metrics(self) -> dict:
        """``weights/entropy`` (per response: each pair adds its two) and, when training on CPU,
        ``ti/attribution_seconds`` (per step)."""
        valid = self.labels != self.ignore_index
        entropy = weight_entropy(self.online_weights, valid, per_row=True)
        chosen, rejected = entropy[:self.num_pairs], entropy[self.num_pairs:]
        metrics = {"weights/entropy": per_pair(chosen + rejected, torch.full_like(chosen, 2.0))}
        if self.attribution_seconds is not None and self.model.training:
            metrics["ti/attribution_seconds"] = per_pair(torch.tensor([self.attribution_seconds]))
        return metrics

    # -- TI-DPO anchors ----------------------------------------------------------------------------------
    @cached_property
    def anchor(self) -> TripletAnchor:
        """One response per pair sampled from the policy (no grad), scored with gradients for the triplet term."""
        args, trainer = self.args, self.trainer
        pad_token_id = trainer.processing_class.pad_token_id
        context, context_mask, prefix = self.inputs["prompt_input_ids"], self.inputs["prompt_attention_mask"], None
        if args.anchor_source == "chosen":
            context, context_mask, prefix = chosen_prefix_context(
                self.inputs["input_ids"], self.inputs["attention_mask"], self.inputs["labels"],
                num_pairs=self.num_pairs, fraction=args.anchor_chosen_fraction, pad_token_id=pad_token_id,
                ignore_index=self.ignore_index)
        sampled = sample_anchors(
            trainer.accelerator.unwrap_model(self.model), context, context_mask, pad_token_id=pad_token_id,
            eos_token_id=trainer.end_of_turn_ids, max_new_tokens=args.anchor_max_new_tokens, top_k=args.anchor_top_k,
            top_p=args.anchor_top_p, temperature=args.anchor_temperature, prefix_lengths=prefix,
            ignore_index=self.ignore_index)
        logits = self._forward(self.model, sampled["input_ids"], sampled["attention_mask"])
        labels = next_token(sampled["labels"], self.ignore_index)
        ref_logits = trainer.reference_logits(sampled["input_ids"], sampled["attention_mask"])
        with torch.no_grad():
            ref_logps = token_logps(ref_logits, labels, **self.op_kwargs)
        return TripletAnchor(logits, labels, ref_logps=ref_logps)
