"""argparse types for numbers with a range: a value out of it is argparse's one-line
error (exit 2) before any work starts, not a traceback from deep inside a run."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def at_least(low: int) -> Callable[[str], int]:
    """An integer of at least ``low``."""

    def integer(text: str) -> int:
        value = int(text)  # a ValueError is argparse's "invalid integer value"
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    return integer


def fraction(text: str) -> float:
    """A number strictly between 0 and 1."""
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1 (exclusive), got {text}")
    return value
