"""Models for the trainer: loading a local Hugging Face folder, and wrapping a policy with LoRA adapters (PEFT)."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from tidpo._validation import check_int, check_number

#: The dtypes a model can be loaded in, by name (``--dtype``).
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def with_pad_token(tokenizer, name: str):
    """``tokenizer`` with a pad token (its EOS when it has none), which the collator needs."""
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"the tokenizer of {name!r} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_local_model(path, dtype: torch.dtype = torch.float32):
    """``(model, tokenizer)`` from a local Hugging Face folder (nothing is downloaded); the tokenizer has a pad
    token.

    Raises:
        FileNotFoundError: ``path`` is not a folder.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"model {str(path)!r} is not a local folder (nothing is downloaded here); give a "
                                "Hugging Face model folder")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    return model, with_pad_token(tokenizer, str(path))


def apply_lora(model: nn.Module, *, r: int = 16, alpha: int = 32, dropout: float = 0.0,
               target_modules: Sequence[str] = ("all-linear",), last_layers: int | None = None) -> nn.Module:
    """Wrap ``model`` with fresh LoRA adapters (PEFT ``get_peft_model``); only they train.

    Args:
        r, alpha, dropout: LoRA rank, scaling (the update is scaled by ``alpha / r``) and input dropout.
        target_modules: module names that get adapters, or ``("all-linear",)``: every linear layer but the head.
        last_layers: adapters only in the last N transformer blocks (PEFT ``layers_to_transform``): the backward
            pass then stops at the lowest adapted block.

    Raises:
        ValueError: an invalid value, or ``last_layers`` larger than the model's number of blocks.
    """
    from peft import LoraConfig, get_peft_model
    from transformers.pytorch_utils import Conv1D

    check_int(r, "r", low=1)
    check_int(alpha, "alpha", low=1)
    check_number(dropout, "dropout", low=0.0, high=1.0, high_open=True)
    targets = list(target_modules)
    target = targets[0] if targets == ["all-linear"] else targets
    # GPT-2 style Conv1D layers store their weight transposed; PEFT needs to be told.
    fan_in_fan_out = any(isinstance(m, Conv1D) for m in model.modules())
    layers = None
    if last_layers is not None:
        check_int(last_layers, "last_layers", low=1)
        num_layers = getattr(model.config, "num_hidden_layers", None)
        if num_layers is None:
            raise ValueError(f"last_layers: {type(model).__name__}'s config has no num_hidden_layers")
        if last_layers > num_layers:
            raise ValueError(f"last_layers ({last_layers}) exceeds the model's {num_layers} layers")
        layers = list(range(num_layers - last_layers, num_layers))
        if target == "all-linear":  # PEFT takes a layer subset only with explicit module names
            target = linear_module_names(model)
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target, task_type="CAUSAL_LM",
                        fan_in_fan_out=fan_in_fan_out, layers_to_transform=layers)
    with warnings.catch_warnings():
        # PEFT reads transformers' deprecated is_gradient_checkpointing: a FutureWarning on every run that the
        # user can do nothing about.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, config)


def linear_module_names(model: nn.Module) -> list[str]:
    """Names (last path component) of the model's linear layers, the output head excluded ("all-linear")."""
    from transformers.pytorch_utils import Conv1D

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules()
             if isinstance(module, (nn.Linear, Conv1D)) and module is not head}
    if not names:
        raise ValueError(f"{type(model).__name__} has no linear layers to put LoRA adapters on")
    return sorted(names)
