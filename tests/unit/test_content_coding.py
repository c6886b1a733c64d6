"""Gzip request bodies arriving in pieces, as uvicorn hands them to the app."""

from __future__ import annotations

import asyncio
import gzip
import os

import pytest

from service.api.content_coding import MAX_GZIP_MEMBERS, GunzipReceive, coding_refusal
from service.errors import InvalidRequest, PayloadTooLarge

DATA = os.urandom(50_000) + b"\0" * 50_000


def gunzipped(packed: bytes, piece: int, limit: int = 10**6) -> bytes:
    """What a route reads from ``packed`` sent ``piece`` bytes per message."""
    starts = range(0, len(packed), piece) or [0]  # an empty body is one message
    messages = [
        {
            "type": "http.request",
            "body": packed[at : at + piece],
            "more_body": at + piece < len(packed),
        }
        for at in starts
    ]
    feed = iter(messages)

    async def receive() -> dict[str, object]:
        return next(feed)

    def too_large() -> PayloadTooLarge:
        return PayloadTooLarge("too large")

    async def read_all() -> bytes:
        body = b""
        gunzip = GunzipReceive(receive, limit, too_large)  # type: ignore[arg-type]
        while True:
            message = await gunzip()
            body += message["body"]
            if not message["more_body"]:
                return body

    return asyncio.run(read_all())


@pytest.mark.parametrize("piece", [1, 7, 4096, 10**6])
def test_any_split_gives_the_body(piece: int) -> None:
    assert gunzipped(gzip.compress(DATA), piece) == DATA
    two = gzip.compress(DATA[:333]) + gzip.compress(DATA[333:])
    assert gunzipped(two, piece) == DATA


def test_the_limit_counts_decompressed_bytes() -> None:
    packed = gzip.compress(b"\0" * 200_000)  # ~200 bytes
    assert gunzipped(packed, 64, limit=200_000) == b"\0" * 200_000
    with pytest.raises(PayloadTooLarge):
        gunzipped(packed, 64, limit=199_999)


@pytest.mark.parametrize(
    ("packed", "words"),
    [
        (gzip.compress(DATA)[:-9], "ends early"),
        (b"", "ends early"),
        (DATA, "not valid gzip"),
        (gzip.compress(DATA) + b"\x1f", "ends early"),
        (gzip.compress(DATA) + b"not gzip", "not valid gzip"),
    ],
    ids=["cut", "empty", "plain", "half-a-header-after", "junk-after"],
)
def test_broken_gzip_is_a_400(packed: bytes, words: str) -> None:
    with pytest.raises(InvalidRequest, match=words):
        gunzipped(packed or b"", max(1, len(packed)))


@pytest.mark.parametrize(
    ("headers", "code"),
    [
        ({b"content-encoding": b"gzip"}, None),
        ({b"content-encoding": b" GZIP "}, None),
        ({b"content-encoding": b"identity"}, None),
        ({b"content-encoding": b"br", b"content-length": b"5"}, "unsupported_media_type"),
        ({b"content-encoding": b"gzip, gzip", b"content-length": b"5"}, "unsupported_media_type"),
        ({b"content-encoding": b"br", b"transfer-encoding": b"chunked"}, "unsupported_media_type"),
        # No body, nothing to decode: a probe with a stray header is not refused.
        ({b"content-encoding": b"br"}, None),
        ({b"content-encoding": b"br", b"content-length": b"0"}, None),
        ({b"transfer-encoding": b"chunked"}, None),
        ({b"transfer-encoding": b"Chunked"}, None),
        ({b"transfer-encoding": b"gzip, chunked"}, "not_implemented"),
    ],
)
def test_which_codings_are_read(headers: dict[bytes, bytes], code: str | None) -> None:
    refusal = coding_refusal(headers)
    assert (refusal.code if refusal else None) == code


def test_a_body_of_many_gzip_members_is_refused_early() -> None:
    """10 MB of empty 20-byte members cost 1.8 s of CPU on the event loop; a body may
    have MAX_GZIP_MEMBERS of them."""
    allowed = gzip.compress(b"ab") * MAX_GZIP_MEMBERS
    assert gunzipped(allowed, 4096) == b"ab" * MAX_GZIP_MEMBERS
    with pytest.raises(InvalidRequest, match=f"more than {MAX_GZIP_MEMBERS} members"):
        gunzipped(gzip.compress(b"") * 100_000, 65536)
