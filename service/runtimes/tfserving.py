"""The tfserving backend: each batch goes to a TensorFlow Serving over gRPC.

The gateway still decodes, resizes and batches; a batch becomes one
``PredictionService.Predict`` call carrying the images as a uint8 tensor in
``tensor_content`` (one byte per pixel, no JSON, no floats). The versions to serve are
those ``ModelService.GetModelStatus`` reports AVAILABLE, their signatures come from
``GetModelMetadata``, and labels, card and warmup records from the version folder when
this machine sees the repository (else labels are the class indices).

One channel per process, reused by every call; gRPC's own retry policy (the channel's
service config) retries calls that failed UNAVAILABLE. gRPC errors are translated here,
where they enter: TF Serving down is :class:`~service.errors.BackendUnavailable` (503;
the address goes to the log, not to clients); nothing restarts when it comes back, the
channel reconnects by itself. Which versions TF Serving serves is the business of
:class:`service.sources.TFServingSource`, above this module.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from service.contract import SERVING_SIGNATURE
from service.errors import (
    BackendUnavailable,
    CnnserveError,
    DeadlineExceeded,
    InternalError,
    InvalidRequest,
    ModelLoadError,
    NotFound,
    Overloaded,
    VersionGone,
)
from service.proto_gen.tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)
from service.runtimes.base import Batch, ModelInfo, Probabilities, Runtime
from service.runtimes.card import describe, signature_tensors, to_model_input
from service.tfserving_proto import (
    available_versions,
    model_spec,
    to_ndarray,
    to_tensor_proto,
)

log = logging.getLogger(__name__)

# gRPC retries a call that failed UNAVAILABLE, within the call's deadline. Safe: it means
# the call did not reach a working server (connection refused or reset, server shutting
# down), and none of these methods changes anything. Other codes are answers.
RETRY_POLICY = {
    "maxAttempts": 3,
    "initialBackoff": "0.05s",
    "maxBackoff": "0.2s",
    "backoffMultiplier": 4,
    "retryableStatusCodes": ["UNAVAILABLE"],
}
SERVICE_CONFIG = {
    "methodConfig": [
        {
            "name": [
                {"service": "tensorflow.serving.PredictionService"},
                {"service": "tensorflow.serving.ModelService"},
            ],
            "retryPolicy": RETRY_POLICY,
        }
    ]
}
CHANNEL_OPTIONS = [
    # Reconnect soon after TF Serving is back; gRPC's default backoff grows to 120 s.
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
    # Notice a peer that vanished without a TCP reset before a call hangs on it. Pings
    # only while calls are open: TF Serving, like any gRPC server, drops clients that
    # ping an idle connection more often than every 5 minutes.
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.keepalive_permit_without_calls", 0),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", -1),
    ("grpc.enable_retries", 1),
    ("grpc.service_config", json.dumps(SERVICE_CONFIG)),
]
# What clients are told while TF Serving cannot be reached (its address goes to the log).
UNREACHABLE = "the model backend (TF Serving) cannot be reached; retry shortly"
# GetModelStatus/GetModelMetadata are small; a scan must not hang for a full request timeout.
CONTROL_TIMEOUT = 5.0


class TFServingClient:
    """Blocking unary calls to one TF Serving; thread-safe (one shared channel)."""

    def __init__(self, address: str, timeout: float) -> None:
        self.address = address
        self.timeout = timeout
        self._channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
        predict = prediction_service_pb2_grpc.PredictionServiceStub(self._channel)  # type: ignore[no-untyped-call]
        models = model_service_pb2_grpc.ModelServiceStub(self._channel)  # type: ignore[no-untyped-call]
        self._methods = {
            "Predict": predict.Predict,
            "GetModelMetadata": predict.GetModelMetadata,
            "GetModelStatus": models.GetModelStatus,
            "HandleReloadConfigRequest": models.HandleReloadConfigRequest,
        }

    def call(self, method: str, request: Any, timeout: float | None = None) -> Any:
        """One call with a deadline (retried by the channel's policy within it).
        ``wait_for_ready=False``: with TF Serving down the call fails at once rather
        than waiting out its deadline."""
        stub = self._methods[method]
        try:
            return stub(request, timeout=timeout or self.timeout, wait_for_ready=False)
        except grpc.RpcError as exc:
            raise self._translate(method, exc) from None

    def _translate(self, method: str, exc: Any) -> CnnserveError:
        """Clients see what happened; the address and TF Serving's words go to the log
        (``detail``), except for the answers about their own request (404, 400)."""
        code, details = exc.code(), exc.details() or ""
        detail = f"TF Serving at {self.address}: {method}: {code.name}: {details}"
        if code == grpc.StatusCode.UNAVAILABLE:
            return BackendUnavailable(UNREACHABLE, detail=detail)
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return DeadlineExceeded(
                "the request deadline passed while the model backend (TF Serving) ran it",
                detail=detail,
            )
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            return Overloaded(
                "the model backend (TF Serving) is overloaded; retry shortly",
                detail=detail,
                reason="backend",
            )
        if code == grpc.StatusCode.NOT_FOUND:
            return NotFound(f"the model backend (TF Serving) has no such model: {details}")
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            return InvalidRequest(f"the model backend (TF Serving) refused the request: {details}")
        return InternalError(f"TF Serving: {method} failed", detail=detail)

    def available(self, model: str) -> list[int]:
        """The model's versions TF Serving reports AVAILABLE; [] for a model it lacks."""
        request = get_model_status_pb2.GetModelStatusRequest(model_spec=model_spec(model))
        try:
            return available_versions(self.call("GetModelStatus", request, CONTROL_TIMEOUT))
        except NotFound:
            return []

    def close(self) -> None:
        self._channel.close()


class TFServingRuntime(Runtime):
    """One version served by TF Serving; ``load`` reads its signature from there."""

    name = "tfserving"

    def __init__(self, client: TFServingClient, model: str, version: int, path: Path) -> None:
        super().__init__(path)  # the card, if this machine sees the folder
        self._client = client  # shared by the source's versions: it closes it, not unload
        self._model = model
        self._version = version

    def load(self) -> ModelInfo:
        request = get_model_metadata_pb2.GetModelMetadataRequest(
            model_spec=model_spec(self._model, self._version), metadata_field=["signature_def"]
        )
        response = self._client.call("GetModelMetadata", request, CONTROL_TIMEOUT)
        where = Path(self._client.address) / self._model / str(self._version)
        signatures = get_model_metadata_pb2.SignatureDefMap()
        if not response.metadata["signature_def"].Unpack(signatures):
            raise ModelLoadError(f"{where}: GetModelMetadata answered no signature_def")
        if SERVING_SIGNATURE not in signatures.signature_def:
            known = sorted(signatures.signature_def)
            raise ModelLoadError(f"{where}: no {SERVING_SIGNATURE!r} signature (has {known})")
        info = describe(
            *signature_tensors(signatures.signature_def[SERVING_SIGNATURE]), self.card, where
        )
        self._signatures = signatures
        self._info = info
        log.info("%s is served by TF Serving at %s", where, self._client.address)
        return info

    def predict(self, batch: Batch, deadline: float | None = None) -> Probabilities:
        info = self.info
        x = to_model_input(batch, info.input)
        request = predict_pb2.PredictRequest(
            model_spec=model_spec(self._model, self._version, SERVING_SIGNATURE),
            output_filter=[info.output_name],
        )
        request.inputs[info.input_name].CopyFrom(to_tensor_proto(x, packed=True))
        timeout = None if deadline is None else max(0.001, deadline - time.monotonic())
        try:
            response = self._client.call("Predict", request, timeout)
        except NotFound as exc:
            raise VersionGone(
                f"version {self._version} of model {self._model!r} is no longer served by the "
                "model backend; see GET /v1/models/" + self._model,
                detail=exc.log_message(),
            ) from None
        if info.output_name not in response.outputs:
            raise InternalError(f"TF Serving answered no {info.output_name!r} output")
        try:
            out = to_ndarray(response.outputs[info.output_name], info.output_name)
        except InvalidRequest as exc:  # a malformed answer is the server's fault, not ours
            raise InternalError(f"TF Serving answered an unreadable tensor: {exc}") from None
        return np.asarray(out, dtype=np.float32)
