"""gRPC adapter: parse protobuf, call the data plane, serialise. No inference logic here.

TF Serving's ``PredictionService`` and ``ModelService`` (wire-compatible: the official
``tensorflow-serving-api`` stubs work unchanged), cnnserve's own ``ImageClassifier``
(proto/cnnserve_v1.proto) and ``grpc.health.v1.Health``. Errors are mapped to gRPC
status codes in one place, :func:`mapped_errors`, from the table in :mod:`service.errors`.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, ClassVar, TypeVar

import grpc
from grpc_health.v1 import health_pb2

from service.api.grpc_calls import (
    REQUEST_ID_KEY,
    call_request_id,
    end_call,
    error_trailers,
)
from service.concurrency import grpc_refusal_cost
from service.dataplane import ClassifyResult, DataPlane
from service.errors import (
    CnnserveError,
    DeadlineExceeded,
    InternalError,
    InvalidRequest,
    bounded,
    grpc_status,
)
from service.proto_gen import cnnserve_v1_pb2
from service.proto_gen.tensorflow_serving.apis import (
    get_model_metadata_pb2,
    model_management_pb2,
    predict_pb2,
)
from service.requestlog import RequestRecord, recorded, timed_encode
from service.tfserving_proto import (
    config_text,
    declared_images,
    model_spec,
    read_model_spec,
    status_response,
    to_ndarray,
    to_tensor_proto,
)

log = logging.getLogger(__name__)


R = TypeVar("R")


def encoded(model: str, build: Callable[[], R]) -> R:
    """Build an answer's message, timed as the encode stage as REST's JSON is (gRPC
    serialises it afterwards, in its core: not timed). gRPC answers had no encode stage,
    and the stage means stopped adding up once any gRPC traffic was served."""
    return timed_encode(model, build)[0]


S = TypeVar("S", bound="_Adapter")
Handler = Callable[[S, Any, Any], Awaitable[Any]]

SIGNATURE_DEF = "signature_def"
CLIENT_KEY_KEY = "x-client-key"
# How often Health.Watch looks at readiness (a stream per watcher; cheap).
WATCH_PERIOD_SECONDS = 0.5


def mapped_errors(method: Handler[S]) -> Handler[S]:
    """Turn exceptions into gRPC statuses: ours by the error table (4xx messages say what
    to do, 5xx say nothing internal), anything else INTERNAL with the traceback logged.

    Every call is also a request record (metrics and the JSON access log, as for REST),
    with the RPC's full name as its route and the client's ``x-request-id`` metadata (or
    a fresh id) returned in the trailing metadata, and takes a place under the worker's
    concurrency limit (service.concurrency) or is refused."""
    return _mapped(method, limited=True)


def status_call(method: Handler[S]) -> Handler[S]:
    """As :func:`mapped_errors`, but outside the concurrency limit: a model's status or
    metadata is answered from memory in microseconds, and gateways and probes poll it
    (TF Serving does not shed these calls; a cnnserve shedding them under load made the
    gateway in front of it, polling GetModelStatus, flap unready)."""
    return _mapped(method, limited=False)


def _mapped(method: Handler[S], *, limited: bool) -> Handler[S]:
    @functools.wraps(method)
    async def handler(self: S, request: Any, context: Any) -> Any:
        rid = call_request_id(dict(context.invocation_metadata() or ()))
        route = f"/{getattr(self, 'service', type(self).__name__)}/{method.__name__}"
        concurrency = self._plane.concurrency
        connection = concurrency.peer(context.peer())
        # A retry is timed from when it came, about core_wait before it was taken
        # (service.api.grpc_backlog), as REST's from when the kernel had it: read late,
        # a spinning client's retries were answered at once as if it had waited.
        came = asyncio.get_running_loop().time() - concurrency.core_wait
        retrying = connection.retrying(came)
        try:
            record = RequestRecord(rid, "grpc", "POST", route)
            with recorded(record, self._plane.stopping):
                taken = None
                if limited:
                    # Not on the connection's record: its other calls may be retrying
                    # at once meanwhile (a channel's calls are many clients; an HTTP/1.1
                    # connection's next request is the same client's). Cleared by each
                    # call admitted, a channel of 16 spinning calls had most of its
                    # refusals answered at once, unpaced.
                    taken = concurrency.admit(None)
                    if taken is None:
                        raise concurrency.refusal()
                try:
                    answer = await method(self, request, context)
                finally:
                    if taken is not None:
                        concurrency.release(taken, record.images)
            context.set_trailing_metadata(((REQUEST_ID_KEY, rid),))
            return answer
        except CnnserveError as exc:
            error = exc.with_traceback(None)  # it held this frame, which holds it: a cycle
            if exc.server_fault:
                log.warning("%s failed: %s: %s", method.__name__, exc.code, exc.log_message())
        except Exception:
            log.exception("%s: unexpected error", method.__name__)
            error = InternalError("unexpected")
        # Come back later: paced (service.concurrency).
        if error.http_status == 503:
            await concurrency.pace_refusal(
                retrying,
                connection,
                grpc_refusal_cost(request.ByteSize()),
                within=context.time_remaining(),
            )
        await end_call(
            context, grpc_status(error), error.public_message(), error_trailers(rid, error)
        )

    return handler


def client_key(context: Any) -> str | None:
    """The call's x-client-key metadata (the canary split's stickiness), or None."""
    sent = dict(context.invocation_metadata() or ())
    return str(sent.get(CLIENT_KEY_KEY, ""))[:256] or None


def deadline(plane: DataPlane, context: Any) -> float:
    """The call's gRPC deadline as the data plane's, or the default when it has none."""
    remaining = context.time_remaining()
    if remaining is not None and remaining <= 0:
        raise DeadlineExceeded("the call's deadline passed before it was handled")
    return plane.deadline(remaining)


class _Adapter:
    """A servicer: holds the data plane it translates to; nothing else."""

    service: ClassVar[str]  # the full gRPC service name, the route of its requests

    def __init__(self, plane: DataPlane) -> None:
        self._plane = plane


class PredictionServicer(_Adapter):
    """tensorflow.serving.PredictionService: Predict and GetModelMetadata."""

    service = "tensorflow.serving.PredictionService"

    @mapped_errors
    async def Predict(self, request: Any, context: Any) -> Any:
        ref = read_model_spec(request.model_spec)
        until = deadline(self._plane, context)
        # Off the event loop: a float image batch in typed fields is millions of values.
        inputs = await asyncio.to_thread(self._arrays, request.inputs)
        result = await self._plane.predict(
            inputs,
            model=ref.name,
            version=ref.version,
            label=ref.label,
            signature_name=ref.signature_name,
            output_filter=list(request.output_filter),
            deadline=until,
            client_key=client_key(context),
        )

        def build() -> Any:
            response = predict_pb2.PredictResponse(
                model_spec=model_spec(result.model, result.version, result.signature)
            )
            for name, value in result.outputs.items():
                response.outputs[name].CopyFrom(to_tensor_proto(value, packed=False))
            return response

        return encoded(result.model, build)

    def _arrays(self, tensors: Any) -> dict[str, Any]:
        """The request's tensors as arrays. TF's shorthand (one value fills the shape)
        must not turn 69 bytes into gigabytes: the images a shape declares are counted
        before anything is built, and no tensor may take more bytes than the largest
        message could carry."""
        most = self._plane.settings.grpc_max_message_bytes
        arrays: dict[str, Any] = {}
        for name, tensor in tensors.items():
            self._plane.check_image_count(declared_images(tensor))
            arrays[name] = to_ndarray(tensor, name, most)
        return arrays

    @status_call
    async def GetModelMetadata(self, request: Any, context: Any) -> Any:
        ref = read_model_spec(request.model_spec)
        fields = list(request.metadata_field)
        if not fields:
            raise InvalidRequest(f"metadata_field is empty; ask for {SIGNATURE_DEF!r}")
        unsupported = [f for f in fields if f != SIGNATURE_DEF]
        if unsupported:
            raise InvalidRequest(
                f"metadata_field {unsupported[0]!r} is not supported; ask for {SIGNATURE_DEF!r}"
            )
        target, signatures = self._plane.metadata(str(ref.name), ref.version, ref.label)
        response = get_model_metadata_pb2.GetModelMetadataResponse(
            model_spec=model_spec(target.model, target.version)
        )
        response.metadata[SIGNATURE_DEF].Pack(signatures)
        return response

    # tf.Example APIs: an image model has no signature for them. TF Serving answers
    # NOT_FOUND for a model it does not serve, then INVALID_ARGUMENT; so does this.
    @mapped_errors
    async def Classify(self, request: Any, context: Any) -> Any:
        raise self._tf_example_api("Classify", request.model_spec)

    @mapped_errors
    async def Regress(self, request: Any, context: Any) -> Any:
        raise self._tf_example_api("Regress", request.model_spec)

    @mapped_errors
    async def MultiInference(self, request: Any, context: Any) -> Any:
        if not request.tasks:
            raise InvalidRequest("MultiInference: tasks is empty")
        raise self._tf_example_api("MultiInference", request.tasks[0].model_spec)

    def _tf_example_api(self, api: str, spec: Any) -> InvalidRequest:
        ref = read_model_spec(spec)
        return self._plane.refuse_tf_example_api(api, str(ref.name), ref.version, ref.label)


class ModelServicer(_Adapter):
    """tensorflow.serving.ModelService: GetModelStatus with TF Serving's states."""

    service = "tensorflow.serving.ModelService"

    @status_call
    async def GetModelStatus(self, request: Any, context: Any) -> Any:
        # TF Serving's GetModelStatus reads the version number only: a version_label,
        # known or not, lists every version; no name is a model with no versions. No
        # model_spec at all is its INVALID_ARGUMENT, not a model named "".
        if not request.HasField("model_spec"):
            raise InvalidRequest("Missing ModelSpec: set model_spec.name")
        ref = read_model_spec(request.model_spec, name_required=False)
        return status_response(self._plane.model_status(str(ref.name or ""), ref.version))

    @mapped_errors
    async def HandleReloadConfigRequest(self, request: Any, context: Any) -> Any:
        """Apply the whole ModelServerConfig (written to models.config); answers OK once
        this process has reloaded it. Off unless CNNSERVE_RELOAD_CONFIG_RPC is true."""
        await self._plane.reload_config(config_text(request.config))
        # TF Serving always sets the status (model_service_impl.cc), OK included.
        answer = model_management_pb2.ReloadConfigResponse()
        answer.status.SetInParent()  # error_code OK, its default
        return answer


class ImageClassifierServicer(_Adapter):
    """cnnserve.v1.ImageClassifier: encoded images in, labelled top-k out."""

    service = "cnnserve.v1.ImageClassifier"

    async def _classify(self, images: Sequence[bytes], request: Any, context: Any) -> Any:
        choice = request.WhichOneof("version_choice")
        return await self._plane.classify(
            images,
            model=request.model or None,
            version=int(request.version) if choice == "version" else None,
            label=str(request.version_label) if choice == "version_label" else None,
            k=int(request.top_k) or None,
            deadline=deadline(self._plane, context),
            client_key=client_key(context),
        )

    @mapped_errors
    async def Classify(self, request: Any, context: Any) -> Any:
        result = await self._classify([request.image], request, context)
        return encoded(
            result.model,
            lambda: cnnserve_v1_pb2.ClassifyResponse(
                model=result.model, version=result.version, predictions=_predictions(result)[0]
            ),
        )

    @mapped_errors
    async def ClassifyBatch(self, request: Any, context: Any) -> Any:
        if not request.images:  # the core's words are REST's ('image' field or body)
            raise InvalidRequest("ClassifyBatch has no images; send them in its 'images' field")
        result = await self._classify(list(request.images), request, context)
        return encoded(
            result.model,
            lambda: cnnserve_v1_pb2.ClassifyBatchResponse(
                model=result.model,
                version=result.version,
                results=[cnnserve_v1_pb2.ImageResult(predictions=p) for p in _predictions(result)],
            ),
        )


def _predictions(result: ClassifyResult) -> list[list[Any]]:
    return [
        [
            cnnserve_v1_pb2.Prediction(label=p.label, class_id=p.class_id, score=p.score)
            for p in image
        ]
        for image in result.results
    ]


class HealthServicer:
    """grpc.health.v1.Health: SERVING once every configured model has an AVAILABLE
    version (the same test as /readyz), asked afresh on every call, so it never lags."""

    def __init__(self, plane: DataPlane, services: Sequence[str]) -> None:
        self._plane = plane
        self._services = ["", *services]
        self._watching = 0  # open Watch streams

    def _status(self, service: str) -> int:
        if service not in self._services:
            return int(health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)
        serving = self._plane.ready()
        response = health_pb2.HealthCheckResponse
        return int(response.SERVING if serving else response.NOT_SERVING)

    async def Check(self, request: Any, context: Any) -> Any:
        status = self._status(request.service)
        if status == health_pb2.HealthCheckResponse.SERVICE_UNKNOWN:
            # Bounded as every echoed name is: past gRPC's 16 KiB trailer limit the
            # client got RESOURCE_EXHAUSTED, not NOT_FOUND.
            message = bounded(f"unknown service {request.service!r}")
            await end_call(context, grpc.StatusCode.NOT_FOUND, message)
        return health_pb2.HealthCheckResponse(status=status)

    async def List(self, request: Any, context: Any) -> Any:
        response = health_pb2.HealthListResponse()
        for service in self._services:
            response.statuses[service].status = self._status(service)
        return response

    async def Watch(self, request: Any, context: Any) -> AsyncIterator[Any]:
        # Bounded: open to anyone (no key), and each stream holds one of gRPC's places
        # for calls in progress; 3,000 of them shut every call out, Predict and Check too.
        most = self._plane.settings.max_health_watches
        if self._watching >= most:
            await end_call(
                context,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{most} health Watch streams are open on this worker, the most it keeps "
                "(CNNSERVE_MAX_HEALTH_WATCHES); use Check, or close a Watch",
            )
        self._watching += 1
        try:
            last = None
            while True:
                status = self._status(request.service)
                if status != last:
                    yield health_pb2.HealthCheckResponse(status=status)
                    last = status
                if self._plane.stopping():
                    # The gRPC server stops (NOT_SERVING was sent, unless a successor
                    # takes over in a rolling restart): an open stream would hold the
                    # stop for its whole grace period.
                    return
                await asyncio.sleep(WATCH_PERIOD_SECONDS)
        finally:
            self._watching -= 1
