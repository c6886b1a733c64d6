"""A whole HTTP/1.1 request of the plainest shape, read without the HTTP parser, for the
protocol's shed path (service.api.http_protocol): a worker refusing an open loop
answers thousands of requests a second it has no place for, and a refusal's parse
through httptools (a Python call for the message's start, its line, each header, its
headers' end, its body and its end, and uvicorn's bookkeeping around them) was about a
third of its CPU.

Only a request that any HTTP/1.1 parser reads one way is taken: the request line of a
common method, an origin-form target of URI characters and ``HTTP/1.1``; header lines
of a token, a colon, optional blanks and a value of visible ASCII that ends in a
visible character; one Host line; a body framed by at most one all-digit
Content-Length; no Transfer-Encoding, Expect, Upgrade or Connection other than
``keep-alive`` (each of which changes how the connection goes on); all of it, body too,
in the bytes given, with nothing after. Anything else is None, and the parser reads it
as before: a request read here must be read by it the same way (a unit test holds the
answers of both to each other over generated requests)."""

from __future__ import annotations

import re
from typing import Literal, NamedTuple

# A header line: its name, and its value without the blanks before it.
_FIELD = rb"([-!#$%&'*+.^_`|~0-9A-Za-z]+):[ \t]*([!-~](?:[ -~]*[!-~])?)\r\n"
_LINE = re.compile(_FIELD)
_HEAD = re.compile(
    rb"(GET|HEAD|POST|PUT|DELETE|PATCH|OPTIONS) (/[-A-Za-z0-9._~!$&'()*+,;=:@/?%]*) HTTP/1\.1\r\n"
    rb"((?:" + _FIELD + rb")*)\r\n"
)
# Header names that frame the message or change what follows it: the parser's.
_FRAMING = frozenset({b"transfer-encoding", b"expect", b"upgrade", b"proxy-connection"})
_MAX_LENGTH_DIGITS = 15


class PlainRequest(NamedTuple):
    method: str
    target: bytes  # as sent: path and query string
    headers: list[tuple[bytes, bytes]]  # names in lower case, as uvicorn gives them
    body_bytes: int


def plain_request(data: bytes, max_head_bytes: int, max_target_bytes: int) -> PlainRequest | None:
    """``data`` as one whole plain request (module doc), or None."""
    end = data.find(b"\r\n\r\n")
    if end < 0 or end + 4 > max_head_bytes:
        return None
    block = data[: end + 4]
    read = _READ.get(block)
    if read is None:
        read = _read_head(block)
        if len(block) <= MAX_READ_BYTES:
            if len(_READ) >= MAX_READ:
                _READ.clear()
            _READ[block] = read
    if read is False or len(read.target) > max_target_bytes:
        return None
    if end + 4 + read.body_bytes != len(data):
        return None
    return read


# Header blocks read lately, and what they read as (False: not plain). A load generator,
# an SDK or a proxy sends the same block request after request (a body's length aside,
# which is in it): read once, not each time. Refusing an open loop, the regular
# expressions and the header list were ~3 µs of a refusal's ~24 µs of Python. The
# readings are shared: nothing changes a request's header list once read. Blocks
# that differ each time (a request id made per request) are read as before, and the
# table is emptied when full. Only blocks of a usual size are kept (~100-400 bytes; a
# head may be up to CNNSERVE_MAX_HEADER_BYTES, 64 KiB): the table holds 1 MiB at most.
MAX_READ = 256
MAX_READ_BYTES = 4096
_READ: dict[bytes, PlainRequest | Literal[False]] = {}


def _read_head(block: bytes) -> PlainRequest | Literal[False]:
    """A header block (request line to blank line) as a plain request, with its body's
    length from Content-Length, or False."""
    head = _HEAD.fullmatch(block)
    if head is None:
        return False
    headers = [(name.lower(), value) for name, value in _LINE.findall(head.group(3))]
    hosts = 0
    length: bytes | None = None
    for name, value in headers:
        if name == b"host":
            hosts += 1
        elif name == b"content-length":
            if length is not None or len(value) > _MAX_LENGTH_DIGITS or not value.isdigit():
                return False
            length = value
        elif name in _FRAMING or (name == b"connection" and value.lower() != b"keep-alive"):
            return False
    if hosts != 1:
        return False
    body_bytes = 0 if length is None else int(length)
    return PlainRequest(head.group(1).decode("ascii"), head.group(2), headers, body_bytes)
