"""Pass or fail a load test: achieved req/s, p99 and failure ratio against bounds.

Kept free of locust so the rule is testable on its own; the locustfile applies it to
locust's own total stats when the run ends.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Thresholds:
    target_rps: float = 0.0  # 0 = no bound
    max_p99_ms: float = 0.0  # 0 = no bound
    max_fail_ratio: float = 0.01

    def describe(self) -> str:
        """The bounds in effect, for the verdict line (a bound left at 0 is off)."""
        rps = f"{self.target_rps:g}" if self.target_rps else "off"
        p99 = f"{self.max_p99_ms:g}" if self.max_p99_ms else "off"
        return f"TARGET_RPS {rps}, MAX_P99_MS {p99}, MAX_FAIL_RATIO {self.max_fail_ratio:g}"


def bound(text: str) -> float:
    """An argparse type for a bound: a finite number >= 0 (NaN passed every check)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give a finite number >= 0 (0 = off)")
    return value


def ratio(text: str) -> float:
    """An argparse type for the failure ratio: a number from 0 to 1."""
    value = bound(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"{text!r}: a ratio is from 0 to 1 (0.01 = 1%)")
    return value


@dataclass(frozen=True)
class Outcome:
    rps: float  # successful answers per second of the whole run
    p99_ms: float
    fail_ratio: float
    requests: int
    # What no answer can show: tasks that raised, users that made no request at all.
    errors: tuple[str, ...] = ()


def verdict(outcome: Outcome, bounds: Thresholds) -> str | None:
    """None when every bound holds; else one line naming each one broken."""
    broken = []
    if outcome.requests == 0:
        broken.append("no request completed")
    elif outcome.fail_ratio >= 1:  # a ratio bound of 1 passed it
        broken.append("no successful answer")
    broken.extend(outcome.errors)
    if bounds.target_rps and outcome.rps < bounds.target_rps:
        broken.append(f"{outcome.rps:.1f} req/s < TARGET_RPS {bounds.target_rps:g}")
    if bounds.max_p99_ms and outcome.p99_ms > bounds.max_p99_ms:
        broken.append(f"p99 {outcome.p99_ms:.0f} ms > MAX_P99_MS {bounds.max_p99_ms:g}")
    if outcome.fail_ratio > bounds.max_fail_ratio:
        broken.append(
            f"failure ratio {outcome.fail_ratio:.2%} > MAX_FAIL_RATIO {bounds.max_fail_ratio:g}"
        )
    return "; ".join(broken) or None


def summary(outcome: Outcome) -> str:
    return (
        f"{outcome.requests} requests, {outcome.rps:.1f} req/s, p99 {outcome.p99_ms:.0f} ms, "
        f"failure ratio {outcome.fail_ratio:.2%}"
    )
