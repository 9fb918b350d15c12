"""Token-weight files: JSONL written batch by batch (resumable), Parquet at the end, and a metadata sidecar.

A weights file holds one record per data row, in data order, as written by
:func:`tidpo.weights.estimate.estimate_weights`::

    {"row": 0, "prompt": ..., "chosen_scores": [...], "rejected_scores": [...],
     "chosen_weights": [...], "rejected_weights": [...], "chosen_tokens": [...], "rejected_tokens": [...],
     "chosen_num_scored": int, "rejected_num_scored": int}

``OUT.meta.json`` records what produced ``OUT`` (data, models, templates, transform, limits) so that a
rerun can tell whether the records already in ``OUT`` belong to the same job. A ``.parquet`` output is
built from ``OUT.records.jsonl``, which collects the batches and is removed once the Parquet file is
written.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = ["OUTPUT_SUFFIXES", "append_records", "data_fingerprint", "meta_differences", "meta_path", "read_meta",
           "read_records", "records_path", "write_meta", "write_parquet", "write_records"]

OUTPUT_SUFFIXES = (".jsonl", ".parquet")
#: Bumped when the record layout changes; part of the metadata a resumed run must match.
FORMAT_VERSION = 1


def meta_path(out: Path) -> Path:
    """The metadata sidecar of ``out``: ``out`` + ``".meta.json"``."""
    return Path(f"{out}.meta.json")


def records_path(out: Path) -> Path:
    """Where batches are appended: ``out`` itself for ``.jsonl``, ``out`` + ``".records.jsonl"`` for Parquet."""
    return out if out.suffix == ".jsonl" else Path(f"{out}.records.jsonl")


def data_fingerprint(rows: Sequence[Mapping]) -> str:
    """SHA-256 of the rows' ``prompt`` / ``chosen`` / ``rejected`` (detects changed data behind the same path)."""
    digest = hashlib.sha256()
    for row in rows:
        text = json.dumps([row["prompt"], row["chosen"], row["rejected"]], sort_keys=True, ensure_ascii=False,
                          default=str)
        digest.update(text.encode("utf-8"))
        digest.update(b"\n")
    return digest.hexdigest()


def _dumps(record: Mapping) -> str:
    return json.dumps(record, ensure_ascii=False, allow_nan=False)


def append_records(path: Path, records: Sequence[Mapping]) -> None:
    """Append ``records`` as JSON lines in one write, then flush to disk (a finished batch survives a crash)."""
    if not records:
        return
    with open(path, "a", encoding="utf-8") as handle:
        handle.write("".join(_dumps(record) + "\n" for record in records))
        handle.flush()
        os.fsync(handle.fileno())


def write_records(path: Path, records: Sequence[Mapping]) -> None:
    """Write ``records`` as JSON lines, replacing ``path`` atomically (temporary file, then rename)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write("".join(_dumps(record) + "\n" for record in records))
    os.replace(tmp, path)


def write_parquet(path: Path, records: Sequence[Mapping]) -> None:
    """Write ``records`` as a Parquet file (needs ``pyarrow``), atomically."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as error:
        raise ImportError(f"writing {path} needs pyarrow; install it with `pip install \"tidpo[data]\"` or write a "
                          ".jsonl file") from error
    try:
        table = pa.Table.from_pylist(list(records))
    except (pa.ArrowInvalid, pa.ArrowTypeError) as error:
        raise ValueError(f"the records cannot form one Parquet table ({error}); rows mixing plain-text and "
                         "conversational prompts need a .jsonl output") from error
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def read_records(path: Path, *, tolerate_partial_last_line: bool = False) -> list[dict]:
    """Records of a ``.jsonl`` / ``.json`` / ``.parquet`` weights file.

    Args:
        path: the file.
        tolerate_partial_last_line: skip a final JSONL line that is not valid JSON (a write cut short by an
            interruption); any other invalid line still raises.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: an unsupported suffix, invalid JSON, or a record that is not an object (line named).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file does not exist: {path}")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    if path.suffix not in (".jsonl", ".json"):
        raise ValueError(f"weights file {path} must end in .jsonl, .json or .parquet")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json" and text.lstrip().startswith("["):
        records = json.loads(text)
    else:
        lines = text.splitlines()
        records = []
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as error:
                if tolerate_partial_last_line and number == len(lines) and not text.endswith("\n"):
                    break
                raise ValueError(f"{path} line {number} is not valid JSON ({error.msg})") from error
    for number, record in enumerate(records):
        if not isinstance(record, Mapping):
            raise ValueError(f"{path} record {number} is a {type(record).__name__}, expected a JSON object")
    return records


def write_meta(out: Path, meta: Mapping) -> None:
    """Write ``meta`` (plus the format version) to :func:`meta_path` of ``out``."""
    path = meta_path(out)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"format_version": FORMAT_VERSION, **meta}, indent=1, ensure_ascii=False) + "\n",
                   encoding="utf-8")
    os.replace(tmp, path)


def read_meta(out: Path) -> dict | None:
    """The metadata of ``out``, or ``None`` when it has no sidecar."""
    path = meta_path(out)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error.msg}); delete it and {out} to start over") from error


def meta_differences(stored: Mapping, expected: Mapping) -> list[str]:
    """``"key: stored != expected"`` for each metadata key (format version included) whose values differ."""
    expected = json.loads(json.dumps({"format_version": FORMAT_VERSION, **expected}, ensure_ascii=False))
    keys = sorted(set(stored) | set(expected))
    return [f"{key}: {stored.get(key)!r} != {expected.get(key)!r}" for key in keys
            if stored.get(key) != expected.get(key)]
