"""What every ``tidpo`` command shares: one-line errors, argument types, deprecated flag aliases."""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Callable

from tidpo._validation import check_int

#: Set (to anything but "0") to get the full traceback of a failing command, as ``--debug`` does.
DEBUG_ENV = "TIDPO_DEBUG"


def run_command(prog: str, fn: Callable[[list[str]], int], argv: list[str]) -> int:
    """Run ``fn(argv)``; an error is one line, ``prog: error: message``, and exit status 2.

    ``--debug`` anywhere in ``argv`` (it is removed) or ``TIDPO_DEBUG=1`` re-raises instead, with the traceback.
    """
    debug = "--debug" in argv or os.environ.get(DEBUG_ENV, "0") not in ("", "0")
    argv = [arg for arg in argv if arg != "--debug"]
    try:
        return fn(argv)
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as error:  # noqa: BLE001 - every failure of a command becomes one line
        if debug:
            raise
        message = " ".join(str(error).split())
        if not isinstance(error, _SELF_EXPLAINING) or not message:
            message = f"{type(error).__name__}: {message}".rstrip(": ")
        print(f"{prog}: error: {message} (--debug shows the traceback)", file=sys.stderr)
        return 2


#: Errors whose message says what is wrong by itself (tidpo's own checks raise these).
_SELF_EXPLAINING = (ValueError, TypeError, OSError, RuntimeError)


def positive_int(text: str) -> int:
    """argparse type: an int >= 1."""
    try:
        return check_int(int(text), "value", low=1)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from error


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
