"""Compressed request bodies.

``Content-Encoding: gzip`` is decompressed as the body arrives, as TF Serving's REST
API does (clients that compress their JSON tensors keep working), and the decompressed
body is held to the same limit as any body, so a small bomb cannot unpack into
gigabytes. Any other content coding is refused with 415, and a transfer coding other
than chunked with 501 (RFC 9112 §6.1): both were ignored before, and the compressed
bytes reached the JSON or image decoder, which blamed the client's data.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable

from starlette.types import Message, Receive

from service.errors import CnnserveError, InvalidRequest, NotImplementedApi, UnsupportedMediaType

GZIP = (b"gzip", b"x-gzip")
_PLAIN = (b"", b"identity")
_GZIP_WBITS = 16 + zlib.MAX_WBITS  # a gzip header and trailer around the deflate stream


def has_body(headers: dict[bytes, bytes]) -> bool:
    """Whether a request announces a body (chunked, or a length above 0)."""
    return b"transfer-encoding" in headers or headers.get(b"content-length", b"") not in (
        b"",
        b"0",
    )


def coding_refusal(headers: dict[bytes, bytes]) -> CnnserveError | None:
    """Why a request's codings cannot be read (None when they can). A request without a
    body has nothing to decode: a stray Content-Encoding on a probe is not a 415."""
    coding = headers.get(b"content-encoding")
    if coding is not None and has_body(headers) and coding.strip().lower() not in GZIP + _PLAIN:
        shown = coding.decode("latin-1")[:64]
        return UnsupportedMediaType(
            f"Content-Encoding {shown!r} is not supported; send the body uncompressed or "
            "with Content-Encoding: gzip"
        )
    transfer = headers.get(b"transfer-encoding")
    if transfer is not None and any(
        part.strip() != b"chunked" for part in transfer.lower().split(b",")
    ):
        shown = transfer.decode("latin-1")[:64]
        return NotImplementedApi(
            f"Transfer-Encoding {shown!r} is not supported (only chunked); to compress "
            "the body send Content-Encoding: gzip"
        )
    return None


def is_gzip(headers: dict[bytes, bytes]) -> bool:
    return headers.get(b"content-encoding", b"").strip().lower() in GZIP


def without_coding(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """The headers a route sees once the body is decompressed: its length is no longer
    the Content-Length, and it is no longer encoded."""
    return [(k, v) for k, v in headers if k not in (b"content-encoding", b"content-length")]


# Concatenated gzip members a body may have: each costs a decompressor and a copy of
# what follows it, on the event loop; 10 MB of empty 20-byte members took 1.8 s of CPU
# (one member of the same size: 0.03 s). Gzip tools write one.
MAX_GZIP_MEMBERS = 16


class GunzipReceive:
    """An ASGI ``receive`` whose request bodies are ``receive``'s, gunzipped, at most
    ``limit`` bytes of them (``too_large()`` is raised past it). Concatenated gzip
    members are one body, as RFC 1952 allows."""

    def __init__(
        self, receive: Receive, limit: int, too_large: Callable[[], CnnserveError]
    ) -> None:
        self.receive = receive
        self.limit = limit
        self.too_large = too_large
        self._inflate = zlib.decompressobj(_GZIP_WBITS)
        self._out = 0
        self._members = 1

    async def __call__(self) -> Message:
        message = await self.receive()
        if message["type"] != "http.request":
            return message
        body = self._inflated(message.get("body", b""))
        if not message.get("more_body", False) and not self._inflate.eof:
            raise InvalidRequest(
                "the body is not complete gzip (Content-Encoding: gzip): it ends early"
            )
        return {**message, "body": body}

    def _inflated(self, data: bytes) -> bytes:
        pieces: list[bytes] = []
        try:
            while data:
                room = self.limit - self._out
                piece = self._inflate.decompress(data, room + 1)
                self._out += len(piece)
                if self._out > self.limit:
                    raise self.too_large()
                pieces.append(piece)
                data = self._inflate.unconsumed_tail
                if self._inflate.eof:  # the next member, if any, starts a new stream
                    data = self._inflate.unused_data + data
                    if data:
                        self._next_member()
        except zlib.error as exc:
            raise InvalidRequest(
                f"the body is not valid gzip (Content-Encoding: gzip): {exc}"
            ) from None
        return b"".join(pieces)

    def _next_member(self) -> None:
        self._members += 1
        if self._members > MAX_GZIP_MEMBERS:
            raise InvalidRequest(
                f"the gzip body has more than {MAX_GZIP_MEMBERS} members; compress it "
                "as one (Content-Encoding: gzip)"
            )
        self._inflate = zlib.decompressobj(_GZIP_WBITS)
