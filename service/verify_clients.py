"""The live side of `cnnserve verify`: a server classifying encoded images, over REST
(/v1/classify) or gRPC (TF Serving's Predict on the encoded-bytes signature)."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator, Sequence
from typing import Any

from PIL import Image

from service.contract import BYTES_INPUT_NAME, BYTES_SIGNATURE, OUTPUT_NAME
from service.errors import DatasetError

# (class id, score) of each image in a batch.
Served = list[tuple[int, float]]


class RestServer:
    """POST /v1/classify with several images per request (multipart), top_k=1."""

    def __init__(self, url: str, headers: dict[str, str] | None = None) -> None:
        import httpx

        self.url = url.rstrip("/")
        self._client = httpx.Client(base_url=self.url, timeout=60, headers=headers or {})

    def label_version(self, model: str | None, label: str) -> int:
        model = model or self.classify([PROBE], model, None)[0]
        response = self._client.get(f"/v1/models/{model}/labels/{label}")
        _check(response.status_code, response.text)
        return int(response.json()["model_version_status"][0]["version"])

    def classify(
        self, images: Sequence[bytes], model: str | None, version: int | None
    ) -> tuple[str, int, Served]:
        params: dict[str, Any] = {"top_k": 1}
        if model:
            params["model"] = model
        if version is not None:
            params["version"] = version
        files = [
            ("image", (f"{i}", data, "application/octet-stream")) for i, data in enumerate(images)
        ]
        response = self._client.post("/v1/classify", params=params, files=files)
        _check(response.status_code, response.text)
        body = response.json()
        rows = body.get("results") or [{"predictions": body["predictions"]}]
        served = [
            (int(r["predictions"][0]["class_id"]), float(r["predictions"][0]["score"]))
            for r in rows
        ]
        return str(body["model"]), int(body["version"]), served

    def close(self) -> None:
        self._client.close()


class GrpcServer:
    """TF Serving's PredictionService.Predict on the encoded-bytes signature, so the
    check also runs against a TF Serving itself (whose graph then decodes)."""

    def __init__(self, address: str) -> None:
        import grpc

        from service.proto_gen.tensorflow_serving.apis import prediction_service_pb2_grpc

        self.url = address
        self._channel = grpc.insecure_channel(
            address, options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)]
        )
        self._stub = prediction_service_pb2_grpc.PredictionServiceStub(  # type: ignore[no-untyped-call]
            self._channel
        )

    def label_version(self, model: str | None, label: str) -> int:
        from service.proto_gen.tensorflow_serving.apis import (
            get_model_status_pb2,
            model_service_pb2_grpc,
        )

        if not model:
            raise DatasetError("--grpc needs --model (gRPC has no default model)")
        stub = model_service_pb2_grpc.ModelServiceStub(self._channel)  # type: ignore[no-untyped-call]
        request = get_model_status_pb2.GetModelStatusRequest()
        request.model_spec.name = model
        request.model_spec.version_label = label
        with _grpc_errors():
            answer = stub.GetModelStatus(request, timeout=30)
        return int(answer.model_version_status[0].version)

    def classify(
        self, images: Sequence[bytes], model: str | None, version: int | None
    ) -> tuple[str, int, Served]:
        from service.proto_gen.tensorflow.core.framework import (
            tensor_pb2,
            tensor_shape_pb2,
            types_pb2,
        )
        from service.proto_gen.tensorflow_serving.apis import predict_pb2
        from service.tfserving_proto import to_ndarray

        if not model:
            raise DatasetError("--grpc needs --model (gRPC has no default model)")
        request = predict_pb2.PredictRequest()
        request.model_spec.name = model
        request.model_spec.signature_name = BYTES_SIGNATURE
        if version is not None:
            request.model_spec.version.value = version
        request.inputs[BYTES_INPUT_NAME].CopyFrom(
            tensor_pb2.TensorProto(
                dtype=types_pb2.DT_STRING,
                tensor_shape=tensor_shape_pb2.TensorShapeProto(
                    dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=len(images))]
                ),
                string_val=list(images),
            )
        )
        with _grpc_errors():
            answer = self._stub.Predict(request, timeout=60)
        probabilities = to_ndarray(answer.outputs[OUTPUT_NAME], OUTPUT_NAME)
        top = probabilities.argmax(axis=1)
        served = [(int(c), float(probabilities[i, c])) for i, c in enumerate(top)]
        return answer.model_spec.name, int(answer.model_spec.version.value), served

    def close(self) -> None:
        self._channel.close()


@contextlib.contextmanager
def _grpc_errors() -> Iterator[None]:
    import grpc

    try:
        yield
    except grpc.RpcError as exc:
        raise DatasetError(f"the server answered {exc.code().name}: {exc.details()}") from None


def _check(status: int, body: str) -> None:
    if status != 200:
        raise DatasetError(f"the server answered {status}: {body[:300]}")


def _probe() -> bytes:
    """A black 28×28 PNG: one image to learn which model and version answer."""
    out = io.BytesIO()
    Image.new("L", (28, 28)).save(out, "PNG")
    return out.getvalue()


PROBE = _probe()
