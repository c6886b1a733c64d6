"""When each client address was last refused, shared by a replica's workers.

A client that opens a new connection for each request and retries a 503 at once is
known by its address (service.concurrency.HostRefusals): its reconnect is paced like a
kept connection's retry. With ``--workers N`` the kernel hands that reconnect to
whichever worker accepts first, most often not the one that refused it; each worker
remembering only its own refusals, a crowd of such clients, each on an address of its
own, had about half its retries answered at once, unpaced: 2 workers, the default
model, 256 HTTP/1.0 clients on 256 loopback addresses: ~1,600 refusals a second against
the pace's ~1,000, and 772-930 served a second against 985-1,036 from the same clients
on one address. So the workers write each refusal's time into one table of the
replica's (a memory-mapped file in the siblings' folder, service.siblings), and each
reads it for a new connection's first request.

The table is a fixed array of slots, each an address's key (a hash of it: the same in
every process, unlike ``hash()``) and when it was last refused, in nanoseconds of the
event loop's clock (CLOCK_MONOTONIC, the same in every process). An address takes the
slot its key picks, pushing out whoever had it: only the addresses refused within the
last few milliseconds matter (the retry window), a few dozen at a time, so a collision
forgets one of them, which then goes unpaced once. No lock: each number is one aligned
8-byte store, and a read racing a write can misjudge one request, paced or not.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from service.siblings import mapped_file, replica_folder

HOSTS = "hosts"  # the table's file name in the siblings' folder
SLOTS = 8192
_NS = 1e9

log = logging.getLogger(__name__)


class SharedHosts:
    """The replica's table of when each client address was last refused."""

    __slots__ = ("_map", "_table")

    def __init__(self, directory: Path) -> None:
        self._map = mapped_file(directory / HOSTS, SLOTS * 2 * 8)
        # Python's own view of the map: an item costs a fraction of numpy's.
        self._table = memoryview(self._map).cast("q")

    @classmethod
    def from_environment(cls, workers: int) -> SharedHosts | None:
        """The table of the run ``cnnserve serve`` started; None for a single process
        (its own refusals are all there are) or when the table cannot be had (then each
        worker remembers its own, as before)."""
        folder = replica_folder(workers)
        if folder is None:
            return None
        try:
            return cls(folder)
        except OSError as exc:
            log.warning("workers will not share the client addresses they refused: %s", exc)
            return None

    def refused_at(self, host: str) -> float | None:
        """When ``host`` was last refused by any worker (the event loop's clock), if
        it still holds its slot."""
        key, slot = _place(host)
        if self._table[slot] != key:
            return None
        return self._table[slot + 1] / _NS

    def refused(self, host: str, now: float) -> None:
        key, slot = _place(host)
        # The time first: a read between the two stores finds the slot's old key with
        # the new time (its former address paced once, at worst), never a new key with
        # a stale time.
        self._table[slot + 1] = int(now * _NS)
        self._table[slot] = key


def _key(host: str) -> int:
    """A non-zero 63-bit key for ``host``, the same in every process."""
    digest = hashlib.blake2b(host.encode(), digest_size=8).digest()
    return (int.from_bytes(digest, "little") >> 1) or 1


def _place(host: str) -> tuple[int, int]:
    """``host``'s key, and the index of its slot's first number in the table."""
    key = _key(host)
    return key, 2 * (key % SLOTS)
