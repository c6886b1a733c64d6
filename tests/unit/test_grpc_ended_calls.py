"""A gRPC call that ends before the server read its request message: a deadline that
passed meanwhile (under load a call waits for the event loop) is a 504 deadline
expiration, a cancelled call the client's 499, and only a call that ended with time left
and no message the client's 400."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest

from service import metrics
from service.api.grpc_malformed import _first_message

ROUTE = "/cnnserve.v1.ImageClassifier/Classify"


class Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message


class EndedCall:
    """A call's context whose stream ended before a message: read() answers EOF."""

    def __init__(self, remaining: float | None, cancelled: bool) -> None:
        self._remaining = remaining
        self._cancelled = cancelled

    async def read(self) -> Any:
        return grpc.aio.EOF

    def time_remaining(self) -> float | None:
        return self._remaining

    def cancelled(self) -> bool:
        return self._cancelled

    def invocation_metadata(self) -> tuple[()]:
        return ()

    async def abort(self, code: grpc.StatusCode, message: str, trailers: Any = ()) -> None:
        raise Aborted(code, message)


def counted(name: str, **labels: str) -> float:
    return metrics.REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.mark.parametrize(
    ("remaining", "cancelled", "code", "status"),
    [
        (0.0, False, grpc.StatusCode.DEADLINE_EXCEEDED, "504"),  # what grpc.aio shows
        (-0.5, True, grpc.StatusCode.DEADLINE_EXCEEDED, "504"),
        (3.0, True, grpc.StatusCode.CANCELLED, "499"),
        (3.0, False, grpc.StatusCode.INVALID_ARGUMENT, "400"),
        (None, False, grpc.StatusCode.INVALID_ARGUMENT, "400"),  # no deadline at all
    ],
)
def test_a_call_ended_before_its_message_is_answered_for_why(
    remaining: float | None, cancelled: bool, code: grpc.StatusCode, status: str
) -> None:
    labels = {"protocol": "grpc", "route": ROUTE, "model": "", "version": ""}
    requests = counted("cnnserve_requests_total", **labels, code=status)
    expired = counted("cnnserve_deadline_expirations_total", model="")
    with pytest.raises(Aborted) as ended:
        asyncio.run(_first_message(EndedCall(remaining, cancelled), ROUTE, 5.0))
    assert ended.value.code == code
    assert counted("cnnserve_requests_total", **labels, code=status) == requests + 1
    late = 1 if status == "504" else 0
    assert counted("cnnserve_deadline_expirations_total", model="") == expired + late
    if status == "504":
        assert "deadline passed before its request was read" in ended.value.message
