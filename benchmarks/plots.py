"""PNG plots of a results dict (matplotlib, Agg backend).

- ``<stem>-<op>.png``: one per op / loss, one panel per mode: median time (log scale) against the shape
  (``N x V``, ordered by ``N * V``), one line per provider and dtype;
- ``<stem>-speedup.png``: tidpo's speed-up over each provider (provider time / tidpo time, geometric
  mean over the shapes), one panel per mode, grouped by op and dtype, log scale, 1 = parity;
- ``<stem>-memory.png``: extra peak memory above the inputs per provider at each op's largest measured
  shape (log scale); a note instead when no memory was measured (CPU without ``--memory``).
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - after selecting the backend

from benchmarks.shapes import ALL_OPS, MODES  # noqa: E402

COLORS = {"tidpo": "tab:blue", "eager": "tab:red", "compile": "tab:orange", "liger": "tab:green"}
STYLES = {"bfloat16": "-", "float16": "-.", "float32": "--", "float64": ":"}
MARKERS = {"bfloat16": "o", "float16": "^", "float32": "s", "float64": "D"}
MiB = 2**20


def _shape_label(n: int, v: int) -> str:
    return f"{n}x{v // 1000}k" if v >= 1000 else f"{n}x{v}"


def _ok(cells):
    return [c for c in cells if c["status"] == "ok" and c.get("median_ms")]


def plot_op(results: dict, op: str, path: Path) -> Path | None:
    cells = [c for c in results["cells"] if c["op"] == op]
    if not cells:
        return None
    modes = [m for m in MODES if any(c["mode"] == m for c in cells)]
    shapes = sorted({(c["N"], c["V"]) for c in cells}, key=lambda s: (s[0] * s[1], s))
    xpos = {s: i for i, s in enumerate(shapes)}
    fig, axes = plt.subplots(1, len(modes), figsize=(5 * len(modes), 4), squeeze=False)
    for ax, mode in zip(axes[0], modes, strict=True):
        series: dict[tuple[str, str], list[tuple[int, float]]] = {}
        for c in _ok(c for c in cells if c["mode"] == mode):
            series.setdefault((c["provider"], c["dtype"]), []).append((xpos[(c["N"], c["V"])], c["median_ms"]))
        for (provider, dtype), pts in sorted(series.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], STYLES.get(dtype, "-"), marker=MARKERS.get(dtype, "o"),
                    color=COLORS.get(provider), label=f"{provider} {dtype}")
        ax.set_xticks(range(len(shapes)), [_shape_label(*s) for s in shapes], rotation=45, ha="right", fontsize=8)
        ax.set_xlim(-0.5, len(shapes) - 0.5)
        if series:
            ax.set_yscale("log")
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "no measured cell", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(f"{op} {mode}")
        ax.set_xlabel("N x V")
        ax.set_ylabel("median time (ms, log)")
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle(f"{op}: {results['device']['name']} ({results['set']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _geomean(xs: list[float]) -> float:
    return math.exp(sum(math.log(x) for x in xs) / len(xs))


def plot_speedup(results: dict, path: Path) -> Path:
    """One panel per mode; groups (op, dtype); one bar per provider: geomean of provider time / tidpo time."""
    def order(k):
        return (ALL_OPS.index(k[0]) if k[0] in ALL_OPS else 99, k[1])

    modes = [m for m in MODES if any(c["mode"] == m for c in results["cells"])] or list(MODES)
    groups = sorted({(c["op"], c["dtype"]) for c in results["cells"]}, key=order)
    providers = sorted({c["provider"] for c in results["cells"] if c.get("speedup_of_tidpo")},
                       key=lambda p: list(COLORS).index(p) if p in COLORS else 99)
    fig, axes = plt.subplots(len(modes), 1, figsize=(max(7, 0.45 * len(groups) * max(1, len(providers)) + 2),
                                                    2.8 * len(modes)), squeeze=False)
    width = 0.8 / max(1, len(providers))
    for ax, mode in zip(axes[:, 0], modes, strict=True):
        drawn = False
        for j, provider in enumerate(providers):
            xs, ys = [], []
            for i, (op, dtype) in enumerate(groups):
                vals = [c["speedup_of_tidpo"] for c in results["cells"]
                        if (c["op"], c["dtype"], c["mode"], c["provider"]) == (op, dtype, mode, provider)
                        and c.get("speedup_of_tidpo")]
                if vals:
                    xs.append(i + (j - (len(providers) - 1) / 2) * width)
                    ys.append(_geomean(vals))
            if xs:
                ax.bar(xs, ys, width, color=COLORS.get(provider), label=f"vs {provider}")
                drawn = True
        ax.set_xticks(range(len(groups)), [f"{op}\n{dtype}" for op, dtype in groups], fontsize=7)
        ax.axhline(1.0, color="black", linewidth=0.8)
        if drawn:
            ax.set_yscale("log")
            ax.legend(fontsize=7, loc="upper right")
        else:
            ax.text(0.5, 0.5, "no speed-up could be computed (no pair of measured cells)", ha="center",
                    va="center", transform=ax.transAxes)
        ax.set_ylabel(f"{mode}: speed-up (log)", fontsize=8)
        ax.grid(True, axis="y", which="both", alpha=0.3)
    axes[0, 0].set_title(f"tidpo speed-up = provider time / tidpo time (> 1: tidpo faster), geometric mean over "
                         f"shapes: {results['device']['name']} ({results['set']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_memory(results: dict, path: Path) -> Path:
    measured = [c for c in results["cells"] if c.get("extra_peak_bytes") is not None]
    groups: dict[tuple[str, str, str], dict[str, float]] = {}
    for key in sorted({(c["op"], c["mode"], c["dtype"]) for c in measured},
                      key=lambda k: (ALL_OPS.index(k[0]) if k[0] in ALL_OPS else 99, MODES.index(k[1]), k[2])):
        cells = [c for c in measured if (c["op"], c["mode"], c["dtype"]) == key]
        largest = max((c["N"] * c["V"], c["N"], c["V"]) for c in cells)
        groups[key] = {c["provider"]: max(c["extra_peak_bytes"], 0) / MiB for c in cells
                       if (c["N"] * c["V"], c["N"], c["V"]) == largest}
        groups[key]["_shape"] = largest[1:]
    providers = sorted({p for d in groups.values() for p in d if p != "_shape"},
                       key=lambda p: list(COLORS).index(p) if p in COLORS else 99)
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(groups) * max(1, len(providers))), 4.5))
    if groups:
        width = 0.8 / max(1, len(providers))
        for j, provider in enumerate(providers):
            xs = [i + (j - (len(providers) - 1) / 2) * width for i, d in enumerate(groups.values()) if provider in d]
            ys = [max(d[provider], 1e-3) for d in groups.values() if provider in d]
            ax.bar(xs, ys, width, color=COLORS.get(provider), label=provider)
        ax.set_xticks(range(len(groups)),
                      [f"{op} {mode} {dtype}\n{_shape_label(*d['_shape'])}" for (op, mode, dtype), d in groups.items()],
                      fontsize=7, rotation=45, ha="right")
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no memory measured in this run\n(CPU: pass --memory)", ha="center", va="center",
                transform=ax.transAxes)
    ax.set_ylabel("extra peak memory above the inputs (MiB, log)")
    ax.set_title(f"peak memory at the largest shape: {results['device']['name']} ({results['set']})", fontsize=9)
    ax.grid(True, axis="y", which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_plots(results: dict, out: Path, stem: str) -> list[Path]:
    paths = []
    ops = [op for op in ALL_OPS if any(c["op"] == op for c in results["cells"])]
    for op in ops:
        p = plot_op(results, op, out / f"{stem}-{op}.png")
        if p is not None:
            paths.append(p)
    paths.append(plot_speedup(results, out / f"{stem}-speedup.png"))
    paths.append(plot_memory(results, out / f"{stem}-memory.png"))
    return paths
