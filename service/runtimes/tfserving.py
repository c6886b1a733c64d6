"""The tfserving backend: each batch goes to a TensorFlow Serving over gRPC.

The gateway still decodes, resizes and batches; a batch becomes one
``PredictionService.Predict`` call carrying the images as a uint8 tensor in
``tensor_content`` (one byte per pixel, no JSON, no floats). The versions to serve are
those ``ModelService.GetModelStatus`` reports AVAILABLE, their signatures come from
``GetModelMetadata``, and labels, card and warmup records from the version folder when
this machine sees the repository (else labels are the class indices).

One channel per process, reused by every call; gRPC's own retry policy (the channel's
service config) retries control calls (status, metadata) that failed UNAVAILABLE; a
Predict is sent once (RETRY_POLICY). gRPC errors are translated here,
where they enter: TF Serving down is :class:`~service.errors.BackendUnavailable` (503;
the address goes to the log, not to clients); nothing restarts when it comes back, the
channel reconnects by itself. Which versions TF Serving serves is the business of
:class:`service.sources.TFServingSource`, above this module.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
from google.protobuf.message import DecodeError

from service.contract import SERVING_SIGNATURE
from service.errors import (
    BackendError,
    BackendUnavailable,
    ClientClosedRequest,
    CnnserveError,
    DeadlineExceeded,
    InvalidRequest,
    ModelLoadError,
    NotFound,
    Overloaded,
    VersionGone,
)
from service.proto_gen.tensorflow.core.framework import types_pb2
from service.proto_gen.tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)
from service.runtimes.base import Batch, BatchDeadline, ModelInfo, Probabilities, Runtime
from service.runtimes.card import describe, signature_tensors, to_model_input
from service.tfserving_proto import (
    available_versions,
    dtype_name,
    loading_versions,
    model_spec,
    to_ndarray,
    to_tensor_proto,
)

log = logging.getLogger(__name__)

# gRPC retries a control call (status, metadata) that failed UNAVAILABLE, within the
# call's deadline: none changes anything. Not Predict: TF Serving answers UNAVAILABLE
# when its batch queue is full, and three tries each tripled the load of a backend
# already over it; its clients get a 503 and Retry-After instead.
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
                {"service": "tensorflow.serving.PredictionService", "method": "GetModelMetadata"},
                {"service": "tensorflow.serving.ModelService"},
            ],
            "retryPolicy": RETRY_POLICY,
        }
    ]
}
# The largest answer taken: 10,000 classes for a batch of 256 is 10 MB of float32.
RECEIVE_LIMIT = 64 * 1024 * 1024
# What scores may travel as: the model's output, never fed back as pixels.
SCORE_DTYPES = frozenset({types_pb2.DT_FLOAT, types_pb2.DT_DOUBLE})
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
    ("grpc.max_receive_message_length", RECEIVE_LIMIT),
    ("grpc.max_send_message_length", -1),
    ("grpc.enable_retries", 1),
    ("grpc.service_config", json.dumps(SERVICE_CONFIG)),
]
# What clients are told while TF Serving cannot be reached (its address goes to the log).
UNREACHABLE = "the model backend (TF Serving) cannot be reached; retry shortly"
# What gRPC's client says of a call that never reached a server (connection refused,
# reset or closed, no address), as opposed to TF Serving answering UNAVAILABLE itself.
_TRANSPORT_WORDS = ("connect", "socket closed", "connection reset", "dns resolution", "goaway")
# A version's backend fault of one kind is logged at most once in this many seconds.
RELOG_SECONDS = 60
# What a Predict TF Serving ended CANCELLED or ABORTED (stopping with it in flight) says.
DROPPED = "the model backend (TF Serving) dropped the call; retry shortly"
# A Predict's DEADLINE_EXCEEDED this long or more before its own deadline is the
# backend's limit, not the request's deadline.
EARLY_DEADLINE_SECONDS = 0.5
Reported = TypeVar("Reported", bound=CnnserveError)
# GetModelStatus/GetModelMetadata are small; a scan must not hang for a full request timeout.
CONTROL_TIMEOUT = 5.0


class TFServingClient:
    """Blocking unary calls to one TF Serving; thread-safe (one shared channel)."""

    def __init__(
        self,
        address: str,
        timeout: float,
        ca_file: Path | None = None,
        *,
        own_connection: bool = False,
    ) -> None:
        """``ca_file``: TLS, TF Serving's certificate checked against these (PEM).
        ``own_connection``: a connection of its own, not the one gRPC shares between the
        process's channels to the same address with the same options (a new channel
        otherwise reuses an open one: the same server process behind SO_REUSEPORT)."""
        self.address = address
        self.timeout = timeout
        self.tls = ca_file is not None
        options = [*CHANNEL_OPTIONS, ("grpc.use_local_subchannel_pool", 1 if own_connection else 0)]
        if ca_file is None:
            self._channel = grpc.insecure_channel(address, options=options)
        else:
            trusted = grpc.ssl_channel_credentials(root_certificates=ca_file.read_bytes())
            self._channel = grpc.secure_channel(address, trusted, options=options)
        # What the last poll of TF Serving failed with, or None (see call).
        self.down: CnnserveError | None = None
        predict = prediction_service_pb2_grpc.PredictionServiceStub(self._channel)  # type: ignore[no-untyped-call]
        models = model_service_pb2_grpc.ModelServiceStub(self._channel)  # type: ignore[no-untyped-call]
        self._methods = {
            "Predict": predict.Predict,
            "GetModelMetadata": predict.GetModelMetadata,
            "GetModelStatus": models.GetModelStatus,
            "HandleReloadConfigRequest": models.HandleReloadConfigRequest,
        }

    def call(
        self,
        method: str,
        request: Any,
        timeout: float | None = None,
        abandoned: BatchDeadline | None = None,
    ) -> Any:
        """One call with a deadline (a control call retried by the channel's policy
        within it), cancelled once ``abandoned`` says nobody waits for its answer.
        ``wait_for_ready=False``: with TF Serving down the call fails at once rather
        than waiting out its deadline. While the polls fail (TF Serving unreachable, or
        failing them), a Predict fails at once with their error: it waited its whole
        deadline on a backend that stopped without closing its connections."""
        down = self.down
        if method == "Predict" and down is not None:
            raise copy.copy(down)
        stub = self._methods[method]
        call = stub.future(request, timeout=timeout or self.timeout, wait_for_ready=False)
        if abandoned is not None:
            abandoned.on_abandoned(call.cancel)
        try:
            return call.result()
        except grpc.FutureCancelledError:
            raise ClientClosedRequest(
                "every request of the batch gave up before the model backend answered",
                detail=f"TF Serving at {self.address}: {method} cancelled",
            ) from None
        except grpc.RpcError as exc:
            raise self._translate(method, exc) from None

    def _translate(self, method: str, exc: Any) -> CnnserveError:
        """Clients see what happened; the address and TF Serving's words go to the log
        (``detail``), except for the answers about their own request (404, 400)."""
        code, details = exc.code(), exc.details() or ""
        detail = f"TF Serving at {self.address}: {method}: {code.name}: {details}"
        if code == grpc.StatusCode.UNAVAILABLE and (
            method != "Predict" or any(w in details.lower() for w in _TRANSPORT_WORDS)
        ):
            if not self.tls and "socket closed" in details.lower():
                # What a TF Serving that speaks TLS answers a plaintext client.
                detail += " (if it speaks TLS, set CNNSERVE_TFSERVING_CA_FILE)"
            return BackendUnavailable(UNREACHABLE, detail=detail)
        if code == grpc.StatusCode.UNAVAILABLE:
            # TF Serving answered it: its batch queue is full, or it is stopping.
            return Overloaded(
                "the model backend (TF Serving) refused the call for now (its queue is "
                "full, or it is stopping); retry shortly",
                detail=detail,
                reason="backend",
            )
        if code in (grpc.StatusCode.CANCELLED, grpc.StatusCode.ABORTED):
            # TF Serving stopping with the call in flight: another try may find it (or a
            # sibling replica) up, unlike a failure no retry mends (BackendError).
            return BackendUnavailable(DROPPED, detail=detail)
        if code == grpc.StatusCode.DEADLINE_EXCEEDED and method != "Predict":
            return DeadlineExceeded(
                f"the model backend (TF Serving) did not answer {method} in time", detail=detail
            )
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return DeadlineExceeded(
                "the request deadline passed while the model backend (TF Serving) ran it",
                detail=detail,
            )
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED and f"vs. {RECEIVE_LIMIT})" in details:
            # This channel's own receive limit, not TF Serving's load: no retry mends it.
            return BackendError(
                "the model backend (TF Serving) answered more than the gateway takes "
                f"({RECEIVE_LIMIT >> 20} MiB)",
                detail=detail,
            )
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in details:
            return BackendError(
                f"the model backend (TF Serving) refused the gateway's {method} as larger "
                "than it takes (its gRPC receive limit: raise it with TF Serving's "
                "--grpc_channel_arguments=grpc.max_receive_message_length=..., or lower "
                "CNNSERVE_MAX_BATCH_SIZE)",
                detail=detail,
            )
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            return Overloaded(
                "the model backend (TF Serving) is overloaded; retry shortly",
                detail=detail,
                reason="backend",
            )
        if code == grpc.StatusCode.NOT_FOUND:  # its words to the log, as for other codes
            return NotFound("the model backend (TF Serving) has no such model", detail=detail)
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            # The gateway built the Predict from input it had checked against the
            # version's signature: a refusal means TF Serving's model is not that one.
            why = (
                "its model does not take what this version's signature says"
                if method == "Predict"
                else "the gateway and TF Serving disagree on the API"
            )
            return BackendError(
                f"the model backend (TF Serving) refused the gateway's {method} "
                f"(INVALID_ARGUMENT): {why}; the gateway's log has its words",
                detail=detail,
            )
        return BackendError(
            f"the model backend (TF Serving) failed a {method} call: {code.name}", detail=detail
        )

    def available(self, model: str) -> list[int]:
        """The model's versions TF Serving reports AVAILABLE; [] for a model it lacks."""
        return self.versions(model)[0]

    def versions(self, model: str) -> tuple[list[int], list[int]]:
        """The model's versions TF Serving reports AVAILABLE, and those it is loading
        (START, LOADING); both [] for a model it lacks."""
        request = get_model_status_pb2.GetModelStatusRequest(model_spec=model_spec(model))
        try:
            response = self.call("GetModelStatus", request, CONTROL_TIMEOUT)
        except NotFound:
            return [], []
        return available_versions(response), loading_versions(response)

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
        self._faults: dict[str, float] = {}  # kind of backend fault → when last logged

    def load(self) -> ModelInfo:
        request = get_model_metadata_pb2.GetModelMetadataRequest(
            model_spec=model_spec(self._model, self._version), metadata_field=["signature_def"]
        )
        response = self._client.call("GetModelMetadata", request, CONTROL_TIMEOUT)
        # Clients read load failures in the version's status: not TF Serving's address.
        where = Path("TF Serving") / self._model / str(self._version)
        signatures = get_model_metadata_pb2.SignatureDefMap()
        try:
            unpacked = response.metadata["signature_def"].Unpack(signatures)
        except DecodeError as exc:
            raise ModelLoadError(f"{where}: GetModelMetadata answered garbage: {exc}") from None
        if not unpacked:
            raise ModelLoadError(f"{where}: GetModelMetadata answered no signature_def")
        if SERVING_SIGNATURE not in signatures.signature_def:
            known = sorted(signatures.signature_def)
            raise ModelLoadError(f"{where}: no {SERVING_SIGNATURE!r} signature (has {known})")
        info = describe(
            *signature_tensors(signatures.signature_def[SERVING_SIGNATURE]), self.card, where
        )
        self._signatures = signatures
        self._info = info
        log.info(
            "%s version %d is served by TF Serving at %s",
            self._model,
            self._version,
            self._client.address,
        )
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
        abandoned = deadline if isinstance(deadline, BatchDeadline) else None
        started = time.monotonic()
        try:
            response = self._client.call("Predict", request, timeout, abandoned)
        except NotFound as exc:
            raise VersionGone(
                f"version {self._version} of model {self._model!r} is no longer served by the "
                "model backend; see GET /v1/models/" + self._model,
                detail=exc.log_message(),
            ) from None
        except BackendError as exc:
            raise self._reported(exc) from None
        except DeadlineExceeded as exc:
            left = (timeout or self._client.timeout) - (time.monotonic() - started)
            if left > EARLY_DEADLINE_SECONDS:
                # Not this request's deadline: told so, it was a 504 "the request deadline
                # passed" 6 ms into a 30 s one, and counted as the request's expiry.
                raise self._reported(
                    BackendError(
                        "the model backend (TF Serving) answered DEADLINE_EXCEEDED before "
                        "the request's deadline: a time limit of its own (or of a proxy "
                        "before it) cut the call",
                        detail=exc.detail,
                    )
                ) from None
            raise
        except BackendUnavailable as exc:
            if exc.message == DROPPED:  # a poll's "unreachable" is logged by the poll
                self._reported(exc)
            raise
        return self._scores(response, len(x), info)

    def _scores(self, response: Any, rows: int, info: ModelInfo) -> Probabilities:
        """The answer's scores, checked on every call, as TF Serving's model can change
        under the gateway (a 5-column answer was served with 10 labels, NaN as a score,
        a 1-D answer was a 500 with a traceback per request, an answer with a shape and
        no values was all zeros). Messages leave the batch's size out where they can:
        one line in the log however the batches vary."""
        name, classes = info.output_name, info.num_classes
        if name not in response.outputs:
            raise self._bad(None, f"no {name!r} output (it has {sorted(response.outputs)})")
        proto = response.outputs[name]
        if proto.dtype not in SCORE_DTYPES:
            raise self._bad(None, f"{name!r} as {dtype_name(proto.dtype)}, not float scores")
        shape = [d.size for d in proto.tensor_shape.dim]
        if len(shape) == 2 and shape[0] == rows and shape[1] != classes:
            raise self._bad(
                None, f"{shape[1]} scores per image where the model has {classes} classes"
            )
        if proto.tensor_shape.unknown_rank or shape != [rows, classes]:
            shown = ["N" if i == 0 and d == rows else str(d) for i, d in enumerate(shape)]
            kind = None if shown[:1] == ["N"] else "rows"  # other row counts: one kind
            raise self._bad(
                kind, f"{name!r} of shape [{', '.join(shown)}] where [N, {classes}] is expected"
            )
        field = "float_val" if proto.dtype == types_pb2.DT_FLOAT else "double_val"
        if not proto.tensor_content and len(getattr(proto, field)) != rows * classes:
            # TF reads fewer typed values as a fill (the last repeated); a model's answer
            # is never written so, and an empty one was served as all-zero scores.
            raise self._bad(
                "values", f"{len(getattr(proto, field))} {field} values for {classes} per image"
            )
        try:
            # The shape is known good, so this allocates what it announces, no more.
            raw = to_ndarray(proto, name, role="output")
        except InvalidRequest as exc:
            raise self._bad(
                "unreadable", f"an unreadable {name!r} tensor ({exc.message})"
            ) from None
        if not np.isfinite(raw).all():
            raise self._bad(
                None, f"non-finite {name!r} scores (NaN or infinity)", "its model is broken"
            )
        out = np.asarray(raw, dtype=np.float32)
        if not np.isfinite(out).all():  # float64 scores past float32's range
            raise self._bad(None, f"{name!r} scores beyond float32's range", "its model is broken")
        return out

    def _bad(
        self,
        kind: str | None,
        answer: str,
        why: str = "it serves another model than this repository's version",
    ) -> BackendError:
        error = BackendError(
            f"the model backend (TF Serving) answered {answer} for version {self._version} of "
            f"model {self._model!r}: {why}",
            detail=f"TF Serving at {self._client.address}",
        )
        return self._reported(error, kind)

    def _reported(self, error: Reported, kind: str | None = None) -> Reported:
        """``error``, logged when this version first meets its kind of fault, and again
        at most once a RELOG_SECONDS while it lasts, with TF Serving's latest words (the
        metrics count every request: cnnserve_requests{code="502"}). The kind is the
        message (which leaves the batch's size out), or a name for those that vary."""
        kind = kind or error.message
        now = time.monotonic()
        if now - self._faults.get(kind, -RELOG_SECONDS) >= RELOG_SECONDS:
            self._faults[kind] = now
            log.warning(
                "%s (%s); answers like it in the next %d s are not logged",
                error.message,
                error.detail,
                RELOG_SECONDS,
            )
        return error
