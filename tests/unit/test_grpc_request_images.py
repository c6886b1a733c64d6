"""A gRPC call weighs the images it carries in the worker's concurrency limit (whose floor
is counted in images, service.concurrency): what the servicer learns of them
(DataPlane.check_image_count notes them on the call's record) reaches
ConcurrencyLimit.release; and a refused call is paced by what it costs, within its
deadline. On a real grpc.aio server with the servicer under test."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace
from typing import Any

import grpc
import pytest

from service.concurrency import ConcurrencyLimit, grpc_refusal_cost
from service.errors import InvalidRequest
from service.requestlog import note_images
from tests.helpers.predict_servicer import predict_request, predict_stub


class Watched(ConcurrencyLimit):
    def __init__(self) -> None:
        super().__init__(8)
        self.released: list[int] = []

    def release(self, taken: float, images: int = 1) -> None:
        self.released.append(images)
        super().release(taken, images)


class Plane:
    """The part of the data plane Predict asks: it counts images as DataPlane does, and
    refuses every request once they are counted."""

    settings = SimpleNamespace(grpc_max_message_bytes=1 << 22)

    def __init__(self) -> None:
        self.concurrency = Watched()

    def stopping(self) -> bool:
        return False

    def deadline(self, remaining: float | None) -> float:
        return 30.0

    def check_image_count(self, count: int) -> None:
        note_images(count)

    async def predict(self, inputs: dict[str, Any], **options: Any) -> Any:
        raise InvalidRequest("refused once its images are counted")


async def call_with(plane: Plane, images: int) -> grpc.StatusCode:
    async with predict_stub(plane) as stub:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Predict(predict_request(images), timeout=10)
        return refused.value.code()


def test_a_call_weighs_the_images_its_tensor_declares() -> None:
    plane = Plane()
    assert asyncio.run(call_with(plane, 5)) == grpc.StatusCode.INVALID_ARGUMENT
    assert asyncio.run(call_with(plane, 1)) == grpc.StatusCode.INVALID_ARGUMENT
    assert plane.concurrency.released == [5, 1]


class Full(ConcurrencyLimit):
    """A worker with no place left, whose refusals record the tokens they took."""

    def __init__(self, rate: float = 100.0) -> None:
        # A call within a second of its connection's refusal retries at once: the calls
        # below come one after another, however slowly the machine runs them.
        super().__init__(1, refusals_per_second=rate, retry_at_once=1.0)
        self.costs: list[float] = []
        assert self.try_acquire() is not None

    def refusal_delay(
        self, retrying: bool | None = True, cost: float = 1.0, within: float | None = None
    ) -> float:
        self.costs.append(cost)
        return super().refusal_delay(retrying, cost, within)


def test_a_refused_call_takes_what_a_grpc_refusal_costs_from_the_pace() -> None:
    plane = Plane()
    plane.concurrency = Full()
    assert asyncio.run(call_with(plane, 1)) == grpc.StatusCode.RESOURCE_EXHAUSTED
    # The call's cost, and its message's bytes: read and parsed before it was refused.
    assert plane.concurrency.costs == [grpc_refusal_cost(predict_request(1).ByteSize())]


def test_a_paced_refusal_is_answered_within_the_calls_deadline() -> None:
    """Paced, a client retrying at once would wait past a short deadline and be told
    DEADLINE_EXCEEDED, a timeout, where RESOURCE_EXHAUSTED tells it to back off."""
    plane = Plane()
    plane.concurrency = Full(rate=1.0)  # a retry waits seconds for its turn

    async def twice() -> list[tuple[grpc.StatusCode, float]]:
        answers = []
        async with predict_stub(plane) as stub:
            for _ in range(2):
                began = time.perf_counter()
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await stub.Predict(predict_request(1), timeout=1.5)
                answers.append((refused.value.code(), time.perf_counter() - began))
        return answers

    (first, _), (retry, waited) = asyncio.run(twice())
    assert first == retry == grpc.StatusCode.RESOURCE_EXHAUSTED
    # It did wait (2 s, the longest, with its deadline aside): by 0.9 of the 1.5 s.
    assert waited >= 1.0
