"""The shed path's reader of whole plain requests (service.api.plain_request): what it
takes, the HTTP parser (httptools, the one uvicorn and the gateway's protocol use)
reads the same way, and it leaves the rest to the parser."""

from __future__ import annotations

from dataclasses import dataclass, field

import httptools
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.api.plain_request import PlainRequest, plain_request

HEAD_LIMIT, TARGET_LIMIT = 65_536, 65_535
BODY = b"\xff\xd8jpeg bytes\r\n\r\nPOST / HTTP/1.1\r\n"  # a body that looks like more


def request(
    head: str = "POST /v1/classify?model=m HTTP/1.1",
    headers: tuple[str, ...] = ("Host: 127.0.0.1:8000", "Content-Type: image/jpeg"),
    body: bytes = BODY,
    length: int | None = None,
) -> bytes:
    declared = len(body) if length is None else length
    lines = [head, *headers, f"Content-Length: {declared}", "", ""]
    return "\r\n".join(lines).encode("latin-1") + body


def test_a_plain_request_is_read_whole() -> None:
    assert plain_request(request(), HEAD_LIMIT, TARGET_LIMIT) == PlainRequest(
        "POST",
        b"/v1/classify?model=m",
        [
            (b"host", b"127.0.0.1:8000"),
            (b"content-type", b"image/jpeg"),
            (b"content-length", str(len(BODY)).encode()),
        ],
        len(BODY),
    )
    # Blanks after the colon are not the value's; no body without a length.
    got = plain_request(
        b"GET /v1/models/m HTTP/1.1\r\nHost:\t x\r\nConnection: Keep-Alive\r\n\r\n", 100, 100
    )
    assert got == PlainRequest(
        "GET", b"/v1/models/m", [(b"host", b"x"), (b"connection", b"Keep-Alive")], 0
    )


@pytest.mark.parametrize(
    "data",
    [
        request(head="POST /v1/classify HTTP/1.0"),  # keep-alive rules of its own
        request(head="post /v1/classify HTTP/1.1"),  # not a method the parser knows
        request(head="FOO /v1/classify HTTP/1.1"),
        request(head="CONNECT host:443 HTTP/1.1"),
        request(head="POST http://host/v1/classify HTTP/1.1"),  # absolute form
        request(head="POST /v1/cl assify HTTP/1.1"),
        request(head="POST /v1/\xe9 HTTP/1.1"),
        request(head="POST /v1/classify#frag HTTP/1.1"),
        request(head="POST  /v1/classify HTTP/1.1"),
        request(headers=("Content-Type: image/jpeg",)),  # no Host
        request(headers=("Host: a", "Host: b")),
        request(headers=("Host: a", "Content-Length: 5")),  # two lengths
        request(headers=("Host: a", "Transfer-Encoding: chunked")),
        request(headers=("Host: a", "Expect: 100-continue")),
        request(headers=("Host: a", "Upgrade: h2c", "Connection: Upgrade")),
        request(headers=("Host: a", "Connection: close")),
        request(headers=("Host: a", "Connection: keep-alive, close")),
        request(headers=("Host: a", "Proxy-Connection: close")),
        request(headers=("Host: a", "X-Folded: one", " two")),  # obs-fold
        request(headers=("Host: a", "X-Empty:")),  # the parser gives no such header
        request(headers=("Host: a", "X-Trailing: value ")),
        request(headers=("Host: a", "X-Tab: a\tb")),
        request(headers=("Host: a", "X-Ctl: a\x01b")),
        request(headers=("Host: a", "X-Latin: caf\xe9")),
        request(headers=("Host: a", "Bad Name: x")),
        request(headers=("Host: a", "X-Space : x")),
        request(length=len(BODY) - 1),  # the rest would be the next request's
        request(length=len(BODY) + 1),  # the body is still coming
        request(length=-1),
        request() + b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n",  # pipelined
        request()[:40],  # the headers are still coming
        request(headers=("Host: a", "Content-Length: +5")),
        request(headers=("Host: a", "Content-Length: 1234567890123456")),
        b"POST /v1/classify HTTP/1.1\nHost: a\n\n",  # bare line feeds
        b"",
    ],
)
def test_anything_else_is_left_to_the_parser(data: bytes) -> None:
    assert plain_request(data, HEAD_LIMIT, TARGET_LIMIT) is None


def test_heads_and_targets_over_their_limits_are_left_to_the_parser() -> None:
    data = request(head="POST /" + "a" * 100 + " HTTP/1.1")
    assert plain_request(data, HEAD_LIMIT, 101) is not None
    assert plain_request(data, HEAD_LIMIT, 100) is None
    head_bytes = data.index(b"\r\n\r\n") + 4
    assert plain_request(data, head_bytes, TARGET_LIMIT) is not None
    assert plain_request(data, head_bytes - 1, TARGET_LIMIT) is None


@dataclass
class Parsed:
    """What httptools reads from a buffer: its messages' parts, as uvicorn gets them."""

    messages: int = 0
    url: bytes = b""
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""
    complete: bool = False
    keep_alive: bool = False
    method: bytes = b""
    version: str = ""

    def on_message_begin(self) -> None:
        self.messages += 1

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        self.complete = True


def parsed(data: bytes) -> Parsed | None:
    """httptools' reading of ``data`` as one whole message, or None when it reads
    something else (an error, an upgrade, no message or more than one, an unfinished one)."""
    got = Parsed()
    parser = httptools.HttpRequestParser(got)
    try:
        parser.feed_data(data)
    except (httptools.HttpParserError, httptools.HttpParserUpgrade):
        return None
    if got.messages != 1 or not got.complete:
        return None
    got.keep_alive = parser.should_keep_alive()
    got.method = parser.get_method()
    got.version = parser.get_http_version()
    return got


def mostly(usual: list[str], odd: list[str]) -> st.SearchStrategy[str]:
    """One of ``usual`` seven times in eight, else one of ``odd``."""
    return st.integers(0, 7).flatmap(lambda i: st.sampled_from(odd if i == 7 else usual))


METHODS = mostly(
    ["GET", "POST", "HEAD", "PUT", "DELETE", "PATCH", "OPTIONS"], ["get", "FOO", "PRI"]
)
TARGETS = mostly(
    ["/", "/v1/classify", "/v1/classify?model=m&top_k=3", "/v1/models/m:predict", "/a%20b"],
    ["/a b", "*", "http://h/x", "/\xe9", "/a#b", "/a?b=[1]", "/a\tb", ""],
)
VERSIONS = mostly(["HTTP/1.1"], ["HTTP/1.0", "HTTP/2.0", "HTTP/1.1 ", "http/1.1", "HTTP/1.2"])
NAMES = mostly(
    ["Host", "Content-Type", "X-Request-Id", "X-Request-Timeout", "Authorization", "Keep-Alive"],
    [
        "host", "HOST", "Content-Length", "content-length", "Transfer-Encoding", "Connection",
        "Proxy-Connection", "Expect", "Upgrade", "TE", "X!#$%&'*+.^_`|~", "Bad Name",
        "X-Space ", "", "Ho\x00st",
    ],
)  # fmt: skip
VALUES = mostly(
    ["127.0.0.1:8000", "image/jpeg", "keep-alive", "0", "007", "a b", "Bearer k"],
    [
        "chunked", "close", "Keep-Alive", "upgrade", "h2c", "100-continue", "1, 2", "a\tb",
        "a ", " a", "\ta", "", "caf\xe9", "a\x7fb", "a\x00b", "gzip, chunked", "-1", "0x1",
    ],
)  # fmt: skip
SEPARATORS = mostly([": ", ":"], [":\t", ":  ", " : "])


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    """Requests near the plain shape: each part a usual choice most often, else an odd
    one (the HTTP parser may read those otherwise, or refuse them)."""
    line = f"{draw(METHODS)} {draw(TARGETS)} {draw(VERSIONS)}"
    fields = [("Host", ": ", "h")] if draw(st.integers(0, 9)) else []
    fields += draw(st.lists(st.tuples(NAMES, SEPARATORS, VALUES), max_size=3))
    body = draw(st.binary(max_size=24))
    if draw(st.integers(0, 4)):  # most often framed by a true Content-Length
        shift = draw(
            st.integers(0, 7).flatmap(lambda i: st.sampled_from([-1, 1] if i == 7 else [0]))
        )
        fields.append(("Content-Length", ": ", str(max(0, len(body) + shift))))
    ending = draw(mostly(["\r\n"], ["\n"]))
    head = ending.join([line, *(f"{n}{sep}{v}" for n, sep, v in fields)]) + ending * 2
    after = draw(mostly([""], ["GET / HTTP/1.1\r\n"]))
    return head.encode("latin-1") + body + after.encode()


@settings(max_examples=1500, deadline=None)
@given(requests())
def test_what_is_read_whole_the_parser_reads_the_same_way(data: bytes) -> None:
    plain = plain_request(data, HEAD_LIMIT, TARGET_LIMIT)
    if plain is None:
        return
    got = parsed(data)
    assert got is not None, data
    assert (got.method.decode(), got.url, got.headers) == (
        plain.method,
        plain.target,
        plain.headers,
    )
    assert len(got.body) == plain.body_bytes
    assert (got.version, got.keep_alive) == ("1.1", True)


def test_the_generated_requests_reach_the_plain_shape() -> None:
    # The property above says nothing unless many of its requests are plain ones.
    @settings(max_examples=400, deadline=None)
    @given(requests())
    def count(data: bytes) -> None:
        seen.append(plain_request(data, HEAD_LIMIT, TARGET_LIMIT) is not None)

    seen: list[bool] = []
    count()
    assert sum(seen) >= len(seen) // 10, f"{sum(seen)} of {len(seen)}"


def test_a_header_block_read_once_is_kept_only_at_a_usual_size() -> None:
    """The same block again is not read again (its reading is kept), and answers the same;
    a block over MAX_READ_BYTES is read each time, so the table stays small."""
    import service.api.plain_request as module

    module._READ.clear()
    usual = request()
    first = plain_request(usual, HEAD_LIMIT, TARGET_LIMIT)
    assert plain_request(usual, HEAD_LIMIT, TARGET_LIMIT) is first  # the kept reading
    assert len(module._READ) == 1
    # The same block with a body of another length than it declares is not plain.
    assert plain_request(usual + b"x", HEAD_LIMIT, TARGET_LIMIT) is None
    # Nor is a target over the caller's limit, whatever was kept.
    assert plain_request(usual, HEAD_LIMIT, 5) is None
    large = request(headers=("Host: x", f"X-Big: {'a' * module.MAX_READ_BYTES}"))
    read = plain_request(large, HEAD_LIMIT, TARGET_LIMIT)
    assert read is not None and read.headers[1] == (b"x-big", b"a" * module.MAX_READ_BYTES)
    assert len(module._READ) == 1
