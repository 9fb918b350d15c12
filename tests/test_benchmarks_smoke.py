"""Smoke test of the benchmark suite (benchmarks/): the runner, its JSON / PNG / markdown outputs, the bytes
formulas, the provider agreement check and the pytest-benchmark collection.

``python -m benchmarks.run --set smoke`` runs in-process once (module fixture) on tiny float32 shapes with
one thread; its timings mean nothing, its structure is what is checked. torch.compile is part of it
(every eager function compiled once for the smoke shape; most of this module's time on a cold
inductor cache).
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
import math
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import cases, run
from benchmarks.shapes import ALL_OPS, LOSSES, MODES, OPS, PROVIDERS, SETS
from benchmarks.suite import cell_params

REPO_ROOT = Path(__file__).resolve().parent.parent
SMOKE = SETS["smoke"]
CELL_FIELDS = {
    "op", "kind", "mode", "provider", "dtype", "N", "V", "status", "reason", "median_ms", "p20_ms", "p80_ms",
    "min_ms", "reps", "bytes", "bytes_formula", "gbs", "pct_bandwidth", "extra_peak_bytes", "backend",
    "speedup_of_tidpo", "like_for_like",
}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("bench")
    rc = run.main(["--set", "smoke", "--out", str(out), "--name", "smoke", "--markdown-out", str(out / "table.md")])
    assert rc == 0
    return out, json.loads((out / "smoke.json").read_text())


def _cells(results: dict) -> dict[tuple, dict]:
    return {(c["op"], c["mode"], c["provider"], c["dtype"], c["N"], c["V"]): c for c in results["cells"]}


def test_json_has_every_cell_with_fields_and_statuses(smoke):
    _, results = smoke
    cells = _cells(results)
    expected = {(op, mode, provider, dtype, n, v)
                for op in ALL_OPS for mode in MODES for provider in PROVIDERS for dtype in SMOKE.dtypes
                for n, v in (SMOKE.op_shapes if op in OPS else SMOKE.loss_shapes)}
    assert set(cells) == expected and len(results["cells"]) == len(expected)
    liger_installed = cases.liger_version() is not None
    for key, c in cells.items():
        op, mode, provider = key[:3]
        assert set(c) >= CELL_FIELDS, f"{key}: missing {CELL_FIELDS - set(c)}"
        if provider == "liger":  # CPU: never runs, always with a reason
            assert c["status"] == "skipped", key
            if op in ("kl", "tdpo2", "ti_dpo"):
                assert "KL" in c["reason"], key
            else:
                assert ("needs CUDA" if liger_installed else "not installed") in c["reason"], key
            continue
        assert c["status"] == "ok", f"{key}: {c['reason']}"
        assert c["reps"] >= SMOKE.min_reps
        assert 0 < c["min_ms"] <= c["p20_ms"] <= c["median_ms"] <= c["p80_ms"]
        assert math.isclose(c["gbs"], c["bytes"] / (c["median_ms"] * 1e-3) / 1e9, rel_tol=1e-9)
        assert c["pct_bandwidth"] is None  # CPU: no peak bandwidth is invented
        assert c["kind"] == ("loss" if op in LOSSES else "op")
        if provider == "tidpo":
            assert c["backend"] in ("torch", "logps=torch,kl=torch"), key  # auto on CPU: the chunked path
            assert c["speedup_of_tidpo"] is None
        else:
            tidpo = cells[(op, mode, "tidpo", *key[3:])]
            assert math.isclose(c["speedup_of_tidpo"], c["median_ms"] / tidpo["median_ms"], rel_tol=1e-9)
        if provider == "compile":
            assert c["backend"] == "inductor" and c["compile_seconds"] is not None and c["compile_seconds"] > 0


def test_json_header(smoke):
    _, results = smoke
    assert results["complete"] is True and results["set"] == "smoke"
    dt.datetime.fromisoformat(results["date"])
    assert results["command"].startswith("python -m benchmarks.run") and "--set smoke" in results["command"]
    assert results["host"]
    for name in ("python", "torch", "triton", "transformers", "tidpo"):
        assert results["versions"][name], name
    device = results["device"]
    assert device["type"] == "cpu" and device["name"].startswith("CPU") and device["cpu_model"]
    assert device["bandwidth_gbs"] is None and "CPU" in device["bandwidth_source"]
    assert device["measured_copy_bandwidth_gbs"] > 0 and "measured copy bandwidth" in device[
        "measured_copy_bandwidth_note"]
    assert set(results["formulas"]) == set(ALL_OPS)
    for op, f in results["formulas"].items():
        assert set(f["bytes"]) == set(MODES) and f["explanation"], op
    assert results["wall_seconds"] > 0


def test_bytes_formulas_match_hand_computed_values(smoke):
    _, results = smoke
    cells = _cells(results)
    n, v = SMOKE.op_shapes[0]
    # fp32 logits: s = 4 bytes.
    assert cells[("kl", "full", "tidpo", "float32", n, v)]["bytes"] == 5 * 4 * n * v  # read p, q; then p, q, dq
    assert cells[("logps", "bwd", "eager", "float32", n, v)]["bytes"] == 2 * 4 * n * v  # read x, write dx
    n, v = SMOKE.loss_shapes[0]
    assert cells[("tdpo2", "fwd", "tidpo", "float32", n, v)]["bytes"] == 4 * 4 * n * v  # logps + KL + ref logps
    assert cells[("dpo", "full", "compile", "float32", n, v)]["bytes"] == 3 * 4 * n * v
    assert cells[("ti_dpo", "full", "eager", "float32", n, v)]["bytes_formula"] == "9*s*N*V"
    # bf16 at a real shape: 3 * 2 bytes * 4096 * 128256.
    assert cases.bytes_moved("logps", "full", 4096, 128256, "bfloat16") == 3_152_019_456
    assert cases.bytes_moved("kl", "bwd", 16384, 32000, torch.bfloat16) == 3 * 2 * 16384 * 32000


def test_agreement_of_every_provider_with_tidpo(smoke):
    """Recorded by the run: eager and compile match tidpo's loss/output and logits gradient (fp32)."""
    _, results = smoke
    checks = {(a["op"], a["provider"]): a for a in results["agreement"]}
    assert set(checks) == {(op, p) for op in ALL_OPS for p in PROVIDERS if p != "tidpo"}
    for (op, provider), a in checks.items():
        if provider == "liger":
            assert a["ok"] is None and a["reason"], op
            continue
        assert a["ok"] is True, a
        assert a["value_max_err"] <= a["value_tol"] and a["grad_max_err"] <= a["grad_tol"], a


def _broken(kind: str):
    """A runner factory whose eager baseline is wrong in its value or only in its gradient."""
    def factory(op, provider, inputs):
        runner = cases.make_runner(op, provider, inputs)
        forward, policy = runner.forward, inputs["policy"]
        if kind == "value":  # shifted value, same gradient
            runner.forward = lambda: forward() + 1e-2
        else:  # same value, gradient shifted by 1e-2 everywhere
            runner.forward = lambda: forward() + 1e-2 * (policy.sum() - policy.sum().detach())
        return runner
    return factory


@pytest.mark.parametrize("op", ["logps", "kl", "tdpo2"])
@pytest.mark.parametrize("kind", ["value", "grad"])
def test_agreement_check_rejects_a_wrong_baseline(op, kind):
    good = cases.check_agreement(op, "eager", "cpu")
    assert good["ok"] is True, good
    bad = cases.check_agreement(op, "eager", "cpu", runner_factory=_broken(kind))
    assert bad["ok"] is False, bad
    assert (bad["value_max_err"] > bad["value_tol"]) == (kind == "value")
    assert (bad["grad_max_err"] > bad["grad_tol"]) == (kind == "grad")


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, path
    assert data[12:16] == b"IHDR", path
    width, height = struct.unpack(">II", data[16:24])
    assert data[-8:-4] == b"IEND", path
    return width, height


def test_plots_and_markdown(smoke):
    out, results = smoke
    names = [f"smoke-{op}.png" for op in ALL_OPS] + ["smoke-speedup.png", "smoke-memory.png"]
    for name in names:
        width, height = _png_size(out / name)
        assert width >= 300 and height >= 200, name
    table = (out / "table.md").read_text()
    assert table == (out / "smoke.md").read_text()
    header = next(line for line in table.splitlines() if line.startswith("| op |"))
    assert all(f"{p} ms" in header for p in PROVIDERS) and "speed-up vs eager" in header
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| op")]
    assert len(rows) == len(ALL_OPS) * len(MODES)
    assert "skip[^" in table  # the Liger cells, with their reasons as footnotes


def test_budget_and_compile_failure_are_recorded_not_dropped(tmp_path, monkeypatch):
    def fail(fn):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(cases, "compiled", fail)
    rc = run.main(["--set", "smoke", "--ops", "logps", "--providers", "compile", "--no-check", "--no-plots",
                   "--out", str(tmp_path), "--name", "failing"])
    assert rc == 0
    cells = json.loads((tmp_path / "failing.json").read_text())["cells"]
    assert {c["provider"] for c in cells} == {"tidpo", "compile"} and len(cells) == 2 * len(MODES)
    for c in cells:
        if c["provider"] == "compile":
            assert c["status"] == "skipped" and c["reason"].startswith("torch.compile failed: RuntimeError"), c
        else:
            assert c["status"] == "ok", c
    rc = run.main(["--set", "smoke", "--ops", "kl,dpo", "--max-seconds", "0", "--no-plots", "--out", str(tmp_path),
                   "--name", "budget"])
    assert rc == 0
    budget = json.loads((tmp_path / "budget.json").read_text())
    assert len(budget["cells"]) == 2 * len(MODES) * len(PROVIDERS)
    assert all(c["status"] == "skipped" and "--max-seconds" in c["reason"] for c in budget["cells"])


def test_cpu_memory_measurement(tmp_path):
    rc = run.main(["--set", "smoke", "--ops", "logps", "--providers", "tidpo", "--modes", "full", "--memory",
                   "--no-check", "--no-plots", "--out", str(tmp_path), "--name", "mem"])
    assert rc == 0
    cells = json.loads((tmp_path / "mem.json").read_text())["cells"]
    assert len(cells) == 1
    for c in cells:
        assert c["status"] == "ok" and isinstance(c["extra_peak_bytes"], int) and c["extra_peak_bytes"] >= 0, c
        assert "VmHWM" in c["memory_method"]


def test_pytest_benchmark_collection():
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run([sys.executable, "-m", "pytest", "benchmarks", "--collect-only", "-q", "-k", "cpu",
                           "-p", "no:cacheprovider"], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    ids = [line for line in proc.stdout.splitlines() if "::" in line]
    cpu = SETS["cpu"]
    expected = (len(cpu.op_shapes) * len(OPS) + len(cpu.loss_shapes) * len(LOSSES)) * len(cpu.dtypes) \
        * len(MODES) * len(PROVIDERS)
    assert len(ids) == expected == len(cell_params(ALL_OPS, ("cpu",)))
    assert all("[cpu-" in i for i in ids)
    assert any("test_bench_ops.py::test_op[cpu-logps-bwd-tidpo-" in i for i in ids)
    assert any("test_bench_losses.py::test_loss[cpu-ti_dpo-full-compile-" in i for i in ids)
    # every (op, mode, provider) of the CPU set appears
    seen = {tuple(i.split("[", 1)[1].split("-")[1:4]) for i in ids}
    assert seen == set(itertools.product(ALL_OPS, MODES, PROVIDERS))


def test_groups_run_losses_first_and_every_op_once_before_any_op_twice():
    shapes = {"logps": [(1, 10), (2, 20)], "kl": [(3, 30)], "dpo": [(8, 40), (16, 50)], "tdpo2": [(8, 60)]}
    order = run.group_order(("logps", "kl", "dpo", "tdpo2"), shapes.__getitem__)
    assert order == [("dpo", 8, 40), ("tdpo2", 8, 60), ("logps", 1, 10), ("kl", 3, 30), ("dpo", 16, 50),
                     ("logps", 2, 20)]
    assert run.group_order((), shapes.__getitem__) == []


def test_a_tidpo_cell_off_the_kernels_on_a_gpu_is_marked(smoke):
    _, results = smoke
    gpu = json.loads(json.dumps(results))
    gpu["device"]["type"] = "cuda"
    table = run.markdown_table(gpu)
    assert "†" not in run.markdown_table(results)  # on CPU the torch path is the intended one
    tidpo_cells = [c for c in gpu["cells"] if c["provider"] == "tidpo" and c["status"] == "ok"]
    assert tidpo_cells and all(c["backend"] == "torch" or "torch" in c["backend"] for c in tidpo_cells)
    assert table.count("†") == len(tidpo_cells) + 1  # every cell, and the footnote
    tidpo_cells[0]["backend"] = "triton"
    assert run.markdown_table(gpu).count("†") == len(tidpo_cells)
