"""A refused request's body costs the refusal pace the bytes that came, read to be dropped
(service.api.http_protocol → ConcurrencyLimit.charge_body): not the length announced.

The real app and uvicorn with the gateway's protocol run in this process, a worker of one
place (CNNSERVE_MAX_CONCURRENT_REQUESTS=1, taken as the headers are parsed), held by a
request whose body never comes; the charges are counted by a spy."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from service.api import http_protocol
from service.concurrency import ConcurrencyLimit
from service.config import Settings
from tests.helpers.in_process import connect, server_in_process, serving_in_process
from tests.helpers.server import eventually, read_response

pytestmark = pytest.mark.slow

BODY = 450_000


def head(length: int, content_type: bytes = b"image/png") -> bytes:
    return (
        b"POST /v1/classify HTTP/1.1\r\nhost: x\r\ncontent-type: " + content_type + b"\r\n"
        b"content-length: " + str(length).encode() + b"\r\n\r\n"
    )


@pytest.fixture(scope="module")
def charged() -> Iterator[tuple[int, list[int]]]:
    """The server's port, and the bytes charged so far (one entry a charge)."""
    charges: list[int] = []
    original = ConcurrencyLimit.charge_body

    def spy(self: ConcurrencyLimit, body_bytes: int) -> None:
        charges.append(body_bytes)
        original(self, body_bytes)

    ConcurrencyLimit.charge_body = spy  # type: ignore[method-assign]
    settings = one_place(body_read_timeout_seconds=3600)  # the holder's body never comes
    try:
        with serving_in_process(settings) as port, connect(port) as holder:
            holder.sendall(head(1000))  # its place taken, its body never sent
            eventually(lambda: held(port))
            yield port, charges
    finally:
        ConcurrencyLimit.charge_body = original  # type: ignore[method-assign]


def one_place(**settings: Any) -> Settings:
    """A worker of one place, taken as the headers are parsed."""
    return Settings(
        model_repository=Path(__file__).resolve().parents[2] / "model_repository",
        grpc_port=0,
        poll_seconds=0,
        max_concurrent_requests=1,
        admit_at="headers",
        **settings,
    )


def held(port: int) -> bool:
    """Whether the worker's one place is taken: a request without a body is refused."""
    with connect(port) as sock:
        sock.sendall(head(0))
        return read_response(sock)[0].startswith(b"HTTP/1.1 503 ")


def refused(sock: socket.socket, length: int, content_type: bytes = b"image/png") -> bytes:
    sock.sendall(head(length, content_type))
    answer, _, rest = read_response(sock)
    assert answer.startswith(b"HTTP/1.1 503 "), answer
    assert rest == b""
    return answer


@pytest.mark.parametrize("content_type", [b"image/png", b"multipart/form-data; boundary=b"])
def test_a_refused_body_is_charged_as_it_is_dropped(
    charged: tuple[int, list[int]], content_type: bytes
) -> None:
    port, charges = charged
    before = len(charges)
    with connect(port) as sock:
        refused(sock, BODY, content_type)
        sock.sendall(b"\0" * BODY)  # dropped: the connection goes on
        eventually(lambda: sum(charges[before:]) == BODY, timeout=10)
        refused(sock, 10)  # (the next request on it)
        sock.sendall(b"\0" * 10)
        eventually(lambda: sum(charges[before:]) == BODY + 10, timeout=10)


def test_a_length_announced_and_not_sent_costs_nothing(charged: tuple[int, list[int]]) -> None:
    port, charges = charged
    before = len(charges)
    with connect(port) as sock:
        refused(sock, 10 * BODY)
        sock.sendall(b"\0" * 1000)
        eventually(lambda: sum(charges[before:]) == 1000, timeout=10)
    # The client left: what it announced and never sent was charged nothing.
    with connect(port) as sock:  # (a request answered after it: the server went on)
        refused(sock, 0)
    assert sum(charges[before:]) == 1000


def test_a_body_sent_with_its_head_is_charged_too(charged: tuple[int, list[int]]) -> None:
    """Parsed with the head, before the refusal was answered."""
    port, charges = charged
    before = len(charges)
    with connect(port) as sock:
        sock.sendall(head(BODY) + b"\0" * BODY)
        assert read_response(sock)[0].startswith(b"HTTP/1.1 503 ")
        eventually(lambda: sum(charges[before:]) == BODY, timeout=10)


def test_a_503_answered_by_the_app_charges_its_own_body_not_the_next(
    charged: tuple[int, list[int]],
) -> None:
    """Pipelined behind a probe, the request reaches RequestGuard (the protocol answers
    only a request with nothing answered before it), whose 503 leaves its body unread; a
    request begun behind it is not charged for it."""
    port, charges = charged
    before = len(charges)
    probe = b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n"
    with connect(port) as sock:
        sock.sendall(probe + head(BODY) + b"\0" * BODY)
        first, _, rest = read_response(sock)
        assert first.startswith(b"HTTP/1.1 200 "), first
        answer, _, _ = read_response(sock, rest)
        assert answer.startswith(b"HTTP/1.1 503 "), answer
        eventually(lambda: sum(charges[before:]) == BODY, timeout=10)
        held_on = len(charges)
        sock.sendall(probe)  # answered 200: nothing charged for it
        assert read_response(sock)[0].startswith(b"HTTP/1.1 200 ")
    assert sum(charges[held_on:]) == 0


def test_a_refusal_as_the_server_stops_closes_its_connection(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A connection idle when the server began to stop may still send a request (its
    client did not know yet): refused as its headers are parsed, the answer says
    ``connection: close`` and the connection closes after it, whatever keep-alive asked."""
    monkeypatch.setattr(http_protocol, "FIRST_REQUEST_GRACE_SECONDS", 60.0)
    with server_in_process(one_place()) as (port, runner), connect(port) as holder:
        holder.sendall(head(10))  # its place taken until its body comes
        eventually(lambda: held(port))
        with connect(port) as idle:
            probe = b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n"
            idle.sendall(probe)  # accepted and answered: kept alive, idle
            assert read_response(idle)[0].startswith(b"HTTP/1.1 200 ")
            runner.should_exit = True
            eventually(lambda: not listening(port))  # the connections were told
            idle.sendall(head(5) + b"\0" * 5)
            answer, _, rest = read_response(idle)
            assert answer.startswith(b"HTTP/1.1 503 "), answer
            assert b"connection: close" in answer.lower()
            assert rest == b"" and idle.recv(1) == b""  # closed after it
        holder.sendall(b"\0" * 10)  # answered (not an image), so the server can stop
        assert read_response(holder)[0].startswith(b"HTTP/1.1 400 ")


def listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return False
    return True
