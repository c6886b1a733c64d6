"""Load test for cnnserve: a REST user and a gRPC user, with pass/fail thresholds.

    make loadtest PROTOCOL=mixed USERS=64 DURATION=60s TARGET_RPS=1000 MAX_P99_MS=100
    locust -f loadtests/locustfile.py --headless -H http://gw:8000 --grpc-host gw:8500 \\
        -u 64 -r 16 -t 60s --target-rps 1000 --max-p99-ms 100 RestUser GrpcUser

- ``RestUser`` posts to ``/v1/classify`` a mix of Fashion-MNIST test images (28×28 and
  224×224, PNG and JPEG) and photo-like JPEGs (224×224, 1280×720) as a raw body,
  multipart or base64 JSON, in the proportions ``--image-mix`` / ``--encoding-mix`` set
  (loadtests/payloads.py). Each encoding is its own row in the stats.
- ``GrpcUser`` calls TF Serving's ``PredictionService/Predict`` through stubs of TF
  Serving's own protos (uint8 pixels, [1,224,224,3]; service/proto_gen, checked against
  tensorflow-serving-api's, without its TensorFlow import) and
  ``cnnserve.v1.ImageClassifier/Classify`` (encoded image bytes); every call is reported
  to locust as a request. Each user has its own connection, as separate clients would
  (a server's workers share a port: one shared connection loaded one of them).

``--api-key`` sends a key (REST ``Authorization: Bearer``, gRPC ``authorization``
metadata); ``--grpc-tls`` (with ``--grpc-ca`` for a private CA) speaks TLS on the gRPC
port (REST follows the host's https://). A request gets ``--request-timeout`` seconds.

When the run ends, the successful answers per second of the whole run, p99 and the
failure ratio from locust's own total stats are checked against ``--target-rps``,
``--max-p99-ms`` and ``--max-fail-ratio``; so is that every kind of user made requests
and no task raised. The process exits 1 with a one-line reason when one is broken, else
0; with ``--csv``, the verdict is also written to ``<prefix>_verdict.json``.
"""

from __future__ import annotations

import base64
import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import gevent
import grpc
import grpc.experimental.gevent
import payloads
from locust import FastHttpUser, User, events, task
from locust.env import Environment
from locust.runners import MasterRunner, WorkerRunner
from thresholds import Outcome, Thresholds, bound, ratio, summary, verdict

from service.contract import BYTES_SIGNATURE

# Before any channel exists: gRPC's own threads would otherwise block locust's greenlets.
grpc.experimental.gevent.init_gevent()

_pool: dict[str, list[payloads.Payload]] = {}
_run: dict[str, float] = {}  # when the load started and stopped (time.time())


@events.init_command_line_parser.add_listener
def _options(parser: Any) -> None:
    group = parser.add_argument_group("cnnserve")
    group.add_argument("--grpc-host", default="127.0.0.1:8500", env_var="LOCUST_GRPC_HOST")
    group.add_argument("--model", default="fashion_mnist", env_var="LOCUST_MODEL")
    group.add_argument("--image-mix", default=payloads.DEFAULT_IMAGE_MIX)
    group.add_argument("--encoding-mix", default=payloads.DEFAULT_ENCODING_MIX)
    group.add_argument("--fashion-mnist-dir", default=str(payloads.FASHION_MNIST_DIR))
    group.add_argument("--target-rps", type=bound, default=0.0, env_var="LOCUST_TARGET_RPS")
    group.add_argument("--max-p99-ms", type=bound, default=0.0, env_var="LOCUST_MAX_P99_MS")
    group.add_argument(
        "--max-fail-ratio", type=ratio, default=0.01, env_var="LOCUST_MAX_FAIL_RATIO"
    )
    group.add_argument("--api-key", default="", env_var="LOCUST_API_KEY")
    group.add_argument("--grpc-tls", action="store_true", env_var="LOCUST_GRPC_TLS")
    group.add_argument("--grpc-ca", default="", env_var="LOCUST_GRPC_CA")
    group.add_argument(
        "--request-timeout", type=bound, default=8.0, env_var="LOCUST_REQUEST_TIMEOUT"
    )


def _picker(environment: Environment, seed: int) -> payloads.Picker:
    options = environment.parsed_options
    if not _pool:  # built in _prepare; here only when a user starts without it
        _pool.update(payloads.build(directory=Path(options.fashion_mnist_dir)))
    return payloads.Picker(_pool, options.image_mix, options.encoding_mix, seed=seed)


class RestUser(FastHttpUser):
    """POST /v1/classify with the configured image and encoding mix."""

    def __init__(self, environment: Environment) -> None:
        # Before the client is made: a hung server's requests end as failures within the
        # run's --stop-timeout, rather than after locust's 60 s, unrecorded.
        timeout = environment.parsed_options.request_timeout or None
        self.network_timeout = self.connection_timeout = timeout
        super().__init__(environment)

    def on_start(self) -> None:
        options = self.environment.parsed_options
        self.picker = _picker(self.environment, seed=id(self))
        self.model = options.model
        self.auth = {"Authorization": f"Bearer {options.api_key}"} if options.api_key else {}

    @task
    def classify(self) -> None:
        image, encoding = self.picker.image(), self.picker.encoding()
        path = f"/v1/classify?model={self.model}"
        name = f"/v1/classify [{encoding}]"
        kwargs: dict[str, Any]
        if encoding == "tfserving":
            path = name = f"/v1/models/{self.model}:predict"
            instance = {"b64": base64.b64encode(image.data).decode()}
            kwargs = {"json": {"signature_name": BYTES_SIGNATURE, "instances": [instance]}}
        elif encoding == "raw":
            kwargs = {"data": image.data, "headers": {"Content-Type": image.content_type}}
        elif encoding == "multipart":
            kwargs = {"files": {"image": ("image", image.data, image.content_type)}}
        else:
            kwargs = {"json": {"image": base64.b64encode(image.data).decode()}}
        if self.auth:
            kwargs["headers"] = {**kwargs.get("headers", {}), **self.auth}
        with self.client.post(path, name=name, catch_response=True, **kwargs) as response:
            # Nothing here may raise: locust records neither a success nor a failure for
            # a block that raises (a refused connection, no answer, has no text).
            if response.status_code != 200:
                detail = (response.text or "")[:200] or repr(response.error)
                if _timed_out(response.error):
                    detail = f"{TIMED_OUT} ({detail})"
                response.failure(f"HTTP {response.status_code}: {detail}")
            elif not _has_predictions(response.text):
                response.failure("answer has no predictions")


# In a failure's message: the request had no answer within --request-timeout. A hung
# server makes few such failures (one per user per timeout) beside many answers before
# it hung, so the failure ratio alone passed it: any of them fails the run.
TIMED_OUT = "no answer within --request-timeout"


def _timed_out(error: object) -> bool:
    # geventhttpclient wraps it: RetriesExceeded(..., original=timed out).
    named = isinstance(error, TimeoutError) or "timeout" in type(error).__name__.lower()
    return named or "timed out" in str(error)


def _has_predictions(text: str | None) -> bool:
    try:
        answer = json.loads(text or "")
    except ValueError:
        return False
    return isinstance(answer, dict) and bool(answer.get("predictions"))


class LocustInterceptor(grpc.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    """Reports every unary call to locust as a request (locust's own gRPC example)."""

    def __init__(self, environment: Environment) -> None:
        self.environment = environment

    def intercept_unary_unary(self, continuation: Any, call_details: Any, request: Any) -> Any:
        response, exception, length = None, None, 0
        started = time.perf_counter()
        try:
            response = continuation(call_details, request)
            length = response.result().ByteSize()
        except grpc.RpcError as exc:
            exception = exc
        self.environment.events.request.fire(
            request_type="grpc",
            name=call_details.method,
            response_time=(time.perf_counter() - started) * 1000,
            response_length=length,
            response=response,
            context=None,
            exception=exception,
        )
        return response


@events.init.add_listener
def _prepare(environment: Environment, **_: Any) -> None:
    """Before the load starts, so no user stalls the others: the host without a trailing
    slash, and the payloads built (in each process that runs users)."""
    if environment.host:  # "http://gw:8000/" made every path "//v1/classify"
        environment.host = environment.host.rstrip("/")
        for cls in environment.user_classes:
            cls.host = environment.host
    if environment.parsed_options is None or isinstance(environment.runner, MasterRunner):
        return
    _picker(environment, seed=0)
    # This blocked the event loop: refresh its clock, or the --run-time timer set next
    # would count from before and fire at once.
    gevent.get_hub().loop.update_now()


@events.test_start.add_listener
def _started(**_: Any) -> None:
    _run["start"] = time.time()


@events.test_stop.add_listener
def _stopped(**_: Any) -> None:
    _run["stop"] = time.time()


class GrpcUser(User):
    """TF Serving Predict (TF Serving's protos) and cnnserve.v1 Classify on the gRPC port."""

    def on_start(self) -> None:
        from service.preprocessing import PreprocessSpec, preprocess_bytes
        from service.proto_gen import cnnserve_v1_pb2, cnnserve_v1_pb2_grpc
        from service.proto_gen.tensorflow_serving.apis import (
            predict_pb2,
            prediction_service_pb2_grpc,
        )
        from service.tfserving_proto import model_spec, to_tensor_proto

        options = self.environment.parsed_options
        self.picker = _picker(self.environment, seed=id(self))
        self.timeout = options.request_timeout or None
        self.metadata = [("authorization", f"Bearer {options.api_key}")] if options.api_key else []
        self.channel = grpc.intercept_channel(
            _channel(options), LocustInterceptor(self.environment)
        )
        self.predict_stub = prediction_service_pb2_grpc.PredictionServiceStub(self.channel)
        self.classify_stub = cnnserve_v1_pb2_grpc.ImageClassifierStub(self.channel)
        self.classify_request = cnnserve_v1_pb2.ClassifyRequest
        # Predict takes pixels: the Fashion-MNIST images, preprocessed as the gateway would.
        self.predict_requests = []
        for image in self.picker.pool["fmnist28"][::2][:8]:
            pixels = preprocess_bytes(image.data, PreprocessSpec(), max_pixels=10**8)[None]
            request = predict_pb2.PredictRequest(model_spec=model_spec(options.model))
            request.inputs["image"].CopyFrom(to_tensor_proto(pixels, packed=True))
            self.predict_requests.append(request)
        self.model = options.model

    def on_stop(self) -> None:
        self.channel.close()

    @task
    def predict(self) -> None:
        request = self.predict_requests[self.picker.random.randrange(len(self.predict_requests))]
        with contextlib.suppress(grpc.RpcError):  # the interceptor reported it
            self.predict_stub.Predict(request, timeout=self.timeout, metadata=self.metadata)

    @task
    def classify(self) -> None:
        request = self.classify_request(image=self.picker.image().data, model=self.model)
        with contextlib.suppress(grpc.RpcError):
            self.classify_stub.Classify(request, timeout=self.timeout, metadata=self.metadata)


def _channel(options: Any) -> grpc.Channel:
    """This user's own connection (a local subchannel pool: channels to one target
    otherwise share one), plain or TLS."""
    settings = [("grpc.use_local_subchannel_pool", 1)]
    if not (options.grpc_tls or options.grpc_ca):  # a CA is for TLS: it implies it
        return grpc.insecure_channel(options.grpc_host, options=settings)
    ca = Path(options.grpc_ca).read_bytes() if options.grpc_ca else None
    credentials = grpc.ssl_channel_credentials(root_certificates=ca)
    return grpc.secure_channel(options.grpc_host, credentials, options=settings)


@events.quitting.add_listener
def _check_thresholds(environment: Environment, **_: Any) -> None:
    """Exit code and a one-line reason from locust's own total stats (master or local
    runner; workers of a --processes run only send their stats)."""
    if isinstance(environment.runner, WorkerRunner):
        return
    options = environment.parsed_options
    total = environment.stats.total
    # Over the whole run: locust's own rate ends at the last answer, so a server that
    # stopped answering midway kept its earlier rate.
    seconds = _run.get("stop", time.time()) - _run.get("start", total.start_time)
    outcome = Outcome(
        rps=(total.num_requests - total.num_failures) / max(seconds, 1e-9),
        p99_ms=total.get_response_time_percentile(0.99) or 0.0,
        fail_ratio=total.fail_ratio,
        requests=total.num_requests,
        errors=_errors(environment),
    )
    bounds = Thresholds(options.target_rps, options.max_p99_ms, options.max_fail_ratio)
    reason = verdict(outcome, bounds)
    line = f"{summary(outcome)}; bounds {bounds.describe()}"
    if reason:
        sys.stderr.write(f"loadtest FAILED: {reason} ({line})\n")
        environment.process_exit_code = 1
    else:
        sys.stderr.write(f"loadtest PASSED: {line}\n")
        environment.process_exit_code = 0
    if options.csv_prefix:
        with open(f"{options.csv_prefix}_verdict.json", "w") as f:
            json.dump({"passed": not reason, "reason": reason, **vars(outcome),
                       "bounds": vars(bounds)}, f, indent=2)  # fmt: skip


# The request_type each kind of user reports under.
_REQUEST_TYPES = {"RestUser": "POST", "GrpcUser": "grpc"}


def _errors(environment: Environment) -> tuple[str, ...]:
    """Failures no request row shows: tasks that raised, a kind of user with no request
    (its server or port dead, while the other kind's answers passed the run)."""
    errors = []
    exceptions = environment.runner.exceptions if environment.runner is not None else {}
    raised = sum(e["count"] for e in exceptions.values())
    if raised:
        first = next(iter(exceptions.values()))["msg"]
        errors.append(f"{raised} task errors (first: {first[:120]})")
    timeouts = sum(
        e.occurrences
        for e in environment.stats.errors.values()
        if TIMED_OUT in str(e.error) or "DEADLINE_EXCEEDED" in str(e.error)
    )
    if timeouts:
        seconds = environment.parsed_options.request_timeout
        errors.append(f"{timeouts} requests had no answer within {seconds:g} s (a hung server?)")
    answered = {
        e.method for e in environment.stats.entries.values() if e.num_requests > e.num_failures
    }
    users = getattr(environment.parsed_options, "num_users", None) or 0
    if users < len(environment.user_classes):  # locust starts only some kinds
        errors.append(f"{users} users cannot run {len(environment.user_classes)} kinds of user")
    for cls in environment.user_classes:
        kind = _REQUEST_TYPES.get(cls.__name__)
        if kind is not None and kind not in answered:
            errors.append(f"{cls.__name__} had no successful answer")
    return tuple(errors)
