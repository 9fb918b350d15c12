"""Run the whole experiment: pretrain one base model per seed, then every (seed, noise) cell, in worker processes.

Phase 1 pretrains the base LM of each seed once (:func:`~tidpo.apps.experiment.models.pretrain_base`) and saves its
``state_dict`` under ``OUTPUT_DIR/models/`` (reused by a later run with the same task, model and pretraining
settings). Phase 2 runs the cells (:func:`~tidpo.apps.experiment.cell.run_cell`), each deterministic given its
(seed, noise), in ``workers`` spawned processes with one torch thread each; a progress line is printed per
finished run. Finally ``results.json``, ``results.md`` and the plots are written
(:mod:`tidpo.apps.experiment.report`).
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import platform
import shutil
import sys
import time
import warnings
from pathlib import Path

import torch

from tidpo.apps.experiment.presets import ExperimentConfig

__all__ = ["run_experiment"]

SCHEMA_VERSION = 1
_PRETRAIN_FIELDS = ("num_topics", "num_words", "keys_per_topic", "key_density", "min_response_length",
                    "max_response_length", "context_length", "num_train", "num_heldout", "hidden_size",
                    "num_layers", "num_heads", "intermediate_size", "pretrain_rows", "pretrain_steps",
                    "pretrain_batch", "pretrain_lr")


def _log(message: str) -> None:
    # One write per line: lines of concurrent workers do not interleave.
    sys.stdout.write(message + "\n")
    sys.stdout.flush()


def _init_worker() -> None:
    """One torch thread per worker, quiet libraries."""
    torch.set_num_threads(1)
    import transformers

    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore")


def _fingerprint(config: ExperimentConfig, seed: int) -> str:
    import tidpo

    payload = {name: getattr(config, name) for name in _PRETRAIN_FIELDS}
    payload.update(seed=seed, torch=torch.__version__, tidpo=tidpo.__version__)
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _base_path(out_dir: Path, seed: int) -> Path:
    return out_dir / "models" / f"base_seed{seed}.pt"


def _pretrain_job(job: tuple) -> dict:
    """Pretrain (or reuse) the base model of one seed; returns its stats."""
    config, seed, out_dir = job
    from tidpo.apps.experiment.models import pretrain_base
    from tidpo.apps.experiment.task import SyntheticTask, TaskConfig

    path, fingerprint = _base_path(out_dir, seed), _fingerprint(config, seed)
    if path.exists():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if saved.get("fingerprint") == fingerprint:
            _log(f"pretraining seed {seed}: reusing {path}")
            return {**saved["stats"], "seed": seed, "reused": True}
    # The base model depends on the seed only: the noise level changes the pairs, not the corpus.
    task = SyntheticTask(TaskConfig(**config.task_kwargs(), seed=seed))
    model, stats = pretrain_base(task, config, seed=seed, progress=_log)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"fingerprint": fingerprint, "stats": stats, "state_dict": model.state_dict()}, path)
    _log(f"pretraining seed {seed}: done in {stats['seconds']:.1f} s, loss {stats['first_loss']:.3f} -> "
         f"{stats['final_loss']:.3f}")
    return {**stats, "seed": seed, "reused": False}


def _cell_job(job: tuple) -> dict:
    config, seed, noise, out_dir = job
    from tidpo.apps.experiment.cell import run_cell

    work_dir = out_dir / "tmp" / f"seed{seed}_noise{noise:g}"
    result = run_cell(config, seed, noise, _base_path(out_dir, seed), work_dir, log=_log)
    cells = out_dir / "cells"
    cells.mkdir(parents=True, exist_ok=True)
    (cells / f"seed{seed}_noise{noise:g}.json").write_text(json.dumps(result, indent=1))
    _log(f"cell seed {seed} noise {noise:.2f} done in {result['seconds']:.0f} s")
    return result


def _map(function, jobs: list, workers: int):
    """``function`` over ``jobs``: in this process for one worker, else in a spawn pool (results unordered)."""
    if workers <= 1 or len(jobs) <= 1:
        threads = torch.get_num_threads()
        try:
            _init_worker()
            yield from map(function, jobs)
        finally:
            torch.set_num_threads(threads)
        return
    context = multiprocessing.get_context("spawn")
    with context.Pool(processes=min(workers, len(jobs)), initializer=_init_worker) as pool:
        yield from pool.imap_unordered(function, jobs)


def _versions() -> dict:
    import matplotlib
    import transformers

    import tidpo

    return {"python": sys.version.split()[0], "platform": platform.platform(), "torch": torch.__version__,
            "transformers": transformers.__version__, "matplotlib": matplotlib.__version__,
            "tidpo": tidpo.__version__}


def run_experiment(config: ExperimentConfig, output_dir: str | Path = "runs/experiment") -> dict:
    """Run ``config`` and write ``results.json``, ``results.md``, ``reward_vs_step.png``, ``weight_auc.png``.

    Returns the results dict (the content of ``results.json``).
    """
    from tidpo.apps.experiment.report import write_report

    out_dir = Path(output_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    cells = [(seed, noise) for seed in config.seeds for noise in config.noise_levels]
    _log(f"experiment '{config.preset}': {len(config.methods)} methods x {len(config.seeds)} seeds x "
         f"{len(config.noise_levels)} noise levels ({len(cells)} cells) on {config.workers} worker(s) -> {out_dir}")
    pretrain = sorted(_map(_pretrain_job, [(config, seed, out_dir) for seed in config.seeds], config.workers),
                      key=lambda s: s["seed"])
    pretrain_seconds = time.perf_counter() - start
    jobs = [(config, seed, noise, out_dir) for seed, noise in cells]
    results = sorted(_map(_cell_job, jobs, config.workers), key=lambda c: (c["seed"], c["noise"]))
    wall = time.perf_counter() - start
    runs = [run for cell in results for run in cell.pop("runs")]
    output = {"schema": SCHEMA_VERSION, "config": config.to_dict(), "all_methods": config.all_methods,
              "versions": _versions(), "created": time.strftime("%Y-%m-%d %H:%M:%S"),
              "timing": {"wall_seconds": wall, "pretrain_seconds": pretrain_seconds,
                         "cells_seconds": wall - pretrain_seconds,
                         "cell_seconds": {f"seed{c['seed']}_noise{c['noise']:g}": c["seconds"] for c in results}},
              "pretrain": pretrain, "cells": results, "runs": runs}
    (out_dir / "results.json").write_text(json.dumps(output, indent=1))
    shutil.rmtree(out_dir / "tmp", ignore_errors=True)  # the trainers' (empty) output folders
    paths = write_report(output, out_dir)
    _log(f"done in {wall:.0f} s: {out_dir / 'results.json'}, " + ", ".join(str(p) for p in paths))
    return output
