"""The gateway with --backend tfserving, in front of a real TF-Serving-compatible server.

The TF Serving binary cannot run here, so a second `cnnserve serve` with the embedded
runtime plays TF Serving: the gateway talks to it only through TF Serving's gRPC API
(GetModelStatus, GetModelMetadata, Predict), exactly as it would to the container.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from service.launch import free_port
from tests.helpers.images import encode, gradient
from tests.helpers.server import Server, running_server

pytestmark = pytest.mark.slow

PNG = encode(gradient(), "PNG")
IMAGE = {"content": PNG, "headers": {"content-type": "image/png", "x-request-timeout": "5"}}


@pytest.fixture(scope="module")
def repository(tiny_repo: Path) -> Path:
    return tiny_repo


@pytest.fixture(scope="module")
def backend_port() -> int:
    """The backend's gRPC port, fixed so that a restarted backend is found again."""
    return free_port()


@pytest.fixture(scope="module")
def gateway(repository: Path, backend_port: int) -> Iterator[Server]:
    """Started before any backend exists: it must come up (not ready) and wait."""
    args = (
        "--backend",
        "tfserving",
        "--tfserving-address",
        f"127.0.0.1:{backend_port}",
        "--poll-seconds",
        "0.2",
    )
    with running_server(repository, wait_ready=False, grpc_port=0, args=args) as srv:
        yield srv


def backend(repository: Path, port: int) -> AbstractContextManager[Server]:
    """The stand-in TF Serving: an embedded cnnserve whose gRPC port is ``port``."""
    return running_server(repository, grpc_port=port, args=("--poll-seconds", "0"))


def predict(target: Server, images: np.ndarray) -> np.ndarray:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "tiny"
    request.inputs["image"].CopyFrom(tf.make_tensor_proto(images))
    with target.channel() as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        response = stub.Predict(request, timeout=30)
    return np.asarray(tf.make_ndarray(response.outputs["probabilities"]))


def answers_again(gateway: Server, timeout: float = 30) -> httpx.Response:
    """Poll the gateway until a request succeeds (the recovery under test), bounded."""
    deadline = time.monotonic() + timeout
    with gateway.client() as client:
        while True:
            response = client.post("/v1/classify", **IMAGE)  # type: ignore[arg-type]
            if response.status_code == 200 or time.monotonic() > deadline:
                return response
            time.sleep(0.05)


def test_gateway_forwards_to_tf_serving_and_survives_its_restarts(
    gateway: Server, repository: Path, backend_port: int
) -> None:
    address = f"127.0.0.1:{backend_port}"
    with gateway.client() as client:
        assert client.get("/healthz").status_code == 200
        assert client.get("/readyz").status_code == 503
        waiting = client.post("/v1/classify", **IMAGE)  # type: ignore[arg-type]
        assert waiting.status_code == 503, waiting.text
        # Once a scan has failed to reach TF Serving, requests say that (not "loading").
        deadline = time.monotonic() + 30
        while waiting.json()["error"]["code"] != "backend_unavailable":
            assert time.monotonic() < deadline, waiting.text
            gateway.wait("/healthz")  # a round trip, not a sleep: the poll runs meanwhile
            waiting = client.post("/v1/classify", **IMAGE)  # type: ignore[arg-type]
        assert waiting.status_code == 503 and address not in waiting.text

    with backend(repository, backend_port) as tfs:
        gateway.wait("/readyz")  # discovered through GetModelStatus
        with gateway.client() as client, tfs.client() as direct:
            via_gateway = client.post("/v1/classify", **IMAGE)  # type: ignore[arg-type]
            embedded = direct.post("/v1/classify", **IMAGE)  # type: ignore[arg-type]
            status = client.get("/v1/models/tiny").json()
            metadata = client.get("/v1/models/tiny/metadata").json()
        assert via_gateway.status_code == 200, via_gateway.text
        assert via_gateway.json() == embedded.json()  # same labels, scores, version
        assert via_gateway.json()["predictions"][0]["label"] in {"cat", "dog", "bird"}
        assert status["model_version_status"][0]["state"] == "AVAILABLE"
        sigs = metadata["metadata"]["signature_def"]["signature_def"]
        assert set(sigs) == {"serving_default", "predict_image_bytes", "__saved_model_init_op"}
        images = np.random.default_rng(0).integers(0, 256, (3, 224, 224, 3), np.uint8)
        np.testing.assert_allclose(predict(gateway, images), predict(tfs, images), atol=1e-6)

        tfs.process.kill()  # TF Serving dies: no goodbye, connections reset
        tfs.process.wait()
        with gateway.client() as client:
            down = client.post("/v1/classify", **IMAGE)  # type: ignore[arg-type]
        # 503 at once, not a 504 after waiting out the deadline for a dead backend.
        assert down.status_code == 503, down.text
        error = down.json()["error"]
        assert error["code"] == "backend_unavailable" and "TF Serving" in error["message"]
        assert address not in down.text  # an internal address is the operator's, in the log
        assert address in gateway.log.read_text()
        assert down.headers["retry-after"] == "1"
        with pytest.raises(grpc.RpcError) as failed:
            predict(gateway, images)
        assert failed.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
        assert address not in failed.value.details()  # type: ignore[attr-defined]
        gateway.wait("/readyz", status=503)  # the next poll finds TF Serving gone
        with gateway.client() as client:
            assert "cnnserve_backend_up 0.0" in client.get("/metrics").text
            for _ in range(20):  # counted, not logged one by one (a flood before)
                assert client.post("/v1/classify", **IMAGE).status_code == 503  # type: ignore[arg-type]
        log = gateway.log.read_text()
        assert log.count("backend_unavailable") < 5 and log.count("cannot be reached") <= 2

    with backend(repository, backend_port):
        gateway.wait("/readyz")  # ready again on a poll, no restart of the gateway
        again = answers_again(gateway)  # same gateway process, no restart
        assert again.status_code == 200, again.text
        assert again.json() == via_gateway.json()
        with gateway.client() as client:
            assert "cnnserve_backend_up 1.0" in client.get("/metrics").text
    assert gateway.process.poll() is None
    # Polled every 0.2 s throughout: no folder of a TF Serving version changes in place
    # (its source's "fingerprint" is the scan count: a warning each load, before review).
    assert "changed since it was loaded" not in gateway.log.read_text()


def test_a_version_the_backend_dropped_is_routed_around(tmp_path: Path) -> None:
    """TF Serving unloads a version on its own poll; the gateway learns on its next. A
    request routed to the dropped version in between is routed again (it was a 404 for
    every request until the gateway's poll: 179-279 of them in a review under load); one
    that names the version still gets the 404."""
    from tests.helpers.models import publish_tiny, simple_config, write_models_config

    repo = tmp_path / "repo"
    write_models_config(repo, simple_config("tiny"))
    publish_tiny(repo, "tiny", seed=0)
    port = free_port()
    args = ("--backend", "tfserving", "--tfserving-address", f"127.0.0.1:{port}")
    with (
        running_server(repo, grpc_port=port, args=("--poll-seconds", "0.2")) as tf_serving,
        running_server(repo, args=(*args, "--poll-seconds", "600")) as gateway,
        gateway.client() as client,
        tf_serving.client() as backend,
    ):
        assert client.post("/v1/classify", **IMAGE).json()["version"] == 1  # type: ignore[arg-type]
        publish_tiny(repo, "tiny", seed=1)  # latest 1: the backend swaps 1 for 2
        deadline = time.monotonic() + 60
        while [
            s["version"]
            for s in backend.get("/v1/models/tiny").json()["model_version_status"]
            if s["state"] == "AVAILABLE"
        ] != ["2"]:
            assert time.monotonic() < deadline, "the backend did not swap versions"
            time.sleep(0.1)
        pinned = client.post("/v1/classify", params={"version": 1}, **IMAGE)  # type: ignore[arg-type]
        assert pinned.status_code == 404, pinned.text
        assert pinned.json()["error"]["code"] == "version_not_found"
        answer = client.post("/v1/classify", **IMAGE)  # type: ignore[arg-type]
        assert answer.status_code == 200, answer.text
        assert answer.json()["version"] == 2


def test_a_gateway_in_front_of_a_gateway_sees_the_backend_go(tmp_path: Path) -> None:
    """A cnnserve gateway is a TF Serving to the next one. With its own backend down it
    said its versions were AVAILABLE (while its Predicts failed), so the gateway in front
    stayed ready and sent every request into 503s. Its status now answers UNAVAILABLE,
    which the gateway in front reads as a backend that cannot be reached."""
    from service.errors import PromotionError
    from service.promotion import GatewayStatus
    from tests.helpers.models import publish_tiny, simple_config, write_models_config

    repo = tmp_path / "repo"
    write_models_config(repo, simple_config("tiny"))
    publish_tiny(repo, "tiny", seed=0)
    backend_port, middle_port = free_port(), free_port()

    def gateway_to(port: int, grpc_port: int | None) -> AbstractContextManager[Server]:
        args = ("--backend", "tfserving", "--tfserving-address", f"127.0.0.1:{port}")
        return running_server(repo, grpc_port=grpc_port, args=(*args, "--poll-seconds", "0.2"))

    with (
        running_server(repo, grpc_port=backend_port) as tf_serving,
        gateway_to(backend_port, middle_port) as middle,
        gateway_to(middle_port, None) as front,
        middle.client() as client,
    ):
        assert client.get("/v1/models/tiny").json()["model_version_status"][0]["state"] == (
            "AVAILABLE"
        )
        tf_serving.process.kill()
        tf_serving.process.wait()
        middle.wait("/readyz", status=503)
        status = client.get("/v1/models/tiny")
        assert status.status_code == 503, status.text
        assert status.headers["x-error-code"] == "backend_unavailable"
        assert "cannot be reached" in status.json()["error"]
        front.wait("/readyz", status=503)

        # promote, pointed at the middle gateway: its plan stops (it planned without what
        # is served, the guard against pinning a broken newest version), its wait waits
        # (it failed at once on a passing outage).
        status_of = GatewayStatus(middle.url, timeout=1.0)
        with pytest.raises(PromotionError, match="what it serves is unknown"):
            status_of.serving("tiny")
        with pytest.raises(PromotionError, match="the gateway answered 503"):
            status_of.available("tiny", 1)  # waited its timeout, saying why
