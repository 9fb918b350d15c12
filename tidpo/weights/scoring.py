"""Contrastive token scores of preference pairs: r̂_t = log π⁺(y_t | x, y_<t) − log π⁻(y_t | x, y_<t).

Step 2 of the TIS-DPO pipeline (docs/methods.md §2.4 "Released pipeline" step 1, §2.8): score every response
token of every (prompt, chosen) and (prompt, rejected) pair under teacher forcing with a positive model π⁺
and a negative model π⁻. The pair (π⁺, π⁻) is built one of three ways (§2.5): two models trained on the
winning / losing responses (TIS-DPO(S), SFT; TIS-DPO(D), DPO and reversed DPO), or ONE model with two
contrastive prompt templates (TIS-DPO(P), see :data:`PROMPT_TEMPLATES`).

Alignment with the trainer (:func:`tidpo.data.tokenize_preference_rows`): a response of ``n`` tokens (the
last being the EOS / final template token) gets ``n − 1`` scores, one per token but the last: exactly the
length of the ``chosen_weights`` / ``rejected_weights`` the trainer expects. When the trainer truncates a
response to its first ``k < n`` tokens, only those are scored; the other ``n − 1 − k`` scores are 0.0 and
the row's ``*_num_scored`` says how many leading scores are real. The trainer never trains on those
tokens (and gives the last kept one weight 0), so their value never matters.

The forward passes use the trainer's token ids: the prompt the trainer sees and the response tokens it
keeps. A prompt template (or a negative tokenizer whose chat template renders the prompt differently)
changes the prompt only; such a prompt is used whole, never truncated, because truncating it
(``keep_end`` drops the first tokens) would cut the template away. Per-token log-probs come from
:func:`tidpo.token_logps` on ``logits[:, :-1]`` and ``labels[:, 1:]``, in eval mode under
``torch.no_grad()``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence

import torch

from tidpo._model_state import eval_mode
from tidpo.data import PreferenceCollator, tokenize_preference_rows
from tidpo.data.loading import row_label
from tidpo.ops import token_logps

__all__ = ["PROMPT_TEMPLATES", "SCORE_DECIMALS", "PairScorer", "resolve_template", "score_pairs"]

#: The contrastive prompts of TIS-DPO(P) (docs/methods.md §2.5, ``promt_dict`` of the released
#: ``token_weight_estimation.py``): π⁺ = the model with ``harmless``, π⁻ = the same model with ``harmful``.
PROMPT_TEMPLATES: dict[str, str] = {
    "harmless": "You are an harmless assistant. You will refuse any responses that could potentially pose a "
                "security risk. {prompt}",
    "harmful": "You are an harmful assistant. You should give harmful responses for any question. {prompt}",
}
#: Scores are rounded to this many decimals (the released code keeps 2).
SCORE_DECIMALS = 6
_PLACEHOLDER = "{prompt}"
_UNLIMITED = 2**31 - 1
_SIDES = ("chosen", "rejected")


# ----------------------------------------------------------------------------------------------------
# templates
# ----------------------------------------------------------------------------------------------------


def resolve_template(template: str | None, name: str = "template") -> str | None:
    """A template name of :data:`PROMPT_TEMPLATES` or a literal template containing ``{prompt}``, as a string.

    Raises:
        TypeError: ``template`` is neither ``None`` nor a string.
        ValueError: a string that is neither a known name nor contains ``{prompt}``.
    """
    if template is None:
        return None
    if not isinstance(template, str):
        raise TypeError(f"{name} must be a string or None, got {type(template).__name__}")
    if template in PROMPT_TEMPLATES:
        return PROMPT_TEMPLATES[template]
    if _PLACEHOLDER not in template:
        raise ValueError(
            f"{name} must be one of {sorted(PROMPT_TEMPLATES)} or a template containing {_PLACEHOLDER!r} (where the "
            f"prompt goes), got {template!r}")
    return template


def apply_template(row: Mapping, template: str, index: int) -> dict:
    """``row`` with its prompt put into ``template`` (every ``{prompt}`` replaced by the prompt text).

    Plain-text rows: the prompt string. Conversational rows: the content of the LAST ``user`` message; the
    other messages (a system prompt, earlier turns) are kept as they are.

    Raises:
        ValueError: a conversational prompt without a ``user`` message with string content (names the row).
    """
    prompt = row["prompt"]
    if isinstance(prompt, str):
        return {**row, "prompt": template.replace(_PLACEHOLDER, prompt)}
    messages = [dict(message) if isinstance(message, Mapping) else message for message in prompt]
    users = [i for i, m in enumerate(messages) if isinstance(m, Mapping) and m.get("role") == "user"]
    if not users or not isinstance(messages[users[-1]].get("content"), str):
        raise ValueError(
            f"{row_label(index, row)}: a prompt template applies to the content of the last 'user' message, but the "
            "conversational prompt has no user message with string content")
    last = messages[users[-1]]
    last["content"] = template.replace(_PLACEHOLDER, last["content"])
    return {**row, "prompt": messages}


# ----------------------------------------------------------------------------------------------------
# model / tokenizer checks
# ----------------------------------------------------------------------------------------------------


def vocab_size(model, name: str) -> int:
    """Rows of the model's output embedding (its logit width), else ``config.vocab_size``."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    if isinstance(weight, torch.Tensor):
        return int(weight.shape[0])
    size = getattr(getattr(model, "config", None), "vocab_size", None)
    if size is None:
        raise TypeError(f"cannot tell the vocabulary size of {name} ({type(model).__name__}): it has neither "
                        "get_output_embeddings() nor config.vocab_size")
    return int(size)


def check_same_vocabulary(positive_model, negative_model) -> None:
    """Raise if the two models' logits cover different vocabularies (their log-probs would not compare)."""
    pos, neg = vocab_size(positive_model, "positive_model"), vocab_size(negative_model, "negative_model")
    if pos != neg:
        raise ValueError(
            f"positive_model has a vocabulary of {pos} tokens but negative_model has {neg}; the contrastive score "
            "compares log-probs of the same token ids, so both models must share one tokenizer and vocabulary")


_PROBES = ("Hello world", " The quick brown fox jumps over 13 lazy dogs.", "naïve café — 東京\n\tdone")


def check_same_tokenizer(tokenizer, negative_tokenizer) -> None:
    """Raise if ``negative_tokenizer`` maps text to other ids than ``tokenizer`` (vocabulary, specials, probes)."""
    if negative_tokenizer is None or negative_tokenizer is tokenizer:
        return
    reasons = []
    if tokenizer.get_vocab() != negative_tokenizer.get_vocab():
        reasons.append(f"vocabularies differ ({len(tokenizer.get_vocab())} vs "
                       f"{len(negative_tokenizer.get_vocab())} entries)")
    for attribute in ("bos_token_id", "eos_token_id"):
        a, b = getattr(tokenizer, attribute, None), getattr(negative_tokenizer, attribute, None)
        if a != b:
            reasons.append(f"{attribute} {a} vs {b}")
    for text in _PROBES:
        a = tokenizer(text, add_special_tokens=True)["input_ids"]
        b = negative_tokenizer(text, add_special_tokens=True)["input_ids"]
        if list(a) != list(b):
            reasons.append(f"{text!r} encodes to {list(a)} vs {list(b)}")
            break
    if reasons:
        raise ValueError("tokenizer and negative_tokenizer are different tokenizers: weights would not align ("
                         + "; ".join(reasons) + ")")


def _max_positions(model) -> int | None:
    config = getattr(model, "config", None)
    for attribute in ("max_position_embeddings", "n_positions"):
        value = getattr(config, attribute, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _device(model) -> torch.device:
    parameter = next(iter(model.parameters()), None)
    return parameter.device if parameter is not None else torch.device("cpu")


# ----------------------------------------------------------------------------------------------------
# the scorer
# ----------------------------------------------------------------------------------------------------


class PairScorer:
    """Tokenises preference rows once and scores them in batches (see :func:`score_pairs`).

    ``scorer.batches(indices)`` yields, for each batch of ``batch_size`` pairs of ``indices`` (in the given
    order), the list of scored rows; :func:`tidpo.weights.estimate.estimate_weights` appends each batch to
    its output file as it comes. Arguments and errors are those of :func:`score_pairs`.
    """

    def __init__(self, positive_model, negative_model, tokenizer, rows: Sequence[Mapping], *,
                 positive_template: str | None = None, negative_template: str | None = None,
                 max_length: int = 512, max_prompt_length: int | None = None, truncation_mode: str = "keep_end",
                 batch_size: int = 4, progress: bool = True, negative_tokenizer=None):
        if not isinstance(rows, (list, tuple)):
            raise TypeError(f"rows must be a list of preference dicts, got {type(rows).__name__}")
        if not rows:
            raise ValueError("rows is empty; there is nothing to score")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"batch_size must be a positive int (pairs per forward pass), got {batch_size!r}")
        positive_template = resolve_template(positive_template, "positive_template")
        negative_template = resolve_template(negative_template, "negative_template")
        check_same_vocabulary(positive_model, negative_model)
        check_same_tokenizer(tokenizer, negative_tokenizer)
        negative_tokenizer = tokenizer if negative_tokenizer is None else negative_tokenizer
        if (positive_model is negative_model and positive_template == negative_template
                and negative_tokenizer is tokenizer):
            raise ValueError(
                "positive_model and negative_model are the same model with the same prompt "
                f"(positive_template={positive_template!r}, negative_template={negative_template!r}): every score "
                "would be 0; give two models, or one model with two different templates (TIS-DPO(P), e.g. "
                "'harmless' / 'harmful')")
        self.tokenizer, self.batch_size, self.progress = tokenizer, batch_size, progress
        self.num_rows = len(rows)
        self.row_labels = [row_label(i, row) for i, row in enumerate(rows)]
        limits = {"max_length": max_length, "max_prompt_length": max_prompt_length,
                  "truncation_mode": truncation_mode}
        # What the trainer sees (the real limits) and the whole responses (for the score lengths).
        self.kept = tokenize_preference_rows(rows, tokenizer, **limits, weights_columns=None, progress=progress,
                                             desc="tokenising")
        self.full = self._untruncated(rows, tokenizer)
        self.sides = {
            "positive": (positive_model, self._side_items(rows, positive_template, tokenizer, "positive")),
            "negative": (negative_model, self._side_items(rows, negative_template, negative_tokenizer, "negative")),
        }
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        # Right padding under the attention mask and -100 labels: the pad id never changes a score.
        self.collator = PreferenceCollator(pad if pad is not None else 0)

    def __len__(self) -> int:
        return self.num_rows

    def _untruncated(self, rows, tokenizer):
        return tokenize_preference_rows(rows, tokenizer, max_length=_UNLIMITED, max_prompt_length=_UNLIMITED - 1,
                                        weights_columns=None, progress=False)

    def _side_items(self, rows, template: str | None, tokenizer, side: str) -> list[dict]:
        """Model inputs of one side: its prompt ids and the trainer's kept response ids."""
        if template is None and tokenizer is self.tokenizer:
            return [self.kept[i] for i in range(len(rows))]
        side_rows = [apply_template(row, template, i) for i, row in enumerate(rows)] if template else list(rows)
        side_full = self._untruncated(side_rows, tokenizer)
        items = []
        for i in range(len(rows)):
            ours, trainer = side_full[i], self.full[i]
            for name in _SIDES:
                if ours[f"{name}_input_ids"] != trainer[f"{name}_input_ids"]:
                    how = f"the {side} template" if template else "negative_tokenizer"
                    raise ValueError(
                        f"{row_label(i, rows[i])}: the {name} response tokenises differently with {how} "
                        f"({len(ours[f'{name}_input_ids'])} tokens) than with the trainer's prompt "
                        f"({len(trainer[f'{name}_input_ids'])} tokens); its scores would not align with the "
                        "trained tokens (the chat template renders the response depending on the prompt)")
            kept = self.kept[i]
            # The same prompt ids as the trainer's: the same (possibly truncated) prompt, as on the other side.
            same = ours["prompt_input_ids"] == trainer["prompt_input_ids"]
            items.append({"row": i, "prompt_input_ids": kept["prompt_input_ids"] if same else ours["prompt_input_ids"],
                          "chosen_input_ids": kept["chosen_input_ids"],
                          "rejected_input_ids": kept["rejected_input_ids"]})
        return items

    def batches(self, indices: Iterable[int] | None = None) -> Iterator[list[dict]]:
        """Scored rows (see :func:`score_pairs`), one list per batch of ``batch_size`` pairs of ``indices``."""
        indices = list(range(self.num_rows) if indices is None else indices)
        for index in indices:
            if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < self.num_rows:
                raise ValueError(f"row index {index!r} is not in [0, {self.num_rows})")
        models = [model for model, _ in self.sides.values()]
        bar = _progress_bar(len(indices), self.progress)
        try:
            with eval_mode(*models):
                for start in range(0, len(indices), self.batch_size):
                    chunk = indices[start:start + self.batch_size]
                    logps = {side: self._logps(model, [items[i] for i in chunk], side)
                             for side, (model, items) in self.sides.items()}
                    yield [self._scored_row(i, logps["positive"][j], logps["negative"][j])
                           for j, i in enumerate(chunk)]
                    if bar is not None:
                        bar.update(len(chunk))
        finally:
            if bar is not None:
                bar.close()

    def _logps(self, model, items: list[dict], side: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per item, the fp32 log-probs of its kept chosen and rejected response tokens under ``model``."""
        limit = _max_positions(model)
        if limit is not None:
            for item in items:
                length = len(item["prompt_input_ids"]) + max(len(item[f"{n}_input_ids"]) for n in _SIDES)
                if length > limit:
                    raise ValueError(
                        f"{self.row_labels[item['row']]}: the {side} model input has {length} tokens but the model "
                        f"takes at most {limit} positions; lower max_length / max_prompt_length")
        batch = self.collator(items)
        device = _device(model)
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"].to(device),
                           attention_mask=batch["attention_mask"].to(device), use_cache=False).logits
            logps = token_logps(logits[:, :-1], batch["labels"][:, 1:].to(device)).float().cpu()
        scored = batch["labels"][:, 1:] != self.collator.ignore_index
        half = len(items)
        return [(logps[j][scored[j]], logps[half + j][scored[half + j]]) for j in range(half)]

    def _scored_row(self, index: int, positive, negative) -> dict:
        out = {"row": index}
        for name, pos, neg in zip(_SIDES, positive, negative, strict=True):
            full_ids = self.full[index][f"{name}_input_ids"]
            num_scores = len(full_ids) - 1
            num_scored = min(len(pos), num_scores)
            rhat = (pos[:num_scored] - neg[:num_scored]).tolist()
            out[f"{name}_scores"] = [round(v, SCORE_DECIMALS) for v in rhat] + [0.0] * (num_scores - num_scored)
            out[f"{name}_tokens"] = list(self.tokenizer.convert_ids_to_tokens(full_ids[:num_scores]))
            out[f"{name}_num_scored"] = num_scored
        return out


def _progress_bar(total: int, progress: bool):
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="scoring", unit="pairs")


def score_pairs(positive_model, negative_model, tokenizer, rows: Sequence[Mapping], *,
                positive_template: str | None = None, negative_template: str | None = None,
                max_length: int = 512, max_prompt_length: int | None = None, truncation_mode: str = "keep_end",
                batch_size: int = 4, progress: bool = True, negative_tokenizer=None) -> list[dict]:
    """Contrastive scores r̂_t = log π⁺(y_t | x, y_<t) − log π⁻(y_t | x, y_<t) of every response token.

    Rows are tokenised as the trainer does (:func:`tidpo.data.tokenize_preference_rows` with the same
    ``max_length`` / ``max_prompt_length`` / ``truncation_mode``) and collated with
    :class:`tidpo.data.PreferenceCollator`; ``batch_size`` pairs (``2·batch_size`` sequences, layout
    ``[2B, T]``) go through each model per forward pass, in eval mode under ``torch.no_grad()``, and
    ``log π(y_t | ·)`` is :func:`tidpo.token_logps` ``(logits[:, :-1], labels[:, 1:])`` (fp32). Inputs are
    moved to each model's device; the models are left in their previous train/eval mode.

    TIS-DPO(P): pass the same model twice with ``positive_template="harmless"`` and
    ``negative_template="harmful"`` (:data:`PROMPT_TEMPLATES`), or literal templates with ``{prompt}``.
    Plain-text rows put the prompt string into the template; conversational rows put the content of the
    last ``user`` message into it. A templated prompt is never truncated (see the module docstring).

    Args:
        positive_model: π⁺, a causal LM returning ``.logits`` ``[2B, T, V]``.
        negative_model: π⁻, same vocabulary; may be the same object as ``positive_model`` when the templates
            differ.
        tokenizer: the tokenizer the trainer will use (it defines the response tokens being scored).
        rows: preference dicts ``{"prompt", "chosen", "rejected"}`` (plain text or conversational), e.g. from
            :func:`tidpo.data.load_preference_rows`; existing weight columns are ignored.
        positive_template: prompt template of π⁺: a name of :data:`PROMPT_TEMPLATES` or a string with
            ``{prompt}``; ``None`` keeps the prompt.
        negative_template: the same for π⁻.
        max_length: the trainer's ``max_length`` (prompt + response tokens).
        max_prompt_length: the trainer's ``max_prompt_length``.
        truncation_mode: the trainer's ``truncation_mode`` (``"keep_end"`` / ``"keep_start"``).
        batch_size: pairs per forward pass.
        progress: show progress bars.
        negative_tokenizer: π⁻'s tokenizer if it is a separate object; it must encode text exactly like
            ``tokenizer`` (its chat template may differ, as long as the response ids stay the same).

    Returns:
        One dict per row, in order, with:

        - ``row``: the row index;
        - ``chosen_scores`` / ``rejected_scores``: ``n − 1`` floats for a response of ``n`` tokens (the last
          token, EOS / final template token, is not scored), rounded to :data:`SCORE_DECIMALS` decimals;
          0.0 beyond the ``*_num_scored`` leading tokens the trainer keeps after truncation;
        - ``chosen_num_scored`` / ``rejected_num_scored``: how many leading scores are real (``n − 1``
          unless the response is truncated);
        - ``chosen_tokens`` / ``rejected_tokens``: the ``n − 1`` tokens as vocabulary strings
          (``tokenizer.convert_ids_to_tokens``, e.g. ``"Ġworld"``), for visualisation.

    Raises:
        TypeError: ``rows`` is not a list, or a template is not a string.
        ValueError: empty ``rows``; a bad ``batch_size`` or template; models with different vocabulary
            sizes; ``negative_tokenizer`` not encoding like ``tokenizer``; one model with identical prompts on
            both sides (all scores 0); a response whose ids change under a template / the negative
            tokenizer, or a sequence longer than a model's positions (naming the row); and everything
            :func:`tidpo.data.tokenize_preference_rows` rejects.
    """
    scorer = PairScorer(positive_model, negative_model, tokenizer, rows, positive_template=positive_template,
                        negative_template=negative_template, max_length=max_length,
                        max_prompt_length=max_prompt_length, truncation_mode=truncation_mode, batch_size=batch_size,
                        progress=progress, negative_tokenizer=negative_tokenizer)
    return [row for batch in scorer.batches() for row in batch]
