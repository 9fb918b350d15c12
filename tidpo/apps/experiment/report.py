"""``results.md`` (tables and computed orderings) and the two plots, from the results dict of a run.

Tables: one per noise level, a row per method, mean ± sample std over seeds of each metric. Orderings: the
papers' ablation claims checked on the data (TIS-DPO Table 2: random < uniform < estimated; TI-DPO Table 2:
full > no triplet > uniform > random, and full > no prior), on the seed means and seed by seed.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from tidpo.apps.experiment.metrics import mean_std
from tidpo.apps.experiment.presets import METHOD_LABELS, METHODS

__all__ = ["COLUMNS", "ORDERING_METRICS", "orderings", "summarize", "write_report"]

#: Table columns: (metric key, header, format).
COLUMNS = (
    ("heldout_accuracy", "held-out acc", "{:.3f}"),
    ("reward", "sampled reward", "{:+.3f}"),
    ("kl", "KL(π‖ref)", "{:.2f}"),
    ("weight_auc_decisive", "weight AUC (decisive)", "{:.3f}"),
    ("weight_auc_key", "weight AUC (key)", "{:.3f}"),
    ("weight_auc_decisive_init", "AUC (decisive) at init", "{:.3f}"),
)
#: Metrics the ordering checks use (higher is better for both).
ORDERING_METRICS = (("reward", "sampled reward", "{:+.3f}"), ("heldout_accuracy", "held-out accuracy", "{:.3f}"))
#: The claimed orderings, worst first: (name, [methods]).
CLAIMS = (
    ("TIS-DPO Table 2, estimated = P", ["tis_dpo_random", "tis_dpo_uniform", "tis_dpo_p"]),
    ("TIS-DPO Table 2, estimated = S", ["tis_dpo_random", "tis_dpo_uniform", "tis_dpo_s"]),
    ("TIS-DPO Table 2, estimated = D", ["tis_dpo_random", "tis_dpo_uniform", "tis_dpo_d"]),
    ("TIS-DPO, oracle weights", ["tis_dpo_random", "tis_dpo_uniform", "tis_dpo_oracle"]),
    ("TI-DPO Table 2", ["ti_dpo_random", "ti_dpo_uniform", "ti_dpo_no_triplet", "ti_dpo"]),
    # TDPO2 is TI-DPO's loss with all-ones weights and no triplet term.
    ("TI-DPO vs its base loss", ["tdpo2", "ti_dpo"]),
    ("TI-DPO Table 2, prior", ["ti_dpo_no_prior", "ti_dpo"]),
    ("weighting vs DPO (TIS-DPO(D))", ["dpo", "tis_dpo_d"]),
    ("weighting vs DPO (TI-DPO)", ["dpo", "ti_dpo"]),
    ("preference training vs SFT", ["sft", "dpo"]),
)


def summarize(runs: list[dict]) -> dict:
    """``{noise: {method: {metric: [values over seeds, by seed order]}}}`` and the seeds, per noise."""
    table: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(dict)))
    for run in runs:
        for key, value in run["metrics"].items():
            table[run["noise"]][run["method"]][key][run["seed"]] = value
    return table


def _cell(values: dict, fmt: str) -> str:
    if not values:
        return "–"
    mean, std = mean_std(list(values.values()))
    return f"{fmt.format(mean)} ± {std:.3f}"


def _tables(runs: list[dict]) -> list[str]:
    table = summarize(runs)
    methods = [m for m in METHODS if any(run["method"] == m for run in runs)]
    lines = []
    for noise in sorted(table):
        seeds = sorted({run["seed"] for run in runs if run["noise"] == noise})
        lines += [f"### label noise {noise:.0%} ({len(seeds)} seeds: {', '.join(map(str, seeds))})", "",
                  "| method | " + " | ".join(header for _, header, _ in COLUMNS) + " |",
                  "|---|" + "---:|" * len(COLUMNS)]
        for method in methods:
            metrics = table[noise][method]
            cells = [_cell(metrics.get(key, {}), fmt) for key, _, fmt in COLUMNS]
            lines.append(f"| {METHOD_LABELS[method]} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def _holds(values: list[float]) -> bool:
    return all(a < b for a, b in zip(values, values[1:], strict=False))


def orderings(runs: list[dict]) -> list[dict]:
    """Every claim of :data:`CLAIMS` whose methods ran, per noise level and metric, checked on the data.

    Each entry: ``claim``, ``noise``, ``metric``, ``methods`` (worst first), ``means``, ``holds`` (strict
    chain on the seed means), ``gaps`` (consecutive differences of the means), ``seeds_holding`` /
    ``seeds`` (the chain checked seed by seed).
    """
    table = summarize(runs)
    out = []
    for noise in sorted(table):
        for claim, chain in CLAIMS:
            if not all(method in table[noise] for method in chain):
                continue
            for metric, _, _ in ORDERING_METRICS:
                per_method = [table[noise][method][metric] for method in chain]
                seeds = sorted(set.intersection(*(set(values) for values in per_method)))
                if not seeds:
                    continue
                means = [sum(values[s] for s in seeds) / len(seeds) for values in per_method]
                holding = sum(_holds([values[s] for values in per_method]) for s in seeds)
                out.append({"claim": claim, "noise": noise, "metric": metric, "methods": list(chain),
                            "means": means, "holds": _holds(means),
                            "gaps": [b - a for a, b in zip(means, means[1:], strict=False)],
                            "seeds_holding": holding, "seeds": len(seeds)})
    return out


def _ordering_lines(runs: list[dict]) -> list[str]:
    formats = {metric: (name, fmt) for metric, name, fmt in ORDERING_METRICS}
    lines = ["## Orderings (computed from the runs above)", "",
             "Each line checks a claimed strict ordering (worst first) on the seed means of one metric; "
             "'gaps' are the differences between consecutive means, 'seeds' how many seeds show the whole "
             "ordering. In the TIS-DPO lines 'uniform' and 'random' are TIS-DPO runs (DPO loss with fixed "
             "all-ones / random [0.7, 1.3] token weights; like every TIS-DPO run they give the EOS weight 0, so "
             "'uniform' is not plain DPO). In the TI-DPO lines 'uniform' and 'random' are TI-DPO runs (its TDPO2-style "
             "loss and triplet term) with all-ones weights / U(0, 1) scores rescaled to mean 1 instead of the "
             "gradient attribution; TDPO2 is TI-DPO's loss with all-ones weights and no triplet term.",
             ""]
    checks = orderings(runs)
    if not checks:
        return lines + ["(no claim has all of its methods in this run)", ""]
    for noise in sorted({c["noise"] for c in checks}):
        lines.append(f"**label noise {noise:.0%}**")
        lines.append("")
        for check in (c for c in checks if c["noise"] == noise):
            name, fmt = formats[check["metric"]]
            chain = " < ".join(f"{METHOD_LABELS[m]} ({fmt.format(v)})"
                               for m, v in zip(check["methods"], check["means"], strict=True))
            gaps = ", ".join(f"{g:+.3f}" for g in check["gaps"])
            verdict = "**holds**" if check["holds"] else "does not hold"
            lines.append(f"- {check['claim']}, {name}: {chain}: {verdict} (gaps {gaps}; "
                         f"{check['seeds_holding']}/{check['seeds']} seeds)")
        lines.append("")
    return lines


def _summary_lines(results: dict) -> list[str]:
    config, timing = results["config"], results["timing"]
    lines = ["# Token weighting on a synthetic preference task with known key tokens", "",
             f"Preset `{config['preset']}`: {len(config['methods'])} methods × {len(config['seeds'])} seeds × "
             f"noise {', '.join(f'{n:.0%}' for n in config['noise_levels'])}; {config['num_train']} training / "
             f"{config['num_heldout']} held-out pairs, {config['num_topics']} topics, {config['num_words']} words "
             f"({config['keys_per_topic']} keys per topic, key density {config['key_density']}); Llama "
             f"{config['hidden_size']}×{config['num_layers']} layers; SFT {config['sft_steps']} steps, every "
             f"preference run {config['steps']} steps of {config['batch_size']} pairs at lr {config['lr']}, "
             f"β {config['beta']}. Wall time {timing['wall_seconds'] / 60:.1f} min "
             f"({results['versions']['torch']}, {config['workers']} worker(s)).", ""]
    if not results.get("all_methods", True):
        lines += ["**Only a subset of the methods ran** (`--methods`): the orderings below cover what ran.", ""]
    lines += ["Metrics (mean ± std over seeds): *held-out acc* = share of held-out pairs whose implicit reward "
              "Σ log π − log π_ref is larger for the chosen response (SFT: reference = pretrained base); "
              "*sampled reward* = mean hidden reward of responses sampled at temperature 1 on the held-out "
              "prompts; *KL(π‖ref)* = Monte-Carlo KL on those samples; *weight AUC* = ROC-AUC of the token "
              "weights against the key tokens — *decisive*: words that support the stated preference (+1 "
              "words of the chosen, −1 words of the rejected response), *key*: every ±1 word (TIS-DPO: the "
              "training weights; TI-DPO: the weights of the final policy on the held-out pairs — gradient "
              "attribution, or the uniform / random ablation's — and 'at init' with the SFT model).", ""]
    base = defaultdict(list)
    for cell in results["cells"]:
        base[cell["noise"]].append(cell["base"]["reward"])
    if base:
        lines += ["Pretrained base model, sampled reward: " + "; ".join(
            f"noise {n:.0%}: {mean_std(v)[0]:+.3f}" for n, v in sorted(base.items())) + ".", ""]
    return lines


def write_report(results: dict, out_dir: str | Path) -> list[Path]:
    """Write ``results.md``, ``reward_vs_step.png`` and ``weight_auc.png``; returns their paths."""
    from tidpo.apps.experiment.plots import plot_reward_curves, plot_weight_auc

    out_dir = Path(out_dir)
    runs = results["runs"]
    lines = _summary_lines(results) + ["## Results", ""] + _tables(runs) + _ordering_lines(runs)
    lines += ["## Plots", "", "![reward vs step](reward_vs_step.png)", "", "![weight AUC](weight_auc.png)", ""]
    markdown = out_dir / "results.md"
    markdown.write_text("\n".join(lines))
    curves = plot_reward_curves(results, out_dir / "reward_vs_step.png")
    aucs = plot_weight_auc(runs, out_dir / "weight_auc.png")
    return [markdown, curves, aucs]
