"""TI-DPO anchors: responses sampled from the current policy, scored for the triplet loss (docs/methods.md §3.3).

Two sources of the generation context (``TokenWeightedDPOConfig.anchor_source``):

- ``"prompt"`` (the official code, the default): the anchor is sampled from the prompt alone. The released
  code's comment says that continuing from the chosen response collapsed the anchor onto it.
- ``"chosen"`` (the paper's text: the anchor uses "y_w as the starting point of the context"): the context is
  the prompt followed by the first ``k = floor(f · (n − 1))`` tokens of the chosen response (``n`` tokens,
  EOS included, ``f = anchor_chosen_fraction``); the anchor response is that prefix plus the sampled
  continuation, so its log-ratio vector lines up index by index with the chosen one. On the shared prefix the
  anchor and the chosen log-ratios coincide and contribute nothing to ``‖d − b‖²``; the triplet term then
  compares the continuation with the rest of the chosen and rejected responses.

:func:`sample_anchors` returns the sequences in the collator's layout (left-aligned, right padding), so the
anchor is scored with the same position ids as the training pairs: a left-padded batch would shift the
absolute positions of models such as GPT-2.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from tidpo._model_state import eval_mode
from tidpo._validation import IGNORE_INDEX, check_int, check_number
from tidpo.trainer.fused_head import transformers_model
from tidpo.trainer.prompt_cache import cache_keyword, right_aligned

ANCHOR_SOURCES = ("prompt", "chosen")


def prompt_lengths(attention_mask: torch.Tensor, labels: torch.Tensor,
                   ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """``[R]`` long: the prompt tokens of each of the collator's rows (its tokens that are not response)."""
    return attention_mask.long().sum(-1) - (labels != ignore_index).sum(-1)


def chosen_prefix_context(input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor, *,
                          num_pairs: int, fraction: float, pad_token_id: int,
                          ignore_index: int = IGNORE_INDEX) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-padded generation contexts ``prompt + chosen[:k]`` from a collated batch (``anchor_source="chosen"``).

    Args:
        input_ids / attention_mask / labels: the collator's ``[2B, T]`` tensors (right padding, labels not
            shifted, ``ignore_index`` on prompt and padding); rows ``[0, num_pairs)`` are the chosen ones.
        num_pairs: ``B``.
        fraction: ``f`` in ``[0, 1)``: ``k = floor(f · (n − 1))`` of the ``n`` chosen tokens are kept, so
            at least the last token (the EOS) is always left to sample.
        pad_token_id: fills the left padding.

    Returns:
        ``context_ids`` / ``context_mask`` ``[B, C]`` (LEFT-padded, ``C`` the longest context) and
        ``prefix_lengths`` ``[B]`` long: ``k`` per row, the trailing context tokens that belong to the response.
    """
    check_number(fraction, "fraction", low=0.0, high=1.0, high_open=True)
    if labels.shape != input_ids.shape or attention_mask.shape != input_ids.shape:
        raise ValueError(f"input_ids, attention_mask and labels must have one shape, got {tuple(input_ids.shape)}, "
                         f"{tuple(attention_mask.shape)} and {tuple(labels.shape)}")
    check_int(num_pairs, "num_pairs", low=1, high=input_ids.shape[0] // 2)
    ids, mask, lab = input_ids[:num_pairs], attention_mask[:num_pairs], labels[:num_pairs]
    response_len = (lab != ignore_index).sum(-1)
    prompt_len = prompt_lengths(mask, lab, ignore_index)
    prefix = torch.floor(fraction * (response_len - 1).clamp(min=0).double()).long()
    context_len = prompt_len + prefix
    # One host read of the widest context: generate() synchronises on every token anyway.
    source, valid = right_aligned(context_len)
    context = torch.where(valid, ids.gather(1, source), torch.full_like(source, pad_token_id))
    return context, valid.to(attention_mask.dtype), prefix


def end_of_turn_ids(model: nn.Module, tokenizer) -> list[int]:
    """The token ids that end a reply: the model's ``generation_config.eos_token_id`` (one id or a list, e.g.
    Llama-3 Instruct's ``<|end_of_text|>`` and ``<|eot_id|>``) and the tokenizer's EOS, without repeats."""
    ids: list[int] = []
    config = getattr(model, "generation_config", None)
    for source in (getattr(config, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        for token in ([] if source is None else [source] if isinstance(source, int) else list(source)):
            if int(token) not in ids:
                ids.append(int(token))
    return ids


def through_first_eos(generated: torch.Tensor, eos_token_id: int | Sequence[int]) -> torch.Tensor:
    """Bool ``[B, G]``: True up to and including each row's first end token (all True without one).

    ``eos_token_id``: one id or several (any of them ends the reply). The tokens ``generate()`` appends after
    a row's first end token are padding; the end token itself belongs to the response.
    """
    ids = torch.as_tensor([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id),
                          device=generated.device, dtype=generated.dtype)
    is_eos = torch.isin(generated, ids).long()
    return is_eos.cumsum(-1) - is_eos == 0


def sample_anchors(model: nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, *, pad_token_id: int,
                   eos_token_id: int | Sequence[int] | None, max_new_tokens: int = 64, top_k: int = 50,
                   top_p: float = 0.95, temperature: float = 0.8, prefix_lengths: torch.Tensor | None = None,
                   ignore_index: int = IGNORE_INDEX, cache=None) -> dict[str, torch.Tensor]:
    """Sample one anchor response per context under ``no_grad`` (eval mode, restored afterwards).

    Args:
        prompt_ids / prompt_mask: ``[B, P]`` LEFT-padded contexts: the collator's ``prompt_input_ids`` /
            ``prompt_attention_mask``, or :func:`chosen_prefix_context`'s output.
        eos_token_id: the id, or ids, that end a reply; ``None``: the model's own (:func:`end_of_turn_ids`).
        prefix_lengths: ``[B]`` long, how many trailing context tokens already belong to the anchor response
            (the chosen prefix); ``None`` = 0 (the anchor is only what is sampled).
        ignore_index: the label of positions outside the anchor response.
        top_k / top_p / temperature / max_new_tokens: the sampling settings (``do_sample=True``).
        cache: the keys and values of every context column but the last, in the contexts' layout (a
            :func:`tidpo.trainer.prompt_cache.prefix_cache` of each row's context length minus one): the
            generation then runs no prefill. It is consumed (``generate`` appends to it).

    Returns:
        ``input_ids`` / ``attention_mask`` / ``labels`` ``[B, P + G]`` in the collator's layout: each row
        starts at column 0 (context, then anchor) and is right-padded with ``pad_token_id``. ``labels`` hold
        the anchor response (the prefix tokens, then the sampled tokens up to and including the first EOS),
        ``ignore_index`` elsewhere (not shifted, like the collator's labels).
    """
    if prompt_ids.dim() != 2 or prompt_mask.shape != prompt_ids.shape:
        raise ValueError(f"prompt_ids and prompt_mask must both be [B, P], got {tuple(prompt_ids.shape)} and "
                         f"{tuple(prompt_mask.shape)}")
    if eos_token_id is None:
        eos_token_id = end_of_turn_ids(model, None)
    given = {}
    if cache is not None:
        if cache.get_seq_length() != prompt_ids.shape[1] - 1:
            raise ValueError(f"cache must hold the contexts' first P - 1 = {prompt_ids.shape[1] - 1} columns, it "
                             f"holds {cache.get_seq_length()}")
        given = {cache_keyword(transformers_model(model)): cache}
    with eval_mode(model), torch.no_grad():
        out = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, do_sample=True, top_k=top_k,
                             top_p=top_p, temperature=temperature, max_new_tokens=max_new_tokens,
                             pad_token_id=pad_token_id, eos_token_id=eos_token_id, **given)
    width = prompt_ids.shape[1]
    generated = out[:, width:]
    keep = torch.ones_like(generated, dtype=torch.bool)
    if eos_token_id:
        keep = through_first_eos(generated, eos_token_id)
    in_prefix = torch.zeros_like(prompt_ids, dtype=torch.bool)
    if prefix_lengths is not None:
        if prefix_lengths.shape != prompt_ids.shape[:1]:
            raise ValueError(f"prefix_lengths must be [B] = [{prompt_ids.shape[0]}], got {tuple(prefix_lengths.shape)}")
        in_prefix = torch.arange(width, device=prompt_ids.device)[None, :] >= width - prefix_lengths[:, None]
    anchor = torch.cat([in_prefix, keep], dim=1)
    labels = torch.where(anchor, out, torch.full_like(out, ignore_index))
    attention_mask = torch.cat([prompt_mask.bool(), keep], dim=1)
    return _left_align(out, attention_mask, labels, pad_token_id, prompt_mask.dtype, ignore_index)


def _left_align(ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor, pad_token_id: int,
                mask_dtype: torch.dtype, ignore_index: int) -> dict[str, torch.Tensor]:
    """Shift each row left by its number of leading pads: left padding -> the collator's right padding."""
    shift = mask.long().argmax(-1, keepdim=True)  # index of the first real token = leading pads per row
    source = torch.arange(ids.shape[1], device=ids.device)[None, :] + shift
    inside = source < ids.shape[1]
    source = source.clamp(max=ids.shape[1] - 1)
    kept = inside & mask.gather(1, source)
    return {"input_ids": torch.where(kept, ids.gather(1, source), torch.full_like(ids, pad_token_id)),
            "attention_mask": kept.to(mask_dtype),
            "labels": torch.where(kept, labels.gather(1, source), torch.full_like(labels, ignore_index))}
