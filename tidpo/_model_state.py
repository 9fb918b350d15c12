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


def _config_dropouts(config, seen: set[int], out: list) -> None:
    """Append ``(config, name, value)`` for every dropout probability of a config and its sub-configs."""
    from transformers import PretrainedConfig

    if id(config) in seen:
        return
    seen.add(id(config))
    for name, value in list(vars(config).items()):
        if isinstance(value, PretrainedConfig):
            _config_dropouts(value, seen, out)
        elif _is_dropout_name(name) and _is_probability(value):
            out.append((config, name, value))


class ConfigDropout:
    """The dropout probabilities in the ``transformers`` configs of some models (sub-configs included).

    A few models read them from the config at every forward (Falcon, GPT-Neo); zeroing them for good would
    also write zeros into every saved ``config.json``. So they are zeroed only while training
    (:meth:`zeroed`) and put back while a model is saved (:meth:`original`).
    """

    def __init__(self, *models: nn.Module | None):
        self.entries: list[tuple[object, str, float]] = []
        seen: set[int] = set()
        for model in models:
            for module in () if model is None else model.modules():
                config = getattr(module, "config", None)
                if config is not None and hasattr(config, "to_dict"):
                    _config_dropouts(config, seen, self.entries)

    @contextlib.contextmanager
    def zeroed(self):
        """Every recorded probability 0 inside, the user's values after."""
        for config, name, _ in self.entries:
            setattr(config, name, 0.0)
        try:
            yield
        finally:
            for config, name, value in self.entries:
                setattr(config, name, value)

    @contextlib.contextmanager
    def original(self):
        """The user's values inside (for saving), the current ones after."""
        current = [getattr(config, name) for config, name, _ in self.entries]
        for config, name, value in self.entries:
            setattr(config, name, value)
        try:
            yield
        finally:
            for (config, name, _), value in zip(self.entries, current, strict=True):
                setattr(config, name, value)


def disable_dropout(model: nn.Module) -> list[tuple[str, float]]:
    """Switch off the dropout ``model``'s modules apply, in train mode too, except the dropout of PEFT adapters.

    Modules apply dropout two ways, and both are switched off: ``nn.Dropout`` modules (their ``p`` is set to
    0), and probabilities kept as module attributes and passed to a functional dropout at forward time, e.g.
    the ``attention_dropout`` that Llama / Qwen attention layers copy from their config and hand to the
    attention kernel in train mode (every numeric module attribute named ``*dropout*`` or ``*pdrop``). The
    config itself is left alone: :class:`ConfigDropout` zeroes it while training only.

    Adapter dropout (PEFT's ``lora_dropout``) is a setting of the adapter the user chose explicitly; it is
    kept, and returned so that the caller can say so.

    Returns:
        ``[(module name, p)]`` of the adapter dropouts left on (``p > 0``).
    """
    adapter = _adapter_owned_modules(model)
    kept = []
    for name, module in model.named_modules():
        for attr, p in _module_dropouts(module):
            if id(module) not in adapter:
                setattr(module, attr, 0.0)
            elif attr == "p":
                kept.append((name, p))
    return kept


def _module_dropouts(module: nn.Module) -> list[tuple[str, float]]:
    """``[(attribute, p)]`` of the dropout ``module`` applies in train mode (``p > 0``): an ``nn.Dropout``'s ``p``,
    and probabilities kept as module attributes for a functional dropout (``attention_dropout``, ``attn_pdrop``)."""
    found = [("p", float(module.p))] if isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0 else []
    return found + [(attr, value) for attr, value in vars(module).items()
                    if _is_dropout_name(attr) and _is_probability(value)]


def active_dropout(model: nn.Module) -> list[str]:
    """Where ``model`` applies dropout in train mode, as ``"module.attr=p"`` (empty: train mode is deterministic).

    Looks at what :func:`disable_dropout` switches off (``nn.Dropout`` modules, adapter dropout included, and
    probabilities kept as module attributes) and at the configs' probabilities that some models read at
    forward time (:class:`ConfigDropout`).
    """
    found = [f"{name}.{attr}={p:g}" for name, module in model.named_modules() for attr, p in _module_dropouts(module)]
    return found + [f"config.{name}={value:g}" for _, name, value in ConfigDropout(model).entries]
