"""The places a replica's workers leave unused, so that a worker at its own concurrency
limit may borrow them.

With ``--workers N`` the kernel hands each new connection to whichever worker accepts
it first, and a keep-alive connection stays with that worker. Each worker's
concurrency limit (service.concurrency) counts only its own requests, so at the load
the replica serves at full speed the split decides who is refused: 32 connections
split 17/15 between two workers whose limits had adapted to 16 each got 221 refusals
in 8 s while the other worker had a place free; split 16/16, none (measured, 2
workers, default model, wrk photo mix).

Each worker publishes its in-flight count, its limit and when it last refused a
request in one slot of a small table shared by the replica (a memory-mapped file in the
run's folder, which ``cnnserve serve`` creates); a worker takes the first slot whose
lock file it can lock, and the kernel releases the lock when the worker exits. A worker
at its own limit still admits a request while the replica has places left: the sum of
its workers' limits less what they hold, where a worker that refused a request in the
last :data:`LEND_AFTER_SECONDS` has nothing to lend. Without that rule, under overload
a worker would borrow the place a sibling freed a moment before that sibling's next
request took it back, and the replica held more than its limits (measured: at 4x the
load the limits fell to their floor and goodput by a quarter). A worker that dies leaves
its last numbers until its replacement takes the slot (uvicorn restarts it within
seconds) and clears it.

A worker borrows up to twice its own limit (service.concurrency.BORROW_FACTOR): a
client that opened 128 connections at once found 118 of them on one worker, which
borrowed its sibling's 500 unused places and answered all 118 in ~100 ms, refusing
none. Past that, while a sibling has room, its refusals close the connection: the
client's next connection lands on whichever worker accepts it first, most often the
one that is not busy. Below its limit a worker refuses nothing, however unevenly the
connections fell: one holding two requests or more while a sibling holds none closes a
connection after a success (:meth:`Siblings.idle`, at most once a second), so a client
whose few busy connections all landed on one worker is spread too. A worker that does
not serve (not listening yet, or any more) publishes an empty slot.
"""

from __future__ import annotations

import fcntl
import logging
import mmap
import os
from pathlib import Path

import numpy as np
import numpy.typing as npt

SIBLINGS_DIR_ENV = "CNNSERVE_SIBLINGS_DIR"
TABLE = "table"  # the shared table's file name in the folder
# Per slot: in flight, limit, when it last refused (ns, CLOCK_MONOTONIC), the pid.
COLUMNS = 4
# A worker that refused within this long is full, whatever its count says this instant:
# the Retry-After its refusals ask for. At 0.1 s (one concurrency window) a worker the
# host stalled for longer lent its places under overload (1-81 borrowed in 12 s at 4x;
# 3-47 at 1 s, within the host's noise); at the saturating load both lend the same.
LEND_AFTER_SECONDS = 1.0

log = logging.getLogger(__name__)


class Siblings:
    """One worker's slot in the replica's table, and the table's sums."""

    def __init__(self, directory: Path, slots: int) -> None:
        self._map = _mapped(directory, slots)
        self._table = _rows(self._map)
        self._lock = -1
        for index in range(slots):
            lock = os.open(directory / f"slot-{index}.lock", os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(lock)
                continue
            self._lock = lock
            self.slot = index
            self._own = self._table[index]
            self._own[:] = 0  # a dead predecessor's numbers
            self._own[3] = os.getpid()
            return
        raise RuntimeError(f"all {slots} worker slots in {directory} are taken")

    @classmethod
    def from_environment(cls, workers: int) -> Siblings | None:
        """The table of the run ``cnnserve serve`` started; None for a single process
        (nothing to borrow from) or when the table cannot be had (then a worker keeps to
        its own limit, as before)."""
        folder = replica_folder(workers)
        if folder is None:
            return None
        try:
            return cls(folder, slots_for(workers))
        except (OSError, RuntimeError) as exc:
            log.warning("workers will not borrow unused places: %s", exc)
            return None

    def publish(self, in_flight: int, limit: int) -> None:
        self._own[0] = in_flight
        self._own[1] = limit

    def refused(self, now: float) -> None:
        """This worker refused a request at ``now`` (time.monotonic(), the same clock in
        every process): it has nothing to lend for a while."""
        self._own[2] = int(now * 1e9)

    def spare(self, now: float) -> int:
        """Places the replica has left at ``now``: the sum of the workers' limits less
        what they hold, counting none free in a worker that refused lately."""
        free = self._table[:, 1] - self._table[:, 0]
        return int(np.where(self._quiet(now), free, np.minimum(free, 0)).sum())

    def idle(self, now: float) -> bool:
        """Whether another worker that serves (its slot holds a limit: see
        ConcurrencyLimit.set_serving) holds no request at ``now`` and has not refused
        one lately. A worker killed with none in flight reads as idle until its
        replacement takes its slot (seconds: uvicorn respawns it at once)."""
        table = self._table
        idle = (table[:, 1] > 0) & (table[:, 0] == 0) & self._quiet(now)
        idle[self.slot] = False  # (a caller holds requests; not idle in any case)
        return bool(idle.any())

    def _quiet(self, now: float) -> npt.NDArray[np.bool_]:
        """Per slot: whether its worker refused no request in the last
        :data:`LEND_AFTER_SECONDS` before ``now``."""
        return self._table[:, 2] < int((now - LEND_AFTER_SECONDS) * 1e9)

    def leave(self) -> None:
        """This worker stops: its slot holds nothing and is free for another."""
        if self._lock >= 0:
            self._own[:] = 0
            os.close(self._lock)
            self._lock = -1


def replica_folder(workers: int) -> Path | None:
    """The folder ``cnnserve serve`` made for the tables its workers share; None for a
    single process (nothing to share) or a worker it did not start."""
    folder = os.environ.get(SIBLINGS_DIR_ENV)
    return Path(folder) if workers >= 2 and folder else None


def slots_for(workers: int) -> int:
    """Room for replacements that start before a dying worker has let go."""
    return 2 * workers


def clear_dead_slots(directory: Path, workers: int, pids: set[int]) -> None:
    """Clear the slots of these workers, which died (the supervisor saw them go): a
    dead worker's numbers must not read as a sibling with places to lend, or one that
    is idle. A slot a replacement took since holds the replacement's pid: kept."""
    try:
        mapped = _mapped(directory, slots_for(workers))
    except OSError as exc:
        log.warning("could not clear the slots of workers that died: %s", exc)
        return
    with mapped:
        _clear(_rows(mapped), pids)


def _clear(table: npt.NDArray[np.int64], pids: set[int]) -> None:
    """(Its own function: the views of the map must be gone before the map closes.)"""
    dead = np.isin(table[:, 3], list(pids))
    table[dead, :3] = 0


def _mapped(directory: Path, slots: int) -> mmap.mmap:
    return mapped_file(directory / TABLE, slots * COLUMNS * 8)  # int64


def mapped_file(path: Path, size: int) -> mmap.mmap:
    """``size`` bytes of ``path`` mapped shared, created (zeros) by the first worker."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        if os.fstat(fd).st_size < size:
            os.ftruncate(fd, size)
        return mmap.mmap(fd, size)
    finally:
        os.close(fd)


def _rows(mapped: mmap.mmap) -> npt.NDArray[np.int64]:
    return np.frombuffer(mapped, dtype=np.int64).reshape(-1, COLUMNS)
