"""The first gate of a GPU session: the fused kernels import and compute the right values on the Triton backend.

    python -m benchmarks.gpu_check                                  # on a CUDA device
    TRITON_INTERPRET=1 python -m benchmarks.gpu_check --device cpu   # the CPU rehearsal (Triton interpreter)

It imports the kernel modules (``tidpo.kernels.logps`` / ``.kl``, with the import error itself when they fail),
checks that ``backend="auto"`` picks Triton for CUDA logits (so the benchmark's tidpo cells time the kernels,
not the torch path), and runs ``token_logps`` and ``token_kl`` forward and backward with ``backend="triton"`` on
a small odd-shaped case with ignored positions against the float64 reference (:mod:`tidpo.reference`).
Exit status 0 when everything holds, 1 otherwise (each failure printed); ``benchmarks/gpu_session.sh`` stops
there, because every later number would be meaningless.

This is a gate, not the test suite: ``pytest -m gpu`` checks the kernels at realistic shapes and every dtype.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback

#: Worst |kernel - float64 reference| accepted here (fp32 accumulation over a 1000-entry vocabulary is ~1e-6).
TOLERANCE = 1e-4
#: A small case on purpose: odd sizes, a fully ignored row, ignored positions inside rows.
ROWS, LENGTH, VOCAB = 3, 5, 1000


def _case(device, dtype):
    import torch

    g = torch.Generator().manual_seed(0)
    p = (torch.randn(ROWS, LENGTH, VOCAB, generator=g, dtype=torch.float64) * 3).to(dtype)
    q = (torch.randn(ROWS, LENGTH, VOCAB, generator=g, dtype=torch.float64) * 3).to(dtype)
    labels = torch.randint(0, VOCAB, (ROWS, LENGTH), generator=g)
    labels[0] = -100
    labels[1, :2] = -100
    return p.to(device), q.to(device), labels.to(device)


def _max_err(value, truth) -> float:
    return float((value.detach().double().cpu() - truth.detach().double().cpu()).abs().max())


def check_imports() -> list[str]:
    """Import the kernel modules; the failures, with their exceptions."""
    import triton

    print(f"triton {triton.__version__}; TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}")
    failures = []
    for module in ("tidpo.kernels.logps", "tidpo.kernels.kl"):
        try:
            loaded = importlib.import_module(module)
            print(f"  {module}: {loaded.__file__}")
        except Exception as error:  # noqa: BLE001 - reported, the gate fails
            failures.append(f"{module} does not import: {type(error).__name__}: {error}")
    return failures


def check_values(device: str) -> list[str]:
    """``token_logps`` / ``token_kl`` on the Triton backend against the float64 reference, values and gradients."""
    import torch

    from tidpo import reference, token_kl, token_logps
    from tidpo.ops.backend import resolve_backend

    failures = []
    for dtype in (torch.float32, torch.bfloat16):
        p, q, labels = _case(device, dtype)
        if device == "cuda":
            for op in ("logps", "kl"):
                chosen = resolve_backend(None, p, op=op)
                if chosen != "triton":
                    failures.append(f"backend 'auto' picks {chosen!r} for {op} on CUDA {dtype}: the benchmark "
                                    "would time the torch path")
        p_ours, q_ours = p.clone().requires_grad_(), q.clone().requires_grad_()
        p_ref, q_ref = p.double().cpu().requires_grad_(), q.double().cpu().requires_grad_()
        pairs = {
            "token_logps": (token_logps(p_ours, labels, backend="triton"),
                            reference.token_logps(p_ref, labels.cpu())),
            "token_kl": (token_kl(p_ours, q_ours, labels, backend="triton"),
                         reference.token_kl(p_ref, q_ref, labels.cpu())),
        }
        for name, (ours, truth) in pairs.items():
            error = _max_err(ours, truth)
            grad_ours = torch.autograd.grad(ours.sum(), p_ours)[0]
            grad_truth = torch.autograd.grad(truth.sum(), p_ref)[0]
            grad_error = _max_err(grad_ours, grad_truth)
            # The gradient comes back in the logits' dtype: its rounding (bf16: 2^-8 relative) is allowed for.
            grad_tolerance = TOLERANCE + torch.finfo(dtype).eps * float(grad_truth.abs().max())
            ok = error <= TOLERANCE and grad_error <= grad_tolerance
            print(f"  {name:11s} {str(dtype):15s} value err {error:.2e}, grad err {grad_error:.2e}: "
                  f"{'ok' if ok else 'FAILED'}")
            if not ok:
                failures.append(f"{name} {dtype}: value err {error:.2e} (tol {TOLERANCE:.0e}), grad err "
                                f"{grad_error:.2e} (tol {grad_tolerance:.1e})")
    return failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cuda (default) or cpu (needs TRITON_INTERPRET=1: the rehearsal)")
    args = parser.parse_args(argv)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("kernel check: FAILED: no CUDA device is visible to torch", file=sys.stderr)
        return 1
    if args.device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        print("kernel check: FAILED: --device cpu runs the kernels in the Triton interpreter: set TRITON_INTERPRET=1",
              file=sys.stderr)
        return 1
    failures = check_imports()
    if not failures:
        try:
            failures = check_values(args.device)
        except Exception:  # noqa: BLE001 - the gate reports what broke
            failures = ["the kernel call raised:\n" + traceback.format_exc()]
    if failures:
        print("kernel check: FAILED\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    print("kernel check: ok (the Triton kernels import and match the float64 reference)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
