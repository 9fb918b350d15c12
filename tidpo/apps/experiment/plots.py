"""The experiment's two figures (matplotlib, Agg backend): reward vs step and weight AUC per method."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from tidpo.apps.experiment.metrics import mean_std
from tidpo.apps.experiment.presets import METHOD_LABELS, METHODS, TI_VARIANTS, TIS_WEIGHTINGS

__all__ = ["plot_reward_curves", "plot_weight_auc"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _style(method: str, index: int) -> dict:
    import matplotlib

    color = matplotlib.colormaps["tab20"](index % 20)
    if method in TI_VARIANTS:
        return {"color": color, "linestyle": "--"}
    if method in TIS_WEIGHTINGS:
        return {"color": color, "linestyle": "-"}
    return {"color": color, "linestyle": "-.", "linewidth": 2.0}


def plot_reward_curves(results: dict, path: str | Path) -> Path:
    """One panel per noise level: mean (over seeds) sampled hidden reward vs step, a line per method.

    The SFT row's final reward is a dotted horizontal line (every preference run starts from it at step 0).
    """
    plt = _pyplot()
    runs = results["runs"]
    noises = sorted({run["noise"] for run in runs})
    fig, axes = plt.subplots(1, len(noises), figsize=(5.5 * len(noises), 4.5), squeeze=False, sharey=True)
    for ax, noise in zip(axes[0], noises, strict=True):
        curves: dict = defaultdict(list)
        sft = []
        for run in runs:
            if run["noise"] != noise:
                continue
            if run["method"] == "sft":
                sft.append(run["metrics"]["reward"])
            else:
                curves[run["method"]].append(run["curve"])
        for index, method in enumerate(METHODS):
            if method not in curves:
                continue
            steps = curves[method][0]["step"]
            usable = [c["reward"] for c in curves[method] if c["step"] == steps]
            mean = [sum(values) / len(values) for values in zip(*usable, strict=True)]
            ax.plot(steps, mean, label=METHOD_LABELS[method], **_style(method, index))
        if sft:
            ax.axhline(sum(sft) / len(sft), color="black", linestyle=":", label="SFT (final)")
        ax.set_title(f"label noise {noise:.0%}")
        ax.set_xlabel("preference step")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("mean hidden reward of samples (curve prompts)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=8)
    fig.tight_layout(rect=(0, 0, 0.82, 1))
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_weight_auc(runs: list[dict], path: str | Path) -> Path:
    """Bars of the weight ROC-AUC per weighting method and noise level (mean ± std over seeds).

    Top: ``decisive`` labels, bottom: ``key`` labels; TIS-DPO bars are the training weights, TI-DPO bars the
    final policy's weights on the held-out pairs (attribution, or the uniform / random ablation's). The dashed
    line is chance (0.5).
    """
    plt = _pyplot()
    methods = [m for m in (*TIS_WEIGHTINGS, *TI_VARIANTS) if any(r["method"] == m for r in runs)]
    noises = sorted({run["noise"] for run in runs})
    fig, axes = plt.subplots(2, 1, figsize=(max(6.0, 1.1 * len(methods) + 2), 7), squeeze=False, sharex=True)
    width = 0.8 / max(1, len(noises))
    for ax, mode in zip(axes[:, 0], ("decisive", "key"), strict=True):
        for j, noise in enumerate(noises):
            means, stds = [], []
            for method in methods:
                values = [r["metrics"][f"weight_auc_{mode}"] for r in runs
                          if r["method"] == method and r["noise"] == noise and f"weight_auc_{mode}" in r["metrics"]]
                mean, std = mean_std(values) if values else (float("nan"), 0.0)
                means.append(mean)
                stds.append(std)
            positions = [i - 0.4 + width * (j + 0.5) for i in range(len(methods))]
            ax.bar(positions, means, width=width, yerr=stds, capsize=2, label=f"noise {noise:.0%}")
        ax.axhline(0.5, color="black", linestyle="--", linewidth=1)
        ax.set_ylim(0, 1)
        ax.set_ylabel(f"weight ROC-AUC ({mode})")
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    axes[1][0].set_xticks(range(len(methods)))
    axes[1][0].set_xticklabels([METHOD_LABELS[m] for m in methods], rotation=30, ha="right", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
