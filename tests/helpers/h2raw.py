"""A gRPC client on a bare socket, framing HTTP/2 by hand: a peer that gRPC's own
clients cannot play (one that never opens its flow-control window, never reads, never
answers a ping)."""

from __future__ import annotations

import socket
import struct
import time
from dataclasses import dataclass

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, SETTINGS, PING, GOAWAY, CONTINUATION = 0x0, 0x1, 0x4, 0x6, 0x7, 0x9
MAX_FRAME = 16384  # HTTP/2's default SETTINGS_MAX_FRAME_SIZE
END_STREAM, ACK, END_HEADERS = 0x1, 0x1, 0x4
INITIAL_WINDOW_SIZE = 0x4


Metadata = tuple[tuple[str, str | bytes], ...]


@dataclass
class Frame:
    type: int
    flags: int
    stream: int
    payload: bytes


def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return (
        struct.pack(">I", len(payload))[1:]
        + bytes([kind, flags])
        + struct.pack(">I", stream)
        + payload
    )


def _literal(name: str, value: str | bytes) -> bytes:
    """HPACK: a literal field without indexing, its name a literal too (not Huffman); a
    value in bytes goes as it is (gRPC's own clients send only printable ASCII)."""
    raw = value if isinstance(value, bytes) else value.encode()
    return b"\x00" + _string(name.encode()) + _string(raw)


def _string(text: bytes) -> bytes:
    """HPACK's string: its length as a 7-bit-prefix integer (RFC 7541 5.1), then it."""
    if len(text) < 127:
        return bytes([len(text)]) + text
    rest, length = len(text) - 127, bytearray([127])
    while rest >= 128:
        length.append(rest % 128 + 128)
        rest //= 128
    return bytes(length) + bytes([rest]) + text


def call_headers(path: str, authority: str, metadata: Metadata = ()) -> bytes:
    fields = [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", path),
        (":authority", authority),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
        *metadata,
    ]
    return b"".join(_literal(name, value) for name, value in fields)


class RawGrpc:
    """One HTTP/2 connection to a plaintext gRPC port, opened with an initial
    flow-control window of ``window`` for the server's answers."""

    def __init__(self, port: int, window: int = 65535) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.port = port
        self._buffer = b""
        self._next_stream = 1
        settings = struct.pack(">HI", INITIAL_WINDOW_SIZE, window)
        self.sock.sendall(PREFACE + frame(SETTINGS, 0, 0, settings))

    def call(self, path: str, message: bytes = b"", metadata: Metadata = ()) -> int:
        """Send one unary call (``message`` serialized, ``metadata`` among its headers;
        a header block over a frame goes on in CONTINUATION frames); its stream id."""
        stream = self.begin(path, metadata)
        self.send(stream, message_frame(message), end=True)
        return stream

    def begin(self, path: str, metadata: Metadata = ()) -> int:
        """Open a call: its headers only (its message to come by :meth:`send`)."""
        stream, self._next_stream = self._next_stream, self._next_stream + 2
        block = call_headers(path, f"127.0.0.1:{self.port}", metadata)
        pieces = [block[i : i + MAX_FRAME] for i in range(0, len(block), MAX_FRAME)]
        self.sock.sendall(
            b"".join(
                frame(
                    HEADERS if i == 0 else CONTINUATION,
                    END_HEADERS if i == len(pieces) - 1 else 0,
                    stream,
                    piece,
                )
                for i, piece in enumerate(pieces)
            )
        )
        return stream

    def send(self, stream: int, data: bytes, *, end: bool) -> None:
        """Part of a call's body (``end``: its last)."""
        self.sock.sendall(frame(DATA, END_STREAM if end else 0, stream, data))

    def flood(self, path: str, size: int) -> int:
        """Open a call whose header block never ends: its HEADERS frame, then ``size``
        bytes of CONTINUATION frames full of small entries, none with END_HEADERS (a
        CONTINUATION flood); its stream id."""
        stream, self._next_stream = self._next_stream, self._next_stream + 2
        self.sock.sendall(frame(HEADERS, 0, stream, call_headers(path, f"127.0.0.1:{self.port}")))
        entry = _literal("x-a", "b" * 10)
        entries = entry * (MAX_FRAME // len(entry))
        burst = frame(CONTINUATION, 0, stream, entries) * 64
        for _ in range(0, size, len(burst)):
            self.sock.sendall(burst)
        return stream

    def read(self, until: float) -> Frame | None:
        """The next frame, or None once the server closed the connection; TimeoutError
        past ``until`` (time.monotonic())."""
        while len(self._buffer) < 9 or len(self._buffer) < 9 + _length(self._buffer):
            left = until - time.monotonic()
            if left <= 0:
                raise TimeoutError("no frame from the server in time")
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                return None
            if not chunk:
                return None
            self._buffer += chunk
        size = _length(self._buffer)
        head, payload = self._buffer[:9], self._buffer[9 : 9 + size]
        self._buffer = self._buffer[9 + size :]
        stream = struct.unpack(">I", head[5:9])[0] & 0x7FFFFFFF
        return Frame(head[3], head[4], stream, payload)

    def answer(self, got: Frame, *, pings: bool) -> None:
        """Acknowledge the server's SETTINGS (a peer that does not is closed by gRPC's
        settings timeout, whatever else it does) and, with ``pings``, its PINGs."""
        if got.type == SETTINGS and not got.flags & ACK:
            self.sock.sendall(frame(SETTINGS, ACK, 0))
        elif got.type == PING and not got.flags & ACK and pings:
            self.sock.sendall(frame(PING, ACK, 0, got.payload))

    def close(self) -> None:
        self.sock.close()


def message_frame(message: bytes) -> bytes:
    """A serialized message as gRPC frames it in a call's body (uncompressed)."""
    return b"\x00" + struct.pack(">I", len(message)) + message


def _length(buffer: bytes) -> int:
    return int.from_bytes(buffer[:3], "big")
