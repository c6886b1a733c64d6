"""The room check a route makes before reading a body it parses, made by the HTTP protocol
as the headers are parsed (service.api.header_room): the same answer as the route's,
before the body is sent, the route never run; and only for what the route would decide
the same way.

The real app and uvicorn with the gateway's protocol run in this process (on a thread),
so the test can count the data plane's room checks: the header check makes one, and a
route that ran makes its own. The refusal used is the one a client can cause on an idle
server: a deadline (X-Request-Timeout) already spent when the check is made."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from service.api.header_room import HeaderRoomCheck, Target, target
from service.config import Settings
from service.dataplane import DataPlane
from service.errors import CnnserveError
from tests.helpers.images import encode, gradient
from tests.helpers.in_process import connect, serving_in_process
from tests.helpers.server import read_response

pytestmark = pytest.mark.slow

PNG = encode(gradient(), "PNG")
KEY = "header-room-key"
SPENT = b"x-request-timeout: 0.000001\r\n"  # gone before any check can be made
BOUNDARY = "headerroomboundary"
MULTIPART = (
    (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n'
        "Content-Type: image/png\r\n\r\n"
    ).encode()
    + PNG
    + f"\r\n--{BOUNDARY}--\r\n".encode()
)


@dataclass
class Counts:
    """The data plane's room checks, and what the header check decided (path, code)."""

    checks: int = 0
    decided: list[tuple[str, str | None]] = field(default_factory=list)


@dataclass
class InProcess:
    port: int
    counts: Counts

    def connect(self) -> socket.socket:
        return connect(self.port)


@pytest.fixture(scope="module")
def server() -> Iterator[InProcess]:
    counts = Counts()
    check_room, decide = DataPlane.check_room, HeaderRoomCheck.__call__

    def counted(self: DataPlane, *args: Any, **kwargs: Any) -> None:
        counts.checks += 1
        check_room(self, *args, **kwargs)

    def decided(self: HeaderRoomCheck, method: str, path: str, *rest: Any) -> Any:
        check = decide(self, method, path, *rest)
        if check is None:
            return None

        def noted() -> CnnserveError | None:
            error = check()
            counts.decided.append((path, None if error is None else error.code))
            return error

        return noted

    DataPlane.check_room = counted  # type: ignore[method-assign]
    HeaderRoomCheck.__call__ = decided  # type: ignore[method-assign]
    settings = Settings(
        model_repository=Path(__file__).resolve().parents[2] / "model_repository",
        grpc_port=0,
        poll_seconds=0,
        api_keys=KEY,
    )
    try:
        with serving_in_process(settings) as port:
            # A first answer times a batch: deadlines are checked against the queue from
            # then on.
            with InProcess(port, counts).connect() as sock:
                sock.sendall(head(b"/v1/classify", b"image/png", len(PNG)) + PNG)
                assert b" 200 " in read_response(sock)[0]
            yield InProcess(port, counts)
    finally:
        DataPlane.check_room = check_room  # type: ignore[method-assign]
        HeaderRoomCheck.__call__ = decide  # type: ignore[method-assign]


def head(
    path: bytes, content_type: bytes, length: int, extra: bytes = b"", key: str = KEY
) -> bytes:
    return (
        b"POST " + path + b" HTTP/1.1\r\nhost: x\r\ncontent-type: " + content_type + b"\r\n"
        b"authorization: Bearer " + key.encode() + b"\r\n"
        b"content-length: " + str(length).encode() + b"\r\n" + extra + b"\r\n"
    )


def answer_to_head(
    server: InProcess, sent: bytes, body: bytes
) -> tuple[bytes, bytes, int, list[tuple[str, str | None]]]:
    """Send a request's head alone; read the answer; then send its body and a second
    request on the same connection, which must be answered 200: (the first answer's head
    and body, the room checks the first request made, what the header check decided)."""
    before, decided = server.counts.checks, len(server.counts.decided)
    with server.connect() as sock:
        sock.sendall(sent)
        answer, content, rest = read_response(sock)
        checks = server.counts.checks - before
        decisions = server.counts.decided[decided:]
        sock.sendall(body + head(b"/v1/classify", b"image/png", len(PNG)) + PNG)
        assert b" 200 " in read_response(sock, rest)[0], "the connection went on"
    return answer, content, checks, decisions


MULTIPART_TYPE = f"multipart/form-data; boundary={BOUNDARY}".encode()
IMAGES_JSON = json.dumps({"instances": [{"b64": "AAAA"}]}).encode()


@pytest.mark.parametrize(
    ("path", "content_type", "body"),
    [
        (b"/v1/classify", MULTIPART_TYPE, MULTIPART),
        (b"/v1/classify?top_k=2&model=fashion_mnist", b"application/json", IMAGES_JSON),
        (b"/v1/models/fashion_mnist:predict", b"application/json", IMAGES_JSON),
        (b"/v1/models/fashion_mnist/versions/1:predict", b"application/json", IMAGES_JSON),
    ],
)
def test_a_parsed_body_refused_by_the_room_check_is_answered_before_it_is_sent(
    server: InProcess, path: bytes, content_type: bytes, body: bytes
) -> None:
    answer, content, checks, decisions = answer_to_head(
        server, head(path, content_type, len(body), SPENT), body
    )
    assert answer.startswith(b"HTTP/1.1 504 "), answer
    assert b"x-error-code: deadline_exceeded" in answer and b"x-request-id: " in answer
    message = json.loads(content)
    text = message["error"] if b":predict" in path else message["error"]["message"]
    assert "deadline passed" in text
    assert checks == 1, "the header check alone: the route did not run"
    assert decisions == [(path.split(b"?")[0].decode(), "deadline_exceeded")]


@pytest.mark.parametrize(
    ("case", "path", "content_type", "key", "status", "checks"),
    [
        # RequestGuard's 401 first: a client without a key learns nothing of the load.
        ("a wrong key", b"/v1/classify", MULTIPART_TYPE, "nope", b"401", 0),
        # The route's validation says what is wrong with it, before any room check.
        ("an unknown parameter", b"/v1/classify?versoin=1", MULTIPART_TYPE, KEY, b"400", 0),
        # Not parsed: the direct path answers it (its deadline is checked as it is queued).
        ("a raw image", b"/v1/classify?top_k=1", b"image/png", KEY, b"504", 0),
        # A percent-escape is the route's to decode: its own check refuses it.
        (
            "an escaped name",
            b"/v1/models/fashion%5Fmnist:predict",
            b"application/json",
            KEY,
            b"504",
            1,
        ),
    ],
)
def test_what_the_route_decides_otherwise_is_left_to_it(
    server: InProcess,
    case: str,
    path: bytes,
    content_type: bytes,
    key: str,
    status: bytes,
    checks: int,
) -> None:
    body = PNG if content_type == b"image/png" else MULTIPART
    decided, before = len(server.counts.decided), server.counts.checks
    with server.connect() as sock:
        sock.sendall(head(path, content_type, len(body), SPENT, key) + body)
        answer, _, _ = read_response(sock)
    assert answer.startswith(b"HTTP/1.1 " + status + b" "), (case, answer)
    assert server.counts.checks - before == checks, case
    refused_early = [code for _, code in server.counts.decided[decided:] if code]
    assert not refused_early, (case, refused_early)


def test_targets_read_at_face_value() -> None:
    multipart = [(b"content-type", MULTIPART_TYPE)]
    as_json = [(b"content-type", b"application/json")]
    assert target("POST", "/v1/classify", b"version=2&label=", multipart) == Target(None, 2, "")
    assert target("POST", "/v1/classify", b"model=m&label=canary", as_json) == Target(
        "m", None, "canary"
    )
    assert target("POST", "/v1/models/m/labels/canary:predict", b"", []) == Target(
        "m", None, "canary"
    )
    assert target("POST", "/v1/models/m/versions/007:predict", b"", []) == Target("m", 7, None)
    for method, path, query, headers in [
        ("GET", "/v1/classify", b"", multipart),
        ("POST", "/v1/classify", b"", [(b"content-type", b"multipart/form-data")]),
        ("POST", "/v1/classify", b"", [(b"content-type", b"image/jpeg")]),
        ("POST", "/v1/classify", b"version=two", multipart),
        ("POST", "/v1/classify", b"top_k=1&top_k=2", multipart),
        ("POST", "/v1/models/m/versions/-1:predict", b"", []),
        ("POST", "/v1/models/m:classify", b"", []),
        ("POST", "/v1/models/a:b:predict", b"", []),
        ("POST", "/v1/models/:predict", b"", []),
    ]:
        assert target(method, path, query, headers) is None, (method, path, query)
