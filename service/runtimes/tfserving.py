"""The tfserving backend: each batch goes to a TensorFlow Serving over gRPC.

The gateway still decodes, resizes and batches; a batch becomes one
``PredictionService.Predict`` call carrying the images as a uint8 tensor in
``tensor_content`` (one byte per pixel, no JSON, no floats). The versions to serve are
those ``ModelService.GetModelStatus`` reports AVAILABLE, their signatures come from
``GetModelMetadata``, and labels, card and warmup records from the version folder when
this machine sees the repository (else labels are the class indices).

One channel per process, reused by every call. gRPC errors are translated here, where
they enter: TF Serving down is :class:`~service.errors.BackendUnavailable` (503, naming
the address); nothing restarts when it comes back, the channel reconnects by itself.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from service.config import Settings
from service.errors import (
    BackendUnavailable,
    CnnserveError,
    DeadlineExceeded,
    InternalError,
    InvalidRequest,
    ModelLoadError,
    NotFound,
    Overloaded,
)
from service.loading import PreparedVersion, prepare_runtime
from service.repository import Fingerprint, read_repository
from service.routing import VersionKey
from service.runtimes.base import Batch, ModelInfo, Probabilities, Runtime
from service.runtimes.card import SIGNATURE, TensorDesc, describe, read_card, to_model_input
from service.sources import Scan
from service.tfserving_proto import (
    available_versions,
    dtype_name,
    model_spec,
    tensor_dims,
    to_ndarray,
    to_tensor_proto,
)

log = logging.getLogger(__name__)

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
]
# Pauses before the second and third attempt of a call that failed UNAVAILABLE.
RETRY_DELAYS = (0.05, 0.2)
# GetModelStatus/GetModelMetadata are small; a scan must not hang for a full request timeout.
CONTROL_TIMEOUT = 5.0


class TFServingClient:
    """Blocking unary calls to one TF Serving; thread-safe (one shared channel)."""

    def __init__(self, address: str, timeout: float) -> None:
        self.address = address
        self.timeout = timeout
        self._channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
        predict = prediction_service_pb2_grpc.PredictionServiceStub(self._channel)
        models = model_service_pb2_grpc.ModelServiceStub(self._channel)
        self._methods = {
            "Predict": predict.Predict,
            "GetModelMetadata": predict.GetModelMetadata,
            "GetModelStatus": models.GetModelStatus,
        }

    def call(self, method: str, request: Any, timeout: float | None = None) -> Any:
        """One call with a deadline; UNAVAILABLE is retried at most twice within it.

        Retrying is safe: UNAVAILABLE means the call did not reach a working server
        (connection refused or reset, server shutting down), and none of these methods
        changes anything, so even a retry of a call that did run only repeats a read.
        Other codes are answers and are not retried. ``wait_for_ready=False``: with TF
        Serving down the call fails at once rather than waiting out its deadline.
        """
        stub = self._methods[method]
        deadline = time.monotonic() + (timeout or self.timeout)
        for attempt in range(len(RETRY_DELAYS) + 1):
            try:
                remaining = max(0.001, deadline - time.monotonic())
                return stub(request, timeout=remaining, wait_for_ready=False)
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.UNAVAILABLE and attempt < len(RETRY_DELAYS):
                    delay = RETRY_DELAYS[attempt]
                    if time.monotonic() + delay < deadline:
                        time.sleep(delay)
                        continue
                raise self._translate(method, exc) from None
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _translate(self, method: str, exc: Any) -> CnnserveError:
        code, details = exc.code(), exc.details() or ""
        where = f"TF Serving at {self.address}"
        if code == grpc.StatusCode.UNAVAILABLE:
            return BackendUnavailable(f"{where} is unavailable ({details}); retry shortly")
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return DeadlineExceeded(f"{where} did not answer {method} in time")
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            return Overloaded(f"{where} is overloaded ({details}); retry shortly")
        if code == grpc.StatusCode.NOT_FOUND:
            return NotFound(f"{where}: {details}")
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            return InvalidRequest(f"{where} refused the request: {details}")
        return InternalError(f"{where}: {method} failed with {code.name}: {details}")

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
        super().__init__(path)
        self._client = client
        self._model = model
        self._version = version
        self._signatures: Any = None

    def load(self) -> ModelInfo:
        request = get_model_metadata_pb2.GetModelMetadataRequest(
            model_spec=model_spec(self._model, self._version), metadata_field=["signature_def"]
        )
        response = self._client.call("GetModelMetadata", request, CONTROL_TIMEOUT)
        where = Path(self._client.address) / self._model / str(self._version)
        signatures = get_model_metadata_pb2.SignatureDefMap()
        if not response.metadata["signature_def"].Unpack(signatures):
            raise ModelLoadError(f"{where}: GetModelMetadata answered no signature_def")
        if SIGNATURE not in signatures.signature_def:
            known = sorted(signatures.signature_def)
            raise ModelLoadError(f"{where}: no {SIGNATURE!r} signature (has {known})")
        signature = signatures.signature_def[SIGNATURE]

        def tensors(infos: Any) -> dict[str, TensorDesc]:
            return {n: TensorDesc(dtype_name(t.dtype), tensor_dims(t)) for n, t in infos.items()}

        info = describe(
            tensors(signature.inputs),
            tensors(signature.outputs),
            read_card(self.version_dir),
            where,
        )
        self._signatures = signatures
        self._info = info
        log.info("%s is served by TF Serving at %s", where, self._client.address)
        return info

    def predict(self, batch: Batch, deadline: float | None = None) -> Probabilities:
        info = self.info
        x = to_model_input(batch, info.input)
        request = predict_pb2.PredictRequest(
            model_spec=model_spec(self._model, self._version, SIGNATURE),
            output_filter=[info.output_name],
        )
        request.inputs[info.input_name].CopyFrom(to_tensor_proto(x, packed=True))
        timeout = None if deadline is None else max(0.001, deadline - time.monotonic())
        response = self._client.call("Predict", request, timeout)
        if info.output_name not in response.outputs:
            raise InternalError(f"TF Serving answered no {info.output_name!r} output")
        try:
            out = to_ndarray(response.outputs[info.output_name], info.output_name)
        except InvalidRequest as exc:  # a malformed answer is the server's fault, not ours
            raise InternalError(f"TF Serving answered an unreadable tensor: {exc}") from None
        return np.asarray(out, dtype=np.float32)

    def signature_defs(self) -> Any:
        if self._signatures is None:
            raise RuntimeError(f"{self._model}/{self._version} is not loaded")
        return self._signatures

    def unload(self) -> None:
        self._signatures = None  # the channel is shared; the source closes it
        super().unload()


class TFServingSource:
    """Versions TF Serving reports AVAILABLE for the models of the local models.config.

    The gateway reads models.config to know the model names (TF Serving has no call that
    lists them); TF Serving applies the same config, so the version policies agree.
    """

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self.client = TFServingClient(settings.tfserving_address, settings.request_timeout_seconds)
        self._scans = 0
        self._reachable = True
        if settings.poll_seconds <= 0:
            log.warning(
                "poll_seconds is 0: TF Serving's versions are read once, at start; a TF "
                "Serving that is not up by then is never used"
            )

    def scan(self) -> Scan:
        configs = read_repository(self._settings.model_repository)
        self._scans += 1
        versions: dict[str, dict[int, Path]] = {}
        unknown: set[str] = set()
        problem: CnnserveError | None = None
        for config in configs:
            try:
                found = self.client.available(config.name)
            except CnnserveError as exc:
                unknown.add(config.name)
                problem = exc
                continue
            versions[config.name] = {v: config.base_path / str(v) for v in found}
        self._note(problem)
        # A remote load that failed is retried on the next scan: the usual cause, TF
        # Serving restarting, is gone by then, and there is no folder whose change to wait for.
        fingerprints: dict[VersionKey, Fingerprint] = {
            (m, v): (self._scans,) for m, found in versions.items() for v in found
        }
        return Scan(configs, versions, fingerprints, frozenset(unknown))

    def _note(self, problem: CnnserveError | None) -> None:
        """Log a change of reachability once, not on every poll."""
        if problem is not None and self._reachable:
            log.warning("%s; current versions keep their routes meanwhile", problem.message)
        elif problem is None and not self._reachable:
            log.info("TF Serving at %s answers again", self.client.address)
        self._reachable = problem is None

    def prepare(self, key: VersionKey, path: Path) -> PreparedVersion:
        model, version = key
        return prepare_runtime(TFServingRuntime(self.client, model, version, path), path)

    def close(self) -> None:
        self.client.close()
