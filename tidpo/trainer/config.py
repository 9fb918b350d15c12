"""``TokenWeightedDPOConfig``: ``transformers.TrainingArguments`` plus the preference method's fields.

Every field below is a command-line flag of ``tidpo train`` (``--beta 0.2``, ``--max-length 256``),
next to all of ``TrainingArguments`` (``--learning-rate``, ``--per-device-train-batch-size``, …).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, fields

import torch
from transformers import TrainingArguments

from tidpo._validation import check_choice, check_int, check_non_negative, check_number, check_positive
from tidpo.data.tokenization import TRUNCATION_MODES
from tidpo.losses import KL_FORMS
from tidpo.trainer.anchors import ANCHOR_SOURCES
from tidpo.trainer.loss_registry import (
    LOSS_REGISTRY,
    REFERENCE_LOGITS,
    REFERENCE_NONE,
    WEIGHTS_ONLINE,
    LossSpec,
    loss_help,
    method_fields,
    readers_of,
)
from tidpo.weights.attribution import IMPORTANCES, SCOPES, TARGETS

#: TI-DPO hyper-parameters of the official code (config/loss/tidpo.yaml), applied by ``ti_preset="official"``;
#: the field defaults are the paper's table (docs/methods.md §3.5).
TI_OFFICIAL_PRESET = {"beta": 0.2, "gamma": 0.001, "triplet_margin": 0.001, "ti_lambda": 0.2,
                      "prior_sigma_div": 8.0, "importance_scope": "sequence", "anchor_source": "prompt"}


def _help(text: str, choices=None) -> dict:
    """Field metadata for ``tidpo train``'s parser; ``choices`` lets argparse refuse a bad value with the list."""
    return {"help": text} if choices is None else {"help": text, "choices": list(choices)}


@dataclass
class TokenWeightedDPOConfig(TrainingArguments):
    """Training arguments for :class:`~tidpo.trainer.TokenWeightedDPOTrainer`.

    Adds the method's hyper-parameters to ``transformers.TrainingArguments``; everything else
    (optimiser, schedule, batch sizes, logging, checkpoints, ``bf16``, DDP/FSDP through
    ``accelerate``) is the Trainer's own. ``remove_unused_columns`` defaults to ``False`` because
    the preference collator needs every column of the tokenised pairs.

    Which loss reads which field is one table, :data:`~tidpo.trainer.loss_registry.LOSS_REGISTRY`: a method
    field the chosen loss does not read must keep its default (``--gamma 0.5`` with ``--loss dpo`` is an error,
    not a silently ignored flag).

    Method fields (see ``docs/methods.md`` for the formulas):

    ==========================  =========  ================================================================
    field                       default    meaning
    ==========================  =========  ================================================================
    ``loss``                    ``dpo``    ``dpo`` / ``ipo`` / ``hinge`` (DPO, §4.2), ``tdpo1`` / ``tdpo2``
                                           (TDPO, §1), ``tis_dpo`` (TIS-DPO as released, §2.3), ``sft``
                                           (mean NLL of the chosen responses: TIS-DPO(S) pair builder, §2.5),
                                           ``ti_dpo`` (TI-DPO, §3: online attribution weights, anchors)
    ``gamma`` ... ``ti_preset``            TI-DPO: triplet weight 0.1 and margin 1e-3, λ 0.7, σ = n/4,
                                           response-scope importance, anchor sampling (top-k 50, top-p
                                           0.95, T 0.8, 64 tokens) from the prompt (``anchor_source``;
                                           ``chosen`` continues half the chosen response, the paper's
                                           text); ``ti_preset="official"`` = the code's values;
                                           ``ti_attribution_target`` top_logit (released) /
                                           sequence_logp / log_ratio; ``ti_shared_forward``: the
                                           attribution and the anchors' prompt cache read the loss's
                                           forwards when dropout is off
    ``beta``                    0.1        inverse temperature β of every loss (> 0)
    ``alpha``                   0.5        TDPO2 / token-level TIS-DPO KL weight α (≥ 0)
    ``label_smoothing``         0.0        conservative DPO ε in [0, 0.5) (``dpo`` only)
    ``token_level``             False      TIS-DPO: add the weighted KL branch (needs reference logits)
    ``kl_form``                 released   TIS-DPO KL form: ``released`` / ``paper_tdpo1`` / ``paper_tdpo2``
    ``max_length``              512        prompt + response tokens per sequence
    ``max_prompt_length``       None       prompt tokens kept when a pair is too long (< max_length); None:
                                           no separate limit, the prompt makes room for the longer response
    ``truncation_mode``         keep_end   which prompt tokens survive truncation (``keep_start``)
    ``precompute_ref_logps``    False      one reference pass before training; the reference model is
                                           then not needed (losses that need reference logits refuse)
    ``chosen_weights_column``   ...        per-token weight columns (TIS-DPO), one value per response
    ``rejected_weights_column``            token but the final EOS (which gets weight 0)
    ``loss_backend``            None       tidpo op backend: ``auto`` / ``torch`` / ``triton`` (None: env)
    ``disable_dropout``         True       switch off the dropout of the policy and the reference (as TRL
                                           and the released TIS-DPO / TI-DPO code do); adapter dropout
                                           (``lora_dropout``) is kept
    ``fused_lm_head``           True       losses from the last hidden state through the fused LM head
                                           (:class:`tidpo.LMHead`): no ``[2B, T, V]`` logits in memory
    ==========================  =========  ================================================================

    Raises:
        ValueError: an invalid value (the field is named), or a method field set for a loss that does not
            read it.
    """

    loss: str = field(default="dpo", metadata=_help(loss_help(), choices=LOSS_REGISTRY))
    beta: float = field(default=0.1, metadata=_help("inverse temperature beta of the preference loss (> 0)"))
    alpha: float = field(default=0.5, metadata=_help(
        "weight alpha of the sequential KL term: TDPO2 and token-level TIS-DPO (>= 0)"))
    label_smoothing: float = field(default=0.0, metadata=_help(
        "conservative-DPO label smoothing epsilon in [0, 0.5) (loss=dpo only)"))
    token_level: bool = field(default=False, metadata=_help(
        "TIS-DPO: add the released weighted KL(pi||ref) branch (needs the reference's full distribution)"))
    kl_form: str = field(default="released", metadata=_help(
        "TIS-DPO KL form with token_level: released | paper_tdpo1 | paper_tdpo2", choices=KL_FORMS))
    max_length: int = field(default=512, metadata=_help("maximum prompt + response tokens per sequence"))
    max_prompt_length: int | None = field(default=None, metadata=_help(
        "prompt tokens kept when prompt + response exceed max_length (must be < max_length); default: no separate "
        "limit, the prompt is cut to leave room for the longer response"))
    truncation_mode: str = field(default="keep_end", metadata=_help(
        "which prompt tokens truncation keeps: keep_end (the last, TRL's default) | keep_start",
        choices=TRUNCATION_MODES))
    precompute_ref_logps: bool = field(default=False, metadata=_help(
        "compute the reference per-token log-probs once before training instead of every step "
        "(dpo / ipo / hinge / tis_dpo without token_level)"))
    chosen_weights_column: str = field(default="chosen_weights", metadata=_help(
        "dataset column with the chosen response's per-token weights (TIS-DPO)"))
    rejected_weights_column: str = field(default="rejected_weights", metadata=_help(
        "dataset column with the rejected response's per-token weights (TIS-DPO)"))
    loss_backend: str | None = field(default=None, metadata=_help(
        "tidpo op backend: auto | torch | triton (default: $TIDPO_BACKEND, else auto)",
        choices=("auto", "torch", "triton")))
    gamma: float = field(default=0.1, metadata=_help(
        "TI-DPO triplet-loss weight gamma (paper 0.1; 0 disables anchors)"))
    triplet_margin: float = field(default=1e-3, metadata=_help("TI-DPO triplet margin alpha_trp (official code 1e-3)"))
    ti_lambda: float = field(default=0.7, metadata=_help(
        "TI-DPO mix lambda of gradient importance vs the Gaussian prior (paper 0.7, official code 0.2)"))
    prior_sigma_div: float = field(default=4.0, metadata=_help(
        "TI-DPO prior width: sigma = n / prior_sigma_div (paper 4, official code 8)"))
    ti_importance: str = field(default="gradient", metadata=_help(
        "TI-DPO token importance: gradient (the method) | uniform (all weights 1) | random (U(0,1) scores "
        "rescaled to mean 1): the paper's Table 2 ablations; uniform and random skip the attribution",
        choices=IMPORTANCES))
    ti_attribution_target: str = field(default="top_logit", metadata=_help(
        "TI-DPO: the scalar whose input-embedding gradient is the token importance: top_logit (the released "
        "method: the top logit at the last position) | sequence_logp (sum_t log pi(y_t)) | log_ratio "
        "(sum_t log pi(y_t) - log pi_ref(y_t), policy and reference reading each token's embedding plus one "
        "shared shift)", choices=TARGETS))
    ti_shared_forward: bool = field(default=True, metadata=_help(
        "TI-DPO: take the attribution gradient from the loss's own policy forward (embeddings as autograd "
        "leaves, graph retained) when that forward is deterministic (no dropout active, no reentrant gradient "
        "checkpointing), and, under the same condition, the anchors' prompt keys/values from the loss's policy "
        "and reference forwards (no prefill; the anchor is scored from the prompt's last token on; not under "
        "any gradient checkpointing, which turns the cache off); --no-ti-shared-forward keeps the separate "
        "eval-mode attribution pass and runs the anchors' prompts anew (less memory: the graph down to the "
        "embeddings is not kept)"))
    importance_scope: str = field(default="response", metadata=_help(
        "TI-DPO weights over the response tokens (paper) | over the whole sequence (official code: sequence)",
        choices=SCOPES))
    kl_coef: float = field(default=0.0, metadata=_help(
        "TI-DPO extra kl_coef * (KL_w + KL_l) / 2 term (code default 0)"))
    anchor_max_new_tokens: int = field(default=64, metadata=_help("TI-DPO anchor: most sampled tokens"))
    anchor_top_k: int = field(default=50, metadata=_help("TI-DPO anchor sampling top_k"))
    anchor_top_p: float = field(default=0.95, metadata=_help("TI-DPO anchor sampling top_p"))
    anchor_temperature: float = field(default=0.8, metadata=_help("TI-DPO anchor sampling temperature"))
    anchor_source: str = field(default="prompt", metadata=_help(
        "TI-DPO anchor context: prompt (official code) | chosen (paper text: continue from the first "
        "anchor_chosen_fraction of the chosen response)", choices=ANCHOR_SOURCES))
    anchor_chosen_fraction: float = field(default=0.5, metadata=_help(
        "TI-DPO anchor_source=chosen: fraction f in [0, 1) of the chosen response kept as the context, "
        "k = floor(f * (n - 1)) of its n tokens"))
    ti_preset: str | None = field(default=None, metadata=_help(
        "official: use the official TI-DPO code's values (beta 0.2, gamma 1e-3, triplet margin 1e-3, lambda 0.2, "
        "sigma = n/8, whole-sequence importance) instead of the paper's defaults; overrides those fields",
        choices=("official",)))
    disable_dropout: bool = field(default=True, metadata=_help(
        "dropout of the policy and the reference model: off by default (--disable-dropout: nn.Dropout modules and "
        "the attention dropout models apply from their config, as TRL and the released TIS-DPO / TI-DPO code "
        "do), kept with --no-disable-dropout; LoRA's own lora_dropout is kept either way (set it to 0 for a "
        "dropout-free policy); saved configs keep their dropout values"))
    fused_lm_head: bool = field(default=True, metadata=_help(
        "run the backbone to its last hidden state and every loss through tidpo's fused LM head (the logits "
        "[2B, T, V] of the policy and the reference are never in memory); --no-fused-lm-head computes the "
        "model's logits as usual"))
    remove_unused_columns: bool = field(default=False, metadata=_help(
        "kept False: the preference collator reads every tokenised column"))

    def _check_training_loop(self) -> None:
        """The Trainer's loop settings, which transformers accepts when zero or negative (a negative max_steps
        silently trains for num_train_epochs, zero accumulation steps fail mid-run with a ZeroDivisionError)."""
        if self.max_steps != -1 and (isinstance(self.max_steps, bool) or not isinstance(self.max_steps, int)
                                     or self.max_steps < 1):
            raise ValueError(f"max_steps must be a positive integer or -1 (train for num_train_epochs), "
                             f"got {self.max_steps!r}")
        if self.max_steps == -1:
            check_number(self.num_train_epochs, "num_train_epochs", low=0.0, low_open=True)
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
            check_int(getattr(self, name), name, low=1)
        for name in ("logging_steps", "save_steps", "eval_steps"):
            if getattr(self, name) is not None:  # an int >= 1, or a float in (0, 1): a share of the run
                check_number(getattr(self, name), name, low=0.0, low_open=True)

    def __post_init__(self):
        if not self.use_cpu and not _accelerator_available():
            # Without an accelerator the run is on the CPU anyway; saying so lets --bf16 (CPU autocast) work
            # instead of failing with "You need to assign use_cpu".
            self.use_cpu = True
        super().__post_init__()
        if self.dataloader_pin_memory and (self.use_cpu or not torch.cuda.is_available()):
            # Pinned memory only helps host-to-accelerator copies; without one the DataLoader warns per run.
            self.dataloader_pin_memory = False
        self._check_training_loop()
        check_choice(self.loss, "loss", tuple(LOSS_REGISTRY))
        if self.ti_preset is not None:
            check_choice(self.ti_preset, "ti_preset", ("official",))
        check_choice(self.importance_scope, "importance_scope", SCOPES)
        check_choice(self.ti_importance, "ti_importance", IMPORTANCES)
        check_choice(self.ti_attribution_target, "ti_attribution_target", TARGETS)
        for name in ("gamma", "triplet_margin", "kl_coef"):
            check_non_negative(getattr(self, name), name)
        check_number(self.ti_lambda, "ti_lambda", low=0.0, high=1.0)
        check_positive(self.prior_sigma_div, "prior_sigma_div")
        check_number(self.anchor_top_p, "anchor_top_p", low=0.0, low_open=True, high=1.0)
        check_positive(self.anchor_temperature, "anchor_temperature")
        check_choice(self.anchor_source, "anchor_source", ANCHOR_SOURCES)
        check_number(self.anchor_chosen_fraction, "anchor_chosen_fraction", low=0.0, high=1.0, high_open=True)
        for name in ("anchor_max_new_tokens", "anchor_top_k"):
            check_int(getattr(self, name), name, low=1)
        check_choice(self.truncation_mode, "truncation_mode", TRUNCATION_MODES)
        check_choice(self.kl_form, "kl_form", KL_FORMS)
        if self.loss_backend is not None:
            check_choice(self.loss_backend, "loss_backend", ("auto", "torch", "triton"))
        check_positive(self.beta, "beta")
        check_non_negative(self.alpha, "alpha")
        check_number(self.label_smoothing, "label_smoothing", low=0.0, high=0.5, high_open=True)
        if self.kl_form != "released" and not self.token_level:
            raise ValueError(f"kl_form={self.kl_form!r} selects a KL term: it needs token_level=True")
        check_int(self.max_length, "max_length", low=1)
        if self.max_prompt_length is not None:
            check_int(self.max_prompt_length, "max_prompt_length", low=1)
            if self.max_prompt_length >= self.max_length:
                raise ValueError(f"max_prompt_length ({self.max_prompt_length}) must be smaller than max_length "
                                 f"({self.max_length}) so that some response tokens survive truncation (or leave it "
                                 "unset: no separate prompt limit)")
        if self.precompute_ref_logps and self.reference_need == REFERENCE_NONE:
            raise ValueError(f"precompute_ref_logps: loss={self.loss!r} uses no reference model")
        if self.precompute_ref_logps and self.reference_need == REFERENCE_LOGITS:
            raise ValueError(f"precompute_ref_logps cannot serve loss={self.loss!r}"
                             f"{' with token_level' if self.token_level else ''}: it needs the reference "
                             "model's full distribution at every step")
        for name in ("disable_dropout", "fused_lm_head"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.remove_unused_columns:
            raise ValueError("remove_unused_columns must be False: the preference collator needs every column")
        for name in ("chosen_weights_column", "rejected_weights_column"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"{name} must be a non-empty column name, got {getattr(self, name)!r}")
        self._check_unread_fields()
        if self.ti_preset is not None:
            for name, value in TI_OFFICIAL_PRESET.items():
                setattr(self, name, value)

    def _check_unread_fields(self) -> None:
        """A method field the loss never reads must keep its default: a set value would be ignored silently. One
        the loss reads only in other settings (``anchor_top_k`` with ``gamma=0``) gets a warning: a sweep may
        set it for every run. A field ``ti_preset`` sets and the user set to something else is a conflict."""
        defaults = {f.name: f.default for f in fields(TokenWeightedDPOConfig)}
        spec = self.loss_spec
        for name in method_fields():
            value = getattr(self, name)
            if value == defaults[name] or spec.reads(name, self):
                continue
            if name in spec.fields:
                warnings.warn(f"{name}={value!r} is not used by loss={self.loss!r} in this setting: it is read only "
                              f"{spec.conditions[name][1]}", UserWarning, stacklevel=4)
                continue
            readers = " / ".join(repr(loss) for loss in readers_of(name))
            raise ValueError(f"{name}={value!r} is not read by loss={self.loss!r}: it applies to loss {readers} only "
                             f"(leave it at its default, {defaults[name]!r})")
        if self.ti_preset is not None:
            for name, preset in TI_OFFICIAL_PRESET.items():
                value = getattr(self, name)
                if value not in (defaults[name], preset):
                    raise ValueError(f"ti_preset={self.ti_preset!r} sets {name}={preset!r}, but {name}={value!r} was "
                                     "given too: drop one of them")

    @property
    def loss_spec(self) -> LossSpec:
        """The chosen loss's entry of :data:`~tidpo.trainer.loss_registry.LOSS_REGISTRY`."""
        return LOSS_REGISTRY[self.loss]

    @property
    def attributes_online(self) -> bool:
        """Whether the loss computes TI-DPO's gradient attribution of the policy at every step."""
        return self.loss_spec.weights == WEIGHTS_ONLINE and self.ti_importance == "gradient"

    @property
    def samples_anchors(self) -> bool:
        """Whether the loss samples TI-DPO's anchors at every step (the triplet term, ``gamma > 0``)."""
        return self.loss == "ti_dpo" and self.gamma > 0

    @property
    def reference_need(self) -> str:
        """What the loss needs from the reference model: ``"none"``, ``"logps"`` or ``"logits"``."""
        return self.loss_spec.reference_need(self)


def _accelerator_available() -> bool:
    """Whether torch sees a CUDA, XPU or MPS device."""
    if torch.cuda.is_available():
        return True
    xpu = getattr(torch, "xpu", None)
    mps = getattr(torch.backends, "mps", None)
    return bool((xpu is not None and xpu.is_available()) or (mps is not None and mps.is_available()))
