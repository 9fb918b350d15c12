"""``tidpo experiment``: does token weighting work? (:mod:`tidpo.apps.experiment`).

Flags that a training run has carry ``tidpo train``'s names (``--max-steps``, ``--learning-rate``,
``--per-device-train-batch-size``, ``--eval-steps``, ``--eval-size``); the older short names work for one release.
"""

from __future__ import annotations

import argparse

from tidpo.apps.experiment.presets import METHODS, PRESETS, make_config
from tidpo.cli.common import add_with_alias

__all__ = ["add_arguments", "add_experiment_command", "config_from_args"]

#: ExperimentConfig field -> its command-line flag (errors name the flag).
_FLAGS = {"seeds": "--seeds", "noise_levels": "--noise", "methods": "--methods", "steps": "--max-steps",
          "sft_steps": "--sft-steps", "workers": "--workers", "lr": "--learning-rate", "beta": "--beta",
          "batch_size": "--per-device-train-batch-size", "eval_every": "--eval-steps", "num_train": "--train-size",
          "num_heldout": "--eval-size", "pretrain_steps": "--pretrain-steps"}


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
    add_with_alias(parser, "--max-steps", "--steps", type=int, default=argparse.SUPPRESS,
                   help="steps of every preference run (default: the preset's)")
    parser.add_argument("--sft-steps", type=int, default=argparse.SUPPRESS,
                        help="SFT steps (default: the preset's)")
    parser.add_argument("--pretrain-steps", type=int, default=argparse.SUPPRESS,
                        help="base-model pretraining steps (default: the preset's)")
    add_with_alias(parser, "--learning-rate", "--lr", type=float, default=argparse.SUPPRESS,
                   help="learning rate of every preference run (default: the preset's)")
    parser.add_argument("--beta", type=float, default=argparse.SUPPRESS,
                        help="beta of every preference loss (default: the preset's)")
    add_with_alias(parser, "--per-device-train-batch-size", "--batch-size", type=int, default=argparse.SUPPRESS,
                   help="pairs per step (default: the preset's)")
    add_with_alias(parser, "--eval-steps", "--eval-every", type=int, default=argparse.SUPPRESS,
                   help="reward curve: every N steps (default: the preset's)")
    add_with_alias(parser, "--train-size", "--num-train", type=int, default=argparse.SUPPRESS,
                   help="training pairs generated (default: the preset's)")
    add_with_alias(parser, "--eval-size", "--num-heldout", type=int, default=argparse.SUPPRESS,
                   help="held-out pairs generated (default: the preset's)")
    parser.add_argument("--workers", type=int, default=argparse.SUPPRESS, help="worker processes (default: 2)")
    return parser


def config_from_args(args: argparse.Namespace):
    """The :class:`~tidpo.apps.experiment.presets.ExperimentConfig`; ``ValueError`` naming the flag on bad input."""
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


def run_from_args(args: argparse.Namespace) -> int:
    from tidpo.apps.experiment.runner import run_experiment

    run_experiment(config_from_args(args), args.output_dir)
    return 0


def add_experiment_command(sub) -> None:
    """Add ``experiment`` to the ``tidpo`` sub-parsers."""
    experiment = sub.add_parser(
        "experiment", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        help="does token weighting work? every method (SFT, DPO, TDPO2, TIS-DPO x 6 weightings, TI-DPO ablations) "
             "on a synthetic task with known key tokens; results table and plots (CPU, <= 20 min)",
        description="Does token weighting work? Every method on a synthetic preference task with known key "
                    "tokens; writes results.json, results.md and plots.")
    add_arguments(experiment)
    experiment.set_defaults(func=run_from_args)
