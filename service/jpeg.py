"""Plain JPEGs decoded by libjpeg-turbo straight into an array (simplejpeg).

Pillow decodes a JPEG through the same libjpeg-turbo, then copies every row into its
own image and copies the image again into numpy; on a 224×224 photo those copies and
Pillow's Python-level file handling are a third to a half of the decode (0.24-0.45 ms
against 0.15 ms here, the spread being where the copies land in the heap). So the
files for which both give the same pixels take this path, and everything else stays
with Pillow: the same library, settings (accurate DCT, fancy upsampling) and reduced
scale as :func:`PIL.JpegImagePlugin.JpegImageFile.draft`, checked bit for bit against
Pillow in tests/unit/test_jpeg.py.

Left to Pillow: files with an Exif segment or an XMP one naming an orientation other
than 1 (an orientation to apply: ImageOps.exif_transpose reads both), colour spaces
other than YCbCr and grey (CMYK, YCCK, Adobe RGB transforms), and anything
libjpeg-turbo only warns about (a recoverable error is decoded by Pillow, which
tolerates it, and a broken file gets Pillow's error message).

Before either decodes a JPEG, :func:`read_layout` counts its scans. Each scan of a
progressive JPEG is a pass over every coefficient of the full-resolution image, however
small the reduced scale it is decoded at: a 145 KB file of one scan repeated 300 times
held a worker's event loop for 20 s (a "scan bomb"), and libjpeg-turbo decodes whatever
it is given (its djpeg ``-maxscans`` and TurboJPEG's scan limit exist for this).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import simplejpeg

_SOI = b"\xff\xd8\xff"  # what Pillow's JPEG plugin accepts as a JPEG
_SOS, _APP1, _DQT, _APP13 = 0xDA, 0xE1, 0xDB, 0xED
_PHOTOSHOP = b"Photoshop 3.0\x00"  # the APP13 whose resource blocks Pillow parses
_EXIF = b"Exif\x00\x00"
_XMP = b"http://ns.adobe.com/xap/1.0/\x00"  # the APP1 Pillow reads as info["xmp"]
# Image.getexif's own pattern for an orientation in XMP, applied when no Exif gives one.
_XMP_ORIENTATION = re.compile(rb'tiff:Orientation(="|>)([0-9])')
_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})  # markers without a length
_COLOURS = {"YCbCr": "RGB", "Gray": "GRAY"}  # header colour space → decoded as
# Segments before the scan that the fast path takes; a camera's or an encoder's JPEG has
# 5-20. A file of hundreds of tiny segments is left to Pillow.
_MAX_SEGMENTS = 64
_EOI = 0xD9
_PROGRESSIVE_FRAMES = frozenset({0xC2, 0xC6, 0xCA, 0xCE})  # SOF2, 6, 10, 14
# A marker: FF and a byte that is not stuffing (00), a restart (D0-D7) or fill (FF).
# Entropy-coded data holds no other FF pair (every FF in it is written FF 00), so a
# search skips a scan's data at C speed; segments are skipped by their length, so an
# Exif thumbnail's own markers are never seen.
_MARKER = re.compile(rb"\xff[\x01-\xcf\xd8-\xfe]")
_MARKERS = frozenset({*range(0x01, 0xD0), *range(0xD8, 0xFF)})  # the same bytes
# Encoders write 1 scan (baseline) or ~10 (progressive colour, 6 for grey; mozjpeg's
# scan optimisation a few more). 64 leaves a margin of six and bounds the worst file at
# the 40 Mpx pixel limit to ~1.5 s of a decode thread (~0.55 ms a scan per Mpx), twice
# that when libjpeg-turbo objects to the repeats and Pillow decodes the file again.
MAX_SCANS = 64
# Small marker segments walked: a header's 5-20, and a DHT and an SOS per scan. A file
# of thousands of tiny segments would cost a Python step each wherever it is read.
# Segments of SMALL_SEGMENT bytes or more do not count: their number is bounded by the
# body's size, and metadata comes in such segments (Photoshop's extended XMP: hundreds
# of 64 KB APP1s in a 35 MB file, which gRPC takes).
MAX_LAYOUT_SEGMENTS = 512
SMALL_SEGMENT = 1024
# Quantization tables defined before the first scan, which Pillow reads in Python as it
# opens the file (~3 µs a table, and each DQT segment is sliced again after each of its
# tables: 160 segments of 1,008 tables, 10 MB, took 0.5 s; 256 tables ~0.7 ms). The
# large segments they come in are not among MAX_LAYOUT_SEGMENTS. An encoder writes 1-4
# (at most 4 can be in use), rarely one again: 256 is a wide margin.
MAX_QUANT_TABLES = 256
# Photoshop resource blocks ("8BIM") in APP13 segments before the first scan: Pillow
# parses each in Python as it opens the file (~0.6 µs, slicing: 160 segments of 12-byte
# blocks, 10 MB, took 0.5 s); Photoshop writes tens. Counted by their signature.
MAX_PHOTOSHOP_BLOCKS = 4096


@dataclass(frozen=True, slots=True)
class Layout:
    """What a JPEG's marker segments say about the cost of decoding it."""

    # SOS segments before EOI; the walk stops once over MAX_SCANS, or at the first of a
    # sequential (not progressive) frame
    scans: int
    segments: int  # small marker segments walked; stops once over MAX_LAYOUT_SEGMENTS
    progressive: bool  # a progressive frame: every scan passes over the full image
    # The header, to the first scan, is one this module decodes: no Exif segment nor an
    # XMP one naming an orientation (one to apply), marker after marker, in at most
    # _MAX_SEGMENTS segments.
    plain_header: bool = True
    # Quantization tables before the first scan; the walk stops once over MAX_QUANT_TABLES
    tables: int = 0
    # Photoshop resource blocks before the first scan; it stops once over
    # MAX_PHOTOSHOP_BLOCKS
    photoshop_blocks: int = 0


@dataclass(frozen=True, slots=True)
class PlainJpeg:
    """A JPEG whose header was read: what it decodes to, not yet its pixels."""

    data: bytes
    full_size: tuple[int, int]  # (width, height) in the file, Pillow's order
    size: tuple[int, int]  # (width, height) once decoded at ``scale``
    scale: int  # 1, 2, 4 or 8: libjpeg's reduced-scale decoding
    grey: bool
    layout: Layout = Layout(scans=1, segments=0, progressive=False)  # a baseline's

    def decode(self) -> npt.NDArray[np.uint8] | None:
        """[H, W, 3] RGB, or [H, W] for a grey file; None when libjpeg-turbo reports any
        problem (then Pillow decodes it, leniently or with its own error)."""
        width, height = self.size
        try:
            pixels = simplejpeg.decode_jpeg(
                self.data,
                colorspace=_COLOURS["Gray" if self.grey else "YCbCr"],
                min_height=height,
                min_width=width,
                min_factor=self.scale,
            )
        except ValueError:
            return None
        if pixels.shape[:2] != (height, width):
            return None  # a scale Pillow would not have picked
        decoded: npt.NDArray[np.uint8] = pixels[:, :, 0] if self.grey else pixels
        return decoded


def is_jpeg(data: bytes) -> bool:
    """Whether ``data`` starts as Pillow's JPEG plugin requires."""
    return data.startswith(_SOI)


def open_plain(
    data: bytes, target: tuple[int, int] | None, layout: Layout | None = None
) -> PlainJpeg | None:
    """``data``'s header when it is a JPEG this module decodes as Pillow would (with
    ``target`` (width, height) the reduced scale Pillow's ``draft`` picks), else None.
    ``layout`` is :func:`read_layout`'s, when the caller has it already."""
    if not data.startswith(_SOI):
        return None
    if layout is None:
        layout = read_layout(data)
    if not layout.plain_header:
        return None
    try:
        height, width, colour, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None
    if colour not in _COLOURS or width <= 0 or height <= 0:
        return None
    scale = 1
    if target is not None:
        fits = min(width // target[0], height // target[1])
        scale = next((s for s in (8, 4, 2) if fits >= s), 1)
    size = (-(-width // scale), -(-height // scale))
    return PlainJpeg(data, (width, height), size, scale, grey=colour == "Gray", layout=layout)


def read_layout(data: bytes) -> Layout:
    """Count ``data``'s scans (a JPEG: it starts with SOI) up to its EOI, walking its
    marker segments; the walk stops as soon as a limit is passed, so it costs at most
    MAX_LAYOUT_SEGMENTS steps and, for a progressive JPEG, one search through the
    entropy-coded data (~7 µs for 17 KB, ~100 µs for 220 KB). A sequential one ends at
    its first scan (~2 µs)."""
    scans = segments = small = tables = blocks = 0
    progressive, plain = False, True
    i, end = 2, len(data)
    while (
        scans <= MAX_SCANS
        and small <= MAX_LAYOUT_SEGMENTS
        and tables <= MAX_QUANT_TABLES
        and blocks <= MAX_PHOTOSHOP_BLOCKS
    ):
        if i + 1 >= end or data[i] != 0xFF or data[i + 1] not in _MARKERS:
            # Entropy-coded data; in the header fill bytes (FF FF) or junk
            plain = plain and (scans > 0 or data[i : i + 2] == b"\xff\xff")
            found = _MARKER.search(data, i)
            if found is None:
                break
            i = found.start()
        marker = data[i + 1]
        if marker == _EOI or i + 4 > end:
            break  # anything after EOI (a camera's second image) is not decoded
        segments += 1
        if scans == 0 and (segments > _MAX_SEGMENTS or (marker == _APP1 and _orients(data, i))):
            plain = False
        if marker in _STANDALONE:
            small += 1
            i += 2
            continue
        length = int.from_bytes(data[i + 2 : i + 4], "big")
        small += length < SMALL_SEGMENT
        if marker == _SOS:
            scans += 1
            if not progressive:
                # A sequential frame: libjpeg-turbo decodes its first scan(s) and stops
                # at a repeat ("Didn't expect more than one scan"), so its entropy-coded
                # data need not be searched (most photos: the walk ends here).
                break
        elif marker in _PROGRESSIVE_FRAMES:
            progressive = True
        elif marker == _DQT and scans == 0:
            tables += _quant_tables(data, i + 4, min(i + 2 + length, end))
        elif marker == _APP13 and scans == 0 and data.startswith(_PHOTOSHOP, i + 4):
            blocks += data.count(b"8BIM", i + 4, min(i + 2 + length, end))
        i += 2 + length
    return Layout(
        scans,
        small,
        progressive,
        plain_header=plain and scans > 0,
        tables=tables,
        photoshop_blocks=blocks,
    )


def _quant_tables(data: bytes, start: int, end: int) -> int:
    """The quantization tables in a DQT segment's ``data[start:end]``, as Pillow counts
    them (a first byte whose top half says 8- or 16-bit values, then 64 of them); at
    most MAX_QUANT_TABLES + 1 are walked."""
    tables, i = 0, start
    while i < end and tables <= MAX_QUANT_TABLES:
        i += 65 if data[i] < 16 else 129
        tables += 1
    return tables


def _orients(data: bytes, i: int) -> bool:
    """Whether the APP1 segment at ``i`` may turn the image: Exif (whatever its tags), or
    XMP naming an orientation other than 1. Pillow keeps the last XMP segment only, so
    one naming an orientation an earlier or later one overrides still goes to Pillow,
    which is never wrong, only slower."""
    if data.startswith(_EXIF, i + 4):
        return True
    if not data.startswith(_XMP, i + 4):
        return False
    end = i + 2 + int.from_bytes(data[i + 2 : i + 4], "big")
    found = _XMP_ORIENTATION.search(data, i + 4 + len(_XMP), end)
    return found is not None and found[2] != b"1"
