"""Readiness votes of sibling worker processes (service.readiness)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from service.readiness import WorkerReadiness


def test_ready_only_when_every_live_worker_has_voted(tmp_path: Path) -> None:
    me = WorkerReadiness(tmp_path, workers=2)
    assert not me.all_ready()
    me.publish(True)
    assert not me.all_ready()  # the sibling has not loaded yet

    sibling = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                               stdin=subprocess.PIPE)  # fmt: skip
    try:
        (tmp_path / str(sibling.pid)).touch()
        assert me.all_ready()
        me.publish(False)  # e.g. shutting down
        assert not me.all_ready()
        me.publish(True)
    finally:
        sibling.communicate(b"")
    # A dead worker's vote does not count (uvicorn's replacement must load first).
    assert not me.all_ready()


def test_one_process_needs_no_votes(tmp_path: Path) -> None:
    alone = WorkerReadiness(tmp_path, workers=1)
    alone.publish(True)
    assert alone.all_ready() and not any(tmp_path.iterdir())
    assert WorkerReadiness(None, workers=4).all_ready()
