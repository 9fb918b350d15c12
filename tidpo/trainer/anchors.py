"""TI-DPO anchors: responses sampled from the current policy, scored for the triplet loss (METHODS.md §3.3)."""

from __future__ import annotations

import torch
from torch import nn

from tidpo._model_state import eval_mode

IGNORE_INDEX = -100


def sample_anchors(model: nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, *, pad_token_id: int,
                   eos_token_id: int | None, max_new_tokens: int = 64, top_k: int = 50, top_p: float = 0.95,
                   temperature: float = 0.8) -> dict[str, torch.Tensor]:
    """Sample one anchor response per prompt under ``no_grad`` (eval mode, restored afterwards).

    Args:
        prompt_ids / prompt_mask: ``[B, P]`` LEFT-padded prompts (the collator's ``prompt_input_ids``).

    Returns:
        ``input_ids`` / ``attention_mask`` ``[B, P + G]`` (prompt + anchor, the prompt still
        left-padded) and ``labels`` ``[B, P + G]``: the anchor tokens up to and including the first EOS,
        ``-100`` on the prompt and after the anchor ended (not shifted, like the collator's labels).
    """
    with eval_mode(model), torch.no_grad():
        out = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, do_sample=True, top_k=top_k,
                             top_p=top_p, temperature=temperature, max_new_tokens=max_new_tokens,
                             pad_token_id=pad_token_id, eos_token_id=eos_token_id)
    generated = out[:, prompt_ids.shape[1]:]
    keep = torch.ones_like(generated, dtype=torch.bool)
    if eos_token_id is not None:
        # Tokens after the first EOS are padding from generate(); the EOS itself belongs to the anchor.
        ended_before = (generated == eos_token_id).long().cumsum(-1) - (generated == eos_token_id).long()
        keep = ended_before == 0
    labels = torch.cat([torch.full_like(prompt_ids, IGNORE_INDEX),
                        torch.where(keep, generated, torch.full_like(generated, IGNORE_INDEX))], dim=1)
    attention_mask = torch.cat([prompt_mask, keep.to(prompt_mask.dtype)], dim=1)
    return {"input_ids": out, "attention_mask": attention_mask, "labels": labels}
