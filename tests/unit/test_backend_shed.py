"""A TF Serving backend's RESOURCE_EXHAUSTED is its shed: the gateway answers 503
overloaded and counts it in cnnserve_overload_rejections_total{reason="backend"}, as
docs/observability.md lists (it never appeared: only the 503 was counted)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import numpy as np
import pytest
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from service import metrics
from service.batching import BatchingConfig, DynamicBatcher
from service.errors import Overloaded
from service.runtimes.tfserving import TFServingClient


class Shedding(prediction_service_pb2_grpc.PredictionServiceServicer):
    """A TF Serving at capacity: every Predict is refused for load."""

    def Predict(self, request: Any, context: Any) -> Any:
        context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "at capacity")


@pytest.fixture
def client() -> Iterator[TFServingClient]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(Shedding(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    made = TFServingClient(f"127.0.0.1:{port}", timeout=10)
    try:
        yield made
    finally:
        made.close()
        server.stop(grace=None)


def shed_count(model: str) -> float:
    value = metrics.REGISTRY.get_sample_value(
        "cnnserve_overload_rejections_total", {"model": model, "reason": "backend"}
    )
    return value or 0.0


def test_a_backend_shed_is_a_503_counted_by_reason(client: TFServingClient) -> None:
    model = "shed-by-backend"

    def predict(parts: list[Any], deadline: float | None) -> Any:
        return client.call("Predict", predict_pb2.PredictRequest())

    config = BatchingConfig(4, 0, 4, 1)
    observer = metrics.BatcherMetrics(model, 1, config.queue_capacity)

    async def scenario() -> None:
        async with DynamicBatcher(predict, config, observer=observer, name=model) as batcher:
            for _ in range(2):
                with pytest.raises(Overloaded) as shed:
                    image = np.zeros((1, 2, 2, 3), np.uint8)
                    await batcher.submit(image, deadline=time.monotonic() + 5)
                assert shed.value.reason == "backend" and shed.value.http_status == 503

    before = shed_count(model)
    asyncio.run(asyncio.wait_for(scenario(), 10))
    assert shed_count(model) == before + 2
