"""A gRPC call that ends before the server read its request message: a deadline that
passed meanwhile (under load a call waits for the event loop) is a 504 deadline
expiration, a cancelled call the client's 499 (grpc.aio tells it by cancelling the
handler's task, a moment after the read ended), and only a call that ended with time
left and no message the client's 400."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest

from service import metrics
from service.api.grpc_malformed import Waiting, _first_message

ROUTE = "/cnnserve.v1.ImageClassifier/Classify"


class EndedCall:
    """A call's context whose stream ended before a message: read() answers EOF."""

    def __init__(self, remaining: float | None) -> None:
        self._remaining = remaining
        self.read_ended = asyncio.Event()
        self.code: grpc.StatusCode | None = None
        self.details = ""

    async def read(self) -> Any:
        self.read_ended.set()
        return grpc.aio.EOF

    def time_remaining(self) -> float | None:
        return self._remaining

    def invocation_metadata(self) -> tuple[()]:
        return ()

    async def abort(self, code: grpc.StatusCode, details: str, trailers: Any = ()) -> None:
        self.code, self.details = code, details
        raise grpc.aio.AbortError("Locally aborted.")


def counted(name: str, **labels: str) -> float:
    return metrics.REGISTRY.get_sample_value(name, labels) or 0.0


async def first_message(call: EndedCall, cancelled: bool, stopping: bool = False) -> Any:
    """What _first_message answers, its task cancelled once the read ended if
    ``cancelled`` (as grpc.aio cancels it; as its stop does if ``stopping``)."""
    task = asyncio.create_task(_first_message(call, ROUTE, Waiting(5.0, 100), lambda: stopping))
    if cancelled:
        await call.read_ended.wait()
        task.cancel()
    return await task


@pytest.mark.parametrize(
    ("remaining", "cancelled", "stopping", "code", "status"),
    [
        (0.0, False, False, grpc.StatusCode.DEADLINE_EXCEEDED, "504"),  # what grpc.aio shows
        (0.0, True, False, None, "504"),  # gRPC's core cancels a call past its deadline
        (3.0, True, False, None, "499"),
        (3.0, True, True, None, "503"),  # the server's stop cancelled it: not the client
        (3.0, False, False, grpc.StatusCode.INVALID_ARGUMENT, "400"),
        (None, False, False, grpc.StatusCode.INVALID_ARGUMENT, "400"),  # no deadline at all
    ],
)
def test_a_call_ended_before_its_message_is_answered_for_why(
    remaining: float | None,
    cancelled: bool,
    stopping: bool,
    code: grpc.StatusCode | None,
    status: str,
) -> None:
    labels = {"protocol": "grpc", "route": ROUTE, "model": "", "version": ""}
    requests = counted("cnnserve_requests_total", **labels, code=status)
    waited = counted("cnnserve_request_duration_seconds_sum", **labels)
    expired = counted("cnnserve_deadline_expirations_total", model="")
    call = EndedCall(remaining)
    if cancelled:  # nothing to answer: the call is gone
        with pytest.raises(asyncio.CancelledError):
            asyncio.run(first_message(call, cancelled, stopping))
    else:
        with pytest.raises(grpc.aio.AbortError):  # refused: the handler ends there
            asyncio.run(first_message(call, cancelled))
    assert call.code == code
    assert counted("cnnserve_requests_total", **labels, code=status) == requests + 1
    late = 1 if status == "504" else 0
    assert counted("cnnserve_deadline_expirations_total", model="") == expired + late
    if not cancelled:  # the grace waited for a cancellation counts as the call's time
        assert counted("cnnserve_request_duration_seconds_sum", **labels) - waited >= 0.09
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        assert "deadline passed before its request was read" in call.details


class StalledCall(EndedCall):
    """A call that sent its headers and never its message."""

    def __init__(self) -> None:
        super().__init__(remaining=60.0)
        self.reading = asyncio.Event()

    async def read(self) -> Any:
        self.reading.set()
        await asyncio.Event().wait()  # never


def test_calls_waiting_for_their_message_wait_less_once_the_listener_is_crowded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Calls that never send their message held gRPC's places on calls in progress for
    the whole read timeout (30 s): 400 connections' worth shut every other client out,
    health checks included. From ``crowd`` waiting calls on, every wait is cut short."""
    monkeypatch.setattr("service.api.grpc_malformed.CROWDED_READ_SECONDS", 0.05)
    waiting = Waiting(30.0, crowd=4)

    async def scenario() -> None:
        calls = [StalledCall() for _ in range(4)]
        tasks = [asyncio.create_task(_first_message(c, ROUTE, waiting)) for c in calls[:3]]
        for call in calls[:3]:
            await call.reading.wait()
        await asyncio.sleep(0.5)  # ten short waits: under the crowd, nobody was cut short
        assert not any(task.done() for task in tasks)
        tasks.append(asyncio.create_task(_first_message(calls[3], ROUTE, waiting)))
        async with asyncio.timeout(10):  # not the 30 s timeout
            ended = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(isinstance(e, grpc.aio.AbortError) for e in ended), ended
        for call in calls:
            assert call.code == grpc.StatusCode.DEADLINE_EXCEEDED
            assert "(many calls were waiting for theirs)" in call.details, call.details

    asyncio.run(scenario())
