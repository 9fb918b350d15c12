"""Timing, GPU peak memory, device description and peak memory bandwidth.

Timing (:func:`time_mode`): warm-up repetitions first, then ``reps`` timed repetitions, each after
an untimed ``setup()``. On CUDA each repetition is bracketed by CUDA events (``elapsed_time``, the
GPU time of the step, no host synchronisation inside the measured interval); on CPU by
``time.perf_counter``. The cell records the median and the 20th / 80th percentiles (as
``triton.testing.do_bench`` reports them) and the minimum, in milliseconds.

Peak memory on CUDA (:func:`cuda_extra_peak`): ``torch.cuda.reset_peak_memory_stats()`` after the
setup, one step, then ``max_memory_allocated() - memory_allocated()`` measured after the inputs were
built and the gradients reset: the high-water mark above the inputs while the timed region runs (for
``bwd`` it therefore includes the saved forward state, which is alive during the backward). On CPU
the same quantity comes from :mod:`benchmarks.memory_cpu` (a fresh process per cell, optional).

Bandwidth: :data:`PEAK_BANDWIDTH_GBS` lists the vendors' peak DRAM/HBM bandwidths by device name;
``--bandwidth-gbs`` overrides it. A CPU has no entry (no number is invented): its cells record
``pct_bandwidth = null``; :func:`measure_copy_bandwidth` gives a *measured copy bandwidth*
(``torch`` ``copy_`` of a 256 MiB buffer, read + write bytes / time), recorded separately and
labelled as such.
"""

from __future__ import annotations

import math
import os
import platform
import re
import socket
import time
from collections.abc import Callable

import torch

# (regex on the device name, peak bandwidth GB/s = 1e9 B/s, label). First match wins: specific first.
PEAK_BANDWIDTH_GBS: list[tuple[str, float, str]] = [
    (r"GH200", 4000.0, "GH200 (96 GB HBM3)"),
    (r"H200", 4800.0, "H200"),
    (r"H100.*PCIe", 2000.0, "H100 PCIe"),
    (r"H100.*NVL", 3900.0, "H100 NVL"),
    (r"H100", 3350.0, "H100 SXM"),
    (r"H800.*PCIe", 2000.0, "H800 PCIe"),
    (r"H800", 3350.0, "H800 SXM"),
    (r"H20\b", 4000.0, "H20"),
    (r"GB200|B200", 8000.0, "B200"),
    (r"B100", 8000.0, "B100"),
    (r"A100.*40GB|A100-PCIE-40GB|A100-SXM4-40GB", 1555.0, "A100 40GB"),
    (r"A100.*80GB.*PCIe", 1935.0, "A100 80GB PCIe"),
    (r"A100", 2039.0, "A100 80GB SXM"),
    (r"A800", 2039.0, "A800 80GB"),
    (r"L40S", 864.0, "L40S"),
    (r"L40\b", 864.0, "L40"),
    (r"\bL4\b", 300.0, "L4"),
    (r"A10G", 600.0, "A10G"),
    (r"\bA10\b", 600.0, "A10"),
    (r"A6000", 768.0, "RTX A6000"),
    (r"RTX 6000 Ada", 960.0, "RTX 6000 Ada"),
    (r"RTX 4090", 1008.0, "RTX 4090"),
    (r"RTX 3090", 936.0, "RTX 3090"),
    (r"V100", 900.0, "V100"),
    (r"\bT4\b", 320.0, "T4"),
    (r"MI300X", 5300.0, "MI300X"),
    (r"MI250", 3200.0, "MI250X"),
]


def peak_bandwidth(name: str) -> tuple[float | None, str]:
    """``(GB/s, source)`` for a device name from :data:`PEAK_BANDWIDTH_GBS`, or ``(None, why)``."""
    for pattern, gbs, label in PEAK_BANDWIDTH_GBS:
        if re.search(pattern, name, flags=re.IGNORECASE):
            return gbs, f"table: {label} peak {gbs:g} GB/s"
    return None, f"unknown device {name!r}: no peak bandwidth in the table (pass --bandwidth-gbs)"


# ------------------------------------------------------------------------------------ statistics

def quantile(values: list[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default) of a non-empty list."""
    xs = sorted(values)
    pos = q * (len(xs) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(times_ms: list[float]) -> dict:
    return {"median_ms": quantile(times_ms, 0.5), "p20_ms": quantile(times_ms, 0.2),
            "p80_ms": quantile(times_ms, 0.8), "min_ms": min(times_ms), "reps": len(times_ms)}


# ---------------------------------------------------------------------------------------- timing

def _one(setup: Callable[[], dict], step: Callable[[dict], None], cuda: bool) -> float:
    state = setup()
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step(state)
        end.record()
        end.synchronize()
        elapsed = start.elapsed_time(end)
    else:
        t0 = time.perf_counter()
        step(state)
        elapsed = (time.perf_counter() - t0) * 1e3
    del state  # outputs (and their graphs) are released here, outside the timed interval
    return elapsed


def time_mode(setup: Callable[[], dict], step: Callable[[dict], None], device, *, warmup: int, min_reps: int,
              max_reps: int, target_seconds: float) -> list[float]:
    """Per-repetition times in ms: ``warmup`` untimed, then ``clamp(target / t_warm, min, max)`` timed."""
    cuda = torch.device(device).type == "cuda"
    last = 0.0
    for _ in range(max(1, warmup)):
        last = _one(setup, step, cuda)
    reps = choose_reps(last, min_reps=min_reps, max_reps=max_reps, target_seconds=target_seconds)
    return [_one(setup, step, cuda) for _ in range(reps)]


def choose_reps(last_ms: float, *, min_reps: int, max_reps: int, target_seconds: float) -> int:
    """``clamp(ceil(target_seconds / last), min_reps, max_reps)`` repetitions for a step of ``last_ms``."""
    reps = max_reps if last_ms <= 0 else math.ceil(target_seconds * 1e3 / last_ms)
    return max(min_reps, min(max_reps, reps))


def time_once(setup: Callable[[], dict], step: Callable[[dict], None], device) -> float:
    """One repetition (untimed setup, timed step) in ms; also a warm-up."""
    return _one(setup, step, torch.device(device).type == "cuda")


def cuda_extra_peak(setup: Callable[[], dict], step: Callable[[dict], None], clear: Callable[[], None]) -> int:
    """Peak allocated bytes above the inputs while ``step`` runs (CUDA caching allocator stats)."""
    clear()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    state = setup()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    step(state)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del state
    clear()
    return int(peak - base)


# ----------------------------------------------------------------------------------------- device

def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def available_memory_bytes(device) -> int:
    """Free device memory (CUDA) or ``MemAvailable`` (CPU, Linux); a large number when unknown."""
    if torch.device(device).type == "cuda":
        return int(torch.cuda.mem_get_info()[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 2**62


def total_memory_bytes(device) -> int | None:
    if torch.device(device).type == "cuda":
        return int(torch.cuda.get_device_properties(torch.device(device)).total_memory)
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return None


def slug(text: str) -> str:
    text = re.sub(r"\((R|TM|C)\)|\b(CPU|Processor|Corporation)\b|@.*$", " ", text, flags=re.IGNORECASE)
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "device"


def measure_copy_bandwidth(nbytes: int = 256 * 2**20, reps: int = 5) -> float:
    """Measured copy bandwidth in GB/s on CPU: ``dst.copy_(src)``, ``2 * nbytes`` per copy, median of ``reps``."""
    src = torch.empty(nbytes // 4, dtype=torch.float32).fill_(1.0)
    dst = torch.empty_like(src).fill_(0.0)
    times = []
    for _ in range(reps + 1):
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
    return 2 * nbytes / quantile(times[1:], 0.5) / 1e9


def describe_device(device, bandwidth_gbs: float | None = None, measure_copy: bool = True) -> dict:
    """Device name, slug, memory and the bandwidth used for ``% of bandwidth``."""
    device = torch.device(device)
    info: dict = {"type": device.type, "host": socket.gethostname(), "cpu_model": cpu_model(),
                  "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                  "total_memory_bytes": total_memory_bytes(device)}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(name=props.name, gpu_name=props.name, slug=slug(props.name),
                    compute_capability=f"{props.major}.{props.minor}", cuda=torch.version.cuda)
        table_gbs, source = peak_bandwidth(props.name)
    else:
        info.update(name=f"CPU: {info['cpu_model']}", gpu_name=None, slug="cpu-" + slug(info["cpu_model"]))
        table_gbs, source = None, "CPU: no peak bandwidth is recorded (none is known for this machine)"
    if bandwidth_gbs is not None:
        table_gbs, source = float(bandwidth_gbs), f"--bandwidth-gbs {bandwidth_gbs:g}"
    info["bandwidth_gbs"] = table_gbs
    info["bandwidth_source"] = source
    info["measured_copy_bandwidth_gbs"] = None
    if device.type == "cpu" and measure_copy:
        info["measured_copy_bandwidth_gbs"] = measure_copy_bandwidth()
        info["measured_copy_bandwidth_note"] = ("measured copy bandwidth: torch copy_ of a 256 MiB fp32 buffer, "
                                                "(read + write bytes) / median time; not a vendor peak")
    return info


def _version_of(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:  # noqa: BLE001 - optional here
        return None


def gpu_driver_version() -> str | None:
    """The NVIDIA driver version (``nvidia-smi``), or None without one."""
    import shutil
    import subprocess

    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=True).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return None
    return out[0] if out else None


def versions() -> dict:
    import sys

    out = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
           "driver": gpu_driver_version(), "numpy": _version_of("numpy")}
    for module in ("triton", "transformers", "peft", "trl", "tidpo", "matplotlib"):
        out[module] = _version_of(module)
    from benchmarks.cases import liger_version

    out["liger_kernel"] = liger_version()
    return out


def write_results(args, prefix: str, results: dict, markdown: str):
    """Write ``<args.out>/<stem>.json`` and ``.md`` (the folder is created), ``stem`` being ``args.name`` or
    ``<prefix>-<device>-<YYYYMMDD>`` (:func:`add_output_arguments`); the common path stem."""
    import json
    from pathlib import Path

    stem = args.name or f"{prefix}-{results['device']['slug']}-{results['date'][:10].replace('-', '')}"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / f"{stem}.md").write_text(markdown)
    return out / stem


def add_output_arguments(parser, stem: str) -> None:
    """``--out`` (the results folder), ``--name`` (the file stem, default ``<stem>-<device>-<YYYYMMDD>``) and the
    hidden ``--worker SPEC`` through which a benchmark runs its measurements in a fresh process."""
    import argparse
    from pathlib import Path

    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--name", default=None, help=f"file stem (default {stem}-<device>-<YYYYMMDD>)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
