"""``TokenWeightedDPOTrainer``: a ``transformers.Trainer`` whose only job is the preference loss.

Everything else — optimiser, schedule, gradient accumulation, mixed precision, logging, checkpoints,
resuming, DDP / FSDP under ``torchrun`` or ``accelerate launch`` — is ``transformers.Trainer``'s own.
"""

from __future__ import annotations

import contextlib
import logging
import time

import torch
from torch import nn
from transformers import Trainer

from tidpo._model_state import ConfigDropout, active_dropout, disable_dropout, eval_mode
from tidpo._validation import IGNORE_INDEX
from tidpo.data import PreferenceCollator, PreferenceDataset, load_preference_rows, tokenize_preference_rows
from tidpo.data.collator import ALIGNED_BATCH_COLUMNS
from tidpo.losses import PreferenceLossOutput
from tidpo.losses.output import per_pair
from tidpo.trainer.anchors import end_of_turn_ids
from tidpo.trainer.batch import TrainingBatch, model_output
from tidpo.trainer.config import TokenWeightedDPOConfig
from tidpo.trainer.fused_head import add_fused_lm_head, head_of, transformers_model
from tidpo.trainer.loss_registry import REFERENCE_LOGITS, REFERENCE_NONE, WEIGHTS_DATA
from tidpo.trainer.reference_model import frozen_copy, placement_of, precompute_reference_logps
from tidpo.trainer.shared_forward import FrozenPrefixGate

logger = logging.getLogger(__name__)

#: The per-response columns of precomputed reference log-probs (``precompute_ref_logps``).
REF_LOGPS_COLUMNS = ALIGNED_BATCH_COLUMNS["ref_logps"]
#: Key of the loss's own ``(sum, count)`` among the accumulated evaluation totals.
_LOSS_KEY = "loss"


def is_peft_model(model: nn.Module) -> bool:
    """True for a PEFT-wrapped model (whose adapters can be disabled to recover the base model)."""
    try:
        from peft import PeftModel
    except ImportError:  # peft is a dependency; keep the check honest if it is missing
        return False
    return isinstance(model, PeftModel)


class TokenWeightedDPOTrainer(Trainer):
    """Trainer for DPO / IPO / hinge, TDPO1/2, TIS-DPO, TI-DPO (and SFT on the chosen responses).

    One forward of the policy over the 2B stacked rows of a batch (rows ``[0, B)`` prompt + chosen,
    ``[B, 2B)`` prompt + rejected) gives logits ``[2B, T, V]``; the loss reads ``logits[:, :-1]``
    against the shifted labels ``labels[:, 1:]`` (prompt and padding ``ignore_index``) through tidpo's
    fused ops (Triton on CUDA, the chunked path elsewhere), so no ``[2B, T, V]`` log-softmax is built. What
    each loss needs is :data:`~tidpo.trainer.loss_registry.LOSS_REGISTRY`'s entry.

    The reference, in order of precedence:

    1. per-token reference log-probs carried by the data (``precompute_ref_logps=True`` computes them with
       one pass before training and then releases the reference model);
    2. ``ref_model``: a separate frozen model (eval mode, no gradients);
    3. a PEFT ``model`` and no ``ref_model``: the same model with its adapters disabled — no second copy;
    4. otherwise a frozen deep copy of ``model`` at initialisation (refused for quantised models and models
       dispatched over several devices: pass ``ref_model`` or train an adapter).

    Every reference forward runs in evaluation mode (no dropout), under ``no_grad``, and in the policy's
    mixed-precision context (``--bf16`` / ``--fp16``: the same autocast as the policy, as TRL does), so at
    initialisation policy and reference give identical log-probs and every reward is exactly 0.

    With ``disable_dropout`` (the default) the policy's and the reference's dropout is switched off for good
    (:func:`tidpo._model_state.disable_dropout`); PEFT adapter dropout (``lora_dropout``) is kept, and said so
    in the log.

    Args:
        model: the policy (``transformers`` causal LM, optionally PEFT-wrapped).
        args: :class:`~tidpo.trainer.TokenWeightedDPOConfig`.
        train_dataset / eval_dataset: a tokenised :class:`~tidpo.data.PreferenceDataset`, or anything
            :func:`~tidpo.data.load_preference_rows` reads (``datasets.Dataset``, list of dicts, a
            JSON / JSONL / Parquet file or folder) with ``prompt`` / ``chosen`` / ``rejected`` columns
            (plain text or conversational) and, for ``loss="tis_dpo"``, the weight columns.
        processing_class: the tokenizer (required: tokenisation and the padding id).
        ref_model: optional separate reference model. Left on its devices when it is quantised or dispatched by
            ``device_map``; otherwise moved to the training device.
        data_collator: default :class:`~tidpo.data.PreferenceCollator`; the trainer takes the label that
            marks positions without a loss term from its ``ignore_index`` attribute (``-100`` without one).

    Logged, as exact means over the steps since the last log (sums and counts accumulated over
    micro-batches and reduced over processes: one device-to-host transfer per log): pair metrics
    ``rewards/chosen``, ``rewards/rejected``, ``rewards/margins``, ``rewards/accuracies``, ``logps/chosen``,
    ``logps/rejected``, ``triplet/loss`` (means over pairs) and token metrics ``weights/*`` and ``kl/*``
    (means over response tokens). ``evaluate()`` and ``predict()`` return the same metrics over the whole
    evaluation set, whatever its batch size, under their ``metric_key_prefix`` (``eval_`` / ``test_``), and
    ``<prefix>_loss`` is the mean over pairs (over tokens for ``sft``).

    Raises:
        TypeError / ValueError: bad arguments, conflicting reference sources (precomputed log-probs in the data
            together with ``ref_model``, or with a loss that needs reference logits), a policy that cannot be
            copied as its own reference, a collator with a non-integer ``ignore_index``.
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
        spec = args.loss_spec
        if spec.reference == REFERENCE_NONE and ref_model is not None:
            raise ValueError(f"loss={args.loss!r} uses no reference model; do not pass ref_model")
        if args.disable_dropout:
            self._disable_dropout(model, ref_model)
        explicit_ref_model = ref_model is not None
        if data_collator is None:
            data_collator = PreferenceCollator(processing_class.pad_token_id, ignore_index=IGNORE_INDEX)
        self.ignore_index = _collator_ignore_index(data_collator)
        train_dataset = self._prepare_dataset(train_dataset, processing_class, args, "train_dataset")
        if isinstance(eval_dataset, dict):
            eval_dataset = {k: self._prepare_dataset(d, processing_class, args, f"eval_dataset[{k!r}]")
                            for k, d in eval_dataset.items()}
        else:
            eval_dataset = self._prepare_dataset(eval_dataset, processing_class, args, "eval_dataset")
        _check_reference_sources(args, explicit_ref_model, train_dataset, eval_dataset)
        self._uses_adapter_reference = ref_model is None and is_peft_model(model)
        if ref_model is None and not self._uses_adapter_reference and spec.reference != REFERENCE_NONE:
            ref_model = frozen_copy(model)
        if ref_model is not None:
            ref_model.eval().requires_grad_(False)
            _check_log_ratio_reference(args, model, ref_model)
        if args.fused_lm_head:
            for each in (model, ref_model):
                if each is not None:
                    add_fused_lm_head(each)
        super().__init__(model=model, args=args, data_collator=data_collator, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=processing_class, **kwargs)
        self.loss_spec = spec
        self._explicit_ref_model = explicit_ref_model
        # Every loss is the mean of its per-item losses (pairs, or tokens for sft) over the whole global batch:
        # compute_loss divides the micro-batch's sum by the item count of all micro-batches of the step and all
        # processes (num_items_in_batch, get_batch_samples), so the Trainer must not divide by the accumulation
        # steps again. Uneven micro-batches then weigh every item alike, as one big batch would.
        self.model_accepts_loss_kwargs = True
        self.loss_is_scaled_for_ga = True
        # Dropout probabilities that live in the models' configs: zeroed while training, saved as given.
        self._config_dropout = ConfigDropout(model, ref_model) if args.disable_dropout else ConfigDropout()
        #: Ids that end a reply (TI-DPO anchors): the model's generation config and the tokenizer's EOS.
        self.end_of_turn_ids = end_of_turn_ids(model, processing_class)
        #: Wall seconds of the parts of the last training micro-step (CPU only; see :meth:`training_step`).
        self.step_part_seconds: dict[str, float] = {}
        self._metric_totals: dict[str, dict[str, torch.Tensor]] = {"train": {}, "eval": {}}  # key -> [sum, count]
        self._evaluation_depth = 0
        self.ref_model = None
        if ref_model is not None:
            # A quantised or device_map-dispatched reference stays where it was loaded.
            self.ref_model = ref_model if placement_of(ref_model) else ref_model.to(self.args.device)
        if args.fused_lm_head and self.is_fsdp_enabled and head_of(transformers_model(model)).weight.requires_grad:
            raise ValueError("fused_lm_head with FSDP and a trained LM head is not supported (the backward would "
                             "read the head after FSDP has sharded it again): train an adapter, freeze the head, "
                             "or turn the fused head off (fused_lm_head=False)")
        if args.precompute_ref_logps:
            self._precompute_reference()

    @property
    def frozen_prefix_gate(self) -> FrozenPrefixGate:
        """TI-DPO's shared forward: where the loss's backward stops (:mod:`tidpo.trainer.shared_forward`), found
        once, on the first use (which parameters train does not change while training)."""
        gate = self.__dict__.get("_frozen_prefix_gate")
        if gate is None:
            gate = self.__dict__["_frozen_prefix_gate"] = FrozenPrefixGate(self.accelerator.unwrap_model(self.model))
        return gate

    def policy_forward_is_shareable(self) -> bool:
        """Whether the policy's train-mode forward computes what an eval-mode forward would (no dropout active)
        and ``autograd.grad`` can go through it (no reentrant gradient checkpointing), so that TI-DPO's
        attribution and anchors may read the loss's forward. Decided once per :meth:`train` (the models' dropout
        does not change while training); the reason for a separate pass is logged once."""
        shareable = self.__dict__.get("_policy_forward_is_shareable")
        if shareable is None:
            shareable = self.__dict__["_policy_forward_is_shareable"] = self._policy_forward_shareable()
        return shareable

    def _policy_forward_shareable(self) -> bool:
        policy = self.accelerator.unwrap_model(self.model)
        # What a forward that cannot be shared costs, for the log.
        costs = [cost for cost, applies in (("a separate attribution pass", self.args.attributes_online),
                                            ("the anchors' prompts run anew", self.args.samples_anchors)) if applies]
        dropout = active_dropout(policy)
        if dropout:
            self.log_once(f"TI-DPO: {' and '.join(costs)} (dropout is active in train mode: "
                          f"{', '.join(dropout[:3])}{', ...' if len(dropout) > 3 else ''})")
            return False
        checkpointing = any(getattr(module, "gradient_checkpointing", False) is True for module in policy.modules())
        # transformers' default is the non-reentrant checkpoint, which autograd.grad can go through.
        if checkpointing and (self.args.gradient_checkpointing_kwargs or {}).get("use_reentrant", False):
            self.log_once(f"TI-DPO: {' and '.join(costs)} (reentrant gradient checkpointing; "
                          "gradient_checkpointing_kwargs={'use_reentrant': False} lets the forward be shared)")
            return False
        return True

    def log_once(self, message: str) -> None:
        """Log ``message`` at INFO level the first time it is given (a choice made at every step, said once)."""
        logged = self.__dict__.setdefault("_logged_once", set())
        if message not in logged:
            logged.add(message)
            logger.info(message)

    # ----------------------------------------------------------------------------------------------
    # models, data and reference
    @staticmethod
    def _disable_dropout(model: nn.Module, ref_model: nn.Module | None) -> None:
        kept = disable_dropout(model)
        if ref_model is not None:
            disable_dropout(ref_model)
        if kept:
            rates = sorted({p for _, p in kept})
            logger.info("disable_dropout: the policy's dropout is off; the adapter dropout you configured "
                        "(p=%s on %d adapter layers) is kept", ", ".join(f"{p:g}" for p in rates), len(kept))

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
                require_weights=args.loss_spec.weights == WEIGHTS_DATA, desc=f"tokenising {name}")
        except ValueError as error:
            # Say which dataset the row belongs to (train and eval rows are both numbered from 0).
            raise ValueError(f"{name}: {error}") from error

    @contextlib.contextmanager
    def _reference_model(self):
        """The reference model for a no-grad forward: separate model, or the policy without adapters."""
        if self.ref_model is not None:
            yield self.ref_model
            return
        if not self._uses_adapter_reference:
            raise RuntimeError("no reference model: precompute_ref_logps released it after scoring the datasets "
                               "given to the trainer, and these pairs carry no reference log-probs; give every "
                               "dataset to the constructor, or use a PEFT adapter (its reference stays available)")
        # The forward goes through ``self.model`` (the FSDP wrapper where there is one; under DDP the
        # Trainer keeps the bare model there, so no gradient hooks fire); the adapters are switched
        # off on the PEFT model inside any wrapper.
        # Eval mode: the reference must not see dropout; restored right after.
        with eval_mode(self.model), self.accelerator.unwrap_model(self.model).disable_adapter():
            yield self.model

    def reference_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *,
                         embedding_shift: torch.Tensor | None = None) -> torch.Tensor:
        """Reference logits ``[2B, T, V]``: eval mode, in the policy's mixed-precision context (with
        ``fused_lm_head``, :class:`tidpo.FusedLogits` of the reference's last hidden state).

        The policy's forward runs under the autocast that ``accelerate`` wraps around it (``--bf16`` /
        ``--fp16``); every kind of reference runs under the same one, so a reference equal to the policy
        gives bitwise equal log-probs (and no fp32 reference forward or fp32 reference logits on a GPU).

        The forward runs under ``no_grad``, unless ``embedding_shift`` is given (``[2B, T, H]``, zero in value:
        TI-DPO's ``log_ratio`` attribution, :func:`tidpo.weights.attribution.embedding_shift`): the reference then
        reads its own embeddings of ``input_ids`` plus the shift and keeps the graph to it; its parameters get no
        gradient (frozen, or adapters disabled).
        """
        return self.reference_output(input_ids, attention_mask, embedding_shift=embedding_shift).logits

    def reference_output(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *,
                         embedding_shift: torch.Tensor | None = None, **forward_kwargs):
        """The reference's whole output (see :meth:`reference_logits`); ``forward_kwargs`` go to the model
        (``use_cache=True`` for its key/value cache, ``position_ids``, a cache to continue)."""
        fused = self.args.fused_lm_head
        if embedding_shift is None:
            with torch.no_grad(), self.accelerator.autocast(), self._reference_model() as ref:
                return model_output(ref, input_ids, attention_mask, fused=fused, **forward_kwargs)
        with self.accelerator.autocast(), self._reference_model() as ref:
            embeds = self.accelerator.unwrap_model(ref).get_input_embeddings()(input_ids) + embedding_shift
            return model_output(ref, None, attention_mask, fused=fused, inputs_embeds=embeds, **forward_kwargs)

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
        """The configured loss of one collated batch (a :class:`~tidpo.losses.LossOutput`)."""
        batch = TrainingBatch(self, model, inputs)
        out = self.loss_spec.compute(batch)
        if model.training:
            self.step_part_seconds = batch.part_seconds
        return out

    def get_batch_samples(self, epoch_iterator, num_batches, *args, **kwargs):
        """The Trainer's micro-batches of one optimiser step, and the number of items their loss averages over.

        ``num_items_in_batch`` counts the loss's items (:meth:`~tidpo.trainer.LossSpec.count_items`: the pairs,
        or the chosen response tokens for ``sft``) in all micro-batches of the step, summed over processes when
        ``average_tokens_across_devices`` (the Trainer's default).
        """
        batches = []
        for _ in range(num_batches):
            try:
                batches.append(next(epoch_iterator))
            except StopIteration:
                break
        if not batches:
            return batches, None
        counts = [self.loss_spec.count_items(b["labels"], self.ignore_index) for b in batches]
        num_items = torch.stack(counts).sum().to(self.args.device)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            num_items = self.accelerator.gather(num_items).sum()
        return batches, num_items

    def train(self, *args, **kwargs):
        """``Trainer.train``, with the dropout probabilities of the models' configs zeroed meanwhile."""
        self._metric_totals["train"].clear()
        self.__dict__.pop("_policy_forward_is_shareable", None)  # decided anew, with the configs' dropout zeroed
        with self._config_dropout.zeroed():
            return super().train(*args, **kwargs)

    def _save(self, output_dir=None, state_dict=None):
        # Checkpoints and save_model() write the config with the user's dropout, not the zeros used in training.
        with self._config_dropout.original():
            super()._save(output_dir, state_dict)

    def training_step(self, model, inputs, num_items_in_batch=None):
        """The Trainer's step; on CPU also records the wall time of its parts in :attr:`step_part_seconds`.

        The parts are those of :attr:`TrainingBatch.part_seconds <tidpo.trainer.batch.TrainingBatch>` (policy
        and reference forwards, TI-DPO's attribution, anchor sampling and scoring), plus ``"step"``: the whole
        micro-step (forward, loss and backward; not the optimiser). They are measured only where it costs no
        device synchronisation (CPU). TI-DPO also logs ``ti/step_seconds`` and ``ti/attribution_share`` (the
        attribution's wall time over the micro-step's).
        """
        self.step_part_seconds = {}
        start = time.perf_counter()
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.step_part_seconds:
            seconds = time.perf_counter() - start
            self.step_part_seconds["step"] = seconds
            attribution = self.step_part_seconds.get("attribution")
            if attribution is not None:
                self._add_totals({"ti/step_seconds": per_pair(torch.tensor([seconds])),
                                  "ti/attribution_share": per_pair(torch.tensor([attribution / seconds]))}, "train")
        return loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = self.preference_loss(model, inputs)
        self._add_totals(out.metric_parts, "train")
        loss = out.loss
        if num_items_in_batch is not None:
            # The mean over the items of the whole global batch. DDP averages the gradients over processes, so a
            # count summed over processes is compensated by the world size.
            loss = out.item_sum() / num_items_in_batch
            if self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
                loss = loss * self.accelerator.num_processes
        return (loss, out) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            out = self.preference_loss(model, inputs)
        self._add_eval_parts({**out.metric_parts, _LOSS_KEY: out.loss_parts()})
        loss = out.loss.detach()
        if prediction_loss_only or not isinstance(out, PreferenceLossOutput):
            return loss, None, None
        # "Predictions": the implicit rewards [B, 2] (chosen, rejected); label 0 = the chosen column.
        rewards = torch.stack([out.chosen_rewards, out.rejected_rewards], dim=1)
        return loss, rewards, torch.zeros(rewards.shape[0], dtype=torch.long, device=rewards.device)

    # ----------------------------------------------------------------------------------------------
    # metrics
    def _add_totals(self, parts: dict, mode: str) -> None:
        """Add the ``(sum, count)`` of each metric's per-pair parts to the running totals of ``mode`` (no sync)."""
        bucket = self._metric_totals[mode]
        for key, (sums, counts) in parts.items():
            pair = torch.stack([sums.sum(), counts.sum()]).to(self.accelerator.device)
            bucket[key] = bucket[key] + pair if key in bucket else pair

    def _add_eval_parts(self, parts: dict) -> None:
        """Evaluation: gather the per-pair parts of all processes, without the pairs a distributed sampler
        repeats to even out the last batch (``gather_for_metrics``), and add them to the totals."""
        keys = sorted(parts)
        stacked = torch.stack([torch.stack(parts[key], dim=-1).to(self.accelerator.device) for key in keys], dim=1)
        if self.accelerator.num_processes > 1:
            stacked = self.accelerator.gather_for_metrics(stacked)  # [pairs of all processes, keys, 2]
        self._add_totals({key: (stacked[:, i, 0], stacked[:, i, 1]) for i, key in enumerate(keys)}, "eval")

    def _reduce_metrics(self, mode: str) -> dict[str, float]:
        """The accumulated means of ``mode``, then reset. Training totals are added over processes here; the
        evaluation ones were gathered batch by batch already."""
        bucket = self._metric_totals[mode]
        if not bucket:
            return {}
        keys = sorted(bucket)
        totals = torch.stack([bucket[key] for key in keys])
        bucket.clear()
        if mode == "train" and self.accelerator.num_processes > 1:
            totals = self.accelerator.reduce(totals, reduction="sum")
        # The one device-to-host transfer of the metrics.
        return {key: total / count for key, (total, count) in zip(keys, totals.tolist(), strict=True) if count > 0}

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        """``Trainer.evaluate``; the preference metrics come back (and are logged) under its prefix.

        ``eval_dataset`` takes every form the constructor does (rows, files, ``datasets`` objects, a dict of them),
        or the name of one of the constructor's evaluation datasets.
        """
        if not (isinstance(eval_dataset, str) and isinstance(self.eval_dataset, dict) and
                eval_dataset in self.eval_dataset):
            eval_dataset = self._prepare_eval_dataset(eval_dataset, "eval_dataset")
        self._evaluation_depth += 1
        try:
            return super().evaluate(eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)
        finally:
            self._evaluation_depth -= 1

    def predict(self, test_dataset, ignore_keys=None, metric_key_prefix: str = "test"):
        """``Trainer.predict``: the implicit rewards ``[N, 2]`` (chosen, rejected) as predictions, and the metrics.

        ``test_dataset`` takes every form the constructor does.
        """
        test_dataset = self._prepare_eval_dataset(test_dataset, "test_dataset")
        return super().predict(test_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)

    def _prepare_eval_dataset(self, dataset, name: str):
        """A dataset (or dict of datasets) handed to evaluate / predict, tokenised and checked like the
        constructor's."""
        if isinstance(dataset, dict):
            dataset = {k: self._prepare_dataset(d, self.processing_class, self.args, f"{name}[{k!r}]")
                       for k, d in dataset.items()}
        else:
            dataset = self._prepare_dataset(dataset, self.processing_class, self.args, name)
        if not self.args.precompute_ref_logps:
            _check_reference_sources(self.args, self._explicit_ref_model, None, dataset)
        return dataset

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix: str = "eval"):
        """The Trainer's loop (``evaluate`` and ``predict``), plus the exact means over the whole set.

        ``<prefix>_loss`` becomes the mean over pairs (tokens for ``sft``) instead of the Trainer's mean of
        per-batch means, which weights a short last batch like a full one.
        """
        self._metric_totals["eval"].clear()
        output = super().evaluation_loop(dataloader, description, prediction_loss_only=prediction_loss_only,
                                         ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)
        means = self._reduce_metrics("eval")
        output.metrics.update({f"{metric_key_prefix}_{key}": value for key, value in means.items()})
        return output

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self._evaluation_depth == 0 and "loss" in logs:
            # A periodic training log: the train metrics accumulated since the last one. (The run's final
            # summary, with train_loss over the whole run, gets none: they would cover only its last steps.)
            logs.update(self._reduce_metrics("train"))
        super().log(logs, start_time)


def _collator_ignore_index(collator) -> int:
    """The label a collator writes where there is no loss term (``ignore_index``; ``-100`` without one)."""
    value = getattr(collator, "ignore_index", IGNORE_INDEX)
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"data_collator.ignore_index must be an int, got {value!r}")
    return value


def _carries_reference(dataset) -> bool:
    datasets = dataset.values() if isinstance(dataset, dict) else [dataset]
    return any(d is not None and REF_LOGPS_COLUMNS[0] in getattr(d, "column_names", ()) for d in datasets)


def _check_log_ratio_reference(args: TokenWeightedDPOConfig, model: nn.Module, ref_model: nn.Module) -> None:
    """TI-DPO's ``log_ratio`` attribution adds one embedding shift to both models: their widths must agree."""
    if not (args.attributes_online and args.ti_attribution_target == "log_ratio"):
        return
    width, ref_width = (m.get_input_embeddings().embedding_dim for m in (model, ref_model))
    if width != ref_width:
        raise ValueError(f"ti_attribution_target='log_ratio' shifts each token's embedding by the same vector in "
                         f"the policy and the reference, but their embeddings are {width} and {ref_width} wide: "
                         "use a reference of the policy's architecture, or another target")


def _check_reference_sources(args: TokenWeightedDPOConfig, explicit_ref_model: bool, train_dataset,
                             eval_dataset) -> None:
    """Refuse two sources of the reference where one would silently win over the other."""
    carried = [name for name, d in (("train_dataset", train_dataset), ("eval_dataset", eval_dataset))
               if _carries_reference(d)]
    if not carried:
        return
    columns = " / ".join(repr(c) for c in REF_LOGPS_COLUMNS)
    where = " and ".join(carried)
    if explicit_ref_model:
        raise ValueError(f"{where} carries precomputed reference log-probs ({columns}) and ref_model is given: "
                         "the trainer would use the columns and never the ref_model. Pass one reference: drop "
                         "ref_model, or drop the columns from the data")
    if args.precompute_ref_logps:
        raise ValueError(f"{where} already carries precomputed reference log-probs ({columns}); "
                         "precompute_ref_logps=True would compute them again and replace them: drop one")
    if args.reference_need == REFERENCE_LOGITS:
        raise ValueError(f"{where} carries precomputed reference log-probs ({columns}), but loss={args.loss!r}"
                         f"{' with token_level' if args.token_level else ''} needs the reference's full "
                         "distribution at every step and would not use them: drop the columns")
