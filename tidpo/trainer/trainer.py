"""``TokenWeightedDPOTrainer``: a ``transformers.Trainer`` whose only job is the preference loss.

Everything else — optimiser, schedule, gradient accumulation, mixed precision, logging, checkpoints,
resuming, DDP / FSDP under ``torchrun`` or ``accelerate launch`` — is ``transformers.Trainer``'s own.
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections import defaultdict
from typing import NamedTuple

import torch
from torch import nn
from transformers import Trainer

from tidpo._model_state import eval_mode
from tidpo.data import PreferenceCollator, PreferenceDataset, load_preference_rows, tokenize_preference_rows
from tidpo.losses import TripletAnchor, dpo_loss, tdpo_loss, ti_dpo_loss, tis_dpo_loss
from tidpo.ops import token_logps
from tidpo.trainer.anchors import chosen_prefix_context, sample_anchors
from tidpo.trainer.config import TokenWeightedDPOConfig
from tidpo.trainer.reference import precompute_reference_logps
from tidpo.weights.attribution import ti_dpo_token_weights, weight_entropy

IGNORE_INDEX = -100


def is_peft_model(model: nn.Module) -> bool:
    """True for a PEFT-wrapped model (whose adapters can be disabled to recover the base model)."""
    try:
        from peft import PeftModel
    except ImportError:  # peft is a dependency; keep the check honest if it is missing
        return False
    return isinstance(model, PeftModel)


class TokenWeightedDPOTrainer(Trainer):
    """Trainer for DPO / IPO / hinge, TDPO1/2, TIS-DPO (and SFT on the chosen responses) from preference data.

    One forward of the policy over the 2B stacked rows of a batch (rows ``[0, B)`` prompt + chosen,
    ``[B, 2B)`` prompt + rejected) gives logits ``[2B, T, V]``; the loss reads ``logits[:, :-1]``
    against the shifted labels ``labels[:, 1:]`` (prompt and padding ``-100``) through tidpo's fused
    ops (Triton on CUDA, the chunked path elsewhere), so no ``[2B, T, V]`` log-softmax is built.

    The reference, in order of precedence:

    1. ``precompute_ref_logps=True``: one pass over the train and eval data before training stores
       per-token reference log-probs with each pair; the reference model is then released.
    2. ``ref_model``: a separate frozen model (eval mode, no gradients).
    3. a PEFT ``model`` and no ``ref_model``: the same model with its adapters disabled
       (``model.disable_adapter()``), in eval mode for that forward — no second copy in memory.
    4. otherwise a frozen deep copy of ``model`` at initialisation (memory: one more model).

    Args:
        model: the policy (``transformers`` causal LM, optionally PEFT-wrapped).
        args: :class:`~tidpo.trainer.TokenWeightedDPOConfig`.
        train_dataset / eval_dataset: a tokenised :class:`~tidpo.data.PreferenceDataset`, or anything
            :func:`~tidpo.data.load_preference_rows` reads (``datasets.Dataset``, list of dicts, a
            JSON / JSONL / Parquet file or folder) with ``prompt`` / ``chosen`` / ``rejected`` columns
            (plain text or conversational) and, for ``loss="tis_dpo"``, the weight columns.
        processing_class: the tokenizer (required: tokenisation and the padding id).
        ref_model: optional separate reference model.

    Logged (mean over the steps since the last log, reduced over processes, one host transfer per
    log): ``rewards/chosen``, ``rewards/rejected``, ``rewards/margins``, ``rewards/accuracies``,
    ``logps/chosen``, ``logps/rejected``, ``weights/*`` (TIS-DPO) and ``kl/*`` (KL losses), with
    ``eval_`` in front during evaluation.
    """

    def __init__(self, model: nn.Module, args: TokenWeightedDPOConfig, train_dataset=None, eval_dataset=None,
                 processing_class=None, ref_model: nn.Module | None = None, data_collator=None, **kwargs):
        if not isinstance(args, TokenWeightedDPOConfig):
            raise TypeError(f"args must be a TokenWeightedDPOConfig, got {type(args).__name__}")
        if processing_class is None:
            raise TypeError("processing_class must be the tokenizer (tokenisation and padding need it), got None")
        if getattr(processing_class, "pad_token_id", None) is None:
            raise ValueError("processing_class has no pad token: set tokenizer.pad_token (e.g. to its eos_token)")
        if ref_model is not None and ref_model is model:
            raise ValueError("ref_model must be a separate model, not the policy itself (leave it None with a "
                             "PEFT model to use the adapter-disabled policy as reference)")
        if not args.needs_reference and ref_model is not None:
            raise ValueError(f"loss={args.loss!r} uses no reference model; do not pass ref_model")
        self._uses_adapter_reference = ref_model is None and is_peft_model(model)
        if ref_model is None and not self._uses_adapter_reference and args.needs_reference:
            ref_model = copy.deepcopy(model)
        if ref_model is not None:
            ref_model.eval().requires_grad_(False)
        train_dataset = self._prepare_dataset(train_dataset, processing_class, args, "train_dataset")
        if isinstance(eval_dataset, dict):
            eval_dataset = {k: self._prepare_dataset(d, processing_class, args, f"eval_dataset[{k!r}]")
                            for k, d in eval_dataset.items()}
        else:
            eval_dataset = self._prepare_dataset(eval_dataset, processing_class, args, "eval_dataset")
        if data_collator is None:
            data_collator = PreferenceCollator(processing_class.pad_token_id, ignore_index=IGNORE_INDEX)
        super().__init__(model=model, args=args, data_collator=data_collator, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=processing_class, **kwargs)
        # The loss is a mean over pairs, not a sum over tokens: the Trainer must divide it by the
        # gradient-accumulation steps itself and never rescale it by token counts or world size.
        self.model_accepts_loss_kwargs = False
        self.loss_is_scaled_for_ga = False
        self._attribution_seconds: float | None = None  # TI-DPO on CPU: set by the loss, read by training_step
        self._metrics: dict[str, dict[str, list[torch.Tensor]]] = {"train": defaultdict(list),
                                                                     "eval": defaultdict(list)}
        self.ref_model = None
        if ref_model is not None:
            self.ref_model = ref_model.to(self.args.device)
        if args.precompute_ref_logps:
            self._precompute_reference()

    # ----------------------------------------------------------------------------------------------
    # data and reference
    @staticmethod
    def _prepare_dataset(dataset, tokenizer, args: TokenWeightedDPOConfig, name: str):
        if dataset is None or isinstance(dataset, PreferenceDataset):
            return dataset
        rows = load_preference_rows(dataset)
        try:
            return tokenize_preference_rows(
                rows, tokenizer, max_length=args.max_length, max_prompt_length=args.max_prompt_length,
                truncation_mode=args.truncation_mode,
                weights_columns=(args.chosen_weights_column, args.rejected_weights_column),
                require_weights=args.needs_weights, desc=f"tokenising {name}")
        except ValueError as error:
            # Say which dataset the row belongs to (train and eval rows are both numbered from 0).
            raise ValueError(f"{name}: {error}") from error

    @contextlib.contextmanager
    def _reference_model(self):
        """The reference model for a no-grad forward: separate model, or the policy without adapters."""
        if self.ref_model is not None:
            yield self.ref_model
            return
        # The forward goes through ``self.model`` (the FSDP wrapper where there is one; under DDP the
        # Trainer keeps the bare model there, so no gradient hooks fire); the adapters are switched
        # off on the PEFT model inside any wrapper.
        # Eval mode: the reference must not see dropout; restored right after.
        with eval_mode(self.model), self.accelerator.unwrap_model(self.model).disable_adapter():
            yield self.model

    def reference_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Reference logits ``[2B, T, V]`` under ``no_grad``."""
        with torch.no_grad(), self._reference_model() as ref:
            return ref(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    def _precompute_reference(self) -> None:
        datasets = [("train_dataset", self.train_dataset)]
        if isinstance(self.eval_dataset, dict):
            datasets += [(f"eval_dataset[{k!r}]", d) for k, d in self.eval_dataset.items()]
        else:
            datasets.append(("eval_dataset", self.eval_dataset))
        done = {}
        for name, dataset in datasets:
            if dataset is not None:
                done[name] = precompute_reference_logps(
                    self, dataset, batch_size=self.args.per_device_eval_batch_size, desc=f"reference log-probs: {name}")
        self.train_dataset = done.get("train_dataset", self.train_dataset)
        if isinstance(self.eval_dataset, dict):
            self.eval_dataset = {k: done[f"eval_dataset[{k!r}]"] for k in self.eval_dataset}
        elif self.eval_dataset is not None:
            self.eval_dataset = done["eval_dataset"]
        # Every reference value the loss needs now travels with the data.
        self.ref_model = None

    # ----------------------------------------------------------------------------------------------
    # loss
    def preference_loss(self, model: nn.Module, inputs: dict[str, torch.Tensor]):
        """The configured loss of one collated batch; returns the :class:`~tidpo.PreferenceLossOutput`."""
        args: TokenWeightedDPOConfig = self.args
        if args.loss == "sft":
            return sft_loss(model, inputs, backend=args.loss_backend)
        input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
        labels = inputs["labels"][:, 1:]
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1]
        weights = inputs.get("weights")
        if args.needs_weights and weights is None:
            raise ValueError(f"loss={args.loss!r} needs per-token weights, but the batch has none: give the data "
                             f"{args.chosen_weights_column!r} / {args.rejected_weights_column!r} columns "
                             "(tidpo train --weights PATH)")
        weights = None if weights is None else weights[:, 1:]
        ref_logits = ref_logps = None
        if "ref_logps" in inputs and not args.needs_ref_logits:
            ref_logps = inputs["ref_logps"][:, 1:]
        else:
            ref_logits = self.reference_logits(input_ids, attention_mask)[:, :-1]
            if not args.needs_ref_logits:
                # Only per-token log-probs are needed: reduce now, free the [2B, T, V] reference logits.
                ref_logps = token_logps(ref_logits, labels, IGNORE_INDEX, backend=args.loss_backend)
                ref_logits = None
        common = {"ignore_index": IGNORE_INDEX, "backend": args.loss_backend}
        if args.loss in ("dpo", "ipo", "hinge"):
            return dpo_loss(logits, labels, ref_logps=ref_logps, beta=args.beta, loss_type=_DPO_TYPES[args.loss],
                            label_smoothing=args.label_smoothing, **common)
        if args.loss == "ti_dpo":
            return self._ti_dpo_loss(model, inputs, logits, labels, ref_logits)
        if args.loss in ("tdpo1", "tdpo2"):
            return tdpo_loss(logits, ref_logits, labels, beta=args.beta, alpha=args.alpha,
                             variant=int(args.loss[-1]), **common)
        if args.loss == "tis_dpo":
            return tis_dpo_loss(logits, labels, weights, ref_logps=ref_logps, ref_logits=ref_logits, beta=args.beta,
                                token_level=args.token_level, alpha=args.alpha, kl_form=args.kl_form, **common)
        raise ValueError(f"unknown loss {args.loss!r}")  # unreachable: the config validates it

    def _ti_dpo_loss(self, model, inputs, logits, labels, ref_logits):
        """TI-DPO: attribution weights of the current policy, an anchor sampled from it, the loss (§3)."""
        args: TokenWeightedDPOConfig = self.args
        policy = self.accelerator.unwrap_model(model)
        start = time.perf_counter()
        weights = ti_dpo_token_weights(policy, inputs["input_ids"], inputs["attention_mask"], inputs["labels"],
                                       lam=args.ti_lambda, sigma_div=args.prior_sigma_div, scope=args.importance_scope,
                                       ignore_index=IGNORE_INDEX, importance=args.ti_importance)[:, 1:]
        attribution_seconds = time.perf_counter() - start
        anchor = None
        if args.gamma > 0:
            tokenizer = self.processing_class
            context, context_mask, prefix = inputs["prompt_input_ids"], inputs["prompt_attention_mask"], None
            if args.anchor_source == "chosen":
                context, context_mask, prefix = chosen_prefix_context(
                    inputs["input_ids"], inputs["attention_mask"], inputs["labels"],
                    num_pairs=inputs["input_ids"].shape[0] // 2, fraction=args.anchor_chosen_fraction,
                    pad_token_id=tokenizer.pad_token_id, ignore_index=IGNORE_INDEX)
            sampled = sample_anchors(policy, context, context_mask, pad_token_id=tokenizer.pad_token_id,
                                     eos_token_id=tokenizer.eos_token_id, max_new_tokens=args.anchor_max_new_tokens,
                                     top_k=args.anchor_top_k, top_p=args.anchor_top_p,
                                     temperature=args.anchor_temperature, prefix_lengths=prefix)
            anchor_logits = model(input_ids=sampled["input_ids"], attention_mask=sampled["attention_mask"],
                                  use_cache=False).logits[:, :-1]
            anchor_labels = sampled["labels"][:, 1:]
            ref_anchor = self.reference_logits(sampled["input_ids"], sampled["attention_mask"])[:, :-1]
            anchor_ref_logps = token_logps(ref_anchor, anchor_labels, IGNORE_INDEX, backend=args.loss_backend)
            anchor = TripletAnchor(anchor_logits, anchor_labels, ref_logps=anchor_ref_logps)
        out = ti_dpo_loss(logits, ref_logits, labels, weights, beta=args.beta, alpha=args.alpha, gamma=args.gamma,
                          triplet_margin=args.triplet_margin, anchor=anchor, kl_coef=args.kl_coef,
                          ignore_index=IGNORE_INDEX, backend=args.loss_backend)
        out.metrics["weights/entropy"] = weight_entropy(weights, labels != IGNORE_INDEX)
        if logits.device.type == "cpu":
            # Wall time is only meaningful where kernels run synchronously (CPU); on an accelerator it
            # would need a host sync per step.
            out.metrics["ti/attribution_seconds"] = torch.tensor(attribution_seconds)
            self._attribution_seconds = attribution_seconds
        return out

    def training_step(self, model, inputs, num_items_in_batch=None):
        """The Trainer's step; for TI-DPO on CPU also logs ``ti/step_seconds`` and ``ti/attribution_share``.

        The share is the attribution's wall time over the whole micro-step (forward, attribution, anchor
        sampling and scoring, backward), measured only where it costs no device synchronisation (CPU).
        """
        self._attribution_seconds = None
        start = time.perf_counter()
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self._attribution_seconds is not None:
            seconds = time.perf_counter() - start
            self._store_metrics({"ti/step_seconds": torch.tensor(seconds),
                                 "ti/attribution_share": torch.tensor(self._attribution_seconds / seconds)},
                                "train")
        return loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = self.preference_loss(model, inputs)
        self._store_metrics(out.metrics, "train")
        return (out.loss, out) if return_outputs else out.loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            out = self.preference_loss(model, inputs)
        self._store_metrics(out.metrics, "eval")
        loss = out.loss.detach()
        if prediction_loss_only or out.chosen_rewards is None:
            return loss, None, None
        # "Predictions": the implicit rewards [B, 2] (chosen, rejected); label 0 = the chosen column.
        rewards = torch.stack([out.chosen_rewards, out.rejected_rewards], dim=1)
        return loss, rewards, torch.zeros(rewards.shape[0], dtype=torch.long, device=rewards.device)

    # ----------------------------------------------------------------------------------------------
    # metrics
    def _store_metrics(self, metrics: dict[str, torch.Tensor], mode: str) -> None:
        for key, value in metrics.items():
            self._metrics[mode][key].append(value.detach().float())

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "eval" if any(key.startswith("eval_") for key in logs) else "train"
        stored = self._metrics[mode]
        if stored:
            keys = sorted(stored)
            means = torch.stack([torch.stack(stored[key]).mean() for key in keys])
            if self.accelerator.num_processes > 1:
                means = self.accelerator.reduce(means, reduction="mean")
            prefix = "eval_" if mode == "eval" else ""
            # The one device-to-host transfer of the logged metrics.
            logs.update({prefix + key: value for key, value in zip(keys, means.tolist(), strict=True)})
            stored.clear()
        super().log(logs, start_time)


_DPO_TYPES = {"dpo": "sigmoid", "ipo": "ipo", "hinge": "hinge"}


class SFTOutput(NamedTuple):
    """``loss`` and logging ``metrics`` of :func:`sft_loss`; no rewards (there is no reference)."""

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor]
    chosen_rewards: None = None
    rejected_rewards: None = None


def sft_loss(model: nn.Module, inputs: dict[str, torch.Tensor], backend: str | None = None) -> SFTOutput:
    """Mean token NLL of the chosen responses: ``L = -sum_t log pi(y_t) / n`` over the B chosen rows.

    Only rows ``[0, B)`` are run through the model (the rejected half is not needed). With
    ``--reverse`` the data's chosen and rejected are swapped first, so this trains on the rejected
    responses: the two SFT models of the TIS-DPO(S) contrastive pair (METHODS.md §2.5).
    """
    num_pairs = inputs["input_ids"].shape[0] // 2
    labels = inputs["labels"][:num_pairs, 1:]
    logits = model(input_ids=inputs["input_ids"][:num_pairs], attention_mask=inputs["attention_mask"][:num_pairs],
                   use_cache=False).logits[:, :-1]
    logps = token_logps(logits, labels, IGNORE_INDEX, backend=backend)
    count = (labels != IGNORE_INDEX).sum()
    loss = -logps.sum() / count.clamp(min=1)
    per_row = logps.sum(-1).detach()
    return SFTOutput(loss, {"sft/nll": loss.detach(), "logps/chosen": per_row.mean(),
                            "sft/tokens": count.detach().float()})
