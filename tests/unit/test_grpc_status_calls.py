"""TF Serving's status and metadata calls are answered outside the worker's concurrency
limit, as TF Serving answers them under any load: a gateway polling GetModelStatus on a
loaded cnnserve found it RESOURCE_EXHAUSTED and turned unready. Inference calls are
still refused at the limit."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import grpc
import pytest

from service.api.grpc_servicers import ModelServicer, PredictionServicer
from service.concurrency import ConcurrencyLimit
from service.errors import InvalidRequest
from service.proto_gen.tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_pb2,
)
from service.routing import VersionState, VersionStatus


class Plane:
    """The part of the data plane the servicers ask, with a full concurrency limit."""

    settings = SimpleNamespace()

    def __init__(self) -> None:
        self.concurrency = ConcurrencyLimit(1)
        assert self.concurrency.try_acquire() is not None  # its one place is taken

    def stopping(self) -> bool:
        return False

    def model_status(self, model: str, version: int | None) -> Any:
        return [VersionStatus(1, VersionState.AVAILABLE)]

    def metadata(self, model: str, version: int | None, label: str | None) -> Any:
        return SimpleNamespace(model=model, version=1), get_model_metadata_pb2.SignatureDefMap()

    def refuse_tf_example_api(self, api: str, model: str, *rest: Any) -> InvalidRequest:
        return InvalidRequest(f"{api}: {model} has no such signature")


class Context:
    code: grpc.StatusCode | None = None

    def invocation_metadata(self) -> tuple[()]:
        return ()

    def peer(self) -> str:
        return "ipv4:127.0.0.1:40000"

    def time_remaining(self) -> float | None:
        return None  # no deadline

    def set_trailing_metadata(self, trailers: Any) -> None:
        pass

    async def abort(self, code: grpc.StatusCode, details: str, trailers: Any = ()) -> None:
        self.code = code
        raise grpc.aio.AbortError("Locally aborted.")


def call(servicer: Any, method: str, request: Any, context: Context | None = None) -> Any:
    return asyncio.run(getattr(servicer, method)(request, context or Context()))


SPEC = model_pb2.ModelSpec(name="m")


def test_status_and_metadata_are_answered_at_the_concurrency_limit() -> None:
    plane: Any = Plane()
    status = call(
        ModelServicer(plane),
        "GetModelStatus",
        get_model_status_pb2.GetModelStatusRequest(model_spec=SPEC),
    )
    assert status.model_version_status[0].state == VersionState.AVAILABLE
    request = get_model_metadata_pb2.GetModelMetadataRequest(
        model_spec=SPEC, metadata_field=["signature_def"]
    )
    metadata = call(PredictionServicer(plane), "GetModelMetadata", request)
    assert metadata.model_spec.name == "m"
    assert plane.concurrency.in_flight == 1  # nothing taken, nothing given back


def test_inference_calls_are_still_refused_at_the_limit() -> None:
    plane: Any = Plane()
    request = classification_pb2.ClassificationRequest(model_spec=SPEC)
    context = Context()
    with pytest.raises(grpc.aio.AbortError):
        call(PredictionServicer(plane), "Classify", request, context)
    assert context.code == grpc.StatusCode.RESOURCE_EXHAUSTED
