"""What every ``tidpo`` command shares: one-line errors, argument types, deprecated flag aliases."""

from __future__ import annotations

import argparse
import os
import re
import sys
import warnings
from collections.abc import Callable, Mapping

from tidpo._validation import check_int

#: Set (to anything but "0") to get the full traceback of a failing command, as ``--debug`` does.
DEBUG_ENV = "TIDPO_DEBUG"


def run_command(prog: str, fn: Callable[[list[str]], int], argv: list[str], *,
                flags: Callable[[], Mapping[str, str]] | None = None) -> int:
    """Run ``fn(argv)``; an error is one line, ``prog: error: message``, and exit status 2.

    ``--debug`` anywhere in ``argv`` (it is removed) or ``TIDPO_DEBUG=1`` re-raises instead, with the traceback.
    ``flags()`` maps the library's argument names to the command's flags (:func:`flag_names`): the library
    speaks of ``max_prompt_length``, the message says ``--max-prompt-length``. Warnings print as one line too,
    ``prog: warning: message``.
    """
    debug = "--debug" in argv or os.environ.get(DEBUG_ENV, "0") not in ("", "0")
    argv = [arg for arg in argv if arg != "--debug"]
    try:
        with warnings.catch_warnings():
            if not debug:
                warnings.showwarning = _one_line_warning(prog, flags)
            return fn(argv)
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as error:  # noqa: BLE001 - every failure of a command becomes one line
        if debug:
            raise
        message = " ".join(str(error).split())
        if not isinstance(error, _SELF_EXPLAINING) or not message:
            message = f"{type(error).__name__}: {message}".rstrip(": ")
        if flags is not None:
            message = in_flag_terms(message, flags())
        print(f"{prog}: error: {message} (--debug shows the traceback)", file=sys.stderr)
        return 2


def _one_line_warning(prog: str, flags: Callable[[], Mapping[str, str]] | None):
    def show(message, category, filename, lineno, file=None, line=None):
        text = " ".join(str(message).split())
        if flags is not None:
            text = in_flag_terms(text, flags())
        print(f"{prog}: warning: {text}", file=sys.stderr if file is None else file)

    return show


def flag_names(parser: argparse.ArgumentParser, **extra: str) -> dict[str, str]:
    """``{dest: flag}`` for the parser's long options (the dashed spelling when there are two), plus ``extra``
    (library names that are not a dest, e.g. ``last_layers="--lora-last-layers"``)."""
    names = {}
    for action in parser._actions:
        longs = [option for option in action.option_strings if option.startswith("--")]
        if longs and action.help != argparse.SUPPRESS:
            names[action.dest] = next((o for o in longs if "_" not in o), longs[0])
    return {**names, **extra}


def in_flag_terms(message: str, flags: Mapping[str, str]) -> str:
    """``message`` with the library's argument names written as flags.

    A name with an underscore (``max_prompt_length``) is replaced wherever it stands as a word; a one-word name
    (``beta``, ``out``) only where it is clearly the argument: before ``=`` or at the start of the message.
    """
    if not flags:
        return message
    words = "|".join(re.escape(name) for name in sorted(flags, key=len, reverse=True))
    pattern = re.compile(rf"(?<![\w./-])({words})(?![\w/-])")

    def replace(match: re.Match) -> str:
        name = match.group(1)
        argument = "_" in name or match.start() == 0 or message.startswith("=", match.end())
        return flags[name] if argument else name

    return pattern.sub(replace, message)


#: Errors whose message says what is wrong by itself (tidpo's own checks raise these).
_SELF_EXPLAINING = (ValueError, TypeError, OSError, RuntimeError)


def positive_int(text: str) -> int:
    """argparse type: an int >= 1."""
    try:
        return check_int(int(text), "value", low=1)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from error


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return value


class DeprecatedAlias(argparse.Action):
    """An old flag kept for one release: stores like ``new`` does and warns that it will go."""

    def __init__(self, option_strings, dest, new: str, **kwargs):
        self.new = new
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        warnings.warn(f"{option_string} is deprecated and will be removed in the next release; use {self.new}",
                      FutureWarning, stacklevel=2)
        setattr(namespace, self.dest, values)


def add_with_alias(parser: argparse.ArgumentParser, flag: str, old: str, **kwargs) -> None:
    """``flag`` as given, and ``old`` as a deprecated alias of it (hidden from ``--help``)."""
    action = parser.add_argument(flag, **kwargs)
    alias_kwargs = {k: v for k, v in kwargs.items() if k in ("type", "choices", "metavar")}
    parser.add_argument(old, dest=action.dest, action=DeprecatedAlias, new=flag, help=argparse.SUPPRESS,
                        default=argparse.SUPPRESS, **alias_kwargs)


def one_line_errors(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Make ``parser`` (and the sub-parsers it creates) report a bad flag in one line, ``prog: error: ...``, exit 2."""

    def error(message: str):
        print(f"{parser.prog}: error: {message} (--help lists the flags)", file=sys.stderr)
        sys.exit(2)

    parser.error = error
    return parser


class OneLineErrorParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line (no usage dump); its sub-parsers are too."""

    def error(self, message: str):
        print(f"{self.prog}: error: {message} (--help lists the flags)", file=sys.stderr)
        sys.exit(2)
