"""The TF Serving Predict servicer (service.api.grpc_servicers.PredictionServicer) on a
real grpc.aio server in this process, over a stand-in for the data plane: for unit tests
of what the servicer does around a call."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import grpc
import numpy as np
import tensorflow as tf

from service.api.grpc_servicers import PredictionServicer
from service.proto_gen.tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc


@asynccontextmanager
async def predict_stub(plane: Any) -> AsyncIterator[Any]:
    """A PredictionService stub to a server whose servicer asks ``plane``."""
    server = grpc.aio.server()
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
        PredictionServicer(plane), server
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
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
