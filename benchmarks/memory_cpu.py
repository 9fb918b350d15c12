"""Extra peak CPU memory of tidpo's chunked per-token ops vs the naive eager formulas.

Usage::

    python -m benchmarks.memory_cpu [--tokens 4096] [--vocab 128256] [--dtype bfloat16]
                                    [--op logps|kl|all] [--chunk-size N] [--mmap-threshold BYTES]
                                    [--json PATH]

:func:`measure_cell` measures one cell of the benchmark suite (:mod:`benchmarks.cases`: any op or loss,
any provider, mode ``fwd`` / ``bwd`` / ``full``) the same way; ``python -m benchmarks.run --memory``
uses it for the CPU cells.

What is compared
----------------
``logps``: ``tidpo.token_logps(logits, labels)`` (chunked autograd function, backend ``"torch"``)
against the plain eager form used by TRL-style trainers::

    torch.log_softmax(logits.float(), -1).gather(-1, labels[..., None]).squeeze(-1)   # masked

``kl``: ``tidpo.token_kl(ref_logits, policy_logits, labels)`` against::

    (softmax(p.float()) * (log_softmax(p.float()) - log_softmax(q.float()))).sum(-1)  # masked

with ``p`` the reference logits (no grad) and ``q`` the policy logits (requires grad), i.e. the
``KL(ref || policy)`` of TDPO / TI-DPO. Logits are ``[N, V]`` (``N = --tokens``), labels have ~10 %
``ignore_index`` positions. Two modes: ``fwd`` (the forward with the autograd graph recorded, as in
training) and ``fwd+bwd`` (forward, then ``out.sum().backward()``).

Method
------
Every (provider, op, mode) measurement runs in a fresh Python process
(``python -m benchmarks.memory_cpu --worker ...``) so that no allocator cache, freed-but-not-returned
heap or high-water mark from another measurement leaks into it. The worker runs with glibc's
``MALLOC_MMAP_THRESHOLD_`` fixed at 1 MiB (``--mmap-threshold``): every tensor buffer of 1 MiB or more
is its own ``mmap`` and is returned to the OS when freed, so RSS follows the live tensor memory. With
glibc's default *dynamic* threshold, freed buffers of up to 32 MiB (tidpo's chunk temporaries, 8 MiB
by default, are under that) are recycled through the heap and arenas and stay resident: the tidpo cells then read
anywhere from the live peak to ~200 MiB more from one run to the next (measured at N = 4096,
V = 128256: logps fwd 63 MiB with the fixed threshold, 63-254 MiB without). ``--mmap-threshold 0``
measures that default behaviour. The naive path's ``[N, V]`` tensors are mmapped either way.
The worker

1. imports torch and tidpo and runs the same op (same provider, mode and dtype) on a tiny input, so
   lazy library / thread-pool / allocator initialisation is not billed to the measured op;
2. allocates the inputs, written in place (``empty().normal_()``), so every page is resident and no
   full-size fp32 temporary is created while building them;
3. ``gc.collect()``, resets the kernel's resident high-water mark (``echo 5 > /proc/self/clear_refs``,
   Linux >= 4.0; if that is refused the warm-up of step 1 is what keeps the baseline honest, and the
   reported ``baseline_slack_bytes`` says how far the old high-water mark sat above the current RSS)
   and records ``base = VmHWM`` (the resident high-water mark of ``/proc/self/status``; ``ru_maxrss``
   would inherit the parent process's peak across fork + exec);
4. runs the op once (timed with ``perf_counter``) and records ``peak = VmHWM``.

Measured::

    extra_peak = peak - max(base, rss_at_base)    # bytes; transient high-water above the inputs
    retained   = rss_after_op - rss_at_base       # still resident after the op (saved tensors / grad)

(``max`` because right after the reset the kernel's per-thread RSS counters can lag the RSS by a few
hundred KiB.)

``VmHWM`` is a high-water mark, so ``extra_peak`` includes transient temporaries that were freed
before the op returned; it is what decides whether a step fits in memory. It counts resident pages,
so it is exact up to page granularity and allocator overhead (a few MiB). The wall time of the op
(and of the whole subprocess) is printed too; it is a CPU timing, noisy on a shared machine, and
says nothing about GPU speed. With the fixed mmap threshold every chunk temporary is a fresh ``mmap``
whose pages fault in again, which costs the chunked path time on a VM; run ``--mmap-threshold 0`` for
timings closer to the default allocator (memory numbers then get the noise described above).

Benchmark cells (:func:`measure_cell`, worker ``--cell JSON``) follow the same steps with three
differences: the warm-up of step 1 runs the cell itself at its real shape (forward + backward), so a
``torch.compile`` provider compiles before the baseline and its compiler's memory is not billed to the
op; the baseline is the RSS after the inputs (gradients reset); and for mode ``bwd`` the forward runs
before the high-water mark is reset, so the reported peak is the backward's (with the saved forward
state, alive during the backward, counted above the inputs), matching the CUDA measurement of
:mod:`benchmarks.timing`.

For ``fwd+bwd`` the gradient of the logits (``logits.grad`` / ``policy_logits.grad``) is created by
the op and is necessarily part of both providers' extra peak. tidpo writes it in the logits' dtype;
the naive path ends with the same dtype (the ``.float()`` cast's backward casts it back), but only
after building it in fp32.

How to read the result
----------------------
With ``F = 4 * N * V`` bytes (one fp32 ``[N, V]`` tensor), ``s`` the bytes per logits element (2 for
bf16, 4 for fp32) and ``C`` one chunk's fp32 ``[chunk, V]`` temporary (just under 8 MiB with the
default chunk, see ``tidpo.ops.chunked.CHUNK_ELEMENTS``), the structural expectations are:

==============  ==============================================  ====================================
op / mode       naive                                           tidpo
==============  ==============================================  ====================================
logps fwd       fp32 copy (bf16 only) + saved log_softmax:      ~2 ``C``, independent of ``N``
                ``2F`` bf16, ``F`` fp32
logps fwd+bwd   saved log_softmax + the fp32 grads of gather    grad ``s*N*V`` + ~2 ``C``
                and log_softmax: ``3F`` (the cast back to the
                logits dtype comes after they are freed)
kl fwd          fp32 copies of p and q, softmax(p), two         ~7 ``C`` (logp, logq, p, terms of
                log_softmax, their difference: ``6F`` bf16,     the chunk, and the previous
                ``4F`` fp32 (``.float()`` is then a no-op)      chunk's not yet released)
kl fwd+bwd      the forward's peak (backward stays below it)    grad ``s*N*V`` + ~5 ``C``
==============  ==============================================  ====================================

The table prints each extra peak in MiB and in units of ``F`` and the ratio tidpo / naive. A
chunked path that materialised the full softmax would show at least ``1 F`` more in its tidpo
cells, which is what ``tests/test_memory.py`` guards against. For fwd+bwd the irreducible part is the
gradient (``s*N*V``, 0.5 ``F`` for bf16): tidpo's cell is that plus chunk temporaries.

Measured (``--tokens 4096 --vocab 128256 --dtype bfloat16 --op all``, 2-core CPU VM, torch 2.13;
F = 2004 MiB, logits 1002 MiB each)::

    op     mode     tidpo MiB (F)    naive MiB (F)    tidpo/naive
    logps  fwd         63.5 (0.03)    4007.9 (2.00)   0.016
    logps  fwd+bwd   1049.5 (0.52)    6011.9 (3.00)   0.175
    kl     fwd        166.9 (0.08)   12023.9 (6.00)   0.014
    kl     fwd+bwd   1145.1 (0.57)   12023.9 (6.00)   0.095
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

PROVIDERS = ("tidpo", "naive")
OPS = ("logps", "kl")
MODES = ("fwd", "fwd+bwd")
IGNORE_INDEX = -100
IGNORE_FRACTION = 0.1
REPO_ROOT = Path(__file__).resolve().parent.parent
# glibc M_MMAP_THRESHOLD for the workers (see the module docstring); 0 / None = glibc's dynamic default.
DEFAULT_MMAP_THRESHOLD = 2**20
MiB = 2**20


# ----------------------------------------------------------------------------------------- helpers

def _maxrss_bytes() -> int:
    """This process's resident high-water mark in bytes.

    ``VmHWM`` of ``/proc/self/status`` is per address space: it starts fresh at ``exec`` and is reset
    by ``clear_refs``. ``getrusage().ru_maxrss`` is not a substitute on Linux: it keeps the parent's
    high-water mark across fork + exec, so a worker started from a large process (a long pytest run)
    would report the parent's peak and hide the op's. ``ru_maxrss`` is only the fallback where
    ``/proc`` is missing.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak() -> bool:
    """Reset the resident high-water mark (VmHWM) to the current RSS, if allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def to_dtype(name):
    """A floating ``torch.dtype`` from a dtype or its name (``"bfloat16"``, ``"torch.float32"``)."""
    import torch

    if isinstance(name, torch.dtype):
        return name
    dtype = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"not a floating dtype: {name!r}")
    return dtype


def dtype_str(dtype) -> str:
    """``"bfloat16"`` for ``torch.bfloat16`` or ``"bfloat16"``."""
    return str(to_dtype(dtype)).removeprefix("torch.")


# ------------------------------------------------------------------------------ the naive baselines

def naive_logps(logits, labels, ignore_index: int = IGNORE_INDEX):
    """``log_softmax(logits.float()).gather(labels)``, 0 at ignored positions (fp32 [N, V] copies)."""
    import torch

    valid = labels != ignore_index
    safe = labels.masked_fill(~valid, 0)
    logps = torch.log_softmax(logits.float(), -1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return torch.where(valid, logps, 0.0)


def naive_kl(p_logits, q_logits, labels, ignore_index: int = IGNORE_INDEX):
    """``sum_v softmax(p) * (log_softmax(p) - log_softmax(q))`` in fp32, 0 at ignored positions."""
    import torch

    p32, q32 = p_logits.float(), q_logits.float()
    kl = (torch.softmax(p32, -1) * (torch.log_softmax(p32, -1) - torch.log_softmax(q32, -1))).sum(-1)
    return torch.where(labels != ignore_index, kl, 0.0)


# ---------------------------------------------------------------------------------------- worker

def _make_inputs(op: str, tokens: int, vocab: int, dtype, seed: int = 0) -> tuple:
    """Inputs written in place (every page resident, no fp32 temporary); the policy logits require grad."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, vocab, (tokens,), generator=gen)
    labels[torch.rand(tokens, generator=gen) < IGNORE_FRACTION] = IGNORE_INDEX
    policy = torch.empty(tokens, vocab, dtype=dtype).normal_(generator=gen).requires_grad_(True)
    if op == "logps":
        return policy, labels
    ref = torch.empty(tokens, vocab, dtype=dtype).normal_(generator=gen)  # reference model: no grad
    return ref, policy, labels


def _run_op(provider: str, op: str, mode: str, inputs: tuple, chunk_size: int | None):
    import tidpo

    if op == "logps":
        logits, labels = inputs
        if provider == "tidpo":
            out = tidpo.token_logps(logits, labels, IGNORE_INDEX, backend="torch", chunk_size=chunk_size)
        else:
            out = naive_logps(logits, labels)
    else:
        ref, policy, labels = inputs  # KL(ref || policy), as TDPO / TI-DPO use it
        if provider == "tidpo":
            out = tidpo.token_kl(ref, policy, labels, IGNORE_INDEX, backend="torch", chunk_size=chunk_size)
        else:
            out = naive_kl(ref, policy, labels)
    if mode == "fwd+bwd":
        out.sum().backward()
    return out


def _worker(provider: str, op: str, mode: str, tokens: int, vocab: int, dtype_name: str,
            chunk_size: int | None) -> dict:
    import torch

    import tidpo  # noqa: F401  (import cost and module state before the baseline)

    dtype = to_dtype(dtype_name)
    # 1. warm-up: same code path on a tiny input (lazy init of kernels, thread pool, autograd engine).
    warm = _make_inputs(op, 16, 64, dtype, seed=1)
    _run_op(provider, op, mode, warm, chunk_size=4)
    del warm
    # 2. the measured inputs, resident.
    inputs = _make_inputs(op, tokens, vocab, dtype)
    input_bytes = sum(t.numel() * t.element_size() for t in inputs)
    gc.collect()
    # 3. baseline.
    peak_reset = _reset_peak()
    rss_base = _rss_bytes()
    maxrss_base = _maxrss_bytes()
    # The high-water mark is at least the current RSS (the kernel's per-thread RSS counters can lag it
    # by a few hundred KiB right after the reset).
    base = max(maxrss_base, rss_base)
    # 4. the op.
    t0 = time.perf_counter()
    out = _run_op(provider, op, mode, inputs, chunk_size)
    seconds = time.perf_counter() - t0
    peak = _maxrss_bytes()
    rss_after = _rss_bytes()
    grad = inputs[-2].grad  # the policy logits (the only input that requires grad)
    result = {
        "provider": provider, "op": op, "mode": mode, "tokens": tokens, "vocab": vocab, "dtype": dtype_name,
        "chunk_size": chunk_size, "threads": torch.get_num_threads(), "torch": torch.__version__,
        "input_bytes": input_bytes, "fp32_full_bytes": 4 * tokens * vocab,
        "grad_bytes": 0 if grad is None else grad.numel() * grad.element_size(),
        "baseline_rss_bytes": rss_base, "baseline_slack_bytes": maxrss_base - rss_base, "peak_reset": peak_reset,
        "extra_peak_bytes": peak - base, "retained_bytes": rss_after - rss_base, "op_seconds": seconds,
        "finite": bool(torch.isfinite(out.detach()).all()),
    }
    return result


def _cell_worker(spec: dict) -> dict:
    """One benchmark cell (benchmarks.cases): warm-up at full size, baseline, then the timed region."""
    import torch

    from benchmarks import cases

    op, mode, provider = spec["op"], spec["mode"], spec["provider"]
    tokens, vocab, dtype_name = int(spec["tokens"]), int(spec["vocab"]), dtype_str(spec["dtype"])
    inputs = cases.make_inputs(op, tokens, vocab, dtype_name, "cpu")
    runner = cases.make_runner(op, provider, inputs)
    cases.warm_compile(runner, "cpu")  # compiles (compile provider), first-call initialisation
    setup, step = cases.mode_callables(runner, mode, "cpu")
    step(setup())  # one more run of exactly the measured mode
    runner.clear_grads()
    gc.collect()
    rss_inputs = _rss_bytes()
    state = setup()  # bwd: the forward (and its saved tensors) happens here, before the reset
    peak_reset = _reset_peak()
    rss_base = _rss_bytes()
    maxrss_base = _maxrss_bytes()
    t0 = time.perf_counter()
    step(state)
    seconds = time.perf_counter() - t0
    peak = max(_maxrss_bytes(), _rss_bytes())
    out = state.get("out")
    finite = True if out is None else bool(torch.isfinite(out.detach()).all())
    grad = runner.grad_leaf.grad
    return {
        "provider": provider, "op": op, "mode": mode, "tokens": tokens, "vocab": vocab, "dtype": dtype_name,
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "input_bytes": cases.input_bytes(inputs), "fp32_full_bytes": 4 * tokens * vocab,
        "grad_bytes": 0 if grad is None else grad.numel() * grad.element_size(),
        "baseline_rss_bytes": rss_inputs, "baseline_slack_bytes": maxrss_base - rss_base, "peak_reset": peak_reset,
        # The high-water mark above the RSS with only the inputs resident (bwd: the saved forward state counts).
        "extra_peak_bytes": peak - rss_inputs, "op_seconds": seconds, "finite": finite,
    }


def measure_cell(op: str, mode: str, provider: str, tokens: int, vocab: int, dtype="bfloat16", *,
                 mmap_threshold: int | None = DEFAULT_MMAP_THRESHOLD, timeout: float | None = None) -> dict:
    """Extra peak memory of one benchmark cell (``benchmarks.cases``), in a fresh subprocess.

    ``op`` in ``benchmarks.shapes.ALL_OPS``, ``mode`` in ``fwd`` / ``bwd`` / ``full``, ``provider`` in
    ``benchmarks.shapes.PROVIDERS``. Returns the worker's dict (``extra_peak_bytes``, ``grad_bytes``,
    ``input_bytes``, ...) plus ``subprocess_seconds``; raises ``RuntimeError`` when the worker fails.
    """
    spec = {"op": op, "mode": mode, "provider": provider, "tokens": int(tokens), "vocab": int(vocab),
            "dtype": dtype_str(dtype)}
    cmd = [sys.executable, "-m", "benchmarks.memory_cpu", "--worker", "--cell", json.dumps(spec)]
    return _run_worker(cmd, mmap_threshold, timeout)


def _run_worker(cmd: list[str], mmap_threshold: int | None, timeout: float | None) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    if mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = str(int(mmap_threshold))
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"worker {' '.join(cmd[2:])} failed with exit code {proc.returncode} "
                           f"(negative = killed by signal, e.g. -9 for out of memory):\n{proc.stderr[-4000:]}")
    lines = proc.stdout.strip().splitlines()
    if not lines:
        raise RuntimeError(f"worker {' '.join(cmd[2:])} printed no result:\n{proc.stderr[-4000:]}")
    result = json.loads(lines[-1])
    result["subprocess_seconds"] = elapsed
    result["mmap_threshold"] = env.get("MALLOC_MMAP_THRESHOLD_", "glibc default")
    return result


# ---------------------------------------------------------------------------------------- driver

def measure(provider: str, op: str, mode: str, tokens: int, vocab: int, dtype="bfloat16", *,
            chunk_size: int | None = None, mmap_threshold: int | None = DEFAULT_MMAP_THRESHOLD,
            timeout: float | None = None) -> dict:
    """Run one measurement in a fresh subprocess and return its result dict.

    Keys include ``extra_peak_bytes`` (VmHWM high-water above the resident inputs),
    ``retained_bytes``, ``op_seconds``, ``subprocess_seconds``, ``fp32_full_bytes`` (``4*N*V``) and
    ``grad_bytes`` (size of the logits gradient, 0 for ``fwd``). ``mmap_threshold`` sets glibc's
    ``MALLOC_MMAP_THRESHOLD_`` in the worker (``0`` or ``None``: leave glibc's dynamic default).
    """
    if provider not in PROVIDERS:
        raise ValueError(f"provider must be one of {PROVIDERS}, got {provider!r}")
    if op not in OPS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    cmd = [sys.executable, "-m", "benchmarks.memory_cpu", "--worker", "--provider", provider, "--op", op,
           "--mode", mode, "--tokens", str(tokens), "--vocab", str(vocab), "--dtype", dtype_str(dtype)]
    if chunk_size is not None:
        cmd += ["--chunk-size", str(chunk_size)]
    return _run_worker(cmd, mmap_threshold, timeout)


def _fmt_row(cells, widths) -> str:
    pairs = enumerate(zip(cells, widths, strict=True))
    return "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in pairs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.memory_cpu", description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=4096, help="positions N (logits are [N, V])")
    parser.add_argument("--vocab", type=int, default=128256, help="vocabulary size V")
    parser.add_argument("--dtype", default="bfloat16", help="logits dtype (bfloat16, float16, float32, ...)")
    parser.add_argument("--op", default="all", choices=(*OPS, "all"))
    parser.add_argument("--chunk-size", type=int, default=None, help="tidpo positions per chunk (default: library)")
    parser.add_argument("--mmap-threshold", type=int, default=DEFAULT_MMAP_THRESHOLD,
                        help="MALLOC_MMAP_THRESHOLD_ for the workers in bytes (0: glibc's dynamic default)")
    parser.add_argument("--json", type=Path, default=None, help="also write all results to this JSON file")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--cell", default=None, help=argparse.SUPPRESS)  # worker: a benchmarks.cases cell (JSON)
    parser.add_argument("--provider", choices=PROVIDERS, help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker and args.cell is not None:
        print(json.dumps(_cell_worker(json.loads(args.cell))), flush=True)
        return 0
    if args.worker:
        if args.provider is None or args.mode is None or args.op == "all":
            parser.error("--worker needs --provider, --mode and a single --op")
        result = _worker(args.provider, args.op, args.mode, args.tokens, args.vocab, dtype_str(args.dtype),
                         args.chunk_size)
        print(json.dumps(result), flush=True)
        return 0

    dtype_name = dtype_str(args.dtype)
    ops = OPS if args.op == "all" else (args.op,)
    n, v = args.tokens, args.vocab
    full = 4 * n * v
    elem = to_dtype(dtype_name).itemsize
    print(f"logits [{n}, {v}] {dtype_name}: {n * v * elem / MiB:.1f} MiB per logits tensor; "
          f"F = one fp32 [N, V] = {full / MiB:.1f} MiB; threads = default; MALLOC_MMAP_THRESHOLD_ = "
          f"{args.mmap_threshold or 'glibc default'}")
    print("extra peak = VmHWM high-water above the resident inputs, one fresh subprocess per cell; "
          "fwd+bwd includes the logits gradient for both providers")
    results = []
    rows = []
    for op in ops:
        for mode in MODES:
            cell = {}
            for provider in PROVIDERS:
                r = measure(provider, op, mode, n, v, dtype_name, chunk_size=args.chunk_size,
                            mmap_threshold=args.mmap_threshold)
                results.append(r)
                cell[provider] = r
                print(f"  measured {provider:5s} {op:5s} {mode:7s}: extra peak {r['extra_peak_bytes'] / MiB:9.1f} MiB"
                      f"  op {r['op_seconds']:6.2f} s  (subprocess {r['subprocess_seconds']:.1f} s)", flush=True)
            t, nv = cell["tidpo"], cell["naive"]
            ratio = t["extra_peak_bytes"] / nv["extra_peak_bytes"] if nv["extra_peak_bytes"] > 0 else float("nan")
            rows.append((op, mode,
                         f"{t['extra_peak_bytes'] / MiB:.1f}", f"{t['extra_peak_bytes'] / full:.2f}",
                         f"{nv['extra_peak_bytes'] / MiB:.1f}", f"{nv['extra_peak_bytes'] / full:.2f}",
                         f"{ratio:.3f}", f"{t['op_seconds']:.2f}", f"{nv['op_seconds']:.2f}"))
    header = ("op", "mode", "tidpo MiB", "tidpo F", "naive MiB", "naive F", "tidpo/naive", "tidpo s", "naive s")
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    print()
    print(_fmt_row(header, widths))
    print(_fmt_row(["-" * w for w in widths], widths))
    for row in rows:
        print(_fmt_row(row, widths))
    slack = max(r["baseline_slack_bytes"] for r in results)
    if slack > 8 * MiB:
        print(f"\nwarning: the baseline high-water mark sat up to {slack / MiB:.1f} MiB above the RSS "
              "(peak reset unavailable); small extra peaks may be under-reported")
    if args.json is not None:
        args.json.write_text(json.dumps({"command": " ".join(sys.argv), "results": results}, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
