"""API keys on REST and gRPC, probes left open, keys never logged; TLS on both ports."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.proto_gen import cnnserve_v1_pb2, cnnserve_v1_pb2_grpc
from tests.helpers.errors import error_of
from tests.helpers.images import encode, gradient
from tests.helpers.secrets import MountedSecret
from tests.helpers.server import (
    Server,
    dated_certificate,
    eventually,
    running_server,
    self_signed,
    workers_of,
)

KEY = "s3cret-key-0123456789"
FILE_KEY = "key-from-a-mounted-secret"
PNG = encode(gradient(), "PNG")
PNG_TYPE = {"content-type": "image/png"}
# Each gRPC listener of each worker must get a renewed pair; a few keep the test's
# connections to every one of them few.
GRPC_LISTENERS = 4


@pytest.fixture(scope="module")
def keyed(tiny_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    secret = tmp_path_factory.mktemp("secret") / "keys"
    secret.write_text(f"{FILE_KEY}\n")
    env = {
        "CNNSERVE_API_KEYS": f"other-key,{KEY}",
        "CNNSERVE_API_KEYS_FILE": str(secret),
        "CNNSERVE_POLL_SECONDS": "0",
    }
    with running_server(tiny_repo, grpc_port=0, env=env) as server:
        yield server


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({}, 401),
        ({"authorization": "Bearer wrong"}, 401),
        ({"authorization": f"Basic {KEY}"}, 401),
        ({"x-api-key": KEY[:-1]}, 401),
        ({"authorization": f"Bearer {KEY}"}, 200),
        ({"authorization": f"bearer {KEY}"}, 200),
        ({"x-api-key": KEY}, 200),
        ({"authorization": f"Bearer {FILE_KEY}"}, 200),
    ],
)
def test_rest_requires_a_known_key(keyed: Server, headers: dict[str, str], status: int) -> None:
    with keyed.client() as client:
        response = client.post(
            "/v1/classify", content=PNG, headers={"content-type": "image/png", **headers}
        )
    assert response.status_code == status, response.text
    if status == 401:
        assert error_of(response)[0] == "unauthenticated"
        assert response.headers["www-authenticate"].startswith("Bearer")


def test_probes_docs_metrics_and_the_demo_page_stay_open_but_its_data_does_not(
    keyed: Server,
) -> None:
    with keyed.client() as client:
        for path in ("/healthz", "/readyz", "/metrics", "/openapi.json", "/docs", "/"):
            assert client.get(path).status_code == 200, path
        assert client.get("/demo/static/demo.js").status_code == 200
        assert client.get("/demo/models").status_code == 401
        assert client.get("/v1/models/tiny").status_code == 401
        assert client.get("/demo/models", headers={"x-api-key": KEY}).status_code == 200
        assert client.get("/v1/models/tiny", headers={"x-api-key": KEY}).status_code == 200


def test_grpc_requires_the_key_in_metadata_but_health_does_not(keyed: Server) -> None:
    request = cnnserve_v1_pb2.ClassifyRequest(image=PNG)
    with keyed.channel() as channel:
        stub = cnnserve_v1_pb2_grpc.ImageClassifierStub(channel)
        for metadata in ((), (("authorization", "Bearer nope"),)):
            with pytest.raises(grpc.RpcError) as refused:
                stub.Classify(request, metadata=(*metadata, ("x-request-id", "guess")), timeout=30)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            # Tagged, counted and in the access log, as REST's 401s (no trace before).
            assert ("x-request-id", "guess") in refused.value.trailing_metadata()
        route = 'route="/cnnserve.v1.ImageClassifier/Classify"'
        scraped = httpx.get(keyed.url + "/metrics", timeout=10).text
        assert any(
            route in line and 'code="401"' in line and 'protocol="grpc"' in line
            for line in scraped.splitlines()
        ), scraped
        # The access log is written off the request path: the line comes soon after.
        eventually(lambda: '"request_id":"guess"' in keyed.log.read_text(), timeout=10)
        answer = stub.Classify(request, metadata=(("authorization", f"Bearer {KEY}"),), timeout=30)
        assert answer.model == "tiny"
        health = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=10
        )
        assert health.status == health_pb2.HealthCheckResponse.SERVING


def test_without_a_key_no_transport_tells_which_methods_exist(keyed: Server) -> None:
    """A gRPC method the server does not have was UNIMPLEMENTED before its key was looked
    at, where a served one was UNAUTHENTICATED: a caller without a key could list the
    methods. Now both are refused alike, as REST refuses any path, served or not."""
    not_served = (
        "/tensorflow.serving.PredictionService/NoSuchMethod",
        "/cnnserve.v1.NoSuchService/Method",
    )
    key = (("authorization", f"Bearer {KEY}"),)
    with keyed.channel() as channel:
        for method in (*not_served, "/tensorflow.serving.PredictionService/Predict"):
            with pytest.raises(grpc.RpcError) as unary:
                channel.unary_unary(method)(b"", timeout=10)
            assert unary.value.code() == grpc.StatusCode.UNAUTHENTICATED, method
            # A streaming caller that sends nothing is answered too, not left waiting.
            with pytest.raises(grpc.RpcError) as streaming:
                list(channel.stream_stream(method)(iter(()), timeout=10))
            assert streaming.value.code() == grpc.StatusCode.UNAUTHENTICATED, method
        for method in not_served:  # with the key, a method not served is said to be so
            with pytest.raises(grpc.RpcError) as unknown:
                channel.unary_unary(method)(b"", metadata=key, timeout=10)
            assert unknown.value.code() == grpc.StatusCode.UNIMPLEMENTED, method
    with keyed.client() as client:
        assert client.get("/v1/no-such-path").status_code == 401
        assert client.get("/v1/no-such-path", headers={"x-api-key": KEY}).status_code == 404
    # Counted under one label, not under each name a caller makes up.
    scraped = httpx.get(keyed.url + "/metrics", timeout=10).text.splitlines()
    assert any(
        'route="unmatched"' in line and 'code="401"' in line and 'protocol="grpc"' in line
        for line in scraped
    )
    assert not any("NoSuch" in line for line in scraped)


def test_a_key_sent_twice_is_refused_on_both_transports_in_either_order(keyed: Server) -> None:
    """REST refused two Authorization headers; gRPC took the last value, so which key
    counted depended on how each proxy on the way merged them. Both say why."""
    good, bad = ("authorization", f"Bearer {KEY}"), ("authorization", "Bearer wrong")
    twice = [(bad, good), (good, bad), (good, good), (("x-api-key", "wrong"), ("x-api-key", KEY))]
    # One of each header must agree: a wrong X-API-Key beside a right bearer key was
    # ignored (and refused the other way round), so which counted depended on the header.
    differ = [(good, ("x-api-key", "wrong")), (bad, ("x-api-key", KEY))]
    # (metadata, what gRPC says, what REST says: "not valid" sent a client with a right
    # key after it)
    cases = [(m, "send the API key once", "holds 2 values") for m in twice] + [
        (m, "two different API keys", "two different API keys") for m in differ
    ]
    request = cnnserve_v1_pb2.ClassifyRequest(image=PNG)
    with keyed.channel() as channel, keyed.client() as client:
        stub = cnnserve_v1_pb2_grpc.ImageClassifierStub(channel)
        for metadata, said, rest_said in cases:
            with pytest.raises(grpc.RpcError) as refused:
                stub.Classify(request, metadata=metadata, timeout=30)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED, metadata
            assert said in (refused.value.details() or "")
            answer = client.post(
                "/v1/classify", content=PNG, headers=[*PNG_TYPE.items(), *metadata]
            )
            assert answer.status_code == 401, metadata
            assert rest_said in answer.json()["error"]["message"], metadata
        both = (good, ("x-api-key", KEY))
        assert stub.Classify(request, metadata=both, timeout=30).model
        answer = client.post("/v1/classify", content=PNG, headers=[*PNG_TYPE.items(), *both])
        assert answer.status_code == 200, answer.text


def test_keys_never_reach_the_log(keyed: Server) -> None:
    with keyed.client() as client:
        wrong = {**PNG_TYPE, "authorization": "Bearer wrong-guess-xyz"}
        assert client.post("/v1/classify", headers=wrong, content=PNG).status_code == 401
        right = {**PNG_TYPE, "authorization": f"Bearer {KEY}"}
        assert client.post("/v1/classify", headers=right, content=PNG).status_code == 200
    log = keyed.log.read_text()
    assert "wrong-guess-xyz" not in log
    assert KEY not in log and FILE_KEY not in log
    assert "401" in log  # the refusal itself is in the access log, without the key


def test_metrics_can_require_the_key(tiny_repo: Path) -> None:
    env = {
        "CNNSERVE_API_KEYS": KEY,
        "CNNSERVE_METRICS_REQUIRE_KEY": "true",
        "CNNSERVE_POLL_SECONDS": "0",
    }
    with running_server(tiny_repo, env=env) as server, server.client() as client:
        assert client.get("/metrics").status_code == 401
        assert client.get("/metrics", headers={"x-api-key": KEY}).status_code == 200
        assert client.get("/readyz").status_code == 200


def _silent_connection_lasts(port: int) -> float:
    """Seconds until the server closes a connection on which the client sends nothing
    (what it reads meanwhile, e.g. gRPC's opening SETTINGS frame, is dropped)."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.settimeout(SILENT_LIMIT)
        while sock.recv(4096):
            pass
    return time.monotonic() - started


# Far under the defaults a silent connection held a socket before (60 s for a TLS
# handshake on REST, 120 s on gRPC, 60 s for HTTP/2's SETTINGS), far over the 1 s timeout.
SILENT_LIMIT = 30


@pytest.mark.parametrize("workers", [1, 2])
def test_tls_on_rest_and_grpc(
    tiny_repo: Path, tmp_path: Path, workers: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The server's own default, not the one this process took on importing service.
    monkeypatch.delenv("GRPC_VERBOSITY", raising=False)
    cert, key = self_signed(tmp_path)
    env = {
        "CNNSERVE_TLS_CERTFILE": str(cert),
        "CNNSERVE_TLS_KEYFILE": str(key),
        "CNNSERVE_POLL_SECONDS": "0",
        "CNNSERVE_HEADER_READ_TIMEOUT_SECONDS": "1",
        "CNNSERVE_WORKERS": str(workers),
    }
    with running_server(tiny_repo, grpc_port=0, env=env, tls_ca=cert) as server:
        # A client that opens a connection and never starts its handshake is dropped
        # after the header read timeout, on both ports, with one worker as with several.
        with ThreadPoolExecutor(4) as pool:
            ports = [server.port, server.port, server.grpc_port, server.grpc_port]
            lasted = list(pool.map(_silent_connection_lasts, ports))
        assert all(0.5 < seconds < SILENT_LIMIT for seconds in lasted), lasted
        # A TLS client that closes its side (close_notify) after a request: the TLS layer
        # ends the connection; asyncio warned per connection that the protocol's wish to
        # keep it half-open had no effect (a line any client could repeat).
        context = ssl.create_default_context(cafile=str(cert))
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", server.port)) as raw:
                tls = context.wrap_socket(raw, server_hostname="127.0.0.1")
                tls.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                with contextlib.suppress(OSError):
                    tls.unwrap()
        with server.client() as client:  # the log holds what came before this answer
            assert client.get("/readyz").status_code == 200
        assert "eof_received" not in server.log.read_text()
        assert server.url.startswith("https://")
        with server.client() as client:
            response = client.post("/v1/classify", content=PNG, headers=PNG_TYPE)
            assert response.status_code == 200, response.text
        credentials = grpc.ssl_channel_credentials(cert.read_bytes())
        with grpc.secure_channel(server.grpc_target, credentials) as channel:
            stub = cnnserve_v1_pb2_grpc.ImageClassifierStub(channel)
            answer = stub.Classify(cnnserve_v1_pb2.ClassifyRequest(image=PNG), timeout=30)
            assert answer.model == "tiny"
        with grpc.insecure_channel(server.grpc_target) as plain:  # plaintext is refused
            stub = cnnserve_v1_pb2_grpc.ImageClassifierStub(plain)
            with pytest.raises(grpc.RpcError):
                stub.Classify(cnnserve_v1_pb2.ClassifyRequest(image=PNG), timeout=5)
        for _ in range(5):  # plain HTTP to the gRPC port: no log line each (gRPC's INFO)
            with socket.create_connection(("127.0.0.1", server.grpc_port), timeout=30) as sock:
                sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                with contextlib.suppress(OSError):
                    while sock.recv(4096):
                        pass

        def ready_lines() -> list[str]:  # the log is flushed as the access log is written
            return [line for line in server.log.read_text().splitlines() if "ready:" in line]

        eventually(lambda: bool(ready_lines()))
        assert f"REST https://127.0.0.1:{server.port}" in ready_lines()[0], ready_lines()
        assert "(TLS)" in ready_lines()[0]
        assert "Handshake failed" not in server.log.read_text()


def _stalled_classify(server: Server, metadata: tuple[tuple[str, str], ...] = ()) -> grpc.RpcError:
    """A Classify call that sends its headers and never its message (the stream stays
    open): what one such call held, 1,024 of them held every place of gRPC's cap."""
    never = threading.Event()

    def no_message() -> Iterator[cnnserve_v1_pb2.ClassifyRequest]:
        never.wait(60)
        return
        yield  # an iterator that blocks, then ends

    with server.channel() as channel:
        call = channel.stream_unary(
            "/cnnserve.v1.ImageClassifier/Classify",
            request_serializer=cnnserve_v1_pb2.ClassifyRequest.SerializeToString,
            response_deserializer=cnnserve_v1_pb2.ClassifyResponse.FromString,
        )
        try:
            call(no_message(), timeout=30, metadata=metadata)
        except grpc.RpcError as exc:
            return exc
        finally:
            never.set()
    raise AssertionError("a call without a message was answered")


def test_a_call_without_its_message_is_refused_without_a_key_at_once(keyed: Server) -> None:
    started = time.monotonic()
    error = _stalled_classify(keyed)
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED, error
    assert time.monotonic() - started < 20  # not the client's own 30 s deadline


def test_a_call_without_its_message_times_out_like_a_slow_body(tiny_repo: Path) -> None:
    env = {
        "CNNSERVE_POLL_SECONDS": "0",
        "CNNSERVE_BODY_READ_TIMEOUT_SECONDS": "1",
        "CNNSERVE_HEADER_READ_TIMEOUT_SECONDS": "1",
    }
    with running_server(tiny_repo, grpc_port=0, env=env) as server:
        # Nor does a plaintext gRPC connection that never sends HTTP/2's preface last.
        assert 0.5 < _silent_connection_lasts(server.grpc_port) < SILENT_LIMIT
        error = _stalled_classify(server)
        assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED, error
        assert "did not arrive within 1 s" in (error.details() or "")
        with server.channel() as channel:  # and calls that send theirs are served
            stub = cnnserve_v1_pb2_grpc.ImageClassifierStub(channel)
            assert stub.Classify(cnnserve_v1_pb2.ClassifyRequest(image=PNG), timeout=30).model


def _pair(cert: Path, key: Path) -> dict[str, bytes]:
    """A TLS secret's files (cert-manager's names)."""
    return {"tls.crt": cert.read_bytes(), "tls.key": key.read_bytes()}


def _expired_pair(folder: Path) -> tuple[Path, Path]:
    """A certificate and its key whose validity ended yesterday."""
    now = datetime.now(UTC)
    begins, ends = (f"{now - timedelta(days=days):%Y%m%d%H%M%SZ}" for days in (2, 1))
    return dated_certificate(folder, begins, ends)


def _ec_self_signed(folder: Path) -> tuple[Path, Path]:
    """As self_signed, with an EC key (self_signed's is RSA)."""
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-days", "1", "-keyout", str(key), "-out", str(cert), "-subj",
         "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


def _rsa_only_client_served(port: int) -> bool:
    """Whether a TLS 1.2 client that takes RSA certificates only completes a handshake."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers("aRSA")
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
            context.wrap_socket(raw),
        ):
            return True
    except (ssl.SSLError, OSError):
        return False


def _served_certificate(port: int) -> bytes:
    return ssl.PEM_cert_to_DER_cert(ssl.get_server_certificate(("127.0.0.1", port), timeout=10))


def _grpc_trusts(server: Server, ca: Path) -> bool:
    """A new gRPC connection trusting only ``ca`` completes a health check."""
    options = [("grpc.use_local_subchannel_pool", 1)]  # a connection of its own
    credentials = grpc.ssl_channel_credentials(ca.read_bytes())
    with grpc.secure_channel(server.grpc_target, credentials, options=options) as channel:
        try:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        except grpc.RpcError:
            return False
    return True


@pytest.mark.parametrize("workers", [1, 2])
def test_a_renewed_certificate_is_served_without_a_restart(
    tiny_repo: Path, tmp_path: Path, workers: int
) -> None:
    """A certificate renewed in its secret (cert-manager) reaches new REST and gRPC
    connections within CNNSERVE_TLS_POLL_SECONDS, with one worker as with several (it
    took a restart; with several workers a SIGHUP), whatever its key type. A pair that
    does not load (the new certificate beside the old key), or one whose certificate has
    expired, is not used: the last good one stays, one warning says why,
    cnnserve_tls_files_ok is 0. A worker respawned meanwhile cannot start (uvicorn loads
    the files) until a good pair is in place, and its failed starts leave nothing in the
    gauges. The served certificate's expiry is a metric."""
    (tmp_path / "old").mkdir()
    (tmp_path / "new").mkdir()
    old_cert, old_key = self_signed(tmp_path / "old")  # RSA
    new_cert, new_key = _ec_self_signed(tmp_path / "new")  # another key type
    (tmp_path / "secret").mkdir()
    secret = MountedSecret(tmp_path / "secret", _pair(old_cert, old_key))
    cert, key = secret.folder / "tls.crt", secret.folder / "tls.key"
    env = {
        "CNNSERVE_TLS_CERTFILE": str(cert),
        "CNNSERVE_TLS_KEYFILE": str(key),
        "CNNSERVE_TLS_POLL_SECONDS": "0.2",
        "CNNSERVE_POLL_SECONDS": "0",
        "CNNSERVE_WORKERS": str(workers),
        "CNNSERVE_GRPC_LISTENERS": str(GRPC_LISTENERS),
    }
    old_der = ssl.PEM_cert_to_DER_cert(old_cert.read_text())
    new_der = ssl.PEM_cert_to_DER_cert(new_cert.read_text())

    def gauges(ca: Path) -> dict[str, float]:
        context = ssl.create_default_context(cafile=str(ca))
        with server.client(verify=context) as client:
            text = client.get("/metrics").text
        return {
            line.split()[0]: float(line.split()[1])
            for line in text.splitlines()
            if line.startswith("cnnserve_tls_")
        }

    with running_server(tiny_repo, grpc_port=0, env=env, tls_ca=old_cert) as server:
        assert _served_certificate(server.port) == old_der
        assert _rsa_only_client_served(server.port)
        assert _grpc_trusts(server, old_cert)
        expiry = gauges(old_cert)["cnnserve_tls_certificate_expiry_timestamp_seconds"]
        assert 0 < expiry - time.time() <= 86400 + 60  # self_signed's one day

        # A renewal gone wrong: a certificate that has expired replaces none.
        expired = _expired_pair(tmp_path / "expired")
        secret.rotate(_pair(*expired))
        eventually(lambda: gauges(old_cert)["cnnserve_tls_files_ok"] == 0)
        eventually(lambda: "expired at" in server.log.read_text())
        assert _served_certificate(server.port) == old_der
        # Nor one not valid yet: clients refused it as they refuse an expired one.
        secret.rotate(
            _pair(*dated_certificate(tmp_path / "future", "20991231000000Z", "21000101000000Z"))
        )
        eventually(lambda: "is not valid until 2099-12-31" in server.log.read_text())
        assert gauges(old_cert)["cnnserve_tls_files_ok"] == 0
        assert _served_certificate(server.port) == old_der

        secret.rotate(_pair(new_cert, old_key))
        eventually(lambda: "cannot be loaded" in server.log.read_text())
        log = server.log.read_text()
        assert log.count("cannot be loaded") <= workers, log  # once per worker, not per check
        assert "new connections keep the certificate read before" in log
        assert _served_certificate(server.port) == old_der
        assert _grpc_trusts(server, old_cert)
        if workers > 1:
            os.kill(min(workers_of(server)), signal.SIGKILL)
            eventually(lambda: "ssl.SSLError" in server.log.read_text())  # its start failed

        secret.rotate(_pair(new_cert, new_key))
        # Every worker: connections land on either.
        eventually(lambda: all(_served_certificate(server.port) == new_der for _ in range(8)))
        # The old certificate is gone for every client: an RSA-only one was still served
        # it (loaded into the same context, the EC pair took a slot of its own).
        assert not any(_rsa_only_client_served(server.port) for _ in range(8))
        # Every gRPC listener of every worker: the kernel spreads connections over them
        # (one listener was handed the new pair, the others kept the old).
        connections = 8 * workers * GRPC_LISTENERS  # one missed: under 1%
        eventually(lambda: all(_grpc_trusts(server, new_cert) for _ in range(connections)))
        assert not any(_grpc_trusts(server, old_cert) for _ in range(connections))
        # Every worker's: the respawned worker's failed starts' zeros are gone with them.
        if workers > 1:
            eventually(lambda: len(workers_of(server)) == workers)
        eventually(lambda: gauges(new_cert)["cnnserve_tls_files_ok"] == 1)
        renewed = gauges(new_cert)["cnnserve_tls_certificate_expiry_timestamp_seconds"]
        assert renewed >= expiry
        with server.client(verify=ssl.create_default_context(cafile=str(new_cert))) as client:
            assert client.post("/v1/classify", content=PNG, headers=PNG_TYPE).status_code == 200
        assert "TLS certificate" in server.log.read_text() and "reloaded" in server.log.read_text()
