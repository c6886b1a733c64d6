"""`cnnserve verify`'s clients send a request the server shed for load (503 or
RESOURCE_EXHAUSTED with a Retry-After) again, a bounded number of times: a busy server
is not a skewed one. Other refusals end the run at once. Real servers on 127.0.0.1,
scripted to shed a given number of times."""

from __future__ import annotations

import io
import json
import socket
import threading
from collections.abc import Iterator
from concurrent import futures
from contextlib import closing
from typing import Any

import grpc
import numpy as np
import pytest

from service.contract import OUTPUT_NAME
from service.errors import DatasetError
from service.proto_gen.tensorflow_serving.apis import (
    predict_pb2,
    prediction_service_pb2_grpc,
)
from service.tfserving_proto import to_tensor_proto
from service.verify_clients import PROBE, RETRIES, GrpcServer, RestServer
from tests.helpers.http_stub import QuietHandler, http_stub

ANSWER = {"model": "m", "version": 3, "predictions": [{"class_id": 7, "score": 0.9}]}


class Script:
    """What the scripted server answers: `shed` refusals first, then 200s."""

    def __init__(self, shed: int, status: int = 503, retry_after: str | None = "0") -> None:
        self.shed, self.status, self.retry_after = shed, status, retry_after
        self.calls = 0
        self.lock = threading.Lock()

    def next_refusal(self) -> bool:
        with self.lock:
            self.calls += 1
            return self.calls <= self.shed


@pytest.fixture
def rest() -> Iterator[tuple[Script, str]]:
    script = Script(0)

    class Handler(QuietHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            refused = script.next_refusal()
            body = json.dumps(
                {"error": {"code": "overloaded", "message": "at capacity"}} if refused else ANSWER
            ).encode()
            self.send_response(script.status if refused else 200)
            if refused and script.retry_after is not None:
                self.send_header("Retry-After", script.retry_after)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    with http_stub(Handler) as url:
        yield script, url


def configure(script: Script, shed: int, status: int = 503, retry_after: str | None = "0") -> None:
    script.shed, script.status, script.retry_after = shed, status, retry_after


@pytest.mark.parametrize("status", [503, 429])
def test_a_shed_request_is_sent_again_after_retry_after(
    rest: tuple[Script, str], status: int
) -> None:
    script, url = rest
    configure(script, shed=3, status=status)
    notices = io.StringIO()
    with closing(RestServer(url, notices=notices)) as client:
        assert client.classify([PROBE], None, None) == ("m", 3, [(7, 0.9)])
    assert script.calls == 4
    assert notices.getvalue().count("sending it again in 0 s") == 3


def test_a_server_that_keeps_shedding_ends_the_run_with_its_answer(
    rest: tuple[Script, str],
) -> None:
    script, url = rest
    configure(script, shed=1_000)
    with (
        closing(RestServer(url, notices=io.StringIO())) as client,
        pytest.raises(DatasetError, match=r"kept refusing for load .*503.*at capacity"),
    ):
        client.classify([PROBE], None, None)
    assert script.calls == RETRIES + 1


@pytest.mark.parametrize(("status", "retry_after"), [(503, None), (400, "0"), (500, None)])
def test_other_refusals_are_not_retried(
    rest: tuple[Script, str], status: int, retry_after: str | None
) -> None:
    script, url = rest
    configure(script, shed=1, status=status, retry_after=retry_after)
    with (
        closing(RestServer(url, notices=io.StringIO())) as client,
        pytest.raises(DatasetError, match=f"answered {status}"),
    ):
        client.classify([PROBE], None, None)
    assert script.calls == 1


@pytest.mark.parametrize(
    ("retry_after", "waits"), [("7", "5"), ("-1", "1"), ("nan", "1"), ("soon", "1")]
)
def test_the_wait_is_bounded_and_an_odd_retry_after_means_a_second(
    retry_after: str, waits: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from service import verify_clients

    slept: list[float] = []
    monkeypatch.setattr(verify_clients.time, "sleep", slept.append)
    calls = iter([verify_clients.Shed("503", verify_clients._wait(retry_after))])

    def call() -> str:
        shed = next(calls, None)
        if shed is not None:
            raise shed
        return "ok"

    assert verify_clients.with_retries(call, io.StringIO()) == "ok"
    assert slept == [float(waits)]


class SheddingPredict(prediction_service_pb2_grpc.PredictionServiceServicer):
    def __init__(self, shed: int, trailer: bool) -> None:
        self.script = Script(shed)
        self.trailer = trailer

    def Predict(self, request: Any, context: Any) -> Any:
        if self.script.next_refusal():
            if self.trailer:
                context.set_trailing_metadata((("retry-after", "0"),))
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "at capacity")
        answer = predict_pb2.PredictResponse()
        answer.model_spec.name = request.model_spec.name
        answer.model_spec.version.value = 3
        probabilities = np.zeros((1, 10), np.float32)
        probabilities[0, 7] = 0.9
        answer.outputs[OUTPUT_NAME].CopyFrom(to_tensor_proto(probabilities, packed=True))
        return answer


def serve_grpc(servicer: SheddingPredict) -> tuple[grpc.Server, str]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, f"127.0.0.1:{port}"


@pytest.mark.parametrize(("trailer", "calls"), [(True, 3), (False, 1)])
def test_grpc_resource_exhausted_is_retried_only_when_it_says_when(
    trailer: bool, calls: int
) -> None:
    # Without a retry-after trailer RESOURCE_EXHAUSTED is not load (a message too large).
    servicer = SheddingPredict(shed=2, trailer=trailer)
    server, address = serve_grpc(servicer)
    client = GrpcServer(address, notices=io.StringIO())
    try:
        if trailer:
            assert client.classify([PROBE], "m", None) == ("m", 3, [(7, pytest.approx(0.9))])
        else:
            with pytest.raises(DatasetError, match="RESOURCE_EXHAUSTED: at capacity"):
                client.classify([PROBE], "m", None)
    finally:
        client.close()
        server.stop(None)
    assert servicer.script.calls == calls


def test_no_server_or_no_scheme_is_one_clear_error_not_a_traceback() -> None:
    # A server that is down is not a skew: DatasetError (exit 2), not httpx's traceback.
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]  # bound, never listening: refused
        with (
            closing(RestServer(f"http://127.0.0.1:{port}")) as server,
            pytest.raises(DatasetError, match=r"no answer from http://127\.0\.0\.1"),
        ):
            server.classify([b"x"], None, None)
    with pytest.raises(DatasetError, match="needs its scheme"):
        RestServer("localhost:8000")


def test_a_url_that_does_not_parse_is_one_clear_error() -> None:
    # httpx.InvalidURL is no httpx.HTTPError: it was a traceback.
    with pytest.raises(DatasetError, match=r"^--url 'http://\[::1' is not a URL: Invalid port"):
        RestServer("http://[::1")
