"""The HTTP protocol's shed path (service.api.http_protocol, ``_shed``): a whole plain
request its worker has no place for is refused without the HTTP parser. Whatever a
request is, the client gets the same answer as through the parser, byte for byte but
the date and a generated request id; the connection goes on the same way; and the
refusals are counted the same.

The real app and uvicorn with the gateway's protocol run in this process, a worker of
one place (CNNSERVE_MAX_CONCURRENT_REQUESTS=1, taken as the headers are parsed) held by
a request whose body never comes; a spy says which requests took the shed path."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from service.api.http_protocol import GatewayHttpProtocol
from service.config import Settings
from tests.helpers.in_process import connect, server_in_process
from tests.helpers.server import eventually, read_response

pytestmark = pytest.mark.slow

JPEG = b"\xff\xd8\xff\xe0 not really a jpeg"
CLASSIFY = "POST /v1/classify?model=fashion_mnist HTTP/1.1"
HEADER_SECONDS, KEEP_ALIVE_SECONDS = 0.3, 2


def request(line: str = CLASSIFY, *headers: str, body: bytes = JPEG, length: bool = True) -> bytes:
    fields = ["Host: 127.0.0.1", *headers]
    if length:
        fields.append(f"Content-Length: {len(body)}")
    return ("\r\n".join([line, *fields, "", ""])).encode("latin-1") + body


REQUESTS = {
    "plain": request(),
    "more header fields": request(CLASSIFY, "Content-Type: image/jpeg", "Accept: */*"),
    "its request id": request(CLASSIFY, "X-Request-Id: abc-123"),
    "a request id not echoed": request(CLASSIFY, "X-Request-Id: caf\xe9"),
    "a deadline": request(CLASSIFY, "X-Request-Timeout: 2.5"),
    "a deadline not a number": request(CLASSIFY, "X-Request-Timeout: soon"),
    "keep-alive asked": request(CLASSIFY, "Connection: keep-alive"),
    "HEAD": request("HEAD /v1/classify HTTP/1.1", length=False, body=b""),
    "TF Serving's predict": request(
        "POST /v1/models/fashion_mnist:predict HTTP/1.1", body=b'{"instances": []}'
    ),
    "a route not served": request("POST /v2/nothing HTTP/1.1"),
    "a path to unquote": request("POST /v1/cl%61ssify HTTP/1.1"),
    "a model's status": request("GET /v1/models/fashion_mnist HTTP/1.1", length=False, body=b""),
    "a probe": request("GET /healthz HTTP/1.1", length=False, body=b""),
    "an empty body": request(body=b""),
    # Not plain: the parser reads them, on both sides.
    "HTTP/1.0": request("POST /v1/classify HTTP/1.0"),
    "connection: close": request(CLASSIFY, "Connection: close"),
    "chunked": request(CLASSIFY, "Transfer-Encoding: chunked", length=False, body=b"0\r\n\r\n"),
    "two Host lines": request(CLASSIFY, "Host: again"),
}
SHED = {  # the requests that take the shed path (the others are not plain, or not limited)
    "plain", "more header fields", "its request id",
    "a deadline", "a deadline not a number", "keep-alive asked", "HEAD",
    "TF Serving's predict", "a route not served", "a path to unquote", "an empty body",
}  # fmt: skip


@pytest.fixture(scope="module")
def full_worker() -> Iterator[tuple[int, list[bool]]]:
    """The in-process server's port, its one place held; and what the shed path said
    of each request it was asked about since (True: refused there)."""
    said: list[bool] = []
    original = GatewayHttpProtocol._shed

    def spy(self: GatewayHttpProtocol, data: bytes) -> bool:
        taken = original(self, data)
        said.append(taken)
        return taken

    GatewayHttpProtocol._shed = spy  # type: ignore[method-assign]
    settings = Settings(
        model_repository=Path(__file__).resolve().parents[2] / "model_repository",
        grpc_port=0,
        poll_seconds=0,
        max_concurrent_requests=1,
        admit_at="headers",
        max_refusals_per_second=0,  # unpaced: every refusal answered at once
        body_read_timeout_seconds=3600,  # the holder's body never comes
        header_read_timeout_seconds=HEADER_SECONDS,
        keep_alive_seconds=KEEP_ALIVE_SECONDS,
    )
    try:
        with server_in_process(settings) as (port, _), connect(port) as holder:
            holding = request(CLASSIFY, "Content-Type: image/jpeg", body=b"")
            holder.sendall(holding.replace(b"Length: 0", b"Length: 9"))
            eventually(lambda: answer(port, request())[0].startswith(b"HTTP/1.1 503 "))
            yield port, said
    finally:
        GatewayHttpProtocol._shed = original  # type: ignore[method-assign]


def asked(said: list[bool], count: int) -> list[bool]:
    """What the shed path said of the last ``count`` requests, once it said it: the spy
    notes it after the answer is written, which the client may read first."""
    eventually(lambda: len(said) >= count)
    return said[-count:]


def answer(port: int, data: bytes) -> tuple[bytes, bytes]:
    """The head and body of the answer to ``data`` on a new connection."""
    with connect(port) as sock:
        sock.sendall(data)
        head, body, _ = read_response(sock, head_request=data.startswith(b"HEAD "))
        return head, body


def comparable(head: bytes, body: bytes, sent_id: bool) -> tuple[bytes, bytes]:
    """The answer without its date, and without its request id where the server made one."""
    head = re.sub(rb"\r\ndate: [^\r]*", b"", head)
    if not sent_id:
        head = re.sub(rb"(x-request-id: )[0-9a-f]{32}", rb"\1<made>", head)
        body = re.sub(rb"[0-9a-f]{32}", b"<made>", body)
    return head, body


@pytest.mark.parametrize("name", sorted(REQUESTS))
def test_the_answer_is_the_parsers_own(
    full_worker: tuple[int, list[bool]], name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    port, said = full_worker
    data = REQUESTS[name]
    sent_id = b"x-request-id: abc" in data.lower()
    del said[:]
    shed = comparable(*answer(port, data), sent_id)
    asked(said, 1)  # every request is asked about: the worker is full
    assert any(said) == (name in SHED), said
    monkeypatch.setattr(GatewayHttpProtocol, "_full", lambda self: False)  # the parser only
    del said[:]
    parsed = comparable(*answer(port, data), sent_id)
    assert not any(said)
    assert shed == parsed
    if name in SHED:
        assert shed[0].startswith(b"HTTP/1.1 503 "), shed


def test_the_connection_goes_on_after_a_shed_refusal(full_worker: tuple[int, list[bool]]) -> None:
    port, said = full_worker
    del said[:]
    with connect(port) as sock:
        for _ in range(3):  # one after another, kept alive
            sock.sendall(request())
            head, _, rest = read_response(sock)
            assert head.startswith(b"HTTP/1.1 503 ") and rest == b""
            assert b"connection: close" not in head.lower()
        assert asked(said, 3) == [True] * 3
        sock.sendall(request() * 2)  # pipelined: the parser's, both answered in order
        head, _, rest = read_response(sock)
        second, _, rest = read_response(sock, rest)
        assert head.startswith(b"HTTP/1.1 503 ") and second.startswith(b"HTTP/1.1 503 ")
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")  # a probe still answers
        assert read_response(sock, rest)[0].startswith(b"HTTP/1.1 200 ")


def test_shed_refusals_are_counted_as_the_parsers_are(
    full_worker: tuple[int, list[bool]],
) -> None:
    port, said = full_worker

    def refused() -> tuple[float, float]:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        counts = []
        for pattern in (
            r'cnnserve_requests_total\{code="503",[^}]*route="/v1/classify"[^}]*\} (\S+)',
            r'cnnserve_overload_rejections_total\{[^}]*reason="concurrency"[^}]*\} (\S+)',
        ):
            counts.append(sum(float(n) for n in re.findall(pattern, text)))
        return counts[0], counts[1]

    before = refused()
    asked(said, 1)  # the scrape's own (not refused), noted before the count begins
    del said[:]
    for _ in range(5):
        assert answer(port, request())[0].startswith(b"HTTP/1.1 503 ")
    assert asked(said, 5) == [True] * 5
    after = refused()  # the scrape writes what the loop counted first
    assert (after[0] - before[0], after[1] - before[1]) == (5, 5)


def test_a_connection_refused_on_the_shed_path_keeps_its_timeouts(
    full_worker: tuple[int, list[bool]],
) -> None:
    """Its first request's headers came whole: the header timeout (armed as the
    connection opened) does not close it; idle, keep-alive's timeout does."""
    port, said = full_worker
    del said[:]
    with connect(port) as sock:
        sock.sendall(request())
        assert read_response(sock)[0].startswith(b"HTTP/1.1 503 ")
        time.sleep(3 * HEADER_SECONDS)  # time passing is what is tested
        sock.sendall(request())
        assert read_response(sock)[0].startswith(b"HTTP/1.1 503 ")
        assert asked(said, 2) == [True, True]
        sock.settimeout(5 * KEEP_ALIVE_SECONDS)
        started = time.monotonic()
        assert sock.recv(1) == b""  # closed by the server, idle
        assert time.monotonic() - started >= KEEP_ALIVE_SECONDS * 0.9


def test_the_demo_page_opens_on_a_full_worker_whose_classifications_are_refused(
    full_worker: tuple[int, list[bool]],
) -> None:
    """The page's own files and its list of models are answered outside the limit (a
    browser showed the 503's JSON instead of the page); what else it reads, and what it
    classifies, is refused as before, which the page reports as the server being busy."""
    port, _ = full_worker
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
        page = client.get("/")
        assert page.status_code == 200 and b"demo.js" in page.content
        for name, kind in (("demo.js", "text/javascript"), ("demo.css", "text/css")):
            loaded = client.get(f"/demo/static/{name}")
            assert loaded.status_code == 200
            assert loaded.headers["content-type"].startswith(kind)
            again = client.get(
                f"/demo/static/{name}", headers={"If-None-Match": loaded.headers["etag"]}
            )
            assert again.status_code == 304
        assert client.get("/demo/models").json()["models"][0]["name"] == "fashion_mnist"
        for refused in (
            client.get("/demo/models/fashion_mnist/versions/1/card"),
            client.get("/docs"),
            client.post("/v1/classify", content=JPEG, headers={"Content-Type": "image/jpeg"}),
        ):
            assert refused.status_code == 503
            assert refused.json()["error"]["code"] == "overloaded"
