"""benchmarks/ti_dpo_cost.py's arithmetic (ratios, floor, table) on fixed timings: the measured run itself trains
SmolLM2 for minutes and is not part of the suite."""

from __future__ import annotations

import pytest

from benchmarks import ti_dpo_cost


def fake_run(variant, step, parts, decode=None, tokens=None):
    median = {"optimizer_step": step, "step": step - 0.1, **{p: parts.get(p, 0.0) for p in ti_dpo_cost.PARTS}}
    median["loss_and_backward"] = median["step"] - sum(parts.values())
    median["optimizer"] = 0.1
    return {"variant": variant, "median_s": median, "extra_peak_bytes": 100 * ti_dpo_cost.MiB,
            "decode_step_s": decode, "anchor_max_new_tokens": tokens}


def test_ratios_floor_and_table():
    runs = [fake_run("dpo", 2.0, {"policy_forward": 0.8, "reference_forward": 0.7}),
            fake_run("ti_dpo", 8.0, {"policy_forward": 0.9, "reference_forward": 0.7, "attribution": 1.0,
                                     "anchor_sampling": 3.0, "anchor_scoring": 1.5}, decode=0.05, tokens=32)]
    assert ti_dpo_cost.ratios(runs) == {"ti_dpo_vs_dpo": 4.0}
    floor = ti_dpo_cost.floor(runs)
    assert floor["parts_s"] == {"dpo_step": 2.0, "attribution_backward": 1.0, "anchor_sampling": 1.6,
                                "anchor_scoring": 1.5}
    assert floor["ratio_to_dpo"] == pytest.approx(6.1 / 2.0)
    results = {"versions": {"torch": "x"}, "device": {"name": "cpu"}, "date": "2026-12-01", "steps": 8,
               "runs": runs, "ratios": ti_dpo_cost.ratios(runs), "floor": floor}
    text = ti_dpo_cost.markdown(results)
    assert "| ti_dpo | 8.00 | 4.00× | 0.90 (11%) |" in text and "**3.05× DPO**" in text
    assert ti_dpo_cost.floor(runs[:1]) == {}


def test_bad_arguments_are_refused():
    with pytest.raises(SystemExit, match="--variants must come from"):
        ti_dpo_cost.main(["--variants", "dpo,kto"])
    with pytest.raises(SystemExit, match="--steps must be >= 2"):
        ti_dpo_cost.main(["--steps", "1"])


def test_rounds_pool_every_timed_step():
    def step(seconds):
        return {"optimizer_step": seconds, "step": seconds - 0.5, "anchor_sampling": seconds / 2}

    first = {"variant": "ti_dpo", "steps": [step(20.0), step(10.0), step(12.0)], "decode_step_s": 0.1,
             "extra_peak_bytes": 1}
    first["timed_steps"] = first["steps"][1:]
    second = {**first, "steps": [step(30.0), step(8.0)], "decode_step_s": 0.3}
    second["timed_steps"] = second["steps"][1:]
    merged = ti_dpo_cost.pooled([first, second])
    assert merged["rounds"] == 2 and len(merged["timed_steps"]) == 3 and len(merged["steps"]) == 5
    assert merged["median_s"]["optimizer_step"] == 10.0  # median of 10, 12 and 8; warm-up steps left out
    assert merged["median_s"]["anchor_sampling"] == 5.0
    assert merged["median_s"]["loss_and_backward"] == pytest.approx(9.5 - 5.0)
    assert merged["decode_step_s"] == pytest.approx(0.2)
    with pytest.raises(SystemExit, match="--rounds must be >= 1"):
        ti_dpo_cost.main(["--rounds", "0"])
