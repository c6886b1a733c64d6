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
    """What uvicorn runs per connection (``http=`` in service.server)."""

    _header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()  # the first request's headers are due from now

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._header_timer is None:  # a later request on the connection began
            self._arm()

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        seconds = self.app_state.get(HEADER_TIMEOUT_STATE)
        if seconds:
            self._header_timer = self.loop.call_later(seconds, self._timed_out, seconds)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _timed_out(self, seconds: float) -> None:
        self._header_timer = None
        if self.transport.is_closing():
            return
        busy = self.cycle is not None and not self.cycle.response_complete
        if busy:  # a request is being answered; the next one's headers lag: just close
            self.cycle.keep_alive = False
            return
        metrics.observe_header_timeout()
        self.transport.write(timeout_answer(seconds))
        self.transport.close()
