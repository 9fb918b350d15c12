"""Model state: the temporary eval mode of the no-dropout passes, and switching dropout off for good."""

from __future__ import annotations

import contextlib
import numbers

from torch import nn


@contextlib.contextmanager
def eval_mode(*models: nn.Module):
    """Put the models in eval mode (no dropout), restoring each one's training flag afterwards."""
    unique = list({id(m): m for m in models}.values())
    modes = [m.training for m in unique]
    try:
        for model in unique:
            model.eval()
        yield
    finally:
        for model, mode in zip(unique, modes, strict=True):
            model.train(mode)


def _is_dropout_name(name: str) -> bool:
    """Attribute names models use for a dropout probability (``attention_dropout``, ``attn_pdrop``, ...)."""
    name = name.lower()
    return "dropout" in name or name.endswith("pdrop")


def _is_probability(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and value != 0


def _adapter_owned_modules(model: nn.Module) -> set[int]:
    """``id()`` of the PEFT adapter layers and their sub-modules, their wrapped base layers excluded."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # peft is a dependency; without it there are no adapters
        return set()
    owned: set[int] = set()
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            base = {id(m) for m in module.get_base_layer().modules()}
            owned.update(id(m) for m in module.modules() if id(m) not in base)
    return owned


def _zero_config_dropouts(config, seen: set[int]) -> None:
    """Set every dropout probability of a ``transformers`` config (and its sub-configs) to 0."""
    from transformers import PretrainedConfig

    if id(config) in seen:
        return
    seen.add(id(config))
    for name, value in list(vars(config).items()):
        if isinstance(value, PretrainedConfig):
            _zero_config_dropouts(value, seen)
        elif _is_dropout_name(name) and _is_probability(value):
            setattr(config, name, 0.0)


def disable_dropout(model: nn.Module) -> list[tuple[str, float]]:
    """Switch off every dropout ``model`` applies, in train mode too, except the dropout of PEFT adapters.

    Models apply dropout two ways, and both are switched off: ``nn.Dropout`` modules (their ``p`` is set to
    0), and probabilities read at forward time and passed to a functional dropout, e.g. the
    ``attention_dropout`` that Llama / Qwen attention layers copy from their config and hand to the
    attention kernel in train mode (every numeric module attribute and config field named ``*dropout*`` or
    ``*pdrop`` is set to 0, sub-configs included).

    Adapter dropout (PEFT's ``lora_dropout``) is a setting of the adapter the user chose explicitly; it is
    kept, and returned so that the caller can say so.

    Returns:
        ``[(module name, p)]`` of the adapter dropouts left on (``p > 0``).
    """
    from transformers import PretrainedConfig

    adapter = _adapter_owned_modules(model)
    kept, seen_configs = [], set()
    for name, module in model.named_modules():
        if id(module) in adapter:
            if isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0:
                kept.append((name, float(module.p)))
            continue
        if isinstance(module, nn.modules.dropout._DropoutNd):
            module.p = 0.0
        for attr, value in list(vars(module).items()):
            if isinstance(value, PretrainedConfig):
                _zero_config_dropouts(value, seen_configs)
            elif _is_dropout_name(attr) and _is_probability(value):
                setattr(module, attr, 0.0)
    return kept
