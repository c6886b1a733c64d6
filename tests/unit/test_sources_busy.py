"""The TF Serving source on a TF Serving that is busy, not gone: a poll refused for load
(RESOURCE_EXHAUSTED), or one that timed out right after an answered one, keeps the
versions listed last, readiness and cnnserve_backend_up as they were."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from service import metrics
from service.errors import (
    BackendError,
    BackendUnavailable,
    CnnserveError,
    DeadlineExceeded,
    Overloaded,
)
from service.sources import TFServingSource
from tests.helpers.core import settings
from tests.helpers.models import simple_config, write_models_config

Outcome = list[int] | CnnserveError


def busy() -> Overloaded:
    return Overloaded(
        "the model backend (TF Serving) is overloaded; retry shortly",
        detail="TF Serving at 127.0.0.1:1: GetModelStatus: RESOURCE_EXHAUSTED: at capacity",
        reason="backend",
    )


def late() -> DeadlineExceeded:
    return DeadlineExceeded("the request deadline passed while the model backend ran it")


class Scripted:
    """A TF Serving source for model "m" whose GetModelStatus answers are scripted."""

    def __init__(self, source: TFServingSource) -> None:
        self.source = source
        self.script: list[Outcome] = []
        source.client.versions = self._versions  # type: ignore[method-assign]

    def _versions(self, model: str) -> tuple[list[int], list[int]]:
        outcome = self.script.pop(0)
        if isinstance(outcome, CnnserveError):
            raise outcome
        return outcome, []

    def listed(self, outcome: Outcome) -> tuple[list[int], frozenset[str]]:
        """One scan whose poll gets ``outcome``: the versions of "m", the unknown models."""
        self.script.append(outcome)
        scan = self.source.scan()
        return sorted(scan.versions.get("m", {})), scan.unknown


@pytest.fixture
def source(tmp_path: Path) -> Iterator[Scripted]:
    repo = tmp_path / "repo"
    write_models_config(repo, simple_config("m"))
    config = settings(repo, tmp_path).model_copy(
        update={"backend": "tfserving", "tfserving_address": "127.0.0.1:1", "poll_seconds": 1}
    )
    made = TFServingSource(config)
    try:
        yield Scripted(made)
    finally:
        made.close()


def backend_up() -> float | None:
    return metrics.REGISTRY.get_sample_value("cnnserve_backend_up")


def test_a_poll_refused_for_load_keeps_the_versions_and_readiness(
    source: Scripted, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="service.sources"):
        assert source.listed([1, 2]) == ([1, 2], frozenset())
        for _ in range(3):  # a peer under load: refused every other poll
            assert source.listed(busy()) == ([1, 2], frozenset())  # not unknown: still ready
            assert backend_up() == 1
            assert source.listed([1, 2]) == ([1, 2], frozenset())
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1, lines  # one line, not one per change
    assert "busy" in lines[0] and "RESOURCE_EXHAUSTED" in lines[0]
    assert caplog.records[0].levelno == logging.INFO


def test_one_timed_out_poll_after_an_answer_is_busy_two_are_unreachable(
    source: Scripted, caplog: pytest.LogCaptureFixture
) -> None:
    assert source.listed([3]) == ([3], frozenset())
    assert source.listed(late()) == ([3], frozenset())
    assert backend_up() == 1
    with caplog.at_level(logging.WARNING, logger="service.sources"):
        assert source.listed(late()) == ([], frozenset({"m"}))
    assert backend_up() == 0 and "keep their routes" in caplog.text
    assert source.listed([3]) == ([3], frozenset()) and backend_up() == 1


def test_unreachable_is_still_unreachable_and_busy_needs_a_listing(
    source: Scripted,
) -> None:
    down = BackendUnavailable("the model backend (TF Serving) cannot be reached")
    assert source.listed(busy()) == ([], frozenset({"m"}))  # nothing listed yet to keep
    assert source.listed([1]) == ([1], frozenset())
    assert source.listed(down) == ([], frozenset({"m"}))
    assert backend_up() == 0


def test_a_poll_answered_with_a_failure_counts_as_down_and_is_said_once(
    source: Scripted, caplog: pytest.LogCaptureFixture
) -> None:
    """TF Serving answers GetModelStatus UNAUTHENTICATED (a keyed cnnserve as backend),
    INTERNAL, UNIMPLEMENTED ...: the model is refused and readiness 503 as when it is
    unreachable, and this was silent (no line, cnnserve_backend_up 1: its alert never
    fired). Said once while it lasts, and once when it ends; Predicts are not cut off."""
    failed = BackendError(
        "the model backend (TF Serving) failed a GetModelStatus call: UNAUTHENTICATED",
        detail="TF Serving at 127.0.0.1:1: GetModelStatus: UNAUTHENTICATED: no key",
    )
    with caplog.at_level(logging.INFO, logger="service.sources"):
        assert source.listed([1]) == ([1], frozenset())
        for _ in range(3):
            assert source.listed(failed) == ([], frozenset({"m"}))
            assert backend_up() == 0
            assert source.source.client.down is None  # an answer: not "unreachable"
        assert source.listed([1]) == ([1], frozenset()) and backend_up() == 1
    lines = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert len(lines) == 2, lines
    assert lines[0][0] == logging.WARNING and "UNAUTHENTICATED" in lines[0][1]
    assert "readiness 503, until a poll succeeds" in lines[0][1]
    assert lines[1] == (logging.INFO, "TF Serving at 127.0.0.1:1 answers its status polls again")
