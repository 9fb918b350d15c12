"""Backend selection: which implementation computes per-token log-probs and KL.

``backend`` argument > ``TIDPO_BACKEND`` environment variable > ``"auto"``.

- ``"torch"``: the chunked PyTorch path (:mod:`tidpo.ops.chunked`), any device.
- ``"triton"``: the fused Triton kernels (``tidpo.kernels``); on a CPU tensor they only run under
  ``TRITON_INTERPRET=1``.
- ``"auto"``: Triton for CUDA tensors (float32/float16/bfloat16) when the kernels *for that op*
  are available, the chunked torch path otherwise (e.g. ``token_kl`` until its kernel exists).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from types import ModuleType

import torch

BACKENDS = ("auto", "torch", "triton")
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# The per-token ops and the kernel module (``tidpo.kernels.<module>``) each one needs.
KERNEL_MODULES = {"logps": "logps", "kl": "kl"}
# Each concrete backend's implementation: one module with the same functions (logps_forward / logps_backward /
# kl_forward / kl_backward), which the autograd functions call.
_IMPLEMENTATIONS = {"torch": "tidpo.ops.chunked", "triton": "tidpo.ops.triton_ops"}


def implementation(backend: str) -> ModuleType:
    """The module implementing a concrete backend (``"torch"`` or ``"triton"``, see :func:`resolve_backend`)."""
    if backend not in _IMPLEMENTATIONS:
        raise ValueError(f"backend must be 'torch' or 'triton' here (resolve 'auto' first), got {backend!r}")
    return importlib.import_module(_IMPLEMENTATIONS[backend])  # imports Triton only for "triton"


@functools.cache
def triton_kernels_available(op: str = "logps") -> bool:
    """True when the fused kernels for ``op`` (``"logps"`` or ``"kl"``) can be used: Triton is installed and the
    kernel module imports.

    Only a missing ``triton`` package makes the kernels unavailable. With Triton present, a kernel module that
    fails to import is a broken install and raises, so that ``"auto"`` never quietly runs the torch path on a GPU.

    Raises:
        ImportError: Triton is installed but ``tidpo.kernels.<module>`` does not import (the message says why).
    """
    if op not in KERNEL_MODULES:
        raise ValueError(f"op must be one of {', '.join(KERNEL_MODULES)}; got {op!r}")
    if importlib.util.find_spec("triton") is None:
        return False
    module = f"tidpo.kernels.{KERNEL_MODULES[op]}"
    try:
        importlib.import_module(module)
    except ImportError as error:
        raise ImportError(f"Triton is installed but the fused kernels ({module}) do not import: {error}. "
                          "Reinstall tidpo (pip install -e .), or put the repository on PYTHONPATH") from error
    return True


def resolve_backend(backend: str | None, logits: torch.Tensor, op: str = "logps") -> str:
    """Return the concrete backend (``"torch"`` or ``"triton"``) for ``op`` on ``logits``.

    Availability is per op: ``"auto"`` picks Triton only for CUDA tensors the kernels take
    (float32/float16/bfloat16, unit stride along V) when that op's kernels exist, so an op without
    kernels (or float64 logits) runs on the chunked torch path; an explicit ``"triton"`` never falls
    back (it raises here, or the kernel launcher raises on an unsupported dtype/layout).

    Raises:
        ValueError: unknown backend name (argument or ``TIDPO_BACKEND``) or op.
        RuntimeError: ``"triton"`` was asked for but the kernels cannot run here.
    """
    if op not in KERNEL_MODULES:
        raise ValueError(f"op must be one of {', '.join(KERNEL_MODULES)}; got {op!r}")
    source = "backend"
    if backend is None:
        backend = os.environ.get("TIDPO_BACKEND", "auto")
        source = "TIDPO_BACKEND"
    if backend not in BACKENDS:
        raise ValueError(f"{source} must be one of {', '.join(BACKENDS)}; got {backend!r}")
    if backend == "auto":
        kernel_layout = logits.dtype in _KERNEL_DTYPES and (logits.shape[-1] == 1 or logits.stride(-1) == 1)
        if logits.device.type == "cuda" and kernel_layout and triton_kernels_available(op):
            return "triton"
        return "torch"
    if backend == "triton":
        if not triton_kernels_available(op):
            raise RuntimeError(
                "backend='triton' was requested but Triton is not installed; install it (pip install triton) "
                "or use backend='torch' (the chunked PyTorch path) or 'auto'"
            )
        if logits.device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1":
            raise RuntimeError(
                f"backend='triton' needs CUDA tensors (got {logits.device}); on CPU set TRITON_INTERPRET=1 "
                "to run the kernels in the Triton interpreter"
            )
    return backend


def check_fused_backend(backend: str | None) -> None:
    """The fused LM head runs its tile matmuls with torch (cuBLAS / oneDNN) on every device: ``"auto"`` and
    ``"torch"`` select it; an explicit ``"triton"`` is refused rather than quietly served by torch."""
    requested = backend if backend is not None else os.environ.get("TIDPO_BACKEND", "auto")
    if requested not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {requested!r}")
    if requested == "triton":
        raise RuntimeError("backend='triton' was requested for FusedLogits (an LM head), whose tiles are torch "
                           "matmuls on every device; use backend 'auto' or 'torch'")
