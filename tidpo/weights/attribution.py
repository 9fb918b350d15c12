"""TI-DPO online token weights: gradient attribution of the current policy (docs/methods.md §3.1).

For each sequence, with the input embeddings ``e_i`` as autograd leaves and a scalar target ``L`` of the
sequence (:data:`TARGETS`):

    I_i = || dL / de_i ||_1                                  (Eq. 6, raw importance, >= 0)
    W   = mean-1 rescale of  lam * I / sum(I) + (1 - lam) * prior      (Eqs. 7-8, tidpo.weights.ti)

Targets (``ti_attribution_target``):

- ``top_logit`` (the default: the method as published, Eq. 5 and the released code): the largest logit at the
  sequence's last attended position, ``L = max_v z_{t_last, v}``;
- ``sequence_logp``: the response's log-probability under the policy, ``L = sum_t log pi(y_t | y_<t)``;
- ``log_ratio``: the response's log-ratio, ``L = sum_t (log pi(y_t | y_<t) - log pi_ref(y_t | y_<t))``. Both
  models read token ``i`` through its embedding plus one shared shift ``d_i`` (zero in value), and ``I_i`` is
  the gradient w.r.t. ``d_i``: the reference term has a gradient too. With the reference being the policy with
  its adapters disabled, both read the very same embedding leaves; a separate reference model reads its own
  embedding of the token plus the same shift (it needs the policy's hidden size). Were the reference to read
  only its own embeddings, its term would have no gradient to the policy's and the target would collapse to
  ``sequence_logp``.

The sums run over the response tokens (``labels != ignore_index``). The weights are constants for the loss (no
second-order terms). One forward and one backward for the whole batch (sum of the per-row targets: rows do not
interact, so each row's gradient is its own).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from tidpo._model_state import eval_mode
from tidpo._validation import IGNORE_INDEX, check_choice
from tidpo.data.collator import next_token
from tidpo.ops import token_logps
from tidpo.weights.ti import mix_importance

SCOPES = ("response", "sequence")
#: Where the raw importance comes from: the method, and the paper's uniform / random ablations.
IMPORTANCES = ("gradient", "uniform", "random")
#: The scalar whose gradient w.r.t. the input embeddings is the importance (see the module doc).
TARGETS = ("top_logit", "sequence_logp", "log_ratio")

#: ``reference(input_ids, attention_mask, embedding_shift) -> logits``: the reference on its own embeddings of
#: ``input_ids`` plus ``embedding_shift`` ``[R, T, H]`` (zero in value, carrying the gradient to the policy's
#: embedding leaves), with the graph kept (``log_ratio``).
Reference = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def embedding_shift(embeds: torch.Tensor) -> torch.Tensor:
    """A tensor equal to 0 whose gradient w.r.t. ``embeds`` is the identity: what the reference adds to its own
    embeddings so that ``log_ratio``'s reference term differentiates w.r.t. the same leaves as the policy's."""
    return embeds - embeds.detach()


def embedding_leaves(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """``[R, T, H]`` input embeddings that autograd can differentiate with respect to.

    A frozen embedding table gives a fresh leaf; a trained one (full fine-tuning) keeps its graph, so a loss
    computed from the same forward still trains the table (``autograd.grad`` accepts a non-leaf tensor).
    """
    embeds = model.get_input_embeddings()(input_ids)
    return embeds if embeds.requires_grad else embeds.detach().requires_grad_(True)


def model_reference(model: nn.Module) -> Reference:
    """:data:`Reference` of a reference model: its logits on its own embeddings plus the shift (eval mode; the
    caller sets grad mode)."""
    def reference(input_ids: torch.Tensor, attention_mask: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        with eval_mode(model):
            embeds = model.get_input_embeddings()(input_ids) + shift
            return model(inputs_embeds=embeds, attention_mask=attention_mask, use_cache=False).logits
    return reference


def attribution_target(target: str, logits, attention_mask: torch.Tensor, labels: torch.Tensor | None = None, *,
                       ref_logits=None, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """The 0-dim target ``L`` summed over rows (see the module doc), fp32.

    Args:
        target: one of :data:`TARGETS`.
        logits: the policy's ``[R, T, V]`` logits (a tensor or :class:`tidpo.FusedLogits`), position ``t``
            predicting token ``t + 1``.
        attention_mask: ``[R, T]``, right padding (``top_logit`` reads each row's last attended position).
        labels: ``[R, T]`` the collator's (unshifted) labels, ``ignore_index`` outside the response
            (``sequence_logp``, ``log_ratio``).
        ref_logits: the reference's logits, with the graph to the same embedding leaves (``log_ratio``).

    Raises:
        ValueError: unknown ``target``, or ``labels`` / ``ref_logits`` missing for a target that reads them.
    """
    check_choice(target, "target", TARGETS)
    if target == "top_logit":
        # Index of the last attended position: the first position where the running count peaks.
        last = attention_mask.long().cumsum(-1).argmax(-1)
        rows = torch.arange(attention_mask.shape[0], device=attention_mask.device)
        row_logits = logits[rows, last]
        if not isinstance(row_logits, torch.Tensor):  # FusedLogits: R rows through the head, a small [R, V]
            row_logits = row_logits.materialize()
        return row_logits.float().max(-1).values.sum()
    if labels is None:
        raise ValueError(f"target={target!r} needs the labels (the response tokens)")
    if target == "log_ratio" and ref_logits is None:
        raise ValueError("target='log_ratio' needs ref_logits: the reference, differentiable w.r.t. the same "
                         "embedding leaves")
    y = next_token(labels, ignore_index)
    value = token_logps(logits, y, ignore_index).sum()
    if target == "log_ratio":
        value = value - token_logps(ref_logits, y, ignore_index).sum()
    return value


def attribute(logits, embeds: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, target: str,
              labels: torch.Tensor | None = None, reference: Reference | None = None,
              ignore_index: int = IGNORE_INDEX, retain_graph: bool = False):
    """The raw importance ``I`` ``[R, T]`` (fp32, 0 on padding) from a forward already run on ``embeds``.

    Args:
        logits: the policy's logits from ``inputs_embeds=embeds`` (tensor or :class:`tidpo.FusedLogits`).
        embeds: ``[R, T, H]``, differentiable (:func:`embedding_leaves`).
        input_ids / attention_mask / labels / target / reference / ignore_index: as in :func:`token_importance`.
        retain_graph: keep the forward's graph (a loss backpropagates through it afterwards).

    Returns:
        ``(importance, ref_logits)``: ``ref_logits`` the reference's logits with their graph for ``log_ratio``,
        else ``None``.
    """
    if target == "log_ratio" and reference is None:
        raise ValueError("target='log_ratio' needs reference: the reference model (see Reference)")
    ref_logits = (reference(input_ids, attention_mask, embedding_shift(embeds)) if target == "log_ratio"
                  else None)
    value = attribution_target(target, logits, attention_mask, labels, ref_logits=ref_logits,
                               ignore_index=ignore_index)
    (grad,) = torch.autograd.grad(value, embeds, retain_graph=retain_graph)
    # I_i = ||grad_i||_1 (Eq. 6)
    return grad.float().abs().sum(-1) * attention_mask.to(torch.float32), ref_logits


def check_batch(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
    """Shapes of the attributed batch; on CPU also that no row is empty (on an accelerator that would sync)."""
    if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape:
        raise ValueError(f"input_ids and attention_mask must both be [R, T], got {tuple(input_ids.shape)} and "
                         f"{tuple(attention_mask.shape)}")
    if input_ids.device.type == "cpu" and not bool((attention_mask.sum(-1) > 0).all()):
        raise ValueError("attention_mask has a row without any token")


def token_importance(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, *,
                     target: str = "top_logit", labels: torch.Tensor | None = None,
                     reference: Reference | None = None, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Raw gradient-attribution importance ``I`` ``[R, T]`` (fp32, 0 on padding) of each input token.

    The model runs in eval mode (no dropout) for this one forward/backward and is put back in its
    previous mode; gradients are taken with ``torch.autograd.grad`` w.r.t. the embeddings only, so
    no parameter's ``.grad`` is touched.

    Args:
        model: a causal LM with ``get_input_embeddings()`` that accepts ``inputs_embeds``.
        input_ids: ``[R, T]`` token ids; attention_mask: ``[R, T]`` (1 on real tokens; right padding).
        target: the scalar attributed, one of :data:`TARGETS` (module doc).
        labels: ``[R, T]`` unshifted labels, ``ignore_index`` outside the response (``sequence_logp``,
            ``log_ratio``).
        reference: ``reference(input_ids, attention_mask, embedding_shift) -> logits`` (:data:`Reference`;
            ``log_ratio``), e.g. the policy with its adapters disabled, or a separate reference model.

    Raises:
        ValueError: bad shapes, an empty row, an unknown target, or what the target needs is missing.
    """
    check_batch(input_ids, attention_mask)
    check_choice(target, "target", TARGETS)
    if target == "log_ratio" and reference is None:
        raise ValueError("target='log_ratio' needs reference: the reference model (see Reference)")
    with eval_mode(model), torch.enable_grad():
        embeds = model.get_input_embeddings()(input_ids).detach().requires_grad_(True)
        logits = model(inputs_embeds=embeds, attention_mask=attention_mask, use_cache=False).logits
        importance, _ = attribute(logits, embeds, input_ids, attention_mask, target=target, labels=labels,
                                  reference=reference, ignore_index=ignore_index)
    return importance


def ti_dpo_token_weights(model: nn.Module | None, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                         labels: torch.Tensor, *, lam: float = 0.7, sigma_div: float = 4.0,
                         scope: str = "response", ignore_index: int = IGNORE_INDEX, importance: str = "gradient",
                         generator: torch.Generator | None = None, target: str = "top_logit",
                         reference: Reference | None = None, scores: torch.Tensor | None = None) -> torch.Tensor:
    """TI-DPO token weights ``[R, T]`` aligned with the (unshifted) ``labels``; 0 outside the responses.

    ``scope="response"`` (the paper: weights per response): normalisation, prior and mean-1 rescale
    over the response tokens (``labels != ignore_index``). ``scope="sequence"`` (the official code):
    over the whole attended sequence, prompt included, then read at the response positions.

    ``importance`` selects the TI-DPO paper's Table 2 ablations: ``"gradient"`` (the method: attribution of
    ``model``, then the λ-mix with the prior), ``"uniform"`` (every response token weight 1: no attribution,
    no prior) or ``"random"`` (``U(0, 1)`` scores from ``generator``, normalised and rescaled to mean 1 over
    the span like the attribution, without the prior). The last two never run the model.

    ``target`` and ``reference`` choose what the gradient attribution differentiates (:func:`token_importance`).
    ``scores``: the raw importance ``[R, T]`` already computed (e.g. by the trainer, from the forward the loss
    shares); the model is then not run.
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
        if scores is None:
            scores = token_importance(model, input_ids, attention_mask, target=target, labels=labels,
                                      reference=reference, ignore_index=ignore_index)
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
