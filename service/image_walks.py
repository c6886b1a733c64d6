"""Walks of a TIFF's first directory and of a GIF's blocks up to its first image.

:func:`service.preprocessing.open_image` reads every header where the request arrives,
on the event loop, and Pillow's TIFF and GIF readers spend a Python step on each entry,
value or sub-block of the parts they read there. A file built of thousands of them
held the loop for seconds (measured with Pillow 13 on a CI core):

- a 10 MB uncompressed TIFF of 1x2,621,390 pixels, one strip a row: Pillow builds a
  tile per strip as it opens the file, 6.2 s and 1.1 GB;
- a TIFF whose first directory has 64,000 entries (768 KB): 0.39 s to open (Pillow
  reads the directory twice), 48 of them in one gRPC call 13 s;
- a TIFF whose XResolution holds a million RATIONALs (8 MB): 4.7 s (an object each);
- a GIF whose comment before its image is 5M sub-blocks of one byte (10 MB): 1.1 s.

These walks read only what Pillow reads at open (the first directory; the blocks
before the first image) and stop at their limit, so they cost a few µs on an ordinary
file and at most ~2 ms on a hostile one. Whatever else is wrong with a file (an offset
past its end, a truncated directory) is left to Pillow, which refuses it or reads less.
"""

from __future__ import annotations

import struct

from service.errors import InvalidImage

# A TIFF's first directory: Pillow reads every entry in Python, twice, as it opens the
# file (~3 µs an entry: 4.2 ms for 1,024, 0.39 s for 64,000). Files have tens of entries,
# ~100 for a camera's raw (DNG) or a GeoTIFF; 1,024 is ten times that.
MAX_TIFF_ENTRIES = 1024
# An uncompressed TIFF's strips or tiles: Pillow makes a tile of each as it opens it
# (3.8 ms for 4,096 strips, 9.9 ms for 8,192, 35 ms for 16,384, 6.2 s for 2.6 million),
# and its decode loops over them in Python too. libtiff writes strips of ~8 KB, Pillow of
# ~64 KB: an uncompressed file of 8,192 such strips would be 64 MB, more than gRPC's
# largest message. A compressed one is handed to libtiff whole (2.6 million strips: 2.5 ms
# to open), so its strips are not counted.
MAX_TIFF_STRIPS = 8192
# Values of a tag Pillow reads as it opens the file (it makes a Python object of each: a
# million RATIONAL resolutions took 4.7 s, a million SHORT BitsPerSample 0.11 s). These
# tags hold one value, one per sample, or a palette's 3 x 256 (768) at most.
MAX_TIFF_TAG_VALUES = 1024
# A GIF's sub-blocks (and stray bytes) before its first image: Pillow reads them one by
# one (~0.14 µs each: 2.4 ms for 16,384, 1.1 s for 5 million). Encoders write a few
# extensions of one to three sub-blocks each, but XMP in a GIF is raw text followed by a
# 'magic trailer', which a reader takes for sub-blocks, one every ~35-120 bytes: 16,384
# still admits ~0.5-2 MB of XMP (Photoshop's is a few to tens of KB).
MAX_GIF_BLOCKS = 16384

_TIFF_RAW = 1  # Compression 1: no compression, the only one Pillow makes tiles of
_COMPRESSION = 259
_STRIP_TAGS = frozenset({273, 279, 324, 325})  # Strip/Tile Offsets and ByteCounts
# The tags Pillow's TiffImageFile._setup reads (unpacks) as it opens the file, by name.
_READ_AT_OPEN = {
    256: "ImageWidth",
    257: "ImageLength",
    258: "BitsPerSample",
    259: "Compression",
    262: "PhotometricInterpretation",
    266: "FillOrder",
    277: "SamplesPerPixel",
    278: "RowsPerStrip",
    282: "XResolution",
    283: "YResolution",
    284: "PlanarConfiguration",
    296: "ResolutionUnit",
    320: "ColorMap",
    322: "TileWidth",
    323: "TileLength",
    338: "ExtraSamples",
    339: "SampleFormat",
    530: "YCbCrSubSampling",
}
# Bytes per value of the field types Pillow reads (it skips an entry of any other type).
_TYPE_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4}
_TYPE_SIZES.update({12: 8, 13: 4, 16: 8, 17: 8, 18: 8})
# The integer types Pillow reads an integer from; it looks up the compression of any
# other value as its number too (a RATIONAL 1/1 is no compression), so those count as
# uncompressed here.
_INTEGERS = {3: "H", 4: "I", 8: "h", 9: "i", 16: "Q", 17: "q"}


class _TiffForm:
    """Classic TIFF or BigTIFF, in either byte order: where things are and how wide."""

    def __init__(self, order: str, big: bool) -> None:
        self.big = big
        self.first_ifd = 8 if self.big else 4  # where the first directory's offset is
        self.offset = struct.Struct(order + ("Q" if self.big else "I"))
        self.count = struct.Struct(order + ("Q" if self.big else "H"))
        self.entry = struct.Struct(order + ("HHQ" if self.big else "HHI"))  # tag, type, count
        self.slot = 8 if self.big else 4  # then a value of up to this many bytes, or its offset
        self.entry_size = self.entry.size + self.slot
        self.integers = {kind: struct.Struct(order + code) for kind, code in _INTEGERS.items()}


# By the file's first four bytes, which :func:`check_tiff`'s caller has checked. Pillow
# (13) tells BigTIFF by a 43 in the third byte, so it reads a big-endian one (MM 0 43) as
# a classic TIFF whose first directory is at the offset in bytes 4-8: walked as it reads.
_TIFF_FORMS = {
    b"II*\x00": _TiffForm("<", big=False),
    b"MM\x00*": _TiffForm(">", big=False),
    b"II+\x00": _TiffForm("<", big=True),
    b"MM\x00+": _TiffForm(">", big=False),
}


def check_tiff(data: bytes) -> None:
    """Refuse a TIFF (classic or BigTIFF: it starts with II*, MM*, II+ or MM+) whose first
    directory would cost Pillow seconds to open: more than MAX_TIFF_ENTRIES entries, more
    than MAX_TIFF_TAG_VALUES values in a tag it reads then, or, uncompressed, more than
    MAX_TIFF_STRIPS strips or tiles."""
    form = _TIFF_FORMS[data[:4]]
    end = len(data)
    if end < form.first_ifd + form.slot:
        return
    start = form.offset.unpack_from(data, form.first_ifd)[0]
    if start + form.count.size > end:
        return  # no directory where the header says: Pillow's error
    declared = form.count.unpack_from(data, start)[0]
    first = start + form.count.size
    # Pillow stops at the end of the file: only the entries there cost it anything.
    entries = min(declared, (end - first) // form.entry_size)
    if entries > MAX_TIFF_ENTRIES:
        raise InvalidImage(
            f"the TIFF's first directory has {entries} entries (files have tens, the limit "
            f"is {MAX_TIFF_ENTRIES}); re-save it with an ordinary encoder"
        )
    strips, raw = 0, True
    for at in range(first, first + entries * form.entry_size, form.entry_size):
        tag, kind, count = form.entry.unpack_from(data, at)
        if not _value_in_file(data, form, at, kind, count):
            continue  # Pillow skips it
        if tag in _STRIP_TAGS:
            strips = max(strips, count)
        elif tag == _COMPRESSION:
            raw = _compression(data, form, at, kind, count) in (None, _TIFF_RAW)
        if count > MAX_TIFF_TAG_VALUES and tag in _READ_AT_OPEN:
            raise InvalidImage(
                f"the TIFF's {_READ_AT_OPEN[tag]} tag holds {count} values (it holds one, "
                f"one a sample or a palette's 768; the limit is {MAX_TIFF_TAG_VALUES}); "
                "re-save it with an ordinary encoder"
            )
    if raw and strips > MAX_TIFF_STRIPS:
        raise InvalidImage(
            f"the TIFF is uncompressed in {strips} strips or tiles (the limit is "
            f"{MAX_TIFF_STRIPS}; encoders write strips of 8-64 KB); re-save it with an "
            "ordinary encoder, or compressed (LZW, deflate)"
        )


def _value_in_file(data: bytes, form: _TiffForm, at: int, kind: int, count: int) -> bool:
    """Whether Pillow reads the value of the entry at ``at``: a type it knows, whose
    values lie inside the file (inline, or at an offset within it)."""
    size = _TYPE_SIZES.get(kind, 0) * count
    return size > 0 and _value_at(data, form, at, size) + size <= len(data)


def _value_at(data: bytes, form: _TiffForm, at: int, size: int) -> int:
    """Where the value of the entry at ``at``, of ``size`` bytes, is: in the entry when
    it fits there, else at the offset the entry gives."""
    inline = at + form.entry.size
    return inline if size <= form.slot else int(form.offset.unpack_from(data, inline)[0])


def _compression(data: bytes, form: _TiffForm, at: int, kind: int, count: int) -> int | None:
    """The Compression entry's (first) value when it is an integer; None otherwise."""
    number = form.integers.get(kind)
    if number is None:
        return None
    return int(number.unpack_from(data, _value_at(data, form, at, number.size * count))[0])


def check_gif(data: bytes) -> None:
    """Refuse a GIF (it starts with GIF8) with more than MAX_GIF_BLOCKS sub-blocks or
    stray bytes before its first image, which Pillow reads one by one as it opens it."""
    if len(data) < 13:
        return  # Pillow's error
    flags = data[10]
    i = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)  # after the global palette
    steps, end = 0, len(data)
    while i < end and steps <= MAX_GIF_BLOCKS:
        introducer = data[i]
        if introducer in (0x2C, 0x3B):  # the first image, or the end: Pillow stops
            return
        if introducer != 0x21:  # not an extension: Pillow skips the byte
            i += 1
            steps += 1
            continue
        i += 2  # the introducer and the extension's label, then its sub-blocks
        while i < end and steps <= MAX_GIF_BLOCKS:
            length = data[i]
            i += 1 + length
            steps += 1
            if length == 0:
                break
    if steps > MAX_GIF_BLOCKS:
        raise InvalidImage(
            f"the GIF has more than {MAX_GIF_BLOCKS} extension sub-blocks before its image "
            "(encoders write a few); re-save it with an ordinary encoder"
        )
