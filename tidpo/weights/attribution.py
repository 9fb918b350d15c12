"""TI-DPO online token weights: gradient attribution of the current policy (docs/methods.md §3.1).

For each sequence, with input embeddings ``e_i`` as autograd leaves and ``L = max_v logits[t_last, v]``
the top logit at the last valid position (Eq. 5):

    I_i = || dL / de_i ||_1                                  (Eq. 6, raw importance, >= 0)
    W   = mean-1 rescale of  lam * I / sum(I) + (1 - lam) * prior      (Eqs. 7-8, tidpo.weights.ti)

The weights are constants for the loss (no second-order terms). One forward and one backward for the
whole batch (sum of the per-row targets: rows do not interact, so each row's gradient is its own).
"""

from __future__ import annotations

import torch
from torch import nn

from tidpo._model_state import eval_mode
from tidpo._validation import IGNORE_INDEX
from tidpo.weights.ti import mix_importance

SCOPES = ("response", "sequence")
#: Where the raw importance comes from: the method, and the paper's uniform / random ablations.
IMPORTANCES = ("gradient", "uniform", "random")


def token_importance(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Raw gradient-attribution importance ``I`` ``[R, T]`` (fp32, 0 on padding) of each input token.

    The model runs in eval mode (no dropout) for this one forward/backward and is put back in its
    previous mode; gradients are taken with ``torch.autograd.grad`` w.r.t. the embeddings only, so
    no parameter's ``.grad`` is touched.

    Args:
        model: a causal LM with ``get_input_embeddings()`` that accepts ``inputs_embeds``.
        input_ids: ``[R, T]`` token ids; attention_mask: ``[R, T]`` (1 on real tokens; right padding).
    """
    if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape:
        raise ValueError(f"input_ids and attention_mask must both be [R, T], got {tuple(input_ids.shape)} and "
                         f"{tuple(attention_mask.shape)}")
    # A value check reads the tensor: only on CPU (no host sync on an accelerator's training step).
    if input_ids.device.type == "cpu" and not bool((attention_mask.sum(-1) > 0).all()):
        raise ValueError("attention_mask has a row without any token")
    with eval_mode(model), torch.enable_grad():
        embeds = model.get_input_embeddings()(input_ids).detach().requires_grad_(True)
        logits = model(inputs_embeds=embeds, attention_mask=attention_mask, use_cache=False).logits
        # Index of the last attended position: the first position where the running count peaks.
        last = attention_mask.long().cumsum(-1).argmax(-1)
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        target = logits[rows, last].float().max(-1).values.sum()
        (grad,) = torch.autograd.grad(target, embeds)
    return grad.float().abs().sum(-1) * attention_mask.to(torch.float32)


def ti_dpo_token_weights(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                         labels: torch.Tensor, *, lam: float = 0.7, sigma_div: float = 4.0,
                         scope: str = "response", ignore_index: int = IGNORE_INDEX, importance: str = "gradient",
                         generator: torch.Generator | None = None) -> torch.Tensor:
    """TI-DPO token weights ``[R, T]`` aligned with the (unshifted) ``labels``; 0 outside the responses.

    ``scope="response"`` (the paper: weights per response): normalisation, prior and mean-1 rescale
    over the response tokens (``labels != ignore_index``). ``scope="sequence"`` (the official code):
    over the whole attended sequence, prompt included, then read at the response positions.

    ``importance`` selects the TI-DPO paper's Table 2 ablations: ``"gradient"`` (the method: attribution of
    ``model``, then the λ-mix with the prior), ``"uniform"`` (every response token weight 1: no attribution,
    no prior) or ``"random"`` (``U(0, 1)`` scores from ``generator``, normalised and rescaled to mean 1 over
    the span like the attribution, without the prior). The last two never run the model.
    """
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {', '.join(map(repr, SCOPES))}; got {scope!r}")
    if importance not in IMPORTANCES:
        raise ValueError(f"importance must be one of {', '.join(map(repr, IMPORTANCES))}; got {importance!r}")
    response = labels != ignore_index
    span = response if scope == "response" else attention_mask.bool()
    if importance == "uniform":
        return response.to(torch.float32)
    if importance == "random":
        if generator is None:
            scores = torch.rand(labels.shape, device=labels.device)
        else:
            scores = torch.rand(labels.shape, generator=generator, device=generator.device).to(labels.device)
        weights = mix_importance(scores, span, lam=1.0, sigma_div=sigma_div)
    else:
        scores = token_importance(model, input_ids, attention_mask)
        weights = mix_importance(scores, span, lam=lam, sigma_div=sigma_div)
    return torch.where(response, weights, torch.zeros_like(weights)).detach()


def weight_entropy(weights: torch.Tensor, mask: torch.Tensor, *, per_row: bool = False) -> torch.Tensor:
    """Entropy (nats) of ``p = w / sum(w)`` over each row's masked tokens, detached.

    Returns the mean over rows (0-dim), or the ``[rows]`` values with ``per_row=True``.
    """
    w = torch.where(mask, weights.float(), torch.zeros_like(weights, dtype=torch.float32))
    p = w / w.sum(-1, keepdim=True).clamp(min=1e-12)
    h = -(torch.where(p > 0, p * p.clamp(min=1e-12).log(), torch.zeros_like(p))).sum(-1).detach()
    return h if per_row else h.mean()
