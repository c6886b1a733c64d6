"""A refused gRPC call lets go of what its handling held (the request, the arrays made
from it) as soon as it is answered, not when Python's cycle collector next runs: a
worker refusing 35 MB Predicts grew by ~60 MB a call, to gigabytes under concurrency.
Two cycles held them: the error kept in the handler's frame, whose traceback holds that
frame; and grpc.aio's AbortError, kept on the call's state while its traceback holds the
handler's frames. Checked on a real grpc.aio server with the cycle collector off."""

from __future__ import annotations

import asyncio
import gc
import weakref
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import grpc
import pytest

from service.concurrency import ConcurrencyLimit
from service.errors import InvalidRequest
from tests.helpers.predict_servicer import predict_request, predict_stub


class Held:
    """Stands for what a call's handling holds (weakly referenceable, unlike messages)."""


class Plane:
    """The part of the data plane Predict asks; its predict refuses every request."""

    settings = SimpleNamespace(grpc_max_message_bytes=1 << 22)

    def __init__(self) -> None:
        self.concurrency = ConcurrencyLimit(8)
        self.held: list[weakref.ref[Held]] = []

    def stopping(self) -> bool:
        return False

    def deadline(self, remaining: float | None) -> float:
        return 30.0

    def check_image_count(self, count: int) -> None:
        pass

    async def predict(self, inputs: dict[str, Any], **options: Any) -> Any:
        held = Held()  # a local of this frame, as the decoded images are
        self.held.append(weakref.ref(held))
        raise InvalidRequest("refused, as a bad input would be")


@pytest.fixture
def no_cycle_collector() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


async def refused_calls(plane: Plane, calls: int) -> list[grpc.StatusCode]:
    codes = []
    async with predict_stub(plane) as stub:
        for _ in range(calls):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.Predict(predict_request(1), timeout=10)
            codes.append(refused.value.code())
        # The handlers' tasks end just after their answers go: wait for that, boundedly.
        for _ in range(500):
            if not any(ref() is not None for ref in plane.held):
                break
            await asyncio.sleep(0.01)
    return codes


def test_a_refused_call_frees_what_it_held_without_the_cycle_collector(
    no_cycle_collector: None,
) -> None:
    plane = Plane()
    codes = asyncio.run(refused_calls(plane, 5))
    assert codes == [grpc.StatusCode.INVALID_ARGUMENT] * 5
    assert len(plane.held) == 5
    assert [ref() for ref in plane.held] == [None] * 5
