"""One record per request, filled in by whoever learns something, closed once.

The transport adapter opens a record (request id, protocol, method, route) around a
request and closes it with the status: closing records the request metrics and writes
one JSON access-log line. Which model version answered and how long each stage took are
known only deep in the data plane, so the data plane adds them to the current record
through a context variable instead of threading a parameter through every signature.
A record holds names and numbers only: image bytes never reach the log.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import queue
import random
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TypeVar

from service import metrics
from service.errors import ClientClosedRequest, CnnserveError, Overloaded, Unavailable

T = TypeVar("T")


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
    draw: float | None = None  # see request_draw
    images: int = 1  # images (or tensor rows) it carries, once known: see note_images


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

# A client's request id is echoed and logged as it came: visible ASCII only (no spaces,
# control or non-ASCII bytes, which were echoed re-encoded and reached the log).
_CLIENT_ID = re.compile(rb"[\x21-\x7e]+")


def client_request_id(sent: bytes) -> str:
    """The client's request id (its first 128 characters) when it is visible ASCII,
    else a fresh id."""
    sent = sent[:128]
    return sent.decode("ascii") if _CLIENT_ID.fullmatch(sent) else new_request_id()


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
def recorded(
    record: RequestRecord, stopping: Callable[[], bool] = lambda: False
) -> Iterator[RequestRecord]:
    """For transports without a status of their own to read (gRPC): make ``record``
    current, then close it with 200, the error's HTTP status, or 500. A cancelled call
    is the client's 499, unless the server was ``stopping``: then its stop cancelled it,
    past the grace period (a 503, Unavailable's)."""
    code = 500
    refusal = False
    try:
        with recording(record):
            yield record
        code = 200
    except CnnserveError as exc:
        code, refusal = exc.http_status, isinstance(exc, Overloaded)
        raise
    except asyncio.CancelledError:  # not a server error
        code = Unavailable.http_status if stopping() else ClientClosedRequest.http_status
        raise
    finally:
        finish(record, code, refusal=refusal)


def note_target(model: str, version: int | None) -> None:
    """The model (and version, once resolved) that the current request is for."""
    record = _current.get()
    if record is not None:
        record.model, record.version = model, "" if version is None else str(version)


def note_images(count: int) -> None:
    """How many images (or rows of a tensor) the current request carries: its weight in
    the concurrency limit's floor (service.concurrency)."""
    record = _current.get()
    if record is not None:
        record.images = count


def request_draw() -> float:
    """A uniform draw in [0, 1), one per request: every look-up a request makes (its
    room checks, then its inference) lands on the same side of the canary split. Fresh
    outside a request."""
    record = _current.get()
    if record is None:
        return random.random()
    if record.draw is None:
        record.draw = random.random()
    return record.draw


def note_timings(timings: Mapping[str, float]) -> None:
    record = _current.get()
    if record is not None:
        record.timings.update(timings)


def timed_encode(model: str, build: Callable[[], T]) -> tuple[T, float]:
    """Build an answer (REST's JSON, gRPC's message), timed as the request's encode
    stage: in the metrics and the access log; the seconds for Server-Timing."""
    started = time.perf_counter()
    answer = build()
    seconds = time.perf_counter() - started
    metrics.observe_stage(model, "encode", seconds)
    note_timings({"encode": seconds})
    return answer, seconds


def finish(
    record: RequestRecord, code: int | str, *, deferred: bool = False, refusal: bool = False
) -> None:
    """The request was answered with ``code``: metrics (``deferred``: written with the
    loop's others, metrics.TURN), and its access-log line queued (a ``refusal``, an
    overload 503, within the log's budget of them: :meth:`_LineWriter.put_refusal`)."""
    seconds = time.perf_counter() - record.started
    metrics.observe_request(
        record.protocol,
        record.route,
        record.model,
        record.version,
        code,
        seconds,
        deferred=deferred,
    )
    writer = _writer
    if writer is not None:
        if refusal:
            writer.put_refusal(time.time(), record, code, seconds)
        else:
            writer.put(time.time(), record, code, seconds)


# Lines are written from a template: under an open loop the log thread writes thousands
# of lines a second, taking the GIL from the event loop, and json's encoder, given the
# line as a dict, took 3.4 µs a line against ~1.5 µs. Strings go through json's own C
# escaping (ASCII, as json.dumps writes them), numbers through repr, as json writes them.
_STRING: Callable[[str], str] = json.encoder.encode_basestring_ascii
_stamp: tuple[int, str] = (-1, "")


def _time_text(at: float) -> str:
    global _stamp
    second = int(at)
    if _stamp[0] != second:
        _stamp = (second, time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(second)))
    return _stamp[1]


def _line(at: float, record: RequestRecord, code: int | str, seconds: float) -> str:
    """The request's JSON line: time, request_id, protocol, method, route, status, model
    and version (null when none resolved), duration_ms and timings_ms."""
    status = _STRING(code) if isinstance(code, str) else repr(int(code))
    model = _STRING(record.model) if record.model else "null"
    version = repr(int(record.version)) if record.version else "null"
    timings = ",".join(f"{_STRING(k)}:{round(v * 1e3, 3)!r}" for k, v in record.timings.items())
    return (
        f'{{"time":{_STRING(_time_text(at))},"request_id":{_STRING(record.request_id)},'
        f'"protocol":{_STRING(record.protocol)},"method":{_STRING(record.method)},'
        f'"route":{_STRING(record.route)},"status":{status},"model":{model},'
        f'"version":{version},"duration_ms":{round(seconds * 1e3, 3)!r},'
        f'"timings_ms":{{{timings}}}}}'
    )


def _unlogged_line(at: float, protocol: str, route: str, code: int | str, count: int) -> str:
    """The line that stands for ``count`` refusals past the log's budget."""
    status = _STRING(code) if isinstance(code, str) else repr(int(code))
    return (
        f'{{"time":{_STRING(_time_text(at))},"protocol":{_STRING(protocol)},'
        f'"route":{_STRING(route)},"status":{status},"not_logged":{count},'
        f'"why":"overload refusals past CNNSERVE_ACCESS_LOG_REFUSALS_PER_SECOND a second; '
        f'cnnserve_requests_total counts them all"}}'
    )


# How often the log thread writes what requests queued: one write per period.
FLUSH_SECONDS = 0.05
# How often a line says how many refusals were not logged (per route and status).
UNLOGGED_SECONDS = 1.0
_Entry = tuple[float, RequestRecord, int | str, float]


class _LineWriter:
    """The access log's thread: every FLUSH_SECONDS it turns the queued requests into
    JSON lines and writes them to stdout (sys.stdout as it is then: a replaced or
    captured stream too) in one write; the last ones when stopped.

    A request only queues a tuple (its record is not touched after it is finished):
    the JSON encoding, the logging module's record, and the write to a pipe that may be
    slow to drain all stay off the request path."""

    def __init__(self, refusals_per_second: int = 0) -> None:
        self._entries: queue.SimpleQueue[_Entry] = queue.SimpleQueue()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="access-log", daemon=True)
        self._refusal_budget = refusals_per_second
        self._refusal_second = -1
        self._refusals_logged = 0
        self._unlogged_lock = threading.Lock()
        self._unlogged: dict[tuple[str, str, int | str], int] = {}  # protocol, route, code
        self._unlogged_said = time.monotonic()

    def put(self, at: float, record: RequestRecord, code: int | str, seconds: float) -> None:
        self._entries.put((at, record, code, seconds))

    def put_refusal(
        self, at: float, record: RequestRecord, code: int | str, seconds: float
    ) -> None:
        """An overload refusal's line, while this second's budget of them lasts; past it
        the refusal is counted, and the log thread writes the count once a second.
        Under 4x overload a worker refuses thousands a second: a line each was ~10% of
        a refusal's CPU (the loop's share and the log thread's), i.e. of what it has
        left for the requests it admits, and ~1 MB/s of log a worker. The count of the
        second is the loop's alone (one thread), so it takes no lock."""
        budget = self._refusal_budget
        if budget:
            second = int(at)
            if second != self._refusal_second:
                self._refusal_second, self._refusals_logged = second, 0
            if self._refusals_logged >= budget:
                key = (record.protocol, record.route, code)
                with self._unlogged_lock:  # the log thread takes the counts
                    self._unlogged[key] = self._unlogged.get(key, 0) + 1
                return
            self._refusals_logged += 1
        self._entries.put((at, record, code, seconds))

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stopping.wait(FLUSH_SECONDS):
            self._write()
        self._write(last=True)

    def _write(self, *, last: bool = False) -> None:
        lines = []
        while True:
            try:
                lines.append(_line(*self._entries.get_nowait()))
            except queue.Empty:
                break
        now = time.monotonic()
        if last or now - self._unlogged_said >= UNLOGGED_SECONDS:
            self._unlogged_said = now
            with self._unlogged_lock:
                unlogged, self._unlogged = self._unlogged, {}
            at = time.time()
            lines.extend(
                _unlogged_line(at, protocol, route, code, count)
                for (protocol, route, code), count in unlogged.items()
            )
        if lines:
            try:
                sys.stdout.write("\n".join(lines) + "\n")
                sys.stdout.flush()
            except (OSError, ValueError):  # stdout closed or gone: nowhere to write
                pass


_writer: _LineWriter | None = None


def configure_access_log(enabled: bool, refusals_per_second: int = 0) -> Callable[[], None]:
    """JSON lines on stdout, one per request (see :class:`_LineWriter`), when
    ``enabled``; overload refusals up to ``refusals_per_second`` a line each (0: all),
    the rest counted in a line a second. Returns the function that writes what is still
    queued and stops the log thread (called at shutdown)."""
    global _writer
    if not enabled or _writer is not None:
        return lambda: None
    writer = _writer = _LineWriter(refusals_per_second)
    writer.start()

    def stop() -> None:
        global _writer
        if _writer is writer:
            _writer = None
        writer.stop()  # writes every line already queued

    return stop
