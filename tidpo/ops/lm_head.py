"""The LM head as an input: logits ``z = f(h W^T + b)`` that the ops compute chunk by chunk, never whole.

:class:`LMHead` holds a causal LM's output projection (``weight [V, H]``, optional ``bias [V]``) and the logit
transform its model applies after it; :meth:`LMHead.from_model` reads both from a Hugging Face model.
``head(hidden)`` gives :class:`FusedLogits`, which every op and loss takes wherever it takes a logits tensor:
``tidpo.dpo_loss(head(hidden), labels, ...)`` computes what ``tidpo.dpo_loss(model_logits, labels, ...)`` does,
with no ``[N, V]`` tensor in memory (see :mod:`tidpo.ops.fused_head`).

The transform, in the order models apply it (docs/methods.md §0.1):

- ``scale``: ``z = scale * (h W^T + b)``. Cohere / Command-R multiply by ``config.logit_scale``, Falcon-H1 by
  ``config.lm_head_multiplier``, Granite and MiniCPM3 divide by ``config.logits_scaling``, MiniCPM divides the
  hidden state by ``hidden_size / dim_model_base`` (the same thing for a linear head);
- ``softcap``: ``z = softcap * tanh(z / softcap)``, Gemma 2 / 3's ``config.final_logit_softcapping``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

__all__ = ["FusedLogits", "LMHead"]

#: Config fields of logit transforms that :meth:`LMHead.from_model` does not know how to apply: refused.
_UNSUPPORTED_TRANSFORMS = ("logit_softcapping", "output_logits_scaling", "temperature_scaling")


@dataclass(frozen=True)
class LMHead:
    """An LM head ``z = softcap(scale * (h W^T + b))``.

    Args:
        weight: ``[V, H]`` float tensor (the ``nn.Linear`` weight of the head; tied embeddings are fine).
        bias: ``[V]`` or ``None``.
        scale: logit multiplier (1 for most models).
        softcap: final-logit soft-capping value, or ``None``.

    Raises:
        TypeError / ValueError: a weight that is not a 2-D float tensor, a bias of another length or device, a
            non-positive or non-finite ``scale`` / ``softcap``.
    """

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    scale: float = 1.0
    softcap: float | None = None

    def __post_init__(self):
        if not isinstance(self.weight, torch.Tensor) or self.weight.dim() != 2 or not self.weight.is_floating_point():
            raise TypeError(f"weight must be a [V, H] floating-point tensor, got "
                            f"{getattr(self.weight, 'dtype', type(self.weight).__name__)} "
                            f"{tuple(getattr(self.weight, 'shape', ()))}")
        if self.bias is not None:
            if not isinstance(self.bias, torch.Tensor) or tuple(self.bias.shape) != (self.weight.shape[0],):
                raise ValueError(f"bias must be a [V] = [{self.weight.shape[0]}] tensor or None, got "
                                 f"{tuple(getattr(self.bias, 'shape', ()))}")
            if self.bias.device != self.weight.device:
                raise ValueError(f"bias is on {self.bias.device} but weight on {self.weight.device}")
        for name in ("scale", "softcap"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not math.isfinite(value) or value <= 0):
                raise ValueError(f"{name} must be a finite number > 0{' or None' if name == 'softcap' else ''}, "
                                 f"got {value!r}")

    @property
    def vocab_size(self) -> int:
        return self.weight.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.weight.shape[1]

    def __call__(self, hidden: torch.Tensor) -> FusedLogits:
        """The logits of ``hidden`` (``[..., H]``) under this head, as :class:`FusedLogits` (nothing computed yet)."""
        return FusedLogits(hidden, self)

    def detach(self) -> LMHead:
        return replace(self, weight=self.weight.detach(), bias=None if self.bias is None else self.bias.detach())

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The materialised logits ``[..., V]`` (for checks and small cases; the fused ops never call this)."""
        z = torch.nn.functional.linear(hidden, self.weight, self.bias)
        if self.scale != 1.0:
            z = z * self.scale
        if self.softcap is not None:
            z = self.softcap * torch.tanh(z / self.softcap)
        return z

    @classmethod
    def from_model(cls, model: torch.nn.Module) -> LMHead:
        """The head of a Hugging Face causal LM (also inside a PEFT wrapper), with the logit transform its config
        declares.

        Raises:
            ValueError: the output layer is not a plain linear layer (e.g. a LoRA adapter on the head: train
                without the fused head, or without an adapter on ``lm_head``), or the config declares a logit
                transform this class does not apply.
        """
        head = model.get_output_embeddings()
        if head is None or type(head) is not torch.nn.Linear:
            kind = f"{type(head).__module__}.{type(head).__qualname__}"
            raise ValueError(
                f"the model's output layer is {kind}, not a plain nn.Linear (a LoRA adapter on lm_head?): the "
                "fused LM head cannot apply it; turn the fused head off (fused_lm_head=False) or leave lm_head out "
                "of the adapter's target modules")
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        unknown = [name for name in _UNSUPPORTED_TRANSFORMS if getattr(config, name, None) not in (None, 1, 1.0)]
        if unknown:
            raise ValueError(f"the model's config sets {unknown[0]}={getattr(config, unknown[0])!r}, a logit "
                             "transform the fused LM head does not apply; turn it off (fused_lm_head=False)")
        return cls(head.weight, head.bias, scale=_logit_scale(config),
                   softcap=getattr(config, "final_logit_softcapping", None) or None)


def _logit_scale(config) -> float:
    """The multiplier a model applies to its logits, from the config fields its modelling code reads."""
    scale = 1.0
    for name in ("logit_scale", "lm_head_multiplier", "output_multiplier"):
        value = getattr(config, name, None)
        if value is not None:
            scale *= float(value)
    if getattr(config, "logits_scaling", None) is not None:
        # Granite and MiniCPM3 divide by it; HyperCLOVA X multiplies.
        multiply = getattr(config, "model_type", "") == "hyperclovax"
        scale = scale * config.logits_scaling if multiply else scale / config.logits_scaling
    if getattr(config, "dim_model_base", None) is not None and getattr(config, "logits_scaling", None) is None:
        scale *= config.dim_model_base / config.hidden_size  # MiniCPM scales the hidden state before the head
    return scale


class FusedLogits:
    """The logits ``head(hidden)``, never materialised: ``[..., V]`` with ``hidden`` ``[..., H]``.

    It stands in for a logits tensor wherever the ops and losses take one (same leading shape as ``hidden``, vocab
    last) and supports what they do with logits besides computing from them: ``shape``, ``dtype`` (the logits
    dtype the materialised head would give), ``device``, ``dim()``, ``reshape`` of the leading dimensions and
    ``detach()``. ``hidden`` may be a strided view such as ``last_hidden_state[:, :-1]``.
    """

    __slots__ = ("head", "hidden")

    def __init__(self, hidden: torch.Tensor, head: LMHead):
        if not isinstance(hidden, torch.Tensor) or not hidden.is_floating_point() or hidden.dim() < 1:
            raise TypeError(f"hidden must be a floating-point tensor [..., H], got "
                            f"{getattr(hidden, 'dtype', type(hidden).__name__)}")
        if hidden.shape[-1] != head.hidden_size:
            raise ValueError(f"hidden has size {hidden.shape[-1]} in its last dimension but the head's weight is "
                             f"[V, H] = {tuple(head.weight.shape)}")
        if hidden.device != head.weight.device:
            raise ValueError(f"hidden is on {hidden.device} but the head's weight on {head.weight.device}")
        self.hidden, self.head = hidden, head

    @property
    def shape(self) -> torch.Size:
        return torch.Size((*self.hidden.shape[:-1], self.head.vocab_size))

    @property
    def dtype(self) -> torch.dtype:
        return torch.result_type(self.hidden, self.head.weight)

    @property
    def device(self) -> torch.device:
        return self.hidden.device

    @property
    def ndim(self) -> int:
        return self.hidden.dim()

    def dim(self) -> int:
        return self.hidden.dim()

    def is_floating_point(self) -> bool:
        return True

    def reshape(self, *shape) -> FusedLogits:
        shape = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)) else shape
        if not shape or shape[-1] not in (-1, self.head.vocab_size):
            raise ValueError(f"FusedLogits can only be reshaped in its leading dimensions (vocab last), got {shape}")
        return FusedLogits(self.hidden.reshape(*shape[:-1], self.head.hidden_size), self.head)

    def detach(self) -> FusedLogits:
        return FusedLogits(self.hidden.detach(), self.head.detach())

    def __getitem__(self, index) -> FusedLogits:
        """Indexing of the leading dimensions (rows, positions), e.g. ``logits[:B]``; never of the vocabulary."""
        parts = index if isinstance(index, tuple) else (index,)
        if any(part is Ellipsis or part is None for part in parts) or len(parts) >= self.hidden.dim():
            raise IndexError(f"FusedLogits can only be indexed in its leading dimensions (vocab last), got {index!r}")
        return FusedLogits(self.hidden[index], self.head)

    def materialize(self) -> torch.Tensor:
        """The logits as a tensor (for checks and small cases)."""
        return self.head.logits(self.hidden)

    def __repr__(self) -> str:
        return (f"FusedLogits(shape={tuple(self.shape)}, hidden dtype={self.hidden.dtype}, "
                f"scale={self.head.scale}, softcap={self.head.softcap})")
