"""The gateway in front of a TF Serving that answers what the version cannot answer.

A real gRPC server in this process plays a TF Serving whose model is not the
repository's (other columns, other output, integer scores), that is broken (NaN
scores, a 1-D answer, INTERNAL) or that refuses the gateway's call. Each must be a
502 ``backend_error`` over REST, TF Serving's REST and gRPC, named once in the log, and
never a 200 with the repository's labels on the wrong scores, nor a 500 and a
traceback per request. The gateway stays ready: the fault is the backend's.
"""

from __future__ import annotations

import base64
import socket
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
import tensorflow as tf
from google.protobuf import any_pb2
from tensorflow.core.protobuf import saved_model_pb2
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from service.proto_gen import cnnserve_v1_pb2, cnnserve_v1_pb2_grpc
from service.runtimes.tfserving import DROPPED
from tests.helpers.cli import cnnserve
from tests.helpers.images import encode, gradient
from tests.helpers.server import Server, eventually, running_server, self_signed

pytestmark = pytest.mark.slow

PNG = encode(gradient(), "PNG")
NOT_LOGGED = "answers like it in the next"


class FakeTFServing(
    prediction_service_pb2_grpc.PredictionServiceServicer,
    model_service_pb2_grpc.ModelServiceServicer,
):
    """Version 1 of "tiny" with the repository's own signatures; ``mode`` says how
    Predict answers."""

    def __init__(self, signatures: Any, classes: int) -> None:
        self.signatures = signatures
        self.classes = classes
        self.mode = "ok"
        self.states = [(1, get_model_status_pb2.ModelVersionStatus.AVAILABLE)]
        self.predicts = 0
        self.garbage_metadata = False
        self.status_error: grpc.StatusCode | None = None
        self.metadata_calls = 0
        self._lock = threading.Lock()
        # mode "hang": a Predict waits until released or cancelled (which it records).
        self.entered, self.release, self.cancelled = (threading.Event() for _ in range(3))

    def GetModelStatus(self, request: Any, context: Any) -> Any:
        if self.status_error is not None:
            context.abort(self.status_error, "the fake TF Serving fails")
        response = get_model_status_pb2.GetModelStatusResponse()
        for version, state in self.states:
            response.model_version_status.add(version=version, state=state)
        return response

    def GetModelMetadata(self, request: Any, context: Any) -> Any:
        response = get_model_metadata_pb2.GetModelMetadataResponse()
        response.model_spec.name = request.model_spec.name
        response.model_spec.version.value = 1
        with self._lock:
            self.metadata_calls += 1
        packed = any_pb2.Any()
        packed.Pack(self.signatures)
        if self.garbage_metadata:
            packed.value = b"\xff\xff\xff garbage"
        response.metadata["signature_def"].CopyFrom(packed)
        return response

    def Predict(self, request: Any, context: Any) -> Any:
        with self._lock:
            self.predicts += 1
        rows = request.inputs["image"].tensor_shape.dim[0].size
        mode = self.mode
        if mode == "hang":
            self.entered.set()
            while not self.release.wait(0.02):
                if not context.is_active():
                    self.cancelled.set()
                    return predict_pb2.PredictResponse()
            mode = "ok"
        if mode.isupper():  # a gRPC status code's name
            context.abort(getattr(grpc.StatusCode, mode), f"the fake TF Serving says {mode}")
        columns = int(mode.split(":")[1]) if mode.startswith("columns:") else self.classes
        scores = np.full((rows, columns), 1 / columns, dtype=np.float32)
        if mode == "nan":
            scores[:, 0] = np.nan
        elif mode == "rank 1":
            scores = scores[:, 0]
        elif mode == "rank 3":
            scores = scores[:, :, None]
        elif mode == "integers":
            scores = scores.astype(np.int32)
        elif mode == "huge":  # past the gateway's 64 MiB receive limit
            scores = np.zeros((rows, 17 * 1024 * 1024), dtype=np.float32)
        elif mode == "beyond float32":
            scores = np.full((rows, columns), 1e300)
        response = predict_pb2.PredictResponse()
        name = "logits" if mode == "other output" else "probabilities"
        tensor = response.outputs[name]
        tensor.CopyFrom(tf.make_tensor_proto(scores))
        if mode in ("no values", "one value"):  # a shape, and TF's fill of the rest
            tensor.ClearField("tensor_content")
            tensor.float_val.extend([0.5] if mode == "one value" else [])
        elif mode == "short content":
            tensor.tensor_content = tensor.tensor_content[:-4]
        return response


def repository_signatures(repository: Path) -> Any:
    saved = saved_model_pb2.SavedModel()
    saved.ParseFromString((repository / "tiny" / "1" / "saved_model.pb").read_bytes())
    signatures = get_model_metadata_pb2.SignatureDefMap()
    for name, signature in saved.meta_graphs[0].signature_def.items():
        if not name.startswith("__"):
            signatures.signature_def[name].CopyFrom(signature)
    return signatures


@contextmanager
def started(servicer: FakeTFServing, credentials: Any = None) -> Iterator[int]:
    """The fake on a free port; with ``credentials``, speaking TLS."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(servicer, server)
    model_service_pb2_grpc.add_ModelServiceServicer_to_server(servicer, server)
    if credentials is None:
        port = server.add_insecure_port("127.0.0.1:0")
    else:
        port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    try:
        yield port
    finally:
        server.stop(grace=None)


def in_front(repository: Path, port: int, *, ready: bool = True) -> AbstractContextManager[Server]:
    args = ("--backend", "tfserving", "--tfserving-address", f"127.0.0.1:{port}")
    args += ("--poll-seconds", "0.2")
    return running_server(repository, wait_ready=ready, grpc_port=0, args=args)


@pytest.fixture(scope="module")
def fake(tiny_repo: Path) -> Iterator[tuple[FakeTFServing, int]]:
    signatures = repository_signatures(tiny_repo)
    output = signatures.signature_def["serving_default"].outputs["probabilities"]
    servicer = FakeTFServing(signatures, output.tensor_shape.dim[-1].size)
    with started(servicer) as port:
        yield servicer, port


@pytest.fixture(scope="module")
def gateway(tiny_repo: Path, fake: tuple[FakeTFServing, int]) -> Iterator[Server]:
    with in_front(tiny_repo, fake[1]) as server:
        yield server


def classify(gateway: Server) -> httpx.Response:
    with gateway.client() as client:
        return client.post("/v1/classify", content=PNG, headers={"content-type": "image/png"})


def test_a_good_answer_is_served(gateway: Server, fake: tuple[FakeTFServing, int]) -> None:
    fake[0].mode = "ok"
    response = classify(gateway)
    assert response.status_code == 200, response.text
    assert response.json()["predictions"][0]["label"] in {"cat", "dog", "bird"}


@pytest.mark.parametrize(
    ("mode", "said"),
    [
        ("columns:5", "5 scores per image where the model has 3 classes"),
        ("columns:11", "11 scores per image where the model has 3 classes"),
        ("rank 1", "of shape [N] where [N, 3] is expected"),
        ("rank 3", "of shape [N, 3, 1] where [N, 3] is expected"),
        ("no values", "0 float_val values for 3 per image"),
        ("one value", "1 float_val values for 3 per image"),
        ("short content", "an unreadable 'probabilities' tensor (output 'probabilities'"),
        ("beyond float32", "scores beyond float32's range"),
        ("nan", "non-finite"),
        ("integers", "as int32, not float scores"),
        ("other output", "no 'probabilities' output"),
        ("huge", "more than the gateway takes"),
        ("INTERNAL", "failed a Predict call: INTERNAL"),
        ("FAILED_PRECONDITION", "failed a Predict call: FAILED_PRECONDITION"),
        ("INVALID_ARGUMENT", "refused the gateway's Predict (INVALID_ARGUMENT)"),
        # At once, not at the request's deadline: it was a 504 "the request deadline
        # passed", counted as the request's own expiry.
        ("DEADLINE_EXCEEDED", "answered DEADLINE_EXCEEDED before the request's deadline"),
    ],
)
def test_a_bad_answer_is_a_502_named_once_in_the_log(
    gateway: Server, fake: tuple[FakeTFServing, int], mode: str, said: str
) -> None:
    servicer, port = fake
    image_input = servicer.signatures.signature_def["serving_default"].inputs["image"]
    image = np.zeros([d.size for d in image_input.tensor_shape.dim][1:], dtype=np.uint8)
    servicer.mode = mode
    before = servicer.predicts
    log_before = gateway.log.read_text()
    logged = log_before.count(NOT_LOGGED)
    try:
        for _ in range(3):
            response = classify(gateway)
            assert response.status_code == 502, response.text
            error = response.json()["error"]
            assert error["code"] == "backend_error"
            assert said in error["message"]
            assert str(port) not in error["message"]  # the address is the operator's
        with gateway.client() as client:
            body = {"instances": [image.tolist()] * 2}  # another batch size: one log line
            tf_rest = client.post("/v1/models/tiny:predict", json=body)
            assert tf_rest.status_code == 502, tf_rest.text
            assert said in tf_rest.json()["error"]
            assert client.get("/readyz").status_code == 200
        request = predict_pb2.PredictRequest()
        request.model_spec.name = "tiny"
        request.inputs["image"].CopyFrom(tf.make_tensor_proto(image[None]))
        with gateway.channel() as channel:
            stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            with pytest.raises(grpc.RpcError) as failed:
                stub.Predict(request, timeout=30)
        assert failed.value.code() == grpc.StatusCode.INTERNAL  # type: ignore[attr-defined]
        assert said in failed.value.details()  # type: ignore[attr-defined]
    finally:
        servicer.mode = "ok"
    assert servicer.predicts - before >= 5  # every request asked: nothing cached
    log = gateway.log.read_text()
    # One line a kind of fault (whatever the batch size), with the address, for the
    # operator; a fault whose kind was logged a moment ago is not logged again.
    same_kind = mode == "one value" and "float_val values for" in log_before
    lines = 0 if same_kind else 1
    assert log.count(NOT_LOGGED) - logged == lines, log[-3000:]
    assert log.count(said) == lines, log[-3000:]
    if lines:
        assert "127.0.0.1:" in log.split(said)[-1].splitlines()[0]
    assert "Traceback" not in log
    assert gateway.metric("cnnserve_requests_total", code="502") >= 5
    assert classify(gateway).status_code == 200  # full service once the backend mends


@pytest.mark.parametrize("mode", ["CANCELLED", "ABORTED"])
def test_a_dropped_predict_is_a_503_to_retry_named_once_in_the_log(
    gateway: Server, fake: tuple[FakeTFServing, int], mode: str
) -> None:
    """TF Serving stopping with the call in flight: another try may find it up. It left
    no line in the log."""
    servicer, _ = fake
    logged = gateway.log.read_text().count(DROPPED)
    servicer.mode = mode
    try:
        for _ in range(3):
            response = classify(gateway)
            assert response.status_code == 503, response.text
            assert response.json()["error"]["code"] == "backend_unavailable"
    finally:
        servicer.mode = "ok"
    log = gateway.log.read_text()
    # Logged once a minute at most, both modes alike (one kind of fault), with the
    # address and TF Serving's words.
    assert log.count(DROPPED) >= 1 and log.count(DROPPED) - logged <= 1
    line = log.split(DROPPED)[-1].splitlines()[0]
    assert "TF Serving at 127.0.0.1:" in line and ("CANCELLED" in line or "ABORTED" in line)
    assert classify(gateway).status_code == 200


def test_a_backend_that_speaks_tls_is_reached_with_its_certificates(
    tiny_repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """TF Serving with --ssl_config_file: only a plaintext link existed (the gateway
    found it "cannot be reached", its log saying only "Socket closed")."""
    cert, key = self_signed(tmp_path)
    signatures = repository_signatures(tiny_repo)
    output = signatures.signature_def["serving_default"].outputs["probabilities"]
    servicer = FakeTFServing(signatures, output.tensor_shape.dim[-1].size)
    credentials = grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())])
    with started(servicer, credentials) as port:
        env = {"CNNSERVE_TFSERVING_CA_FILE": str(cert)}
        args = ("--backend", "tfserving", "--tfserving-address", f"127.0.0.1:{port}")
        with running_server(tiny_repo, grpc_port=0, args=args, env=env) as gateway:
            assert classify(gateway).status_code == 200
        with running_server(tiny_repo, wait_ready=False, args=args) as plaintext:
            eventually(lambda: "CNNSERVE_TFSERVING_CA_FILE" in plaintext.log.read_text())
            with plaintext.client() as client:
                assert client.get("/readyz").status_code == 503
    monkeypatch.setenv("CNNSERVE_TFSERVING_CA_FILE", str(key))  # a key, not a certificate
    bad = cnnserve("serve", "--model-repository", str(tiny_repo), *args)
    assert bad.returncode == 2 and f"{key}: no PEM certificate in it" in bad.stderr, bad.stderr


def test_a_version_the_repository_lacks_is_said_to_be_served_by_index(tiny_repo: Path) -> None:
    """TF Serving lists a version 2 the gateway's repository does not hold: it was served
    with class indices for labels, and the log named a folder that does not exist."""
    signatures = repository_signatures(tiny_repo)
    output = signatures.signature_def["serving_default"].outputs["probabilities"]
    servicer = FakeTFServing(signatures, output.tensor_shape.dim[-1].size)
    available = get_model_status_pb2.ModelVersionStatus.AVAILABLE
    servicer.states = [(1, available), (2, available)]
    with started(servicer) as port, in_front(tiny_repo, port) as gateway:
        said = f"{tiny_repo / 'tiny' / '2'} is not on this machine"
        eventually(lambda: said in gateway.log.read_text())
        assert f"{tiny_repo / 'tiny' / '1'} is not on this machine" not in gateway.log.read_text()


def test_a_model_whose_versions_are_loading_is_not_ready_not_missing(tiny_repo: Path) -> None:
    """TF Serving reloading its config, or loading a model just added: its versions are
    LOADING there. They showed END (or nothing) here, and requests got 404
    version_not_found, which clients take as final (an outside review)."""
    signatures = repository_signatures(tiny_repo)
    output = signatures.signature_def["serving_default"].outputs["probabilities"]
    servicer = FakeTFServing(signatures, output.tensor_shape.dim[-1].size)
    state = get_model_status_pb2.ModelVersionStatus
    servicer.states = [(1, state.LOADING)]
    with (
        started(servicer) as port,
        in_front(tiny_repo, port, ready=False) as gateway,
        gateway.client() as client,
    ):

        def loading() -> bool:
            status = client.get("/v1/models/tiny").json().get("model_version_status")
            return status == [status[0]] and status[0]["state"] == "LOADING"

        eventually(loading)
        refused = classify(gateway)
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"]["code"] == "model_not_ready"
        assert "loading version 1" in refused.json()["error"]["message"]
        servicer.states = [(1, state.AVAILABLE)]
        gateway.wait("/readyz")
        assert classify(gateway).status_code == 200
        servicer.states = [(1, state.AVAILABLE), (2, state.LOADING)]
        eventually(lambda: "LOADING" in client.get("/v1/models/tiny").text)
        assert classify(gateway).json()["version"] == 1  # the loaded one answers
        servicer.states = [(1, state.AVAILABLE)]  # 2 given up: END, not LOADING for good
        eventually(lambda: "LOADING" not in client.get("/v1/models/tiny").text)


def test_the_answer_codes_say_whose_fault_it_is() -> None:
    """The translation, for the codes a real TF Serving gives: what no retry mends is
    the backend's (502); load is a 503 to retry; a missing version a 404."""
    from service.errors import BackendError, BackendUnavailable, NotFound, Overloaded
    from service.runtimes.tfserving import TFServingClient

    class Failed(grpc.RpcError):
        def __init__(self, code: grpc.StatusCode, details: str) -> None:
            self._code, self._details = code, details

        def code(self) -> grpc.StatusCode:
            return self._code

        def details(self) -> str:
            return self._details

    client = TFServingClient("127.0.0.1:9", timeout=1)
    try:
        translate = client._translate
        assert isinstance(translate("Predict", Failed(grpc.StatusCode.UNKNOWN, "")), BackendError)
        assert isinstance(
            translate("Predict", Failed(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full")),
            Overloaded,
        )
        assert isinstance(translate("Predict", Failed(grpc.StatusCode.NOT_FOUND, "")), NotFound)
        for dropped in (grpc.StatusCode.CANCELLED, grpc.StatusCode.ABORTED):
            error = translate("Predict", Failed(dropped, "server shutting down"))
            assert isinstance(error, BackendUnavailable) and "retry" in error.message
        # UNAVAILABLE answered by TF Serving (its batch queue full) is load, counted as
        # the backend's shed; one the connection gave is unreachable. Both said
        # "cannot be reached" before.
        full = "The batch scheduling queue to which this task was submitted is full"
        error = translate("Predict", Failed(grpc.StatusCode.UNAVAILABLE, full))
        assert isinstance(error, Overloaded) and error.reason == "backend"
        for gone in ("failed to connect to all addresses", "Socket closed"):
            error = translate("Predict", Failed(grpc.StatusCode.UNAVAILABLE, gone))
            assert isinstance(error, BackendUnavailable) and "cannot be reached" in error.message
        # Which side's receive limit: the gateway's own (64 MiB), or TF Serving's.
        ours = translate(
            "Predict",
            Failed(grpc.StatusCode.RESOURCE_EXHAUSTED, "larger than max (70000000 vs. 67108864)"),
        )
        assert "answered more than the gateway takes" in ours.message
        theirs = translate(
            "Predict",
            Failed(grpc.StatusCode.RESOURCE_EXHAUSTED, "larger than max (1204318 vs. 1000000)"),
        )
        assert "refused the gateway's Predict as larger than it takes" in theirs.message
        # TF Serving's own words stay in the log, NOT_FOUND's too.
        missing = translate("Predict", Failed(grpc.StatusCode.NOT_FOUND, "Servable not found"))
        assert "Servable" not in missing.message and "Servable" in missing.log_message()
        slow = translate("GetModelStatus", Failed(grpc.StatusCode.DEADLINE_EXCEEDED, ""))
        assert (
            slow.message == "the model backend (TF Serving) did not answer GetModelStatus in time"
        )
    finally:
        client.close()


def test_a_predict_fails_at_once_while_the_polls_fail() -> None:
    """A TF Serving stopped with its connections open: the polls found it unreachable
    in ~10 s, and requests still waited their whole deadline for ~50 s more."""
    from service.errors import BackendUnavailable
    from service.runtimes.tfserving import UNREACHABLE, TFServingClient

    with socket.socket() as held:  # listens, never answers: a Predict would hang
        held.bind(("127.0.0.1", 0))
        held.listen()
        client = TFServingClient(f"127.0.0.1:{held.getsockname()[1]}", timeout=30)
        try:
            client.down = BackendUnavailable(UNREACHABLE, detail="the polls time out")
            started = time.monotonic()
            with pytest.raises(BackendUnavailable, match="cannot be reached"):
                client.call("Predict", predict_pb2.PredictRequest(), timeout=30)
            assert time.monotonic() - started < 5
        finally:
            client.close()


def test_an_unavailable_predict_is_not_sent_again_and_is_a_503_to_retry(
    gateway: Server, fake: tuple[FakeTFServing, int]
) -> None:
    """gRPC's retry policy sent every batch 3 times to a TF Serving that said its queue
    was full, and clients were told it "cannot be reached"."""
    servicer = fake[0]
    servicer.mode = "UNAVAILABLE"
    try:
        before = servicer.predicts
        response = classify(gateway)
        assert response.status_code == 503, response.text
        assert response.json()["error"]["code"] == "overloaded"
        assert response.headers["retry-after"] == "1"
        assert servicer.predicts == before + 1
        assert (
            gateway.metric("cnnserve_overload_rejections_total", model="tiny", reason="backend")
            >= 1
        )
    finally:
        servicer.mode = "ok"


def test_a_backend_call_nobody_waits_for_is_cancelled(
    gateway: Server, fake: tuple[FakeTFServing, int]
) -> None:
    """A call stuck in TF Serving held the model's batch thread until the most patient
    request's deadline, whoever had left: a gRPC client asking 60 s and cancelling after
    a moment left every other request 504 for a minute. Now the call is cancelled once
    every request of its batch is gone."""
    servicer = fake[0]
    for event in (servicer.entered, servicer.release, servicer.cancelled):
        event.clear()
    servicer.mode = "hang"
    try:
        with grpc.insecure_channel(gateway.grpc_target) as channel:
            stub = cnnserve_v1_pb2_grpc.ImageClassifierStub(channel)
            call = stub.Classify.future(cnnserve_v1_pb2.ClassifyRequest(image=PNG), timeout=60)
            assert servicer.entered.wait(30)
            call.cancel()
        assert servicer.cancelled.wait(30), "the backend call ran on"
        servicer.mode = "ok"
        started = time.monotonic()
        assert classify(gateway).status_code == 200
        assert time.monotonic() - started < 30  # not behind the 60 s deadline
    finally:
        servicer.mode = "ok"
        servicer.release.set()


def test_a_signature_the_backend_lacks_is_not_added_to_its_metadata(tiny_repo: Path) -> None:
    """TF Serving's model without the bytes signature: the gateway decodes the files
    and runs serving_default; the lookup of the signature's inputs added an empty
    predict_image_bytes to the metadata it shows (a protobuf map inserts on lookup)."""
    signatures = repository_signatures(tiny_repo)
    del signatures.signature_def["predict_image_bytes"]
    output = signatures.signature_def["serving_default"].outputs["probabilities"]
    servicer = FakeTFServing(signatures, output.tensor_shape.dim[-1].size)
    with (
        started(servicer) as port,
        in_front(tiny_repo, port) as server,
        server.client() as client,
    ):
        body = {
            "signature_name": "predict_image_bytes",
            "instances": [{"b64": base64.b64encode(PNG).decode()}],
        }
        response = client.post("/v1/models/tiny:predict", json=body)
        assert response.status_code == 200, response.text
        metadata = client.get("/v1/models/tiny/metadata").json()
    assert sorted(metadata["metadata"]["signature_def"]["signature_def"]) == ["serving_default"]


@pytest.mark.parametrize("state", ["LOADING", "UNLOADING", "END", None])
def test_a_version_the_backend_no_longer_lists_available_stops_serving(
    gateway: Server, fake: tuple[FakeTFServing, int], state: str | None
) -> None:
    """TF Serving unloads the version (or reloads it): the gateway's next poll drops it,
    readiness turns 503 and the status lists no AVAILABLE version; it kept the version
    as if it held it in memory (a version only TF Serving can run), ready and AVAILABLE."""
    servicer = fake[0]
    states = servicer.states
    codes = get_model_status_pb2.ModelVersionStatus.State
    servicer.states = [] if state is None else [(1, codes.Value(state))]
    try:
        gateway.wait("/readyz", 503, timeout=30)
        with gateway.client() as client:
            versions = client.get("/v1/models/tiny").json()["model_version_status"]
            assert all(v["state"] != "AVAILABLE" for v in versions), versions
            assert classify(gateway).status_code in {404, 503}
        log = gateway.log.read_text()
        assert "TF Serving lists no version AVAILABLE for it" in log
        assert "publish a numbered version folder" not in log  # a folder would not help
    finally:
        servicer.states = states
    gateway.wait("/readyz", 200, timeout=30)
    assert classify(gateway).status_code == 200


def test_a_version_failing_to_load_from_the_backend_is_logged_once(tiny_repo: Path) -> None:
    """TF Serving answers metadata that does not parse: the version fails to load, is
    retried every poll (no folder to watch), said once in the log without a traceback
    (a DecodeError traceback every poll before), and loads once the answer is good."""
    signatures = repository_signatures(tiny_repo)
    output = signatures.signature_def["serving_default"].outputs["probabilities"]
    servicer = FakeTFServing(signatures, output.tensor_shape.dim[-1].size)
    servicer.garbage_metadata = True
    with started(servicer) as port, in_front(tiny_repo, port, ready=False) as server:
        eventually(lambda: servicer.metadata_calls >= 5, timeout=30)
        with server.client() as client:
            status = client.get("/v1/models/tiny").json()["model_version_status"][0]
        assert status["state"] == "END" and "garbage" in status["status"]["error_message"]
        assert str(port) not in status["status"]["error_message"]  # the operator's, not theirs
        servicer.garbage_metadata = False
        server.wait("/readyz", 200, timeout=30)
        log = server.log.read_text()
    assert log.count("failed to load") == 1, log[-3000:]
    assert "Traceback" not in log


def test_a_backend_failing_its_status_polls_is_a_502_not_unreachable(tiny_repo: Path) -> None:
    """TF Serving answers GetModelStatus INTERNAL from the start: the gateway is not
    ready, and its requests and status say the backend failed (502), not that it
    "cannot be reached" (503, retry shortly), which sent operators after the network."""
    signatures = repository_signatures(tiny_repo)
    output = signatures.signature_def["serving_default"].outputs["probabilities"]
    servicer = FakeTFServing(signatures, output.tensor_shape.dim[-1].size)
    servicer.status_error = grpc.StatusCode.INTERNAL
    with started(servicer) as port, in_front(tiny_repo, port, ready=False) as server:
        with server.client() as client:
            eventually(lambda: classify(server).status_code != 503, timeout=30)
            for response in (classify(server), client.get("/v1/models/tiny")):
                assert response.status_code == 502, response.text
                assert "failed a GetModelStatus call: INTERNAL" in response.text
                assert str(port) not in response.text
            assert client.get("/readyz").status_code == 503
        servicer.status_error = None
        server.wait("/readyz", 200, timeout=30)
        assert classify(server).status_code == 200


def test_a_backend_whose_polls_time_out_is_a_503_to_retry_not_a_504(tiny_repo: Path) -> None:
    """A TF Serving that stops answering (kill -STOP): once its polls timed out, every
    request got 504 "did not answer GetModelStatus in time" at once, with no
    Retry-After and counted as its own deadline, while the status routes said 503."""
    signatures = repository_signatures(tiny_repo)
    output = signatures.signature_def["serving_default"].outputs["probabilities"]
    servicer = FakeTFServing(signatures, output.tensor_shape.dim[-1].size)
    with started(servicer) as port, in_front(tiny_repo, port) as server, server.client() as client:
        servicer.status_error = grpc.StatusCode.DEADLINE_EXCEEDED  # as a timed-out poll
        eventually(lambda: client.get("/readyz").status_code == 503)
        response = client.post("/v1/classify", content=PNG, headers={"content-type": "image/png"})
        assert response.status_code == 503, response.text
        assert response.json()["error"]["code"] == "backend_unavailable"
        assert response.headers["retry-after"] == "1"
        with grpc.insecure_channel(server.grpc_target) as channel:
            stub = cnnserve_v1_pb2_grpc.ImageClassifierStub(channel)
            with pytest.raises(grpc.RpcError) as refused:
                stub.Classify(cnnserve_v1_pb2.ClassifyRequest(image=PNG), timeout=30)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        servicer.status_error = None
        eventually(lambda: client.get("/readyz").status_code == 200)
        assert (
            client.post(
                "/v1/classify", content=PNG, headers={"content-type": "image/png"}
            ).status_code
            == 200
        )
