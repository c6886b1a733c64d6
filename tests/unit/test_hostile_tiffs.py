"""TIFFs crafted to trip Pillow and libtiff: each is the client's invalid image (never a
500), and nothing the libraries say about it reaches the server's stderr or log."""

from __future__ import annotations

import logging
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from service.errors import CnnserveError, ImageTooLarge, InvalidImage
from service.preprocessing import (
    PreprocessSpec,
    decode_cost,
    open_image,
    preprocess_bytes,
    preprocess_opened,
)
from tests.helpers.images import encode, gradient, tiff

SPEC = PreprocessSpec()
BIG = 10**9
ROOT = Path(__file__).resolve().parents[2]
# TIFF field types (TIFF 6.0 §2, BigTIFF's 16-18)
ASCII, SHORT, LONG, RATIONAL, SBYTE, UNDEFINED, FLOAT = 2, 3, 4, 5, 6, 7, 11
SAMPLES_PER_PIXEL, STRIP_OFFSETS, STRIP_BYTE_COUNTS, COLOR_MAP = 277, 273, 279, 320


def entry_at(tiff: bytes | bytearray, tag: int) -> int:
    """Where ``tag``'s 12-byte entry is in the first IFD of a little-endian TIFF."""
    ifd = struct.unpack_from("<I", tiff, 4)[0]
    for i in range(struct.unpack_from("<H", tiff, ifd)[0]):
        at = ifd + 2 + 12 * i
        if struct.unpack_from("<H", tiff, at)[0] == tag:
            return at
    raise AssertionError(f"tag {tag} is not in the TIFF")


def retyped(
    img: Image.Image,
    tag: int,
    kind: int,
    *,
    count: int | None = None,
    value: int | bytes | None = None,
    **save: object,
) -> bytes:
    """``img`` saved by Pillow as a TIFF, then ``tag`` declared of TIFF type ``kind``
    (and ``count`` values). ``value``, the entry's last 4 bytes: an int, or data put
    at the end of the file for the entry to point at; by default left as written."""
    tiff = bytearray(encode(img, "TIFF", **save))
    at = entry_at(tiff, tag)
    _, _, old_count, old_value = struct.unpack_from("<HHII", tiff, at)
    if isinstance(value, bytes):
        tiff, value = tiff + value, len(tiff)
    count = old_count if count is None else count
    value = old_value if value is None else value
    struct.pack_into("<HHII", tiff, at, tag, kind, count, value)
    return bytes(tiff)


PIXEL = Image.new("RGB", (1, 1), (10, 20, 30))
PALETTE = Image.new("P", (4, 4))
# Each raised past our error handling (found by a review): a 500 / gRPC INTERNAL.
CRAFTED = {
    # TypeError: 'IFDRational' object cannot be interpreted as an integer
    "strip offsets as a rational": retyped(
        PIXEL, STRIP_OFFSETS, RATIONAL, count=1, value=struct.pack("<II", 8, 1)
    ),
    "strip offsets as ascii": retyped(PIXEL, STRIP_OFFSETS, ASCII),  # TypeError: 'str' …
    "strip offsets as undefined": retyped(PIXEL, STRIP_OFFSETS, UNDEFINED),  # 'bytes' …
    "strip offsets as a float": retyped(PIXEL, STRIP_OFFSETS, FLOAT),  # 'float' …
    # OverflowError: unsigned byte integer is less than minimum (two bytes of -1)
    "colour map of signed bytes": retyped(PALETTE, COLOR_MAP, SBYTE, count=2, value=0xFFFF),
}


@pytest.mark.parametrize("name", sorted(CRAFTED))
def test_a_tiff_tag_of_the_wrong_type_is_an_invalid_image(name: str) -> None:
    with pytest.raises(InvalidImage, match="could not decode the image: the file is malformed"):
        preprocess_bytes(CRAFTED[name], SPEC, max_pixels=BIG)


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow on truncated tags
def test_any_tag_of_any_type_is_decoded_or_refused_as_invalid() -> None:
    """Every field type (0-18) for every tag of a few ordinary TIFFs: the image decodes
    or is the client's error, whatever Pillow's plugin trips over."""
    bases = [
        encode(PIXEL, "TIFF"),
        encode(PALETTE, "TIFF"),
        encode(gradient(4, 4), "TIFF", compression="tiff_lzw"),
    ]
    for base in bases:
        ifd = struct.unpack_from("<I", base, 4)[0]
        for i in range(struct.unpack_from("<H", base, ifd)[0]):
            at = ifd + 2 + 12 * i
            for kind in range(19):
                data = bytearray(base)
                struct.pack_into("<H", data, at + 2, kind)
                try:
                    preprocess_bytes(bytes(data), SPEC, max_pixels=BIG)
                except CnnserveError as exc:
                    assert exc.http_status in (400, 413), exc
                    assert exc.code in ("invalid_image", "image_too_large"), exc


@pytest.mark.parametrize("raised", [TypeError("x"), KeyError("x"), struct.error("x")])
def test_whatever_pillow_raises_decoding_is_an_invalid_image(
    monkeypatch: pytest.MonkeyPatch, raised: Exception
) -> None:
    opened = open_image(encode(gradient(), "PNG"), max_pixels=BIG, target=SPEC.size)

    def load(self: Image.Image) -> None:
        raise raised

    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", load)
    with pytest.raises(InvalidImage, match=type(raised).__name__):
        preprocess_opened(opened, SPEC)


def test_running_out_of_memory_is_not_the_clients_fault(monkeypatch: pytest.MonkeyPatch) -> None:
    opened = open_image(encode(gradient(), "PNG"), max_pixels=BIG, target=SPEC.size)

    def load(self: Image.Image) -> None:
        raise MemoryError

    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", load)
    with pytest.raises(MemoryError):
        preprocess_opened(opened, SPEC)


def lzw_cut_short() -> bytes:
    """An LZW TIFF whose strip is said to be 3 bytes: libtiff printed "LZWDecode: Strip
    0 not terminated with EOI code." on stderr for each request."""
    rgb = Image.new("RGB", (4, 4), (9, 99, 199))
    return retyped(rgb, STRIP_BYTE_COUNTS, LONG, value=3, compression="tiff_lzw")


def corrupt_group4() -> bytes:
    """A Group 4 fax TIFF whose strip is noise: libtiff printed a "Fax4Decode: Bad code
    word at line …" for each bad line (dozens for a real page); Pillow decodes it."""
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 2, (64, 64), dtype=np.uint8) * 255).convert("1")
    tiff = bytearray(encode(img, "TIFF", compression="group4"))
    offset = struct.unpack_from("<I", tiff, entry_at(tiff, STRIP_OFFSETS) + 8)[0]
    length = struct.unpack_from("<I", tiff, entry_at(tiff, STRIP_BYTE_COUNTS) + 8)[0]
    tiff[offset : offset + length] = rng.integers(0, 256, length, dtype=np.uint8).tobytes()
    return bytes(tiff)


def too_many_samples() -> bytes:
    """A TIFF declaring 5,000 samples a pixel: Pillow logged "More samples per pixel than
    can be decoded" at ERROR (to stderr where logging is not set up) before refusing it."""
    return retyped(PIXEL, SAMPLES_PER_PIXEL, SHORT, value=5000)


# In a fresh process, whose stderr is its own: libtiff writes to file descriptor 2 from
# C, past pytest's capture of sys.stderr.
DECODE_EACH = """
import sys
from service.errors import InvalidImage
from service.preprocessing import PreprocessSpec, preprocess_bytes
for path in sys.argv[1:]:
    try:
        preprocess_bytes(open(path, "rb").read(), PreprocessSpec(), max_pixels=10**9)
        print("decoded")
    except InvalidImage as exc:
        print("invalid_image", exc.http_status)
"""


def test_libtiff_says_nothing_about_a_clients_file(tmp_path: Path) -> None:
    files = {"lzw": lzw_cut_short(), "g4": corrupt_group4(), "samples": too_many_samples()}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    run = subprocess.run(
        [sys.executable, "-c", DECODE_EACH, *(str(tmp_path / name) for name in files)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert run.stderr == ""
    assert run.stdout.splitlines() == ["invalid_image 400", "decoded", "invalid_image 400"]


def test_pillow_logs_nothing_about_a_clients_file(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG), pytest.raises(InvalidImage):
        preprocess_bytes(too_many_samples(), SPEC, max_pixels=BIG)
    assert caplog.records == []


def tiled_tiff(width: int, height: int, tile: int) -> bytes:
    """A deflate TIFF of ``width``x``height`` RGBA pixels in tiles of ``tile``x``tile``,
    one tile's data given (a few bytes: libtiff allocates the tile before reading it)."""
    data = zlib.compress(b"\x80" * 64)
    entries = [
        (256, LONG, width), (257, LONG, height), (258, SHORT, 8), (259, SHORT, 8),
        (262, SHORT, 2), (277, SHORT, 4), (284, SHORT, 1),
        (322, LONG, tile), (323, LONG, tile), (324, LONG, 0), (325, LONG, len(data)),
    ]  # fmt: skip
    return tiff(entries, data)


def test_a_tile_far_larger_than_its_image_is_refused_from_the_header() -> None:
    """64x64 pixels in a 16384x16384 tile, 158 bytes: libtiff took 1 GB and a second to
    fail it, on the event loop (its header said 4,096 pixels: decoded inline)."""
    huge = tiled_tiff(64, 64, 16384)
    with pytest.raises(ImageTooLarge, match="tiles"):
        open_image(huge, max_pixels=40_000_000, target=SPEC.size)
    # Under the limit, the tiles are what decoding costs (decoded off the loop).
    opened = open_image(tiled_tiff(64, 64, 2048), max_pixels=40_000_000, target=SPEC.size)
    assert decode_cost(opened) == 2048 * 2048
    assert decode_cost(open_image(tiled_tiff(300, 300, 256), max_pixels=BIG)) == 4 * 256 * 256
