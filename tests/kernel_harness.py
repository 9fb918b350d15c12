"""Shared machinery of the Triton kernel tests (``tests/test_kernels_logps.py``, ``tests/test_kernels_kl.py``).

Each kernel test file has three kinds of tests, by marker:

- ``interpreter``: the kernels run on CPU in the Triton interpreter and are checked against float64
  references and against the chunked torch path.
- ``compile_only``: every kernel variant is compiled with ``triton.compile`` for sm_80 and sm_90
  (no GPU needed: Triton ships ``ptxas``), which catches everything the interpreter does not
  (types, layouts, register spills): :func:`check_compiles`, :func:`check_small_vocab_compiles`,
  :func:`check_compile_signatures`.
- ``gpu``: the same value/gradient checks at realistic shapes on a CUDA device; skipped without one
  (:data:`requires_cuda`).

How the interpreter tests are isolated. ``TRITON_INTERPRET=1`` only takes effect for kernels
decorated *after* it is set (``@triton.jit`` picks the interpreter at decoration time, i.e. when
``tidpo.kernels.*`` is imported), and the rest of the suite must import the compiled kernels.
Flipping the variable inside this process would depend on import order and leak into other test
files, so instead each file's ``test_interpreter_suite`` runs that very file in ONE fresh
``python -m pytest`` subprocess with ``TRITON_INTERPRET=1`` set from the start and
``-o python_functions=interp_*`` (:func:`run_interpreter_suite`): in that subprocess only the
``interp_*`` functions are collected (and none of the ``test_*`` ones); in the normal run only the
``test_*`` functions are. One subprocess pays the torch/triton import once; its pytest report (one line
per ``interp_*`` case) is shown when it fails, and the number of cases that passed must equal
:func:`count_interp_cases`. In that subprocess the interpreter's fp32 -> bf16 cast is made to round to
nearest like the GPU (:func:`bf16_rounds_to_nearest`, applied by the autouse fixture
:func:`_interpreter_bf16_rounds_to_nearest` that each kernel test file imports).

This module imports neither ``triton`` nor the kernels at import time, so that importing it never
decides which kernels (compiled or interpreted) a test file gets.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import IGNORE, given, make_labels, make_logits, settings, st  # noqa: F401 - re-exported

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
ROOT = Path(__file__).resolve().parents[1]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
HAS_CUDA = torch.cuda.is_available()

requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


# Shapes on purpose (the same for every kernel): (shape, block_v), the test-only tile width override.
INTERP_SHAPES = [
    ((4, 6, 7), None),  # tiny odd V, one partial 16-wide tile
    ((3, 5, 100), 64),  # V ~ 1.5 tiles
    ((3, 4, 1031), 256),  # 5 tiles, the last one 7 wide
    ((37, 1031), None),  # 2-D [N, V], one default 2048-wide tile
    ((2, 3, 32000), None),  # realistic V: 4 (logps) or 8 (KL) default-width tiles, the last partial
]


# ----------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------


def logits_case(shape, dtype, *, strided=True, masked_rows=(1,), seed=0, device="cpu"):
    """Logits (a strided ``[:, :-1]`` view for 3-D when ``strided``), labels with ~25 % ignored, grads.

    2-D ``[N, V]`` logits get a leading run of ignored positions (the prompt) instead of masked rows.
    The grads are float64, shaped like the labels.
    """
    if len(shape) == 2:
        n, vocab = shape
        logits = make_logits((n, vocab), dtype, seed=seed)
        labels = make_labels(1, n, vocab, masked_rows=(), seed=seed + 1)[0]
        labels[: n // 4] = IGNORE  # a run of ignored positions (the prompt)
    else:
        rows, length, vocab = shape
        full = make_logits((rows, length + int(strided), vocab), dtype, seed=seed)
        logits = full[:, :-1] if strided else full
        labels = make_labels(rows, length, vocab, masked_rows=masked_rows, seed=seed + 1)
    grad_out = torch.randn(labels.shape, generator=torch.Generator().manual_seed(seed + 2), dtype=torch.float64)
    return logits.to(device), labels.to(device), grad_out.to(device)


# ----------------------------------------------------------------------------------------------
# Interpreter: the subprocess driver, its case count and the bf16 rounding patch
# ----------------------------------------------------------------------------------------------


def count_interp_cases(namespace: dict) -> int:
    """Cases the subprocess must run: every ``interp_*`` function of ``namespace`` (a test module's
    ``globals()``) times its parametrizations."""
    total = 0
    for name, fn in namespace.items():
        if name.startswith("interp_") and callable(fn):
            cases = 1
            for mark in getattr(fn, "pytestmark", []):
                if mark.name == "parametrize":
                    cases *= len(mark.args[1])
            total += cases
    return total


def run_interpreter_suite(test_file: str, namespace: dict) -> None:
    """Run every ``interp_*`` case of ``test_file`` under ``TRITON_INTERPRET=1`` in one subprocess.

    ``namespace`` is that file's ``globals()``: all of its cases must pass (see the module docstring).
    """
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "pytest", str(Path(test_file).resolve()), "-q", "-p", "no:cacheprovider",
           "-o", "python_functions=interp_*", "-m", "interpreter"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    report = (proc.stdout + proc.stderr)[-12000:]
    assert proc.returncode == 0, f"interpreter tests failed (rc={proc.returncode}):\n{report}"
    passed = re.search(r"(\d+) passed", proc.stdout)
    expected = count_interp_cases(namespace)
    assert passed and int(passed.group(1)) == expected, f"expected {expected} interpreter cases to pass:\n{report}"
    print(proc.stdout.strip().splitlines()[-1])


@contextlib.contextmanager
def bf16_rounds_to_nearest():
    """Make the interpreter's fp32 -> bf16 cast round to nearest even, as the GPU's ``cvt.rn`` does.

    Triton 3.9's interpreter converts fp32 to bf16 by truncation (``_convert_float`` is called with
    ``rounding_mode=None`` from ``cast_impl``): up to 1 bf16 ulp of error where the GPU has 0.5, which
    would make the bf16 gradient checks measure the interpreter instead of the kernel.
    """
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    original = interpreter._convert_float

    def convert(data, input_dtype, output_dtype, rounding_mode):
        if input_dtype == tl.float32 and output_dtype == tl.bfloat16:
            as_bf16 = torch.from_numpy(np.ascontiguousarray(data).view(np.float32)).to(torch.bfloat16)
            return as_bf16.view(torch.int16).numpy().view(np.uint16).reshape(data.shape)
        return original(data, input_dtype, output_dtype, rounding_mode)

    interpreter._convert_float = convert
    try:
        yield
    finally:
        interpreter._convert_float = original


@pytest.fixture(scope="module", autouse=True)
def _interpreter_bf16_rounds_to_nearest():
    """:func:`bf16_rounds_to_nearest` for a whole test module, in the interpreter subprocess only.

    Import it into a kernel test file to apply it there; each file's ``interp_bf16_cast_rounds_to_nearest``
    proves the patch is in effect.
    """
    if not INTERPRET:
        yield
        return
    with bf16_rounds_to_nearest():
        yield


# ----------------------------------------------------------------------------------------------
# Compile-only: every kernel variant for sm_80 and sm_90 without a GPU
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", name="fresh_triton_cache")
def fresh_triton_cache_fixture(tmp_path_factory):
    """``fresh_triton_cache``: a private, empty Triton cache: every variant really goes through the compiler
    and ptxas. (Declared under another name so that a test module imports it without shadowing.)"""
    saved = os.environ.get("TRITON_CACHE_DIR")
    os.environ["TRITON_CACHE_DIR"] = str(tmp_path_factory.mktemp("triton-cache"))
    yield
    if saved is None:
        os.environ.pop("TRITON_CACHE_DIR", None)
    else:
        os.environ["TRITON_CACHE_DIR"] = saved


def _compile(entry, capability):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(entry["fn"], entry["signature"], entry["constexprs"], entry["attrs"])
    return triton.compile(src, target=GPUTarget("cuda", capability, 32), options=entry["options"])


def _resource_usage(cubin: bytes, tmp_path) -> str:
    """``cuobjdump -res-usage`` of a cubin (registers, spills as LOCAL), with Triton's bundled tool."""
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not tool.exists():
        tool = shutil.which("cuobjdump")
        if tool is None:
            pytest.skip("no cuobjdump to read the register usage")
    path = tmp_path / "kernel.cubin"
    path.write_bytes(cubin)
    return subprocess.run([str(tool), "-res-usage", str(path)], capture_output=True, text=True, check=True).stdout


def check_compiles(entry, capability, tmp_path) -> None:
    """``entry`` (from a ``compile_signatures()``) compiles for sm_``capability``: a cubin, no spills."""
    compiled = _compile(entry, capability)
    cubin = compiled.asm["cubin"]
    assert isinstance(cubin, bytes) and len(cubin) > 1000 and cubin[:4] == b"\x7fELF"
    assert f".target sm_{capability}" in compiled.asm["ptx"]
    usage = _resource_usage(cubin, tmp_path)
    assert "LOCAL:0" in usage, f"register spills (local memory) in {entry['name']}:\n{usage}"
    assert "STACK:0" in usage, usage


def check_small_vocab_compiles(entry) -> None:
    """``entry`` from ``compile_signatures(vocab=100)``: the smallest config (BLOCK_V 128, 1 warp) compiles."""
    assert entry["constexprs"]["BLOCK_V"] == 128 and entry["options"]["num_warps"] == 1
    assert len(_compile(entry, 90).asm["cubin"]) > 1000


def check_compile_signatures(kernels, signatures, *, count: int, constexprs: set[str], why: str) -> None:
    """``signatures`` (``kernels.compile_signatures()``) name ``count`` distinct variants whose signatures
    list every kernel parameter in order, with only ``constexprs`` (a subset) as constexpr (else ``why``).
    Under the interpreter ``compile_signatures`` must refuse instead."""
    if INTERPRET:
        with pytest.raises(RuntimeError, match="unset TRITON_INTERPRET"):
            kernels.compile_signatures()
        return
    names = {e["name"] for e in signatures}
    assert len(names) == len(signatures) == count
    for entry in signatures:
        params = entry["fn"].arg_names
        assert list(entry["signature"]) == params, entry["name"]
        declared = {p for p, ty in entry["signature"].items() if ty == "constexpr"}
        assert declared == set(entry["constexprs"]) <= constexprs, why
