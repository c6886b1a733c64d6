"""Plain JPEGs decoded by libjpeg-turbo straight into an array (simplejpeg).

Pillow decodes a JPEG through the same libjpeg-turbo, then copies every row into its
own image and copies the image again into numpy; on a 224×224 photo those copies and
Pillow's Python-level file handling are a third to a half of the decode (0.24-0.45 ms
against 0.15 ms here, the spread being where the copies land in the heap). So the
files for which both give the same pixels take this path, and everything else stays
with Pillow: the same library, settings (accurate DCT, fancy upsampling) and reduced
scale as :func:`PIL.JpegImagePlugin.JpegImageFile.draft`, checked bit for bit against
Pillow in tests/unit/test_jpeg.py.

Left to Pillow: files with an Exif segment (an orientation to apply), colour spaces
other than YCbCr and grey (CMYK, YCCK, Adobe RGB transforms), and anything
libjpeg-turbo only warns about (a recoverable error is decoded by Pillow, which
tolerates it, and a broken file gets Pillow's error message).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import simplejpeg

_SOI = b"\xff\xd8\xff"  # what Pillow's JPEG plugin accepts as a JPEG
_SOS, _APP1 = 0xDA, 0xE1
_EXIF = b"Exif\x00\x00"
_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})  # markers without a length
_COLOURS = {"YCbCr": "RGB", "Gray": "GRAY"}  # header colour space → decoded as
# Segments walked before the scan at most; a camera's or an encoder's JPEG has 5-20. A
# file of thousands of tiny segments is left to Pillow, which walks them once anyway.
_MAX_SEGMENTS = 64


@dataclass(frozen=True, slots=True)
class PlainJpeg:
    """A JPEG whose header was read: what it decodes to, not yet its pixels."""

    data: bytes
    full_size: tuple[int, int]  # (width, height) in the file, Pillow's order
    size: tuple[int, int]  # (width, height) once decoded at ``scale``
    scale: int  # 1, 2, 4 or 8: libjpeg's reduced-scale decoding
    grey: bool

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


def open_plain(data: bytes, target: tuple[int, int] | None) -> PlainJpeg | None:
    """``data``'s header when it is a JPEG this module decodes as Pillow would (with
    ``target`` (width, height) the reduced scale Pillow's ``draft`` picks), else None."""
    if not data.startswith(_SOI) or _has_exif(data):
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
    return PlainJpeg(data, (width, height), size, scale, grey=colour == "Gray")


def _has_exif(data: bytes) -> bool:
    """Whether an APP1 Exif segment comes before the scan (or the header cannot be
    walked in _MAX_SEGMENTS segments: then Pillow reads it). No pixel data is read."""
    i, end = 2, len(data)
    for _ in range(_MAX_SEGMENTS):
        if i + 4 > end:
            break
        if data[i] != 0xFF:
            return True
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == _SOS:
            return False
        if marker in _STANDALONE:
            i += 2
            continue
        length = int.from_bytes(data[i + 2 : i + 4], "big")
        if marker == _APP1 and data[i + 4 : i + 10] == _EXIF:
            return True
        i += 2 + length
    return True
