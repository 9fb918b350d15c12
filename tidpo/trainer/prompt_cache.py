"""The prompt's keys and values from the loss's forward, reused by TI-DPO's anchors (docs/methods.md §3.3).

The loss runs the policy and the reference over ``prompt + chosen`` rows. An anchor is sampled from the
prompt (or from the prompt and a prefix of the chosen response) and then scored by the policy and the
reference. Both would recompute the prompt's keys and values, which the loss's forwards already hold: one
prefill of the generation and most of the scoring forward's tokens. :func:`prefix_cache` cuts each row's
leading tokens out of such a forward's cache; :func:`continuation_inputs` lays out what is left to run.

Only a plain key/value cache (every layer attends to every earlier token) is reused: a sliding-window or
hybrid cache is returned as ``None`` and the caller runs the full forward, which then stays correct.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn
from transformers import DynamicCache


def cache_keyword(model: nn.Module) -> str:
    """The forward / ``generate`` keyword of a ``transformers`` model (unwrapped:
    :func:`tidpo.trainer.fused_head.transformers_model`) that takes a cache: ``cache`` (transformers 5) or the
    older ``past_key_values``."""
    parameters = inspect.signature(model.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def returned_cache(output):
    """The cache a forward returned (``use_cache=True``), or ``None``."""
    # transformers 5 renamed the field; asking an output for the old name logs a warning.
    return output.get("cache" if "cache" in getattr(output, "__dataclass_fields__", {}) else "past_key_values")


def _layers(cache) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """``[(keys, values)]`` per layer (each ``[R, heads, T, head_dim]``) of a plain cache, else ``None``."""
    layers = getattr(cache, "layers", None)
    if layers is not None:  # transformers 5: one object per layer; only the full-attention layer is plain
        if not all(type(layer).__name__ == "DynamicLayer" and layer.keys is not None for layer in layers):
            return None
        return [(layer.keys, layer.values) for layer in layers]
    if type(cache).__name__ == "DynamicCache" and hasattr(cache, "key_cache"):  # transformers 4
        return list(zip(cache.key_cache, cache.value_cache, strict=True))
    return None


def is_plain_cache(cache) -> bool:
    """Whether :func:`prefix_cache` can cut ``cache``: every layer keeps the keys and values of every position."""
    return _layers(cache) is not None


def layer_count(cache) -> int:
    """The number of layers of a plain cache (:func:`is_plain_cache`)."""
    return len(_layers(cache))


def right_aligned(lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Where rows of ``lengths[i]`` leading tokens land when right-aligned in a width ``W = max(lengths)`` (left
    padding): ``[B, W]`` long source column (clamped to 0 on the padding) and bool ``[B, W]``, True on the tokens."""
    width = int(lengths.max())  # one host read: the shape depends on it
    source = torch.arange(width, device=lengths.device)[None, :] - (width - lengths)[:, None]
    return source.clamp(min=0), source >= 0


def prefix_cache(cache, lengths: torch.Tensor, *, graph_from: int | None = None) -> DynamicCache | None:
    """Row ``i``'s first ``lengths[i]`` positions of ``cache``, right-aligned (left padding, zeros).

    Args:
        cache: the cache of a forward over right-padded rows whose first ``len(lengths)`` rows start with the
            wanted tokens (the loss's ``prompt + chosen`` rows); ``None`` is passed through.
        lengths: ``[B]`` long, each ``≤`` the forward's length.
        graph_from: the layers from this index on keep their graph, so that gradients reach the forward that
            made the cache (the policy's scoring of the anchor); the layers below it are detached: no parameter
            that trains lies below it (LoRA on the last blocks), and their backward would be work for nothing.
            ``None``: every layer is detached (generation, the reference).

    Returns:
        A new :class:`transformers.DynamicCache` of width ``W = max(lengths)``: row ``i`` holds its positions
        ``0 .. lengths[i] - 1`` in columns ``W - lengths[i] .. W - 1``; the attention mask of those columns is
        ``arange(W) >= W - lengths[i]``. ``None`` when the cache is not a plain one (see the module doc).
    """
    layers = None if cache is None else _layers(cache)
    if layers is None:
        return None
    source, inside = right_aligned(lengths)
    index, inside = source[:, None, :, None], inside[:, None, :, None]
    out = DynamicCache()
    rows = lengths.shape[0]
    for layer_index, (keys, values) in enumerate(layers):
        gathered = []
        keep_graph = graph_from is not None and layer_index >= graph_from
        for states in (keys, values):
            states = states[:rows] if keep_graph else states[:rows].detach()
            # A model split over devices (device_map) keeps each layer's cache on that layer's device.
            on_device = index.to(states.device)
            picked = states.gather(2, on_device.expand(-1, states.shape[1], -1, states.shape[3]))
            gathered.append(torch.where(inside.to(states.device), picked, 0.0))
        out.update(*gathered, layer_index)
    return out


def left_padding_mask(lengths: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[B, max(lengths)]`` attention mask of a :func:`prefix_cache`: 1 on each row's last ``lengths[i]``
    columns."""
    return right_aligned(lengths)[1].to(dtype)


def continuation_inputs(input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                        start: torch.Tensor, *, pad_token_id: int, ignore_index: int) -> dict[str, torch.Tensor]:
    """Each row's tokens from column ``start[i]`` on, left-aligned, with their absolute positions.

    Args:
        input_ids / attention_mask / labels: ``[B, T]`` right-padded rows (labels not shifted).
        start: ``[B]`` long, the first column to run; the columns before it are in a :func:`prefix_cache` of
            lengths ``start``.

    Returns:
        ``input_ids`` / ``attention_mask`` / ``labels`` ``[B, C]`` (``C`` the longest row's tokens from its
        ``start`` on) and ``position_ids``: ``start[i] + j`` at column ``j``, held at ``T - 1`` where that would
        pass the rows' width ``T`` (padding).
    """
    # As wide as the longest continuation: one short prompt must not widen every row.
    width = int((attention_mask.long().sum(-1) - start).max())
    position = start[:, None] + torch.arange(width, device=start.device)[None, :]
    inside = position < input_ids.shape[1]
    # Columns past the rows' common width are padding (masked); they repeat the last position rather than leave
    # the model's position table.
    position = position.clamp(max=input_ids.shape[1] - 1)
    kept = inside & attention_mask.gather(1, position).bool()
    return {"input_ids": torch.where(kept, input_ids.gather(1, position), torch.full_like(position, pad_token_id)),
            "attention_mask": kept.to(attention_mask.dtype),
            "labels": torch.where(kept, labels.gather(1, position), torch.full_like(position, ignore_index)),
            "position_ids": position}
