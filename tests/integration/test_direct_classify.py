"""Which requests the HTTP protocol answers itself (service.api.direct_classify), and that
every way such a request can end gives its concurrency place back and closes its record.

The real app and uvicorn with the gateway's protocol run in this process (on a thread),
so the test can see which path answered (a spy on DirectClassify.answer) and the
worker's concurrency count; the client is a raw socket, to send what httpx would not
(Expect, chunked bodies, a body that stops, pipelined requests, HTTP/1.0). That the
answers equal the route's byte for byte is tests/integration/test_fastpath.py."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from service.api.direct_classify import DirectClassify, DirectRequest
from service.config import Settings
from tests.helpers.images import encode, gradient
from tests.helpers.in_process import connect, serving_in_process
from tests.helpers.server import eventually, read_response

pytestmark = pytest.mark.slow

PNG = encode(gradient(), "PNG")
KEY = "direct-test-key"
BODY_TIMEOUT = 1.0


@dataclass
class Spy:
    """The requests the direct path answered, and the worker's DirectClassify."""

    answered: list[DirectRequest] = field(default_factory=list)
    direct: DirectClassify | None = None

    def in_flight(self) -> int:
        assert self.direct is not None
        return self.direct.admission.concurrency.in_flight


@dataclass
class InProcess:
    port: int
    spy: Spy

    def connect(self) -> socket.socket:
        return connect(self.port)

    def wait_idle(self) -> None:
        """Until no request holds a place (the test's requests are all answered)."""
        deadline = time.monotonic() + 10
        while self.spy.in_flight() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert self.spy.in_flight() == 0


@pytest.fixture(scope="module")
def server() -> Iterator[InProcess]:
    spy = Spy()
    original = DirectClassify.answer

    async def answer(self: DirectClassify, request: DirectRequest) -> Any:
        spy.direct = self
        spy.answered.append(request)
        return await original(self, request)

    DirectClassify.answer = answer  # type: ignore[method-assign]
    settings = Settings(
        model_repository=Path(__file__).resolve().parents[2] / "model_repository",
        grpc_port=0,
        poll_seconds=0,
        api_keys=KEY,
        body_read_timeout_seconds=BODY_TIMEOUT,
        max_body_bytes=100_000,
    )
    try:
        with serving_in_process(settings) as port:
            # The spy learns the worker's DirectClassify from a first request.
            with InProcess(port, spy).connect() as sock:
                sock.sendall(raw_request())
                assert b" 200 " in read_response(sock)[0]
            yield InProcess(port, spy)
    finally:
        DirectClassify.answer = original  # type: ignore[method-assign]


def raw_request(
    body: bytes = PNG,
    *,
    extra: bytes = b"",
    key: str = KEY,
    version: bytes = b"HTTP/1.1",
    query: bytes = b"",
) -> bytes:
    head = (
        b"POST /v1/classify" + query + b" " + version + b"\r\nhost: x\r\n"
        b"content-type: image/png\r\n"
        b"authorization: Bearer " + key.encode() + b"\r\n"
        b"content-length: " + str(len(body)).encode() + b"\r\n" + extra + b"\r\n"
    )
    return head + body


def answered_directly(server: InProcess, send: bytes) -> tuple[bool, bytes, bytes]:
    """Send ``send`` on a fresh connection: (answered by the direct path, head, body)."""
    before = len(server.spy.answered)
    with server.connect() as sock:
        sock.sendall(send)
        head, body, rest = read_response(sock)
        if head.startswith(b"HTTP/1.1 100 "):  # an interim answer: the final one follows
            head, body, _ = read_response(sock, rest)
    server.wait_idle()
    return len(server.spy.answered) > before, head, body


def test_a_raw_image_with_plain_query_values_is_answered_directly(server: InProcess) -> None:
    direct, head, body = answered_directly(server, raw_request(query=b"?top_k=2"))
    assert direct and head.startswith(b"HTTP/1.1 200 ")
    assert b"x-request-id: " in head and b"server-timing: decode;dur=" in head
    assert body.count(b'"class_id"') == 2


def test_an_answered_requests_body_is_let_go(server: InProcess) -> None:
    """A closed connection's protocol is in reference cycles (freed only by a full
    collection, which a worker rarely runs): the body its request held stayed with it,
    and after bursts of uploads workers held 0.5-1.7 GB for minutes."""
    direct, head, _ = answered_directly(server, raw_request())
    assert direct and head.startswith(b"HTTP/1.1 200 ")
    eventually(lambda: server.spy.answered[-1].finished)
    assert server.spy.answered[-1].chunks == []


@pytest.mark.parametrize(
    ("case", "send", "status"),
    [
        ("a wrong key: RequestGuard's 401", raw_request(key="nope"), b"401"),
        ("Expect: 100-continue", raw_request(extra=b"expect: 100-continue\r\n"), b"200"),
        ("a repeated parameter", raw_request(query=b"?top_k=1&top_k=1"), b"200"),
        ("a parameter of two values", raw_request(query=b"?top_k=1&top_k=2"), b"400"),
        ("a body over the limit: 413", raw_request(b"\0" * 100_001), b"413"),
        (
            "a chunked body",
            raw_request(b"").replace(b"content-length: 0", b"transfer-encoding: chunked")
            + f"{len(PNG):x}\r\n".encode()
            + PNG
            + b"\r\n0\r\n\r\n",
            b"200",
        ),
    ],
)
def test_what_the_direct_path_leaves_to_the_app(
    server: InProcess, case: str, send: bytes, status: bytes
) -> None:
    direct, head, _ = answered_directly(server, send)
    assert not direct, case
    assert head.split(b" ")[1] == status, (case, head)


def test_a_body_sent_in_parts_is_answered_once_it_is_whole(server: InProcess) -> None:
    before = len(server.spy.answered)
    whole = raw_request()
    with server.connect() as sock:
        sock.sendall(whole[:-100])
        time.sleep(0.05)  # a gap the server must wait out (not a synchronization)
        sock.sendall(whole[-100:])
        head, body, _ = read_response(sock)
    assert head.startswith(b"HTTP/1.1 200 ") and b'"predictions"' in body
    assert len(server.spy.answered) == before + 1


def test_a_body_that_stops_gets_408_and_its_place_back(server: InProcess) -> None:
    with server.connect() as sock:
        sock.sendall(raw_request()[:-10])
        started = time.monotonic()
        head, body, _ = read_response(sock)
        waited = time.monotonic() - started
        assert sock.recv(1) == b""  # the connection is closed after it
    assert head.startswith(b"HTTP/1.1 408 ") and b'"request_timeout"' in body
    assert b"x-request-id: " in head
    assert BODY_TIMEOUT * 0.5 < waited < BODY_TIMEOUT * 10
    server.wait_idle()


def test_a_client_mid_body_holds_no_place_and_may_leave(server: InProcess) -> None:
    """Its place is taken once the body is in (Settings.admit_at): a client slow to send
    it, or gone before, holds none, while a whole request beside it is answered."""
    with server.connect() as slow, server.connect() as other:
        slow.sendall(raw_request()[:-10])
        other.sendall(raw_request())
        head, _, _ = read_response(other, b"")
        assert head.startswith(b"HTTP/1.1 200 "), head
        server.wait_idle()  # with the slow one still sending: it holds no place
    server.wait_idle()


def test_pipelined_requests_are_answered_in_order(server: InProcess) -> None:
    first = raw_request(query=b"?top_k=1")
    second = raw_request(query=b"?top_k=3")
    with server.connect() as sock:
        sock.sendall(first + second + first)
        rest = b""
        counts = []
        for _ in range(3):
            head, body, rest = read_response(sock, rest)
            assert head.startswith(b"HTTP/1.1 200 "), head
            counts.append(body.count(b'"class_id"'))
    assert counts == [1, 3, 1]
    server.wait_idle()


@pytest.mark.parametrize(
    ("send", "closes"),
    [
        (raw_request(extra=b"connection: close\r\n"), True),
        (raw_request(version=b"HTTP/1.0"), True),
        (raw_request(), False),
    ],
    ids=["connection-close", "http-1.0", "keep-alive"],
)
def test_keep_alive_as_the_client_asks(server: InProcess, send: bytes, closes: bool) -> None:
    with server.connect() as sock:
        sock.sendall(send)
        head, _, _ = read_response(sock)
        assert head.split(b" ")[1] == b"200"
        if closes:
            assert sock.recv(1) == b""
        else:  # the connection takes another request
            sock.sendall(raw_request())
            assert read_response(sock)[0].split(b" ")[1] == b"200"
    server.wait_idle()
