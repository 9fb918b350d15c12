"""The ``tidpo`` command line.

``tidpo demo``: the main job on the embedded default — LoRA preference training of SmolLM2-135M-Instruct
on pairs from a real dialog corpus, held-out margins and a generation before / after; see
:mod:`tidpo.main_job`.
``tidpo quickstart``: a one-second tour with a tiny byte-level model (:mod:`tidpo.demo`).
``tidpo train``: LoRA / full fine-tuning with a preference loss; see :mod:`tidpo.train_cli`
(``tidpo train --help`` lists every flag).
``tidpo experiment``: does token weighting work? Every method on a synthetic task with known key tokens
(results table and plots); see :mod:`tidpo.experiment.runner`.
"""

from __future__ import annotations

import argparse
import sys


def _quickstart(args: argparse.Namespace) -> int:
    from tidpo.demo import run_demo

    run_demo(steps=args.steps, lr=args.lr, loss=args.loss, beta=args.beta, seed=args.seed,
             log_every=args.log_every)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from tidpo.main_job import run_main_job

    run_main_job(loss=args.loss, steps=args.steps, eval_every=args.eval_every, num_heldout=args.num_heldout,
                 num_train=args.num_train, batch_pairs=args.batch_pairs, lr=args.lr, beta=args.beta,
                 lora_r=args.lora_r, lora_layers=args.lora_layers, max_reply_words=args.max_reply_words,
                 output_dir=args.output_dir, model=args.model, seed=args.seed)
    return 0


def _export_pairs(args: argparse.Namespace) -> int:
    from tidpo.embedded import chatterbot_pairs, write_jsonl

    train, held_out = chatterbot_pairs(seed=args.seed, num_heldout=args.num_heldout, conversational=not args.plain,
                                       max_reply_words=args.max_reply_words)
    if args.num_train is not None:
        train = train[:args.num_train]
    print(f"wrote {len(train)} training pairs to {write_jsonl(train, args.out)}")
    if args.heldout_out:
        print(f"wrote {len(held_out)} held-out pairs to {write_jsonl(held_out, args.heldout_out)}")
    return 0


def _experiment(args: argparse.Namespace) -> int:
    from tidpo.experiment.command import run_from_args

    return run_from_args(args, args.experiment_parser)


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from tidpo.demo import DEMO_LOSSES
    from tidpo.main_job import MAIN_JOB_LOSSES

    parser = argparse.ArgumentParser(prog="tidpo", description="Token-weighted preference optimisation.")
    sub = parser.add_subparsers(dest="command", required=True)
    fmt = argparse.ArgumentDefaultsHelpFormatter
    demo = sub.add_parser("demo", formatter_class=fmt,
                          help="the main job: LoRA preference training of SmolLM2-135M-Instruct on real dialog "
                               "pairs (CPU, a few minutes; nothing downloaded)")
    demo.add_argument("--loss", choices=MAIN_JOB_LOSSES, default="dpo", help="preference loss")
    demo.add_argument("--steps", type=_positive_int, default=40, help="optimiser steps")
    demo.add_argument("--eval-every", type=_positive_int, default=10, help="held-out evaluation every N steps")
    demo.add_argument("--num-heldout", type=_positive_int, default=32, help="held-out pairs")
    demo.add_argument("--num-train", type=_positive_int, default=None, help="training pairs (default: all)")
    demo.add_argument("--batch-pairs", type=_positive_int, default=4, help="pairs per step")
    demo.add_argument("--lr", type=float, default=5e-4, help="AdamW learning rate (constant)")
    demo.add_argument("--beta", type=float, default=0.1, help="inverse temperature beta")
    demo.add_argument("--lora-r", type=_positive_int, default=16, help="LoRA rank (alpha = 2r)")
    demo.add_argument("--lora-layers", type=_positive_int, default=8,
                      help="adapters in the last N transformer blocks only (backward stops below them)")
    demo.add_argument("--max-reply-words", type=_positive_int, default=24, help="longest corpus reply used")
    demo.add_argument("--output-dir", default="tidpo-demo", help="adapter and plot go here")
    demo.add_argument("--model", default="embedded", help="'embedded' (SmolLM2-135M-Instruct), 'tiny-gpt2' "
                                                          "(smoke runs) or a local model folder")
    demo.add_argument("--seed", type=int, default=0, help="LoRA initialisation, data order and split seed")
    demo.set_defaults(func=_demo)

    quick = sub.add_parser("quickstart", formatter_class=fmt,
                           help="a one-second tour: a tiny byte-level model, eight pairs, TIS-DPO(P) weights")
    quick.add_argument("--loss", choices=DEMO_LOSSES, default="tis_dpo", help="preference loss")
    quick.add_argument("--steps", type=int, default=40, help="optimiser steps (full batch)")
    quick.add_argument("--lr", type=float, default=2e-3, help="AdamW learning rate")
    quick.add_argument("--beta", type=float, default=0.1, help="DPO inverse temperature")
    quick.add_argument("--seed", type=int, default=0, help="model initialisation seed")
    quick.add_argument("--log-every", type=int, default=5, help="print every N steps")
    quick.set_defaults(func=_quickstart)
    pairs = sub.add_parser("export-pairs", formatter_class=fmt,
                           help="write the embedded preference pairs (chatterbot corpus) to JSONL files")
    pairs.add_argument("--out", required=True, help="training pairs JSONL")
    pairs.add_argument("--heldout-out", default=None, help="held-out pairs JSONL (default: none written)")
    pairs.add_argument("--num-train", type=_positive_int, default=None, help="keep the first N training pairs")
    pairs.add_argument("--num-heldout", type=_positive_int, default=32, help="held-out pairs")
    pairs.add_argument("--max-reply-words", type=_positive_int, default=24, help="longest corpus reply used")
    pairs.add_argument("--plain", action="store_true", help="plain-text rows instead of chat messages")
    pairs.add_argument("--seed", type=int, default=0, help="split and rejected-draw seed")
    pairs.set_defaults(func=_export_pairs)
    from tidpo.experiment.command import add_arguments as add_experiment_arguments

    experiment = sub.add_parser("experiment", formatter_class=fmt,
                                help="does token weighting work? every method (SFT, DPO, TDPO2, TIS-DPO x 6 "
                                     "weightings, TI-DPO ablations) on a synthetic task with known key tokens; "
                                     "results table and plots (CPU, <= 20 min)")
    add_experiment_arguments(experiment)
    experiment.set_defaults(func=_experiment, experiment_parser=experiment)
    sub.add_parser("estimate-weights", add_help=False,
                   help="TIS-DPO token weights from a contrastive model pair; `--help` lists the flags")
    sub.add_parser("show-weights", add_help=False,
                   help="render token weights as HTML and PNG; `--help` lists the flags")
    sub.add_parser("train", add_help=False,
                   help="train with a preference loss (LoRA by default); `tidpo train --help` lists the flags")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "train":
        # Its flags are TrainingArguments' and the method's: transformers' HfArgumentParser owns them.
        from tidpo.train_cli import main as train_main

        return train_main(argv[1:])
    if argv and argv[0] in ("estimate-weights", "show-weights"):
        from tidpo.weights_cli import estimate_main, show_main

        return (estimate_main if argv[0] == "estimate-weights" else show_main)(argv[1:])
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
