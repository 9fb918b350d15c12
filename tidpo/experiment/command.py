"""Command line of the experiment: ``tidpo experiment ...`` and ``python -m tidpo.experiment ...``."""

from __future__ import annotations

import argparse
import sys

from tidpo.experiment.presets import METHODS, PRESETS, make_config

__all__ = ["add_arguments", "config_from_args", "main"]

#: ExperimentConfig field -> its command-line flag (errors name the flag).
_FLAGS = {"seeds": "--seeds", "noise_levels": "--noise", "methods": "--methods", "steps": "--steps",
          "sft_steps": "--sft-steps", "workers": "--workers", "lr": "--lr", "beta": "--beta",
          "batch_size": "--batch-size", "eval_every": "--eval-every", "num_train": "--num-train",
          "num_heldout": "--num-heldout", "pretrain_steps": "--pretrain-steps"}


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the experiment's flags to ``parser`` (also used by the ``tidpo experiment`` subcommand)."""
    parser.add_argument("--preset", choices=tuple(PRESETS), default="reduced",
                        help="smoke: < 1 min, for tests; reduced: every method x 3 seeds x noise 0/0.2/0.4, "
                             "<= 20 min on 2 cores (7.6 min measured); full: 5 seeds, more data and steps "
                             "(not measured; estimated 1-2 h on 2 cores)")
    parser.add_argument("--output-dir", default="runs/experiment",
                        help="results.json, results.md, reward_vs_step.png, weight_auc.png go here")
    parser.add_argument("--seeds", type=int, nargs="+", default=argparse.SUPPRESS, help="seeds (default: the preset's)")
    parser.add_argument("--noise", type=float, nargs="+", default=argparse.SUPPRESS,
                        help="label-noise levels in [0, 0.5) (default: the preset's)")
    parser.add_argument("--methods", nargs="+", default=argparse.SUPPRESS, metavar="METHOD",
                        help=f"run only these methods (default: all): {', '.join(METHODS)}")
    parser.add_argument("--steps", type=int, default=argparse.SUPPRESS,
                        help="steps of every preference run (default: the preset's)")
    parser.add_argument("--sft-steps", type=int, default=argparse.SUPPRESS,
                        help="SFT steps (default: the preset's)")
    parser.add_argument("--pretrain-steps", type=int, default=argparse.SUPPRESS,
                        help="base-model pretraining steps (default: the preset's)")
    parser.add_argument("--lr", type=float, default=argparse.SUPPRESS,
                        help="learning rate of every preference run (default: the preset's)")
    parser.add_argument("--beta", type=float, default=argparse.SUPPRESS,
                        help="beta of every preference loss (default: the preset's)")
    parser.add_argument("--batch-size", type=int, default=argparse.SUPPRESS,
                        help="pairs per step (default: the preset's)")
    parser.add_argument("--eval-every", type=int, default=argparse.SUPPRESS,
                        help="reward curve: every N steps (default: the preset's)")
    parser.add_argument("--num-train", type=int, default=argparse.SUPPRESS,
                        help="training pairs (default: the preset's)")
    parser.add_argument("--num-heldout", type=int, default=argparse.SUPPRESS,
                        help="held-out pairs (default: the preset's)")
    parser.add_argument("--workers", type=int, default=argparse.SUPPRESS, help="worker processes (default: 2)")
    return parser


def config_from_args(args: argparse.Namespace):
    """The :class:`~tidpo.experiment.presets.ExperimentConfig`; ``ValueError`` naming the flag on bad input."""
    # Flags not given are absent from args (argparse.SUPPRESS): the preset's value applies.
    overrides = {field: getattr(args, flag.lstrip("-").replace("-", "_"), None) for field, flag in _FLAGS.items()}
    try:
        return make_config(args.preset, **overrides)
    except ValueError as error:
        message = str(error)
        for field, flag in _FLAGS.items():
            if message.startswith(field):
                raise ValueError(f"{flag}: {message}") from error
        raise


def run_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from tidpo.experiment.runner import run_experiment

    try:
        config = config_from_args(args)
    except ValueError as error:
        parser.error(str(error))
    run_experiment(config, args.output_dir)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = add_arguments(argparse.ArgumentParser(
        prog="python -m tidpo.experiment", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Does token weighting work? Every method on a synthetic preference task with known key "
                    "tokens; writes results.json, results.md and plots."))
    return run_from_args(parser.parse_args(sys.argv[1:] if argv is None else argv), parser)
