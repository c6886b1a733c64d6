"""A refused gRPC call lets go of what its handling held (the request, the arrays made
from it) as soon as it is answered, not when Python's cycle collector next runs: a
worker refusing 35 MB Predicts grew by ~60 MB a call, to gigabytes under concurrency.
Two cycles held them: the error kept in the handler's frame, whose traceback holds that
frame; and grpc.aio's AbortError, kept on the call's state while its traceback holds the
handler's frames. Checked on a real grpc.aio server with the cycle collector off."""

from __future__ import annotations

import asyncio
import gc
import os
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from service.errors import InvalidRequest
from tests.helpers.predict_servicer import RefusingPlane, predict_request, predict_stub


class Held:
    """Stands for what a call's handling holds (weakly referenceable, unlike messages)."""


class Plane(RefusingPlane):
    """A plane whose predict refuses every request, as a bad input would be."""

    def __init__(self) -> None:
        super().__init__(lambda: InvalidRequest("refused, as a bad input would be"))
        self.held: list[weakref.ref[Held]] = []

    async def predict(self, inputs: dict[str, Any], **options: Any) -> Any:
        held = Held()  # a local of this frame, as the decoded images are
        self.held.append(weakref.ref(held))
        raise self.refusal()


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


def resident_mb() -> float:
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads Linux's /proc")
def test_a_refused_calls_request_is_let_go_though_grpc_keeps_its_abort(
    no_cycle_collector: None,
) -> None:
    """A refusal is gRPC's abort (trailers alone, so that gRPC's retries may retry it),
    whose AbortError gRPC keeps on the call's state while the error's traceback holds the
    handler's frames, and so the request and the arrays made from it: 3 MB requests,
    refused 20 times, kept 75 MB until the cycle collector ran (5-12 MB let go)."""
    plane = Plane()
    images = 16_000  # 8x8 RGB each: a 3 MB request, under the 4 MB message limit

    async def refuse(calls: int) -> None:
        async with predict_stub(plane) as stub:
            for _ in range(calls):
                with pytest.raises(grpc.aio.AioRpcError):
                    await stub.Predict(predict_request(images), timeout=30)
            await asyncio.sleep(0.1)  # the handlers' last turn

    asyncio.run(refuse(2))  # the allocator's high-water for one call, and a warm server
    before = resident_mb()
    asyncio.run(refuse(20))
    assert resident_mb() - before < 32, f"{resident_mb() - before:.0f} MB kept"
