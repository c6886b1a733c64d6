"""One record per request, filled in by whoever learns something, closed once.

The transport adapter opens a record (request id, protocol, method, route) around a
request and closes it with the status: closing records the request metrics and writes
one JSON access-log line. Which model version answered and how long each stage took are
known only deep in the data plane, so the data plane adds them to the current record
through a context variable instead of threading a parameter through every signature.
A record holds names and numbers only: image bytes never reach the log.
"""

from __future__ import annotations

import itertools
import json
import logging
import logging.handlers
import os
import queue
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

from service import metrics
from service.errors import CnnserveError

ACCESS_LOGGER = "cnnserve.access"
access_log = logging.getLogger(ACCESS_LOGGER)


@dataclass
class RequestRecord:
    request_id: str
    protocol: str
    method: str
    route: str = metrics.UNMATCHED_ROUTE
    model: str = ""
    version: str = ""
    timings: dict[str, float] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)


class _RequestIds:
    """Request ids: a random prefix per process and a counter, 32 hex digits like a
    uuid4 and as unlikely to repeat across processes, for a fraction of uuid4's cost
    (~1% of a worker's CPU under load). ``next`` on itertools.count is atomic."""

    def __init__(self) -> None:
        self.renew()
        # A forked child would repeat its parent's ids: it gets a prefix of its own.
        os.register_at_fork(after_in_child=self.renew)

    def renew(self) -> None:
        self.prefix = os.urandom(10).hex()
        self.counter = itertools.count()

    def __call__(self) -> str:
        return f"{self.prefix}{next(self.counter):012x}"


new_request_id = _RequestIds()


_current: ContextVar[RequestRecord | None] = ContextVar("cnnserve_request", default=None)


@contextmanager
def recording(record: RequestRecord) -> Iterator[RequestRecord]:
    """Make ``record`` the current one for the code (and tasks) run inside."""
    token = _current.set(record)
    try:
        yield record
    finally:
        _current.reset(token)


@contextmanager
def recorded(record: RequestRecord) -> Iterator[RequestRecord]:
    """For transports without a status of their own to read (gRPC): make ``record``
    current, then close it with 200, the error's HTTP status, or 500."""
    code = 500
    try:
        with recording(record):
            yield record
        code = 200
    except CnnserveError as exc:
        code = exc.http_status
        raise
    finally:
        finish(record, code)


def note_target(model: str, version: int | None) -> None:
    """The model (and version, once resolved) that the current request is for."""
    record = _current.get()
    if record is not None:
        record.model, record.version = model, "" if version is None else str(version)


def note_timings(timings: Mapping[str, float]) -> None:
    record = _current.get()
    if record is not None:
        record.timings.update(timings)


class _Line:
    """An access-log line's fields, serialised only when a handler writes it (on the
    log thread, not the request's)."""

    __slots__ = ("fields",)

    def __init__(self, fields: Mapping[str, object]) -> None:
        self.fields = fields

    def __str__(self) -> str:
        return json.dumps(self.fields, separators=(",", ":"))


def finish(record: RequestRecord, code: int | str) -> None:
    """The request was answered with ``code``: metrics and the access-log line."""
    seconds = time.perf_counter() - record.started
    metrics.observe_request(
        record.protocol, record.route, record.model, record.version, code, seconds
    )
    if access_log.isEnabledFor(logging.INFO):
        line = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "request_id": record.request_id,
            "protocol": record.protocol,
            "method": record.method,
            "route": record.route,
            "status": code,
            "model": record.model or None,
            "version": int(record.version) if record.version else None,
            "duration_ms": round(seconds * 1e3, 3),
            "timings_ms": {k: round(v * 1e3, 3) for k, v in record.timings.items()},
        }
        access_log.info("%s", _Line(line))


class _Handoff(logging.handlers.QueueHandler):
    """Puts the record on the queue as it is: the stock QueueHandler formats it first,
    on the caller's thread, which is the event loop here."""

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        return record


def configure_access_log(enabled: bool) -> Callable[[], None]:
    """JSON lines on stdout, one per request, whatever the root logger's format; worker
    processes started by uvicorn get no root configuration, so this does not rely on it.

    Lines are serialised and written by a log thread: the JSON encoding and the write to
    a pipe that may be slow to drain stay off the event loop (together ~4% of a worker's
    CPU, paid in request latency). Returns the function that writes what is still queued
    and stops the thread (called at shutdown)."""
    access_log.propagate = False
    access_log.setLevel(logging.INFO if enabled else logging.WARNING)
    if not enabled or access_log.handlers:
        return lambda: None
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    lines: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    listener = logging.handlers.QueueListener(lines, handler)
    handoff = _Handoff(lines)
    access_log.addHandler(handoff)
    listener.start()

    def stop() -> None:
        access_log.removeHandler(handoff)
        listener.stop()  # writes every line already queued

    return stop
