"""Tokenising preference rows: token ids, token-weight alignment and truncation.

Token weights follow the official TIS-DPO code (docs/methods.md §2.4, step 4): a row's ``chosen_weights`` hold
one value per chosen-response token **except the last** (for plain-text rows, the appended EOS), and the
last token gets weight 0::

    item["chosen_weights"] = row["chosen_weights"] + [0.0]      # len == len(item["chosen_input_ids"])

Truncation: the prompt first, then the responses. With ``P``, ``C``, ``R`` the prompt, chosen and rejected
lengths and ``L = max_length``:

1. if ``P + max(C, R) > L``: the prompt keeps ``max_prompt_length`` tokens when it is given (the official
   TIS-DPO code and older TRL), else as many as leave room for the longer response, ``max(L - max(C, R), 1)``
   (no separate prompt limit, as in TRL 1.16) — the last ones for ``truncation_mode="keep_end"``, the first
   ones for ``"keep_start"``;
2. if still ``P + max(C, R) > L``: each response keeps its first ``L - P`` tokens. A truncated response
   keeps the weights of its kept tokens, and its last kept token gets weight 0.

How many pairs were cut is reported (a warning on the ``tidpo.data.tokenization`` logger): a long prompt
silently losing most of its tokens is a common surprise.
"""

from __future__ import annotations

import contextlib
import logging
import math
import numbers
from collections.abc import Mapping, Sequence

from tidpo._validation import check_int
from tidpo.data.collator import ALIGNED_BATCH_COLUMNS
from tidpo.data.dataset import PreferenceDataset
from tidpo.data.encoding import encode_chat_batch, encode_plain_batch, is_conversational
from tidpo.data.loading import PREFERENCE_COLUMNS, ROW_ORIGIN, TOKEN_COLUMNS, WEIGHT_COLUMNS, row_label

__all__ = ["tokenize_preference_rows"]

logger = logging.getLogger(__name__)

TRUNCATION_MODES = ("keep_end", "keep_start")
#: Rows tokenised per batched tokenizer call.
_CHUNK_ROWS = 512
#: Smallest number of rows that gets a progress bar.
_PROGRESS_MIN_ROWS = 64


def tokenize_preference_rows(rows: Sequence[Mapping], tokenizer, *, max_length: int = 512,
                             max_prompt_length: int | None = None, truncation_mode: str = "keep_end",
                             weights_columns: tuple[str, str] | None = WEIGHT_COLUMNS,
                             require_weights: bool = False, progress: bool = True,
                             desc: str = "tokenising") -> PreferenceDataset:
    """Tokenise preference rows (see :func:`tidpo.data.load_preference_rows`) into a :class:`PreferenceDataset`.

    Each row gives one item ``{"row", "prompt_input_ids", "chosen_input_ids", "rejected_input_ids"}`` (see
    :mod:`tidpo.data.encoding` for how plain-text and conversational rows are tokenised), plus aligned
    ``chosen_weights`` / ``rejected_weights`` (lists of floats, one per response token, 0 on the last)
    when the row has weights (under these names whatever ``weights_columns`` the row uses).

    Args:
        rows: a list of preference dicts with ``prompt``, ``chosen`` and ``rejected``.
        tokenizer: a Hugging Face tokenizer; plain-text rows need an EOS token, conversational rows a chat
            template.
        max_length: most tokens of ``prompt + response`` after truncation.
        max_prompt_length: prompt tokens kept when a pair is too long (``0 < max_prompt_length < max_length``), or
            ``None`` (the default): no separate limit, the prompt is cut to leave room for the longer response.
        truncation_mode: which prompt tokens are kept: ``"keep_end"`` (the last ones, TRL's default) or
            ``"keep_start"``.
        weights_columns: the row columns holding the chosen / rejected token weights, or ``None`` to ignore
            weights. A row has weights when both columns are present and not ``None``.
        require_weights: raise for a row without weights instead of producing an item without them.
        progress: show a progress bar (for more than a few dozen rows).
        desc: the progress bar's label.

    Raises:
        TypeError: ``rows`` is not a list/tuple of dicts, or an argument has the wrong type.
        ValueError: an invalid argument (named), or a row that cannot be tokenised: missing or empty text,
            tokenizer without EOS / chat template, weights of the wrong length or not finite numbers, only
            one of the two weights columns, weights missing while required, or weights on some rows but not
            on others (the message names the row).
    """
    _check_arguments(rows, max_length, max_prompt_length, truncation_mode, weights_columns, require_weights)
    limits = (max_length, max_prompt_length, truncation_mode)
    items, cut = [], {"prompt": 0, "response": 0}
    with _progress_bar(len(rows), progress, desc) as bar:
        for start in range(0, len(rows), _CHUNK_ROWS):
            indices = range(start, min(start + _CHUNK_ROWS, len(rows)))
            for index, (ids, chat) in zip(indices, _encode_chunk(rows, indices, tokenizer), strict=True):
                weights = _row_weights(rows[index], index, weights_columns, require_weights)
                if weights is not None:
                    _check_weight_tokens(rows[index], index, ids, tokenizer)
                item, prompt_cut, response_cut = _build_item(index, row_label(index, rows[index]), ids, weights, chat,
                                                             limits, weights_columns)
                items.append(item)
                cut["prompt"] += prompt_cut
                cut["response"] += response_cut
            if bar is not None:
                bar.update(len(indices))
    _check_weights_everywhere_or_nowhere(items, rows, weights_columns)
    if cut["prompt"] or cut["response"]:
        logger.warning("%s: %d of %d pairs are longer than max_length=%d: %d prompts and the responses of %d pairs "
                       "were cut (see tidpo.data.tokenization for the rule)", desc, max(cut.values()), len(rows),
                       max_length, cut["prompt"], cut["response"])
    return PreferenceDataset(items)


# ----------------------------------------------------------------------------------------------------
# per row
# ----------------------------------------------------------------------------------------------------


def _encode_chunk(rows: Sequence[Mapping], indices: range, tokenizer):
    """``((prompt_ids, chosen_ids, rejected_ids), is_conversational)`` for each row of ``indices``, in order."""
    plain, chat = [], []
    for index in indices:
        row = rows[index]
        if not isinstance(row, Mapping):
            raise TypeError(f"{row_label(index)} must be a dict, got {type(row).__name__}")
        for column in PREFERENCE_COLUMNS:
            if column not in row:
                found = sorted(c for c in row if c != ROW_ORIGIN)
                raise ValueError(f"{row_label(index, row)} has no {column!r} column (found {found})")
        carried = [column for column in ALIGNED_BATCH_COLUMNS["ref_logps"] if row.get(column) is not None]
        if carried:
            raise ValueError(f"{row_label(index, row)} carries {carried[0]!r}: reference log-probs are aligned to the "
                             "tokens, so they travel only with tokenised pairs (a PreferenceDataset, e.g. from "
                             "precompute_ref_logps); drop the column and let the trainer compute them")
        (chat if is_conversational(row, index) else plain).append(index)
    encoded = dict(zip(plain, encode_plain_batch(tokenizer, [rows[i] for i in plain], plain), strict=True))
    encoded.update(zip(chat, encode_chat_batch(tokenizer, [rows[i] for i in chat], chat), strict=True))
    chat_rows = set(chat)
    return [(encoded[index], index in chat_rows) for index in indices]


def _row_weights(row: Mapping, index: int, weights_columns, require_weights: bool):
    """The row's ``(chosen_weights, rejected_weights)`` as given, or ``None`` when it has none."""
    if weights_columns is None:
        return None
    present = [row.get(column) is not None for column in weights_columns]
    if all(present):
        return tuple(row[column] for column in weights_columns)
    if any(present):
        have, lack = (weights_columns if present[0] else weights_columns[::-1])
        raise ValueError(f"{row_label(index, row)} has {have!r} but no {lack!r}; give both weight columns or neither")
    if require_weights:
        raise ValueError(
            f"{row_label(index, row)} has no token weights ({weights_columns[0]!r} / {weights_columns[1]!r}), which "
            "this loss needs: add the two columns to the data, or give a weights file (tidpo train --weights PATH, "
            "load_preference_rows(data, weights=PATH))")
    return None


def _build_item(index: int, label: str, ids, weights, chat: bool, limits,
                weights_columns) -> tuple[dict, bool, bool]:
    prompt_ids, chosen_ids, rejected_ids = ids
    item = {"row": index, "prompt_input_ids": prompt_ids, "chosen_input_ids": chosen_ids,
            "rejected_input_ids": rejected_ids}
    if weights is not None:
        for column, values, response, name in zip(weights_columns, weights, (chosen_ids, rejected_ids),
                                                  ("chosen", "rejected"), strict=True):
            item[f"{name}_weights"] = _aligned_weights(values, response, label, column, name, chat)
    return _truncate(item, limits, with_weights=weights is not None)


def _check_weight_tokens(row: Mapping, index: int, ids, tokenizer) -> None:
    """A weights file that names its tokens (``chosen_tokens`` / ``rejected_tokens``) must name this tokenizer's:
    equal counts are not enough (another tokenizer, template or text gives other tokens of the same number)."""
    convert = getattr(tokenizer, "convert_ids_to_tokens", None)
    if convert is None:
        return
    for column, response in zip(TOKEN_COLUMNS, ids[1:], strict=True):
        expected = row.get(column)
        if expected is None:
            continue
        ours = list(convert(list(response[:-1])))
        if list(expected) != ours:
            position = next((i for i, (a, b) in enumerate(zip(expected, ours, strict=False)) if a != b),
                            min(len(expected), len(ours)))
            theirs = expected[position] if position < len(expected) else "(end)"
            mine = ours[position] if position < len(ours) else "(end)"
            raise ValueError(f"{row_label(index, row)}: the weights were estimated for other tokens than this "
                             f"tokenizer gives: {column} differs at token {position} ({theirs!r} vs {mine!r}); "
                             "estimate them with the training run's tokenizer, chat template and data")


def _aligned_weights(values, response_ids: list[int], label: str, column: str, name: str,
                     chat: bool) -> list[float]:
    """``values`` (one per response token but the last) followed by 0.0 for the last token."""
    if hasattr(values, "tolist") and not isinstance(values, (list, tuple)):
        values = values.tolist()
    if not isinstance(values, (list, tuple)):
        raise ValueError(f"{label}: {column} must be a list of floats, got {type(values).__name__}")
    expected = len(response_ids) - 1
    if len(values) != expected:
        last = "the final EOS" if not chat else "the final one"
        raise ValueError(
            f"{label}: {column} has {len(values)} values but the {name} response has {len(response_ids)} tokens "
            f"(weights cover every response token but {last}, so {expected} values are expected)")
    for position, value in enumerate(values):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise ValueError(
                f"{label}: {column}[{position}] is {value!r}; token weights must be finite numbers")
    return [float(value) for value in values] + [0.0]


def _truncate(item: dict, limits, *, with_weights: bool) -> tuple[dict, bool, bool]:
    """Apply the prompt-then-response truncation of the module docstring to ``item`` (in place); also say whether
    the prompt and whether a response were cut."""
    max_length, max_prompt_length, truncation_mode = limits
    longest = max(len(item["chosen_input_ids"]), len(item["rejected_input_ids"]))
    prompt = item["prompt_input_ids"]
    if len(prompt) + longest > max_length:
        keep = max(max_length - longest, 1) if max_prompt_length is None else max_prompt_length
        item["prompt_input_ids"] = prompt[-keep:] if truncation_mode == "keep_end" else prompt[:keep]
    prompt_cut = len(item["prompt_input_ids"]) < len(prompt)
    limit = max_length - len(item["prompt_input_ids"])
    response_cut = longest > limit
    if response_cut:
        for name in ("chosen", "rejected"):
            ids_column, weights_column = f"{name}_input_ids", f"{name}_weights"
            if len(item[ids_column]) <= limit:
                continue
            item[ids_column] = item[ids_column][:limit]
            if with_weights:
                item[weights_column] = item[weights_column][:limit]
                item[weights_column][-1] = 0.0
    return item, prompt_cut, response_cut


# ----------------------------------------------------------------------------------------------------
# whole dataset
# ----------------------------------------------------------------------------------------------------


def _check_arguments(rows, max_length, max_prompt_length, truncation_mode, weights_columns, require_weights):
    if not isinstance(rows, (list, tuple)):
        raise TypeError(
            f"rows must be a list of dicts (see tidpo.data.load_preference_rows), got {type(rows).__name__}")
    if not rows:
        raise ValueError("rows is empty; there is nothing to tokenise")
    check_int(max_length, "max_length", low=1)
    if max_prompt_length is not None:
        check_int(max_prompt_length, "max_prompt_length")
        if not 0 < max_prompt_length < max_length:
            raise ValueError(f"max_prompt_length must satisfy 0 < max_prompt_length < max_length ({max_length}), "
                             f"got {max_prompt_length} (or leave it unset: no separate prompt limit)")
    if truncation_mode not in TRUNCATION_MODES:
        raise ValueError(f"truncation_mode must be one of {list(TRUNCATION_MODES)}, got {truncation_mode!r}")
    if weights_columns is not None and (
            not isinstance(weights_columns, (list, tuple)) or len(weights_columns) != 2
            or not all(isinstance(column, str) for column in weights_columns)):
        raise ValueError(
            f"weights_columns must be None or two column names (chosen, rejected), got {weights_columns!r}")
    if require_weights and weights_columns is None:
        raise ValueError("require_weights=True needs weights_columns; it is None")


def _check_weights_everywhere_or_nowhere(items: list[dict], rows: Sequence[Mapping], weights_columns) -> None:
    """Weights on some rows but not others would break batching later; report the first row without them."""
    if weights_columns is None:
        return
    with_weights = ["chosen_weights" in item for item in items]
    if any(with_weights) and not all(with_weights):
        first_with = items[with_weights.index(True)]["row"]
        first_without = items[with_weights.index(False)]["row"]
        raise ValueError(
            f"{row_label(first_without, rows[first_without])} has no token weights but "
            f"{row_label(first_with, rows[first_with])} has; {sum(with_weights)} of {len(items)} rows carry "
            f"{weights_columns[0]!r} / {weights_columns[1]!r}: give weights for every "
            "row or for none (require_weights=True reports each row without weights)")


def _progress_bar(total: int, progress: bool, desc: str):
    if not progress or total < _PROGRESS_MIN_ROWS:
        return contextlib.nullcontext()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="rows")
