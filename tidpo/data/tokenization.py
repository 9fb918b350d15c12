"""Tokenising preference rows: token ids, token-weight alignment and truncation.

Token weights follow the official TIS-DPO code (METHODS.md §2.4, step 4): a row's ``chosen_weights`` hold
one value per chosen-response token **except the last** (for plain-text rows, the appended EOS), and the
last token gets weight 0::

    item["chosen_weights"] = row["chosen_weights"] + [0.0]      # len == len(item["chosen_input_ids"])

Truncation follows TRL and the official TIS-DPO code. With ``P``, ``C``, ``R`` the prompt, chosen and
rejected lengths and ``L = max_length``:

1. if ``P + max(C, R) > L``: keep ``max_prompt_length`` prompt tokens (the last ones for
   ``truncation_mode="keep_end"``, the first ones for ``"keep_start"``);
2. if still ``P + max(C, R) > L``: keep the first ``L - P`` tokens of each response. A truncated response
   keeps the weights of its kept tokens, and its last kept token gets weight 0.
"""

from __future__ import annotations

import contextlib
import math
import numbers
from collections.abc import Mapping, Sequence

from tidpo._validation import check_int
from tidpo.data.collator import ALIGNED_BATCH_COLUMNS
from tidpo.data.dataset import PreferenceDataset
from tidpo.data.encoding import encode_chat_batch, encode_plain_batch, is_conversational
from tidpo.data.loading import PREFERENCE_COLUMNS, WEIGHT_COLUMNS

__all__ = ["tokenize_preference_rows"]

TRUNCATION_MODES = ("keep_end", "keep_start")
#: Rows tokenised per batched tokenizer call.
_CHUNK_ROWS = 512
#: Smallest number of rows that gets a progress bar.
_PROGRESS_MIN_ROWS = 64


def tokenize_preference_rows(rows: Sequence[Mapping], tokenizer, *, max_length: int = 512,
                             max_prompt_length: int = 256, truncation_mode: str = "keep_end",
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
        max_prompt_length: prompt tokens kept when a pair is too long (``0 < max_prompt_length < max_length``).
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
    items = []
    with _progress_bar(len(rows), progress, desc) as bar:
        for start in range(0, len(rows), _CHUNK_ROWS):
            indices = range(start, min(start + _CHUNK_ROWS, len(rows)))
            for index, (ids, chat) in zip(indices, _encode_chunk(rows, indices, tokenizer), strict=True):
                weights = _row_weights(rows[index], index, weights_columns, require_weights)
                items.append(_build_item(index, ids, weights, chat, limits, weights_columns))
            if bar is not None:
                bar.update(len(indices))
    _check_weights_everywhere_or_nowhere(items, weights_columns)
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
            raise TypeError(f"row {index} must be a dict, got {type(row).__name__}")
        for column in PREFERENCE_COLUMNS:
            if column not in row:
                raise ValueError(f"row {index} has no {column!r} column (found {sorted(row)})")
        carried = [column for column in ALIGNED_BATCH_COLUMNS["ref_logps"] if row.get(column) is not None]
        if carried:
            raise ValueError(f"row {index} carries {carried[0]!r}: reference log-probs are aligned to the tokens, so "
                             "they travel only with tokenised pairs (a PreferenceDataset, e.g. from "
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
        raise ValueError(f"row {index} has {have!r} but no {lack!r}; give both weight columns or neither")
    if require_weights:
        raise ValueError(
            f"row {index} has no token weights ({weights_columns[0]!r} / {weights_columns[1]!r}) but "
            "require_weights=True")
    return None


def _build_item(index: int, ids, weights, chat: bool, limits, weights_columns) -> dict:
    prompt_ids, chosen_ids, rejected_ids = ids
    item = {"row": index, "prompt_input_ids": prompt_ids, "chosen_input_ids": chosen_ids,
            "rejected_input_ids": rejected_ids}
    if weights is not None:
        for column, values, response, name in zip(weights_columns, weights, (chosen_ids, rejected_ids),
                                                  ("chosen", "rejected"), strict=True):
            item[f"{name}_weights"] = _aligned_weights(values, response, index, column, name, chat)
    return _truncate(item, limits, with_weights=weights is not None)


def _aligned_weights(values, response_ids: list[int], index: int, column: str, name: str,
                     chat: bool) -> list[float]:
    """``values`` (one per response token but the last) followed by 0.0 for the last token."""
    if hasattr(values, "tolist") and not isinstance(values, (list, tuple)):
        values = values.tolist()
    if not isinstance(values, (list, tuple)):
        raise ValueError(f"row {index}: {column} must be a list of floats, got {type(values).__name__}")
    expected = len(response_ids) - 1
    if len(values) != expected:
        last = "the final EOS" if not chat else "the final one"
        raise ValueError(
            f"row {index}: {column} has {len(values)} values but the {name} response has {len(response_ids)} "
            f"tokens (weights cover every response token but {last}, so {expected} values are expected)")
    for position, value in enumerate(values):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise ValueError(
                f"row {index}: {column}[{position}] is {value!r}; token weights must be finite numbers")
    return [float(value) for value in values] + [0.0]


def _truncate(item: dict, limits, *, with_weights: bool) -> dict:
    """Apply the prompt-then-response truncation of the module docstring to ``item`` (in place)."""
    max_length, max_prompt_length, truncation_mode = limits
    longest = max(len(item["chosen_input_ids"]), len(item["rejected_input_ids"]))
    if len(item["prompt_input_ids"]) + longest > max_length:
        prompt = item["prompt_input_ids"]
        keep_end = truncation_mode == "keep_end"
        item["prompt_input_ids"] = prompt[-max_prompt_length:] if keep_end else prompt[:max_prompt_length]
    limit = max_length - len(item["prompt_input_ids"])
    if longest > limit:
        for name in ("chosen", "rejected"):
            ids_column, weights_column = f"{name}_input_ids", f"{name}_weights"
            if len(item[ids_column]) <= limit:
                continue
            item[ids_column] = item[ids_column][:limit]
            if with_weights:
                item[weights_column] = item[weights_column][:limit]
                item[weights_column][-1] = 0.0
    return item


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
    check_int(max_prompt_length, "max_prompt_length")
    if not 0 < max_prompt_length < max_length:
        raise ValueError(
            f"max_prompt_length must satisfy 0 < max_prompt_length < max_length ({max_length}), "
            f"got {max_prompt_length}")
    if truncation_mode not in TRUNCATION_MODES:
        raise ValueError(f"truncation_mode must be one of {list(TRUNCATION_MODES)}, got {truncation_mode!r}")
    if weights_columns is not None and (
            not isinstance(weights_columns, (list, tuple)) or len(weights_columns) != 2
            or not all(isinstance(column, str) for column in weights_columns)):
        raise ValueError(
            f"weights_columns must be None or two column names (chosen, rejected), got {weights_columns!r}")
    if require_weights and weights_columns is None:
        raise ValueError("require_weights=True needs weights_columns; it is None")


def _check_weights_everywhere_or_nowhere(items: list[dict], weights_columns) -> None:
    """Weights on some rows but not others would break batching later; report the first row without them."""
    if weights_columns is None:
        return
    with_weights = ["chosen_weights" in item for item in items]
    if any(with_weights) and not all(with_weights):
        first_with = items[with_weights.index(True)]["row"]
        first_without = items[with_weights.index(False)]["row"]
        raise ValueError(
            f"row {first_without} has no token weights but row {first_with} has; {sum(with_weights)} of "
            f"{len(items)} rows carry {weights_columns[0]!r} / {weights_columns[1]!r}: give weights for every "
            "row or for none (require_weights=True reports each row without weights)")


def _progress_bar(total: int, progress: bool, desc: str):
    if not progress or total < _PROGRESS_MIN_ROWS:
        return contextlib.nullcontext()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="rows")
