"""TIFFs and GIFs whose structure would hold the event loop while Pillow opens them are
refused from a walk of that structure (service/image_walks.py); ordinary files are not."""

from __future__ import annotations

import io
import struct
import time
import zlib

import numpy as np
import pytest
from PIL import Image

from service.errors import InvalidImage
from service.image_walks import (
    MAX_GIF_BLOCKS,
    MAX_TIFF_ENTRIES,
    MAX_TIFF_STRIPS,
    MAX_TIFF_TAG_VALUES,
)
from service.preprocessing import PreprocessSpec, decode_cost, open_image, preprocess_bytes

SPEC = PreprocessSpec()
BIG = 10**9
SHORT, LONG, RATIONAL, LONG8 = 3, 4, 5, 16
_FORMAT = {SHORT: "H", LONG: "I", RATIONAL: "II", LONG8: "Q"}
Entry = tuple[int, int, list[int]]  # tag, type, values


def tiff_file(entries: list[Entry], pixels: bytes, *, order: str = "<", big: bool = False) -> bytes:
    """A TIFF (classic or BigTIFF, either byte order) of ``pixels`` then one directory,
    then the values that do not fit in their entries; every strip or tile offset (273,
    324) points at the pixels."""
    slot, header = (8, 16) if big else (4, 8)
    directory = header + len(pixels)
    values_at = directory + (8 if big else 2) + (20 if big else 12) * len(entries)
    values_at += slot  # the next directory's offset: none
    rows, out_of_line = [], b""
    for tag, kind, vals in entries:
        packed = _values(kind, [header] * len(vals) if tag in (273, 324) else vals, order)
        if len(packed) > slot:
            at, out_of_line = values_at + len(out_of_line), out_of_line + packed
            packed = struct.pack(order + ("Q" if big else "I"), at)
        count = struct.pack(order + ("HHQ" if big else "HHI"), tag, kind, len(vals))
        rows.append(count + packed.ljust(slot, b"\0"))
    magic = (b"II" if order == "<" else b"MM") + struct.pack(order + "H", 43 if big else 42)
    first = (
        struct.pack(order + "HHQ", 8, 0, directory) if big else struct.pack(order + "I", directory)
    )
    count = struct.pack(order + ("Q" if big else "H"), len(entries))
    return magic + first + pixels + count + b"".join(rows) + b"\0" * slot + out_of_line


def _values(kind: int, values: list[int], order: str) -> bytes:
    if kind == RATIONAL:
        return b"".join(struct.pack(order + "II", v, 1) for v in values)
    return struct.pack(f"{order}{len(values)}{_FORMAT[kind]}", *values)


def grey(width: int, height: int, strips: int, compression: int = 1) -> list[Entry]:
    """A grey image's entries, its rows in ``strips`` strips of one byte counted each."""
    return [
        (256, LONG, [width]), (257, LONG, [height]), (258, SHORT, [8]),
        (259, SHORT, [compression]), (262, SHORT, [1]), (273, SHORT, [0] * strips),
        (277, SHORT, [1]), (278, LONG, [-(-height // strips)]), (279, SHORT, [1] * strips),
    ]  # fmt: skip


def strip_bomb(rows: int, **form: object) -> bytes:
    """The audit's file: a 1 x ``rows`` uncompressed image, one strip a row."""
    return tiff_file(grey(1, rows, rows), b"\x80" * 64, **form)  # type: ignore[arg-type]


def with_entries(count: int, **form: object) -> bytes:
    """An 8x8 image whose directory has ``count`` entries: its own and private tags."""
    own = grey(8, 8, 1)
    private = [(40000 + k % 20000, SHORT, [k % 60000]) for k in range(count - len(own))]
    return tiff_file(own + private, b"\x80" * 64, **form)  # type: ignore[arg-type]


def refused_quickly(data: bytes, match: str) -> None:
    started = time.perf_counter()
    with pytest.raises(InvalidImage, match=match):
        open_image(data, max_pixels=BIG, target=SPEC.size)
    assert time.perf_counter() - started < 0.05


FORMS = [{"order": "<"}, {"order": ">"}, {"order": "<", "big": True}]
FORM_IDS = ["II", "MM", "II-bigtiff"]


@pytest.mark.parametrize("form", FORMS, ids=FORM_IDS)
def test_a_tiff_of_millions_of_strips_is_refused_before_pillow_opens_it(form: dict) -> None:
    # The audit's 10 MB file: Pillow took 6 s and 1.1 GB making a tile of each strip.
    refused_quickly(strip_bomb(2_621_390, **form), "uncompressed in 2621390 strips.*re-save it")
    refused_quickly(strip_bomb(MAX_TIFF_STRIPS + 1, **form), f"the limit is {MAX_TIFF_STRIPS}")
    opened = open_image(strip_bomb(MAX_TIFF_STRIPS, **form), max_pixels=BIG, target=SPEC.size)
    assert opened.size == (1, MAX_TIFF_STRIPS)


def test_a_compressed_tiffs_strips_are_not_counted() -> None:
    # Pillow hands a compressed file to libtiff whole: 2.6 million strips open in 2.5 ms.
    rows = MAX_TIFF_STRIPS * 4
    data = tiff_file(grey(1, rows, rows, compression=8), zlib.compress(b"\x80"))
    assert open_image(data, max_pixels=BIG, target=SPEC.size).size == (1, rows)


def test_many_strips_are_decoded_off_the_event_loop() -> None:
    # Pillow decodes each uncompressed strip in Python (~2.5 µs): 8,192 of them, 8,192
    # pixels in 33 KB, took 22 ms; counted as pixels, they are not decoded inline.
    opened = open_image(strip_bomb(1000), max_pixels=BIG, target=SPEC.size)
    assert decode_cost(opened) > 150_000
    one_strip = open_image(tiff_file(grey(8, 8, 1), b"\x80" * 64), max_pixels=BIG)
    assert decode_cost(one_strip) < 150_000


@pytest.mark.parametrize("form", FORMS, ids=FORM_IDS)
def test_a_tiff_directory_of_thousands_of_entries_is_refused(form: dict) -> None:
    # 64,000 entries took 0.39 s to open (48 in a gRPC call, 13 s of the event loop).
    refused_quickly(with_entries(64_000, **form), "first directory has 64000 entries.*re-save it")
    refused_quickly(with_entries(MAX_TIFF_ENTRIES + 1, **form), f"the limit is {MAX_TIFF_ENTRIES}")
    assert open_image(with_entries(MAX_TIFF_ENTRIES, **form), max_pixels=BIG).size == (8, 8)


def test_a_big_endian_bigtiff_is_walked_as_pillow_reads_it() -> None:
    # Pillow takes MM 0 43 for a classic TIFF, its directory at the offset in bytes 4-8.
    classic = with_entries(64_000, order=">")
    refused_quickly(classic[:2] + b"\x00+" + classic[4:], "first directory has 64000 entries")


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow's, about the short directory
def test_a_directory_cut_short_counts_only_the_entries_there() -> None:
    # Its count says 60,000 but the file ends after a few: Pillow reads those and stops.
    data = with_entries(20)
    at = struct.unpack_from("<I", data, 4)[0]
    lying = data[:at] + struct.pack("<H", 60_000) + data[at + 2 :] + b"\0" * 1000
    assert open_image(lying, max_pixels=BIG).size == (8, 8)


@pytest.mark.parametrize(("tag", "kind"), [(282, RATIONAL), (258, SHORT), (320, SHORT)])
def test_a_tag_read_at_open_holding_a_million_values_is_refused(tag: int, kind: int) -> None:
    # A million RATIONAL XResolutions took Pillow 4.7 s to open (an object each).
    entries = [entry for entry in grey(8, 8, 1) if entry[0] != tag]
    entries = sorted([*entries, (tag, kind, [8] * 1_000_000)])
    names = {282: "XResolution", 258: "BitsPerSample", 320: "ColorMap"}
    refused_quickly(tiff_file(entries, b"\x80" * 64), f"{names[tag]} tag holds 1000000 values")
    # What files hold passes: a palette's 3 x 256 colours, one resolution.
    palette = [*grey(8, 8, 1), (282, RATIONAL, [72]), (320, SHORT, [0] * 768)]
    entries = sorted((t, k, v) if t != 262 else (t, k, [3]) for t, k, v in palette)
    assert open_image(tiff_file(entries, b"\x01" * 64), max_pixels=BIG).mode == "P"
    assert MAX_TIFF_TAG_VALUES >= 768


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow's, about the skipped tags
def test_tags_past_the_end_of_the_file_are_left_to_pillow() -> None:
    # Pillow skips a value it cannot read, so it costs nothing: not refused for its count.
    data = bytearray(strip_bomb(MAX_TIFF_STRIPS * 2))
    for tag in (273, 279):  # point both arrays past the end
        at = data.index(struct.pack("<HHI", tag, SHORT, MAX_TIFF_STRIPS * 2))
        data[at + 8 : at + 12] = struct.pack("<I", len(data))
    try:
        open_image(bytes(data), max_pixels=BIG)
    except InvalidImage as refused:  # Pillow's error: it found no strips
        assert "strips or tiles" not in str(refused)


def save(img: Image.Image, fmt: str, **options: object) -> bytes:
    out = io.BytesIO()
    img.save(out, fmt, **options)
    return out.getvalue()


PHOTO = Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8))
TALL = Image.fromarray(np.random.default_rng(1).integers(0, 256, (6000, 40), dtype=np.uint8))
ORDINARY_TIFFS = {
    "raw": save(PHOTO, "TIFF"),
    "lzw": save(PHOTO, "TIFF", compression="tiff_lzw"),
    "deflate": save(PHOTO, "TIFF", compression="tiff_adobe_deflate"),
    "jpeg": save(PHOTO, "TIFF", compression="jpeg"),
    "packbits": save(PHOTO, "TIFF", compression="packbits"),
    "bigtiff": save(PHOTO, "TIFF", big_tiff=True),
    "libtiff-sized strips": save(PHOTO, "TIFF", strip_size=8192),
    "one row a strip": save(PHOTO, "TIFF", strip_size=1),
    "6000 rows, one a strip": save(TALL, "TIFF", strip_size=1),
    "palette": save(PHOTO.convert("P"), "TIFF"),
    "multipage": save(PHOTO, "TIFF", save_all=True, append_images=[PHOTO, PHOTO]),
    "exif and dpi": save(PHOTO, "TIFF", exif=Image.Exif(), dpi=(300, 300)),
    "fax": save(PHOTO.convert("1"), "TIFF", compression="group4"),
}


@pytest.mark.parametrize("data", ORDINARY_TIFFS.values(), ids=ORDINARY_TIFFS.keys())
def test_ordinary_tiffs_still_open(data: bytes) -> None:
    assert preprocess_bytes(data, SPEC, max_pixels=BIG).shape == (224, 224, 3)


def tiled(width: int, height: int, tile: int, compression: int) -> bytes:
    """An RGB image in ``tile`` x ``tile`` tiles (Pillow writes none), all one tile's
    data."""
    tiles = -(-width // tile) * -(-height // tile)
    pixels = b"\x80" * (tile * tile * 3)
    data = zlib.compress(pixels) if compression == 8 else pixels
    entries = [
        (256, LONG, [width]), (257, LONG, [height]), (258, SHORT, [8, 8, 8]),
        (259, SHORT, [compression]), (262, SHORT, [2]), (277, SHORT, [3]),
        (322, SHORT, [tile]), (323, SHORT, [tile]), (324, LONG, [0] * tiles),
        (325, LONG, [len(data)] * tiles),
    ]  # fmt: skip
    return tiff_file(entries, data)


@pytest.mark.parametrize(
    ("tile", "compression"), [(256, 1), (256, 8), (16, 8)], ids=["raw", "deflate", "10k-small"]
)
def test_tiled_tiffs_still_open(tile: int, compression: int) -> None:
    data = tiled(1600, 1600, tile, compression)  # 16x16 tiles: 10,000, compressed
    assert preprocess_bytes(data, SPEC, max_pixels=BIG).shape == (224, 224, 3)


def gif_with(extension: bytes) -> bytes:
    """An 8x8 GIF with ``extension`` before its image."""
    plain = save(Image.new("P", (8, 8)), "GIF")
    flags = plain[10]
    image = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)
    image = plain.index(b",", image)
    return plain[:image] + extension + plain[image:]


def comment(sub_blocks: int) -> bytes:
    return b"!\xfe" + b"\x01x" * sub_blocks + b"\x00"


def test_a_gif_of_millions_of_sub_blocks_is_refused_before_pillow_opens_it() -> None:
    # The audit's file: one comment of 5M one-byte sub-blocks (10 MB), 1.1-2 s to open.
    refused_quickly(gif_with(comment(5_000_000)), f"more than {MAX_GIF_BLOCKS} .*sub-blocks")
    refused_quickly(gif_with(comment(MAX_GIF_BLOCKS + 1)), "re-save it with an ordinary encoder")
    assert open_image(gif_with(comment(MAX_GIF_BLOCKS - 1)), max_pixels=BIG).size == (8, 8)
    # Stray bytes between blocks, which Pillow skips one by one, count too.
    refused_quickly(gif_with(b"\x07" * (MAX_GIF_BLOCKS + 1)), "sub-blocks")


def xmp_extension(kilobytes: int) -> bytes:
    """XMP as Photoshop writes it in a GIF: raw text after the application extension's
    header, then the 257-byte 'magic trailer' that ends any sub-block read of it."""
    line = b'<rdf:li stEvt:action="saved" stEvt:softwareAgent="Adobe Photoshop"/>\n'
    text = b'<?xpacket begin="" id="W5M0MpCehiHzreSzNTczkc9d"?><x:xmpmeta>\n'
    text += line * (kilobytes * 1024 // len(line)) + b" " * 2000 + b'<?xpacket end="w"?>'
    return b"!\xff\x0bXMP DataXMP" + text + b"\x01" + bytes(range(255, -1, -1)) + b"\x00"


ORDINARY_GIFS = {
    "plain": save(PHOTO.quantize(64), "GIF"),
    "animated": save(
        PHOTO.quantize(64),
        "GIF",
        save_all=True,
        append_images=[PHOTO.rotate(90).quantize(64)] * 3,
        loop=0,
        duration=40,
        comment=b"made by a test " * 40,
    ),
    "transparent": save(PHOTO.quantize(64), "GIF", transparency=0),
    "100 KB of XMP": gif_with(xmp_extension(100)),
    "1 MB of XMP": gif_with(xmp_extension(1024)),
}


@pytest.mark.parametrize("data", ORDINARY_GIFS.values(), ids=ORDINARY_GIFS.keys())
def test_ordinary_gifs_still_open(data: bytes) -> None:
    assert preprocess_bytes(data, SPEC, max_pixels=BIG).shape == (224, 224, 3)
