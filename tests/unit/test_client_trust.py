"""What `verify` and `promote` tell when the scheme of --url is not what the port speaks:
real connections to local sockets, so the exceptions are httpx's own."""

from __future__ import annotations

import contextlib
import socket
import ssl
import struct
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from service.client_trust import untrusted
from tests.helpers.server import self_signed


@contextmanager
def listening(answer: Callable[[socket.socket], None]) -> Iterator[int]:
    """A port on 127.0.0.1 whose every connection is handled by ``answer``."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            with conn:
                answer(conn)

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1]
    finally:
        stop.set()
        thread.join()
        server.close()


def plain_http(conn: socket.socket) -> None:
    """A plaintext HTTP server's answer to a TLS ClientHello."""
    conn.recv(4096)
    conn.sendall(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")


def closes(conn: socket.socket) -> None:
    """A TLS port given plaintext: the handshake fails, the connection closes unanswered."""
    conn.recv(4096)


def resets(conn: socket.socket) -> None:
    conn.recv(4096)
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def failure(url: str) -> httpx.HTTPError:
    with pytest.raises(httpx.HTTPError) as failed:
        httpx.post(url, content=b"x" * 100, verify=True, timeout=10)
    return failed.value


def test_an_https_url_to_a_plaintext_port_says_so_not_to_give_the_certificate() -> None:
    """It said "give its certificate with --ca-cert", to a command given it already."""
    with listening(plain_http) as port:
        url = f"https://127.0.0.1:{port}"
        told = untrusted(url, failure(url))
    assert told is not None
    assert "does not speak TLS" in told and told.endswith("use http://")
    assert "--ca-cert" not in told


@pytest.mark.parametrize("answer", [closes, resets], ids=["closed", "reset"])
def test_an_http_url_to_a_port_that_hangs_up_hints_at_https(
    answer: Callable[[socket.socket], None],
) -> None:
    """It said "Server disconnected…; is the server running?" of a TLS port that ran."""
    with listening(answer) as port:
        url = f"http://127.0.0.1:{port}"
        told = untrusted(url, failure(url))
    assert told is not None and told.startswith(f"{url} closed the connection without answering")
    assert told.endswith("if that port speaks TLS, use https://")


def test_nothing_listening_is_no_tls_problem() -> None:
    with listening(closes) as port:
        pass
    url = f"http://127.0.0.1:{port}"
    assert untrusted(url, failure(url)) is None


def test_an_untrusted_certificate_asks_for_another_ca_cert_when_one_was_given(
    tmp_path: Path,
) -> None:
    """It said "give its certificate with --ca-cert" to a command given one."""
    cert, key = self_signed(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)

    def tls(conn: socket.socket) -> None:
        with contextlib.suppress(OSError):  # the client refuses the certificate
            context.wrap_socket(conn, server_side=True).close()

    with listening(tls) as port:
        url = f"https://127.0.0.1:{port}"
        exc = failure(url)  # the usual roots: the self-signed certificate is not in them
    told = untrusted(url, exc)
    assert told is not None and told.endswith("give its certificate with --ca-cert")
    other = tmp_path / "other-ca.pem"
    told = untrusted(url, exc, other)
    assert told is not None and f"--ca-cert {other} does not vouch for it" in told
