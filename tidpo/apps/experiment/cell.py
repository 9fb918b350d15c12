"""One cell of the experiment: every method for one (seed, noise level), from one pretrained base model.

Pipeline (all training through :class:`~tidpo.trainer.TokenWeightedDPOTrainer`):

1. SFT on the chosen responses of the (noisy) training pairs, from the base → the ``sft`` row, and the
   init and (frozen) reference of every preference run;
2. the contrastive models the TIS-DPO weights need: SFT on the rejected responses (S), DPO (= the ``dpo``
   run) and DPO on the swapped pairs (D); scores and weights (:mod:`tidpo.apps.experiment.weightings`);
3. the preference runs: ``dpo``, ``tdpo2``, ``tis_dpo_*`` (six weightings), ``ti_dpo`` (full / no triplet /
   no prior / uniform / random weights), all from the SFT model with the same data order, steps, learning
   rate, β and seed;
4. metrics of each (:class:`~tidpo.apps.experiment.evaluate.Evaluator`), reward curve, weight AUCs.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch

from tidpo.apps.experiment.evaluate import LABEL_MODES, Evaluator
from tidpo.apps.experiment.metrics import weight_auc
from tidpo.apps.experiment.models import build_model, clone_model
from tidpo.apps.experiment.presets import METHOD_LABELS, TI_VARIANTS, TIS_WEIGHTINGS
from tidpo.apps.experiment.task import SyntheticTask, TaskConfig
from tidpo.apps.experiment.training import RewardCurve, ordered_dataset, run_trainer, tokenize_rows
from tidpo.apps.experiment.weightings import (
    BAD_TEMPLATE,
    GOOD_TEMPLATE,
    contrastive_weights,
    oracle_weights,
    random_weights,
    uniform_weights,
    with_weights,
)
from tidpo.data import swap_chosen_rejected
from tidpo.trainer import TokenWeightedDPOConfig

__all__ = ["run_cell"]

_TI_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TokenWeightedDPOConfig)
                if f.name in ("ti_lambda", "prior_sigma_div", "importance_scope", "ti_importance",
                              "ti_attribution_target")}


class _Cell:
    def __init__(self, config, seed: int, noise: float, base_path: Path, work_dir: Path, log):
        self.config, self.seed, self.noise, self.log = config, seed, noise, log
        self.work_dir = work_dir
        self.task = SyntheticTask(TaskConfig(**config.task_kwargs(), noise=noise, seed=seed))
        self.tokenizer = self.task.tokenizer
        self.base = build_model(self.task, config, seed=seed)
        self.base.load_state_dict(torch.load(base_path, map_location="cpu", weights_only=True)["state_dict"])
        self.base.eval().requires_grad_(False)
        self.evaluator = Evaluator(self.task, config, seed=seed)
        self.rows = [{k: row[k] for k in ("prompt", "chosen", "rejected")} for row in self.task.train_rows]
        self.runs: list[dict] = []
        self.helpers: list[dict] = []

    def ordered(self, rows: list[dict], steps: int):
        return ordered_dataset(tokenize_rows(rows, self.tokenizer), steps=steps, batch_size=self.config.batch_size,
                               seed=self.seed)

    def train(self, init, rows, *, loss: str, reference=None, curve: bool = False, **method):
        """Train a copy of ``init``; returns ``(policy, curve or None, train stats)``."""
        config = self.config
        sft = loss == "sft"
        steps, lr = (config.sft_steps, config.sft_lr) if sft else (config.steps, config.lr)
        policy = clone_model(init)
        policy.requires_grad_(True)
        callback = RewardCurve(self.evaluator.curve_reward, config.eval_every) if curve else None
        stats = run_trainer(policy, self.ordered(rows, steps), self.tokenizer, loss=loss, steps=steps, lr=lr,
                            config=config, seed=self.seed, work_dir=self.work_dir, ref_model=reference,
                            callbacks=[callback] if callback else [], **method)
        return policy, callback, stats

    def record(self, method: str, policy, reference, curve: RewardCurve, stats: dict, extra: dict | None = None):
        start = time.perf_counter()
        metrics = {**self.evaluator.metrics(policy, reference), **(extra or {})}
        seconds = {"train": stats["seconds"], "setup": stats["setup_seconds"], "eval": time.perf_counter() - start}
        run = {"method": method, "label": METHOD_LABELS[method], "seed": self.seed, "noise": self.noise,
               "metrics": metrics, "curve": curve.as_dict(), "train_loss": stats["train_loss"], "seconds": seconds}
        self.runs.append(run)
        total = sum(seconds.values())
        self.log(f"[seed {self.seed} noise {self.noise:.2f}] {METHOD_LABELS[method]:<18} "
                 f"acc {metrics['heldout_accuracy']:.3f}  reward {metrics['reward']:+.3f}  "
                 f"kl {metrics['kl']:6.2f}  ({total:.1f} s)")

    def helper(self, name: str, stats: dict) -> None:
        self.helpers.append({"name": name, "train_loss": stats["train_loss"], "seconds": stats["seconds"]})


def run_cell(config, seed: int, noise: float, base_path: str | Path, work_dir: str | Path, log=print) -> dict:
    """Every requested method for one (seed, noise level); see the module docstring.

    Returns ``{"seed", "noise", "seconds", "runs": [...], "helpers": [...], "weights": {...}, "base": {...}}``.
    """
    start = time.perf_counter()
    cell = _Cell(config, seed, noise, Path(base_path), Path(work_dir), log)
    methods = set(config.methods)
    need = {w for m, w in TIS_WEIGHTINGS.items() if m in methods}

    sft, curve, stats = cell.train(cell.base, cell.rows, loss="sft", curve="sft" in methods)
    if "sft" in methods:
        cell.record("sft", sft, cell.base, curve, stats)
    reference = clone_model(sft, frozen=True)
    models = {}
    swapped = [swap_chosen_rejected(row) for row in cell.rows]  # the negative models of the S / D pairs
    if "S" in need:
        models["sft_rejected"], _, stats = cell.train(cell.base, swapped, loss="sft")
        cell.helper("sft_rejected", stats)
    if "D" in need or "dpo" in methods:
        models["dpo"], curve, stats = cell.train(sft, cell.rows, loss="dpo", reference=reference,
                                                 curve="dpo" in methods)
        if "dpo" in methods:
            cell.record("dpo", models["dpo"], reference, curve, stats)
        else:
            cell.helper("dpo", stats)
    if "D" in need:
        models["dpo_swapped"], _, stats = cell.train(sft, swapped, loss="dpo", reference=reference)
        cell.helper("dpo_swapped", stats)

    weights, summaries = _weightings(cell, need, sft, models)
    del models
    train_labels = {mode: cell.task.key_labels(cell.task.train_rows, mode=mode) for mode in LABEL_MODES}
    for method, weighting in TIS_WEIGHTINGS.items():
        if method not in methods:
            continue
        auc = {f"weight_auc_{mode}": weight_auc(weights[weighting], train_labels[mode]) for mode in LABEL_MODES}
        policy, curve, stats = cell.train(sft, with_weights(cell.rows, weights[weighting]), loss="tis_dpo",
                                          reference=reference, curve=True)
        cell.record(method, policy, reference, curve, stats, auc)
    if "tdpo2" in methods:
        policy, curve, stats = cell.train(sft, cell.rows, loss="tdpo2", reference=reference, curve=True)
        cell.record("tdpo2", policy, reference, curve, stats)
    for method, overrides in TI_VARIANTS.items():
        if method not in methods:
            continue
        knobs = {**_TI_DEFAULTS, **{k: v for k, v in overrides.items() if k in _TI_DEFAULTS}}
        attribution = {"lam": knobs["ti_lambda"], "sigma_div": knobs["prior_sigma_div"],
                       "scope": knobs["importance_scope"], "importance": knobs["ti_importance"],
                       "target": knobs["ti_attribution_target"], "reference": reference}
        at_init = cell.evaluator.ti_weight_auc(sft, **attribution)
        policy, curve, stats = cell.train(sft, cell.rows, loss="ti_dpo", reference=reference, curve=True,
                                          **overrides)
        final = cell.evaluator.ti_weight_auc(policy, **attribution)
        extra = {**{f"weight_auc_{m}": final[m] for m in LABEL_MODES},
                 **{f"weight_auc_{m}_init": at_init[m] for m in LABEL_MODES}}
        cell.record(method, policy, reference, curve, stats, extra)
    base_metrics = cell.evaluator.metrics(cell.base, cell.base)
    data = {"train_flipped": sum(r["flipped"] for r in cell.task.train_rows),
            "heldout_chosen_reward": _mean_reward(cell.task, cell.task.heldout_rows, "chosen"),
            "heldout_rejected_reward": _mean_reward(cell.task, cell.task.heldout_rows, "rejected")}
    return {"seed": seed, "noise": noise, "seconds": time.perf_counter() - start, "runs": cell.runs,
            "helpers": cell.helpers, "weights": summaries, "base": base_metrics, "data": data}


def _weightings(cell: _Cell, need: set[str], sft, models: dict) -> tuple[dict, dict]:
    """The weighted training rows of every needed weighting, and the score summaries of P / S / D."""
    task, rows, tokenizer = cell.task, cell.rows, cell.tokenizer
    weights, summaries = {}, {}
    if "P" in need:
        weights["P"], summaries["P"] = contrastive_weights(cell.base, cell.base, tokenizer, rows,
                                                           positive_template=GOOD_TEMPLATE,
                                                           negative_template=BAD_TEMPLATE)
    if "S" in need:
        weights["S"], summaries["S"] = contrastive_weights(sft, models["sft_rejected"], tokenizer, rows)
    if "D" in need:
        weights["D"], summaries["D"] = contrastive_weights(models["dpo"], models["dpo_swapped"], tokenizer, rows)
    if "oracle" in need:
        weights["oracle"] = oracle_weights(task, rows)
    if "uniform" in need:
        weights["uniform"] = uniform_weights(task, rows)
    if "random" in need:
        weights["random"] = random_weights(task, rows, seed=1_000_003 * cell.seed)
    return weights, summaries


def _mean_reward(task, rows, side: str) -> float:
    return sum(task.response_reward(r["prompt"], r[side]) for r in rows) / len(rows)
