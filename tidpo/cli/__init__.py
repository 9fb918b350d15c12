"""The ``tidpo`` command line: every command lives in this sub-package.

- ``tidpo demo``: the main job on the embedded default — LoRA preference training of SmolLM2-135M-Instruct on
  pairs from a real dialog corpus, held-out margins and a generation before / after (:mod:`tidpo.cli.demo`).
- ``tidpo quickstart``: a one-second tour with a tiny byte-level model.
- ``tidpo export-pairs``: the embedded preference pairs as JSONL files.
- ``tidpo train``: LoRA / full fine-tuning with a preference loss (:mod:`tidpo.cli.train`).
- ``tidpo estimate-weights`` / ``tidpo show-weights``: TIS-DPO token weights (:mod:`tidpo.cli.weights`).
- ``tidpo experiment``: does token weighting work? (:mod:`tidpo.cli.experiment`).

An error is one line, ``tidpo <command>: error: ...``, with exit status 2; ``--debug`` (or ``TIDPO_DEBUG=1``)
shows the traceback instead.
"""

from __future__ import annotations

import argparse
import sys

from tidpo.cli.common import OneLineErrorParser, flag_names, run_command

#: Commands with a parser of their own (flags owned by transformers' HfArgumentParser or several groups).
_DELEGATED = {
    "train": ("tidpo.cli.train", "main",
              "train with a preference loss (LoRA by default); `tidpo train --help` lists the flags"),
    "estimate-weights": ("tidpo.cli.weights", "estimate_main",
                         "TIS-DPO token weights from a contrastive model pair; `--help` lists the flags"),
    "show-weights": ("tidpo.cli.weights", "show_main", "render token weights as HTML and PNG; `--help` lists the "
                                                        "flags"),
}


#: Library argument names that the commands' flags spell differently.
_FLAG_ALIASES = {"num_heldout": "--eval-size", "last_layers": "--lora-last-layers"}


def build_parser() -> OneLineErrorParser:
    from tidpo.cli.demo import add_demo_commands
    from tidpo.cli.experiment import add_experiment_command

    parser = OneLineErrorParser(prog="tidpo", description="Token-weighted preference optimisation "
                                     "(DPO, TDPO, TIS-DPO, TI-DPO). `tidpo COMMAND --help` for a command's flags; "
                                     "--debug shows the traceback of an error.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=OneLineErrorParser)
    add_demo_commands(sub)
    add_experiment_command(sub)
    for name, (_, _, text) in _DELEGATED.items():
        sub.add_parser(name, add_help=False, help=text)
    return parser


def _commands(parser: OneLineErrorParser) -> dict:
    """The sub-parsers by command name."""
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _run_parsed(argv: list[str]) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # reported by the command's own parser: `tidpo demo: error: unrecognized arguments: ...`
        _commands(parser)[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
    return args.func(args)


def _flags() -> dict[str, str]:
    names = {}
    for command in _commands(build_parser()).values():
        names.update(flag_names(command))
    return {**names, **_FLAG_ALIASES}


def main(argv: list[str] | None = None) -> int:
    import importlib

    argv = sys.argv[1:] if argv is None else list(argv)
    # --debug may come before the command as well as after it (run_command reads it anywhere).
    rest = [arg for arg in argv if arg != "--debug"]
    if rest and rest[0] in _DELEGATED:
        module, function, _ = _DELEGATED[rest[0]]
        debug = ["--debug"] if len(rest) < len(argv) else []
        return getattr(importlib.import_module(module), function)(rest[1:] + debug)
    command = rest[0] if rest and not rest[0].startswith("-") else None
    return run_command(f"tidpo {command}" if command else "tidpo", _run_parsed, argv, flags=_flags)

if __name__ == "__main__":
    sys.exit(main())
