"""Pass or fail a load test: achieved req/s, p99 and failure ratio against bounds.

Kept free of locust so the rule is testable on its own; the locustfile applies it to
locust's own total stats when the run ends.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Thresholds:
    target_rps: float = 0.0  # 0 = no bound
    max_p99_ms: float = 0.0  # 0 = no bound
    max_fail_ratio: float = 0.01


@dataclass(frozen=True)
class Outcome:
    rps: float
    p99_ms: float
    fail_ratio: float
    requests: int


def verdict(outcome: Outcome, bounds: Thresholds) -> str | None:
    """None when every bound holds; else one line naming each one broken."""
    broken = []
    if outcome.requests == 0:
        broken.append("no request completed")
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
