"""uvicorn's HTTP/1.1 protocol (httptools) with a header read timeout.

uvicorn times out idle keep-alive connections between requests, but not a connection
that sends nothing after connecting, nor one that sends a request's headers a byte at
a time (slowloris): either holds one of the worker's connections
(``max_connections``) for as long as the client likes, and a few thousand of them shut
everyone else out. Here a request's headers must be complete within
``header_read_timeout_seconds`` of the connection opening or of the request's first
byte; if not, the client gets a 408 (``request_timeout``) and the connection is closed.
The body has its own timeout (RequestGuard, ``body_read_timeout_seconds``).

The timeout reaches the protocol through the app's lifespan state (ASGI "state", which
uvicorn hands to every connection), so that it comes from the one Settings object in
single-process and multi-worker runs alike.
"""

from __future__ import annotations

import asyncio
import json

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service import metrics
from service.errors import RequestTimeout

# The key in the lifespan state (service.api.app) that carries the timeout in seconds.
HEADER_TIMEOUT_STATE = "cnnserve.header_read_timeout_seconds"


def timeout_answer(seconds: float) -> bytes:
    """The whole 408 response, connection closing."""
    error = RequestTimeout(
        f"the request headers did not arrive within {seconds:g} s of the connection or of "
        "the request's first byte; send them at once"
    )
    body = json.dumps(error.to_dict()).encode()
    head = (
        "HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode() + body


class HeaderTimeoutProtocol(HttpToolsProtocol):
    """What uvicorn runs per connection (``http=`` in service.server).

    One timer per connection, not per request: a request only notes when its headers
    are due; the timer, when it fires, closes the connection if the headers it waits for
    are late, re-arms for a request whose headers are not due yet, and lapses if none is
    awaited (the next request arms it again)."""

    _header_timer: asyncio.TimerHandle | None = None
    _headers_due: float | None = None
    _header_seconds: float = 0.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_seconds = self.app_state.get(HEADER_TIMEOUT_STATE) or 0.0
        self._expect_headers()  # the first request's headers are due from now

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._expect_headers()

    def on_headers_complete(self) -> None:
        self._headers_due = None
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        super().connection_lost(exc)

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
        if self.cycle is not None and not self.cycle.response_complete:
            # A request is being answered and the next one's headers lag: close after it.
            self.cycle.keep_alive = False
            return
        metrics.observe_header_timeout()
        self.transport.write(timeout_answer(self._header_seconds))
        self.transport.close()
