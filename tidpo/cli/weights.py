"""``tidpo estimate-weights`` and ``tidpo show-weights``: TIS-DPO token weights from the command line.

Examples::

    # TIS-DPO(D): pi+ = DPO on the pairs, pi- = DPO on the reversed pairs (merged model folders)
    tidpo estimate-weights --positive dpo-pos/merged --negative dpo-neg/merged --data pairs.jsonl \\
        --out weights.jsonl --transform rank_based --min-scale 0.7 --max-scale 1.3
    # TIS-DPO(P): one model, two contrastive prompts
    tidpo estimate-weights --positive sft/ --negative sft/ --positive-template harmless \\
        --negative-template harmful --data pairs.jsonl --out weights.jsonl
    tidpo show-weights --weights weights.jsonl --out weights-view/ --rows 0 1 2

See :mod:`tidpo.weights.estimate` and :mod:`tidpo.weights.visualize`.
"""

from __future__ import annotations

import argparse
import json

from tidpo.cli.common import OneLineErrorParser, flag_names, positive_int, run_command
from tidpo.data.tokenization import TRUNCATION_MODES
from tidpo.trainer.models import DTYPES
from tidpo.weights.scoring import PROMPT_TEMPLATES
from tidpo.weights.tis import TRANSFORMS

__all__ = ["build_estimate_parser", "build_show_parser", "estimate_main", "show_main"]

#: Transform-parameter flags: destination -> (type, help).
_TRANSFORM_FLAGS = {
    "min_scale": (float, "lowest weight of rank_based / threshold_and_scale / random (library default 0.7)"),
    "max_scale": (float, "highest weight of rank_based / threshold_and_scale / random (library default 1.3)"),
    "top_percent": (float, "binary: percent of tokens with weight 1 (library default 100)"),
    "lower": (float, "threshold / exp_clamp: lower clamp bound (library default -1 / -0.5)"),
    "upper": (float, "threshold / exp_clamp: upper clamp bound (library default 1 / 1.5)"),
    "min_val": (float, "threshold_and_scale: lower clamp bound of the score (library default -1.5)"),
    "max_val": (float, "threshold_and_scale: upper clamp bound of the score (library default 1.5)"),
    "k": (float, "exp_clamp: scale k of k*exp(mu*clamp(r, lower, upper)) (library default 1)"),
    "seed": (int, "random: seed (row r draws from seed + r)"),
}


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except for required flags and flags whose default is "not given" (None / False)."""

    def _get_help_string(self, action):
        if action.required or action.default in (None, False):
            return action.help
        return super()._get_help_string(action)


def build_estimate_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
        prog="tidpo estimate-weights", formatter_class=_Formatter,
        description="Score every response token with a positive and a negative model, r = log p+(y_t) - "
                    "log p-(y_t), turn the scores into TIS-DPO token weights and write a weights file for "
                    "`tidpo train --loss tis_dpo --weights OUT`. Interrupted runs resume.")
    models = parser.add_argument_group("models and data")
    models.add_argument("--positive", required=True, help="pi+: a local model folder, 'embedded' or 'tiny-gpt2'; "
                                                          "its tokenizer must be the training run's")
    models.add_argument("--negative", required=True, help="pi-: same forms; the same folder as --positive loads "
                                                          "it once (TIS-DPO(P), with two templates)")
    models.add_argument("--data", required=True, help="preference pairs: JSON/JSONL/Parquet file or folder")
    models.add_argument("--out", required=True, help="weights file to write: .jsonl or .parquet")
    models.add_argument("--positive-template", default=None,
                        help=f"pi+ prompt template: {' | '.join(PROMPT_TEMPLATES)} or a string with {{prompt}}")
    models.add_argument("--negative-template", default=None, help="pi- prompt template (same forms)")
    models.add_argument("--dtype", choices=tuple(DTYPES), default="float32",
                        help="dtype the models are loaded in")
    models.add_argument("--device", default=None, help="device of the models (default: cuda if available, else cpu)")
    weights = parser.add_argument_group("weights")
    weights.add_argument("--transform", choices=TRANSFORMS, default="rank_based",
                         help="score -> weight method: the released transforms, or exp_clamp (the paper's "
                              "k*exp(+-clamp(r, lower, upper)))")
    for name, (kind, text) in _TRANSFORM_FLAGS.items():
        weights.add_argument(f"--{name.replace('_', '-')}", dest=name, type=kind, default=None, help=text)
    limits = parser.add_argument_group("tokenisation (use the training run's values)")
    limits.add_argument("--max-length", type=positive_int, default=512, help="prompt + response tokens")
    limits.add_argument("--max-prompt-length", type=positive_int, default=None,
                        help="prompt tokens kept when a pair is too long (default: no separate limit)")
    limits.add_argument("--truncation-mode", choices=TRUNCATION_MODES, default="keep_end",
                        help="which prompt tokens truncation keeps")
    run = parser.add_argument_group("run")
    run.add_argument("--batch-size", type=positive_int, default=4, help="pairs per forward pass")
    run.add_argument("--no-resume", action="store_true",
                     help="delete OUT (and OUT.meta.json) and start over instead of resuming")
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def estimate_main(argv: list[str]) -> int:
    """``tidpo estimate-weights ARGS``: write the weights file and print a summary; returns 0 (2 on an error)."""
    return run_command("tidpo estimate-weights", _estimate, argv, flags=lambda: flag_names(
        build_estimate_parser(), positive_model="--positive", negative_model="--negative"))


def _estimate(argv: list[str]) -> int:
    from tidpo.apps.models import load_model_and_tokenizer
    from tidpo.weights.estimate import METHOD_PARAMS, estimate_weights, format_summary

    parser = build_estimate_parser()
    args = parser.parse_args(argv)
    params = {name: getattr(args, name) for name in _TRANSFORM_FLAGS if getattr(args, name) is not None}
    unused = sorted(set(params) - set(METHOD_PARAMS[args.transform]))
    if unused:
        flags = ", ".join(f"--{name.replace('_', '-')}" for name in unused)
        accepted = ", ".join(f"--{n.replace('_', '-')}" for n in METHOD_PARAMS[args.transform]) or "none"
        parser.error(f"{flags} does not apply to --transform {args.transform} (it takes: {accepted})")
    result = estimate_weights(
        args.positive, args.negative, args.data, args.out, transform=args.transform, transform_params=params,
        positive_template=args.positive_template, negative_template=args.negative_template,
        batch_size=args.batch_size, max_length=args.max_length, max_prompt_length=args.max_prompt_length,
        truncation_mode=args.truncation_mode, dtype=args.dtype, resume=not args.no_resume,
        progress=not args.no_progress, device=args.device, model_loader=load_model_and_tokenizer)
    print(format_summary(result["summary"]))
    resumed = f" ({result['resumed']} found from an earlier run)" if result["resumed"] else ""
    print(f"wrote {result['rows']} rows to {result['out']}{resumed}")
    prompt_limit = "" if args.max_prompt_length is None else f"--max-prompt-length {args.max_prompt_length} "
    print(f"train with: tidpo train --loss tis_dpo --data {args.data} --weights {result['out']} "
          f"--max-length {args.max_length} {prompt_limit}--truncation-mode {args.truncation_mode} ...")
    return 0


def build_show_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
        prog="tidpo show-weights", formatter_class=_Formatter,
        description="Render a weights file of `tidpo estimate-weights`: an HTML page with every token coloured "
                    "by its weight, the same as a PNG figure, and a histogram of the weights per side.")
    parser.add_argument("--weights", required=True, help="weights file (.jsonl / .json / .parquet)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--rows", type=int, nargs="+", default=[0, 1, 2], help="rows to show")
    parser.add_argument("--max-tokens", type=positive_int, default=200, help="tokens shown per response")
    return parser


def show_main(argv: list[str]) -> int:
    """``tidpo show-weights ARGS``: write the HTML page and the PNGs, print their paths; returns 0 (2 on an error)."""
    return run_command("tidpo show-weights", _show, argv, flags=lambda: flag_names(build_show_parser()))


def _show(argv: list[str]) -> int:
    from tidpo.weights.visualize import show_weights

    args = build_show_parser().parse_args(argv)
    paths = show_weights(args.weights, args.out, rows=args.rows, max_tokens=args.max_tokens)
    print(json.dumps({name: str(path) for name, path in paths.items()}, indent=1))
    return 0
