"""Readiness votes of sibling worker processes (service.readiness)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from service.readiness import RESTARTING, WorkerReadiness


def live_process() -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                            stdin=subprocess.PIPE)  # fmt: skip


def test_ready_once_every_live_worker_has_voted_then_while_one_is_replaced(
    tmp_path: Path,
) -> None:
    me = WorkerReadiness(tmp_path, workers=2)
    assert not me.replica_serving()  # the first start: every worker listens at once
    assert not me.all_ready()
    me.publish(True)
    assert not me.all_ready()  # the sibling has not loaded yet

    sibling = live_process()
    try:
        (tmp_path / str(sibling.pid)).touch()
        assert me.all_ready()
    finally:
        sibling.communicate(b"")
    # The sibling died: its replacement listens only once loaded, so the replica,
    # whose answering workers all serve, stays ready meanwhile.
    assert me.all_ready()


def test_a_replacement_joins_a_serving_replica(tmp_path: Path) -> None:
    sibling = live_process()
    try:
        (tmp_path / str(sibling.pid)).touch()  # a worker that serves
        replacement = WorkerReadiness(tmp_path, workers=2)
        assert replacement.replica_serving() and replacement.all_ready()
    finally:
        sibling.communicate(b"")


def test_a_draining_worker_is_not_ready_unless_the_workers_are_being_replaced(
    tmp_path: Path,
) -> None:
    me = WorkerReadiness(tmp_path, workers=2)
    me.drain()
    assert not me.all_ready()  # the server stops: probes see it first
    (tmp_path / RESTARTING).touch()  # SIGHUP: its replacement serves already
    assert me.all_ready()


def test_one_process_needs_no_votes(tmp_path: Path) -> None:
    alone = WorkerReadiness(tmp_path, workers=1)
    alone.publish(True)
    assert alone.all_ready() and not any(tmp_path.iterdir())
    assert WorkerReadiness(None, workers=4).all_ready()


def test_the_replica_was_whole_even_if_no_probe_asked_this_worker(tmp_path: Path) -> None:
    """A worker no probe had reached while both served said 503 once its sibling died:
    whether the replica was whole was noted only when a probe asked."""
    me = WorkerReadiness(tmp_path, workers=2)
    sibling = live_process()
    try:
        (tmp_path / str(sibling.pid)).touch()
        me.publish(True)  # its periodic vote; no all_ready() call in between
    finally:
        sibling.communicate(b"")
    assert me.all_ready()


def test_the_replica_was_whole_if_any_worker_saw_it_whole(tmp_path: Path) -> None:
    """A worker whose last look came before its sibling's vote said 503 when that
    sibling died, though the sibling had seen both ready (a CI run killed it first)."""
    me = WorkerReadiness(tmp_path, workers=2)
    me.publish(True)  # alone so far: not whole
    sibling = live_process()
    try:
        (tmp_path / str(sibling.pid)).touch()  # its vote, then its own look: whole
        WorkerReadiness(tmp_path, workers=2).all_ready()  # the sibling's view
    finally:
        sibling.communicate(b"")
    assert me.all_ready()  # it never looked while both were ready


def test_a_vote_names_the_models_its_worker_serves(tmp_path: Path) -> None:
    me = WorkerReadiness(tmp_path, workers=2)
    sibling = live_process()
    try:
        (tmp_path / str(sibling.pid)).write_text("a\nb")
        assert me.served_by_others() == {"a", "b"}
        me.publish(True, ["c"])
        assert me.served_by_others() == {"a", "b"}  # not its own
        assert (tmp_path / str(os.getpid())).read_text() == "c"
    finally:
        sibling.communicate(b"")
    assert me.served_by_others() == set()  # a dead worker's vote does not count
