"""Calls waiting in gRPC's core (service.api.grpc_backlog): the count from channelz's
and the interceptor's, and a real grpc.aio server whose event loop is held while calls
come in."""

from __future__ import annotations

import asyncio
import threading
import time

import grpc
import pytest

from service.api import grpc_backlog
from service.api.grpc_backlog import CoreBacklog, ListenerIntake
from service.api.grpc_metadata_limit import MetadataLimitInterceptor
from service.concurrency import ConcurrencyLimit


def test_what_started_and_was_not_taken_waits_for_as_long_as_taking_it_lasts() -> None:
    intake = ListenerIntake()
    intake.known_as(7, now=10.0)
    for _ in range(20):
        intake.take()
    # 30 started, 20 taken, 12 answered: 10 wait, 18 alive; 20 taken in 0.1 s.
    assert intake.look(10.1, (30, 12, 0)) == (10, pytest.approx(10 * 0.1 / 20))
    assert intake.due()  # some wait: looked at again, taken or not
    # Nothing taken for 0.2 s: they waited that long at least.
    assert intake.look(10.3, (30, 12, 0)) == (10, pytest.approx(0.2))


def test_calls_that_ended_untaken_are_not_counted_as_waiting_again() -> None:
    """A call cancelled while it waited ends in the core without being taken: a
    listener never waits more calls than it has alive, and those it learnt of stay
    subtracted."""
    intake = ListenerIntake()
    intake.known_as(7, now=0.0)
    for _ in range(5):
        intake.take()
    assert intake.look(1.0, (10, 5, 5))[0] == 0  # 5 taken and answered, 5 cancelled
    assert not intake.due()
    intake.take()
    assert intake.look(2.0, (12, 6, 5))[0] == 1  # one more started and not taken
    intake.take()
    assert intake.look(3.0, (12, 7, 5))[0] == 0


def test_the_wait_over_listeners_is_a_mean_over_their_calls_waiting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The longest listener's wait, added to the answers' p99, refused a saturating load
    that none refused before: each listener's wait counts by the calls waiting there."""
    now = [0.0]
    backlog = CoreBacklog(clock=lambda: now[0])
    ids = iter((1, 2))
    monkeypatch.setattr(backlog, "_newest_server", lambda: next(ids))
    busy, quiet = ListenerIntake(), ListenerIntake()
    backlog.register(busy)
    backlog.register(quiet)
    for _ in range(10):
        busy.take()
    quiet.take()
    counts = {1: (20, 10, 0), 2: (3, 1, 0)}  # 10 wait on the first, 2 on the second
    monkeypatch.setattr(grpc_backlog, "_counts", counts.get)
    now[0] = 1.0
    waiting, wait = backlog.look()
    assert waiting == 12
    # 10 waiting 10 x 1 s / 10 taken, 2 waiting 2 x 1 s / 1 taken: (10 x 1 + 2 x 2) / 12.
    assert wait == pytest.approx(14 / 12)


def test_taking_a_waiting_call_tells_the_limit_at_once() -> None:
    limit = ConcurrencyLimit(64)
    intake = ListenerIntake(limit)
    intake.known_as(7, now=0.0)
    intake.take()
    waiting, _ = intake.look(0.1, (5, 1, 0))
    limit.note_waiting(waiting, 0.0)
    assert limit.waiting == 4
    intake.take()
    assert limit.waiting == 3


def test_calls_held_in_the_core_while_the_event_loop_is_busy_are_counted() -> None:
    """A real grpc.aio server: its first call holds the event loop while a client sends
    8 more, which wait in the core; the backlog counts them, then none once answered."""
    looked: list[tuple[int, float]] = []

    async def main() -> None:
        backlog = CoreBacklog()
        intake = ListenerIntake()
        calls = 0

        async def handler(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            nonlocal calls
            calls += 1
            if calls == 1:
                deadline = time.monotonic() + 10
                while started(backlog) < 9 and time.monotonic() < deadline:
                    time.sleep(0.01)  # the loop held: the others wait in the core
                looked.append(backlog.look())
            return b"ok"

        server = grpc.aio.server(interceptors=[MetadataLimitInterceptor(1 << 20, None, intake)])
        backlog.register(intake)
        server.add_generic_rpc_handlers(
            [
                grpc.method_handlers_generic_handler(
                    "t.S", {"M": grpc.unary_unary_rpc_method_handler(handler)}
                )
            ]
        )
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()

        def client() -> None:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                method = channel.unary_unary("/t.S/M")
                first = method.future(b"x", timeout=30)
                time.sleep(0.2)
                rest = [method.future(b"x", timeout=30) for _ in range(8)]
                for call in [first, *rest]:
                    assert call.result() == b"ok"

        thread = threading.Thread(target=client)
        thread.start()
        await asyncio.to_thread(thread.join)
        looked.append(backlog.look())
        await server.stop(None)

    asyncio.run(main())
    waiting, wait = looked[0]
    assert waiting == 8, looked
    assert wait > 0, looked
    assert looked[-1] == (0, 0.0), looked


def started(backlog: CoreBacklog) -> int:
    """Calls the core started on the backlog's only listener (read from another thread
    than the loop's is fine: channelz answers from the core)."""
    from service.api.grpc_backlog import _counts

    counts = _counts(backlog._listeners[0].server_id)
    return counts[0] if counts else 0
