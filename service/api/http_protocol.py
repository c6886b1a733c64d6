"""uvicorn's HTTP/1.1 protocol (httptools) with a header read timeout, refusals answered
at the headers, and one write per response.

uvicorn times out idle keep-alive connections between requests, but not a connection
that sends nothing after connecting, nor one that sends a request's headers a byte at
a time (slowloris): either holds one of the worker's connections
(``max_connections``) for as long as the client likes, and a few thousand of them shut
everyone else out. Here a request's headers must be complete within
``header_read_timeout_seconds`` of the connection opening or of the request's first
byte; if not, the client gets a 408 (``request_timeout``) and the connection is closed.
The body has its own timeout (RequestGuard, ``body_read_timeout_seconds``).

httptools holds a request's line and headers in memory until they end, with no bound
of its own: one client streaming header bytes grew a worker by 300 MB in 0.6 s. Here
they may take ``max_header_bytes``; beyond that the client gets a 431
(``headers_too_large``) and the connection is closed. Only data that arrived while the
same request's headers were open is counted, so a body is never mistaken for headers;
the bound is on what is held, not an exact header size: a header block that arrives
complete in one read passes (reads are parsed 32 KiB at a time and the piece in which
the headers end is not counted: up to 32 KiB over the limit), and when a read holds the end of one
request and the start of the next, the count may lag by up to that read.

A chunked body may end with trailer fields, which httptools hands over as headers, with
no bound either: 1.5 GB of them grew a worker from 117 MB to 1.8 GB, kept after. They
are dropped (nothing here reads them) and the bytes that arrive while they are open
count against the same ``max_header_bytes`` (a 431, the connection closed); as for
headers, the read that holds a body's last chunk and the first trailer bytes is not
counted.

Pipelined requests (sent before the answers to earlier ones) wait in uvicorn's queue,
which has no bound either: uvicorn resumes reading after every answer and parses all
that arrived, so one connection pipelining tiny requests without reading the answers
grew a worker from 101 MB to 1 GB in seconds. Here at most ``MAX_PIPELINED`` parsed
requests wait behind the one being answered: the rest of what arrived is held, unparsed,
reading stays paused, and both go on as answers go out. A deep-pipelining client is
slowed, never refused.

Under overload, a request its worker has no place for is refused here, as soon as its
headers are parsed (:class:`service.api.http.EarlyRefusal` decides and writes the
answer's headers and body, the same as RequestGuard's), without an ASGI scope, task or
middleware: a little over half the CPU of a refusal through the app, which lets the
worker answer refusals at a pace that keeps them fast. The connection knows whether its
client is retrying a refusal at once (service.concurrency.ConnectionRefusals): only
then does the answer wait for the worker's pace. Reading pauses until the answer is
sent; the refused body is then read and dropped, and the connection goes on.

While the worker has no place left, a read that holds one whole request of the plainest
shape (service.api.plain_request: the common case of a load generator, an SDK or a
proxy) between requests on an idle connection takes the shed path: refused as above,
with the same checks, answer, pace, metrics and log line, but without the HTTP parser's
callbacks and uvicorn's bookkeeping around them, and answered at once rather than on the
loop's next turn. With the refusal's metrics written every 10 ms (metrics.TurnTally) and
keep-alive's one timer a connection (:meth:`GatewayHttpProtocol._idle`), a refusal's
CPU went from 0.107-0.117 to 0.090-0.095 ms (3 alternating pairs, 12-07), the shed path
~9% of it. A request of any other shape, or one that may have a place, is parsed as
before; tests/integration/test_shed_path.py holds the answers of both to each other.

Both reach the protocol through the app's lifespan state (ASGI "state", which uvicorn
hands to every connection), so that they come from the one Settings object and the
worker's one concurrency limit in single-process and multi-worker runs alike.

A response goes out in one write: uvicorn writes its head (at ``http.response.start``)
and its body separately, two send calls and, over loopback or with TCP_NODELAY, two
segments for the client to read; :class:`JoinedWrites` holds the head until the body
follows (measured, 8 alternating pairs: req/s +3% by the medians, +7% by the
median of the pairs' ratios, higher in 6 of 8; CPU per request -2%).
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any, cast

import httptools
from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.httptools_impl import (
    STATUS_LINE,
    HttpToolsProtocol,
    RequestResponseCycle,
)

from service import metrics
from service.api.direct_classify import CLIENT_CLOSED, Answer, DirectClassify, DirectRequest
from service.api.http import (
    ARRIVED,
    CONNECTION_MOVABLE,
    CONNECTION_REFUSALS,
    MOVE_HEADER,
    EarlyRefusal,
    Refused,
    closes,
    error_response,
    header_value,
    moves,
    stopped_midway,
)
from service.api.plain_request import PlainRequest, plain_request
from service.concurrency import ConnectionRefusals
from service.config import Settings
from service.errors import CnnserveError, HeadersTooLarge, InvalidRequest, RequestTimeout

log = logging.getLogger(__name__)

# The keys in the lifespan state (service.api.app): the header timeout in seconds, and
# the worker's EarlyRefusal.
HEADER_TIMEOUT_STATE = "cnnserve.header_read_timeout_seconds"
BODY_TIMEOUT_STATE = "cnnserve.body_read_timeout_seconds"
# Without the app's state: the setting's own default.
DEFAULT_BODY_SECONDS: float = Settings.model_fields["body_read_timeout_seconds"].default
SEND_TIMEOUT_STATE = "cnnserve.send_timeout_seconds"
DEFAULT_SEND_SECONDS: float = Settings.model_fields["send_timeout_seconds"].default
HEADER_LIMIT_STATE = "cnnserve.max_header_bytes"
BODY_BUDGET_STATE = "cnnserve.max_buffered_body_bytes"
# How long a new connection's first request may have waited for the worker to accept it
# (the kernel's accept queue) and still be taken (service.api.http.backlog_refusal): the
# queue-wait budget, what an admitted request may wait inside.
ACCEPT_WAIT_STATE = "cnnserve.accept_wait_limit"
# CNNSERVE_PROBE_PORT: its connections carry probes and scrapes only, never refused or
# served here (the app answers them, and 404s anything else: RequestGuard).
PROBE_PORT_STATE = "cnnserve.probe_port"
_TCP_INFO_BYTES = 136  # struct tcp_info up to tcpi_bytes_received (Linux 4.1 on)
_LAST_DATA_RECV = 52  # its tcpi_last_data_recv: ms since the kernel last got data
_BYTES_RECEIVED = 128  # its tcpi_bytes_received (u64)


class BufferedBodies:
    """The request body bytes a worker holds, received and not yet answered (one count
    per worker process: every connection's protocol adds and takes back its own)."""

    held = 0


BUFFERED = BufferedBodies()


class ProbeConnections:
    """The probe port's open connections in a worker: uvicorn counts them with the REST
    port's, and CNNSERVE_MAX_CONNECTIONS is the REST port's (idle probe-port connections,
    which need no key, made REST refuse requests: an outside audit)."""

    open = 0


PROBE_CONNECTIONS = ProbeConnections()
# How long new connections' requests must keep waiting over the limit to be accepted,
# one after another, before they are refused: a worker behind on its connections, not
# one stall (a load holding the event loop, a collection) that every connection queued
# during it waited out (a test's request was refused after 156 ms of such a stall).
# CoDel's interval.
BACKLOG_SECONDS = 0.1


class AcceptBacklog:
    """Whether a worker is behind on accepting its connections (one per worker)."""

    def __init__(self) -> None:
        self._above_since: float | None = None  # first of the waits over the limit
        self._last = 0.0  # the last wait over the limit

    def behind(self, waited: float, limit: float, now: float) -> bool:
        """Note a new connection's first request that waited ``waited`` seconds to be
        accepted; whether such waits have stayed over ``limit`` for BACKLOG_SECONDS,
        each no more than that after the one before."""
        if waited <= limit:
            self._above_since = None
            return False
        if self._above_since is None or now - self._last > BACKLOG_SECONDS:
            self._above_since = now
        self._last = now
        return now - self._above_since >= BACKLOG_SECONDS


BACKLOG = AcceptBacklog()
# Without the app's state (another server's lifespan): the settings' own defaults.
DEFAULT_MAX_HEADER_BYTES: int = Settings.model_fields["max_header_bytes"].default
DEFAULT_MAX_BODY: int = Settings.model_fields["max_body_bytes"].default
EARLY_REFUSAL_STATE = "cnnserve.early_refusal"
# The worker's DirectClassify (absent: every request goes the ASGI way).
DIRECT_CLASSIFY_STATE = "cnnserve.direct_classify"


# Parsed requests that may wait behind the one being answered on a connection, and the
# most bytes parsed at once (what one parse can add to that queue is bounded by it).
MAX_PIPELINED = 16
FEED_BYTES = 32768  # a photo request (~10 KiB) is parsed in one go
# At shutdown, a connection with nothing to answer has this long to begin a request (a
# client that connected, or kept the connection alive, to send one: most do within a
# millisecond).
FIRST_REQUEST_GRACE_SECONDS = 1.0


class HeldFlow(FlowControl):
    """uvicorn's flow control, holding what arrived but may not be parsed yet (the
    pipeline is full): reading stays paused while anything is held (uvicorn resumes
    reading after each answer and on each body read)."""

    held: bytearray | None = None

    def __init__(self, transport: asyncio.Transport) -> None:
        # uvicorn's, less its own Event until writing first pauses: an Event (and the
        # deque in it) for each connection was ~0.85 KB of one's ~9.3 (tracemalloc).
        self._transport = transport
        self.read_paused = False
        self.write_paused = False
        self._is_writable_event = _WRITABLE

    def resume_reading(self) -> None:
        if self.held is None:
            super().resume_reading()

    def pause_writing(self) -> None:
        if not self.write_paused:
            self.write_paused = True
            self._is_writable_event = asyncio.Event()  # cleared: drain() waits on it

    def resume_writing(self) -> None:
        if self.write_paused:
            self.write_paused = False
            self._is_writable_event.set()


# Every connection's writable event while writing is not paused: set, never cleared (a
# paused connection gets one of its own), so drain() returns at once and it binds to no
# event loop.
_WRITABLE = asyncio.Event()
_WRITABLE.set()


class Unreadable(httptools.HttpParserError):
    """A request refused as malformed in these words (raised in a parser callback)."""


class UnsupportedVersion(Unreadable):
    """A request line with an HTTP version other than 1.0 and 1.1 (or none: HTTP/0.9)."""


class TargetTooLong(Exception):
    """A request target over what is parsed (raised in a parser callback)."""


# httptools' URL parser keeps offsets in 16 bits: a longer target failed to parse, a
# vague 400 ("its request line or a header cannot be read").
MAX_TARGET_BYTES = 65_535


def headers_too_large(limit: int) -> HeadersTooLarge:
    return HeadersTooLarge(
        f"the request line and headers are over {limit} bytes; send fewer or shorter "
        "headers (the limit is CNNSERVE_MAX_HEADER_BYTES)"
    )


def target_too_long() -> HeadersTooLarge:
    return HeadersTooLarge(
        f"the request target (the URL) is over {MAX_TARGET_BYTES} bytes, the most that is "
        "parsed whatever CNNSERVE_MAX_HEADER_BYTES says; send the data in the body"
    )


def trailers_too_large(limit: int) -> HeadersTooLarge:
    return HeadersTooLarge(
        f"the trailer fields after the chunked body are over {limit} bytes; send none "
        "(they are not read; the limit is CNNSERVE_MAX_HEADER_BYTES)"
    )


def timeout_error(seconds: float) -> RequestTimeout:
    return RequestTimeout(
        f"the request headers did not arrive within {seconds:g} s of the connection or of "
        "the request's first byte; send them at once"
    )


class JoinedWrites:
    """The connection's transport, writing a response's head and its body as one.

    A write that is a response head alone (a final status line, ending with the blank
    line) is held and sent with the next write, which is its body; a head whose body
    never comes in this step (HEAD, a streamed body that starts later) goes out on the
    loop's next turn. Closing sends what is held first. Every write on the connection
    goes through here, so the order on the wire is the order written.
    """

    # One a connection: slots, not a dict (~130 B a connection less, by tracemalloc).
    __slots__ = (
        "_closing",
        "_defer_close",
        "_held",
        "_loop",
        "_transport",
        "answered",
        "get_extra_info",
        "get_write_buffer_size",
        "is_closing",
        "pause_reading",
        "resume_reading",
        "status",
    )

    def __init__(
        self,
        transport: asyncio.Transport,
        loop: asyncio.AbstractEventLoop,
        defer_close: Callable[[], bool] | None = None,
        closing: Callable[[], None] | None = None,
    ) -> None:
        self._transport = transport
        self._loop = loop
        self._held: bytes | None = None
        # Asked before closing: True when the protocol closes later (a lingering close).
        self._defer_close = defer_close
        # Told after closing: the transport then waits for its buffer to drain.
        self._closing = closing
        self.status = b""  # the status of the last response head written
        self.answered = b""  # the same, until the protocol reads it (on_response_complete)
        # The transport's own, bound here: asked ~5 times a request, through __getattr__
        # (a failed lookup first) they took, with a refusal's two `Connection: close`
        # tests and its counter's series lookup, ~11% of a refusal's CPU
        # (docs/failure-modes.md, "Open-loop load: refusals let go").
        self.is_closing = transport.is_closing
        self.get_extra_info = transport.get_extra_info
        self.pause_reading = transport.pause_reading
        self.resume_reading = transport.resume_reading
        self.get_write_buffer_size = transport.get_write_buffer_size

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._transport.is_closing():
            # The client left (or stopped reading and was dropped) while an answer was
            # waiting for the send buffer to drain; uvicorn marks only the newest
            # pipelined request disconnected, and uvloop raises on a closed transport.
            self._held = None
            return
        head = data[:9] == b"HTTP/1.1 "
        if head:
            self.status = self.answered = bytes(data[9:12])
        held = self._held
        if held is not None:
            self._held = None
            self._transport.write(held + data)
        elif head and data[9:10] != b"1" and data[-4:] == b"\r\n\r\n":
            self._held = bytes(data)
            self._loop.call_soon(self.flush)
        else:
            self._transport.write(data)

    def flush(self) -> None:
        held = self._held
        self._held = None
        # On the next turn the client may have gone: a closed transport refuses writes.
        if held is not None and not self._transport.is_closing():
            self._transport.write(held)

    def close(self) -> None:
        if self._defer_close is not None and self._defer_close():
            return
        self.flush()
        self._transport.close()
        if self._closing is not None:
            self._closing()

    def abort(self) -> None:
        self._held = None
        self._transport.abort()

    def __getattr__(self, name: str) -> Any:  # everything else is the transport's own
        return getattr(self._transport, name)


# The end of a header block (CRLF or bare LF lines), or an Upgrade header in it (its
# name begins one byte into the match).
_UPGRADE_OR_END = re.compile(rb"\r?\n\r?\n|\nupgrade[ \t]*:", re.IGNORECASE)
_UPGRADE = re.compile(rb"upgrade[ \t]*:", re.IGNORECASE)
_RENAMED = b"x-upgrd"  # as long as "upgrade"


def without_upgrade(data: bytes | memoryview, line_start: bool = False) -> bytes | memoryview:
    """``data`` (which begins inside a header block) with the block's Upgrade headers
    renamed to X-Upgrd, so that the request is parsed as a plain HTTP/1.1 one.

    The gateway upgrades to nothing (no websockets, no h2c), and RFC 9110 lets a server
    ignore Upgrade; but httptools takes whatever follows such a request's headers for
    the new protocol's bytes, so uvicorn ran it with an empty body and dropped what was
    pipelined after it (every ``curl --http2`` to http:// sends ``Upgrade: h2c``).
    ``line_start``: the read before ended a header line, so an Upgrade header may open
    this one. A name split between two reads is held back (:func:`_upgrade_name_start`)
    and parsed with the next read, whole."""
    first = line_start and _UPGRADE.match(data) is not None
    if not first and not _may_upgrade(data):
        return data
    found = _UPGRADE_OR_END.search(data)
    if not first and (found is None or not found.group().endswith(b":")):
        return data
    edited = bytearray(data)
    if first:
        edited[: len(_RENAMED)] = _RENAMED
    while found is not None and found.group().endswith(b":"):
        edited[found.start() + 1 : found.start() + 1 + len(_RENAMED)] = _RENAMED
        found = _UPGRADE_OR_END.search(edited, found.end())
    return bytes(edited)


def _may_upgrade(data: bytes | memoryview) -> bool:
    """Whether a line of ``data``'s header block (up to its end, or all of it) may be
    an Upgrade header: the search for one, case-blind, took ~3% of a refusal's CPU,
    and nearly every request has none."""
    end = _BLOCK_END.search(data)
    block = data if end is None else data[: end.start()]
    return b"\nupgrade" in bytes(block).lower()


_BLOCK_END = re.compile(rb"\n\r?\n")
_NAME_START = re.compile(rb"(?:u|up|upg|upgr|upgra|upgrad|upgrade[ \t]*)\Z", re.IGNORECASE)


def _upgrade_name_start(data: bytes | memoryview, line_start: bool) -> int:
    """How many bytes at the end of ``data`` (inside a header block) may begin an
    Upgrade header's name, its colon still to come: 0, or the last line's length."""
    tail = bytes(data[-16:])
    newline = tail.rfind(b"\n")
    if newline < 0 and not (line_start and len(data) < 16):
        return 0
    fragment = tail[newline + 1 :]
    if not fragment or not _NAME_START.match(fragment):
        return 0
    # Only inside headers still open: after a block's end come a body's bytes (its last
    # one "U" would wait for a read that never comes) or a request we cannot place.
    return 0 if _BLOCK_END.search(data) else len(fragment)


class GatewayHttpProtocol(HttpToolsProtocol):
    """What uvicorn runs per connection (``http=`` in service.server).

    One timer per connection, not per request: a request only notes when its headers
    are due; the timer, when it fires, closes the connection if the headers it waits for
    are late, re-arms for a request whose headers are not due yet, and lapses if none is
    awaited (the next request arms it again)."""

    _header_timer: asyncio.TimerHandle | None = None
    _headers_due: float | None = None
    _header_seconds: float = 0.0
    _early_refusal: EarlyRefusal | None = None
    _max_connections: int | None = None  # CNNSERVE_MAX_CONNECTIONS, checked here
    _taken_over = True  # taken on while the worker was over it (set as it is made)
    _dropping = False  # the current request was refused here: its body is dropped
    _max_header_bytes = DEFAULT_MAX_HEADER_BYTES
    _in_headers = False  # the current request's line and headers have not ended yet
    _header_bytes = 0  # of them, counted from whole reads inside them
    _requests = 0  # requests begun on the connection: tells a read inside one request
    _hosts = 0  # the current request's Host header lines
    _in_message = False  # between a request's first byte and its end
    _close_at_end = False  # close once the answered request's body is in (_linger)
    _no_linger = False  # the next close is at once (a timeout, a shutdown, a lingering end)
    # A chunk header was parsed and no body byte since: any byte that comes before one
    # is in the trailer section (only the last chunk, of size 0, has no data).
    _after_last_chunk = False
    _bodies = 0  # body pieces parsed on the connection: tells a read that held one
    _trailer_bytes = 0  # of the current request's trailer section, from whole reads
    flow: HeldFlow
    _refusal: tuple[Refused, bool, int | None, asyncio.TimerHandle | None] | None = None  # unsent
    _direct: DirectClassify | None = None
    _receiving: DirectRequest | None = None  # a direct request whose body is arriving
    _body_timer: asyncio.TimerHandle | None = None
    _body_seconds = DEFAULT_BODY_SECONDS
    _unread_timer: asyncio.TimerHandle | None = None  # the rest of an answered body
    _unreadable = False  # the parser refused what arrived: the connection is done
    _send_seconds = DEFAULT_SEND_SECONDS
    _send_timer: asyncio.TimerHandle | None = None  # armed while the send buffer is full
    _line_start = False  # the last read inside a header block ended a line
    _held_name = b""  # a header line's first bytes, held to be parsed with the next read
    _client_done = False  # the client half-closed after whole requests: answer, then close
    _shutting_down = False  # the server stops: answer what was begun, then close
    _grace_timer: asyncio.TimerHandle | None = None  # for a first request, at shutdown
    _stop_timer: asyncio.TimerHandle | None = None  # a direct body's, at shutdown
    _lost = False  # connection_lost was called
    _body_bytes = 0  # of the current request's body, parsed so far
    _buffered = 0  # body bytes this connection holds in BUFFERED, until they are answered
    _declared = False  # the current request's Content-Length is counted in _buffered
    _waited = 0.0  # seconds its first request had waited in the kernel when it was accepted
    _charging = False  # the current request was refused: its body's bytes cost the pace
    _probe_only = False  # a connection to CNNSERVE_PROBE_PORT (set as it is made)
    _idle_since: float | None = None  # waiting for a request since (keep-alive's timeout)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._accept_wait_limit: float | None = self.app_state.get(ACCEPT_WAIT_STATE)
        if self._accept_wait_limit:
            self._waited = kernel_wait(transport)
        self._writes = JoinedWrites(transport, self.loop, self._linger, self._closing_unsent)
        self._tls = transport.get_extra_info("sslcontext") is not None
        super().connection_made(cast(asyncio.Transport, self._writes))
        probe_port = self.app_state.get(PROBE_PORT_STATE)
        self._probe_only = (
            bool(probe_port) and self.server is not None and (self.server[1] == probe_port)
        )
        if self._probe_only:
            PROBE_CONNECTIONS.open += 1
        self.flow = HeldFlow(self.transport)
        self._header_seconds = self.app_state.get(HEADER_TIMEOUT_STATE) or 0.0
        self._max_header_bytes = self.app_state.get(HEADER_LIMIT_STATE) or DEFAULT_MAX_HEADER_BYTES
        self._body_seconds = self.app_state.get(BODY_TIMEOUT_STATE) or DEFAULT_BODY_SECONDS
        self._send_seconds = self.app_state.get(SEND_TIMEOUT_STATE) or DEFAULT_SEND_SECONDS
        self._early_refusal = self.app_state.get(EARLY_REFUSAL_STATE)
        self._body_budget: int | None = self.app_state.get(BODY_BUDGET_STATE)
        if self._early_refusal is not None:
            # The connection limit is checked here (on_headers_complete), not by uvicorn:
            # its refusal was a plain-text 503, uncounted, probes refused too, and it
            # counted the connection being served (a limit of N served N - 1).
            self._max_connections, self.limit_concurrency = self.limit_concurrency, None
            # Only a connection the worker took on over the limit is refused for it: a
            # client kept alive from before (a pool, a probe) was refused and closed
            # along with the flood of new ones that put the worker over it.
            self._taken_over = self._over_connections() is not None
        self._direct = self.app_state.get(DIRECT_CLASSIFY_STATE)
        self._refusals = (
            ConnectionRefusals()
            if self._early_refusal is None
            else self._early_refusal.admission.concurrency.connection(
                self.client[0] if self.client else None
            )
        )
        self._expect_headers()  # the first request's headers are due from now

    def on_message_begin(self) -> None:
        if self._refusal is not None:  # a pipelined request: answer the refused one first
            self._send_refusal()
        self._new_message()
        self._in_headers = self._in_message = True
        super().on_message_begin()
        self._expect_headers()

    def data_received(self, data: bytes) -> None:
        if self._unreadable:  # after a parse error nothing more is read
            return
        if self.flow.held is not None:  # arrived before reading paused: parsed later, in order
            self.flow.held += data
            return
        if len(data) <= FEED_BYTES and not self.pipeline:  # the usual case: one parse
            if self._full() and self._shed(data):
                return
            self._parse(data)
        else:
            self._feed(data)

    def _full(self) -> bool:
        """Whether the worker holds as many requests as its limit lets it: only then may
        a request be refused for want of a place (it may still borrow a sibling's)."""
        refusal = self._early_refusal
        if refusal is None:
            return False
        concurrency = refusal.admission.concurrency
        return concurrency.in_flight >= concurrency.limit

    def _shed(self, data: bytes) -> bool:
        """The shed path: ``data``, read between requests on an idle connection and a
        whole plain request (service.api.plain_request), refused for want of a place
        without the HTTP parser, as on_headers_complete would refuse it (the same
        checks, answer, pace, metrics and log line), its body dropped. False (nothing
        done) to parse it as any other: it has a place, is over another of the
        worker's limits, is not a limited route, or is not of that shape."""
        early = self._early_refusal
        if (
            early is None
            or self._probe_only
            or self._in_message
            or self._refusal is not None
            or self._held_name
            or self._shutting_down
            or self._client_done
            or self._answering()
            or self.transport.is_closing()
        ):
            return False
        if self._over_connections() is not None:
            return False
        request = plain_request(
            data, self._max_header_bytes, min(self._max_header_bytes, MAX_TARGET_BYTES)
        )
        if request is None:
            return False
        first = self._requests == 0
        declared = min(request.body_bytes, self._max_body())
        if self._bodies_over(declared) is not None or self._accept_waited(first):
            return False
        waited = self._waited if first else 0.0
        retrying = self._retrying(first, waited)
        raw_path, _, query = request.target.partition(b"?")
        refused = early(
            request.method,
            raw_path.decode("latin-1"),
            query,
            request.headers,
            retrying,
            queued=waited,
            first=first,
            room=False,  # one it has a place for is parsed, and checked then
        )
        if refused is None:
            return False
        self._read_whole(request)
        self._refuse(refused, keep_alive=True)
        return True

    def _read_whole(self, request: PlainRequest) -> None:
        """The connection's state as the parser leaves it once ``request`` is read, from
        its start (on_message_begin) to its end (on_message_complete)."""
        self._unset_keepalive_if_required()  # as a read does (_parse)
        self._new_message()
        self._hosts = 1
        self._headers_due = None
        self._in_headers = self._in_message = False
        self.url, self.headers, self.expect_100_continue = request.target, request.headers, False
        self._body_bytes = request.body_bytes
        if request.body_bytes:
            self._bodies += 1

    def _new_message(self) -> None:
        """A request begins on the connection: what was noted of the one before goes."""
        self._dropping = self._declared = self._charging = self._after_last_chunk = False
        self._body_bytes = self._header_bytes = self._trailer_bytes = 0
        self._requests += 1
        self._hosts = 0

    def _feed(self, data: bytes | bytearray) -> None:
        """Parse ``data`` a slice at a time while the pipeline has room; hold the rest."""
        view = memoryview(data)
        while view and not self.transport.is_closing():
            if len(self.pipeline) >= MAX_PIPELINED:
                self.flow.held = bytearray(view)
                self.flow.pause_reading()
                return
            self._parse(view[:FEED_BYTES])
            view = view[FEED_BYTES:]

    def _parse(self, data: bytes | memoryview) -> None:
        if self._unreadable:  # a parse error earlier in this read (_feed)
            return
        # All of a read is header bytes if it began inside this request's headers, or
        # between requests and a request's headers are still open after it.
        inside: int | None = self._requests
        if not self._in_headers:
            inside = None if self._in_message else self._requests + 1
        if inside is not None:  # the read begins with (the rest of) a header block
            line_start = self._in_headers and self._line_start
            if self._held_name:  # the start of a header line, held from the last read
                data, line_start = self._held_name + bytes(data), True
                self._held_name = b""
            data = without_upgrade(data, line_start)
            held = _upgrade_name_start(data, line_start)
            if held:  # perhaps an Upgrade header's name, split between two reads
                data, self._held_name = data[:-held], bytes(data[-held:])
        self._line_start = data[-1:] == b"\n"
        trailing = self._after_last_chunk and self._in_message
        bodies, request = self._bodies, self._requests
        # uvicorn's data_received, but a parse error is ours to answer (_malformed).
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)  # any buffer (a memoryview slice too)
        except httptools.HttpParserCallbackError as exc:  # e.g. a target uvicorn cannot parse
            cause = exc.__context__
            if isinstance(cause, TargetTooLong):
                self._unreadable = True  # the parser stopped: nothing more is read
                self._headers_too_large(target=True)
                return
            if cause is not None and not isinstance(cause, httptools.HttpParserError):
                log.error("an HTTP parser callback failed", exc_info=cause)  # ours, not theirs
            if isinstance(cause, Unreadable):
                self._malformed(str(cause))
            else:
                self._malformed("its request line or a header cannot be read")
            return
        except httptools.HttpParserError as exc:
            reason = str(exc) or type(exc).__name__
            if "PRI" in reason:  # HTTP/2's connection preface
                reason = "HTTP/2 is not spoken on this port: send HTTP/1.1 (gRPC has its own)"
            elif bytes(data[:2]) == b"\x16\x03":  # a TLS handshake record
                reason = "a TLS handshake on a port that speaks plain HTTP: use http://"
            self._malformed(reason)
            return
        except httptools.HttpParserUpgrade:  # CONNECT, or an Upgrade split between reads
            self._malformed("CONNECT and protocol upgrades are not supported")
            return
        if self.transport.is_closing():  # a parse error was answered, or the client left
            return
        if self._receiving is not None and self._body_timer is None:
            # A direct request's body is still to come (the usual one came in this read).
            assert self._direct is not None
            self._body_timer = self.loop.call_later(
                self._direct.admission.body_read_timeout_seconds,
                self._body_late,
                self._receiving,
            )
        if self._in_headers and self._requests == inside:
            self._header_bytes += len(data)
            if self._header_bytes > self._max_header_bytes:
                self._headers_too_large()
        elif trailing and self._in_message and (self._bodies, self._requests) == (bodies, request):
            # All of this read was trailer fields, and they are still open.
            self._trailer_bytes += len(data)
            if self._trailer_bytes > self._max_header_bytes:
                self._trailers_too_large()

    def on_response_complete(self) -> None:
        # Read once: an answer never written (its client gone) leaves none to read. The
        # body counted is the answered request's unless another has begun behind it.
        answered, self._writes.answered = self._writes.answered, b""
        if not self._in_message:  # its body is done with (one still coming is held)
            self._release_buffered()
        if answered == b"503" and not self.pipeline and not self._in_headers:
            self._refused_body()
        self._next_request()
        if self.transport.is_closing():
            return
        if (self._client_done or self._shutting_down) and self._nothing_to_answer():
            # The client half-closed, or the server stops: the last answer is out.
            self._no_linger = self._no_linger or self._shutting_down
            self.transport.close()
            return
        # Answered before its body was in (a 404, 401, 413 or 503 at the headers): what
        # is left is read and dropped, but uvicorn's keep-alive timer is cancelled by
        # every read and armed again only after an answer, so a client dribbling it (or
        # stopping) would hold the connection with no timer at all.
        unread = self._in_message and self._receiving is None and not self._answering()
        if unread and self._unread_timer is None:
            self._unread_timer = self.loop.call_later(self._body_seconds, self._unread_late)
        held = self.flow.held
        if held is None:
            return
        self.flow.held = None
        self._feed(held)  # holds again what the pipeline has no room for
        if self.flow.held is None:
            self.flow.resume_reading()

    def _next_request(self) -> None:
        """uvicorn's on_response_complete: the next pipelined request starts, or the
        connection waits for one (keep-alive's timeout runs)."""
        self.server_state.total_requests += 1
        if self.transport.is_closing():
            return
        self.flow.resume_reading()
        if self.pipeline:
            self._idle_since = None
            cycle, app = self.pipeline.pop()
            self._start_asgi_task(cycle, app)
        else:
            self._idle()

    def _unset_keepalive_if_required(self) -> None:
        """Something came: the connection is not idle. uvicorn cancelled its keep-alive
        timer at every read and made a new one after every answer, two changes to the
        loop's timers a request (~2 µs of a refusal's ~100); here a connection's one
        timer lapses when it finds the connection busy (:meth:`_keep_alive_due`)."""
        self._idle_since = None

    def _idle(self) -> None:
        """The connection waits for its next request: closed if none comes within
        keep-alive's timeout (CNNSERVE_KEEP_ALIVE_SECONDS)."""
        self._idle_since = self.loop.time()
        if self.timeout_keep_alive_task is None:
            self.timeout_keep_alive_task = self.loop.call_later(
                self.timeout_keep_alive, self._keep_alive_due
            )

    def _keep_alive_due(self) -> None:
        self.timeout_keep_alive_task = None
        since = self._idle_since
        if since is None or self._lost:  # busy: the answer arms it again
            return
        left = since + self.timeout_keep_alive - self.loop.time()
        if left > 0:  # idle since a later answer
            self.timeout_keep_alive_task = self.loop.call_later(left, self._keep_alive_due)
            return
        self.timeout_keep_alive_handler()

    def on_headers_complete(self) -> None:
        self._headers_due = None
        self._in_headers = False
        version = self.parser.get_http_version()
        if version not in ("1.1", "1.0"):  # llhttp takes HTTP/2.0 and a line without one
            raise UnsupportedVersion(f"HTTP/{version} is not spoken on this port, send HTTP/1.1")
        # RFC 9112 3.2: exactly one; a proxy and the server behind it may each read
        # another of several.
        if version == "1.1" and self._hosts != 1:
            raise Unreadable(f"an HTTP/1.1 request needs one Host header, not {self._hosts}")
        # RFC 9112 6.1: an HTTP/1.0 message with Transfer-Encoding has faulty framing (a
        # proxy that reads it as HTTP/1.0 finds another end to its body than we would: a
        # way to smuggle a request past it). The parser read it as chunked.
        if version == "1.0" and any(name == b"transfer-encoding" for name, _ in self.headers):
            raise Unreadable("an HTTP/1.0 request may not carry Transfer-Encoding; send HTTP/1.1")
        # Refused here only when no earlier request on the connection is still being
        # answered: a pipelined answer must not overtake it (RequestGuard refuses those).
        idle = not self._answering()
        # A new connection's first request came when the kernel had it, not when the
        # worker accepted it: a client that reconnected at once after its 503 looked
        # late by its wait in the accept queue, and its refusal went unpaced.
        waited = self._first_waited()
        first = self._requests == 1
        retrying = self._retrying(first, waited)
        early = self._early_refusal is not None or self._direct is not None
        if idle and early and not self._probe_only:
            method = self.parser.get_method().decode("ascii")
            raw_path, _, query = self.url.partition(b"?")
            path = raw_path.decode("latin-1")
            if self._early_refusal is not None:
                over = self._over_connections()
                refused = self._early_refusal(
                    method,
                    path,
                    query,
                    self.headers,
                    retrying,
                    connections=over,
                    bodies=self._bodies_over(self._declared_length(self.headers) or 0),
                    waited=self._accept_waited(first),
                    queued=waited,
                    first=first,
                )
                if refused is not None:
                    self._refuse(refused)
                    return
            if self._direct is not None and self._take_direct(method, path, query, retrying):
                return
        self._hold_declared()
        # RequestGuard admits it (and the connection's refusal is forgotten) or refuses
        # it, paced by the same rule.
        self.scope[CONNECTION_REFUSALS] = (self._refusals, retrying)  # type: ignore[literal-required]
        self.scope[ARRIVED] = time.monotonic() - waited  # type: ignore[literal-required]
        self.scope[CONNECTION_MOVABLE] = self._movable_cycle  # type: ignore[literal-required]
        super().on_headers_complete()
        if self._shutting_down:  # its answer says the connection closes after it
            self.cycle.keep_alive = False
        if self.expect_100_continue:
            self.cycle.send = _closing_unless_continued(self.cycle)  # type: ignore[method-assign,assignment]

    def _over_connections(self) -> tuple[int, int] | None:
        """(open connections, CNNSERVE_MAX_CONNECTIONS) when this connection was taken
        on over the limit and the worker is over it still (probe-port ones not
        counted); else None."""
        limit = self._max_connections
        if limit is None or self._probe_only or not self._taken_over:
            return None
        open_now = len(self.connections) - PROBE_CONNECTIONS.open
        return (open_now, limit) if open_now > limit else None

    def _retrying(self, first: bool, waited: float) -> bool | None:
        """Whether the current request is a refused client's retry at once
        (ConnectionRefusals.retrying), timed from when the kernel had it: a new
        connection's first request by its wait in the accept queue (``waited``), a
        request after a refusal on a kept connection by how long it lay unread. Timed
        from when the worker read them, the retries of 512 of wrk's connections refused
        at once, sent at once, came 10 ms or more after their 503s (the event loop took
        22-30 ms a turn), were no longer known as retries, and spun unpaced to the end:
        one worker served 50-70 a second and refused 13,000 (2 runs in 10)."""
        if not first and self._refusals.after_refusal:
            waited = kernel_wait(self.transport)
        return self._refusals.retrying(self.loop.time() - waited, first=first)

    def _first_waited(self) -> float:
        """How long the current request waited in the kernel before the worker accepted
        its connection: a new connection's first request only (0 for the others)."""
        return self._waited if self._requests == 1 else 0.0

    def _accept_waited(self, first: bool) -> tuple[float, float] | None:
        """(seconds waited, limit) when this, a new connection's first request, waited
        longer than the limit for the worker to accept the connection while the worker
        is behind on them (:class:`AcceptBacklog`); else None."""
        limit = self._accept_wait_limit
        if not first or not limit:
            return None
        if not BACKLOG.behind(self._waited, limit, self.loop.time()):
            return None
        return self._waited, limit

    def _bodies_over(self, length: int) -> tuple[int, int, int] | None:
        """(held, ``length``, budget) when taking this request's body, ``length`` bytes as
        declared (:meth:`_declared_length`; 0 for none), would put the worker's buffered
        bodies over CNNSERVE_MAX_BUFFERED_BODY_BYTES; else None. Uploads waiting for a
        place were all held whole: ~900 concurrent 1.4 MB photos took a worker from 110 MB
        to 1.2 GB, kept for minutes."""
        budget = self._body_budget
        if not budget:
            return None
        held = BUFFERED.held
        return (held, length, budget) if held + length > budget and held else None

    def _declared_length(self, headers: list[tuple[bytes, bytes]]) -> int | None:
        """The request's Content-Length, at most what a body may be (a Content-Length of
        10**12, refused 413 by the route, counted as held until its connection closed,
        every other upload refused meanwhile); None without one (chunked)."""
        declared = header_value(headers, b"content-length")
        if declared is None or not declared.isdigit():
            return None
        return min(int(declared), self._max_body())

    def _max_body(self) -> int:
        refusal = self._early_refusal
        return refusal.admission.max_body_bytes if refusal is not None else DEFAULT_MAX_BODY

    def _hold_declared(self) -> None:
        """Count the body a request taken on declares (Content-Length) as held from now,
        not as its bytes come: counted as they came, 100 uploads whose headers all came
        before their bodies passed the budget 3.35 times (each worker at 450 MB held),
        none refused. A chunked body is counted as it comes (on_body)."""
        if not self._body_budget:
            return
        length = self._declared_length(self.headers)
        if length is not None:
            self._declared = True
            self._buffered += length
            BUFFERED.held += length

    def _release_buffered(self) -> None:
        """This connection's request bodies are answered (or it is gone): not held."""
        BUFFERED.held -= self._buffered
        self._buffered = 0

    def on_url(self, url: bytes) -> None:
        super().on_url(url)
        # Counted here too: a request line that arrives whole in one read is not counted
        # against the header limit (see the module's doc).
        if len(self.url) > min(self._max_header_bytes, MAX_TARGET_BYTES):
            raise TargetTooLong

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._after_last_chunk:
            # A trailer field: dropped. uvicorn appended it to the request's headers,
            # the very list its app was given as scope["headers"].
            return
        # uvicorn's own, inline (a call less for each header), counting Host lines.
        name = name.lower()
        if name == b"host":
            self._hosts += 1
        elif name == b"expect" and value.lower() == b"100-continue":
            self.expect_100_continue = True
        self.headers.append((name, value))

    def on_chunk_header(self) -> None:
        self._after_last_chunk = True

    def on_body(self, body: bytes) -> None:
        self._after_last_chunk = False
        self._bodies += 1
        if self._charging:
            self._charge(len(body))
        else:
            self._body_bytes += len(body)
        if self._receiving is not None:
            self._receiving.chunks.append(body)
        elif self._dropping:
            return
        else:
            super().on_body(body)
            if self.cycle.response_complete:  # answered already: uvicorn dropped it
                return
        if self._declared:  # counted whole at its headers
            return
        self._buffered += len(body)
        BUFFERED.held += len(body)

    def on_message_complete(self) -> None:
        self._in_message = False
        if self._unread_timer is not None:
            # The answered request's body is in: now idle, so keep-alive's timeout runs.
            self._unread_timer.cancel()
            self._unread_timer = None
            if not self._answering() and not self.pipeline:
                self._idle()
        if self._receiving is not None:
            self._start_direct()
        elif not self._dropping:
            super().on_message_complete()
        elif self._close_at_end:  # answered, closing: its body is in (_linger)
            self.transport.close()

    def _unread_late(self) -> None:
        """The rest of an answered request's body did not come in time: close."""
        self._unread_timer = None
        if self._in_message and not self.transport.is_closing():
            self._no_linger = True
            self.transport.close()

    def _linger(self) -> bool:
        """Whether to put off closing the connection (asked by its transport's close):
        a request was answered, and the connection is to close after it (the client
        asked to, as urllib always does, or the answer says so), while its body is still
        coming. Closed with the body unread, the kernel resets the connection and the
        client may lose the answer itself (a 404 or a 503 to a 4 MB upload came out as
        "connection reset by peer"). So the rest is read and dropped, and the connection
        closes when it is in, or when it is late (``CNNSERVE_BODY_READ_TIMEOUT_SECONDS``
        from the answer), as nginx's lingering close does."""
        if (
            self._no_linger
            or self._lost
            or self._writes.status == b"408"  # the body is what was late
            or self._unreadable
            or not self._in_message
            or self._in_headers
            or self._receiving is not None
            or self._answering()
        ):
            return False
        self._no_linger = True  # the next close is the last
        self._dropping = self._close_at_end = True
        if self._unread_timer is None:
            self._unread_timer = self.loop.call_later(self._body_seconds, self._unread_late)
        self.flow.resume_reading()
        return True

    def shutdown(self) -> None:
        """The server stops: a connection with nothing to answer gets
        :data:`FIRST_REQUEST_GRACE_SECONDS` to begin a request, which is answered with
        ``connection: close``, and then it closes. uvicorn closed it at once, but its
        client may be sending its next request: one accepted as the listener closed,
        or kept alive between two of a busy client's requests. Closed with a request
        unread, the kernel resets the connection ("connection reset by peer", "broken
        pipe": the request lost, in every rolling restart of the workers too)."""
        if not self._answering() and not self.pipeline and not self.transport.is_closing():
            self._shutting_down = True
            self._grace_timer = self.loop.call_later(
                FIRST_REQUEST_GRACE_SECONDS, self._close_unused
            )
            return
        self._no_linger = True
        grace = self.config.timeout_graceful_shutdown
        if self._receiving is not None and grace is not None:
            # A direct body still coming when the grace ends is answered then: it has no
            # task for uvicorn to cancel, and the process left it unanswered, unlogged.
            self._stop_timer = self.loop.call_later(grace, self._body_stopped, self._receiving)
        super().shutdown()

    def _close_unused(self) -> None:
        """The grace is over: closed unless a request is being answered (one begun and
        not whole yet, a byte a time, would hold the shutdown for its whole grace)."""
        self._grace_timer = None
        if not self._answering() and not self.pipeline and not self.transport.is_closing():
            self._no_linger = True
            self.transport.close()

    # --- the direct path (service.api.direct_classify) ---------------------------------

    def _take_direct(self, method: str, path: str, query: bytes, retrying: bool | None) -> bool:
        """Hand the request to the direct path if it takes it (its body then arrives
        in :meth:`on_body`), as uvicorn would have made it a request cycle."""
        assert self._direct is not None
        parser = self.parser
        if self.pipeline or self.root_path or "%" in path or parser.should_upgrade():
            return False  # the ASGI way: queued behind another, or a path to unquote
        limit = self.limit_concurrency  # uvicorn's own (its plain-text 503)
        if limit is not None and (len(self.connections) >= limit or len(self.tasks) >= limit):
            return False
        request = self._direct.take(
            method,
            path,
            query,
            self.headers,
            keep_alive=parser.get_http_version() != "1.0"
            and parser.should_keep_alive()
            and not self._shutting_down,
            connection=self._refusals,
            retrying=retrying,
        )
        if request is None:
            return False
        request.arrived -= self._first_waited()  # its deadline: from when the kernel had it
        self._hold_declared()
        # In the cycle's slot: pipelining behind it, a shutdown or a disconnect read and
        # set the same fields as on uvicorn's request cycle.
        self.cycle = request  # type: ignore[assignment]
        self._receiving = request
        return True

    def _start_direct(self) -> None:
        request, self._receiving = self._receiving, None
        assert request is not None
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None
        task = self.loop.create_task(self._run_direct(request))
        task.add_done_callback(self.tasks.discard)
        self.tasks.add(task)

    async def _run_direct(self, request: DirectRequest) -> None:
        assert self._direct is not None
        status = 500  # if cancelled other than by the server's stop
        try:
            try:
                status, headers, body = await self._direct.answer(request)
            except asyncio.CancelledError:
                if not stopped_midway():
                    raise
                # uvicorn's stop, its grace period over: answered, not dropped unlogged
                # (with connection: close, which ends the keep-alive below).
                status, headers, body = self._direct.stopped(request)
            request.response_complete = True
            # Its place is still held (released by done()), as moves() asks.
            concurrency = self._direct.admission.concurrency
            if moves(status, lambda: self._movable(request.keep_alive), concurrency):
                headers = [*headers, MOVE_HEADER]
            if closes(headers):  # an answer moving its client (service.concurrency)
                request.keep_alive = False
            if not request.disconnected and not self.transport.is_closing():
                self._answer(status, headers, body, request.keep_alive)
        finally:
            self._direct.done(request, status)
        self.on_response_complete()  # the next pipelined request, or keep-alive

    def _body_late(self, request: DirectRequest) -> None:
        self._body_timer = None
        assert self._direct is not None
        self._cut_short(request, self._direct.timed_out)  # a 408: not lingered

    def _body_stopped(self, request: DirectRequest) -> None:
        self._stop_timer = None
        assert self._direct is not None
        self._cut_short(request, self._direct.stopped)

    def _cut_short(self, request: DirectRequest, answer: Callable[[DirectRequest], Answer]) -> None:
        """Answer a direct request whose body is still coming, and close."""
        if self._receiving is not request or self.transport.is_closing():
            return
        assert self._direct is not None
        self._receiving = None
        for timer in (self._body_timer, self._stop_timer):
            if timer is not None:
                timer.cancel()
        self._body_timer = self._stop_timer = None
        request.response_complete = True
        status, headers, body = answer(request)
        self._answer(status, headers, body, keep_alive=False)
        self._direct.done(request, status)

    # --- clients that stop reading, or stop sending ------------------------------------

    def pause_writing(self) -> None:
        """The send buffer is full: the client has this long to take some of it. An
        answer waiting to be written holds its connection (and, before its body was
        handed over, its place: service.api.http.RequestGuard) for as long as the client
        likes otherwise: 33 clients that pipelined requests and never read shut a worker
        out with 503s for as long as they stayed."""
        super().pause_writing()
        if self._send_timer is None:
            self._send_timer = self.loop.call_later(self._send_seconds, self._send_late)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None

    def _closing_unsent(self) -> None:
        """The connection closes with answers still in its send buffer: a close waits
        for them to drain, so a client that does not read would hold the connection for
        good (the keep-alive timeout, `Connection: close` or a half-close closed it
        after its buffer had filled): it has the send timeout to take them."""
        if self._lost:  # uvicorn closes the transport again as the connection is lost
            return
        unsent = self.transport.get_write_buffer_size()
        if unsent and self._send_timer is None:
            self._send_timer = self.loop.call_later(self._send_seconds, self._send_late)

    def _send_late(self) -> None:
        self._send_timer = None  # (connection_lost cancels it: the connection is still here)
        metrics.observe_send_timeout()
        log.debug("a client took none of its answer in %g s: disconnected", self._send_seconds)
        self.transport.abort()  # a close would wait for the buffer to drain

    def eof_received(self) -> bool:  # type: ignore[override]
        """The client will send nothing more. After whole requests (a client may
        half-close once it has sent one, RFC 9112 9.6) the connection stays open until
        they are answered, then closes; the transport closed it at once before, and the
        answer to a request already run was lost (logged 200). Inside a request, which
        can no longer end: closed, the client left (a 499). Over TLS the TLS layer shuts
        the connection down whatever this returns (uvloop warned, per connection, that
        True has no effect): closed as before."""
        if self._tls:  # the TLS layer shuts the connection down whatever is returned
            return False
        if self._in_message or self._receiving is not None or self._nothing_to_answer():
            return False
        self._client_done = True
        return True

    def _movable(self, keep_alive: bool) -> bool:
        """Whether closing the connection after the answer now being made would lose
        nothing: it would stay open otherwise (``keep_alive``: not HTTP/1.0, no
        ``Connection: close``, the server not stopping), and no other request is on it
        (none pipelined behind, none begun: closing with one unread reset the
        connection, and the client could lose the answer itself). Nor while writing is
        paused: the answer would wait for the client's buffer to drain, and a request
        arriving meanwhile would be dropped by the close (unpaused, the answer and the
        close are written without a turn of the event loop between them)."""
        return (
            keep_alive
            and not self._shutting_down
            and not self._client_done
            and not self.pipeline
            and not self._in_message
            and self.flow.held is None
            and not self.flow.write_paused
            and not self.transport.is_closing()
        )

    def _movable_cycle(self) -> bool:
        """:meth:`_movable` for the request uvicorn's cycle is answering (the app's)."""
        return self.cycle is not None and self._movable(self.cycle.keep_alive)

    def _nothing_to_answer(self) -> bool:
        """No request on the connection waits for (the rest of) its answer."""
        return (
            not self._answering()
            and not self.pipeline
            and self.flow.held is None
            and self._refusal is None
        )

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True  # no timer may be armed from here on
        self._release_buffered()
        timers = (
            self.timeout_keep_alive_task,
            self._grace_timer,
            self._send_timer,
            self._header_timer,
            self._body_timer,
            self._unread_timer,
            self._stop_timer,
        )
        for timer in timers:
            if timer is not None:
                timer.cancel()
        self._grace_timer = self._send_timer = self._header_timer = None
        self._body_timer = self._unread_timer = self._stop_timer = None
        self.timeout_keep_alive_task = None
        self.flow.held = None
        if self._receiving is not None:  # left before sending all of a direct body
            assert self._direct is not None
            self._direct.done(self._receiving, CLIENT_CLOSED)
            self._receiving = None
        if self._refusal is not None:
            refused, _, _, timer = self._refusal
            if timer is not None:
                timer.cancel()
            self._refusal = None
            refused.answered()  # counted and logged, though the client left
        if self._probe_only:
            PROBE_CONNECTIONS.open -= 1
        super().connection_lost(exc)

    def _refuse(self, refused: Refused, keep_alive: bool | None = None) -> None:
        """Answer ``refused`` after its delay; ``keep_alive``: whether the connection
        may stay open after it (None: as the parser read the request). Read whole by
        the shed path (``keep_alive`` given), one not to wait is answered at once."""
        self._dropping = True
        if keep_alive is not None and refused.delay <= 0:
            self._refusal = (refused, keep_alive, None, None)
            self._send_refusal()
            return
        if keep_alive is None:
            keep_alive = self.parser.should_keep_alive()
        if refused.delay > 0:
            # Nothing more is read while the answer waits for its turn. One sent on the
            # loop's next turn is not paused for (a pause and its resume were two
            # changes to the poller a refusal): what may be read before it goes out, the
            # rest of its body or a pipelined request (which sends it first:
            # on_message_begin), is handled as it is after it.
            self.flow.pause_reading()
        timer = self.loop.call_later(refused.delay, self._send_refusal)
        # A client waiting for "100 Continue" may never send the body.
        awaiting = self._requests if self.expect_100_continue else None
        self._refusal = (refused, keep_alive, awaiting, timer)

    def _send_refusal(self) -> None:
        assert self._refusal is not None
        refused, keep_alive, awaiting, timer = self._refusal
        if timer is not None:
            timer.cancel()
        self._refusal = None
        # Closing after it (the client asked to, or a refusal moving its client to
        # another worker: service.concurrency) once its body is in (_linger); also
        # while a body its client was not told to send is owed
        # (_closing_unless_continued says why).
        owed = awaiting == self._requests and self._in_message
        keep_alive = keep_alive and not owed and not refused.closes and not self._shutting_down
        if refused.status == 503:  # paced, as the app paces them (service.concurrency)
            # Noted before it is sent: the client's reconnect may reach a sibling worker,
            # which reads the refusal of its address (service.shared_hosts), before this
            # process runs again once the answer is written.
            self._refusals.refused(self.loop.time())
        self._answer(refused.status, refused.headers, refused.body, keep_alive, refused.closes)
        if refused.status == 503:
            self._refused_body()
        refused.answered()
        if keep_alive:
            self.on_response_complete()  # reads on (the body is dropped), keep-alive

    def _refused_body(self) -> None:
        """The current request was answered 503 (any 503: all are paced, as RequestGuard
        paces them): its body's bytes, those read so far and those still to come
        (dropped), are charged to the refusal pace (ConcurrencyLimit.charge_body):
        reading them costs the worker as the refusal does, and a 580 KB body three
        times as much."""
        if not self._charging:
            self._charging = True
            self._charge(self._body_bytes)

    def _charge(self, body_bytes: int) -> None:
        if self._early_refusal is not None:
            self._early_refusal.admission.concurrency.charge_body(body_bytes)

    def _answer(
        self,
        status: int,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        keep_alive: bool,
        closing: bool | None = None,
    ) -> None:
        """Write a whole response the app did not make (with the server's own headers,
        as uvicorn writes them); close the connection after it unless ``keep_alive``.
        ``closing``: whether ``headers`` say so already (:func:`closes`), if known."""
        content = [STATUS_LINE[status]]
        for name, value in [*self.server_state.default_headers, *headers]:
            content.extend([name, b": ", value, b"\r\n"])
        if closing is None:
            closing = closes(headers)
        if not keep_alive and not closing:
            content.append(b"connection: close\r\n")
        content.extend([b"\r\n", body])
        self.transport.write(b"".join(content))
        if not keep_alive:
            self.transport.close()

    def _answered(self) -> bool:
        """Whether the request in progress has had its whole answer (uvicorn's cycle)."""
        return self.cycle is not None and self.cycle.response_complete

    def _answering(self) -> bool:
        """Whether a request's answer is still being written (uvicorn's cycle)."""
        return self.cycle is not None and not self.cycle.response_complete

    def _malformed(self, reason: str) -> None:
        """What arrived is not HTTP/1.1 the parser can read: a JSON 400 and the
        connection closed (uvicorn wrote a plain-text 400 and a WARNING for each, which
        any client could repeat to flood the log)."""
        metrics.observe_malformed_request()
        log.debug("malformed HTTP request: %s", reason)
        error = InvalidRequest(f"malformed HTTP/1.1 request ({reason}); check the client")
        self._give_up(400, error)

    def _trailers_too_large(self) -> None:
        metrics.observe_headers_too_large()
        self._give_up(431, trailers_too_large(self._max_header_bytes))

    def _give_up(self, status: int, error: CnnserveError) -> None:
        """Read nothing more on the connection: ``error`` as JSON and the connection
        closed. A request still being answered keeps its answer: the error is not
        written over it; the connection closes after."""
        self._unreadable = True
        self.flow.pause_reading()
        if self._refusal is not None:  # an earlier request's 503 goes first
            self._send_refusal()
        cycle = self.cycle
        if (
            self._in_message
            and self._receiving is None
            and not self.pipeline
            and isinstance(cycle, RequestResponseCycle)
            and cycle.more_body  # the broken message is its own, not one begun after it
            and not cycle.response_started
        ):
            # Its app waits for the rest of a body the parser cannot read: the app is
            # told the client left (a 499 in its log), the client gets the error.
            cycle.disconnected = True
            cycle.message_event.set()
        elif self._answering() or self.pipeline:  # the last request's answer closes it
            self.cycle.keep_alive = False
            return
        if self.transport.is_closing():
            return
        if self._in_message and not self._in_headers and (self._dropping or self._answered()):
            # The body of a request already answered: an error now would be an answer
            # nobody asked for. The connection just closes.
            self._no_linger = True
            self.transport.close()
            return
        answer = error_response(error, self._current_path())
        self._answer(status, answer.raw_headers, bytes(answer.body), keep_alive=False)

    def _current_path(self) -> str:
        """The path of the request being read, once its line was: TF Serving's routes
        answer in TF Serving's body, also what the protocol refuses (it was ours)."""
        return self.url.partition(b"?")[0].decode("latin-1") if self._in_message else ""

    def _headers_too_large(self, *, target: bool = False) -> None:
        """431; ``target``: the request target (URL) alone passed the limit, which may be
        MAX_TARGET_BYTES rather than the setting (then raising that would not help)."""
        self._in_headers = False  # counted once; nothing more is read
        self._no_linger = True
        metrics.observe_headers_too_large()
        if self._answering():
            # A pipelined request is being answered: no 431 in the middle of its answer;
            # read no more, and close once it is sent.
            self.cycle.keep_alive = False
            self.flow.pause_reading()
            return
        refused = (
            target_too_long()
            if target and self._max_header_bytes > MAX_TARGET_BYTES
            else headers_too_large(self._max_header_bytes)
        )
        answer = error_response(refused, self._current_path())
        self._answer(431, answer.raw_headers, bytes(answer.body), keep_alive=False)

    def _expect_headers(self) -> None:
        if not self._header_seconds:
            return
        self._headers_due = self.loop.time() + self._header_seconds
        if self._header_timer is None:
            self._header_timer = self.loop.call_at(self._headers_due, self._check)

    def _check(self) -> None:
        self._header_timer = None
        due = self._headers_due
        if due is None or self.transport.is_closing():
            return
        if self.loop.time() < due:  # a later request's headers: not due yet
            self._header_timer = self.loop.call_at(due, self._check)
            return
        if self._answering():
            # A request is being answered and the next one's headers lag: close after it.
            self.cycle.keep_alive = False
            return
        metrics.observe_header_timeout()
        answer = error_response(timeout_error(self._header_seconds), self._current_path())
        self._answer(408, answer.raw_headers, bytes(answer.body), keep_alive=False)


def _closing_unless_continued(cycle: RequestResponseCycle) -> Callable[[Any], Awaitable[None]]:
    """``cycle.send``, closing the connection after an answer that starts before the
    client, which sent ``Expect: 100-continue``, was told to continue (a 413 or 415 at
    the headers): the client may never send the body, and may send its next request
    instead, which was read as the rest of that body (lost, then the connection closed
    after 30 s). RFC 9110 10.1.1: a server answering before the content is in says
    whether it closes; this one does."""
    send = cycle.send

    async def closing(message: Any) -> None:
        if (
            message["type"] == "http.response.start"
            and cycle.waiting_for_100_continue
            and cycle.more_body  # still owed (a client may send it without waiting)
        ):
            cycle.keep_alive = False  # "connection: close"; the rest read if it comes
        await send(message)

    return closing


def kernel_wait(transport: asyncio.BaseTransport) -> float:
    """Seconds since the kernel last received data on a connection (0 when none came
    yet): on a just-accepted one, how long its request waited in the listening socket's
    queue for the worker to accept it (admission never saw that queue, and a new
    connection per request at 2x capacity waited seconds there, all answered 200, none
    refused, probes timing out); on a kept one, how long the request being read lay
    unread (TCP_INFO's tcpi_last_data_recv, ms; 0 where there is none)."""
    sock = transport.get_extra_info("socket")
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_BYTES)
    except (AttributeError, OSError):  # not TCP (a Unix socket), or no such option
        return 0.0
    if len(info) < _BYTES_RECEIVED + 8:
        return 0.0
    if not int.from_bytes(info[_BYTES_RECEIVED : _BYTES_RECEIVED + 8], sys.byteorder):
        # Nothing sent yet: the time since the handshake is a pool's connection opened
        # ahead, not a request's wait (it was refused as one, its request sent later)
        return 0.0
    return int.from_bytes(info[_LAST_DATA_RECV : _LAST_DATA_RECV + 4], sys.byteorder) / 1e3
