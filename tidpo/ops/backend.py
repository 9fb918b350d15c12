"""Backend selection: which implementation computes per-token log-probs and KL.

``backend`` argument > ``TIDPO_BACKEND`` environment variable > ``"auto"``.

- ``"torch"``: the chunked PyTorch path (:mod:`tidpo.ops.chunked`), any device.
- ``"triton"``: the fused Triton kernels (``tidpo.kernels``); on a CPU tensor they only run under
  ``TRITON_INTERPRET=1``.
- ``"auto"``: Triton for CUDA tensors when the kernels are available, the chunked torch path
  otherwise.
"""

from __future__ import annotations

import os

import torch

BACKENDS = ("auto", "torch", "triton")


def triton_kernels_available() -> bool:
    """True when the fused kernels for the per-token ops are importable."""
    try:
        from tidpo.kernels import logps  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: str | None, logits: torch.Tensor) -> str:
    """Return the concrete backend (``"torch"`` or ``"triton"``) for ``logits``.

    Raises:
        ValueError: unknown backend name (argument or ``TIDPO_BACKEND``).
        RuntimeError: ``"triton"`` was asked for but the kernels cannot run here.
    """
    source = "backend"
    if backend is None:
        backend = os.environ.get("TIDPO_BACKEND", "auto")
        source = "TIDPO_BACKEND"
    if backend not in BACKENDS:
        raise ValueError(f"{source} must be one of {', '.join(BACKENDS)}; got {backend!r}")
    if backend == "auto":
        if logits.device.type == "cuda" and triton_kernels_available():
            return "triton"
        return "torch"
    if backend == "triton":
        if not triton_kernels_available():
            raise RuntimeError(
                "backend='triton' was requested but this tidpo build has no fused Triton kernels for "
                "this op yet; use backend='torch' (the chunked PyTorch path) or 'auto'"
            )
        if logits.device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1":
            raise RuntimeError(
                f"backend='triton' needs CUDA tensors (got {logits.device}); on CPU set TRITON_INTERPRET=1 "
                "to run the kernels in the Triton interpreter"
            )
    return backend
