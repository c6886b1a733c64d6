"""Workers share their unused places through a table in the run's folder
(service.siblings): real files, real locks, a real second process."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import REGISTRY

from service.api.http import error_response
from service.concurrency import (
    BORROW_FACTOR,
    MOVE_CHECK_SECONDS,
    MOVE_INTERVAL_SECONDS,
    ConcurrencyLimit,
)
from service.siblings import (
    COLUMNS,
    LEND_AFTER_SECONDS,
    SIBLINGS_DIR_ENV,
    TABLE,
    Siblings,
    clear_dead_slots,
)

BORROWED = "cnnserve_concurrency_borrowed_total"
MOVED = "cnnserve_concurrency_moved_connections_total"


def test_each_worker_takes_its_own_slot_and_sees_the_replica_sums(tmp_path: Path) -> None:
    first, second = Siblings(tmp_path, 4), Siblings(tmp_path, 4)
    assert first.slot != second.slot
    now = time.monotonic()
    first.publish(in_flight=16, limit=16)
    second.publish(in_flight=12, limit=16)
    assert first.spare(now) == second.spare(now) == 4
    first.publish(in_flight=18, limit=16)  # borrowed two
    assert second.spare(now) == 2
    first.leave()  # gone: its places are no longer there, nor its requests
    assert second.spare(now) == 4
    third = Siblings(tmp_path, 4)  # takes the freed slot
    assert third.slot == first.slot and third.spare(now) == 4


def test_a_worker_that_refused_lately_has_nothing_to_lend(tmp_path: Path) -> None:
    busy, other = Siblings(tmp_path, 2), Siblings(tmp_path, 2)
    busy.publish(in_flight=16, limit=16)
    other.publish(in_flight=15, limit=16)  # a place free this instant...
    other.refused(100.0)  # ...but it turned a request away: it is full in truth
    assert busy.spare(100.0 + LEND_AFTER_SECONDS / 2) == 0
    other.publish(in_flight=17, limit=16)  # what it holds over its limit still counts
    assert busy.spare(100.0 + LEND_AFTER_SECONDS / 2) == -1
    other.publish(in_flight=15, limit=16)
    assert busy.spare(100.0 + 2 * LEND_AFTER_SECONDS) == 1  # it has not refused since


def test_with_every_slot_taken_a_worker_keeps_to_its_own_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    held = [Siblings(tmp_path, 4) for _ in range(4)]
    with pytest.raises(RuntimeError, match="slots"):
        Siblings(tmp_path, 4)
    monkeypatch.setenv(SIBLINGS_DIR_ENV, str(tmp_path))
    assert Siblings.from_environment(workers=2) is None  # 2 x 2 slots, all taken
    held[0].leave()
    assert Siblings.from_environment(workers=2) is not None
    assert Siblings.from_environment(workers=1) is None  # one process: nothing to borrow
    monkeypatch.delenv(SIBLINGS_DIR_ENV)
    assert Siblings.from_environment(workers=2) is None  # not started by cnnserve serve


def test_a_dead_workers_slot_is_freed_by_the_kernel_and_cleared_by_the_next(
    tmp_path: Path,
) -> None:
    child = (
        "import sys, os\n"
        "from pathlib import Path\n"
        "from service.siblings import Siblings\n"
        "s = Siblings(Path(sys.argv[1]), 2)\n"
        "s.publish(5, 16)\n"
        "print(s.slot, os.getpid(), flush=True)\n"
        "os._exit(0)\n"  # no leave(): as if it died
    )
    out = subprocess.run(
        [sys.executable, "-c", child, str(tmp_path)], capture_output=True, text=True, check=True
    )
    dead_slot, dead_pid = map(int, out.stdout.split())
    left = np.fromfile(tmp_path / TABLE, dtype=np.int64).reshape(2, COLUMNS)
    assert left[dead_slot].tolist() == [5, 16, 0, dead_pid]  # its numbers stay in the table...
    replacement = Siblings(tmp_path, 2)  # ...until its replacement takes the free slot
    assert replacement.slot == dead_slot and replacement.spare(time.monotonic()) == 0


def test_the_supervisor_clears_a_dead_workers_slot_before_any_replacement_starts(
    tmp_path: Path,
) -> None:
    """While replacements failed to start, a dead worker's numbers read as a sibling
    with places to lend and no request: its live sibling closed a kept-alive
    connection every second to move its client there."""
    live = Siblings(tmp_path, 4)  # slots_for(2 workers)
    live.publish(2, 16)
    child = (
        "import sys, os\n"
        "from pathlib import Path\n"
        "from service.siblings import Siblings\n"
        "Siblings(Path(sys.argv[1]), 4).publish(0, 16)\n"
        "print(os.getpid(), flush=True)\n"
        "os._exit(0)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", child, str(tmp_path)], capture_output=True, text=True, check=True
    )
    now = time.monotonic()
    assert live.idle(now) and live.spare(now) == 14 + 16  # the dead one still lends
    clear_dead_slots(tmp_path, 2, {int(out.stdout), 999_999_999})
    assert not live.idle(now) and live.spare(now) == 14
    assert live._own.tolist()[:2] == [2, 16]  # another worker's slot is kept


def test_a_worker_at_its_limit_borrows_what_its_sibling_leaves_up_to_the_cap(
    tmp_path: Path,
) -> None:
    busy = ConcurrencyLimit(4, siblings=Siblings(tmp_path, 2))
    idle = ConcurrencyLimit(4, siblings=Siblings(tmp_path, 2))
    busy.limit = idle.limit = 2  # as if both had adapted to 2
    idle.release(idle.try_acquire() or 0.0)  # publishes its limit
    borrowed = REGISTRY.get_sample_value(BORROWED) or 0.0
    taken = [busy.try_acquire() for _ in range(4)]
    assert None not in taken  # 2 of its own, 2 borrowed from the idle worker
    assert REGISTRY.get_sample_value(BORROWED) == borrowed + 2
    assert busy.try_acquire() is None  # its cap
    assert idle.try_acquire() is not None  # a worker's own places are always its own
    assert idle.try_acquire() is not None
    busy.release(taken.pop())
    busy.release(taken.pop())
    assert busy.try_acquire() is None  # at its limit, and the replica is full
    busy.leave()
    idle.leave()


def test_without_siblings_a_worker_keeps_to_its_limit() -> None:
    alone = ConcurrencyLimit(4)
    alone.limit = 2
    assert alone.try_acquire() is not None and alone.try_acquire() is not None
    assert alone.try_acquire() is None


def test_a_worker_borrows_up_to_twice_its_limit_and_moves_refused_clients_to_room(
    tmp_path: Path,
) -> None:
    busy = ConcurrencyLimit(64, siblings=Siblings(tmp_path, 2))
    idle = ConcurrencyLimit(64, siblings=Siblings(tmp_path, 2))
    busy.limit, idle.limit = 4, 12  # the busy worker's answers are slower: a lower limit
    idle.release(idle.try_acquire() or 0.0)  # publishes its limit
    moved = REGISTRY.get_sample_value(MOVED) or 0.0
    # Its own 4 and 4 borrowed (BORROW_FACTOR x its limit), though the idle one leaves
    # 12: places borrowed do not make its event loop faster.
    taken = [busy.try_acquire() for _ in range(BORROW_FACTOR * 4)]
    assert None not in taken
    assert not busy.admits()
    refusal = busy.refusal()  # the sibling has room: the client is sent there
    assert refusal.move and REGISTRY.get_sample_value(MOVED) == moved  # not yet: gRPC...
    response = error_response(refusal, "/v1/classify")  # ...has no connection to close
    assert response.status_code == 503 and response.headers["connection"] == "close"
    assert REGISTRY.get_sample_value(MOVED) == moved + 1
    assert busy.try_acquire() is None and busy.refusal().move  # each refusal decides anew
    held = [idle.try_acquire() for _ in range(12)]  # the sibling fills up and refuses
    assert None not in held and idle.try_acquire() is None
    assert busy.try_acquire() is None
    refusal = busy.refusal()
    assert not refusal.move and "connection" not in error_response(refusal).headers
    busy.leave()
    idle.leave()


def test_a_busy_worker_moves_an_answered_connection_while_a_sibling_holds_none(
    tmp_path: Path,
) -> None:
    """On a moved clock: a worker holding two requests moves the connection of the one
    it answers while its sibling holds none and has not refused lately; once per
    MOVE_INTERVAL_SECONDS, and the table is read once per MOVE_CHECK_SECONDS."""
    now = [1000.0]
    table = Siblings(tmp_path, 2)
    busy = ConcurrencyLimit(64, siblings=table, clock=lambda: now[0])
    sibling_table = Siblings(tmp_path, 2)
    sibling = ConcurrencyLimit(64, siblings=sibling_table, clock=lambda: now[0])
    first = busy.try_acquire()
    assert first is not None
    assert not busy.moves_answered()  # the only request it holds: nothing to even out
    assert busy.try_acquire() is not None
    assert busy.moves_answered()
    assert not busy.moves_answered()  # moved one this second
    now[0] += MOVE_INTERVAL_SECONDS
    held = sibling.try_acquire()
    assert held is not None
    assert not busy.moves_answered()  # the sibling holds a request
    sibling.release(held)
    assert not busy.moves_answered()  # the table was read a moment ago
    now[0] += MOVE_CHECK_SECONDS
    sibling_table.refused(now[0])  # it turned a request away: not idle, whatever it holds
    assert not busy.moves_answered()
    now[0] += LEND_AFTER_SECONDS + MOVE_CHECK_SECONDS
    assert busy.moves_answered()
    busy.release(first)
    now[0] += MOVE_INTERVAL_SECONDS
    assert not busy.moves_answered()  # one request left
    sibling.leave()
    now[0] += MOVE_INTERVAL_SECONDS
    assert busy.try_acquire() is not None
    assert not busy.moves_answered()  # a slot left empty is no idle worker
    busy.leave()
    assert not ConcurrencyLimit(4).moves_answered()  # one process: no sibling


def test_a_worker_that_does_not_serve_yet_or_any_more_lends_nothing_and_is_not_idle(
    tmp_path: Path,
) -> None:
    """A replacement worker listens only once its models are loaded, and a stopping
    one's listeners close: meanwhile it holds nothing, but no client can reach it."""
    now = [1000.0]
    busy = ConcurrencyLimit(64, siblings=Siblings(tmp_path, 2), clock=lambda: now[0])
    starting = ConcurrencyLimit(
        64, siblings=Siblings(tmp_path, 2), clock=lambda: now[0], serving=False
    )
    busy.limit = 1
    assert busy.try_acquire() is not None
    assert busy.try_acquire() is None  # nothing to borrow from a worker that does not serve
    starting.set_serving(True)
    assert busy.try_acquire() is not None  # it serves: its places are lent
    assert busy.moves_answered()  # and it is idle
    now[0] += MOVE_INTERVAL_SECONDS
    starting.set_serving(False)  # its listeners closed
    assert not busy.moves_answered()
    assert busy.try_acquire() is None
    busy.leave()
    starting.leave()
