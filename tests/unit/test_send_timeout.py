"""The send timeout covers a connection closing with answers still unsent: a close
waits for the buffer to drain, so a client that does not read held it for good (found
by a reviewer; which close leaves bytes behind depends on the kernel's buffer sizes, so
it is tested here, on the protocol's own methods, not through a real socket)."""

from __future__ import annotations

import asyncio

from service.api.http_protocol import GatewayHttpProtocol


class Transport:
    """The two things the send timeout asks of a transport."""

    def __init__(self, unsent: int) -> None:
        self.unsent = unsent
        self.aborted = False

    def get_write_buffer_size(self) -> int:
        return self.unsent

    def is_closing(self) -> bool:
        return True  # closed by the app, waiting for its buffer to drain

    def abort(self) -> None:
        self.aborted = True


def protocol(transport: Transport, loop: asyncio.AbstractEventLoop) -> GatewayHttpProtocol:
    made = GatewayHttpProtocol.__new__(GatewayHttpProtocol)
    made.loop = loop
    made.transport = transport  # type: ignore[assignment]
    made._send_seconds = 7.0
    return made


def test_a_close_with_answers_unsent_is_dropped_after_the_send_timeout() -> None:
    loop = asyncio.new_event_loop()
    try:
        unsent = Transport(unsent=33_000)
        closing = protocol(unsent, loop)
        closing._closing_unsent()
        timer = closing._send_timer
        assert timer is not None and abs(timer.when() - loop.time() - 7.0) < 1
        closing._send_late()  # what the timer runs, the transport closing meanwhile
        assert unsent.aborted and closing._send_timer is None

        lost = protocol(Transport(unsent=14_000), loop)
        lost._lost = True  # uvicorn closes the transport again in connection_lost
        lost._closing_unsent()
        assert lost._send_timer is None  # no timer for a connection that is gone

        drained = Transport(unsent=0)  # nothing left: the close completes on its own
        done = protocol(drained, loop)
        done._closing_unsent()
        assert done._send_timer is None and not drained.aborted
    finally:
        loop.close()
