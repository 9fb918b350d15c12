"""Reading preference rows from files, folders, ``datasets`` objects or lists, and merging token weights.

A preference row is a dict in TRL's explicit-prompt format: ``{"prompt", "chosen", "rejected"}``, each
either plain text (strings) or conversational (lists of ``{"role", "content"}`` messages). Token weights,
when present, live in the row under ``chosen_weights`` / ``rejected_weights`` (lists of floats, one per
response token but the last; see :func:`tidpo.data.tokenize_preference_rows`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["PREFERENCE_COLUMNS", "ROW_ORIGIN", "TOKEN_COLUMNS", "WEIGHT_COLUMNS", "load_preference_rows",
           "row_label", "swap_chosen_rejected"]

#: Columns every preference row must have (TRL's explicit-prompt preference format).
PREFERENCE_COLUMNS: tuple[str, str, str] = ("prompt", "chosen", "rejected")
#: Columns holding a row's token weights.
WEIGHT_COLUMNS: tuple[str, str] = ("chosen_weights", "rejected_weights")
#: Columns of a weights file (``tidpo estimate-weights``) with the tokens the weights belong to: the tokeniser
#: compares them with its own tokens, so weights estimated with another tokenizer or template are refused.
TOKEN_COLUMNS: tuple[str, str] = ("chosen_tokens", "rejected_tokens")
#: Column that rows read from a file carry: where the row is (``"pairs.jsonl line 7"``), so that an error about
#: the row points at the file and line even after the rows were split, shuffled or concatenated.
ROW_ORIGIN = "row_origin"

_FILE_SUFFIXES = (".json", ".jsonl", ".parquet")
#: Files that mark a ``datasets`` ``save_to_disk`` folder (``Dataset`` and ``DatasetDict`` respectively).
_SAVED_DATASET_MARKERS = ("state.json", "dataset_info.json", "dataset_dict.json")
_INSTALL_DATA_EXTRA = 'pip install "tidpo[data]"'


def row_label(index: int, row=None) -> str:
    """How error messages name data row ``index``: where it was read (``"pairs.jsonl line 7"``, from the
    row's :data:`ROW_ORIGIN`) or, for rows given in memory, ``"row 6 (0-based)"``."""
    origin = row.get(ROW_ORIGIN) if isinstance(row, Mapping) else None
    return str(origin) if origin else f"row {index} (0-based)"


def load_preference_rows(source, *, weights=None) -> list[dict[str, Any]]:
    """Read preference rows and, optionally, merge per-row token weights into them.

    Args:
        source: where the rows come from, one of

            - a ``datasets.Dataset`` (anything with ``column_names`` and ``to_list()``); a ``DatasetDict``
              raises, asking for one split;
            - a list or tuple of dicts;
            - a path (``str`` or ``Path``) to a ``.json`` file (a JSON array of objects, or JSON lines), a
              ``.jsonl`` file, or a ``.parquet`` file (needs ``pyarrow``);
            - a folder: a ``datasets`` ``save_to_disk`` folder (it has ``state.json`` /
              ``dataset_info.json``; read with ``datasets.load_from_disk``), otherwise every ``*.json``,
              ``*.jsonl`` and ``*.parquet`` file directly in it, sorted by name and concatenated.
        weights: optional per-row token weights, read like ``source`` (typically a JSONL file or a list of
            dicts): row ``i`` holds ``chosen_weights`` and ``rejected_weights`` (lists of floats) for data
            row ``i``. A weights row that also has a ``prompt`` must have the data row's prompt, which
            catches a weights file made for other data. Rows of ``source`` may instead already carry these
            columns; giving both is an error rather than a silent override.

    Returns:
        One dict per row (shallow copies: the caller's objects are never modified), with at least
        ``prompt``, ``chosen`` and ``rejected``, plus ``chosen_weights`` / ``rejected_weights`` when merged.
        Rows read from files also carry :data:`ROW_ORIGIN` (``"pairs.jsonl line 7"``, ``"pairs.parquet row 6
        (0-based)"``), which error messages name; tokenisation ignores it.

    Raises:
        FileNotFoundError: a path that does not exist (named in the message).
        ImportError: a Parquet file without ``pyarrow``, or a saved dataset without ``datasets``.
        TypeError: an unsupported ``source``, or a row that is not a dict.
        ValueError: a ``DatasetDict``, an empty source, a folder without data files, unparsable JSON, a row
            missing a column, or weights that do not match the rows (count, prompt, columns).
    """
    rows = _read_records(source, "source")
    if not rows:
        raise ValueError(f"source has no rows: {_describe(source)}")
    for index, row in enumerate(rows):
        missing = [column for column in PREFERENCE_COLUMNS if column not in row]
        if missing:
            found = sorted(column for column in row if column != ROW_ORIGIN)
            raise ValueError(
                f"{_located(index, row, source)} has no {missing[0]!r} column (found {found}); "
                f"preference rows need {list(PREFERENCE_COLUMNS)} (TRL's explicit-prompt format)")
    if weights is not None:
        _merge_weights(rows, _read_records(weights, "weights"), weights)
    return rows


# ----------------------------------------------------------------------------------------------------
# weights
# ----------------------------------------------------------------------------------------------------


def _merge_weights(rows: list[dict], weight_rows: list[dict], weights) -> None:
    """Copy ``chosen_weights`` / ``rejected_weights`` of ``weight_rows[i]`` into ``rows[i]`` (in place)."""
    if len(weight_rows) != len(rows):
        raise ValueError(
            f"weights has {len(weight_rows)} rows but source has {len(rows)} rows; "
            f"weights must hold exactly one row per data row ({_describe(weights)})")
    for index, (row, weight_row) in enumerate(zip(rows, weight_rows, strict=True)):
        for column in WEIGHT_COLUMNS:
            if column not in weight_row:
                found = sorted(c for c in weight_row if c != ROW_ORIGIN)
                raise ValueError(
                    f"weights {_located(index, weight_row, weights)} has no {column!r} column (found {found}); "
                    f"weights rows need {list(WEIGHT_COLUMNS)}")
            if column in row:
                raise ValueError(
                    f"{_located(index, row)} already has a {column!r} column and weights were given as "
                    "well; drop the column from the data or pass weights=None to use it")
        if "prompt" in weight_row and weight_row["prompt"] != row["prompt"]:
            raise ValueError(
                f"weights {_located(index, weight_row, weights)} has prompt {_preview(weight_row['prompt'])} but "
                f"data {_located(index, row)} has prompt {_preview(row['prompt'])}; the weights were made "
                "for other data (or another order)")
        for column in (*WEIGHT_COLUMNS, *TOKEN_COLUMNS):
            if column in weight_row:
                row[column] = weight_row[column]


# ----------------------------------------------------------------------------------------------------
# readers
# ----------------------------------------------------------------------------------------------------


def _read_records(source, name: str) -> list[dict]:
    """Rows of ``source`` (see :func:`load_preference_rows`) as a list of fresh dicts."""
    if isinstance(source, (str, Path)):
        return _read_path(Path(source), name)
    if isinstance(getattr(source, "column_names", None), Mapping):
        splits = list(source.column_names)
        raise ValueError(
            f"{name} is a DatasetDict with splits {splits}; pass one split, e.g. {name}[{splits[0]!r}]"
            if splits else f"{name} is a DatasetDict without splits; pass one split of a DatasetDict")
    if hasattr(source, "column_names") and callable(getattr(source, "to_list", None)):
        return _check_records(source.to_list(), name)
    if isinstance(source, (list, tuple)):
        return _check_records(source, name)
    raise TypeError(
        f"{name} must be a datasets.Dataset, a list of dicts, or a path to a .json/.jsonl/.parquet file or "
        f"folder, got {type(source).__name__}")


def _check_records(records, name: str, origins: list[str] | None = None) -> list[dict]:
    """Fresh dicts of ``records``; ``origins[i]`` (where record ``i`` was read) goes into :data:`ROW_ORIGIN`."""
    out = []
    for index, record in enumerate(records):
        where = origins[index] if origins else f"row {index} (0-based)"
        if not isinstance(record, Mapping):
            raise TypeError(f"{name} {where} must be a dict, got {type(record).__name__}")
        row = dict(record)
        if origins:
            row[ROW_ORIGIN] = where
        out.append(row)
    return out


def _located(index: int, row: Mapping, source=None) -> str:
    """``row_label``, plus the source (when given) if the row does not say where it was read."""
    label = row_label(index, row)
    return label if row.get(ROW_ORIGIN) or source is None else f"{label} of {_describe(source)}"


def _read_path(path: Path, name: str) -> list[dict]:
    if not path.exists():
        what = "data" if name == "source" else name
        raise FileNotFoundError(f"{what} file or folder {str(path)!r} does not exist")
    if path.is_dir():
        return _read_folder(path, name)
    return _read_file(path, name)


def _read_folder(folder: Path, name: str) -> list[dict]:
    if any((folder / marker).is_file() for marker in _SAVED_DATASET_MARKERS):
        try:
            import datasets
        except ImportError as error:
            raise ImportError(
                f"{name} {folder} is a `datasets` save_to_disk folder, which needs the `datasets` package; "
                f"install it with `{_INSTALL_DATA_EXTRA}`") from error
        return _read_records(datasets.load_from_disk(str(folder)), name)
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in _FILE_SUFFIXES)
    if not files:
        raise ValueError(
            f"{name} folder {folder} holds no {'/'.join(_FILE_SUFFIXES)} files and is not a `datasets` "
            "save_to_disk folder")
    rows: list[dict] = []
    for file in files:
        rows.extend(_read_file(file, name))
    return rows


def _read_file(path: Path, name: str) -> list[dict]:
    if path.suffix == ".parquet":
        records = _read_parquet(path, name)
        return _check_records(records, name, [f"{path} row {i} (0-based)" for i in range(len(records))])
    if path.suffix == ".jsonl":
        records, lines = _parse_json_lines(path.read_text(encoding="utf-8"), path, name)
        return _check_records(records, name, [f"{path} line {line}" for line in lines])
    if path.suffix == ".json":
        records, lines = _read_json(path, name)
        origins = ([f"{path} line {line}" for line in lines] if lines is not None
                   else [f"{path} item {i} (0-based)" for i in range(len(records))])
        return _check_records(records, name, origins)
    raise ValueError(f"{name} file {path} has an unsupported suffix; expected one of {list(_FILE_SUFFIXES)}")


def _read_parquet(path: Path, name: str) -> list:
    try:
        import pyarrow.parquet as pq
    except ImportError as error:
        raise ImportError(
            f"reading the Parquet file {path} ({name}) needs pyarrow; install it with `{_INSTALL_DATA_EXTRA}`"
        ) from error
    return pq.read_table(path).to_pylist()


def _read_json(path: Path, name: str) -> tuple[list, list[int] | None]:
    """A ``.json`` file: a JSON array of objects, a single object, or JSON lines; with line numbers for lines."""
    text = path.read_text(encoding="utf-8")
    try:
        document = json.loads(text)
    except json.JSONDecodeError:
        return _parse_json_lines(text, path, name)
    if isinstance(document, list):
        return document, None
    if isinstance(document, Mapping):
        return [document], None
    raise ValueError(
        f"{name} file {path} holds a JSON {type(document).__name__}; expected an array of objects or JSON lines")


def _parse_json_lines(text: str, path: Path, name: str) -> tuple[list, list[int]]:
    """The records of JSON-lines ``text`` and the (1-based) line each is on; blank lines are skipped."""
    records, lines = [], []
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise ValueError(
                f"{name} file {path} line {line_number} is not valid JSON ({error.msg}); expected a JSON array "
                "of objects or one JSON object per line") from error
        lines.append(line_number)
    return records, lines


# ----------------------------------------------------------------------------------------------------
# messages
# ----------------------------------------------------------------------------------------------------


def _describe(source) -> str:
    if isinstance(source, (str, Path)):
        return str(source)
    return f"the given {type(source).__name__}"


def _preview(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def swap_chosen_rejected(row: dict) -> dict:
    """The pair with chosen and rejected exchanged (weight columns too): y_l ≻ y_w (the negative model of a
    TIS-DPO (S) / (D) pair trains on these)."""
    out = dict(row)
    out["chosen"], out["rejected"] = row["rejected"], row["chosen"]
    if "chosen_weights" in row or "rejected_weights" in row:
        out["chosen_weights"], out["rejected_weights"] = row.get("rejected_weights"), row.get("chosen_weights")
    return out
