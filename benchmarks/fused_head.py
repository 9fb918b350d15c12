"""The fused LM head side by side with the materialised head and the peers' fused heads, in one run.

Usage::

    python -m benchmarks.fused_head [--device cpu|cuda] [--tokens 4096] [--hidden 2048] [--vocab 128256]
                                    [--dtypes float32,bfloat16] [--ops logps,logps_trained,kl,dpo] [--repeats 3]
                                    [--providers tidpo_fused,tidpo_materialised,trl,liger] [--memory]
                                    [--out benchmarks/results] [--name STEM]

Each cell is one training step of an op from hidden states ``h [N, H]`` through a head ``W [V, H]``: the forward
and ``backward`` of ``sum(value * g)`` (``g`` a fixed random cotangent), so every provider computes the same
gradients.

Ops:

- ``logps``: per-token log-probs, frozen head (LoRA, the main use): gradient w.r.t. ``h`` only;
- ``logps_trained``: the same with the head trained (full fine-tuning): gradients w.r.t. ``h`` and ``W``;
- ``kl``: ``KL(ref || policy)`` per token (TDPO's term) from the reference's hidden states and the policy's,
  one shared frozen head; gradient w.r.t. the policy's ``h``;
- ``dpo``: the DPO loss of ``B = 4`` pairs (``2B`` rows of ``N / 2B`` positions) with a reference model's hidden
  states, frozen head.

Providers (recorded as skipped, with the reason, when not installed):

- ``tidpo_fused``: ``tidpo.token_logps(LMHead(W)(h), y)`` etc. (:mod:`tidpo.ops.fused_head`);
- ``tidpo_materialised``: tidpo's op on ``F.linear(h, W)`` (the trainer with ``fused_lm_head=False``);
- ``trl``: TRL 1.16's fused head, ``trl.kernels.ChunkedLogProbFunction`` (valid rows only, as TRL's trainer
  passes them) and ``trl.kernels.chunked_divergence.ChunkedDivergenceFunction`` (``beta = 0``: forward KL);
- ``liger``: Liger-Kernel's ``LigerFusedLinearDPOLoss`` (``dpo`` only; ``compiled=False`` on CPU).

Before anything is timed, every provider's values on the first 256 rows of the very inputs it will be timed on
are compared with ``tidpo_fused``'s and with a float64 materialised computation: fp32 within 1e-5 relative
(TRL's per-token log-probs included), low precision within twice the materialised head's own error in that
dtype plus 1e-3 (its logits formed in fp32 and rounded once to that dtype, as a GEMM in that dtype returns
them). A provider that disagrees is not timed. The repeats interleave the providers, so drifting
machine load touches all alike. ``--memory`` also measures each cell's extra peak memory above its inputs in a
fresh process (the method of :mod:`benchmarks.memory_cpu`).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.memory_cpu import _maxrss_bytes, _reset_peak, _rss_bytes, dtype_str, to_dtype
from benchmarks.timing import add_output_arguments, describe_device, versions, write_results

OPS = ("logps", "logps_trained", "kl", "dpo")
PROVIDERS = ("tidpo_fused", "tidpo_materialised", "trl", "liger")
IGNORE = -100
PAIRS = 4
CHECK_ROWS = 256
MiB = 2**20


class Unavailable(Exception):
    """A provider that cannot run this cell (not installed, not for this op)."""


# ------------------------------------------------------------------------------------------------ inputs

def make_inputs(op: str, tokens: int, hidden: int, vocab: int, dtype: torch.dtype, seed: int = 0,
                device: str = "cpu") -> dict:
    """Hidden states, head and labels (~10 % ignored), written in place (no full-size temporaries)."""
    g = torch.Generator(device).manual_seed(seed)
    h = torch.empty(tokens, hidden, dtype=dtype, device=device).normal_(0.0, 1.0, generator=g)
    weight = torch.empty(vocab, hidden, dtype=dtype, device=device).normal_(0.0, 1.0 / hidden**0.5, generator=g)
    labels = torch.randint(0, vocab, (tokens,), generator=g, device=device)
    labels[torch.rand(tokens, generator=g, device=device) < 0.1] = IGNORE
    inputs = {"h": h, "weight": weight, "labels": labels,
              "g": torch.empty(tokens, dtype=torch.float32, device=device).normal_(generator=g)}
    if op in ("kl", "dpo"):
        inputs["h_ref"] = torch.empty(tokens, hidden, dtype=dtype, device=device).normal_(0.0, 1.0, generator=g)
    return inputs


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``[N, ...] -> [2B, N / 2B, ...]`` for the loss."""
    return x.reshape(2 * PAIRS, -1, *x.shape[1:])


# ------------------------------------------------------------------------------------------------ providers

def _trl():
    try:
        from trl.kernels import ChunkedLogProbFunction
        from trl.kernels.chunked_divergence import ChunkedDivergenceFunction
        from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE
    except ImportError as error:
        raise Unavailable(f"trl is not installed (pip install trl==1.16.0): {error}") from None
    return ChunkedLogProbFunction, ChunkedDivergenceFunction, _CHUNKED_LOGPROB_CHUNK_SIZE


def _valid(labels: torch.Tensor) -> torch.Tensor:
    return (labels != IGNORE).nonzero().squeeze(1)


def _scatter(values: torch.Tensor, index: torch.Tensor, n: int) -> torch.Tensor:
    return values.new_zeros(n).index_put((index,), values)


def value_fn(op: str, provider: str, inputs: dict):
    """``fn(h, weight) -> per-token values [N]`` (``dpo``: the loss ``[1]``) of ``provider``."""
    import tidpo
    from tidpo.ops import LMHead

    labels, n = inputs["labels"], inputs["labels"].numel()
    h_ref = inputs.get("h_ref")
    if provider == "tidpo_fused":
        if op in ("logps", "logps_trained"):
            return lambda h, w: tidpo.token_logps(LMHead(w)(h), labels)
        if op == "kl":
            return lambda h, w: tidpo.token_kl(LMHead(w.detach())(h_ref), LMHead(w)(h), labels)
        return lambda h, w: tidpo.dpo_loss(LMHead(w)(_rows(h)), _rows(labels),
                                           ref_logits=LMHead(w.detach())(_rows(h_ref))).loss.reshape(1)
    if provider == "tidpo_materialised":
        if op in ("logps", "logps_trained"):
            return lambda h, w: tidpo.token_logps(F.linear(h, w), labels)
        if op == "kl":
            return lambda h, w: tidpo.token_kl(F.linear(h_ref, w.detach()), F.linear(h, w), labels)
        return lambda h, w: tidpo.dpo_loss(F.linear(_rows(h), w), _rows(labels),
                                           ref_logits=F.linear(_rows(h_ref), w.detach())).loss.reshape(1)
    if provider == "trl":
        logprob, divergence, chunk = _trl()
        index = _valid(labels)
        if op in ("logps", "logps_trained"):
            y = labels.index_select(0, index)
            return lambda h, w: _scatter(logprob.apply(h.index_select(0, index), w, None, y, 1.0, chunk, None, 1.0,
                                                       ())[0], index, n)
        if op == "kl":
            teacher = h_ref.index_select(0, index)
            return lambda h, w: _scatter(divergence.apply(h.index_select(0, index), w, None, teacher, w.detach(),
                                                          None, 0.0, 1.0, 1.0, None, 1.0, None)[0], index, n)
        raise Unavailable("TRL has no standalone fused DPO loss (its DPOTrainer is measured end to end)")
    if provider == "liger":
        try:
            from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss
        except ImportError as error:
            raise Unavailable(f"liger-kernel is not installed: {error}") from None
        if op != "dpo":
            raise Unavailable("Liger's fused-linear losses are whole losses: measured on dpo")
        loss = LigerFusedLinearDPOLoss(beta=0.1, compiled=inputs["h"].is_cuda)
        return lambda h, w: loss(w, _rows(h), _rows(labels), None, _rows(h_ref), w.detach(), None)[0].reshape(1)
    raise ValueError(f"unknown provider {provider!r}")


def truth_fn(op: str, inputs: dict):
    """Float64 materialised values on the given rows, plain torch: ``fn(h, w, rows) -> values``."""
    labels = inputs["labels"]

    def logps(logits, y):
        out = torch.log_softmax(logits, -1).gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return torch.where(y != IGNORE, out, 0.0)

    def fn(h, w, rows):
        y = labels[rows]
        if op in ("logps", "logps_trained"):
            return logps(h[rows] @ w.t(), y)
        if op == "kl":
            p = torch.log_softmax(inputs["h_ref"][rows].double() @ w.t(), -1)
            q = torch.log_softmax(h[rows] @ w.t(), -1)
            return torch.where(y != IGNORE, (p.exp() * (p - q)).sum(-1), 0.0)
        raise ValueError("dpo is checked against tidpo_fused on the whole input")

    return fn


# ------------------------------------------------------------------------------------------------ one step

def make_step(op: str, provider: str, inputs: dict):
    """``step() -> (values, grads)``: forward + backward of ``sum(values * g)`` at full size."""
    fn = value_fn(op, provider, inputs)
    trained = op == "logps_trained"

    def step():
        h = inputs["h"].detach().requires_grad_()
        w = inputs["weight"].detach().requires_grad_(trained)
        values = fn(h, w)
        cotangent = inputs["g"][: values.numel()].to(values.dtype)
        grads = torch.autograd.grad((values * cotangent).sum(), [h, w] if trained else [h])
        return values.detach(), [grad.detach() for grad in grads]

    return step


def check_agreement(op: str, provider: str, inputs: dict, dtype: torch.dtype) -> dict:
    """This provider's values on the first rows vs ``tidpo_fused`` and vs float64 (see the module doc)."""
    rows = torch.arange(min(CHECK_ROWS, inputs["labels"].numel()), device=inputs["h"].device)
    small = dict(inputs, h=inputs["h"][rows], labels=inputs["labels"][rows], g=inputs["g"][rows],
                 **({"h_ref": inputs["h_ref"][rows]} if "h_ref" in inputs else {}))
    if op == "dpo":  # whole pairs: the first 2B rows of 8 positions each
        rows = torch.arange(2 * PAIRS * 8, device=inputs["h"].device)
        small = dict(inputs, h=inputs["h"][rows], labels=inputs["labels"][rows], g=inputs["g"][:1],
                     h_ref=inputs["h_ref"][rows])
    value, _ = make_step(op, provider, small)()
    if op == "dpo":
        reference, _ = make_step(op, "tidpo_fused", small)()
        err = float((value.double() - reference.double()).abs().max())
        tol = 1e-5 * (1 + float(reference.abs().max())) if dtype == torch.float32 else 1e-2
        return {"max_err_vs_tidpo_fused": err, "tol": tol, "ok": err <= tol}
    local = torch.arange(len(rows), device=rows.device)
    truth = truth_fn(op, small)(small["h"].double(), small["weight"].double(), local)
    err = float((value.double() - truth).abs().max())
    if dtype == torch.float32:
        tol = 1e-5 * (1 + float(truth.abs().max()))
    else:
        materialised = materialised_values(op, small, dtype)
        tol = 2 * float((materialised.double() - truth).abs().max()) + 1e-3
    return {"max_err_vs_float64": err, "tol": tol, "ok": err <= tol}


def materialised_values(op: str, inputs: dict, dtype: torch.dtype) -> torch.Tensor:
    """The materialised head's values in ``dtype``, forward only: the logits as a ``dtype`` GEMM returns them.

    A GEMM in bf16/fp16 accumulates in fp32 and rounds its output once to ``dtype``; that rounding of the logits
    is the materialised head's error. Forming the product in fp32 and rounding it gives the same logits without
    torch's bf16 GEMM, which on CPUs without bf16 matrix units runs at well under 1 % of the fp32 rate and would
    make this check take minutes.
    """
    import tidpo

    def logits(h):
        return F.linear(h.float(), inputs["weight"].float()).to(dtype)

    if op == "kl":
        return tidpo.token_kl(logits(inputs["h_ref"]), logits(inputs["h"]), inputs["labels"])
    return tidpo.token_logps(logits(inputs["h"]), inputs["labels"])


# ------------------------------------------------------------------------------------------------ memory

def _memory_worker(spec: dict) -> dict:
    """In a fresh process: the extra peak resident memory of one step above its inputs."""
    dtype = to_dtype(spec["dtype"])
    tiny = make_inputs(spec["op"], 64, 32, 257, dtype)
    make_step(spec["op"], spec["provider"], tiny)()  # lazy initialisation is not billed to the op
    inputs = make_inputs(spec["op"], spec["tokens"], spec["hidden"], spec["vocab"], dtype)
    step = make_step(spec["op"], spec["provider"], inputs)
    import gc

    gc.collect()
    reset = _reset_peak()
    base = max(_maxrss_bytes(), _rss_bytes()) if reset else _rss_bytes()
    values, grads = step()
    peak = _maxrss_bytes()
    return {"extra_peak_bytes": peak - base, "peak_reset": reset,
            "output_bytes": sum(x.numel() * x.element_size() for x in (values, *grads))}


def measure_memory(op: str, provider: str, tokens: int, hidden: int, vocab: int, dtype: str) -> dict:
    spec = {"op": op, "provider": provider, "tokens": tokens, "hidden": hidden, "vocab": vocab, "dtype": dtype}
    env = {**__import__("os").environ, "MALLOC_MMAP_THRESHOLD_": str(MiB)}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.fused_head", "--worker", json.dumps(spec)],
                          capture_output=True, text=True, env=env, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "worker failed")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------ the run

def run(args, save=None) -> dict:
    """Every cell of ``args``; ``save(results)`` after each (dtype, op), so an interrupted run keeps its cells."""
    dtypes = [dtype_str(d) for d in args.dtypes.split(",")]
    ops = [op for op in args.ops.split(",") if op]
    unknown = sorted(set(ops) - set(OPS))
    if unknown:
        raise SystemExit(f"unknown ops: {unknown} (choose from {', '.join(OPS)})")
    providers = [p for p in args.providers.split(",") if p]
    unknown = sorted(set(providers) - set(PROVIDERS))
    if unknown or "tidpo_fused" not in providers:
        raise SystemExit(f"--providers must include tidpo_fused and come from {', '.join(PROVIDERS)}, got "
                         f"{args.providers!r}")
    now = _dt.datetime.now().astimezone()
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    device = describe_device(args.device, measure_copy=False)
    results = {"date": now.isoformat(timespec="seconds"), "device": device, "versions": versions(),
               "command": " ".join(["python -m benchmarks.fused_head", *sys.argv[1:]]),
               "shape": {"N": args.tokens, "H": args.hidden, "V": args.vocab, "pairs_for_dpo": PAIRS},
               "repeats": args.repeats, "threads": torch.get_num_threads(), "complete": False, "cells": []}
    for dtype_name in dtypes:
        dtype = to_dtype(dtype_name)
        for op in ops:
            inputs = make_inputs(op, args.tokens, args.hidden, args.vocab, dtype, device=args.device)
            steps = {}
            for provider in providers:
                cell = {"op": op, "provider": provider, "dtype": dtype_name, "status": None, "reason": "",
                        "seconds": [], "median_s": None, "agreement": None, "extra_peak_bytes": None}
                results["cells"].append(cell)
                try:
                    cell["agreement"] = check_agreement(op, provider, inputs, dtype)
                    if not cell["agreement"]["ok"]:
                        cell.update(status="skipped", reason="not timed: disagrees with the reference")
                        continue
                    steps[provider] = (make_step(op, provider, inputs), cell)
                except Unavailable as error:
                    cell.update(status="skipped", reason=str(error))
                print(f"{dtype_name} {op:14s} {provider:19s} agreement {cell['agreement']} {cell['reason']}",
                      flush=True)
            if cuda:  # compilation, autotuning and cuBLAS heuristics are not billed to the first repeat
                for step, _ in steps.values():
                    step()
            for _ in range(args.repeats):
                for provider, (step, cell) in steps.items():
                    cell["seconds"].append(timed(step, cuda))
                    print(f"{dtype_name} {op:14s} {provider:19s} {cell['seconds'][-1]:8.3f} s", flush=True)
            for provider, (step, cell) in steps.items():
                cell.update(status="ok", median_s=statistics.median(cell["seconds"]))
                if cuda:
                    cell["extra_peak_bytes"] = cuda_extra_peak(step)
                elif args.memory:
                    cell["memory"] = measure_memory(op, provider, args.tokens, args.hidden, args.vocab, dtype_name)
                    cell["extra_peak_bytes"] = cell["memory"]["extra_peak_bytes"]
                    print(f"{dtype_name} {op:14s} {provider:19s} +{cell['extra_peak_bytes'] / MiB:8.0f} MiB",
                          flush=True)
            del inputs, steps
            results["ratios"] = ratios(results["cells"])
            if save is not None:
                save(results)
    results["complete"] = True
    return results


def timed(step, cuda: bool) -> float:
    """Seconds of one step; on CUDA from a synchronised start to a synchronised end."""
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = step()
    if cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    del out  # released outside the timed interval
    return elapsed


def cuda_extra_peak(step) -> int:
    """Peak allocated bytes above the inputs while one step runs (its outputs included), CUDA allocator stats."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return peak


def ratios(cells: list[dict]) -> dict:
    """tidpo_fused's time over each provider's, and its extra peak memory over the materialised head's."""
    by = {(c["op"], c["dtype"], c["provider"]): c for c in cells if c["status"] == "ok"}
    out = {}
    for (op, dtype, provider), cell in by.items():
        fused = by.get((op, dtype, "tidpo_fused"))
        if provider == "tidpo_fused" or fused is None:
            continue
        key = f"{op}/{dtype}/tidpo_fused_vs_{provider}"
        out[key] = {"time": fused["median_s"] / cell["median_s"]}
        if fused["extra_peak_bytes"] is not None and cell["extra_peak_bytes"]:
            out[key]["memory"] = fused["extra_peak_bytes"] / cell["extra_peak_bytes"]
    return out


def markdown(results: dict) -> str:
    shape = results["shape"]
    memory = ("the CUDA allocator's peak above the inputs" if results["device"]["type"] == "cuda" else
              "extra peak resident memory above the inputs in a fresh process")
    v = results["versions"]
    lines = [f"{results['device']['name']}, torch {v['torch']}, trl {v.get('trl')}, liger-kernel "
             f"{v.get('liger_kernel')}, {results['threads']} threads, {results['date'][:10]}; N = {shape['N']}, "
             f"H = {shape['H']}, V = {shape['V']}; one training step (forward + backward), median of "
             f"{results['repeats']}; {memory}.", "",
             "| op | dtype | provider | seconds | extra peak MiB | agreement (max err / tol) |",
             "|---|---|---|---|---|---|"]
    for c in results["cells"]:
        agreement = c["agreement"] or {}
        err = agreement.get("max_err_vs_float64", agreement.get("max_err_vs_tidpo_fused"))
        check = "" if err is None else f"{err:.1e} / {agreement['tol']:.1e}"
        seconds = f"{c['median_s']:.2f}" if c["status"] == "ok" else f"skipped: {c['reason'][:70]}"
        memory = "" if c["extra_peak_bytes"] is None else f"{c['extra_peak_bytes'] / MiB:.0f}"
        lines.append(f"| {c['op']} | {c['dtype']} | {c['provider']} | {seconds} | {memory} | {check} |")
    lines += ["", "| ratio | time | memory |", "|---|---|---|"]
    for key, value in results["ratios"].items():
        memory = f"{value['memory']:.3f}" if "memory" in value else ""
        lines.append(f"| {key} | {value['time']:.2f} | {memory} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.fused_head", description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--ops", default=",".join(OPS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--providers", default=",".join(PROVIDERS),
                        help="subset to run (tidpo_fused always; e.g. leave out a provider too slow here)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--memory", action="store_true",
                        help="CPU: extra peak memory, one fresh process per cell (always measured on CUDA)")
    add_output_arguments(parser, "fused-head")
    args = parser.parse_args(argv)
    if args.worker is not None:
        print(json.dumps(_memory_worker(json.loads(args.worker))))
        return 0
    for name in ("tokens", "hidden", "vocab", "repeats"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.tokens % (2 * PAIRS):
        raise SystemExit(f"--tokens must be a multiple of {2 * PAIRS} (the dpo op's rows), got {args.tokens}")
    args.out.mkdir(parents=True, exist_ok=True)

    def save(results: dict) -> Path:
        """Write (or rewrite) the JSON and markdown files; their common stem."""
        return write_results(args, "fused-head", results, markdown(results))

    results = run(args, save)
    where = save(results)
    print(markdown(results))
    print(f"wrote {where}.json and .md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
