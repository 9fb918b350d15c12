"""End to end: the ``smoke`` preset of the token-weighting experiment, its outputs, and CLI validation."""

from __future__ import annotations

import json
import math

import pytest

from tidpo.apps.experiment.presets import METHODS, TI_VARIANTS, TIS_WEIGHTINGS, make_config
from tidpo.cli import main as tidpo_main


def experiment_main(argv: list[str]) -> int:
    return tidpo_main(["experiment", *argv])

RUN_KEYS = {"method", "label", "seed", "noise", "metrics", "curve", "train_loss", "seconds"}
CORE_METRICS = ("heldout_accuracy", "heldout_margin", "reward", "kl", "response_length", "eos_rate")


@pytest.fixture(scope="module")
def smoke_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("experiment")
    assert experiment_main(["--preset", "smoke", "--output-dir", str(out)]) == 0
    return out, json.loads((out / "results.json").read_text())


def test_smoke_outputs_and_schema(smoke_results):
    out, results = smoke_results
    for name in ("results.md", "reward_vs_step.png", "weight_auc.png"):
        assert (out / name).stat().st_size > 0, name
    config = make_config("smoke")
    assert results["config"]["preset"] == "smoke" and results["all_methods"] is True
    assert {"python", "torch", "transformers", "tidpo"} <= set(results["versions"])
    assert results["timing"]["wall_seconds"] > 0
    assert len(results["pretrain"]) == len(config.seeds)
    assert len(results["cells"]) == len(config.seeds) * len(config.noise_levels)
    runs = results["runs"]
    expected = {(m, s, n) for m in METHODS for s in config.seeds for n in config.noise_levels}
    assert {(r["method"], r["seed"], r["noise"]) for r in runs} == expected
    for run in runs:
        assert set(run) >= RUN_KEYS, run["method"]
        for key in CORE_METRICS:
            assert math.isfinite(run["metrics"][key]), (run["method"], key)
        assert 0.0 <= run["metrics"]["heldout_accuracy"] <= 1.0
        curve = run["curve"]
        assert curve["step"][0] == 0 and len(curve["step"]) == len(curve["reward"]) >= 2
        assert all(math.isfinite(v) for v in curve["reward"])
        weighted = run["method"] in TIS_WEIGHTINGS or run["method"] in TI_VARIANTS
        for mode in ("decisive", "key"):
            value = run["metrics"].get(f"weight_auc_{mode}")
            assert (value is not None) == weighted, (run["method"], mode)
            if weighted:
                assert 0.0 <= value <= 1.0
        if run["method"] in TI_VARIANTS:
            assert 0.0 <= run["metrics"]["weight_auc_decisive_init"] <= 1.0
    markdown = (out / "results.md").read_text()
    assert "label noise 0%" in markdown and "label noise 40%" in markdown and "## Orderings" in markdown
    assert not (out / "tmp").exists()


def test_smoke_weight_aucs(smoke_results):
    """The oracle weights (hidden reward, rank transform) separate the decisive tokens; uniform ones cannot."""
    _, results = smoke_results
    for run in results["runs"]:
        if run["method"] == "tis_dpo_oracle":
            assert run["metrics"]["weight_auc_decisive"] > 0.9, run["noise"]
        if run["method"] == "tis_dpo_uniform":
            assert run["metrics"]["weight_auc_decisive"] == 0.5
            assert run["metrics"]["weight_auc_key"] == 0.5


@pytest.mark.parametrize(("argv", "flag"), [
    (["--methods", "dpo", "nope"], "--methods"),
    (["--noise", "0.5"], "--noise"),
    (["--noise", "-0.1"], "--noise"),
    (["--seeds", "0", "0"], "--seeds"),
    (["--max-steps", "0"], "--max-steps"),
    (["--steps", "0"], "--max-steps"),  # the deprecated alias: the error names the current flag
])
def test_bad_cli_input_names_the_flag(argv, flag, capsys, tmp_path):
    assert experiment_main([*argv, "--preset", "smoke", "--output-dir", str(tmp_path)]) == 2
    # One error line (after the one-line deprecation warning when the old flag was used).
    lines = capsys.readouterr().err.strip().splitlines()
    if "--steps" in argv:
        assert lines.pop(0).startswith("tidpo experiment: warning: --steps is deprecated")
    assert len(lines) == 1 and lines[0].startswith("tidpo experiment: error: ") and flag in lines[0], lines
    assert not (tmp_path / "results.json").exists()
