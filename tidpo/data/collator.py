"""``PreferenceCollator``: a batch of preference items -> the stacked tensors the losses consume."""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence

import torch

from tidpo._validation import IGNORE_INDEX, check_int
from tidpo.data.dataset import ITEM_COLUMNS

__all__ = ["ALIGNED_BATCH_COLUMNS", "PreferenceCollator", "preference_inputs"]

#: Optional token-aligned per-response columns -> the batch tensor they fill.
ALIGNED_BATCH_COLUMNS = {
    "weights": ("chosen_weights", "rejected_weights"),
    "ref_logps": ("chosen_ref_logps", "rejected_ref_logps"),
}


class PreferenceCollator:
    """Pads ``B`` preference items into one batch in the stacked layout.

    For items ``i = 0 .. B-1`` with prompt ``p_i``, chosen ``c_i`` and rejected ``r_i`` token ids, the
    ``2B`` sequences are ``p_i + c_i`` (rows ``[0, B)``) then ``p_i + r_i`` (rows ``[B, 2B)``), right-padded
    to ``T`` = the longest sequence, rounded up to a multiple of ``pad_to_multiple_of`` if given.
    ``P`` is the longest prompt.

    Returns a dict of CPU tensors:

    =========================  ============  =========================================================
    key                        shape, dtype  content
    =========================  ============  =========================================================
    ``input_ids``              [2B, T] long  the sequences, right-padded with ``pad_token_id``
    ``attention_mask``         [2B, T] long  1 on real tokens, 0 on padding
    ``labels``                 [2B, T] long  ``input_ids`` on response tokens (including the final
                                             EOS / terminator), ``ignore_index`` on prompt and padding;
                                             not shifted (predict ``labels[:, 1:]`` from
                                             ``logits[:, :-1]``)
    ``weights``                [2B, T] f32   only if the items carry ``chosen_weights`` /
                                             ``rejected_weights``: each response's token weights at its
                                             positions, 0 on prompt and padding
    ``ref_logps``              [2B, T] f32   only if the items carry ``chosen_ref_logps`` /
                                             ``rejected_ref_logps``: at response position ``t`` the
                                             reference log-probability of ``input_ids[:, t]``, 0 elsewhere
    ``prompt_input_ids``       [B, P] long   the prompts, LEFT-padded with ``pad_token_id`` (generation)
    ``prompt_attention_mask``  [B, P] long   1 on real prompt tokens
    ``row``                    [B] long      the items' source row indices
    =========================  ============  =========================================================

    Args:
        pad_token_id: the padding id (e.g. ``tokenizer.pad_token_id``). Labels come from positions, not from
            comparing ids with it, so it may equal the EOS id.
        ignore_index: the label of positions without a loss term.
        pad_to_multiple_of: round ``T`` up to a multiple of this (e.g. 8 for tensor cores), or ``None``.

    Raises:
        TypeError: ``pad_token_id`` is ``None`` or not an int (set ``tokenizer.pad_token``), or another
            argument is not an int.
        ValueError: ``pad_token_id`` is negative or ``pad_to_multiple_of`` is not positive.
    """

    def __init__(self, pad_token_id: int, *, ignore_index: int = IGNORE_INDEX, pad_to_multiple_of: int | None = None):
        if pad_token_id is None:
            raise TypeError(
                "pad_token_id is None; set tokenizer.pad_token (e.g. tokenizer.pad_token = tokenizer.eos_token) "
                "and pass tokenizer.pad_token_id")
        check_int(pad_token_id, "pad_token_id", low=0)
        check_int(ignore_index, "ignore_index")
        if pad_to_multiple_of is not None:
            check_int(pad_to_multiple_of, "pad_to_multiple_of", low=1)
        self.pad_token_id = pad_token_id
        self.ignore_index = ignore_index
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, items: Sequence[Mapping]) -> dict[str, torch.Tensor]:
        """Collate ``B`` items of a :class:`~tidpo.data.PreferenceDataset` (see the class docstring).

        Raises:
            ValueError: ``items`` is empty, an item lacks a column or has an empty prompt or response, an
                aligned column has the wrong length, or some items carry weights / reference log-probs and
                others do not (the message names the items and their source rows).
        """
        if not isinstance(items, Sequence) or isinstance(items, (str, bytes)):
            raise TypeError(f"items must be a list of preference items, got {type(items).__name__}")
        if not items:
            raise ValueError("items is empty; a batch needs at least one preference pair")
        for position, item in enumerate(items):
            _check_item(item, position)
        num_pairs = len(items)
        sequences = [(item["prompt_input_ids"], item[f"{name}_input_ids"])
                     for name in ("chosen", "rejected") for item in items]
        length = self._padded_length(max(len(prompt) + len(response) for prompt, response in sequences))

        input_ids = torch.full((2 * num_pairs, length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((2 * num_pairs, length), dtype=torch.long)
        labels = torch.full((2 * num_pairs, length), self.ignore_index, dtype=torch.long)
        for row, (prompt, response) in enumerate(sequences):
            start, end = len(prompt), len(prompt) + len(response)
            input_ids[row, :start] = torch.tensor(prompt, dtype=torch.long)
            input_ids[row, start:end] = torch.tensor(response, dtype=torch.long)
            attention_mask[row, :end] = 1
            labels[row, start:end] = input_ids[row, start:end]

        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        for key, columns in ALIGNED_BATCH_COLUMNS.items():
            if _carried(items, columns, key):
                batch[key] = _scatter_aligned(items, columns, sequences, length)
        batch.update(self._left_padded_prompts(items))
        batch["row"] = torch.tensor([int(item["row"]) for item in items], dtype=torch.long)
        return batch

    def _padded_length(self, length: int) -> int:
        multiple = self.pad_to_multiple_of
        return length if multiple is None else -(-length // multiple) * multiple

    def _left_padded_prompts(self, items: Sequence[Mapping]) -> dict[str, torch.Tensor]:
        width = max(len(item["prompt_input_ids"]) for item in items)
        prompt_ids = torch.full((len(items), width), self.pad_token_id, dtype=torch.long)
        prompt_mask = torch.zeros((len(items), width), dtype=torch.long)
        for row, item in enumerate(items):
            prompt = item["prompt_input_ids"]
            prompt_ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
            prompt_mask[row, width - len(prompt):] = 1
        return {"prompt_input_ids": prompt_ids, "prompt_attention_mask": prompt_mask}

    def __repr__(self) -> str:
        return (f"PreferenceCollator(pad_token_id={self.pad_token_id}, ignore_index={self.ignore_index}, "
                f"pad_to_multiple_of={self.pad_to_multiple_of})")


def _check_item(item, position: int) -> None:
    if not isinstance(item, Mapping):
        raise TypeError(f"item {position} must be a dict, got {type(item).__name__}")
    missing = [column for column in ITEM_COLUMNS if column not in item]
    if missing:
        raise ValueError(f"item {position} has no {missing[0]!r} column; items need {list(ITEM_COLUMNS)}")
    for column in ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids"):
        if len(item[column]) == 0:
            reason = ("the first response token needs a prompt token to be predicted from"
                      if column == "prompt_input_ids" else "the response would have no loss term")
            raise ValueError(f"item {position} (row {item['row']}): {column} is empty; {reason}")


def _carried(items: Sequence[Mapping], columns: tuple[str, str], key: str) -> bool:
    """Whether every item carries both ``columns`` (True), none does (False); raise when only some do."""
    carriers = [all(column in item for column in columns) for item in items]
    if all(carriers):
        return True
    if not any(carriers) and not any(column in item for item in items for column in columns):
        return False
    lacking = [position for position, carries in enumerate(carriers) if not carries]
    rows = [items[position]["row"] for position in lacking]
    raise ValueError(
        f"items {lacking} (rows {rows}) lack {columns[0]!r} / {columns[1]!r} that other items carry; the batch "
        f"{key!r} needs them on every item or on none")


def _scatter_aligned(items, columns: tuple[str, str], sequences, length: int) -> torch.Tensor:
    """``[2B, T]`` float32 holding each response's aligned values at its positions, 0 elsewhere."""
    num_pairs = len(items)
    out = torch.zeros((2 * num_pairs, length), dtype=torch.float32)
    for row, (prompt, response) in enumerate(sequences):
        item, column = items[row % num_pairs], columns[row // num_pairs]
        values = item[column]
        if len(values) != len(response):
            raise ValueError(
                f"item {row % num_pairs} (row {item['row']}): {column} has {len(values)} values but the "
                f"response has {len(response)} tokens")
        out[row, len(prompt):len(prompt) + len(response)] = torch.as_tensor(values, dtype=torch.float32)
    return out


def next_token(values: torch.Tensor, fill) -> torch.Tensor:
    """``[R, T]`` per-position values moved one step left, ``fill`` in the last column: position ``t`` then
    holds what ``logits[:, t]`` predicts, so the logits go to the losses whole.

    (Slicing ``logits[:, :-1]`` instead would make autograd allocate and zero-fill a second ``[R, T, V]``
    gradient for the slice on every backward.)
    """
    return torch.cat([values[:, 1:], values.new_full((values.shape[0], 1), fill)], dim=1)


def preference_inputs(prompt_ids: Sequence[Sequence[int]], chosen_ids: Sequence[Sequence[int]],
                      rejected_ids: Sequence[Sequence[int]], *, pad_token_id: int,
                      ignore_index: int = IGNORE_INDEX) -> dict[str, torch.Tensor]:
    """Model inputs and loss labels of B pairs from token ids, for your own training loop.

    The :class:`PreferenceCollator` layout (rows ``[0, B)`` prompt + chosen, ``[B, 2B)`` prompt + rejected,
    right-padded), plus the labels every tidpo loss takes: shifted by one so that ``logits[:, :-1]`` predicts
    them. Each response should end with its EOS / end-of-turn token (:func:`tidpo.data.tokenize_preference_rows`
    adds it).

    Args:
        prompt_ids / chosen_ids / rejected_ids: B lists of token ids each (a prompt needs at least one token).
        pad_token_id: the padding id.
        ignore_index: the label of prompt and padding positions.

    Returns:
        ``input_ids`` / ``attention_mask`` ``[2B, T]`` (the model's inputs), ``labels`` ``[2B, T - 1]`` (shifted:
        pass ``model(...).logits[:, :-1]`` with them) and ``response_mask`` ``[2B, T - 1]`` (``labels !=
        ignore_index``: the response tokens, the positions token weights or reference log-probs belong to).

    Raises:
        ValueError: the three lists differ in length, a prompt or response is empty, or an id is not an int >= 0
            (the message names the argument and the position).
    """
    if not (len(prompt_ids) == len(chosen_ids) == len(rejected_ids)) or not prompt_ids:
        raise ValueError(f"prompt_ids, chosen_ids and rejected_ids must hold the same number (>= 1) of sequences, "
                         f"got {len(prompt_ids)}, {len(chosen_ids)} and {len(rejected_ids)}")
    columns = {name: [_token_ids(sequence, f"{name}[{i}]") for i, sequence in enumerate(sequences)]
               for name, sequences in (("prompt_ids", prompt_ids), ("chosen_ids", chosen_ids),
                                       ("rejected_ids", rejected_ids))}
    items = [{"row": i, "prompt_input_ids": p, "chosen_input_ids": c, "rejected_input_ids": r}
             for i, (p, c, r) in enumerate(zip(*columns.values(), strict=True))]
    batch = PreferenceCollator(pad_token_id, ignore_index=ignore_index)(items)
    labels = batch["labels"][:, 1:]
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "labels": labels,
            "response_mask": labels != ignore_index}


def _token_ids(sequence, name: str) -> list[int]:
    """``sequence`` (a list / tuple / 1-D integer tensor of ids) as a non-empty list of ints >= 0."""
    if isinstance(sequence, torch.Tensor):
        if sequence.dim() != 1 or sequence.dtype.is_floating_point or sequence.dtype.is_complex:
            raise ValueError(f"{name} must be a 1-D integer tensor, got {sequence.dtype} of shape "
                             f"{tuple(sequence.shape)}")
        sequence = sequence.tolist()
    ids = list(sequence)
    if not ids:
        raise ValueError(f"{name} is empty: every prompt and response needs at least one token")
    for position, token in enumerate(ids):
        if isinstance(token, bool) or not isinstance(token, numbers.Integral) or token < 0:
            raise ValueError(f"{name}[{position}] is {token!r}; token ids are ints >= 0")
    return [int(token) for token in ids]
