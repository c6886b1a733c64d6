"""Calls waiting in gRPC's core for the worker to take them: counted, and their wait
estimated, so that admission (service.concurrency) sees them.

grpc.aio takes a listener's calls from its core one at a time, a few turns of the event
loop each; a client with many calls on few connections keeps most of them there, before
any of cnnserve's code. Admission saw only the few taken: `h2load -c 4 -m 32` (128 calls
in flight over 4 connections, 2 workers, the default model, ~4x what the worker answers
at once) had every call answered, none refused, at p50 ~130 ms and p99 ~170 ms, of
which cnnserve's handlers took ~4 ms; at 16 connections (512 calls) p99 0.43-0.95 s. The
issue's first complaint (overload absorbed as latency, not shed), over gRPC.

gRPC's core counts each listener's calls (channelz: started, succeeded, failed) and the
listener's first interceptor counts those it takes (:class:`ListenerIntake`): started
and not taken is what waits, less the calls that ended in the core without being taken
(cancelled while they waited), which are learnt as they show (a listener never waits
more calls than it has alive). The wait is that count over the rate the listener takes
calls at (Little's law). Reading channelz costs ~80 us a listener (the core writes JSON),
so only listeners that took calls since the last look are read, and the looks are spaced
to keep them under :data:`CHANNELZ_SHARE` of the worker's time.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from typing import Any

from service import metrics
from service.concurrency import ConcurrencyLimit

log = logging.getLogger(__name__)

_WATCHING: set[asyncio.Task[None]] = set()
MIN_INTERVAL_SECONDS = 0.02  # the most often the listeners are looked at
CHANNELZ_SHARE = 0.01  # of the worker's time spent reading channelz, at most

try:  # grpcio's own accessors (grpcio-channelz's servicer reads through them)
    from grpc._cython import cygrpc

    _get_server: Callable[[int], bytes] | None = cygrpc.channelz_get_server
    _get_servers: Callable[[int], bytes] | None = cygrpc.channelz_get_servers
except (ImportError, AttributeError):  # pragma: no cover - a grpcio without channelz
    _get_server = _get_servers = None


class ListenerIntake:
    """One listener: its server's channelz id and the calls its interceptor took."""

    __slots__ = (
        "_ended_untaken",
        "_limit",
        "_seen_at",
        "_seen_taken",
        "_waiting",
        "server_id",
        "taken",
    )

    def __init__(self, limit: ConcurrencyLimit | None = None) -> None:
        self._limit = limit  # told of each waiting call taken
        self.server_id = 0  # known once registered (CoreBacklog.register)
        self.taken = 0
        self._seen_taken = 0
        self._seen_at = 0.0
        self._ended_untaken = 0  # started, never taken, no longer alive
        self._waiting = 0  # at the last look

    def known_as(self, server_id: int, now: float) -> None:
        """This listener is the gRPC server ``server_id`` in channelz, looked at from
        ``now``."""
        self.server_id = server_id
        self._seen_at = now

    def take(self) -> None:
        """The listener took a call (its first interceptor says): one fewer waits, until
        the next look counts them again. Between looks (20 ms at least), what a look
        counted kept being refused for calls no longer there: at 128 calls in flight on
        8 connections the worker refused calls while it had room, 56% of capacity served
        (84% with the calls waiting unseen)."""
        self.taken += 1
        if self._waiting:
            self._waiting -= 1
            if self._limit is not None:
                self._limit.took_waiting()

    def due(self) -> bool:
        """Whether to read the core's counts: calls were taken since the last look, or
        some waited then."""
        return self.taken != self._seen_taken or self._waiting > 0

    def look(self, now: float, counts: tuple[int, int, int] | None) -> tuple[int, float]:
        """The calls waiting and their estimated wait (seconds), from the core's
        ``counts`` (started, succeeded, failed); None: not looked at (nothing taken
        since the last look, so nothing is read as waiting)."""
        taken, elapsed = self.taken - self._seen_taken, now - self._seen_at
        self._seen_taken, self._seen_at = self.taken, now
        self._waiting = 0
        if counts is None:
            return 0, 0.0
        started, succeeded, failed = counts
        alive = started - succeeded - failed
        waiting = started - self.taken - self._ended_untaken
        if waiting > alive:
            self._ended_untaken += waiting - alive
            waiting = alive
        waiting = self._waiting = max(0, waiting)
        if not waiting:
            return 0, 0.0
        if taken <= 0:  # nothing taken meanwhile: they waited the whole look at least
            return waiting, elapsed
        return waiting, waiting * elapsed / taken


class CoreBacklog:
    """The worker's listeners, looked at together."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._listeners: list[ListenerIntake] = []
        self._last_id = 0

    def register(self, intake: ListenerIntake) -> None:
        """Look at ``intake`` as the gRPC server created last (call right after creating
        it); not where channelz cannot be read (its calls waiting stay unseen)."""
        server_id = self._newest_server()
        if server_id is not None:
            intake.known_as(server_id, self._clock())
            self._listeners.append(intake)

    def _newest_server(self) -> int | None:
        if _get_servers is None:
            return None
        newest = None
        try:
            while True:  # a page at a time, from after the last one seen
                page = json.loads(_get_servers(self._last_id + 1))
                ids = [int(server["ref"]["serverId"]) for server in page.get("server", ())]
                if ids:
                    newest = self._last_id = max(ids)
                if page.get("end", True) or not ids:
                    break
        except (ValueError, KeyError, TypeError, RuntimeError) as exc:
            log.warning("gRPC's channelz cannot be read (%s): calls waiting unseen", exc)
            return None
        return newest

    def look(self) -> tuple[int, float]:
        """Calls waiting in the core over all listeners, and their estimated wait, a
        mean over the calls (each listener's calls wait behind its own connections only).
        The longest of the listeners' instead, added to the p99 of the answers, refused
        2-6% of a saturating load (32 calls on 8 connections, one worker) that none
        refused before."""
        now = self._clock()
        waiting, weighted = 0, 0.0
        for intake in self._listeners:
            counts = _counts(intake.server_id) if intake.due() else None
            calls, seconds = intake.look(now, counts)
            waiting += calls
            weighted += calls * seconds
        return waiting, weighted / waiting if waiting else 0.0

    async def watch(self, limit: ConcurrencyLimit, stopping: Callable[[], bool]) -> None:
        """Tell ``limit`` what waits, until ``stopping()``: looked at every
        :data:`MIN_INTERVAL_SECONDS`, or less often where a look costs more than
        :data:`CHANNELZ_SHARE` of that."""
        interval = MIN_INTERVAL_SECONDS
        try:
            while not stopping():
                await asyncio.sleep(interval)
                started = time.perf_counter()
                waiting, wait = self.look()
                interval = max(
                    MIN_INTERVAL_SECONDS, (time.perf_counter() - started) / CHANNELZ_SHARE
                )
                limit.note_waiting(waiting, wait)
                metrics.set_grpc_calls_waiting(waiting)
        finally:
            limit.note_waiting(0, 0.0)
            metrics.set_grpc_calls_waiting(0)

    def start(self, limit: ConcurrencyLimit, stopping: Callable[[], bool]) -> None:
        """Watch in a task of the running loop, if any listener can be read."""
        if self._listeners:
            task = asyncio.get_running_loop().create_task(
                self.watch(limit, stopping), name="grpc-backlog"
            )
            _WATCHING.add(task)  # the loop keeps only a weak reference
            task.add_done_callback(_WATCHING.discard)


def _counts(server_id: int) -> tuple[int, int, int] | None:
    """A server's calls started, succeeded and failed, as channelz counts them."""
    if _get_server is None:
        return None
    try:
        data: dict[str, Any] = json.loads(_get_server(server_id))["server"]["data"]
        return (
            int(data.get("callsStarted", 0)),
            int(data.get("callsSucceeded", 0)),
            int(data.get("callsFailed", 0)),
        )
    except (ValueError, KeyError, TypeError, RuntimeError):  # the server is gone
        return None
