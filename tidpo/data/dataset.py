"""``PreferenceDataset``: tokenised preference pairs, one dict of Python lists per pair."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch.utils.data import Dataset

__all__ = ["ITEM_COLUMNS", "PreferenceDataset"]

#: Columns every item has.
ITEM_COLUMNS: tuple[str, ...] = ("row", "prompt_input_ids", "chosen_input_ids", "rejected_input_ids")
#: Prefix of a token-aligned column -> the item column it aligns with.
_ALIGNED_PREFIXES = {"chosen_": "chosen_input_ids", "rejected_": "rejected_input_ids"}


class PreferenceDataset(Dataset):
    """Tokenised preference pairs, built by :func:`tidpo.data.tokenize_preference_rows`.

    Item ``i`` is a dict of Python values::

        {"row": int,                          # index of the source row
         "prompt_input_ids": list[int],       # P_i prompt tokens
         "chosen_input_ids": list[int],       # C_i chosen-response tokens (ending with EOS / terminator)
         "rejected_input_ids": list[int],     # R_i rejected-response tokens
         # optional, token-aligned with the response ids:
         "chosen_weights": list[float],       # C_i values
         "rejected_weights": list[float],     # R_i values
         ...}                                 # further columns added with with_columns()

    A column named ``chosen_*`` or ``rejected_*`` whose values are sequences is **token-aligned**: each item's
    value has one entry per token of that item's ``chosen_input_ids`` / ``rejected_input_ids``. Every item
    has the same columns.

    Args:
        items: the item dicts (used as given, not copied).

    Raises:
        ValueError: an item lacks a column of :data:`ITEM_COLUMNS`, items differ in their columns, or a
            token-aligned value has the wrong length (the message names the item and its source row).
    """

    def __init__(self, items: Sequence[dict[str, Any]]):
        items = list(items)
        columns = list(items[0]) if items else list(ITEM_COLUMNS)
        missing = [column for column in ITEM_COLUMNS if column not in columns]
        if missing:
            raise ValueError(f"items need the columns {list(ITEM_COLUMNS)}; item 0 has no {missing[0]!r}")
        for position, item in enumerate(items):
            if set(item) != set(columns):
                raise ValueError(
                    f"item {position} (row {item.get('row')}) has columns {sorted(item)} but item 0 has "
                    f"{sorted(columns)}; every item must have the same columns")
            for column in columns:
                _check_aligned(item, column, item[column], position)
        self._items = items
        self._columns = columns

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        """Item ``index`` as a new dict (its lists are shared with the dataset: do not modify them)."""
        return dict(self._items[index])

    @property
    def column_names(self) -> list[str]:
        """The columns every item has, e.g. ``["row", "prompt_input_ids", ..., "chosen_weights", ...]``."""
        return list(self._columns)

    def with_columns(self, **columns: Sequence[Any]) -> PreferenceDataset:
        """A new dataset whose items also hold the given per-item values.

        Each keyword is a column name and a sequence with one value per item, e.g.
        ``with_columns(chosen_ref_logps=[[...], ...], rejected_ref_logps=[[...], ...])``. One-dimensional
        tensors and arrays among the values are stored as Python lists (``.tolist()``). A token-aligned
        column (``chosen_*`` / ``rejected_*`` with sequence values) must have one value per response token
        of each item. An existing column other than those of :data:`ITEM_COLUMNS` is replaced.

        Raises:
            ValueError: a column of :data:`ITEM_COLUMNS` is given, a column's length differs from
                ``len(self)``, or an aligned value has the wrong length (naming the column and the item).
        """
        for name, values in columns.items():
            if name in ITEM_COLUMNS:
                raise ValueError(f"{name!r} is a built-in column of PreferenceDataset and cannot be replaced")
            if len(values) != len(self._items):
                raise ValueError(f"{name} has {len(values)} values but the dataset has {len(self._items)} items")
        items = []
        for position, item in enumerate(self._items):
            new_item = dict(item)
            for name, values in columns.items():
                value = values[position]
                if hasattr(value, "tolist") and getattr(value, "ndim", 0) == 1:
                    value = value.tolist()
                _check_aligned(item, name, value, position)
                new_item[name] = value
            items.append(new_item)
        return PreferenceDataset(items)

    def __repr__(self) -> str:
        return f"PreferenceDataset(num_items={len(self)}, columns={self._columns})"


def _check_aligned(item: Mapping, column: str, value, position: int) -> None:
    """Raise if ``column`` is token-aligned and ``value`` has not one entry per response token."""
    if column in ITEM_COLUMNS or isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        return
    for prefix, ids_column in _ALIGNED_PREFIXES.items():
        if column.startswith(prefix):
            expected = len(item[ids_column])
            if len(value) != expected:
                raise ValueError(
                    f"item {position} (row {item['row']}): {column} has {len(value)} values but "
                    f"{ids_column} has {expected} tokens; {prefix}* columns are aligned to the response ids")
