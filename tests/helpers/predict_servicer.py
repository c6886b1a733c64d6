"""The TF Serving Predict servicer (service.api.grpc_servicers.PredictionServicer) on a
real grpc.aio server in this process, over a stand-in for the data plane: for unit tests
of what the servicer does around a call."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from types import SimpleNamespace
from typing import Any

import grpc
import numpy as np
import tensorflow as tf

from service.api.grpc_servicers import PredictionServicer
from service.concurrency import ConcurrencyLimit
from service.errors import CnnserveError
from service.proto_gen.tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc


@asynccontextmanager
async def predict_stub(plane: Any, options: Sequence[tuple[str, Any]] = ()) -> AsyncIterator[Any]:
    """A PredictionService stub to a server whose servicer asks ``plane``, on a channel
    with ``options``."""
    server = grpc.aio.server()
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
        PredictionServicer(plane), server
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
            yield prediction_service_pb2_grpc.PredictionServiceStub(channel)
    finally:
        await server.stop(None)


def predict_request(images: int) -> Any:
    """A Predict of ``images`` 8x8 black images for model "m"."""
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "m"
    tensor = tf.make_tensor_proto(np.zeros((images, 8, 8, 3), np.uint8))
    request.inputs["image"].CopyFrom(tensor)
    return request


class RefusingPlane:
    """The part of the data plane Predict asks, whose predict refuses every request with
    what ``refusal`` makes; ``calls`` counts the requests that reached it."""

    settings = SimpleNamespace(grpc_max_message_bytes=1 << 22)

    def __init__(self, refusal: Callable[[], CnnserveError]) -> None:
        self.concurrency = ConcurrencyLimit(8)
        self.refusal = refusal
        self.calls = 0

    def stopping(self) -> bool:
        return False

    def deadline(self, remaining: float | None) -> float:
        return 30.0

    def check_image_count(self, count: int) -> None:
        pass

    async def predict(self, inputs: dict[str, Any], **options: Any) -> Any:
        self.calls += 1
        raise self.refusal()
