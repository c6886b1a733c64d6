"""argparse types for numbers with a range: a value out of it is argparse's one-line
error (exit 2) before any work starts, not a traceback from deep inside a run."""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from service.config import pem_certificates_problem


class DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter):
    """Help that says each option's default, except where there is none to say (None,
    a flag's False) or its help already says it: "(default: None)" was noise."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if action.default in (None, False) or "default" in text:
            return text
        return super()._get_help_string(action)


def say_defaults(parser: argparse.ArgumentParser) -> None:
    """Give every option without help text its default as help, in ``parser`` and its
    subcommands: argparse prints no default for an option without help, so `compress
    --help` showed --model as if it had to be given (it is fashion_mnist)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for subparser in set(action.choices.values()):
                say_defaults(subparser)
        elif (
            action.option_strings
            and action.help is None
            and action.default is not None
            and action.default is not False  # a flag's; 0 (== False) is a default to say
            and action.default is not argparse.SUPPRESS
        ):
            action.help = "(default: %(default)s)"


def at_least(low: int) -> Callable[[str], int]:
    """An integer of at least ``low``."""

    def integer(text: str) -> int:
        value = int(text)  # a ValueError is argparse's "invalid integer value"
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    return integer


def number_in(
    low: float, high: float, *, low_open: bool = False, high_open: bool = False
) -> Callable[[str], float]:
    """A number in [low, high] (an open end excluded)."""
    left, right = "(" if low_open else "[", ")" if high_open else "]"

    def number(text: str) -> float:
        value = float(text)  # a ValueError is argparse's "invalid number value"
        below = value <= low if low_open else value < low
        above = value >= high if high_open else value > high
        if below or above or value != value:  # nan
            if high == float("inf"):
                bound = f"more than {low:g}" if low_open else f"at least {low:g}"
            else:
                bound = f"in {left}{low:g}, {high:g}{right}"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {text}")
        return value

    number.__name__ = "number"  # argparse names the type in "invalid <name> value"
    return number


POSITIVE = number_in(0, float("inf"), low_open=True, high_open=True)
NON_NEGATIVE = number_in(0, float("inf"), high_open=True)
RATE = number_in(0, 1, high_open=True)  # dropout, momentum, shifts: 0 <= x < 1
SHARE = number_in(0, 1)  # a weight or a share that may be all or nothing
fraction = number_in(0, 1, low_open=True, high_open=True)  # strictly between: sparsity


N = TypeVar("N", int, float)


def _comma_separated(
    text: str, parse: Callable[[str], N], kind: str, fits: Callable[[N], bool], bound: str
) -> list[N]:
    try:
        values = [parse(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated {kind}; got {text!r}") from None
    if not all(fits(value) for value in values):
        raise argparse.ArgumentTypeError(f"each must be {bound}, got {text!r}")
    return values


def multiples(text: str) -> list[float]:
    """Comma-separated numbers above 1, up to 1,000 (times a measured rate: 4 is 4x; past
    that, a rate no generator sends, or an infinite one)."""
    return _comma_separated(
        text, float, "numbers, e.g. 2,4", lambda v: 1 < v <= 1000, "above 1 and at most 1000"
    )


def positive_ints(text: str) -> list[int]:
    """Comma-separated integers of at least 1 (argparse applies it to a default too)."""
    return _comma_separated(text, int, "whole numbers, e.g. 1,8,32", lambda v: v >= 1, "at least 1")


def folder_or_new(text: str) -> Path:
    """A folder to write into: existing or not, but not a file."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a file; give a folder to write into")
    return path


def pem_certificates(text: str) -> Path:
    """A file of PEM certificates to trust (a client's --ca-cert): read and parsed here,
    so a wrong path or a key given for a certificate is one line, not a TLS error later."""
    problem = pem_certificates_problem(text)
    if problem is not None:
        raise argparse.ArgumentTypeError(problem)
    return Path(text)


def model_name(text: str) -> str:
    """A model's folder name in the repository: letters, digits, '_', '-', '.', not
    starting with '.' (so never a path: '../x' published outside the repository)."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", text):
        raise argparse.ArgumentTypeError(
            f"{text!r}: use letters, digits, '_', '-' or '.', starting with a letter or digit"
        )
    return text
