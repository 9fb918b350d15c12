"""TI-DPO's step against DPO's, in one process, with the time of each part of the step.

Usage::

    python -m benchmarks.ti_dpo_cost [--steps 6] [--rounds 1] [--variants dpo,ti_dpo,ti_dpo_chosen,ti_dpo_separate]
                                     [--memory] [--out benchmarks/results] [--name STEM]

Every variant trains the embedded SmolLM2-135M-Instruct on the embedded pairs with the README's settings
(``tidpo train --model embedded --data embedded --max-steps 6 --lora-last-layers 8 --max-length 128
--max-prompt-length 64 --eval-size 0``, and ``--anchor-max-new-tokens 32`` for TI-DPO: 4 pairs per step, fp32,
CPU), one after the
other in one worker process:

- ``dpo``: ``--loss dpo``;
- ``ti_dpo``: ``--loss ti_dpo`` (anchors from the prompt, the default; the attribution and the anchors' prompt
  keys/values from the loss's forwards);
- ``ti_dpo_chosen``: the same with ``--anchor-source chosen`` (anchors continue half the chosen response);
- ``ti_dpo_separate``: ``--no-ti-shared-forward``: the attribution in its own eval-mode forward, the anchors'
  prompts run anew (prefill, and scoring over the whole sequences).

Measured per variant: the median over steps 2..N (step 1 warms up; with ``--rounds R``, over those steps of R
runs, every other round in reverse order) of the optimiser step's wall time and of
each part the trainer times (:attr:`tidpo.trainer.TokenWeightedDPOTrainer.step_part_seconds`: policy and
reference forwards, attribution, anchor sampling, anchor scoring; the rest of the micro-step is the loss and
the backward, and the rest of the optimiser step the optimiser); with ``--memory`` also the extra peak resident
memory of training above the process's once the trainer is built, in a fresh process per variant. Ratios: each
TI-DPO variant's step time over DPO's, and the floor (:func:`floor`): the least a TI-DPO step could take here,
from the parts the method cannot skip.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import statistics
import subprocess
import sys
import time

from benchmarks.timing import add_output_arguments

MiB = 2**20
#: The README's TI-DPO cost settings (``tidpo train`` flags), shared by every variant.
SETTINGS = ["--model", "embedded", "--data", "embedded", "--lora-last-layers", "8", "--max-length", "128",
            "--max-prompt-length", "64", "--eval-size", "0",
            "--eval-strategy", "no", "--save-strategy", "no", "--report-to", "none", "--logging-steps", "1",
            "--disable-tqdm", "true", "--seed", "0"]
_TI_DPO = ["--loss", "ti_dpo", "--anchor-max-new-tokens", "32"]
VARIANTS: dict[str, list[str]] = {
    "dpo": ["--loss", "dpo"],
    "ti_dpo": _TI_DPO,
    "ti_dpo_chosen": [*_TI_DPO, "--anchor-source", "chosen"],
    "ti_dpo_separate": [*_TI_DPO, "--no-ti-shared-forward"],
}
#: The parts of a micro-step the trainer times, in step order.
PARTS = ("policy_forward", "reference_forward", "attribution", "anchor_sampling", "anchor_scoring")


def _clock():
    """A ``TrainerCallback`` recording each optimiser step's wall time and the trainer's part timings."""
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def __init__(self):
            self.trainer, self.steps, self._start = None, [], None

        def on_step_begin(self, args, state, control, **kwargs):
            self._start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.steps.append({"optimizer_step": time.perf_counter() - self._start,
                               **self.trainer.step_part_seconds})

    return Clock()


def decode_step_seconds(model, rows: int, repeats: int = 5) -> float:
    """Median wall time of a no-grad forward of ``rows`` single tokens: one step of sampling, whose cost on a CPU
    is reading every weight once (it is bandwidth-bound at a few rows)."""
    import torch

    ids = torch.ones(rows, 1, dtype=torch.long, device=model.device)
    times = []
    with torch.no_grad():
        for _ in range(repeats + 1):
            start = time.perf_counter()
            model(input_ids=ids, use_cache=False)
            times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def run_variant(name: str, steps: int, output_dir: str) -> dict:
    """Train one variant in this process; its per-step timings and extra peak memory."""
    import gc

    from benchmarks.memory_cpu import _maxrss_bytes, _reset_peak, _rss_bytes
    from tidpo.cli.train import build_trainer, parse_train_args

    run, config = parse_train_args([*SETTINGS, *VARIANTS[name], "--max-steps", str(steps),
                                    "--output-dir", output_dir])
    clock = _clock()
    trainer = build_trainer(run, config, callbacks=[clock])
    clock.trainer = trainer
    gc.collect()
    reset = _reset_peak()
    base = max(_maxrss_bytes(), _rss_bytes()) if reset else _rss_bytes()
    trainer.train()
    peak = _maxrss_bytes()
    timed = clock.steps[1:] or clock.steps
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    decode = None
    if config.loss == "ti_dpo":
        decode = decode_step_seconds(trainer.model, config.per_device_train_batch_size)
    del trainer
    gc.collect()
    return {"variant": name, "flags": VARIANTS[name], "steps": clock.steps, "timed_steps": timed,
            "median_s": medians(timed), "extra_peak_bytes": peak - base, "peak_reset": reset, "losses": losses,
            "decode_step_s": decode,
            "anchor_max_new_tokens": config.anchor_max_new_tokens if config.loss == "ti_dpo" else None}


def medians(timed: list[dict]) -> dict:
    """Median over the timed steps of the optimiser step, the micro-step and each part; the rest of the micro-step
    is the loss and the backward, the rest of the optimiser step the optimiser."""
    median = {key: statistics.median(step.get(key, 0.0) for step in timed)
              for key in ("optimizer_step", "step", *PARTS)}
    median["loss_and_backward"] = median["step"] - sum(median[p] for p in PARTS)
    median["optimizer"] = median["optimizer_step"] - median["step"]
    return median


def pooled(runs: list[dict]) -> dict:
    """One variant's runs from several rounds as one: the medians over all their timed steps."""
    timed = [step for run in runs for step in run["timed_steps"]]
    decodes = [run["decode_step_s"] for run in runs if run["decode_step_s"] is not None]
    return {**runs[0], "steps": [step for run in runs for step in run["steps"]], "timed_steps": timed,
            "median_s": medians(timed), "rounds": len(runs),
            "decode_step_s": statistics.median(decodes) if decodes else None}


def _worker(spec: dict) -> dict:
    import tempfile

    import torch

    torch.manual_seed(0)
    by_variant: dict[str, list[dict]] = {name: [] for name in spec["variants"]}
    with tempfile.TemporaryDirectory() as output_dir:
        for round_index in range(spec.get("rounds", 1)):
            # Every other round runs the variants in reverse, so that a slow spell of the machine does not
            # fall on one variant only.
            for name in spec["variants"][::-1] if round_index % 2 else spec["variants"]:
                by_variant[name].append(run_variant(name, spec["steps"], output_dir))
                print(f"round {round_index + 1}: {name:16s} "
                      f"{by_variant[name][-1]['median_s']['optimizer_step']:.2f} s/step", file=sys.stderr, flush=True)
    return {"runs": [pooled(runs) for runs in by_variant.values()]}


def _spawn(spec: dict, *, memory: bool) -> dict:
    """Run ``_worker(spec)`` in a fresh process. For memory, glibc returns every buffer of 1 MiB or more to the
    OS (as in :mod:`benchmarks.memory_cpu`), so that the peak is the variant's own; the timing process keeps
    the default allocator, whose page reuse is what training normally sees."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    if memory:
        env["MALLOC_MMAP_THRESHOLD_"] = str(MiB)
    proc = subprocess.run([sys.executable, "-m", "benchmarks.ti_dpo_cost", "--worker", json.dumps(spec)],
                          stdout=subprocess.PIPE, text=True, env=env, timeout=7200)
    if proc.returncode != 0:
        raise SystemExit(f"the worker failed (exit status {proc.returncode}); its log is above")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def floor(runs: list[dict]) -> dict:
    """The least a TI-DPO step could take at these settings, from the measured parts it cannot skip.

    A TI-DPO step needs at least: DPO's step; one backward from the attribution target to the embeddings
    (the shared-forward variant's ``attribution`` part, which is nothing else); sampling the anchors, at least
    ``anchor_max_new_tokens`` sequential decoding steps of the policy (each a forward of one token per row, on a
    CPU bound by reading the weights); and scoring them (the ``anchor_scoring`` part: a policy and a reference
    forward over the anchor tokens, the prompt's keys and values taken from the loss's forwards).
    """
    by = {r["variant"]: r for r in runs}
    if "dpo" not in by or "ti_dpo" not in by:
        return {}
    ti, dpo = by["ti_dpo"], by["dpo"]["median_s"]["optimizer_step"]
    sampling = ti["anchor_max_new_tokens"] * ti["decode_step_s"]
    parts = {"dpo_step": dpo, "attribution_backward": ti["median_s"]["attribution"],
             "anchor_sampling": sampling, "anchor_scoring": ti["median_s"]["anchor_scoring"]}
    seconds = sum(parts.values())
    return {"parts_s": parts, "seconds": seconds, "ratio_to_dpo": seconds / dpo,
            "decode_step_s": ti["decode_step_s"]}


def ratios(runs: list[dict]) -> dict:
    """Each variant's median step time over DPO's."""
    by = {r["variant"]: r for r in runs}
    if "dpo" not in by:
        return {}
    dpo = by["dpo"]["median_s"]["optimizer_step"]
    return {f"{name}_vs_dpo": r["median_s"]["optimizer_step"] / dpo for name, r in by.items() if name != "dpo"}


def markdown(results: dict) -> str:
    v = results["versions"]
    lines = [f"{results['device']['name']}, torch {v['torch']}, transformers {v.get('transformers')}, peft "
             f"{v.get('peft')}, {results['date'][:10]}; `tidpo train {' '.join(SETTINGS)}` + the variant's flags, "
             f"{results['steps']} steps × {results.get('rounds', 1)} round(s) (alternating order), median of steps "
             f"2..{results['steps']} of every round; one process.", "",
             "| variant | step s | ratio to DPO | " + " | ".join(PARTS) + " | loss + backward | optimizer | "
             "extra peak MiB |", "|---" * (len(PARTS) + 6) + "|"]
    ratio = results["ratios"]
    for r in results["runs"]:
        m = r["median_s"]
        step = m["optimizer_step"]
        cells = [f"{m[p]:.2f} ({m[p] / step:.0%})" if m[p] else "–" for p in (*PARTS, "loss_and_backward",
                                                                              "optimizer")]
        memory = "" if r["extra_peak_bytes"] is None else f"{r['extra_peak_bytes'] / MiB:.0f}"
        lines.append(f"| {r['variant']} | {step:.2f} | {ratio.get(r['variant'] + '_vs_dpo', 1.0):.2f}× | "
                     + " | ".join(cells) + f" | {memory} |")
    bound = results.get("floor")
    if bound:
        parts = ", ".join(f"{name} {seconds:.2f} s" for name, seconds in bound["parts_s"].items())
        lines += ["", f"Floor of a TI-DPO step here (the parts it cannot skip, see `benchmarks.ti_dpo_cost.floor`): "
                      f"{parts}; in all {bound['seconds']:.2f} s = **{bound['ratio_to_dpo']:.2f}× DPO**. One "
                      f"decoding step (a no-grad forward of one token per row) takes {bound['decode_step_s']:.3f} s."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ti_dpo_cost", description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=6, help="optimiser steps per variant and round (the first "
                        "of each warms up)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run every variant this many times, in alternating order, and take the medians over "
                             "all their timed steps (steadier on a noisy machine)")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--memory", action="store_true",
                        help="also each variant's extra peak memory (a fresh process per variant, 2 steps)")
    add_output_arguments(parser, "ti-dpo-cost")
    args = parser.parse_args(argv)
    if args.worker is not None:
        print(json.dumps(_worker(json.loads(args.worker))))
        return 0
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown or not variants:
        raise SystemExit(f"--variants must come from {', '.join(VARIANTS)}, got {args.variants!r}")
    if args.steps < 2:
        raise SystemExit(f"--steps must be >= 2 (step 1 warms up), got {args.steps}")
    if args.rounds < 1:
        raise SystemExit(f"--rounds must be >= 1, got {args.rounds}")

    from benchmarks.timing import describe_device, versions, write_results

    spec = {"variants": variants, "steps": args.steps, "rounds": args.rounds}
    runs = _spawn(spec, memory=False)["runs"]
    if args.memory:
        for run in runs:
            measured = _spawn({"variants": [run["variant"]], "steps": 2}, memory=True)["runs"][0]
            run["extra_peak_bytes"], run["peak_reset"] = measured["extra_peak_bytes"], measured["peak_reset"]
    else:
        for run in runs:
            run["extra_peak_bytes"] = None
    now = _dt.datetime.now().astimezone()
    results = {"date": now.isoformat(timespec="seconds"), "device": describe_device("cpu", measure_copy=False),
               "versions": versions(), "command": " ".join(["python -m benchmarks.ti_dpo_cost", *sys.argv[1:]]),
               "steps": args.steps, "rounds": args.rounds, "runs": runs, "floor": floor(runs)}
    results["ratios"] = ratios(results["runs"])
    where = write_results(args, "ti-dpo-cost", results, markdown(results))
    print(markdown(results))
    print(f"wrote {where}.json and .md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
