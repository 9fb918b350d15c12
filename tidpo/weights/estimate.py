"""TIS-DPO token weights for a preference data set: score with (π⁺, π⁻), transform, write a weights file.

The pipeline of docs/methods.md §2.8: (1) train the contrastive pair π⁺ / π⁻ (§2.5); (2) score every response
token offline, r̂_t = log π⁺(y_t | x, y_<t) − log π⁻(y_t | x, y_<t) (:func:`score_pairs`, §2.4) and turn the
scores into weights (:func:`weights_from_scores`); (3) train the policy with ``loss="tis_dpo"`` on those
fixed weights (``tidpo train --loss tis_dpo --weights OUT``). :func:`estimate_weights` runs step 2 from
model folders and a data file and writes ``OUT``, which :func:`tidpo.data.load_preference_rows`
``(data, weights=OUT)`` reads back.

Weights follow the released code by default: per response, chosen = transform(+r̂), rejected =
transform(−r̂), with ``rank_based`` → [0.7, 1.3]; ``method="exp_clamp"`` gives the paper's
k·exp(±clamp(r̂, L, U)) instead (:func:`tidpo.weights.tis_dpo_weights`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from tidpo.weights import records as weight_records
from tidpo.weights.scoring import PROMPT_TEMPLATES, SCORE_DECIMALS, PairScorer, resolve_template, score_pairs
from tidpo.weights.tis import TRANSFORMS, tis_dpo_weights

__all__ = ["METHOD_PARAMS", "PROMPT_TEMPLATES", "estimate_weights", "format_summary", "score_pairs",
           "summarize_weights", "weights_from_scores"]

logger = logging.getLogger(__name__)

#: The keyword parameters each weight method reads (see :func:`tidpo.weights.transform_scores` and
#: :func:`tidpo.weights.exp_clamp_weights` for their meaning and defaults).
METHOD_PARAMS: dict[str, tuple[str, ...]] = {
    "origin": (),
    "binary": ("top_percent",),
    "threshold": ("lower", "upper"),
    "threshold_and_scale": ("min_val", "max_val", "min_scale", "max_scale"),
    "rank_based": ("min_scale", "max_scale"),
    "random": ("min_scale", "max_scale", "seed"),
    "exp_clamp": ("k", "lower", "upper"),
}
_SIDES = ("chosen", "rejected")
_RECORD_KEYS = ("row", "prompt", "chosen_scores", "rejected_scores", "chosen_weights", "rejected_weights",
                "chosen_tokens", "rejected_tokens", "chosen_num_scored", "rejected_num_scored")


# ----------------------------------------------------------------------------------------------------
# scores -> weights
# ----------------------------------------------------------------------------------------------------


def check_method_params(method: str, params: Mapping) -> None:
    """Raise for an unknown ``method``, a parameter it does not read (instead of ignoring it) or a bad value.

    The values are checked by the transform itself, on one chosen and one rejected score of each sign, so that
    a wrong setting is reported before any model runs (and not as a fault of some data row).
    """
    if method not in METHOD_PARAMS:
        raise ValueError(f"method must be one of {', '.join(map(repr, TRANSFORMS))}; got {method!r}")
    unknown = sorted(set(params) - set(METHOD_PARAMS[method]))
    if unknown:
        accepted = ", ".join(METHOD_PARAMS[method]) or "none"
        raise TypeError(f"method {method!r} does not use the parameter(s) {', '.join(unknown)} (it accepts: "
                        f"{accepted})")
    probe = torch.tensor([[-1.0, 0.0, 1.0], [-1.0, 0.0, 1.0]], dtype=torch.float64)
    _checked_weights(tis_dpo_weights(probe, torch.ones_like(probe, dtype=torch.bool), method, **params), method)


def _checked_weights(weights: torch.Tensor, method: str) -> torch.Tensor:
    """``weights``, after checking that they stay finite in float32 (the precision the losses compute in)."""
    if not torch.isfinite(weights.to(torch.float32)).all():
        raise ValueError(f"the {method!r} transform with these parameters gives weights beyond float32's range "
                         f"(largest {weights.abs().max().item():.3g}); the losses compute in float32")
    return weights


def _scored_length(row: Mapping, name: str, index) -> int:
    scores = row.get(f"{name}_scores")
    if not isinstance(scores, (list, tuple)):
        raise ValueError(f"scored row {index}: {name}_scores must be a list of floats, got {type(scores).__name__}")
    num_scored = row.get(f"{name}_num_scored", len(scores))
    if isinstance(num_scored, bool) or not isinstance(num_scored, int) or not 0 <= num_scored <= len(scores):
        raise ValueError(f"scored row {index}: {name}_num_scored must be an int in [0, {len(scores)}], got "
                         f"{num_scored!r}")
    return num_scored


def weights_from_scores(scored_rows: Sequence[Mapping], *, method: str = "rank_based", **params) -> list[dict]:
    """Add ``chosen_weights`` / ``rejected_weights`` to scored rows (see :func:`score_pairs`).

    For each row, the chosen and rejected scores form a stacked pair (``rhat`` ``[2, T]``, row 0 chosen, row 1
    rejected) passed to :func:`tidpo.weights.tis_dpo_weights`: chosen = transform(+r̂) and rejected =
    transform(−r̂) per response for the official transforms, k·exp(±clamp(r̂, L, U)) for ``"exp_clamp"``.
    Only the first ``*_num_scored`` scores of a response take part (all of them when the key is absent);
    the others (tokens cut by truncation) get weight 0. Each row is transformed on its own, so the result
    does not depend on how rows are grouped; with ``method="random"`` and ``seed``, row ``r`` draws from
    ``seed + r`` (its ``"row"`` value, else its position).

    Args:
        scored_rows: dicts with ``chosen_scores`` / ``rejected_scores`` (lists of floats) and optionally
            ``chosen_num_scored`` / ``rejected_num_scored``.
        method: one of :data:`tidpo.weights.TRANSFORMS` (default ``"rank_based"``, the released recipe).
        **params: the method's parameters (:data:`METHOD_PARAMS`), e.g. ``min_scale=0.7, max_scale=1.3`` or
            ``k=1.0, lower=-0.5, upper=1.5``.

    Returns:
        New dicts (shallow copies of the rows) with ``chosen_weights`` / ``rejected_weights``: one float per
        score, rounded to :data:`~tidpo.weights.scoring.SCORE_DECIMALS` decimals.

    Raises:
        TypeError: a parameter the method does not use.
        ValueError: an unknown method, a malformed scored row (named), or what ``tis_dpo_weights`` rejects
            (bad parameter values, non-finite scores).
    """
    check_method_params(method, params)
    out = []
    for position, row in enumerate(scored_rows):
        if not isinstance(row, Mapping):
            raise TypeError(f"scored row {position} must be a dict, got {type(row).__name__}")
        index = row.get("row", position)
        scored = [_scored_length(row, name, index) for name in _SIDES]
        lengths = [len(row[f"{name}_scores"]) for name in _SIDES]
        width = max(max(lengths), 1)
        rhat = torch.zeros(2, width, dtype=torch.float64)
        mask = torch.zeros(2, width, dtype=torch.bool)
        for side, name in enumerate(_SIDES):
            values = row[f"{name}_scores"][:scored[side]]
            try:
                rhat[side, :scored[side]] = torch.tensor(values, dtype=torch.float64)
            except (TypeError, ValueError) as error:
                raise ValueError(f"scored row {index}: {name}_scores must hold numbers ({error})") from error
            mask[side, :scored[side]] = True
        row_params = dict(params)
        if method == "random" and params.get("seed") is not None:
            row_params["seed"] = int(params["seed"]) + int(index)
        try:
            weights = _checked_weights(tis_dpo_weights(rhat, mask, method, **row_params), method)
        except ValueError as error:
            raise ValueError(f"scored row {index}: {error}") from error
        new = dict(row)
        for side, name in enumerate(_SIDES):
            new[f"{name}_weights"] = [round(w, SCORE_DECIMALS) for w in weights[side, :lengths[side]].tolist()]
        out.append(new)
    return out


# ----------------------------------------------------------------------------------------------------
# summary
# ----------------------------------------------------------------------------------------------------


def _stats(values: list[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    mean = sum(values) / len(values)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))


def summarize_weights(records: Sequence[Mapping]) -> dict:
    """Statistics of a weights file's records, per side, over the scored tokens.

    Returns:
        ``{"rows": N, "chosen": {...}, "rejected": {...}}`` where each side has ``tokens`` (all scored
        positions, ``n − 1`` per response), ``scored`` (tokens with a real score), ``rhat_mean``,
        ``rhat_std``, ``rhat_positive`` (fraction of scored tokens with r̂ > 0: high on the chosen side and
        low on the rejected side for a useful π⁺ / π⁻ pair), ``weight_mean`` and ``weight_std`` (when the
        records have weights). Statistics of an empty side are NaN.
    """
    summary: dict = {"rows": len(records)}
    for name in _SIDES:
        scores, weights, tokens = [], [], 0
        for position, record in enumerate(records):
            index = record.get("row", position)
            values = record[f"{name}_scores"]
            count = _scored_length(record, name, index)
            tokens += len(values)
            scores.extend(values[:count])
            if f"{name}_weights" in record:
                weights.extend(record[f"{name}_weights"][:count])
        rhat_mean, rhat_std = _stats(scores)
        weight_mean, weight_std = _stats(weights)
        summary[name] = {"tokens": tokens, "scored": len(scores), "rhat_mean": rhat_mean, "rhat_std": rhat_std,
                         "rhat_positive": sum(v > 0 for v in scores) / len(scores) if scores else math.nan,
                         "weight_mean": weight_mean, "weight_std": weight_std}
    return summary


def format_summary(summary: Mapping) -> str:
    """The summary of :func:`summarize_weights` as a small text table."""
    lines = [f"{summary['rows']} pairs",
             f"{'side':<9} {'tokens':>8} {'scored':>8} {'mean r':>9} {'std r':>9} {'r > 0':>7} {'mean w':>8} "
             f"{'std w':>8}"]
    for name in _SIDES:
        s = summary[name]
        lines.append(f"{name:<9} {s['tokens']:>8} {s['scored']:>8} {s['rhat_mean']:>9.4f} {s['rhat_std']:>9.4f} "
                     f"{s['rhat_positive']:>7.1%} {s['weight_mean']:>8.4f} {s['weight_std']:>8.4f}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# the whole job, resumable
# ----------------------------------------------------------------------------------------------------


def _model_id(name) -> str:
    """A model name as recorded in the metadata: the built-in names as given, folders as absolute paths."""
    name = str(name)
    path = Path(name)
    return str(path.resolve()) if path.is_dir() else name


def _load_models(positive: str, negative: str, dtype: torch.dtype, device, model_loader):
    positive_model, tokenizer = model_loader(positive, dtype)
    if _model_id(positive) == _model_id(negative):
        negative_model, negative_tokenizer = positive_model, None
    else:
        negative_model, negative_tokenizer = model_loader(negative, dtype)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    positive_model.to(device)
    negative_model.to(device)
    return positive_model, negative_model, tokenizer, negative_tokenizer


def _check_existing(records: list[dict], rows: list[dict], path: Path) -> None:
    seen = set()
    for position, record in enumerate(records):
        index = record.get("row")
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(rows):
            raise ValueError(f"{path} record {position} has row {index!r}, not a row index of the data "
                             f"(0..{len(rows) - 1}); delete the file or use another path")
        if index in seen:
            raise ValueError(f"{path} holds row {index} twice; delete the file or use another path")
        seen.add(index)
        missing = [key for key in _RECORD_KEYS if key not in record]
        if missing:
            raise ValueError(f"{path} record {position} (row {index}) has no {missing[0]!r}; delete the file or use "
                             "another path")
        if record["prompt"] != rows[index]["prompt"]:
            raise ValueError(f"{path} row {index} has another prompt than data row {index}; delete the file or use "
                             "another path")


def _existing_records(out: Path, meta: dict, rows: list[dict], resume: bool) -> list[dict]:
    """The records an earlier run of this same job left in ``out`` (validated); writes nothing.

    Raises:
        ValueError: ``out`` holds another job's records, or records without the job's metadata.
    """
    path, sidecar = weight_records.records_path(out), weight_records.meta_path(out)
    if not resume:
        return []
    stored = weight_records.read_meta(out)
    if stored is None:
        if out.exists() or path.exists():
            raise ValueError(f"{out} exists but has no job record {sidecar}, so it cannot be resumed; delete it, "
                             "write to another --out, or pass --no-resume to overwrite it")
        return []
    differences = weight_records.meta_differences(stored, meta)
    if differences:
        raise ValueError(f"{out} holds the weights of another job ({'; '.join(differences)}); delete {out} and "
                         f"{sidecar}, write to another --out, or pass --no-resume to start over")
    if path.exists():
        existing = weight_records.read_records(path, tolerate_partial_last_line=True)
    elif out.exists():  # a finished Parquet output
        existing = weight_records.read_records(out)
    else:
        existing = []
    _check_existing(existing, rows, path if path.exists() else out)
    return existing


def _start_output(out: Path, meta: dict, existing: list[dict], resume: bool) -> None:
    """Make ``out`` ready for appending: stale files gone (``resume=False``), the job record written, a line an
    interruption cut short dropped. Called once the job is valid and its models are loaded."""
    path, sidecar = weight_records.records_path(out), weight_records.meta_path(out)
    if not resume:
        for stale in {out, path, sidecar}:
            stale.unlink(missing_ok=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    if weight_records.read_meta(out) is None:
        weight_records.write_meta(out, meta)
    if path.exists():
        weight_records.write_records(path, existing)


def _record(row: Mapping, weighted: Mapping) -> dict:
    record = {"prompt": row["prompt"], **weighted}
    return {key: record[key] for key in _RECORD_KEYS}


def estimate_weights(positive: str, negative: str, data, out, *, transform: str = "rank_based",
                     transform_params: Mapping | None = None, positive_template: str | None = None,
                     negative_template: str | None = None, batch_size: int = 4, max_length: int = 512,
                     max_prompt_length: int | None = None, truncation_mode: str = "keep_end", dtype: str = "float32",
                     resume: bool = True, progress: bool = True, device: str | None = None,
                     model_loader=None) -> dict:
    """Score a preference data file with π⁺ / π⁻, turn the scores into TIS-DPO weights, write ``out``.

    Batches of ``batch_size`` pairs are scored (:class:`~tidpo.weights.scoring.PairScorer`), weighted
    (:func:`weights_from_scores`) and appended to ``out`` as they finish, so an interrupted run resumes:
    rerun the same call and the rows already in ``out`` are skipped. ``out + ".meta.json"`` records the
    job (data path, row count and content hash, models, templates, transform and its parameters, limits,
    dtype); a rerun whose job differs raises instead of mixing two jobs in one file. The record is written only
    once the job is valid and its models are loaded, so a refused run never blocks the corrected one. A model
    folder changed in place is not detected: delete ``out`` after retraining π⁺ or π⁻.

    Each record of ``out`` (one per data row, in order) has ``row``, ``prompt`` (copied from the data, so
    that :func:`tidpo.data.load_preference_rows` ``(data, weights=out)`` can check the file belongs to the
    data), ``chosen_scores`` / ``rejected_scores``, ``chosen_weights`` / ``rejected_weights``,
    ``chosen_tokens`` / ``rejected_tokens`` and ``chosen_num_scored`` / ``rejected_num_scored`` (see
    :func:`score_pairs`). Use the same ``max_length`` / ``max_prompt_length`` / ``truncation_mode`` as the
    training run, so that the tokens the trainer keeps are exactly the scored ones.

    Args:
        positive: π⁺: a local Hugging Face model folder (or any name ``model_loader`` knows); its tokenizer is the
            trainer's.
        negative: π⁻, same forms; the same name or folder as ``positive`` loads the model once (TIS-DPO(P),
            with two templates).
        data: a preference data file or folder (:func:`tidpo.data.load_preference_rows`).
        out: the weights file, ``.jsonl`` (written batch by batch) or ``.parquet`` (batches collect in
            ``out + ".records.jsonl"``; the Parquet file is written at the end).
        transform: weight method, one of :data:`tidpo.weights.TRANSFORMS`.
        transform_params: its parameters (:data:`METHOD_PARAMS`), e.g. ``{"min_scale": 0.7, "max_scale": 1.3}``.
        positive_template: π⁺'s prompt template (name of :data:`PROMPT_TEMPLATES` or a string with ``{prompt}``).
        negative_template: π⁻'s prompt template.
        batch_size: pairs per forward pass.
        max_length: the training run's ``max_length``.
        max_prompt_length: the training run's ``max_prompt_length``.
        truncation_mode: the training run's ``truncation_mode``.
        dtype: the models' dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"``.
        resume: keep the records of an earlier run of the same job; ``False`` deletes ``out`` (and its
            metadata) and starts over.
        progress: progress bars.
        device: where the models run (default: ``"cuda"`` when available, else ``"cpu"``).
        model_loader: ``(name, dtype) -> (model, tokenizer)``; default: a local Hugging Face folder
            (:func:`tidpo.trainer.models.load_local_model`). ``tidpo estimate-weights`` passes the one that also
            knows ``embedded`` and ``tiny-gpt2``.

    Returns:
        ``{"out": path, "rows": N, "scored": rows scored by this call, "resumed": rows found in out,
        "summary": summarize_weights(...)}``.

    Raises:
        ValueError: an unsupported ``out`` suffix, an unknown transform / dtype, a bad template, an ``out``
            written by another job or not by this function, and everything :func:`score_pairs` and
            :func:`weights_from_scores` raise.
        TypeError: ``data`` is not a path, or a transform parameter the transform does not use.
        FileNotFoundError: missing data or model folder.
    """
    from tidpo.data import load_preference_rows
    from tidpo.trainer.models import DTYPES, load_local_model

    if not isinstance(data, (str, Path)):
        raise TypeError(f"data must be a path to a preference data file or folder, got {type(data).__name__}")
    out = Path(out)
    if out.suffix not in weight_records.OUTPUT_SUFFIXES:
        raise ValueError(f"out must end in {' or '.join(weight_records.OUTPUT_SUFFIXES)}, got {str(out)!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
    params = dict(transform_params or {})
    check_method_params(transform, params)
    templates = (resolve_template(positive_template, "positive_template"),
                 resolve_template(negative_template, "negative_template"))
    rows = load_preference_rows(data)
    meta = {"data": str(Path(data).resolve()), "num_rows": len(rows),
            "data_sha256": weight_records.data_fingerprint(rows),
            "positive": _model_id(positive), "negative": _model_id(negative), "positive_template": templates[0],
            "negative_template": templates[1], "transform": transform, "transform_params": params,
            "max_length": max_length, "max_prompt_length": max_prompt_length, "truncation_mode": truncation_mode,
            "dtype": dtype, "score_decimals": SCORE_DECIMALS}
    existing = _existing_records(out, meta, rows, resume)
    done = {record["row"] for record in existing}
    todo = [index for index in range(len(rows)) if index not in done]
    path = weight_records.records_path(out)
    if todo:
        if done:
            logger.info("%s: %d of %d rows already scored, resuming", out, len(done), len(rows))
        positive_model, negative_model, tokenizer, negative_tokenizer = _load_models(
            positive, negative, DTYPES[dtype], device, model_loader or load_local_model)
        scorer = PairScorer(positive_model, negative_model, tokenizer, rows, positive_template=templates[0],
                            negative_template=templates[1], max_length=max_length,
                            max_prompt_length=max_prompt_length, truncation_mode=truncation_mode,
                            batch_size=batch_size, progress=progress, negative_tokenizer=negative_tokenizer)
        # Everything is checked (arguments, models, tokenizers, every row): only now does the job own ``out``.
        _start_output(out, meta, existing, resume)
        for batch in scorer.batches(todo):
            weighted = weights_from_scores(batch, method=transform, **params)
            weight_records.append_records(path, [_record(rows[w["row"]], w) for w in weighted])
    records = weight_records.read_records(path) if path.exists() else existing
    order = [record["row"] for record in records]
    if order != list(range(len(rows))):
        if sorted(order) != list(range(len(rows))):
            raise ValueError(f"{path} does not hold every row once after scoring; delete it and start over")
        records = sorted(records, key=lambda record: record["row"])
        weight_records.write_records(path, records)
    if out.suffix == ".parquet" and path.exists():
        weight_records.write_parquet(out, records)
        path.unlink()
    summary = summarize_weights(records)
    logger.info("%s: %d rows\n%s", out, len(rows), format_summary(summary))
    return {"out": str(out), "rows": len(rows), "scored": len(todo), "resumed": len(done), "summary": summary}
