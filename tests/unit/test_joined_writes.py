"""service.api.http_protocol.JoinedWrites: a response's head and body leave in one write,
everything else as it was written and in the same order."""

from __future__ import annotations

import asyncio
from typing import Any

from service.api.http_protocol import HeldFlow, JoinedWrites

HEAD = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n"


class Recording(asyncio.Transport):
    """The few transport calls JoinedWrites makes, recorded in order (the rest are
    asyncio's base class's)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[Any] = []

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.calls.append(bytes(data))

    def close(self) -> None:
        self.calls.append("close")

    def abort(self) -> None:
        self.calls.append("abort")

    closing = False

    def is_closing(self) -> bool:
        return self.closing


def joined() -> tuple[JoinedWrites, Recording]:
    transport = Recording()
    loop = asyncio.get_running_loop()
    return JoinedWrites(transport, loop), transport


def test_a_head_and_its_body_are_one_write() -> None:
    async def scenario() -> None:
        writes, transport = joined()
        writes.write(HEAD)
        assert transport.calls == []
        writes.write(b"{}")
        assert transport.calls == [HEAD + b"{}"]
        writes.write(memoryview(HEAD))  # the next response on the connection
        writes.write(memoryview(b"[]"))
        assert transport.calls == [HEAD + b"{}", HEAD + b"[]"]

    asyncio.run(scenario())


def test_what_is_not_a_head_alone_is_written_at_once() -> None:
    whole = b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 2\r\n\r\n{}"
    interim = b"HTTP/1.1 100 Continue\r\n\r\n"  # the client waits for it: never held

    async def scenario() -> None:
        writes, transport = joined()
        for data in (whole, interim, b"5\r\nchunk\r\n", b""):
            writes.write(data)
        assert transport.calls == [whole, interim, b"5\r\nchunk\r\n", b""]

    asyncio.run(scenario())


def test_a_head_without_a_body_goes_out_on_the_next_turn_of_the_loop() -> None:
    """A HEAD response, or a streamed body that starts later."""

    async def scenario() -> None:
        writes, transport = joined()
        writes.write(HEAD)
        await asyncio.sleep(0)  # one turn of the loop, not a wait for time
        assert transport.calls == [HEAD]
        writes.write(b"late body")
        assert transport.calls == [HEAD, b"late body"]

    asyncio.run(scenario())


def test_close_sends_the_held_head_first_and_abort_drops_it() -> None:
    async def scenario() -> None:
        writes, transport = joined()
        writes.write(HEAD)
        writes.close()
        assert transport.calls == [HEAD, "close"]
        writes, transport = joined()
        writes.write(HEAD)
        writes.abort()
        await asyncio.sleep(0)
        assert transport.calls == ["abort"]
        assert writes.is_closing() is False  # the rest is the transport's own

    asyncio.run(scenario())


def test_a_held_head_is_dropped_if_the_client_left_before_the_next_turn() -> None:
    async def scenario() -> None:
        writes, transport = joined()
        writes.write(HEAD)
        transport.closing = True  # the connection was lost meanwhile
        await asyncio.sleep(0)
        assert transport.calls == []

    asyncio.run(scenario())


def test_held_flow_waits_to_drain_only_while_writing_is_paused() -> None:
    """HeldFlow makes a writable event only once writing pauses (one a connection was
    ~0.85 KB); drain() waits while paused, and no other connection's does."""

    async def scenario() -> None:
        paused, other = HeldFlow(Recording()), HeldFlow(Recording())
        await asyncio.wait_for(paused.drain(), 1.0)  # not paused: at once
        paused.pause_writing()
        waiting = asyncio.ensure_future(paused.drain())
        await asyncio.sleep(0)
        assert not waiting.done()
        await asyncio.wait_for(other.drain(), 1.0)  # another connection: at once
        paused.resume_writing()
        await asyncio.wait_for(waiting, 1.0)
        paused.pause_writing()  # and again
        again = asyncio.ensure_future(paused.drain())
        await asyncio.sleep(0)
        assert not again.done()
        paused.resume_writing()
        await asyncio.wait_for(again, 1.0)

    asyncio.run(scenario())
