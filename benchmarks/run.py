"""Run a benchmark set and write JSON results, PNG plots and a markdown table.

Usage::

    python -m benchmarks.run [--set cpu|gpu|gpu-quick|smoke] [--out DIR] [--name STEM]
                             [--ops logps,kl,dpo,tdpo2,tis_dpo,ti_dpo] [--providers tidpo,eager,compile,liger]
                             [--modes fwd,bwd,full] [--dtypes bfloat16,float32] [--shapes NxV,...]
                             [--device cpu|cuda]
                             [--memory | --no-memory] [--max-seconds S] [--bandwidth-gbs X]
                             [--no-check] [--no-plots] [--markdown] [--markdown-out PATH]
    python -m benchmarks.run --from-json RESULTS.json [--markdown] [--no-plots]   # re-render only

Writes ``<out>/<stem>.json``, ``<out>/<stem>.md`` and ``<out>/<stem>-<plot>.png`` with
``stem = <device-slug>-<YYYYMMDD>`` (``--name`` overrides it) and ``out = benchmarks/results``.
The JSON is rewritten after every (op, shape, dtype) group (``"complete": false`` until the end), so an
interrupted run keeps what it measured.

What is measured: see :mod:`benchmarks.cases` (providers, modes, bytes formulas) and
:mod:`benchmarks.timing` (timing, memory, bandwidth). Per cell: median / p20 / p80 / min time in ms,
``GB/s = bytes / median`` with ``bytes`` from the formula of the op and mode, ``% of the device's
peak bandwidth`` (null on CPU), extra peak memory above the inputs (CUDA: always; CPU: with
``--memory``, one fresh process per cell, slow), the tidpo backend, and ``speedup_of_tidpo`` =
provider median / tidpo median on the same (op, mode, dtype, N, V) (> 1: tidpo is faster).

Before timing, every provider is checked against tidpo on a tiny float32 cell (loss / output value
and the logits gradient, :func:`benchmarks.cases.check_agreement`); a provider that disagrees is not
timed for that op (its cells record the reason), so a broken baseline cannot show a fake speed-up.

Cells that cannot run are recorded with ``status = "skipped"`` and a reason (provider not
installed or not for this device, torch.compile failure, estimated memory beyond what is free,
out of memory, ``--max-seconds`` budget exhausted); nothing is dropped silently.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import shlex
import sys
import time
import traceback
from pathlib import Path

import torch

from benchmarks import cases, timing
from benchmarks.shapes import ALL_OPS, LOSSES, MODES, PAIRS, PROVIDERS, SETS, loss_layout, shapes_for

RESULTS_DIR = Path(__file__).resolve().parent / "results"
SCHEMA_VERSION = 1
MiB = 2**20


def _csv(value: str | None, allowed: tuple[str, ...], what: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    items = tuple(x.strip() for x in value.split(",") if x.strip())
    bad = [x for x in items if x not in allowed]
    if bad:
        raise SystemExit(f"unknown {what}: {', '.join(bad)} (choose from {', '.join(allowed)})")
    return items


def _parse_shapes(value: str | None) -> list[tuple[int, int]] | None:
    if not value:
        return None
    shapes = []
    for item in value.split(","):
        try:
            n, v = (int(x) for x in item.lower().split("x"))
        except ValueError:
            raise SystemExit(f"--shapes: expected NxV (e.g. 1024x32000), got {item!r}") from None
        shapes.append((n, v))
    return shapes


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n")[0])
    parser.add_argument("--set", dest="bench_set", choices=tuple(SETS), default=None,
                        help="shape set (default: gpu with CUDA, cpu otherwise)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="output directory (default benchmarks/results)")
    parser.add_argument("--name", default=None, help="file stem (default <device-slug>-<YYYYMMDD>)")
    parser.add_argument("--ops", default=None, help=f"comma list of {','.join(ALL_OPS)} (default: all)")
    parser.add_argument("--providers", default=None, help=f"comma list of {','.join(PROVIDERS)} (default: all)")
    parser.add_argument("--modes", default=None, help=f"comma list of {','.join(MODES)} (default: all)")
    parser.add_argument("--dtypes", default=None, help="comma list of dtypes (default: the set's)")
    parser.add_argument("--shapes", default=None,
                        help="comma list of NxV, e.g. 1024x32000, replacing the set's shapes for ops and losses")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: the set's)")
    memory = parser.add_mutually_exclusive_group()
    memory.add_argument("--memory", dest="memory", action="store_true", default=None,
                        help="measure extra peak memory (CUDA: default on; CPU: one subprocess per cell, slow)")
    memory.add_argument("--no-memory", dest="memory", action="store_false")
    parser.add_argument("--max-seconds", type=float, default=None,
                        help="time budget: cells not started within it are recorded as skipped")
    parser.add_argument("--bandwidth-gbs", type=float, default=None, help="peak memory bandwidth to report %% of")
    parser.add_argument("--no-check", dest="check", action="store_false",
                        help="skip the provider agreement check (not recommended)")
    parser.add_argument("--no-plots", dest="plots", action="store_false", help="do not write PNG plots")
    parser.add_argument("--markdown", action="store_true", help="print the markdown table at the end")
    parser.add_argument("--markdown-out", type=Path, default=None, help="also write the markdown table here")
    parser.add_argument("--from-json", type=Path, default=None,
                        help="re-render markdown / plots from an existing results JSON (no measurement)")
    return parser


# -------------------------------------------------------------------------------------------- cells

def new_cell(op: str, mode: str, provider: str, dtype: str, tokens: int, vocab: int) -> dict:
    rows, length = loss_layout(tokens) if op in LOSSES else (None, None)
    return {
        "op": op, "kind": "loss" if op in LOSSES else "op", "mode": mode, "provider": provider, "dtype": dtype,
        "N": tokens, "V": vocab, "B": PAIRS if op in LOSSES else None, "T": length, "rows": rows,
        "status": None, "reason": "",
        "median_ms": None, "p20_ms": None, "p80_ms": None, "min_ms": None, "reps": 0,
        "bytes": cases.bytes_moved(op, mode, tokens, vocab, dtype), "bytes_formula": cases.bytes_formula(op, mode),
        "gbs": None, "pct_bandwidth": None, "pct_measured_copy_bandwidth": None,
        "extra_peak_bytes": None, "memory_method": None,
        "backend": None, "compile_seconds": None, "like_for_like": True, "note": "",
        "speedup_of_tidpo": None,
    }


def skip(cell: dict, reason: str) -> dict:
    cell.update(status="skipped", reason=reason)
    return cell


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def _reason(exc: BaseException, prefix: str = "") -> str:
    if isinstance(exc, cases.Unavailable):
        return str(exc)
    text = f"{type(exc).__name__}: {str(exc).strip()}".replace("\n", " ")
    return (prefix + text)[:600]


class Runner:
    """Runs a benchmark set; results accumulate in ``self.results``."""

    def __init__(self, args: argparse.Namespace, argv: list[str]) -> None:
        self.args = args
        default_set = "gpu" if torch.cuda.is_available() else "cpu"
        self.bench_set = SETS[args.bench_set or default_set]
        self.device = torch.device(args.device or self.bench_set.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise SystemExit(f"set {self.bench_set.name!r} needs CUDA, which is not available here "
                             "(use --set cpu, or --device cpu)")
        self.ops = _csv(args.ops, ALL_OPS, "ops") or ALL_OPS
        self.providers = _csv(args.providers, PROVIDERS, "providers") or PROVIDERS
        if "tidpo" not in self.providers:
            self.providers = ("tidpo", *self.providers)  # speed-ups are relative to tidpo
        self.modes = _csv(args.modes, MODES, "modes") or MODES
        dtypes = _csv(args.dtypes, ("bfloat16", "float16", "float32", "float64"), "dtypes")
        self.dtypes = dtypes or self.bench_set.dtypes
        self.shapes = _parse_shapes(args.shapes)
        self.memory = args.memory if args.memory is not None else self.device.type == "cuda"
        self.t0 = time.perf_counter()
        self.cache = cases.GroupCache()
        self.checked: dict[tuple[str, str], str | None] = {}  # (op, provider) -> why not timed, or None
        device_info = timing.describe_device(self.device, args.bandwidth_gbs)
        now = _dt.datetime.now().astimezone()
        self.stem = args.name or f"{device_info['slug']}-{now.strftime('%Y%m%d')}"
        self.results = {
            "schema_version": SCHEMA_VERSION,
            "complete": False,
            "set": self.bench_set.name,
            "set_description": self.bench_set.description,
            "date": now.isoformat(timespec="seconds"),
            "command": " ".join(shlex.quote(a) for a in ["python", "-m", "benchmarks.run", *argv]),
            "host": device_info["host"],
            "device": device_info,
            "versions": timing.versions(),
            "settings": {
                "ops": list(self.ops), "providers": list(self.providers), "modes": list(self.modes),
                "dtypes": list(self.dtypes), "shapes": self.shapes,
                "warmup": self.bench_set.warmup, "min_reps": self.bench_set.min_reps,
                "max_reps": self.bench_set.max_reps, "target_seconds": self.bench_set.target_seconds,
                "memory": self.memory, "max_seconds": args.max_seconds, "pairs_B": PAIRS,
                "ignore_fraction": 0.1, "beta": cases.BETA, "alpha": cases.ALPHA,
            },
            "definitions": {
                "N": "positions (tokens): logits [N, V] for logps/kl, [2B, T, V] with 2B*T = N for the losses",
                "s": "bytes per logits element (2 for bf16/fp16, 4 for fp32)",
                "modes": {"fwd": "forward with the autograd graph recorded",
                          "bwd": "backward alone; the forward is rebuilt in an untimed setup before each "
                                 "repetition",
                          "full": "forward + backward"},
                "time": "median / p20 / p80 / min over repetitions in ms (CUDA events on GPU, perf_counter "
                        "on CPU), after warm-up",
                "gbs": "bytes / median time, 1 GB = 1e9 bytes",
                "pct_bandwidth": "gbs / device peak bandwidth (device.bandwidth_gbs); null when unknown (CPU)",
                "pct_measured_copy_bandwidth": "CPU only: gbs / measured copy bandwidth (not a peak)",
                "extra_peak_bytes": "peak memory above the inputs while the timed region runs (bwd: includes "
                                    "the saved forward state); CUDA allocator stats, or CPU VmHWM in a fresh "
                                    "process (benchmarks/memory_cpu.py)",
                "speedup_of_tidpo": "this provider's median / tidpo's median on the same op, mode, dtype, N, V "
                                    "(> 1: tidpo is faster)",
            },
            "formulas": {op: {"bytes": {m: cases.bytes_formula(op, m) for m in MODES},
                              "explanation": cases.BYTES_EXPLANATION[op], "call": cases.OP_DESCRIPTION[op]}
                         for op in ALL_OPS},
            "providers": {p: cases.PROVIDER_DESCRIPTION[p] for p in self.providers},
            "agreement": [],
            "cells": [],
            "wall_seconds": None,
        }

    # --------------------------------------------------------------------------------- helpers

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def budget_left(self) -> bool:
        return self.args.max_seconds is None or self.elapsed() < self.args.max_seconds

    def budget_reason(self) -> str:
        return f"time budget exhausted (--max-seconds {self.args.max_seconds:g}) before this cell started"

    def log(self, message: str) -> None:
        print(f"[{self.elapsed():7.1f}s] {message}", flush=True)

    def json_path(self) -> Path:
        return self.args.out / f"{self.stem}.json"

    def save(self) -> None:
        self.args.out.mkdir(parents=True, exist_ok=True)
        self.results["wall_seconds"] = round(self.elapsed(), 2)
        tmp = self.json_path().with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.results, indent=1) + "\n")
        tmp.replace(self.json_path())

    # ------------------------------------------------------------------------------- agreement

    def disagreement(self, op: str, provider: str) -> str | None:
        """Why ``provider`` must not be timed on ``op`` (it disagrees with tidpo), or None.

        The check runs once per (op, provider), when its first cell is reached rather than all up front, so
        that a run cut short by ``--max-seconds`` has spent its time on measured cells (a torch.compile
        check costs a cold compile).
        """
        if provider == "tidpo" or not self.args.check:
            return None
        if (op, provider) not in self.checked:
            result = cases.check_agreement(op, provider, self.device)
            self.results["agreement"].append(result)
            self.checked[(op, provider)] = None if result["ok"] is not False else (
                f"not timed: agreement check failed (value err {result['value_max_err']:.3g} / tol "
                f"{result['value_tol']:.3g}, grad err {result['grad_max_err']:.3g} / tol "
                f"{result['grad_tol']:.3g})")
            status = {True: "ok", False: "FAILED", None: "n/a"}[result["ok"]]
            self.log(f"agreement {op:8s} {provider:8s}: {status} {result.get('reason', '')}")
        return self.checked[(op, provider)]

    # ----------------------------------------------------------------------------------- cells

    def run_group(self, op: str, tokens: int, vocab: int, dtype: str) -> None:
        cells = {(p, m): new_cell(op, m, p, dtype, tokens, vocab) for p in self.providers for m in self.modes}
        self.results["cells"].extend(cells.values())
        if not self.budget_left():
            for cell in cells.values():
                skip(cell, self.budget_reason())
            return
        need_inputs = (2 if cases.uses_ref_logits(op) else 1) * tokens * vocab * cases.to_dtype(dtype).itemsize
        available = timing.available_memory_bytes(self.device)
        if need_inputs > 0.9 * available:
            for cell in cells.values():
                skip(cell, f"inputs need {need_inputs / 2**30:.1f} GiB, {available / 2**30:.1f} GiB available")
            return
        try:
            self.cache.inputs_for(op, tokens, vocab, dtype, self.device)
        except Exception as exc:  # noqa: BLE001 - e.g. out of memory while allocating
            for cell in cells.values():
                skip(cell, _reason(exc, "could not build the inputs: "))
            self.cache.clear()
            return
        for provider in self.providers:
            self.run_provider(op, provider, tokens, vocab, dtype, {m: cells[(provider, m)] for m in self.modes})
        self.cache.clear()

    def run_provider(self, op: str, provider: str, tokens: int, vocab: int, dtype: str, cells: dict) -> None:
        if not self.budget_left():
            for cell in cells.values():
                skip(cell, self.budget_reason())
            return
        # The agreement check comes first so that it records unavailable providers too (ok: None, with why).
        reason = self.disagreement(op, provider) or cases.provider_unavailable(op, provider, self.device)
        if reason:
            for cell in cells.values():
                skip(cell, reason)
            return
        available = timing.available_memory_bytes(self.device)
        for mode, cell in cells.items():
            need = cases.estimated_extra_bytes(op, provider, mode, tokens, vocab, dtype)
            if need > 0.9 * available:
                skip(cell, f"estimated to need {need / 2**30:.1f} GiB beyond the inputs "
                           f"({available / 2**30:.1f} GiB available)")
        todo = {m: c for m, c in cells.items() if c["status"] is None}
        if not todo:
            return
        if not self.budget_left():
            for cell in todo.values():
                skip(cell, self.budget_reason())
            return
        try:
            runner = self.cache.runner_for(provider)
        except Exception as exc:  # noqa: BLE001 - recorded (compile failure, OOM, missing kernel, ...)
            prefix = "torch.compile failed: " if provider == "compile" else "could not run: "
            for cell in todo.values():
                skip(cell, _reason(exc, "" if _is_oom(exc) else prefix))
            self.log(f"{op} {provider} {dtype} N={tokens} V={vocab}: skipped ({_reason(exc)[:200]})")
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            return
        compile_seconds = self.cache.compile_seconds.get(provider)
        for mode, cell in todo.items():
            cell.update(backend=runner.backend, like_for_like=runner.like_for_like, note=runner.note,
                        compile_seconds=compile_seconds)
            if not self.budget_left():
                skip(cell, self.budget_reason())
                continue
            try:
                self.time_cell(runner, mode, cell)
            except Exception as exc:  # noqa: BLE001 - one cell's failure must not end the run
                skip(cell, _reason(exc, "" if _is_oom(exc) else "failed: "))
                if not _is_oom(exc):
                    traceback.print_exc()
                runner.clear_grads()
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
            self.report_cell(cell)

    def time_cell(self, runner: cases.Runner, mode: str, cell: dict) -> None:
        bench = self.bench_set
        setup, step = cases.mode_callables(runner, mode, self.device)
        times = timing.time_mode(setup, step, self.device, warmup=bench.warmup, min_reps=bench.min_reps,
                                 max_reps=bench.max_reps, target_seconds=bench.target_seconds)
        cell.update(timing.summarize(times), status="ok")
        cell["gbs"] = cell["bytes"] / (cell["median_ms"] * 1e-3) / 1e9 if cell["median_ms"] > 0 else None
        peak = self.results["device"]["bandwidth_gbs"]
        if peak and cell["gbs"] is not None:
            cell["pct_bandwidth"] = 100.0 * cell["gbs"] / peak
        copy_bw = self.results["device"].get("measured_copy_bandwidth_gbs")
        if copy_bw and cell["gbs"] is not None:
            cell["pct_measured_copy_bandwidth"] = 100.0 * cell["gbs"] / copy_bw
        if self.memory and self.device.type == "cuda":
            cell["extra_peak_bytes"] = timing.cuda_extra_peak(setup, step, runner.clear_grads)
            cell["memory_method"] = "cuda max_memory_allocated - allocated after inputs"
        elif not self.memory:
            cell["memory_method"] = "not measured (" + ("--no-memory" if self.device.type == "cuda" else
                                                        "CPU: pass --memory") + ")"
        runner.clear_grads()

    def report_cell(self, cell: dict) -> None:
        head = (f"{cell['op']:8s} {cell['mode']:4s} {cell['provider']:8s} {cell['dtype']:8s} "
                f"N={cell['N']:<6d} V={cell['V']:<6d}")
        if cell["status"] == "ok":
            mem = "" if cell["extra_peak_bytes"] is None else f"  +{cell['extra_peak_bytes'] / MiB:.0f} MiB"
            self.log(f"{head} {cell['median_ms']:9.3f} ms  [{cell['p20_ms']:.3f}, {cell['p80_ms']:.3f}]"
                     f"  {cell['gbs']:7.1f} GB/s  x{cell['reps']}{mem}")
        else:
            self.log(f"{head} skipped: {cell['reason'][:160]}")

    def measure_cpu_memory(self) -> None:
        from benchmarks.memory_cpu import measure_cell

        self.cache.clear()
        for cell in self.results["cells"]:
            if cell["status"] != "ok":
                continue
            if not self.budget_left():
                cell["memory_method"] = "not measured: " + self.budget_reason()
                continue
            try:
                r = measure_cell(cell["op"], cell["mode"], cell["provider"], cell["N"], cell["V"], cell["dtype"],
                                 timeout=1800)
                cell["extra_peak_bytes"] = int(r["extra_peak_bytes"])
                cell["memory_method"] = "cpu VmHWM above the inputs, fresh process (benchmarks/memory_cpu.py)"
            except Exception as exc:  # noqa: BLE001 - recorded
                cell["memory_method"] = "not measured: " + _reason(exc)[:300]
            self.log(f"memory {cell['op']:8s} {cell['mode']:4s} {cell['provider']:8s} {cell['dtype']:8s} "
                     f"N={cell['N']} V={cell['V']}: "
                     + (f"+{cell['extra_peak_bytes'] / MiB:.1f} MiB" if cell["extra_peak_bytes"] is not None
                        else cell["memory_method"]))

    def run(self) -> dict:
        threads = torch.get_num_threads()
        if self.bench_set.threads:
            torch.set_num_threads(self.bench_set.threads)
        try:
            return self._run()
        finally:
            torch.set_num_threads(threads)

    def _run(self) -> dict:
        dev = self.results["device"]
        self.results["settings"]["threads"] = torch.get_num_threads()
        self.log(f"set {self.bench_set.name} on {dev['name']} ({self.device}); bandwidth: {dev['bandwidth_source']}")
        if not self.args.check:
            self.results["agreement"] = [{"ok": None, "reason": "skipped (--no-check)"}]
        self.save()
        for op, tokens, vocab in group_order(self.ops, lambda op: self.shapes or shapes_for(self.bench_set, op)):
            for dtype in self.dtypes:
                self.run_group(op, tokens, vocab, dtype)
                self.save()
        if self.memory and self.device.type == "cpu":
            self.measure_cpu_memory()
        add_speedups(self.results)
        self.results["complete"] = True
        self.save()
        return self.results


def group_order(ops, shapes_of) -> list[tuple[str, int, int]]:
    """The ``(op, N, V)`` groups in the order they are measured: the losses first, and every op's first shape
    before any op's second, so that a run cut short by its time budget has measured each op at least once."""
    ordered = [op for op in ops if op in LOSSES] + [op for op in ops if op not in LOSSES]
    shapes = {op: list(shapes_of(op)) for op in ordered}
    order = []
    for k in range(max((len(s) for s in shapes.values()), default=0)):
        order += [(op, *shapes[op][k]) for op in ordered if k < len(shapes[op])]
    return order


def off_kernel(cell: dict, device_type: str) -> bool:
    """A tidpo cell on a GPU that ran (partly) on the chunked torch path instead of the Triton kernels."""
    return (device_type == "cuda" and cell["provider"] == "tidpo" and cell["status"] == "ok"
            and "torch" in str(cell.get("backend")))


def add_speedups(results: dict) -> None:
    """``speedup_of_tidpo`` on every ok non-tidpo cell with an ok tidpo cell of the same op/mode/dtype/N/V."""
    def key(c: dict) -> tuple:
        return (c["op"], c["mode"], c["dtype"], c["N"], c["V"])

    tidpo = {key(c): c for c in results["cells"] if c["provider"] == "tidpo" and c["status"] == "ok"}
    for c in results["cells"]:
        ref = tidpo.get(key(c))
        if c["provider"] != "tidpo" and c["status"] == "ok" and ref and ref["median_ms"] > 0:
            c["speedup_of_tidpo"] = c["median_ms"] / ref["median_ms"]


# ----------------------------------------------------------------------------------------- markdown

def _fmt_ms(ms: float) -> str:
    return f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"


def markdown_table(results: dict) -> str:
    """Time table (one row per op/mode/dtype/shape) and, when measured, a memory table."""
    providers = [p for p in results["settings"]["providers"]]
    others = [p for p in providers if p != "tidpo"]
    groups: dict[tuple, dict[str, dict]] = {}
    for c in results["cells"]:
        groups.setdefault((c["op"], c["mode"], c["dtype"], c["N"], c["V"]), {})[c["provider"]] = c
    dev, versions = results["device"], results["versions"]
    software = ", ".join(f"{name} {versions[key]}" for name, key in (
        ("driver", "driver"), ("torch", "torch"), ("CUDA", "cuda"), ("triton", "triton")) if versions.get(key))
    lines = [f"Device: {dev['name']}; {software}; set `{results['set']}`, {results['date'][:10]}. Times: median "
             "ms (lower is better); speed-up = provider time / tidpo time.", ""]
    pct = "% peak" if dev.get("bandwidth_gbs") else None
    header = ["op", "mode", "dtype", "N", "V", *[f"{p} ms" for p in providers], "tidpo GB/s"]
    if pct:
        header.append("tidpo % peak BW")
    header += [f"speed-up vs {p}" for p in others]
    lines += ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    notes: dict[str, int] = {}

    def note_ref(text: str) -> str:
        if text not in notes:
            notes[text] = len(notes) + 1
        return f"skip[^{notes[text]}]"

    for (op, mode, dtype, n, v), row in groups.items():
        cells = [op, mode, dtype, str(n), str(v)]
        for p in providers:
            c = row.get(p)
            if c is None:
                cells.append("")
            elif c["status"] == "ok":
                mark = "*" if not c.get("like_for_like", True) else ""
                mark += "†" if off_kernel(c, dev.get("type", "cpu")) else ""
                cells.append(_fmt_ms(c["median_ms"]) + mark)
            else:
                cells.append(note_ref(c["reason"]))
        t = row.get("tidpo")
        ok = t is not None and t["status"] == "ok"
        cells.append(f"{t['gbs']:.1f}" if ok and t["gbs"] is not None else "")
        if pct:
            cells.append(f"{t['pct_bandwidth']:.0f}%" if ok and t["pct_bandwidth"] is not None else "")
        for p in others:
            c = row.get(p)
            cells.append(f"{c['speedup_of_tidpo']:.2f}x" if c and c.get("speedup_of_tidpo") else "")
        lines.append("| " + " | ".join(cells) + " |")
    mem_rows = [(k, row) for k, row in groups.items()
                if any(c.get("extra_peak_bytes") is not None for c in row.values())]
    if mem_rows:
        lines += ["", "Extra peak memory above the inputs (MiB):", ""]
        header = ["op", "mode", "dtype", "N", "V", *[f"{p} MiB" for p in providers]]
        lines += ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        for (op, mode, dtype, n, v), row in mem_rows:
            vals = []
            for p in providers:
                c = row.get(p)
                vals.append(f"{c['extra_peak_bytes'] / MiB:.0f}" if c and c.get("extra_peak_bytes") is not None
                            else "")
            lines.append("| " + " | ".join([op, mode, dtype, str(n), str(v), *vals]) + " |")
    if any(not c.get("like_for_like", True) for c in results["cells"] if c["status"] == "ok"):
        lines += ["", "\\* not like-for-like: " + cases.LIGER_DPO_NOTE + "."]
    if any(off_kernel(c, dev.get("type", "cpu")) for c in results["cells"]):
        lines += ["", "† tidpo ran (partly) on its chunked torch path here, not on the Triton kernels: see the "
                      "cell's `backend` in the JSON."]
    if notes:
        lines.append("")
        lines += [f"[^{i}]: {text}" for text, i in notes.items()]
    return "\n".join(lines) + "\n"


# -------------------------------------------------------------------------------------------- main

def write_outputs(results: dict, out: Path, stem: str, *, plots: bool = True) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    md = out / f"{stem}.md"
    md.write_text(markdown_table(results))
    paths.append(md)
    if plots:
        from benchmarks.plots import write_plots

        paths += write_plots(results, out, stem)
    return paths


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.from_json is not None:
        results = json.loads(args.from_json.read_text())
        out = args.out if "--out" in argv else args.from_json.parent
        stem = args.name or args.from_json.stem
        paths = write_outputs(results, out, stem, plots=args.plots)
    else:
        runner = Runner(args, argv)
        results = runner.run()
        paths = [runner.json_path(), *write_outputs(results, args.out, runner.stem, plots=args.plots)]
        ok = sum(c["status"] == "ok" for c in results["cells"])
        runner.log(f"{ok}/{len(results['cells'])} cells ok; wall {results['wall_seconds']:.0f} s")
    table = markdown_table(results)
    if args.markdown_out is not None:
        args.markdown_out.write_text(table)
        paths.append(args.markdown_out)
    if args.markdown:
        print()
        print(table)
    for p in paths:
        print(f"wrote {p}")
    failed = [a for a in results.get("agreement", []) if a.get("ok") is False]
    if failed:
        print(f"warning: {len(failed)} provider(s) disagree with tidpo and were not timed: "
              + ", ".join(f"{a['op']}/{a['provider']}" for a in failed), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
