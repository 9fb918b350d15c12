"""Installation: ``csrc_triton/`` is importable as ``tidpo.kernels`` from an editable install and a wheel."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import tidpo

ROOT = Path(__file__).resolve().parents[1]


def test_editable_install_maps_kernels_package():
    import tidpo.kernels

    assert Path(tidpo.kernels.__file__).resolve().parent == ROOT / "csrc_triton"


@pytest.mark.slow
def test_wheel_contains_and_imports_the_kernels(tmp_path):
    wheel_dir, site = tmp_path / "wheel", tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(wheel_dir)], check=True, cwd=tmp_path)
    (wheel,) = wheel_dir.glob("tidpo-*.whl")
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, cwd=tmp_path)
    code = ("import tidpo, tidpo.kernels, tidpo.ops, tidpo.losses, tidpo.weights; "
            "print(tidpo.__file__); print(tidpo.kernels.__file__)")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=tmp_path,
                         env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"}).stdout.split()
    assert out[0].startswith(str(site)), f"tidpo imported from {out[0]}, not from the installed wheel"
    assert out[1] == str(site / "tidpo" / "kernels" / "__init__.py")
    assert tidpo.__version__ in wheel.name
