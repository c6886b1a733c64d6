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
import numpy as np
import pytest
import tensorflow as tf

from service.api.grpc_servicers import PredictionServicer
from service.concurrency import ConcurrencyLimit
from service.errors import InvalidRequest
from service.proto_gen.tensorflow_serving.apis import (
    predict_pb2,
    prediction_service_pb2_grpc,
)


class Held:
    """Stands for what a call's handling holds (weakly referenceable, unlike messages)."""


class Plane:
    """The part of the data plane Predict asks; its predict refuses every request."""

    accepting_calls = True
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
    server = grpc.aio.server()
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
        PredictionServicer(plane),  # type: ignore[arg-type]
        server,
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "m"
    request.inputs["image"].CopyFrom(tf.make_tensor_proto(np.zeros((1, 8, 8, 3), np.uint8)))
    codes = []
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            for _ in range(calls):
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await stub.Predict(request, timeout=10)
                codes.append(refused.value.code())
        # The handlers' tasks end just after their answers go: wait for that, boundedly.
        for _ in range(500):
            if not any(ref() is not None for ref in plane.held):
                break
            await asyncio.sleep(0.01)
    finally:
        await server.stop(None)
    return codes


def test_a_refused_call_frees_what_it_held_without_the_cycle_collector(
    no_cycle_collector: None,
) -> None:
    plane = Plane()
    codes = asyncio.run(refused_calls(plane, 5))
    assert codes == [grpc.StatusCode.INVALID_ARGUMENT] * 5
    assert len(plane.held) == 5
    assert [ref() for ref in plane.held] == [None] * 5
