"""Load test for cnnserve: a REST user and a gRPC user, with pass/fail thresholds.

    make loadtest PROTOCOL=mixed USERS=64 DURATION=60s TARGET_RPS=1000 MAX_P99_MS=100
    locust -f loadtests/locustfile.py --headless -H http://gw:8000 --grpc-host gw:8500 \\
        -u 64 -r 16 -t 60s --target-rps 1000 --max-p99-ms 100 RestUser GrpcUser

- ``RestUser`` posts to ``/v1/classify`` a mix of Fashion-MNIST test images (28×28 and
  224×224, PNG and JPEG) and photo-like JPEGs (224×224, 1280×720) as a raw body,
  multipart or base64 JSON, in the proportions ``--image-mix`` / ``--encoding-mix`` set
  (loadtests/payloads.py). Each encoding is its own row in the stats.
- ``GrpcUser`` calls TF Serving's ``PredictionService/Predict`` through the official
  stubs (uint8 pixels, [1,224,224,3]) and ``cnnserve.v1.ImageClassifier/Classify``
  (encoded image bytes); every call is reported to locust as a request.

When the run ends, achieved req/s, p99 and the failure ratio from locust's own total
stats are checked against ``--target-rps``, ``--max-p99-ms`` and ``--max-fail-ratio``;
the process exits 1 with a one-line reason when one is broken, else 0.
"""

from __future__ import annotations

import base64
import contextlib
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
from thresholds import Outcome, Thresholds, summary, verdict

# Before any channel exists: gRPC's own threads would otherwise block locust's greenlets.
grpc.experimental.gevent.init_gevent()

_pool: dict[str, list[payloads.Payload]] = {}


@events.init_command_line_parser.add_listener
def _options(parser: Any) -> None:
    group = parser.add_argument_group("cnnserve")
    group.add_argument("--grpc-host", default="127.0.0.1:8500", env_var="LOCUST_GRPC_HOST")
    group.add_argument("--model", default="fashion_mnist", env_var="LOCUST_MODEL")
    group.add_argument("--image-mix", default=payloads.DEFAULT_IMAGE_MIX)
    group.add_argument("--encoding-mix", default=payloads.DEFAULT_ENCODING_MIX)
    group.add_argument("--fashion-mnist-dir", default=str(payloads.FASHION_MNIST_DIR))
    group.add_argument("--target-rps", type=float, default=0.0, env_var="LOCUST_TARGET_RPS")
    group.add_argument("--max-p99-ms", type=float, default=0.0, env_var="LOCUST_MAX_P99_MS")
    group.add_argument(
        "--max-fail-ratio", type=float, default=0.01, env_var="LOCUST_MAX_FAIL_RATIO"
    )


def _picker(environment: Environment, seed: int) -> payloads.Picker:
    options = environment.parsed_options
    if not _pool:  # built in _prepare; here only when a user starts without it
        _pool.update(payloads.build(directory=Path(options.fashion_mnist_dir)))
    return payloads.Picker(_pool, options.image_mix, options.encoding_mix, seed=seed)


class RestUser(FastHttpUser):
    """POST /v1/classify with the configured image and encoding mix."""

    def on_start(self) -> None:
        self.picker = _picker(self.environment, seed=id(self))
        self.model = self.environment.parsed_options.model

    @task
    def classify(self) -> None:
        image, encoding = self.picker.image(), self.picker.encoding()
        path = f"/v1/classify?model={self.model}"
        name = f"/v1/classify [{encoding}]"
        kwargs: dict[str, Any]
        if encoding == "raw":
            kwargs = {"data": image.data, "headers": {"Content-Type": image.content_type}}
        elif encoding == "multipart":
            kwargs = {"files": {"image": ("image", image.data, image.content_type)}}
        else:
            kwargs = {"json": {"image": base64.b64encode(image.data).decode()}}
        with self.client.post(path, name=name, catch_response=True, **kwargs) as response:
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}: {response.text[:200]}")
            elif not response.json().get("predictions"):
                response.failure("answer has no predictions")


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
    """Before the load starts, so no user stalls the others: build the payloads (in
    each process that runs users), and import the TF Serving stubs, which pull in
    TensorFlow (seconds), only when gRPC users will run."""
    if environment.parsed_options is None or isinstance(environment.runner, MasterRunner):
        return
    _picker(environment, seed=0)
    if any(cls.__name__ == "GrpcUser" for cls in environment.user_classes):
        import tensorflow_serving.apis.predict_pb2  # noqa: F401
    # This blocked the event loop for seconds: refresh its clock, or the --run-time timer
    # set next would count from before and fire at once.
    gevent.get_hub().loop.update_now()


class GrpcUser(User):
    """TF Serving Predict (official stubs) and cnnserve.v1 Classify on the gRPC port."""

    def on_start(self) -> None:
        from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

        from service.preprocessing import PreprocessSpec, preprocess_bytes
        from service.proto_gen import cnnserve_v1_pb2, cnnserve_v1_pb2_grpc
        from service.tfserving_proto import model_spec, to_tensor_proto

        options = self.environment.parsed_options
        self.picker = _picker(self.environment, seed=id(self))
        self.channel = grpc.intercept_channel(
            grpc.insecure_channel(options.grpc_host), LocustInterceptor(self.environment)
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
            self.predict_stub.Predict(request, timeout=30)

    @task
    def classify(self) -> None:
        request = self.classify_request(image=self.picker.image().data, model=self.model)
        with contextlib.suppress(grpc.RpcError):
            self.classify_stub.Classify(request, timeout=30)


@events.quitting.add_listener
def _check_thresholds(environment: Environment, **_: Any) -> None:
    """Exit code and a one-line reason from locust's own total stats (master or local
    runner; workers of a --processes run only send their stats)."""
    if isinstance(environment.runner, WorkerRunner):
        return
    options = environment.parsed_options
    total = environment.stats.total
    outcome = Outcome(
        rps=total.total_rps,
        p99_ms=total.get_response_time_percentile(0.99) or 0.0,
        fail_ratio=total.fail_ratio,
        requests=total.num_requests,
    )
    bounds = Thresholds(options.target_rps, options.max_p99_ms, options.max_fail_ratio)
    reason = verdict(outcome, bounds)
    if reason:
        sys.stderr.write(f"loadtest FAILED: {reason} ({summary(outcome)})\n")
        environment.process_exit_code = 1
    else:
        sys.stderr.write(f"loadtest PASSED: {summary(outcome)}\n")
        environment.process_exit_code = 0
