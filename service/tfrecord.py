"""TFRecord files read without TensorFlow (the warmup records of a version folder).

Each record is framed as TensorFlow's ``tsl/lib/io/record_writer`` writes it::

    uint64 length         little-endian
    uint32 masked_crc32c(length bytes)
    byte   data[length]
    uint32 masked_crc32c(data)

and both CRCs are checked, as TensorFlow's reader does, so a file TF Serving refuses
is refused here too. Only uncompressed files (what TF Serving's warmup reads).

CRC32C (Castagnoli) is computed by a byte-at-a-time table here: no CRC32C library is
among the project's dependencies, and warmup files are small (about 1.4 MB for the
committed model: ~0.1 s, once per version load).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path

_HEADER = struct.Struct("<QI")  # length, masked CRC of the length
_FOOTER = struct.Struct("<I")  # masked CRC of the data
_MASK_DELTA = 0xA282EAD8


class TFRecordError(ValueError):
    """Not a well-formed TFRecord file: truncated, or a CRC that does not match."""


def _table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1  # reflected Castagnoli
        table.append(crc)
    return tuple(table)


_TABLE = _table()


def crc32c(data: bytes | memoryview) -> int:
    """CRC-32C of ``data`` (RFC 3720's check value: crc32c(b"123456789") == 0xE3069283)."""
    crc = 0xFFFFFFFF
    table = _TABLE
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes | memoryview) -> int:
    """TFRecord's masked CRC: rotated right by 15 bits, plus a constant."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def read_records(path: Path) -> Iterator[bytes]:
    """The records of a TFRecord file, in order; TFRecordError for a corrupt file."""
    data = memoryview(path.read_bytes())
    offset = 0
    while offset < len(data):
        if len(data) - offset < _HEADER.size:
            raise TFRecordError(f"truncated record header at byte {offset}")
        length, length_crc = _HEADER.unpack_from(data, offset)
        if masked_crc32c(data[offset : offset + 8]) != length_crc:
            raise TFRecordError(f"corrupted record length at byte {offset}")
        start = offset + _HEADER.size
        end = start + length
        if end + _FOOTER.size > len(data):
            raise TFRecordError(f"truncated record at byte {offset}")
        record = data[start:end]
        if masked_crc32c(record) != _FOOTER.unpack_from(data, end)[0]:
            raise TFRecordError(f"corrupted record at byte {offset}")
        yield record.tobytes()
        offset = end + _FOOTER.size
