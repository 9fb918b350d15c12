"""The fused-head benchmarks (benchmarks/fused_head.py, benchmarks/trainer_vs_trl.py) at toy size: every cell
recorded, the agreement gate before timing, peers recorded as skipped when not installed, and the trainer run
of the fused and the materialised head giving the same losses."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest

from benchmarks import fused_head, trainer_vs_trl

TOY = ["--tokens", "64", "--hidden", "16", "--vocab", "301", "--repeats", "1"]


@pytest.fixture(scope="module")
def toy_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("fused-head")
    assert fused_head.main([*TOY, "--dtypes", "float32,bfloat16", "--out", str(out), "--name", "toy"]) == 0
    return json.loads((out / "toy.json").read_text()), (out / "toy.md").read_text()


def test_every_cell_is_recorded_and_tidpos_agree_before_timing(toy_results):
    results, text = toy_results
    cells = {(c["op"], c["dtype"], c["provider"]): c for c in results["cells"]}
    assert set(cells) == {(op, dtype, provider) for op in fused_head.OPS for dtype in ("float32", "bfloat16")
                          for provider in fused_head.PROVIDERS}
    for (op, dtype, provider), cell in cells.items():
        if provider.startswith("tidpo"):
            assert cell["status"] == "ok", (op, dtype, provider, cell["reason"])
            assert cell["agreement"]["ok"] and len(cell["seconds"]) == 1
        elif cell["status"] == "skipped":
            assert cell["reason"] and not cell["seconds"]
    for op in fused_head.OPS:
        assert f"{op}/float32/tidpo_fused_vs_tidpo_materialised" in results["ratios"]
    assert results["shape"] == {"N": 64, "H": 16, "V": 301, "pairs_for_dpo": fused_head.PAIRS}
    assert "| logps | float32 | tidpo_fused |" in text


@pytest.mark.parametrize("peer, module", [("trl", "trl"), ("liger", "liger_kernel")])
def test_a_peer_that_is_not_installed_is_recorded_as_skipped(toy_results, peer, module):
    cells = [c for c in toy_results[0]["cells"] if c["provider"] == peer]
    if importlib.util.find_spec(module) is None:
        assert all(c["status"] == "skipped" and "not installed" in c["reason"] for c in cells)
    else:  # installed: every cell it has must have agreed with float64 before it was timed
        assert all(c["agreement"]["ok"] for c in cells if c["status"] == "ok")


def test_a_provider_that_disagrees_is_not_timed(tmp_path, monkeypatch):
    real = fused_head.value_fn

    def off_by_a_little(op, provider, inputs):
        fn = real(op, provider, inputs)
        return (lambda h, w: fn(h, w) + 1e-3) if provider == "tidpo_materialised" else fn

    monkeypatch.setattr(fused_head, "value_fn", off_by_a_little)
    fused_head.main([*TOY, "--dtypes", "float32", "--ops", "logps", "--out", str(tmp_path), "--name", "bad"])
    cells = {c["provider"]: c for c in json.loads((tmp_path / "bad.json").read_text())["cells"]}
    assert cells["tidpo_materialised"]["status"] == "skipped"
    assert "disagrees" in cells["tidpo_materialised"]["reason"] and not cells["tidpo_materialised"]["seconds"]
    assert cells["tidpo_fused"]["status"] == "ok"


def test_fresh_process_memory_of_the_fused_head_is_below_the_materialised_heads():
    """At V = 32,000 the materialised head's fp32 logits and their gradient (2 x 16 MiB at N = 128) dominate;
    the fused head holds one tile."""
    fused = fused_head.measure_memory("logps", "tidpo_fused", 128, 64, 32000, "float32")
    materialised = fused_head.measure_memory("logps", "tidpo_materialised", 128, 64, 32000, "float32")
    assert materialised["extra_peak_bytes"] >= 2 * 128 * 32000 * 4
    assert fused["extra_peak_bytes"] < materialised["extra_peak_bytes"] / 2


def test_bad_arguments_are_refused():
    with pytest.raises(SystemExit, match="--tokens must be a multiple of 8"):
        fused_head.main(["--tokens", "63"])
    with pytest.raises(SystemExit, match="unknown ops"):
        fused_head.main([*TOY, "--ops", "logps,nope"])
    with pytest.raises(SystemExit, match="--providers must include tidpo_fused"):
        fused_head.main([*TOY, "--providers", "trl"])


@pytest.mark.slow
def test_trainer_runs_fused_and_materialised_give_the_same_losses(tmp_path):
    providers = "tidpo,tidpo_materialised" + (",trl" if importlib.util.find_spec("trl") else "")
    assert trainer_vs_trl.main(["--steps", "2", "--pairs", "2", "--reply-tokens", "24", "--lora-last-layers", "2",
                                "--providers", providers, "--out", str(tmp_path), "--name", "toy"]) == 0
    runs = {r["provider"]: r for r in json.loads((tmp_path / "toy.json").read_text())["runs"]}
    fused, materialised = runs["tidpo"], runs["tidpo_materialised"]
    assert fused["reply_tokens_min"] >= 24
    assert len(fused["losses"]) == len(fused["step_seconds"]) == 2
    assert fused["losses"][0] == pytest.approx(math.log(2), abs=1e-6)  # LoRA B = 0: the policy is the reference
    assert fused["losses"] == pytest.approx(materialised["losses"], rel=1e-5)
    if "trl" in runs:  # same model, adapters, data order and optimiser: TRL's DPOTrainer takes the same steps
        assert runs["trl"]["losses"] == pytest.approx(fused["losses"], rel=1e-4)
    assert "tidpo_vs_tidpo_materialised" in json.loads((tmp_path / "toy.json").read_text())["ratios"]


@pytest.mark.parametrize("op", ["logps", "kl"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_the_low_precision_tolerance_is_the_materialised_heads_own_error(op, dtype):
    """The gate's materialised error (fp32 product rounded once) is the real low-precision GEMM's error."""
    import torch
    import torch.nn.functional as F

    import tidpo

    dt = getattr(torch, dtype)
    inputs = fused_head.make_inputs(op, 256, 64, 5003, dt)
    truth = fused_head.truth_fn(op, inputs)(inputs["h"].double(), inputs["weight"].double(), torch.arange(256))
    if op == "kl":
        real = tidpo.token_kl(F.linear(inputs["h_ref"], inputs["weight"]), F.linear(inputs["h"], inputs["weight"]),
                              inputs["labels"])
    else:
        real = tidpo.token_logps(F.linear(inputs["h"], inputs["weight"]), inputs["labels"])
    emulated = fused_head.materialised_values(op, inputs, dt)
    real_err = float((real.double() - truth).abs().max())
    emulated_err = float((emulated.double() - truth).abs().max())
    assert real_err > 1e-5  # the rounding of the logits is visible at all
    assert math.isclose(emulated_err, real_err, rel_tol=0.05)
