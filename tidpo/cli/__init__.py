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

import sys

from tidpo.cli.common import OneLineErrorParser, run_command

#: Commands with a parser of their own (flags owned by transformers' HfArgumentParser or several groups).
_DELEGATED = {
    "train": ("tidpo.cli.train", "main",
              "train with a preference loss (LoRA by default); `tidpo train --help` lists the flags"),
    "estimate-weights": ("tidpo.cli.weights", "estimate_main",
                         "TIS-DPO token weights from a contrastive model pair; `--help` lists the flags"),
    "show-weights": ("tidpo.cli.weights", "show_main", "render token weights as HTML and PNG; `--help` lists the "
                                                        "flags"),
}


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


def _run_parsed(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


def main(argv: list[str] | None = None) -> int:
    import importlib

    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in _DELEGATED:
        module, function, _ = _DELEGATED[argv[0]]
        return getattr(importlib.import_module(module), function)(argv[1:])
    command = argv[0] if argv and not argv[0].startswith("-") else None
    return run_command(f"tidpo {command}" if command else "tidpo", _run_parsed, argv)


if __name__ == "__main__":
    sys.exit(main())
