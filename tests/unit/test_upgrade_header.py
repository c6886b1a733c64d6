"""The HTTP protocol ignores Upgrade (it upgrades to nothing): the header is renamed
before httptools parses the request, inside the header block only."""

from __future__ import annotations

from service.api.http_protocol import without_upgrade

HEAD = b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\n"


def test_upgrade_headers_in_the_block_are_renamed() -> None:
    data = HEAD + b"Upgrade: h2c\r\nUPGRADE : websocket\r\nContent-Length: 3\r\n\r\nabc"
    assert without_upgrade(data) == (
        HEAD + b"x-upgrd: h2c\r\nx-upgrd : websocket\r\nContent-Length: 3\r\n\r\nabc"
    )


def test_the_body_and_requests_without_upgrade_are_untouched() -> None:
    body = b"a line\nupgrade: not a header"
    for data in (
        HEAD + b"Content-Length: 28\r\n\r\n" + body,
        b"POST / HTTP/1.1\nHost: x\n\n" + body,  # bare LF lines
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
    ):
        assert without_upgrade(data) == data
    view = memoryview(b"GET / HTTP/1.1\r\n\r\n")
    assert without_upgrade(view) is view  # nothing copied when there is nothing to do


def test_an_upgrade_header_opening_a_read_is_renamed_when_the_last_read_ended_a_line() -> None:
    """The header block split between reads right before ``Upgrade:`` (no newline in
    this read before it): renamed all the same; the body that follows is kept."""
    rest = b"Upgrade: websocket\r\nContent-Length: 3\r\n\r\nabc"
    assert without_upgrade(rest, line_start=True) == (
        b"x-upgrd: websocket\r\nContent-Length: 3\r\n\r\nabc"
    )
    # Mid-line (the read before ended inside a header value), it is part of that value.
    assert without_upgrade(rest, line_start=False) == rest
