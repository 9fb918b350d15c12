"""Causal LMs whose forward can stop at the last hidden state, so that the losses run through the fused LM head.

:func:`add_fused_lm_head` wraps the ``forward`` of a ``transformers`` causal LM (inside any PEFT wrapper) so that
``model(..., tidpo_fused_lm_head=True)`` runs the backbone only and returns :class:`FusedHeadOutput`, whose
``logits`` are :class:`tidpo.FusedLogits` (the last hidden state under :meth:`tidpo.LMHead.from_model`). Called
through DDP / PEFT wrappers like any forward, so their hooks fire; without the keyword the forward is the
model's own (``generate`` is unchanged). The head is looked up on every call, after PEFT or FSDP replaced modules.

Refused, with a message that says to turn ``fused_lm_head`` off: a LoRA adapter on the head (its output is not a
plain linear layer), a logit transform the head does not know, and a head whose weight is sharded (FSDP2
``DTensor``). Under FSDP1 the root module's parameters, the head's among them, are gathered during its forward,
which is where the op reads them; a trained head (full fine-tuning) is refused there, since the tile recompute in
the backward would read the weight after FSDP has sharded it again.
"""

from __future__ import annotations

import functools
import types
from dataclasses import dataclass

import torch
from transformers.modeling_outputs import ModelOutput

from tidpo.ops.lm_head import FusedLogits, LMHead
from tidpo.trainer.prompt_cache import returned_cache

#: The forward keyword that selects the fused head.
FUSED_KWARG = "tidpo_fused_lm_head"


@dataclass
class FusedHeadOutput(ModelOutput):
    """The backbone's last hidden state ``[R, T, H]`` and the logits it gives, as :class:`tidpo.FusedLogits`.

    The hidden state comes first: wrappers that look for the output's tensors (DDP) find it there.
    """

    last_hidden_state: torch.Tensor | None = None
    logits: FusedLogits | None = None
    #: The backbone's key/value cache when the forward was asked for one (``use_cache=True``).
    cache: object | None = None


def transformers_model(model: torch.nn.Module) -> torch.nn.Module:
    """The ``transformers`` model inside PEFT / DDP / FSDP wrappers."""
    while hasattr(model, "module") and not hasattr(model, "get_output_embeddings"):
        model = model.module  # DDP / FSDP
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else model


def head_of(model: torch.nn.Module) -> LMHead:
    """The model's :class:`~tidpo.LMHead`, refusing what the fused ops cannot compute exactly."""
    head = LMHead.from_model(model)
    if type(head.weight).__name__ == "DTensor":
        raise ValueError("the LM head's weight is sharded (FSDP2 DTensor): the fused LM head does not gather it; "
                         "turn it off (fused_lm_head=False)")
    return head


def add_fused_lm_head(model: torch.nn.Module) -> None:
    """Let ``model(..., tidpo_fused_lm_head=True)`` return :class:`FusedHeadOutput` (idempotent).

    Raises:
        ValueError: the head cannot be fused (see the module doc); the message says to turn the option off.
    """
    inner = transformers_model(model)
    head_of(inner)  # refuse now rather than at the first step
    if getattr(inner, "_tidpo_fused_forward", None) is not None:
        return
    original = inner.forward

    @functools.wraps(type(inner).forward)  # keeps the signature generate() checks its keywords against
    def forward(self, *args, **kwargs):
        if not kwargs.pop(FUSED_KWARG, False):
            return original(*args, **kwargs)
        kwargs.setdefault("use_cache", False)
        for unused in ("labels", "logits_to_keep", "num_items_in_batch"):
            kwargs.pop(unused, None)
        output = self.base_model(*args, **kwargs)
        head = head_of(self)
        # With a device_map the backbone may end on another device than the head.
        hidden = output.last_hidden_state.to(head.weight.device)
        return FusedHeadOutput(last_hidden_state=hidden, logits=head(hidden), cache=returned_cache(output))

    inner.forward = types.MethodType(forward, inner)
    inner._tidpo_fused_forward = forward
