"""The ``tidpo`` command line.

``tidpo demo``: the end-to-end example on the embedded default (tiny model, a few preference
pairs, TIS-DPO); see :mod:`tidpo.demo`.
``tidpo train``: LoRA / full fine-tuning with a preference loss; see :mod:`tidpo.train_cli`
(``tidpo train --help`` lists every flag).
"""

from __future__ import annotations

import argparse
import sys


def _demo(args: argparse.Namespace) -> int:
    from tidpo.demo import run_demo

    run_demo(steps=args.steps, lr=args.lr, loss=args.loss, beta=args.beta, seed=args.seed,
             log_every=args.log_every)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from tidpo.demo import DEMO_LOSSES

    parser = argparse.ArgumentParser(prog="tidpo", description="Token-weighted preference optimisation.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train a tiny built-in model on built-in preference pairs",
                          formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    demo.add_argument("--loss", choices=DEMO_LOSSES, default="tis_dpo", help="preference loss")
    demo.add_argument("--steps", type=int, default=40, help="optimiser steps (full batch)")
    demo.add_argument("--lr", type=float, default=2e-3, help="AdamW learning rate")
    demo.add_argument("--beta", type=float, default=0.1, help="DPO inverse temperature")
    demo.add_argument("--seed", type=int, default=0, help="model initialisation seed")
    demo.add_argument("--log-every", type=int, default=5, help="print every N steps")
    demo.set_defaults(func=_demo)
    sub.add_parser("train", add_help=False,
                   help="train with a preference loss (LoRA by default); `tidpo train --help` lists the flags")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "train":
        # Its flags are TrainingArguments' and the method's: transformers' HfArgumentParser owns them.
        from tidpo.train_cli import main as train_main

        return train_main(argv[1:])
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
