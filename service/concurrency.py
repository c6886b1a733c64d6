"""How many requests one worker handles at once, REST and gRPC together.

A request over the limit is refused at once, before its body is read (503 +
Retry-After, gRPC RESOURCE_EXHAUSTED). The limit is a fixed cap
(``max_concurrent_requests``): the batcher's and the decode pool's admission, which
measure the seconds of work queued ahead, decide what is overload; this cap bounds
what a worker holds (memory, open bodies) whatever those measure.

A limit adapted by Little's law (measured throughput × a latency target) was tried and
measured against the batcher's budget alone (docs/failure-modes.md): under clients that
retry a 503 at once it did not raise goodput or lower admitted latency at 4× the
saturating load, and sized to the bare budget it halved goodput, since every refusal
still costs the event loop a request's parsing and the refused come straight back.
"""

from __future__ import annotations

from service import metrics
from service.errors import Overloaded


class ConcurrencyLimit:
    """The worker's in-flight count against its cap (event loop only: no lock)."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"the concurrency limit must be at least 1, got {limit}")
        self.limit = limit
        self.in_flight = 0

    def try_acquire(self) -> bool:
        """Take a place, unless the worker is at its limit."""
        if self.in_flight >= self.limit:
            return False
        self.in_flight += 1
        return True

    def release(self) -> None:
        """An admitted request is answered (whatever the status)."""
        self.in_flight -= 1

    def refusal(self) -> Overloaded:
        """What a request refused by :meth:`try_acquire` is told (and counted as)."""
        metrics.observe_shed("", "concurrency")
        return Overloaded(
            f"this worker is handling {self.in_flight} requests, its limit "
            f"(CNNSERVE_MAX_CONCURRENT_REQUESTS); retry after the Retry-After delay "
            f"({Overloaded.retry_after} s) or send to another replica",
            reason="concurrency",
        )
