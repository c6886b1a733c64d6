"""X-Request-Timeout as RFC 9110 reads a field: whitespace around the value is not part
of it, and a field sent on several lines is their values comma-joined, so two lines are
refused as two values in one are (the first line was used before, silently). The same
on the direct path (a raw-body POST /v1/classify, taken before the app) and through the
app (a chunked body goes the ASGI way)."""

from __future__ import annotations

import json
import socket

import pytest

from tests.helpers.images import encode, gradient
from tests.helpers.server import Server, read_response

PNG = encode(gradient(), "PNG")


def chunked(body: bytes) -> bytes:
    return f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n"


def ask(server: Server, timeout_lines: list[bytes], *, direct: bool) -> tuple[int, dict[str, str]]:
    """POST /v1/classify with these X-Request-Timeout lines, as sent byte for byte."""
    framing = (
        f"content-length: {len(PNG)}\r\n".encode() if direct else b"transfer-encoding: chunked\r\n"
    )
    head = (
        b"POST /v1/classify HTTP/1.1\r\nhost: x\r\ncontent-type: image/png\r\n"
        + framing
        + b"".join(b"x-request-timeout:" + line + b"\r\n" for line in timeout_lines)
        + b"\r\n"
    )
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(head + (PNG if direct else chunked(PNG)))
        answer, body, _ = read_response(sock)
    status = int(answer.split()[1])
    return status, json.loads(body).get("error", {})


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "app"])
@pytest.mark.parametrize(
    "value", [b" 5", b" 5 ", b"5 ", b"5\t", b"\t5\t "], ids=["lead", "both", "trail", "tab", "mix"]
)
def test_whitespace_around_the_value_is_not_part_of_it(
    server: Server, value: bytes, direct: bool
) -> None:
    status, error = ask(server, [value], direct=direct)
    assert status == 200, error


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "app"])
@pytest.mark.parametrize(
    "lines", [[b" 5", b" 0.000001"], [b" 5, 0.000001"], [b" 5", b" 5"]], ids=["two", "one", "same"]
)
def test_more_than_one_value_is_a_400_on_one_line_or_several(
    server: Server, lines: list[bytes], direct: bool
) -> None:
    status, error = ask(server, lines, direct=direct)
    assert status == 400, error
    assert "x-request-timeout" in error["message"] and "one value" in error["message"]


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "app"])
def test_a_value_that_is_no_number_is_shown_as_sent_and_cut(server: Server, direct: bool) -> None:
    """Header bytes are latin-1 to the parser: '５' (UTF-8) was shown as 'ï¼\x95'."""
    status, error = ask(server, [" ５".encode()], direct=direct)
    assert status == 400 and error["message"].endswith("got '５'"), error
    status, error = ask(server, [b"x" * 4000], direct=direct)
    assert status == 400 and len(error["message"]) < 300, error
    status, error = ask(server, [b" 0"], direct=direct)  # "request timeout … got 0.0"
    assert status == 400 and "(X-Request-Timeout" in error["message"], error
    status, error = ask(server, [b" -1"], direct=direct)  # said to be "no number" before
    assert status == 400 and "must be a positive number of seconds, got -1" in error["message"]


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "app"])
def test_a_plus_sign_is_part_of_a_number(server: Server, direct: bool) -> None:
    status, error = ask(server, [b"+5"], direct=direct)  # float() reads it; so do we
    assert status == 200, error


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "app"])
def test_a_deadline_too_short_for_any_work_does_not_say_none_was_left(
    server: Server, direct: bool
) -> None:
    status, error = ask(server, [b"0.00005"], direct=direct)
    assert status == 504, error
    assert "0.0 ms" not in error["message"]  # 50 µs were left: "0.05 ms", or passed
