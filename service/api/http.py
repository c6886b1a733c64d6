"""HTTP plumbing shared by the REST routers: the one error mapping, admission (API
keys, concurrency, body size and read time), request ids, request metrics and access
log, and small request helpers."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, NamedTuple

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import BaseRoute, Match, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import metrics
from service.api.auth import API_KEY_HEADER, ApiKeys, presented_key
from service.api.content_coding import (
    GunzipReceive,
    coding_refusal,
    has_body,
    is_gzip,
    without_coding,
)
from service.api.json_pieces import collector_paused, loads_in_pieces
from service.concurrency import ConcurrencyLimit, ConnectionRefusals
from service.dataplane import DataPlane
from service.errors import (
    ClientClosedRequest,
    CnnserveError,
    InternalError,
    InvalidRequest,
    MethodNotAllowed,
    NotFound,
    Overloaded,
    PayloadTooLarge,
    RequestTimeout,
    ShuttingDown,
    Unauthenticated,
    bounded,
)
from service.repository import version_number
from service.requestlog import (
    RequestRecord,
    client_request_id,
    finish,
    recording,
    timed_encode,
)

log = logging.getLogger(__name__)

JSON = "application/json"
TIMEOUT_HEADER = "x-request-timeout"
# Keeps a client on one side of the canary split (hashed; never logged or counted).
CLIENT_KEY_HEADER = "x-client-key"
REQUEST_ID_HEADER = "x-request-id"
# JSON bodies larger than this are parsed on a thread, not on the event loop.
LARGE_JSON_BYTES = 256 * 1024
# Paths that never count against the concurrency limit: probes must answer under load.
PROBE_PATHS = frozenset({"/healthz", "/readyz"})
MODELS_PREFIX = "/v1/models/"  # TF Serving's REST API: GET is a model's status or metadata
# The demo page's own loads (service.api.demo): its HTML, script and style sheet, and its
# list of models, all answered from memory; the page's other reads and its
# classifications count against the limit.
PAGE_PATHS = frozenset({"/", "/demo/models"})
PAGE_FILES_PREFIX = "/demo/static/"
# The ASGI scope key under which the HTTP protocol (service.api.http_protocol) hands the
# app its connection's refusal record and whether the request came as a retry at once:
# a 503 the app makes is paced by the same rule as one the protocol makes.
CONNECTION_REFUSALS = "cnnserve.connection_refusals"
# Scope key: when the request arrived (time.monotonic()), for its deadline.
ARRIVED = "cnnserve.arrived"
# The ASGI scope key under which the HTTP protocol hands the app a callable saying
# whether closing the connection after the answer now being made would lose nothing
# (service.api.http_protocol); MOVE_HEADER closes it so that the client's next connection
# may land on an idle sibling worker (service.concurrency.ConcurrencyLimit.moves_answered).
CONNECTION_MOVABLE = "cnnserve.connection_movable"
MOVE_HEADER = (b"connection", b"close")


# TF Serving's REST API (its api_rest.md) answers errors as {"error": "<message>"}, and
# clients written for it, typed ones above all, read that shape: its routes keep it. The
# stable code travels in this header on every error answer, and in the body elsewhere.
ERROR_CODE_HEADER = "X-Error-Code"
_TF_SERVING_ROOT = "/v1/models"


def speaks_tf_serving(path: str) -> bool:
    """Whether ``path`` is under TF Serving's REST API, whose error body is its own."""
    return path == _TF_SERVING_ROOT or path.startswith(_TF_SERVING_ROOT + "/")


def error_response(error: CnnserveError, path: str = "") -> JSONResponse:
    """The JSON error body for a request to ``path`` (empty when none was parsed);
    RequestGuard adds X-Request-ID to it as to every response."""
    headers = {ERROR_CODE_HEADER: error.code}
    if error.retry_after is not None:
        headers["Retry-After"] = str(error.retry_after)
    if isinstance(error, Unauthenticated) and error.http_status == 401:  # not its 503
        headers["WWW-Authenticate"] = 'Bearer realm="cnnserve"'
    if isinstance(error, MethodNotAllowed) and error.allow:
        headers["Allow"] = error.allow
    if isinstance(error, Overloaded) and error.move:
        headers["Connection"] = "close"  # uvicorn and the HTTP protocol close after it
        metrics.observe_moved_connection()  # counted here: gRPC connections are not moved
    if isinstance(error, RequestTimeout | ShuttingDown):
        headers["Connection"] = "close"  # the body is late, or the server stops
    body: dict[str, Any] = error.to_dict()
    if speaks_tf_serving(path):
        body = {"error": error.public_message()}
    return JSONResponse(body, status_code=error.http_status, headers=headers)


def request_id(request: Request) -> str | None:
    rid: str | None = request.scope.get("state", {}).get("request_id")
    return rid


def answer_error(exc: Exception, rid: str | None, path: str = "") -> JSONResponse:
    """The answer to an exception a request to ``path`` raised, logged when it is the
    server's fault: what every route's error handlers and the fast path
    (service.api.fastpath) send."""
    if not isinstance(exc, CnnserveError):
        log.error("request %s: unexpected error", rid, exc_info=exc)
        return error_response(InternalError("unexpected"), path)
    if exc.server_fault:
        log.warning("request %s failed: %s: %s", rid, exc.code, exc.log_message())
    return error_response(exc, path)


def allowed_methods(routes: Sequence[BaseRoute], path: str) -> str | None:
    """The methods ``path`` takes: those of the most specific routes matching it (the
    most literal characters: ``{model}:predict`` over ``{model}``, which matches
    ``m:predict`` too); the 405 handler adds HEAD beside GET. The router named only its
    first match's: "GET" for OPTIONS on ``m:predict``."""
    matching = [
        route
        for route in routes
        if isinstance(route, Route) and route.methods and route.path_regex.match(path)
    ]
    if not matching:
        return None
    literal = {id(route): len(re.sub(r"{[^}]*}", "", route.path)) for route in matching}
    best = max(literal.values())
    methods = {m for route in matching if literal[id(route)] == best for m in route.methods or ()}
    return ", ".join(sorted(methods))


def install_error_handlers(app: FastAPI, routes: Sequence[BaseRoute] = ()) -> None:
    """Map every exception to the JSON error body once, for every route. ``routes``: the
    included routers' routes (``app.routes`` holds them as opaque included routers), for
    the Allow header of a 405."""

    async def on_cnnserve(request: Request, exc: Exception) -> JSONResponse:
        return answer_error(exc, request_id(request), request.scope["path"])

    async def on_validation(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ())[1:]) or 'request'}: "
            + str(e.get("msg", "")).removeprefix("Value error, ")  # pydantic's, for ValueError
            for e in exc.errors()
        )
        return error_response(InvalidRequest(problems), request.scope["path"])

    async def on_http(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        path = request.url.path
        error: CnnserveError
        if exc.status_code == 404:
            error = NotFound(f"no route {request.method} {path}; the API is listed at /docs")
        elif exc.status_code == 405:
            error = MethodNotAllowed(f"{request.method} is not allowed on {path}; see /docs")
        else:
            error = InvalidRequest(str(exc.detail))
        response = error_response(error, request.scope["path"])
        if exc.status_code == 405:
            # RFC 9110: a 405 says which methods the resource takes.
            allow = allowed_methods(routes, path)
            allow = allow or (exc.headers or {}).get("Allow")
            if allow:
                methods = {m.strip() for m in allow.split(",")}
                if "GET" in methods:  # HEAD is answered as GET on every path (RequestGuard)
                    methods.add("HEAD")
                response.headers["Allow"] = ", ".join(sorted(methods))
        return response

    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        return answer_error(exc, request_id(request), request.scope["path"])

    app.add_exception_handler(CnnserveError, on_cnnserve)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(Exception, on_unexpected)


@dataclass(frozen=True)
class Admission:
    """What RequestGuard refuses before a route runs."""

    max_body_bytes: int
    body_read_timeout_seconds: float = 30.0
    concurrency: ConcurrencyLimit = field(default_factory=lambda: ConcurrencyLimit(10**6))
    keys: ApiKeys = field(default_factory=lambda: ApiKeys(()))
    # Settings.admit_at: a request with a body takes its place as its headers are parsed
    # (True) or once its body is in (False).
    admit_at_headers: bool = False

    def refusal(self, path: str, headers: dict[bytes, bytes]) -> CnnserveError | None:
        """Why a request is refused before a route runs (the concurrency limit aside):
        RequestGuard's check, and the direct path's (service.api.direct_classify)."""
        keys = self.keys
        if keys.enabled and not keys.is_open(path):
            auth = headers.get(b"authorization", b"").decode("latin-1") or None
            api_key = headers.get(API_KEY_HEADER.encode(), b"").decode("latin-1") or None
            try:
                keys.check(presented_key(auth, api_key))
            except Unauthenticated as exc:
                return exc
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            return self.too_large()
        if b"content-encoding" in headers or b"transfer-encoding" in headers:
            return coding_refusal(headers)
        return None

    def too_large(self) -> PayloadTooLarge:
        return PayloadTooLarge(
            f"request body is larger than {self.max_body_bytes} bytes; send a "
            "smaller image (or raise CNNSERVE_MAX_BODY_BYTES)"
        )


def _never() -> bool:
    return False


def closes(headers: Sequence[tuple[bytes, bytes]]) -> bool:
    """Whether an answer's headers say the connection closes after it (a refusal that
    moves its client to another worker: service.concurrency)."""
    return any(name.lower() == b"connection" and v.lower() == b"close" for name, v in headers)


def moves(status: int, movable: Callable[[], bool], concurrency: ConcurrencyLimit) -> bool:
    """Whether the connection of a request answered now with ``status`` (its place
    still held) closes after the answer, so that the client's next connection may land
    on an idle sibling worker (:meth:`ConcurrencyLimit.moves_answered`): a success
    only, on a connection ``movable`` says loses nothing by it; counted if so."""
    if 200 <= status < 300 and movable() and concurrency.moves_answered():
        metrics.observe_moved_connection()
        return True
    return False


class RequestGuard:
    """Pure ASGI middleware: gives each request an id (honouring X-Request-ID); refuses,
    before a route runs, requests without a valid API key (401), over the worker's
    concurrency limit (service.concurrency; 503 + Retry-After; probes and the metrics
    scrape exempt), and bodies over the limit (from
    Content-Length before reading a byte, or while streaming a chunked body; never
    buffers more than the limit) or slower than the body read timeout (408); and closes
    each request's :class:`RequestRecord` (metrics, access log) once it is answered.
    Requests to ``quiet_paths`` (the metrics scrape) are neither counted nor logged. On
    ``probe_port`` (CNNSERVE_PROBE_PORT), only the probes and ``quiet_paths`` are
    answered: anything else is a 404 that names the port."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        admission: Admission,
        quiet_paths: frozenset[str] = frozenset(),
        routes: Sequence[BaseRoute] = (),
        probe_port: int = 0,
    ) -> None:
        self.app = app
        self.admission = admission
        self.quiet_paths = quiet_paths
        self.routes = routes  # to name the route of a request refused before routing
        self.probe_port = probe_port

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = joined_headers(scope["headers"])
        # The first X-Request-ID, as the direct path reads it (not the joined values).
        rid = client_request_id(header_value(scope["headers"], b"x-request-id") or b"")
        scope.setdefault("state", {})["request_id"] = rid
        record = RequestRecord(rid, "rest", scope["method"])
        routed = routed_method(scope["method"])
        if routed != scope["method"]:
            # The server leaves HEAD's body out by its own scope's method (uvicorn's);
            # the access log still says HEAD.
            scope = {**scope, "method": routed}
        concurrency = self.admission.concurrency
        status = 500  # what the client gets if the app raises before answering
        arrival: tuple[ConnectionRefusals | None, bool | None]
        arrival = scope.get(CONNECTION_REFUSALS, (None, True))  # (None: another server)
        connection, retrying = arrival
        movable: Callable[[], bool] = scope.get(CONNECTION_MOVABLE, _never)

        taken: float | None = None

        def release_place() -> None:
            nonlocal taken
            if taken is not None:
                concurrency.release(taken, record.images)
                taken = None

        async def send_with_id(message: Message, paced: bool = True) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                sent = message.get("headers", [])
                if not any(name.lower() == b"x-request-id" for name, _ in sent):
                    message["headers"] = [*sent, (b"x-request-id", rid.encode())]
                if status == 503 and paced:  # come back later: paced (service.concurrency)
                    await concurrency.pace_refusal(
                        retrying, connection, within=refusal_within(scope["headers"])
                    )
                elif taken is not None and moves(status, movable, concurrency):
                    message["headers"] = [*message.get("headers", []), MOVE_HEADER]
                # The answer is made (every route's is whole before it starts): the place
                # goes before the sends, which wait while the client's buffer is full
                # (33 clients that pipelined requests and never read held every place).
                release_place()
            await send(message)

        def take_place() -> None:
            """The worker's place for this request, or its 503: for a request with a
            body, once the body is in (a client slow to send it held a place, and its
            wait counted as answer time: 40 stalled uploads shut a worker out)."""
            nonlocal taken
            taken = concurrency.admit(connection)
            if taken is None:
                raise concurrency.refusal()

        try:
            with recording(record):
                path = scope["path"]
                limited = is_limited(scope["method"], path, self.quiet_paths)
                refusal = self._off_probe_port(scope) or self.admission.refusal(path, headers)
                with_body = not self.admission.admit_at_headers and has_body(headers)
                if refusal is None and limited and not with_body:
                    try:
                        take_place()
                    except Overloaded as exc:
                        refusal = exc.with_traceback(None)  # it held this frame: a cycle
                if refusal is not None:
                    await error_response(refusal, path)(scope, receive, send_with_id)
                    return
                body_in = take_place if limited and with_body else None
                try:
                    await self._guarded(scope, headers, receive, send_with_id, body_in)
                except asyncio.CancelledError:
                    if status != 500 or not stopped_midway():
                        raise
                    # Answered, not re-raised: uvicorn sent its plain-text 500 and logged
                    # a traceback for each request its stop cut short.
                    stopped = error_response(server_stopped(), path)
                    await stopped(scope, receive, partial(send_with_id, paced=False))
                finally:
                    release_place()
        finally:
            if scope["path"] not in self.quiet_paths:
                record.route = route_template(scope, self.routes)
                finish(record, status)

    def _off_probe_port(self, scope: Scope) -> NotFound | None:
        """The 404 of a request to the probe port that is not a GET (or HEAD) of a probe
        or of the metrics; None for the rest. GET only: a metrics path set to an API
        route's (/v1/classify) served that route there, unlimited and unlogged."""
        server = scope.get("server")
        if not self.probe_port or server is None or server[1] != self.probe_port:
            return None
        paths = sorted(path for path in PROBE_PATHS | self.quiet_paths if path)
        if scope["path"] in paths and scope["method"] in ("GET", "HEAD"):
            return None
        return NotFound(
            f"port {self.probe_port} serves GET {', '.join(paths)} only "
            "(CNNSERVE_PROBE_PORT, for probes and the metrics scrape); send other requests "
            "to the REST port"
        )

    async def _guarded(
        self,
        scope: Scope,
        headers: dict[bytes, bytes],
        receive: Receive,
        send: Send,
        body_in: Callable[[], None] | None,
    ) -> None:
        limit = self.admission.max_body_bytes
        timeout = self.admission.body_read_timeout_seconds
        received = 0
        until: float | None = None
        complete = False

        async def limited_receive() -> Message:
            nonlocal received, until, complete
            if until is None:  # the clock starts when the route first reads the body
                until = asyncio.get_running_loop().time() + timeout
            try:
                # A timeout scope, not wait_for: no task per call (~8 µs less each).
                async with asyncio.timeout_at(until):
                    message = await receive()
            except TimeoutError:
                raise body_timeout_error(timeout) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise self.admission.too_large()
                complete = not message.get("more_body", False)
                if complete and body_in is not None:
                    body_in()  # its place now, or the 503 (raised to the route)
            elif message["type"] == "http.disconnect" and not complete:
                # Not the server's fault: a 499 in the log, not a 500 and a traceback.
                raise client_left() from None
            return message

        if is_gzip(headers):  # decompressed as it arrives, held to the same limit
            scope = {**scope, "headers": without_coding(scope["headers"])}
            await self.app(
                scope, GunzipReceive(limited_receive, limit, self.admission.too_large), send
            )
            return
        await self.app(scope, limited_receive, send)


class Refused(NamedTuple):
    """A request refused as soon as its headers were parsed: the answer's headers (less
    the status line and the server's own) and body, how long it waits for its turn
    (service.concurrency's pace), its record (closed once it is answered) and status.
    A tuple: under an open loop thousands are made a second, and a frozen dataclass's
    fields are each set through object.__setattr__ (~1 µs a refusal)."""

    headers: list[tuple[bytes, bytes]]
    body: bytes
    delay: float
    record: RequestRecord
    status: int = 503
    closes: bool = False  # its headers say the connection closes after it (closes())

    def answered(self) -> None:
        # Written with the loop's others: answered at the headers, refusals come by the
        # thousand under an open loop (metrics.TurnTally).
        finish(self.record, self.status, deferred=True, refusal=self.status == 503)


# The room check a route makes before reading the body (service.api.header_room): from a
# request's method, path, query string and headers, None when the route would decide
# otherwise, else the check to make (the error, or None), run with the request's record
# current.
RoomCheck = Callable[
    [str, str, bytes, Sequence[tuple[bytes, bytes]]],
    Callable[[], CnnserveError | None] | None,
]


class EarlyRefusal:
    """What RequestGuard would answer a request its worker has no place for (503
    ``overloaded``, Retry-After, X-Request-ID, the same metrics and access-log line), for
    the HTTP protocol (service.api.http_protocol) to send as soon as the headers are
    parsed, before uvicorn builds the request's ASGI scope and task: ~0.037 ms of server
    CPU against ~0.066 ms through the app, measured with every request refused. With a
    ``room`` check, also what the route's first room check would answer a request whose
    body it parses (service.api.header_room). Probes and the metrics scrape are never
    refused; RequestGuard and the routes still decide for the rest."""

    def __init__(
        self,
        admission: Admission,
        quiet_paths: frozenset[str],
        routes: Sequence[BaseRoute],
        room: RoomCheck | None = None,
    ) -> None:
        self.admission = admission
        self.quiet_paths = quiet_paths
        self.routes = routes
        self.room = room
        self._templates: dict[tuple[str, str], str] = {}  # (method, path) -> route label
        self._answers: dict[tuple[Any, ...], tuple[list[tuple[bytes, bytes]], bytes, bool]] = {}

    def __call__(
        self,
        method: str,
        path: str,
        query_string: bytes,
        headers: Sequence[tuple[bytes, bytes]],
        retrying: bool | None,
        connections: tuple[int, int] | None = None,
        bodies: tuple[int, int, int] | None = None,
        waited: tuple[float, float] | None = None,
        queued: float = 0.0,
        first: bool = True,
        room: bool = True,
    ) -> Refused | None:
        """The refusal to send (after its delay), or None to let the request on.
        ``retrying``: whether the client is retrying a refusal at once
        (service.concurrency.ConnectionRefusals); only then is a 503 paced.
        ``connections``: the worker's open HTTP connections and their limit, when they
        are over it. ``bodies``: the body bytes the worker holds, this request's, and
        their budget, when taking it would go over. ``waited``: how long a new
        connection waited for the worker to accept it, and the limit, when over it.
        ``queued``: how long this request waited in the accept queue (a new connection's
        first; else 0), and ``first``: whether it is a new connection's first request,
        for the pace's check. ``room``: whether to make the route's room check too (the
        protocol's shed path does not: a request the worker has a place for is parsed
        as any other, and checked then)."""
        concurrency = self.admission.concurrency
        if not is_limited(method, path, self.quiet_paths):
            return None
        error: CnnserveError | None = _worker_refusal(concurrency, connections, bodies, waited)
        if error is not None:
            record = self._record(method, path, headers)
        elif (
            not room
            or self.room is None
            or (check := self.room(method, path, query_string, headers)) is None
        ):
            return None
        else:
            # Its own record: what the check learns (the model and version that would
            # answer) is the request's, not that of the last one answered on the loop.
            record = self._record(method, path, headers)
            with recording(record):
                error = check()
        if error is None:
            return None
        rid = record.request_id
        raw_headers, whole_body, closing = self._answer(error, path)
        headers_out = [*raw_headers, (b"x-request-id", rid.encode())]
        status = error.http_status
        delay = 0.0
        if status == 503:
            delay = concurrency.refusal_delay(retrying, queued=queued, first=first)
            # X-Request-Timeout only shortens a wait: read then (most refusals wait none).
            if delay > 0 and (within := refusal_within(headers)) is not None:
                delay = concurrency.within_deadline(delay, within)
        # An answer to HEAD has no body (its Content-Length still says the GET one's):
        # a body would read as the start of the next answer on the connection.
        body = b"" if method == "HEAD" else whole_body
        return Refused(headers_out, body, delay, record, status, closing)

    def _answer(
        self, error: CnnserveError, path: str
    ) -> tuple[list[tuple[bytes, bytes]], bytes, bool]:
        """error_response's headers, body and whether they close the connection
        (:func:`closes`); a 503's made once for each message: under
        an open loop a worker refuses thousands a second, most of them the same 503, and
        building its JSON each time was ~5% of a refusal's CPU. (An Overloaded answer is
        its class's, its message's, its path's shape's and whether it moves the client;
        other errors are made each time.)"""
        if not isinstance(error, Overloaded):
            answer = error_response(error, path)
            return list(answer.raw_headers), bytes(answer.body), closes(answer.raw_headers)
        key = (type(error), error.message, speaks_tf_serving(path), error.move)
        made = self._answers.get(key)
        if made is None:
            answer = error_response(error, path)
            made = (list(answer.raw_headers), bytes(answer.body), closes(answer.raw_headers))
            if len(self._answers) >= 256:  # messages carry counts: stay bounded
                self._answers.clear()
            self._answers[key] = made
        elif error.move:
            metrics.observe_moved_connection()  # error_response counts each move
        return made

    def _record(
        self, method: str, path: str, headers: Sequence[tuple[bytes, bytes]]
    ) -> RequestRecord:
        rid = client_request_id(header_value(headers, b"x-request-id") or b"")
        return RequestRecord(rid, "rest", method, self._route(method, path))

    def _route(self, method: str, path: str) -> str:
        method = routed_method(method)
        template = self._templates.get((method, path))
        if template is None:
            scope = {"type": "http", "method": method, "path": path, "root_path": ""}
            template = route_template(scope, self.routes)
            if len(self._templates) >= 1024:  # raw paths are the client's: stay bounded
                self._templates.clear()
            self._templates[(method, path)] = template
        return template


def client_left() -> ClientClosedRequest:
    return ClientClosedRequest("the client closed the connection before sending the whole body")


def _worker_refusal(
    concurrency: ConcurrencyLimit,
    connections: tuple[int, int] | None,
    bodies: tuple[int, int, int] | None,
    waited: tuple[float, float] | None,
) -> Overloaded | None:
    """Why the worker, whatever the request asks, refuses it (EarlyRefusal's arguments
    say what is over its limit), or None. Its shed count is written with the loop's
    others, as the refusal's other metrics are (Refused.answered)."""
    if connections is not None:
        return too_many_connections(*connections)
    if bodies is not None:
        return too_many_body_bytes(*bodies)
    if waited is not None:
        return backlog_refusal(*waited)
    return None if concurrency.admits() else concurrency.refusal(deferred=True)


def too_many_connections(open_now: int, limit: int) -> Overloaded:
    """The answer to a request on a connection over the worker's limit: uvicorn's own
    refusal was a plain-text 503, uncounted, that also refused the probes (a few
    thousand silent connections turned /healthz 503, and the liveness probe with it)."""
    metrics.observe_shed("", "connections", deferred=True)
    return Overloaded(
        f"this worker has {open_now} open HTTP connections, over its limit of {limit} "
        "(CNNSERVE_MAX_CONNECTIONS); this connection closes: retry on a new one after "
        f"the Retry-After delay ({Overloaded.retry_after} s), or send to another replica",
        reason="connections",
        move=True,  # closed after the answer: the connection is what is over the limit
    )


def too_many_body_bytes(held: int, length: int, budget: int) -> Overloaded:
    """The answer to a request whose body would put the worker's buffered bodies over
    their budget: refused at its headers, its body read and dropped, never held."""
    metrics.observe_shed("", "bodies", deferred=True)
    return Overloaded(
        f"this worker holds {held >> 20} MiB of request bodies not yet answered; this "
        f"request's {length >> 10} KiB would pass its budget of {budget >> 20} MiB "
        f"(CNNSERVE_MAX_BUFFERED_BODY_BYTES): retry after the Retry-After delay "
        f"({Overloaded.retry_after} s), or send to another replica",
        reason="bodies",
    )


def backlog_refusal(waited: float, limit: float) -> Overloaded:
    """The answer to a new connection's first request that waited longer than ``limit``
    for the worker to accept the connection: the worker is behind on its connections
    (clients that open one per request, faster than it takes them), where admission's
    own queues are short. Refused at once, this costs a fraction of an answer, so the
    queue drains; taken, it waited seconds (a new connection per request at 2x capacity:
    every request 200 after 1.6-4.2 s, readiness probes timing out)."""
    metrics.observe_shed("", "backlog", deferred=True)
    return Overloaded(
        f"this connection waited {waited * 1e3:.0f} ms for the server to accept it, more "
        f"than {limit * 1e3:.0f} ms (CNNSERVE_QUEUE_WAIT_BUDGET_SECONDS), as others before "
        f"it: the server is at capacity; retry after the Retry-After delay "
        f"({Overloaded.retry_after} s), on a kept-alive connection, or send to another "
        "replica",
        reason="backlog",
    )


def server_stopped() -> ShuttingDown:
    """The answer to a request the server's stop cut short: its shutdown grace period
    (CNNSERVE_SHUTDOWN_GRACE_SECONDS) ended before the request's body came or its
    answer was made."""
    return ShuttingDown(
        "the server stopped before it could answer (its shutdown grace period ended); "
        "retry on another replica"
    )


def stopped_midway() -> bool:
    """Whether the running task is cancelled from outside: only the server's stop
    cancels a request's task (uvicorn's, once its grace period ends), and a cancelled
    task of the request's own raises CancelledError too, with this task not cancelled."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def body_timeout_error(seconds: float) -> RequestTimeout:
    return RequestTimeout(f"the request body did not arrive within {seconds:g} s; send it at once")


def joined_headers(headers: Sequence[tuple[bytes, bytes]]) -> dict[bytes, bytes]:
    """An ASGI header list as a dict, a field sent on several lines joined into one
    comma-separated value, as RFC 9110 5.3 reads it: dict() kept the last line, so
    ``Content-Encoding: br`` then ``Content-Encoding: gzip`` passed the coding check as
    gzip, and a second gzip line left the body compressed once more than decoded."""
    joined: dict[bytes, bytes] = {}
    for name, value in headers:
        earlier = joined.get(name)
        joined[name] = value if earlier is None else earlier + b", " + value
    return joined


def header_value(headers: Sequence[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    """The first value of header ``name`` (lower case) in an ASGI header list."""
    for key, value in headers:
        if key == name:
            return value
    return None


def is_limited(method: str, path: str, quiet_paths: frozenset[str]) -> bool:
    """Whether a request to ``path`` counts against the concurrency limit: probes must
    answer under load, the metrics scrape (``quiet_paths``) is not a request, and a
    model's status or metadata (a GET under ``/v1/models/``) is answered from memory in
    microseconds; gateways and probes poll it, and TF Serving does not shed it (gRPC's
    GetModelStatus alike: service.api.grpc_servicers.status_call). So are the demo
    page's own files and its list of models (:data:`PAGE_PATHS`): refused, the page did
    not open at all under load (a browser shows the 503's JSON), where it now opens and
    says that the server is busy when a classification is refused."""
    if path in PROBE_PATHS or path in quiet_paths:
        return False
    if method not in ("GET", "HEAD"):
        return True
    return not (
        path.startswith(MODELS_PREFIX) or path in PAGE_PATHS or path.startswith(PAGE_FILES_PREFIX)
    )


def routed_method(method: str) -> str:
    """The method the app routes a request by: HEAD is GET without the body (RFC 9110),
    and FastAPI's routes answer GET only."""
    return "GET" if method == "HEAD" else method


def route_template(scope: Scope, routes: Sequence[BaseRoute] = ()) -> str:
    """The matched route's template (``/v1/models/{model}``), never the raw path, so the
    route label stays bounded whatever clients request. A request refused before routing
    (body too large, no API key) is matched against ``routes``: FastAPI's included
    routers are not plain routes that could be matched from the app."""
    route = scope.get("route")
    if route is None:
        for candidate in routes:
            if candidate.matches(scope)[0] is Match.FULL:
                route = candidate
                break
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else metrics.UNMATCHED_ROUTE


def encoded_response(
    model: str, timings: dict[str, float], build: Callable[[], BaseModel]
) -> Response:
    """Build and serialise an answer (its pydantic model, the type /openapi.json shows),
    timed as the encode stage (metrics, access log and the Server-Timing header, beside
    the data plane's stages)."""
    response, encode = timed_encode(
        model, lambda: Response(build().model_dump_json(exclude_none=True), media_type=JSON)
    )
    response.headers["Server-Timing"] = server_timing({**timings, "encode": encode})
    return response


def dataplane(request: Request) -> DataPlane:
    plane: DataPlane = request.app.state.dataplane
    return plane


async def check_room(
    request: Request,
    model: str | None,
    version: int | None,
    label: str | None,
    deadline: float,
    *,
    parses: bool,
) -> None:
    """:meth:`DataPlane.check_room` before the request's body is read (refused then, the
    body is dropped unread by the app), and, when the route ``parses`` the body before
    it knows its images (multipart, JSON), again once it is in, before it is parsed. A
    32-image body takes a loaded worker milliseconds to arrive, and the first check
    goes stale meanwhile: 2 workers at 4x the load of 32-image multipart requests
    (clients retrying at once) parsed ~920 bodies in 8 s that admission then refused
    for their images, four for every one it served."""
    plane = dataplane(request)
    key = client_key(request)
    plane.check_room(model, version, label, deadline, key)
    if parses:
        await request.body()  # kept: the route reads it from here, no second read
        plane.check_room(model, version, label, deadline, key)


async def read_json(
    request: Request, object_hook: Callable[[dict[str, Any]], Any] | None = None
) -> Any:
    """The body as JSON; ``object_hook`` as json.loads takes it (it runs as the objects
    are parsed: no second walk over a large body)."""
    body = await request.body()
    try:
        # UTF-8 only (RFC 8259, and TF Serving's parser): json.loads also reads UTF-16
        # and -32 bytes, which the byte searches over the body (booleans) cannot see.
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidRequest(
            f"request body is not UTF-8 ({exc.reason} at byte {exc.start}); send JSON as UTF-8"
        ) from None
    if text.startswith("\ufeff"):  # json.loads' words name Python's codec
        raise InvalidRequest("request body starts with a byte order mark; send JSON without it")
    pairs_hook = _objects_of_unique_keys(object_hook)
    try:
        if len(body) > LARGE_JSON_BYTES:
            return await asyncio.to_thread(_loads_large, text, pairs_hook)
        return json.loads(text, object_pairs_hook=pairs_hook)
    except ValueError as exc:
        if "int_max_str_digits" in str(exc):  # Python's words name an interpreter setting
            raise InvalidRequest(
                "request body has an integer of thousands of digits; pixel values are 0-255"
            ) from None
        raise InvalidRequest(f"request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise InvalidRequest(TOO_DEEP) from None


TOO_DEEP = "request body is JSON nested too deeply to parse; send a flat object"


def _loads_large(text: str, pairs_hook: Callable[[list[tuple[str, Any]]], Any]) -> Any:
    """A large body parsed without stopping the event loop (service.api.json_pieces)."""
    with collector_paused():
        return loads_in_pieces(text, pairs_hook)


def _objects_of_unique_keys(
    object_hook: Callable[[dict[str, Any]], Any] | None,
) -> Callable[[list[tuple[str, Any]]], Any]:
    """json.loads' ``object_pairs_hook``: each object as a dict, then ``object_hook``;
    a key twice in one object is refused. json.loads keeps the last value, TF Serving's
    parser (RapidJSON) finds the first, and a proxy or filter in front may read either:
    {"image": <bad>, "image": <png>} was answered 200, the other order 400."""

    def build(pairs: list[tuple[str, Any]]) -> Any:
        value = dict(pairs)
        if len(value) != len(pairs):
            seen: set[str] = set()
            for key, _ in pairs:
                if key in seen:
                    raise InvalidRequest(
                        f"request body has the key {key!r} more than once in one object; "
                        "send each key once"
                    )
                seen.add(key)
        return value if object_hook is None else object_hook(value)

    return build


_SPACE = re.compile(r"[ \t\n\r\f\v]")  # ASCII whitespace, as Abseil skips
_SECONDS = re.compile(r"\+?[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?")


_BASE64_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/="


def decode_base64(value: str) -> bytes:
    """Standard base64 read as TF Serving reads it (Abseil's Base64Unescape): whitespace
    skipped (MIME encoders break lines every 76 characters), '=' padding optional.
    Raises ValueError (binascii.Error) for anything else; :func:`base64_hint` says why."""
    text = _SPACE.sub("", value)
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


def base64_hint(value: object) -> str:
    """Why a string the client sent as base64 did not decode, in words it can act on."""
    if not isinstance(value, str):
        return "send a base64 string"
    if value.startswith("data:"):
        return "send the base64 alone, without the 'data:…;base64,' prefix"
    if any(c in value for c in "-_"):
        return "use the standard alphabet (+ and /), not the URL-safe one (- and _)"
    text = _SPACE.sub("", value)
    if text.rstrip("=").strip(_BASE64_ALPHABET):
        return "it holds characters outside the base64 alphabet (A-Z, a-z, 0-9, + and /)"
    if "=" in text.rstrip("="):
        return "it has '=' before its end ('=' pads only the end)"
    return "it is cut off (one character past a whole group of 4)"


def path_version(raw: str) -> int:
    """A version number as a URL path writes it (:func:`~service.repository.
    version_number`: a 4,301-digit one raised from int() as a 500), or a 400."""
    if raw[:1] == "-" and raw[1:].isascii() and raw[1:].isdigit():
        raise InvalidRequest(f"version must be 0 or more, got {raw}")
    number = version_number(raw)
    if number is None:
        raise InvalidRequest(f"version must be a whole number within int64, got {raw!r}")
    return number


def request_timeout(request: Request) -> float | None:
    return header_timeout(request.headers.raw)


def request_deadline(plane: DataPlane, request: Request) -> float:
    """The request's deadline (X-Request-Timeout, or the default), counted from when it
    arrived: its headers parsed, or, for a new connection's first request, when the
    kernel had it (service.api.http_protocol sets ARRIVED). Counted from the route's
    start, a request that waited 2 s to be accepted with X-Request-Timeout: 0.5 was run
    and answered 200."""
    return plane.deadline(request_timeout(request), request.scope.get(ARRIVED))


def header_timeout(headers: Sequence[tuple[bytes, bytes]]) -> float | None:
    """The X-Request-Timeout header's seconds in an ASGI header list, if sent. Sent on
    several lines, it is their values comma-joined (RFC 9110 5.3), as if sent in one:
    no number, so a 400 either way (the first line was taken before, silently)."""
    name = TIMEOUT_HEADER.encode()
    lines = [value for key, value in headers if key == name]
    return parse_timeout(b", ".join(lines).decode("latin-1") if lines else None)


def refusal_within(headers: Sequence[tuple[bytes, bytes]]) -> float | None:
    """The seconds X-Request-Timeout gives a 503 to wait for its turn in the refusal
    pace (service.concurrency.ConcurrencyLimit.refusal_delay); None when not sent, or
    not a number (refused for load, the request is not judged on its header)."""
    try:
        return header_timeout(headers)
    except InvalidRequest:
        return None


def parse_timeout(raw: str | None) -> float | None:
    """The X-Request-Timeout header's seconds, if sent."""
    if raw is None:
        return None
    # Whitespace around a field value is not part of it (RFC 9110 5.5): the HTTP parser
    # drops it in front, not behind ("0.5 " was a 400). Within, plain decimals only:
    # float() also took "1_0" (10 s).
    value = raw.strip(" \t")
    if value.startswith("-") and _SECONDS.fullmatch(value[1:]):
        raise InvalidRequest(f"{TIMEOUT_HEADER} must be a positive number of seconds, got {value}")
    if not _SECONDS.fullmatch(value):
        # Header bytes come as latin-1: shown as the UTF-8 the client most likely sent
        # ('５' read 'ï¼\x95'), and cut, as the header may be kilobytes long.
        shown = raw.encode("latin-1", "replace").decode("utf-8", "backslashreplace")
        raise InvalidRequest(
            f"{TIMEOUT_HEADER} must be seconds as a number, one value, got "
            f"{bounded(repr(shown), 100)}"
        )
    return float(value)


def server_timing(timings: dict[str, float]) -> str:
    return ", ".join(f"{name};dur={seconds * 1e3:.2f}" for name, seconds in timings.items())


def client_key(request: Request) -> str | None:
    return parse_client_key(request.headers.get(CLIENT_KEY_HEADER, ""))


def parse_client_key(raw: str) -> str | None:
    """The X-Client-Key header (at most 256 characters), or None."""
    return raw[:256] or None
