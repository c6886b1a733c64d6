"""The TF Serving client against a real gRPC server in this process: gRPC's own retry
policy retries UNAVAILABLE, nothing else, and errors keep the address from clients."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    prediction_service_pb2_grpc,
)

from service.errors import BackendError, BackendUnavailable
from service.runtimes.tfserving import RETRY_POLICY, TFServingClient


class ScriptedServicer(prediction_service_pb2_grpc.PredictionServiceServicer):
    """Answers GetModelMetadata with the next status of a script (OK once it runs out)."""

    def __init__(self) -> None:
        self.script: list[grpc.StatusCode] = []
        self.calls = 0
        self._lock = threading.Lock()

    def GetModelMetadata(self, request: Any, context: Any) -> Any:
        with self._lock:
            self.calls += 1
            code = self.script.pop(0) if self.script else grpc.StatusCode.OK
        if code != grpc.StatusCode.OK:
            context.abort(code, f"scripted {code.name}")
        return get_model_metadata_pb2.GetModelMetadataResponse()


@pytest.fixture
def backend() -> Iterator[tuple[ScriptedServicer, str]]:
    servicer = ScriptedServicer()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield servicer, f"127.0.0.1:{port}"
    finally:
        server.stop(grace=None)


def metadata_request() -> Any:
    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    request.model_spec.name = "m"
    return request


def test_unavailable_is_retried_by_the_channel_and_then_succeeds(
    backend: tuple[ScriptedServicer, str],
) -> None:
    servicer, address = backend
    servicer.script = [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAVAILABLE]
    client = TFServingClient(address, timeout=10)
    try:
        client.call("GetModelMetadata", metadata_request())
    finally:
        client.close()
    assert servicer.calls == 3


def test_an_answer_is_not_retried(backend: tuple[ScriptedServicer, str]) -> None:
    servicer, address = backend
    servicer.script = [grpc.StatusCode.INVALID_ARGUMENT]
    client = TFServingClient(address, timeout=10)
    try:
        with pytest.raises(BackendError, match="refused the gateway's GetModelMetadata"):
            client.call("GetModelMetadata", metadata_request())
    finally:
        client.close()
    assert servicer.calls == 1


def test_retries_stop_at_the_policy_limit_and_the_address_stays_in_the_log(
    backend: tuple[ScriptedServicer, str],
) -> None:
    servicer, address = backend
    servicer.script = [grpc.StatusCode.UNAVAILABLE] * 10
    client = TFServingClient(address, timeout=10)
    try:
        with pytest.raises(BackendUnavailable) as caught:
            client.call("GetModelMetadata", metadata_request())
    finally:
        client.close()
    assert servicer.calls == RETRY_POLICY["maxAttempts"]
    assert address not in caught.value.public_message()
    assert address in caught.value.log_message()
