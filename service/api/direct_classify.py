"""``POST /v1/classify`` with one raw image, answered by the HTTP protocol itself.

The request that carries the load cost the gateway ~300 µs of CPU beyond decoding and
inference, half of it the ASGI stack around the app (uvicorn's request cycle and its
messages, the middleware, Starlette's request and response objects) rather than the
work the request asks for. Here the HTTP protocol (service.api.http_protocol) hands
such a request, once its headers are parsed, to :class:`DirectClassify` instead of
building an ASGI scope and task: its body is collected as it is parsed, then one task
runs the same data-plane call and writes the same answer as the fast path and the
route (``rest.classify_response``, ``http.answer_error``), with the same request id,
metrics, access-log line, 503 pacing and body read timeout.

It takes only what it admits at once: a raw-body request whose query values it can
take at face value (service.api.fastpath.raw_classify_query), with a Content-Length
within the body limit, a valid API key when keys are set, no ``Expect: 100-continue``,
on an idle connection, with a place under the worker's concurrency limit. Anything
else (a refusal RequestGuard answers, a chunked or pipelined request, multipart) goes
the ASGI way, so every refusal keeps one implementation.
tests/integration/test_fastpath.py compares its answers with the route's byte for byte.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from starlette.responses import Response

from service.api.fastpath import query_int, raw_classify_query
from service.api.http import (
    CLIENT_KEY_HEADER,
    REQUEST_ID_HEADER,
    Admission,
    answer_error,
    body_timeout_error,
    error_response,
    header_timeout,
    header_value,
    joined_headers,
    parse_client_key,
    refusal_within,
    server_stopped,
)
from service.api.rest import CLASSIFY_PATH, classify_response
from service.concurrency import ConnectionRefusals
from service.dataplane import DataPlane
from service.errors import ClientClosedRequest
from service.requestlog import RequestRecord, client_request_id, finish, recording

Headers = list[tuple[bytes, bytes]]
# The status logged for a request whose client left before sending all of its body.
CLIENT_CLOSED = ClientClosedRequest.http_status
_CLIENT_KEY = CLIENT_KEY_HEADER.encode()
_REQUEST_ID = REQUEST_ID_HEADER.encode()


class _NoEvent:
    """uvicorn sets its request cycle's ``message_event`` on a disconnect; nothing here
    waits on one."""

    def set(self) -> None:
        pass


@dataclass(eq=False)
class DirectRequest:
    """One request on its way through the direct path. It stands in the protocol's
    ``cycle`` slot, so uvicorn's own bookkeeping (pipelining behind it, a graceful
    shutdown, a disconnect) reads and sets the same fields as on its request cycle."""

    query: dict[str, str]
    headers: Headers
    record: RequestRecord
    connection: ConnectionRefusals
    retrying: bool | None
    keep_alive: bool
    # The concurrency place (ConcurrencyLimit.try_acquire), taken once the body is in:
    # a client slow to send it holds no place and its wait is no answer time.
    taken: float | None = None
    chunks: list[bytes] = field(default_factory=list)
    # When its headers were in: its deadline counts from then, as on the ASGI way, which
    # reads it before the body (counted from the body's end, a slow upload was run and
    # answered 200 past its deadline).
    arrived: float = field(default_factory=time.monotonic)
    response_complete: bool = False
    disconnected: bool = False
    finished: bool = False
    message_event = _NoEvent()  # not a field: one for all

    @property
    def body(self) -> bytes:
        return self.chunks[0] if len(self.chunks) == 1 else b"".join(self.chunks)

    def header(self, name: bytes) -> str | None:
        value = header_value(self.headers, name)
        return None if value is None else value.decode("latin-1")


# An answer: status, headers (less the server's own), body.
Answer = tuple[int, Headers, bytes]


class DirectClassify:
    """What the HTTP protocol asks (:meth:`take`, :meth:`answer`, :meth:`timed_out`,
    :meth:`done`); one per worker, in the app's lifespan state (service.api.app)."""

    def __init__(self, admission: Admission, plane: DataPlane) -> None:
        self.admission = admission
        self.plane = plane

    def take(
        self,
        method: str,
        path: str,
        query_string: bytes,
        headers: Headers,
        *,
        keep_alive: bool,
        connection: ConnectionRefusals,
        retrying: bool | None,
    ) -> DirectRequest | None:
        """A request this path answers, its concurrency place taken; or None for the
        ASGI way (which answers or refuses it as always)."""
        query = raw_classify_query(method, path, headers, query_string)
        if query is None or not self._admitted(headers):
            return None
        concurrency = self.admission.concurrency
        taken = None
        if self.admission.admit_at_headers:
            taken = concurrency.admit(connection)
            if taken is None:
                return None  # RequestGuard refuses it, paced as every refusal is
        elif not concurrency.admits():
            return None
        rid = client_request_id(header_value(headers, _REQUEST_ID) or b"")
        record = RequestRecord(rid, "rest", method, CLASSIFY_PATH)
        return DirectRequest(query, headers, record, connection, retrying, keep_alive, taken)

    def _admitted(self, headers: Headers) -> bool:
        """Whether RequestGuard would let it on (its own check: a valid key when keys are
        set, a body within the limit), with a body length known and no interim 100 to
        send."""
        sent = joined_headers(headers)  # as RequestGuard reads them
        length = sent.get(b"content-length")
        if length is None or not length.isdigit():
            return False
        if b"transfer-encoding" in sent or b"content-encoding" in sent:
            return False  # coded bodies are decoded (or refused) on the ASGI way
        return not sent.get(b"expect") and self.admission.refusal(CLASSIFY_PATH, sent) is None

    async def answer(self, request: DirectRequest) -> Answer:
        """The answer to a request whose body has arrived; never raises."""
        plane = self.plane
        query = request.query
        rid = request.record.request_id
        concurrency = self.admission.concurrency
        with recording(request.record):
            if request.taken is None:  # its place once its body is in (Settings.admit_at)
                request.taken = concurrency.admit(request.connection)
                if request.taken is None:  # the places went while its body came
                    await concurrency.pace_refusal(
                        request.retrying, request.connection, within=refusal_within(request.headers)
                    )
                    return _with_id(error_response(concurrency.refusal(), CLASSIFY_PATH), rid)
            try:
                deadline = plane.deadline(header_timeout(request.headers), request.arrived)
                result = await plane.classify(
                    [request.body],
                    model=query.get("model"),
                    version=query_int(query.get("version")),
                    label=query.get("label"),
                    k=query_int(query.get("top_k")),
                    deadline=deadline,
                    client_key=parse_client_key(request.header(_CLIENT_KEY) or ""),
                )
                response = classify_response(result, several=False)
            except Exception as exc:  # mapped once, as every route's errors are
                response = answer_error(exc, rid)
                if response.status_code == 503:  # come back later: paced
                    await self.admission.concurrency.pace_refusal(
                        request.retrying, request.connection, within=refusal_within(request.headers)
                    )
        return _with_id(response, rid)

    def timed_out(self, request: DirectRequest) -> Answer:
        """The answer to a request whose body did not arrive within the read timeout."""
        rid = request.record.request_id
        seconds = self.admission.body_read_timeout_seconds
        return _with_id(answer_error(body_timeout_error(seconds), rid), rid)

    def stopped(self, request: DirectRequest) -> Answer:
        """The answer to a request the server's stop cut short (its grace period ended
        before the body came or the answer was made)."""
        rid = request.record.request_id
        return _with_id(error_response(server_stopped(), CLASSIFY_PATH), rid)

    def done(self, request: DirectRequest, status: int) -> None:
        """The request is answered (or its client left): its place back, its record
        closed. Once per request, whichever way it ends."""
        if request.finished:
            return
        request.finished = True
        # The body goes now, not with the protocol: a closed connection's protocol is in
        # reference cycles, freed only by a full collection (service.memory).
        request.chunks = []
        if request.taken is not None:
            self.admission.concurrency.release(request.taken)
        finish(request.record, status)


def _with_id(response: Response, rid: str) -> Answer:
    """A response as the protocol writes it, with the request id RequestGuard adds."""
    headers = [*response.raw_headers, (_REQUEST_ID, rid.encode())]
    return response.status_code, headers, bytes(response.body)
