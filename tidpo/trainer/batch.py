"""``TrainingBatch``: what a loss may read of one collated batch, each piece computed on first use.

A loss in :data:`~tidpo.trainer.loss_registry.LOSS_REGISTRY` asks for what it needs — the policy logits, the
reference as per-token log-probs or as full logits, the data's token weights, TI-DPO's online weights and
anchors — and the batch computes exactly that, once.
"""

from __future__ import annotations

import contextlib
import time
from functools import cached_property

import torch
from torch import nn

from tidpo.data.collator import next_token
from tidpo.losses import TripletAnchor
from tidpo.losses.output import per_pair
from tidpo.ops import token_logps
from tidpo.trainer.anchors import chosen_prefix_context, prompt_lengths, sample_anchors
from tidpo.trainer.fused_head import FUSED_KWARG, transformers_model
from tidpo.trainer.prompt_cache import (
    cache_keyword,
    continuation_inputs,
    is_plain_cache,
    layer_count,
    left_padding_mask,
    prefix_cache,
    returned_cache,
)
from tidpo.weights.attribution import attribute, check_batch, embedding_leaves, ti_dpo_token_weights, weight_entropy


def model_output(model: nn.Module, input_ids: torch.Tensor | None, attention_mask: torch.Tensor, *, fused: bool,
                 inputs_embeds: torch.Tensor | None = None, **forward_kwargs):
    """The output of one forward of ``model`` (no cache unless ``use_cache=True`` is given): ``.logits``
    ``[R, T, V]`` (no slice), or with ``fused`` the last hidden state under its LM head (:class:`tidpo.FusedLogits`,
    see :mod:`tidpo.trainer.fused_head`). From ``inputs_embeds`` instead of ``input_ids`` when given;
    ``forward_kwargs`` (``position_ids``, a cache) go to the model."""
    extra = {FUSED_KWARG: True} if fused else {}
    tokens = {"input_ids": input_ids} if inputs_embeds is None else {"inputs_embeds": inputs_embeds}
    forward_kwargs.setdefault("use_cache", False)
    return model(**tokens, attention_mask=attention_mask, **extra, **forward_kwargs)


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
        #: Wall seconds of each part computed so far (CPU only: elsewhere it would need a host sync per part):
        #: ``policy_forward``, ``reference_forward``, ``attribution``, ``anchor_sampling``, ``anchor_scoring``.
        self.part_seconds: dict[str, float] = {}
        self._raw_importance: torch.Tensor | None = None
        #: The key/value caches of the pair forwards (``"policy"``, ``"reference"``), kept for the anchors
        #: (:attr:`reuses_prompt_cache`).
        self._caches: dict[str, object] = {}

    @contextlib.contextmanager
    def _timed(self, part: str):
        """Add the wall time of the block to ``part_seconds[part]`` (CPU only)."""
        if self.inputs["input_ids"].device.type != "cpu":
            yield
            return
        start = time.perf_counter()
        try:
            yield
        finally:
            self.part_seconds[part] = self.part_seconds.get(part, 0.0) + time.perf_counter() - start

    # -- policy ------------------------------------------------------------------------------------------
    @cached_property
    def labels(self) -> torch.Tensor:
        """``[2B, T]``: the labels of ``policy_logits``, position ``t`` the token that ``logits[:, t]`` predicts
        (:func:`next_token`; the last position predicts nothing)."""
        return next_token(self.inputs["labels"], self.ignore_index)

    @cached_property
    def policy_logits(self) -> torch.Tensor:
        """``[2B, T, V]``: one forward of the policy over the 2B rows (:class:`tidpo.FusedLogits` with
        ``fused_lm_head``). With :attr:`shares_attribution_forward`, TI-DPO's attribution gradient is taken from
        this very forward."""
        if self.shares_attribution_forward:
            return self._policy_forward_with_attribution()
        with self._timed("policy_forward"):
            return self._forward(self.model, self.inputs["input_ids"], self.inputs["attention_mask"],
                                 keep_cache=self.reuses_prompt_cache)

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
        with self._timed("policy_forward"):
            return self._forward(self.model, self.inputs["input_ids"][rows], self.inputs["attention_mask"][rows])

    def _forward(self, model: nn.Module, input_ids: torch.Tensor | None, attention_mask: torch.Tensor, *,
                 inputs_embeds: torch.Tensor | None = None, keep_cache: bool = False):
        """The policy's logits; with ``keep_cache`` its key/value cache is kept for the anchors."""
        output = model_output(model, input_ids, attention_mask, fused=self.args.fused_lm_head,
                              inputs_embeds=inputs_embeds, use_cache=keep_cache)
        if keep_cache:
            self._caches["policy"] = returned_cache(output)
        return output.logits

    # -- reference ---------------------------------------------------------------------------------------
    @cached_property
    def ref_logits(self) -> torch.Tensor:
        """``[2B, T, V]`` reference logits (no grad, in the policy's precision context; fused with
        ``fused_lm_head``)."""
        with self._timed("reference_forward"):
            return self._reference(self.inputs["input_ids"], self.inputs["attention_mask"])

    def _reference(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   shift: torch.Tensor | None = None) -> torch.Tensor:
        """The reference's logits of the pair rows; its key/value cache is kept for the anchors (detached)."""
        keep_cache = self.reuses_prompt_cache
        output = self.trainer.reference_output(input_ids, attention_mask, embedding_shift=shift, use_cache=keep_cache)
        if keep_cache:
            self._caches["reference"] = returned_cache(output)
        return output.logits

    @cached_property
    def ref_logps(self) -> torch.Tensor:
        """``[2B, T]`` reference log-probs of the labels: precomputed with the data, else from the reference.

        Without a need for the full logits, they are reduced right away and the ``[2B, T, V]`` logits freed.
        """
        if "ref_logps" in self.inputs:
            return next_token(self.inputs["ref_logps"], 0.0)
        logits = self.__dict__.get("ref_logits")
        with self._timed("reference_forward"):
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
    def shares_attribution_forward(self) -> bool:
        """Whether TI-DPO's attribution gradient comes from the loss's own policy forward: with the gradient
        attribution and ``ti_shared_forward``, while training (gradients on) and where
        :meth:`~tidpo.trainer.TokenWeightedDPOTrainer.policy_forward_is_shareable`; otherwise the separate
        eval-mode pass runs."""
        return (self.args.attributes_online and self.args.ti_shared_forward and torch.is_grad_enabled()
                and self.model.training and self.trainer.policy_forward_is_shareable())

    @cached_property
    def reuses_prompt_cache(self) -> bool:
        """Whether TI-DPO's anchors read the prompt's keys and values from the loss's pair forwards
        (:mod:`tidpo.trainer.prompt_cache`): the policy's to sample (no prefill) and to score (with its graph, so
        the gradient is the full forward's), the reference's to score. With anchors (``gamma > 0``) and
        ``ti_shared_forward``, while training, where
        :meth:`~tidpo.trainer.TokenWeightedDPOTrainer.policy_forward_is_shareable` (the policy's train-mode forward
        is the eval-mode one the sampling runs)."""
        return (self.args.samples_anchors and self.args.ti_shared_forward and torch.is_grad_enabled()
                and self.model.training and self.trainer.policy_forward_is_shareable())

    def _reference_on_shift(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, shift: torch.Tensor):
        """The trainer's reference on its embeddings plus ``shift`` (:data:`tidpo.weights.attribution.Reference`,
        for ``log_ratio``)."""
        return self._reference(input_ids, attention_mask, shift)

    def _policy_forward_with_attribution(self):
        """The policy forward from embedding leaves, and TI-DPO's raw importance from it (the graph is kept for
        the loss). With ``ti_attribution_target="log_ratio"`` the reference runs on its embeddings plus the shift
        (zero in value); its logits, detached, are then also the loss's reference logits: the same values as from
        the token ids."""
        input_ids, mask = self.inputs["input_ids"], self.inputs["attention_mask"]
        check_batch(input_ids, mask)
        gate = self.trainer.frozen_prefix_gate
        with self._timed("policy_forward"), gate.installed():
            embeds = embedding_leaves(self.trainer.accelerator.unwrap_model(self.model), input_ids)
            logits = self._forward(self.model, None, mask, inputs_embeds=embeds, keep_cache=self.reuses_prompt_cache)
        with self._timed("attribution"), gate.open():  # the loss's backward, later, stops at the gate
            self._raw_importance, ref_logits = attribute(
                logits, embeds, input_ids, mask, target=self.args.ti_attribution_target, labels=self.inputs["labels"],
                reference=self._reference_on_shift, ignore_index=self.ignore_index, retain_graph=True)
        if ref_logits is not None and "ref_logits" not in self.__dict__:
            self.__dict__["ref_logits"] = ref_logits.detach()
        return logits

    @cached_property
    def online_weights(self) -> torch.Tensor:
        """``[2B, T]`` TI-DPO weights: attribution of the current policy mixed with the Gaussian prior."""
        args = self.args
        scores = None
        if self.shares_attribution_forward:
            self.policy_logits  # noqa: B018 - computes the raw importance with the forward
            scores = self._raw_importance
        with self._timed("attribution"):
            weights = ti_dpo_token_weights(
                self.trainer.accelerator.unwrap_model(self.model), self.inputs["input_ids"],
                self.inputs["attention_mask"], self.inputs["labels"], lam=args.ti_lambda,
                sigma_div=args.prior_sigma_div, scope=args.importance_scope, ignore_index=self.ignore_index,
                importance=args.ti_importance, target=args.ti_attribution_target, reference=self._reference_on_shift,
                scores=scores)
            return next_token(weights, 0.0)

    @property
    def attribution_seconds(self) -> float | None:
        """TI-DPO on CPU: wall time of the attribution this step (None before it ran, or off CPU)."""
        return self.part_seconds.get("attribution")

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
        """One response per pair sampled from the policy (no grad), scored with gradients for the triplet term.

        With :attr:`reuses_prompt_cache`, the pair forwards (which the loss needs anyway) run first and lend
        the anchors their prompt's keys and values; otherwise the sampling prefills its context and the
        scoring runs the whole anchor sequences.
        """
        args, trainer, inputs, rows = self.args, self.trainer, self.inputs, slice(0, self.num_pairs)
        pad_token_id = trainer.processing_class.pad_token_id
        prompt_length = prompt_lengths(inputs["attention_mask"][rows], inputs["labels"][rows], self.ignore_index)
        context, context_mask, prefix = inputs["prompt_input_ids"], inputs["prompt_attention_mask"], None
        if args.anchor_source == "chosen":
            context, context_mask, prefix = chosen_prefix_context(
                inputs["input_ids"], inputs["attention_mask"], inputs["labels"], num_pairs=self.num_pairs,
                fraction=args.anchor_chosen_fraction, pad_token_id=pad_token_id, ignore_index=self.ignore_index)
        policy_cache, reference_cache = self._pair_caches()
        with self._timed("anchor_sampling"):
            context_length = prompt_length if prefix is None else prompt_length + prefix
            # The context's last token is run by generate(): it gives the first sampled token's logits.
            generation_cache = prefix_cache(self._generation_may_take(policy_cache), context_length - 1)
            sampled = sample_anchors(
                trainer.accelerator.unwrap_model(self.model), context, context_mask, pad_token_id=pad_token_id,
                eos_token_id=trainer.end_of_turn_ids, max_new_tokens=args.anchor_max_new_tokens,
                top_k=args.anchor_top_k, top_p=args.anchor_top_p, temperature=args.anchor_temperature,
                prefix_lengths=prefix, ignore_index=self.ignore_index, cache=generation_cache)
        with self._timed("anchor_scoring"):
            return self._score_anchor(sampled, prompt_length, policy_cache, reference_cache)

    def _pair_caches(self) -> tuple[object | None, object | None]:
        """The policy's and the reference's caches of the pair rows, when both can be cut
        (:attr:`reuses_prompt_cache` and :func:`~tidpo.trainer.prompt_cache.is_plain_cache`); else ``(None, None)``
        and the reason logged once."""
        if not self.reuses_prompt_cache:
            return None, None
        self.policy_logits, self.ref_logits  # noqa: B018 - the pair forwards, which keep their caches
        caches = self._caches.get("policy"), self._caches.get("reference")
        if None in caches:
            reason = "the pair forwards returned no key/value cache, e.g. under gradient checkpointing"
        elif not all(map(is_plain_cache, caches)):
            reason = "the model's key/value cache is not a plain one: sliding-window or hybrid layers"
        else:
            return caches
        self.trainer.log_once(f"TI-DPO anchors: the prompt is run anew ({reason})")
        return None, None

    def _generation_may_take(self, cache):
        """``cache``, unless the policy's generation config names a cache of its own (``cache_implementation``,
        which ``generate`` refuses next to a given cache): then ``None``, said once."""
        policy = transformers_model(self.trainer.accelerator.unwrap_model(self.model))
        implementation = getattr(getattr(policy, "generation_config", None), "cache_implementation", None)
        if cache is None or implementation is None:
            return cache
        self.trainer.log_once(f"TI-DPO anchors: sampled with a prefill (the policy's generation_config sets "
                              f"cache_implementation={implementation!r}, which generate() keeps to itself)")
        return None

    def _first_trained_cache_layer(self, cache) -> int:
        """The first layer of the policy's cache whose keys and values a trained parameter reaches: the gate's
        layer (LoRA on the last blocks), or 0 (all keep their graph) without a gate or where the decoder layers
        found are not the cache's own (a vision-language model also counts its vision tower's)."""
        gate = self.trainer.frozen_prefix_gate
        if cache is None or gate.layer is None or gate.layer_count != layer_count(cache):
            return 0
        return gate.index

    def _score_anchor(self, sampled: dict[str, torch.Tensor], prompt_length: torch.Tensor, policy_cache,
                      reference_cache) -> TripletAnchor:
        """The anchor's policy logits (with gradients) and reference log-probs; from the prompt's last token on
        when both caches are given (the earlier columns predict no anchor token)."""
        trainer = self.trainer
        start = (prompt_length - 1).clamp(min=0)
        caches = (prefix_cache(policy_cache, start, graph_from=self._first_trained_cache_layer(policy_cache)),
                  prefix_cache(reference_cache, start))
        ids, mask, labels = sampled["input_ids"], sampled["attention_mask"], sampled["labels"]
        policy_extra = reference_extra = {}
        if None not in caches:
            rest = continuation_inputs(ids, mask, labels, start, pad_token_id=trainer.processing_class.pad_token_id,
                                       ignore_index=self.ignore_index)
            ids, labels = rest["input_ids"], rest["labels"]
            mask = torch.cat([left_padding_mask(start, mask.dtype), rest["attention_mask"]], dim=1)
            common = {"position_ids": rest["position_ids"], "use_cache": True}
            policy = trainer.accelerator.unwrap_model(self.model)
            reference = policy if trainer.ref_model is None else trainer.accelerator.unwrap_model(trainer.ref_model)
            policy_extra = {**common, cache_keyword(transformers_model(policy)): caches[0]}
            reference_extra = {**common, cache_keyword(transformers_model(reference)): caches[1]}
        logits = model_output(self.model, ids, mask, fused=self.args.fused_lm_head, **policy_extra).logits
        labels = next_token(labels, self.ignore_index)
        ref_logits = trainer.reference_output(ids, mask, **reference_extra).logits
        with torch.no_grad():
            ref_logps = token_logps(ref_logits, labels, **self.op_kwargs)
        return TripletAnchor(logits, labels, ref_logps=ref_logps)
