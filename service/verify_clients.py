"""The live side of `cnnserve verify`: a server classifying encoded images, over REST
(/v1/classify) or gRPC (TF Serving's Predict on the encoded-bytes signature)."""

from __future__ import annotations

import io
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO, TypeVar
from urllib.parse import quote

from PIL import Image

from service.client_trust import grpc_credentials, https_verify, untrusted
from service.contract import BYTES_INPUT_NAME, BYTES_SIGNATURE, OUTPUT_NAME
from service.errors import DatasetError

# (class id, score) of each image in a batch.
Served = list[tuple[int, float]]
T = TypeVar("T")

# A request the server shed (503 / RESOURCE_EXHAUSTED: its queue was past the latency
# budget) says nothing about skew: it is sent again after the server's Retry-After, so a
# busy server (or verify's own requests in flight) does not fail the check. Bounded, so
# a server that sheds everything still ends the run with its answer.
RETRIES = 8
MAX_RETRY_WAIT = 5.0


class Shed(Exception):
    """The server refused a request for load; worth sending again after `wait` s."""

    def __init__(self, answer: str, wait: float) -> None:
        super().__init__(answer)
        self.answer = answer
        self.wait = wait


def with_retries(call: Callable[[], T], notices: TextIO) -> T:
    """Run `call`, sending it again after each Shed up to RETRIES times; each wait is
    told on `notices`."""
    for attempt in range(RETRIES + 1):
        try:
            return call()
        except Shed as shed:
            if attempt == RETRIES:
                raise DatasetError(
                    f"the server kept refusing for load ({RETRIES + 1} tries): {shed.answer}"
                ) from None
            print(
                f"verify: the server shed a request ({shed.answer}); "
                f"sending it again in {shed.wait:g} s",
                file=notices,
                flush=True,
            )
            time.sleep(shed.wait)
    raise AssertionError("unreachable")


class RestServer:
    """POST /v1/classify with several images per request (multipart), top_k=1."""

    def __init__(
        self,
        url: str,
        headers: dict[str, str] | None = None,
        notices: TextIO = sys.stderr,
        *,
        ca_cert: Path | None = None,
    ) -> None:
        import httpx

        if not url.startswith(("http://", "https://")):
            raise DatasetError(f"--url {url!r} needs its scheme, e.g. http://localhost:8000")
        self.url = url.rstrip("/")
        self.notices = notices
        self._ca_cert = ca_cert
        try:
            self._client = httpx.Client(
                base_url=self.url, timeout=60, headers=headers or {}, verify=https_verify(ca_cert)
            )
        except httpx.InvalidURL as exc:  # not an HTTPError: no handler of those sees it
            raise DatasetError(f"--url {url!r} is not a URL: {exc}") from None

    def _send(self, method: str, path: str, **kwargs: Any) -> Any:
        """One request, checked (:func:`_checked`); no answer at all is a DatasetError
        naming the server, not a traceback (and not the exit status of a skew)."""
        import httpx

        try:
            return _checked(self._client.request(method, path, **kwargs))
        except httpx.TransportError as exc:
            if (message := untrusted(self.url, exc, self._ca_cert)) is not None:
                raise DatasetError(message) from None
            raise DatasetError(
                f"no answer from {self.url}: {exc}; is the server running?"
            ) from None

    def served_card(self, model: str, version: int) -> dict[str, Any] | None:
        """The model card the server serves for the version (its demo route), or None
        when it cannot tell (no such route: another server, or TF Serving)."""
        import httpx

        path = f"/demo/models/{quote(model, safe='')}/versions/{version}/card"
        try:
            response = self._client.get(path)
        except httpx.HTTPError:
            return None
        if response.status_code != 200:
            return None
        try:
            card = response.json().get("card")
        except (ValueError, AttributeError):
            return None
        return card if isinstance(card, dict) else None

    def label_version(self, model: str | None, label: str) -> int:
        model = model or self.classify([PROBE], model, None)[0]
        # The label's version is in its metadata's model_spec (TF Serving's status by
        # label lists every version, newest first).
        response = with_retries(
            lambda: self._send("GET", f"/v1/models/{model}/labels/{label}/metadata"),
            self.notices,
        )
        return int(response.json()["model_spec"]["version"])

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
        response = with_retries(
            lambda: self._send("POST", "/v1/classify", params=params, files=files),
            self.notices,
        )
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

    def __init__(
        self,
        address: str,
        notices: TextIO = sys.stderr,
        *,
        metadata: dict[str, str] | None = None,
        tls: bool = False,
        ca_cert: Path | None = None,
    ) -> None:
        import grpc

        from service.proto_gen.tensorflow_serving.apis import prediction_service_pb2_grpc

        self.url = address
        self.notices = notices
        # gRPC metadata keys are lower case (an API key's "authorization").
        self._metadata = tuple((key.lower(), value) for key, value in (metadata or {}).items())
        options = [("grpc.max_receive_message_length", 64 * 1024 * 1024)]
        if tls:
            credentials = grpc_credentials(ca_cert)
            self._channel = grpc.secure_channel(address, credentials, options=options)
        else:
            self._channel = grpc.insecure_channel(address, options=options)
        self._stub = prediction_service_pb2_grpc.PredictionServiceStub(  # type: ignore[no-untyped-call]
            self._channel
        )

    def label_version(self, model: str | None, label: str) -> int:
        from service.proto_gen.tensorflow_serving.apis import get_model_metadata_pb2

        if not model:
            raise DatasetError("--grpc needs --model (gRPC has no default model)")
        # GetModelMetadata resolves the label (its model_spec has the version);
        # TF Serving's GetModelStatus ignores a label and lists every version.
        request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
        request.model_spec.name = model
        request.model_spec.version_label = label
        answer = with_retries(
            lambda: self._call(self._stub.GetModelMetadata, request, 30),
            self.notices,
        )
        return int(answer.model_spec.version.value)

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
        answer = with_retries(
            lambda: self._call(self._stub.Predict, request, 60),
            self.notices,
        )
        probabilities = to_ndarray(answer.outputs[OUTPUT_NAME], OUTPUT_NAME)
        top = probabilities.argmax(axis=1)
        served = [(int(c), float(probabilities[i, c])) for i, c in enumerate(top)]
        return answer.model_spec.name, int(answer.model_spec.version.value), served

    def _call(self, method: Callable[..., T], request: Any, timeout: float) -> T:
        """One call with the key's metadata; a refusal for load is Shed, anything else
        a DatasetError naming what answered (or did not)."""
        import grpc

        try:
            return method(request, timeout=timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            answer = f"the server answered {exc.code().name}: {exc.details()}"
            trailers = dict(exc.trailing_metadata() or ())
            if "retry-after" in trailers:  # shed for load, not a message too large
                raise Shed(answer, _wait(trailers["retry-after"])) from None
            if exc.code() == grpc.StatusCode.UNAVAILABLE:  # no connection: a TLS mismatch too
                raise DatasetError(
                    f"no answer from {self.url} ({exc.details()}): is the server running, and "
                    "does it serve TLS (--tls, --ca-cert) or not?"
                ) from None
            raise DatasetError(answer) from None

    def close(self) -> None:
        self._channel.close()


def _checked(response: Any) -> Any:
    """The httpx response if it is a 200; Shed for a 503/429 with Retry-After;
    DatasetError otherwise."""
    if response.status_code == 200:
        return response
    answer = f"the server answered {response.status_code}: {response.text[:300]}"
    if response.status_code in (429, 503) and "retry-after" in response.headers:
        raise Shed(answer, _wait(response.headers.get("retry-after")))
    raise DatasetError(answer)


def _wait(retry_after: str) -> float:
    """Seconds to wait from a Retry-After in its delay-seconds form (1 s when it is an
    HTTP date or odd), at most MAX_RETRY_WAIT."""
    try:
        seconds = float(retry_after)
    except ValueError:
        return 1.0
    return min(seconds, MAX_RETRY_WAIT) if seconds >= 0 else 1.0  # nan fails too


def _probe() -> bytes:
    """A black 28×28 PNG: one image to learn which model and version answer."""
    out = io.BytesIO()
    Image.new("L", (28, 28)).save(out, "PNG")
    return out.getvalue()


PROBE = _probe()
