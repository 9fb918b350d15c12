"""The GPU session script, rehearsed on CPU (``benchmarks/gpu_session.sh --rehearsal``).

A GPU machine is lent rarely, for minutes, with no network and a Python environment of its own: a session
script that fails there costs the whole loan. So the suite runs the script the way that machine will, every
time: with a Python that cannot import tidpo until the script makes it so (the base interpreter with ``-S``
and a copy of this environment's packages minus tidpo's install and the packages that machine lacks: peft,
datasets, gguf, accelerate, hypothesis, liger-kernel, trl), on a copy of the repository, with pip pointed at
nothing. The rehearsal must pass the kernel gate (the kernels import and run in the Triton interpreter),
collect the GPU tests, and write its files where ``OUT`` says; a kernel module that does not import must
stop it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="the session's kernel gate needs Triton")

ROOT = Path(__file__).resolve().parents[1]
#: What the GPU machine does not have (and tidpo's own install: the script must not need it).
ABSENT = ("peft", "datasets", "gguf", "accelerate", "hypothesis", "liger_kernel", "liger-kernel", "trl",
          "pytest_benchmark", "tidpo", "__editable__", "_tidpo")
#: What the script needs of the repository.
REPO_PARTS = ("tidpo", "csrc_triton", "benchmarks", "tests", "pyproject.toml", "setup.py")
#: The session's files: the run log, the test report, the benchmark JSON and its table (at most 8 come back).
SESSION_FILES = {"session.log", "gpu-tests.xml", "fused-head.json", "fused-head.md", "bench.json", "bench.md"}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bare_python(tmp_path_factory) -> Path:
    """An interpreter like the GPU machine's: torch, triton, transformers, numpy, pytest; no tidpo."""
    base = tmp_path_factory.mktemp("bare")
    site = base / "site"
    site.mkdir()
    for package_dir in {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}:
        for entry in Path(package_dir).iterdir():
            name = entry.name.lower()
            if not name.startswith(ABSENT) and not (site / entry.name).exists():
                (site / entry.name).symlink_to(entry)
    python = base / "python3"
    interpreter = getattr(sys, "_base_executable", None) or sys.executable
    # -S: no site-packages of the interpreter (no .pth files, so no editable install of tidpo); PYTHONPATH only.
    python.write_text(f'#!/bin/sh\nPYTHONPATH="{site}${{PYTHONPATH:+:$PYTHONPATH}}" exec "{interpreter}" -S "$@"\n')
    python.chmod(0o755)
    probe = subprocess.run([str(python), "-c", "import tidpo"], cwd=base, capture_output=True, text=True)
    assert probe.returncode != 0 and "No module named 'tidpo'" in probe.stderr, (probe.stdout, probe.stderr)
    return python


def _repository_copy(destination: Path) -> Path:
    destination.mkdir()
    for part in REPO_PARTS:
        source = ROOT / part
        if source.is_dir():
            shutil.copytree(source, destination / part, ignore=shutil.ignore_patterns("__pycache__", "results"))
        else:
            shutil.copy2(source, destination / part)
    return destination


def _rehearse(repo: Path, python: Path, out: Path) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "TRITON_INTERPRET")}
    env.update(OUT=str(out), PYTHON_BIN=str(python), PIP_NO_INDEX="1", PIP_INDEX_URL="http://127.0.0.1:9/")
    return subprocess.run(["bash", str(repo / "benchmarks" / "gpu_session.sh"), "--rehearsal"], cwd=repo, env=env,
                          capture_output=True, text=True, timeout=300)


def test_rehearsal_passes_the_gate_collects_the_gpu_tests_and_writes_its_files(tmp_path, bare_python):
    repo, out = _repository_copy(tmp_path / "repo"), tmp_path / "out"
    started = time.perf_counter()
    proc = _rehearse(repo, bare_python, out)
    seconds = time.perf_counter() - started
    log = (out / "session.log").read_text()
    assert proc.returncode == 0, log[-4000:]
    assert {p.name for p in out.iterdir()} == SESSION_FILES
    assert f"tidpo: {repo / 'tidpo'}" in log  # imported from the checkout, through PYTHONPATH
    assert "kernel check: ok" in log and "token_kl    torch.bfloat16" in log
    collected = next(line for line in log.splitlines() if "tests collected" in line)
    assert int(collected.split("/")[0]) >= 30, collected  # the kernels' and the weights' GPU tests
    assert "<testsuite" in (out / "gpu-tests.xml").read_text()
    results = json.loads((out / "bench.json").read_text())
    assert results["complete"] and {"torch", "triton", "cuda", "driver"} <= set(results["versions"])
    assert all(c["status"] == "ok" and c["backend"] for c in results["cells"])
    assert (out / "bench.md").read_text().startswith("Device: CPU")
    fused = {(c["op"], c["provider"]): c for c in json.loads((out / "fused-head.json").read_text())["cells"]}
    assert all(fused[op, "tidpo_fused"]["status"] == "ok" for op in ("logps", "logps_trained", "kl", "dpo"))
    assert "not installed" in fused["logps", "trl"]["reason"]  # the bare Python has no TRL: recorded, not fatal
    print(f"rehearsal: {seconds:.0f} s")  # shown with -s; the budget on a GPU machine is 5 minutes


def test_rehearsal_stops_when_a_kernel_does_not_import(tmp_path, bare_python):
    repo, out = _repository_copy(tmp_path / "repo"), tmp_path / "out"
    kernel = repo / "csrc_triton" / "logps.py"
    kernel.write_text(kernel.read_text() + "\nimport tidpo_module_that_does_not_exist  # noqa\n")
    proc = _rehearse(repo, bare_python, out)
    log = (out / "session.log").read_text()
    assert proc.returncode == 1, log[-4000:]
    assert "tidpo.kernels.logps does not import: ModuleNotFoundError" in log
    assert "STOP: the kernel check failed" in log
    assert {p.name for p in out.iterdir()} == {"session.log"}  # nothing after the gate ran
