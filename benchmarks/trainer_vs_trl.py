"""tidpo's trainer vs TRL's ``DPOTrainer``, end to end: same model, LoRA, data, batch and steps, one fresh
process per run.

Usage::

    python -m benchmarks.trainer_vs_trl [--steps 10] [--pairs 4] [--reply-tokens 450] [--lora-last-layers 8]
                                        [--providers tidpo,tidpo_materialised,trl] [--out benchmarks/results]

What runs, for each provider, in its own Python process:

- the embedded SmolLM2-135M-Instruct in fp32 on CPU, LoRA r = 16 (alpha 32, no dropout) on every linear layer
  of the last ``--lora-last-layers`` blocks (:func:`tidpo.trainer.apply_lora`, the same adapters for both
  trainers: PEFT's seeded initialisation, B = 0), the reference being the model with its adapters disabled;
- the first ``--steps x --pairs`` training pairs of the embedded chatterbot corpus, each reply lengthened to at
  least ``--reply-tokens`` tokens by joining the corpus replies that follow it (chosen and rejected alike), in
  the conversational format both trainers read; ``max_length`` fits every pair, so nothing is truncated;
- DPO (sigmoid), beta 0.1, AdamW at a constant 5e-4, ``--pairs`` pairs per step, no gradient checkpointing,
  dropout off, one log line per step, seed 0.

Providers: ``tidpo`` (``TokenWeightedDPOTrainer``, the fused LM head, the default), ``tidpo_materialised`` (the
same with ``fused_lm_head=False``) and ``trl`` (TRL 1.16's ``DPOTrainer``, which always runs its own fused head;
recorded as skipped, with the reason, when TRL is not installed).

Measured: the median wall time of steps 2..N (step 1 warms up), the extra peak resident memory of training
above the process's resident memory once the trainer is built (the kernel's high-water mark, reset before
``train()``; glibc returns every buffer of 1 MiB or more to the OS, as in :mod:`benchmarks.memory_cpu`), and
every logged loss, side by side.
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

PROVIDERS = ("tidpo", "tidpo_materialised", "trl")
MiB = 2**20
SEED = 0
BETA = 0.1
LEARNING_RATE = 5e-4
LORA_R = 16


class Unavailable(Exception):
    """A provider that cannot run here (not installed)."""


def long_reply_pairs(tokenizer, count: int, reply_tokens: int) -> list[dict]:
    """``count`` conversational pairs whose chosen and rejected replies each hold >= ``reply_tokens`` tokens:
    the corpus pair's reply followed by the replies of the pairs after it."""
    from tidpo.apps.embedded import chatterbot_pairs

    rows, _ = chatterbot_pairs(seed=SEED, num_heldout=0, max_reply_words=None)

    def tokens(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    def lengthened(start: int, side: str) -> str:
        text, i = rows[start][side][0]["content"], start + 1
        while tokens(text) < reply_tokens:
            text, i = f"{text} {rows[i % len(rows)][side][0]['content']}", i + 1
        return text

    return [{"prompt": rows[k]["prompt"],
             "chosen": [{"role": "assistant", "content": lengthened(k, "chosen")}],
             "rejected": [{"role": "assistant", "content": lengthened(k, "rejected")}]} for k in range(count)]


class StepClock:
    """A ``TrainerCallback`` recording the wall time of every optimiser step."""

    def __new__(cls):
        from transformers import TrainerCallback

        class _Clock(TrainerCallback):
            def __init__(self):
                self.seconds, self._start = [], None

            def on_step_begin(self, args, state, control, **kwargs):
                self._start = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                self.seconds.append(time.perf_counter() - self._start)

        return _Clock()


def build_trainer(provider: str, model, tokenizer, rows: list[dict], *, steps: int, pairs: int, max_length: int,
                  output_dir: str, clock):
    common = dict(output_dir=output_dir, max_steps=steps, per_device_train_batch_size=pairs,
                  learning_rate=LEARNING_RATE, lr_scheduler_type="constant", logging_steps=1, save_strategy="no",
                  report_to=[], seed=SEED, use_cpu=True, bf16=False, gradient_checkpointing=False, disable_tqdm=True,
                  beta=BETA, max_length=max_length)
    if provider in ("tidpo", "tidpo_materialised"):
        from tidpo.trainer import TokenWeightedDPOConfig, TokenWeightedDPOTrainer

        config = TokenWeightedDPOConfig(loss="dpo", fused_lm_head=provider == "tidpo", **common)
        return TokenWeightedDPOTrainer(model, config, train_dataset=rows, processing_class=tokenizer,
                                       callbacks=[clock])
    if provider == "trl":
        try:
            from datasets import Dataset
            from trl import DPOConfig, DPOTrainer
        except ImportError as error:
            raise Unavailable(f"trl is not installed (pip install trl==1.16.0): {error}") from None
        config = DPOConfig(loss_type=["sigmoid"], disable_dropout=True, **common)
        return DPOTrainer(model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                          callbacks=[clock])
    raise ValueError(f"unknown provider {provider!r}")


def _worker(spec: dict) -> dict:
    """One provider's run, in this (fresh) process."""
    import tempfile

    import torch

    from benchmarks.memory_cpu import _maxrss_bytes, _reset_peak, _rss_bytes
    from tidpo.apps.models import load_model_and_tokenizer
    from tidpo.trainer import apply_lora

    torch.manual_seed(SEED)
    model, tokenizer = load_model_and_tokenizer("embedded")
    num_layers = model.config.num_hidden_layers
    model = apply_lora(model, r=LORA_R, alpha=2 * LORA_R, last_layers=min(spec["lora_last_layers"], num_layers))
    rows = long_reply_pairs(tokenizer, spec["steps"] * spec["pairs"], spec["reply_tokens"])
    reply_lengths = [len(tokenizer(r[side][0]["content"], add_special_tokens=False)["input_ids"])
                     for r in rows for side in ("chosen", "rejected")]
    max_length = max(reply_lengths) + 128  # room for the prompt and the chat template: nothing is truncated
    clock = StepClock()
    with tempfile.TemporaryDirectory() as output_dir:
        trainer = build_trainer(spec["provider"], model, tokenizer, rows, steps=spec["steps"], pairs=spec["pairs"],
                                max_length=max_length, output_dir=output_dir, clock=clock)
        import gc

        gc.collect()
        reset = _reset_peak()
        base = max(_maxrss_bytes(), _rss_bytes()) if reset else _rss_bytes()
        start = time.perf_counter()
        trainer.train()
        total = time.perf_counter() - start
        peak = _maxrss_bytes()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    rewards = [entry.get("rewards/margins") for entry in trainer.state.log_history if "loss" in entry]
    return {"provider": spec["provider"], "step_seconds": clock.seconds, "train_seconds": total,
            "median_step_s": statistics.median(clock.seconds[1:] or clock.seconds),
            "extra_peak_bytes": peak - base, "peak_reset": reset, "losses": losses, "reward_margins": rewards,
            "max_length": max_length, "reply_tokens_min": min(reply_lengths),
            "reply_tokens_mean": sum(reply_lengths) / len(reply_lengths)}


def run_provider(spec: dict) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(MiB), "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.trainer_vs_trl", "--worker", json.dumps(spec)],
                          capture_output=True, text=True, env=env, timeout=7200)
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines()
        if any("Unavailable" in line for line in lines[-3:]):
            return {"provider": spec["provider"], "status": "skipped", "reason": lines[-1].split(": ", 1)[-1]}
        raise RuntimeError(f"{spec['provider']} failed:\n" + "\n".join(lines[-20:]))
    return {"status": "ok", **json.loads(proc.stdout.strip().splitlines()[-1])}


def markdown(results: dict) -> str:
    s = results["settings"]
    v = results["versions"]
    lines = [f"{results['device']['name']}, torch {v['torch']}, transformers {v.get('transformers')}, peft "
             f"{v.get('peft')}, trl {v.get('trl')}, {results['date'][:10]}; "
             f"SmolLM2-135M-Instruct fp32, LoRA r={LORA_R} on the last {s['lora_last_layers']} blocks, {s['pairs']} "
             f"pairs per step, {s['steps']} steps, replies of >= {s['reply_tokens']} tokens; DPO beta {BETA}, "
             f"lr {LEARNING_RATE}; fresh process per trainer.", "",
             "| trainer | median step s (steps 2..) | extra peak MiB | losses (steps 1, 2, 3, ..., last) |",
             "|---|---|---|---|"]
    for r in results["runs"]:
        if r["status"] != "ok":
            lines.append(f"| {r['provider']} | skipped: {r['reason'][:80]} | | |")
            continue
        losses = r["losses"]
        shown = ", ".join(f"{x:.4f}" for x in losses[:3]) + (f", ..., {losses[-1]:.4f}" if len(losses) > 3 else "")
        lines.append(f"| {r['provider']} | {r['median_step_s']:.2f} | {r['extra_peak_bytes'] / MiB:.0f} | {shown} |")
    if results["ratios"]:
        lines += ["", "| ratio (tidpo / other) | step time | extra peak memory |", "|---|---|---|"]
        for key, value in results["ratios"].items():
            lines.append(f"| {key} | {value['time']:.2f} | {value['memory']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.trainer_vs_trl", description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--reply-tokens", type=int, default=450)
    parser.add_argument("--lora-last-layers", type=int, default=8)
    parser.add_argument("--providers", default=",".join(PROVIDERS))
    add_output_arguments(parser, "trainer-vs-trl")
    args = parser.parse_args(argv)
    if args.worker is not None:
        print(json.dumps(_worker(json.loads(args.worker))))
        return 0
    providers = [p for p in args.providers.split(",") if p]
    unknown = sorted(set(providers) - set(PROVIDERS))
    if unknown:
        raise SystemExit(f"unknown providers: {unknown} (choose from {', '.join(PROVIDERS)})")
    for name in ("steps", "pairs", "reply_tokens", "lora_last_layers"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")

    from benchmarks.timing import describe_device, versions, write_results

    now = _dt.datetime.now().astimezone()
    settings = {"steps": args.steps, "pairs": args.pairs, "reply_tokens": args.reply_tokens,
                "lora_last_layers": args.lora_last_layers}
    results = {"date": now.isoformat(timespec="seconds"), "device": describe_device("cpu", measure_copy=False),
               "versions": versions(), "command": " ".join(["python -m benchmarks.trainer_vs_trl", *sys.argv[1:]]),
               "settings": settings, "runs": []}
    for provider in providers:
        run = run_provider({"provider": provider, **settings})
        results["runs"].append(run)
        summary = (f"{run['median_step_s']:.2f} s/step, +{run['extra_peak_bytes'] / MiB:.0f} MiB, losses "
                   f"{[round(x, 4) for x in run['losses'][:3]]}" if run["status"] == "ok" else run["reason"])
        print(f"{provider:19s} {summary}", flush=True)
    ok = {r["provider"]: r for r in results["runs"] if r["status"] == "ok"}
    results["ratios"] = {
        f"tidpo_vs_{other}": {"time": ok["tidpo"]["median_step_s"] / ok[other]["median_step_s"],
                              "memory": ok["tidpo"]["extra_peak_bytes"] / ok[other]["extra_peak_bytes"]}
        for other in ("trl", "tidpo_materialised") if "tidpo" in ok and other in ok}
    where = write_results(args, "trainer-vs-trl", results, markdown(results))
    print(markdown(results))
    print(f"wrote {where}.json and .md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
