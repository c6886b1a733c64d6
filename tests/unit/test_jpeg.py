"""Plain JPEGs skip Pillow (service/jpeg.py): the pixels must be Pillow's, bit for bit,
and every file it should not take must still go through Pillow."""

from __future__ import annotations

import io
import time

import numpy as np
import numpy.typing as npt
import pytest
from PIL import Image

from service.errors import ImageTooLarge, InvalidImage
from service.jpeg import (
    MAX_LAYOUT_SEGMENTS,
    MAX_PHOTOSHOP_BLOCKS,
    MAX_QUANT_TABLES,
    MAX_SCANS,
    SMALL_SEGMENT,
    PlainJpeg,
    open_plain,
    read_layout,
)
from service.preprocessing import (
    PreprocessSpec,
    _open_with_pillow,
    open_image,
    preprocess_bytes,
    resize,
)

SPEC = PreprocessSpec()
BIG = 10**9


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """Smooth colour with grain: every DCT coefficient and both chroma planes matter."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BILINEAR))
    grain = rng.integers(-24, 24, (height, width, 3))
    return Image.fromarray(np.clip(smooth.astype(int) + grain, 0, 255).astype(np.uint8))


def jpeg(img: Image.Image, **options: object) -> bytes:
    out = io.BytesIO()
    img.save(out, "JPEG", **options)
    return out.getvalue()


def through_pillow(data: bytes) -> npt.NDArray[np.uint8]:
    """What preprocessing gave before this module: Pillow's header, draft and decode."""
    return resize(_open_with_pillow(data, max_pixels=BIG, target=SPEC.size).copy(), SPEC)


@pytest.mark.parametrize(
    "size", [(224, 224), (225, 223), (31, 17), (100, 300), (448, 448), (449, 900), (1800, 1800)]
)
@pytest.mark.parametrize(
    "options",
    [
        {"quality": 90},
        {"quality": 75, "subsampling": 0},  # 4:4:4
        {"quality": 75, "subsampling": 1},  # 4:2:2
        {"quality": 40, "subsampling": 2},  # 4:2:0
        {"progressive": True},
        {"optimize": True},
        {"restart_marker_blocks": 1},
    ],
    ids=["q90", "444", "422", "420", "progressive", "optimized", "restarts"],
)
@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_plain_jpegs_decode_to_pillows_pixels(
    size: tuple[int, int], options: dict[str, object], mode: str
) -> None:
    data = jpeg(photo(*size).convert(mode), **options)
    opened = open_image(data, max_pixels=BIG, target=SPEC.size)
    assert isinstance(opened, PlainJpeg)
    # The reduced scale is Pillow's: the size a decode will cost is the same.
    assert opened.size == _open_with_pillow(data, max_pixels=BIG, target=SPEC.size).size
    served = preprocess_bytes(data, SPEC, max_pixels=BIG)
    np.testing.assert_array_equal(served, through_pillow(data))


def test_a_jpeg_with_exif_goes_through_pillow_and_is_turned_upright() -> None:
    img = photo(224, 160)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to view
    data = jpeg(img, exif=exif, quality=95)
    assert open_plain(data, SPEC.size) is None
    assert isinstance(open_image(data, max_pixels=BIG, target=SPEC.size), Image.Image)
    assert preprocess_bytes(data, PreprocessSpec(height=224, width=160), max_pixels=BIG).shape == (
        224,
        160,
        3,
    )


def xmp(orientation: str) -> bytes:
    """An XMP packet giving ``orientation`` as Adobe's tiff: namespace does: an
    attribute, or an element when given as one (``<tiff:Orientation>6</…>``)."""
    if orientation.startswith("<"):
        description = f"<rdf:Description>{orientation}</rdf:Description>"
    else:
        description = f'<rdf:Description tiff:Orientation="{orientation}"/>'
    return (
        '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/'
        '02/22-rdf-syntax-ns#" xmlns:tiff="http://ns.adobe.com/tiff/1.0/">'
        f"{description}</rdf:RDF></x:xmpmeta>"
    ).encode()


@pytest.mark.parametrize(
    "orientation", ["2", "3", "4", "5", "6", "7", "8", "<tiff:Orientation>6</tiff:Orientation>"]
)
def test_an_orientation_given_only_in_xmp_is_applied_as_pillow_applies_it(
    orientation: str,
) -> None:
    # ImageOps.exif_transpose takes an orientation from XMP when there is no Exif: the
    # fast path served such a photo unturned (found by a review).
    img = photo(224, 160)
    data = jpeg(img, quality=95, xmp=xmp(orientation))
    served = preprocess_bytes(data, SPEC, max_pixels=BIG)
    np.testing.assert_array_equal(served, through_pillow(data))
    unturned = preprocess_bytes(jpeg(img, quality=95), SPEC, max_pixels=BIG)
    assert not np.array_equal(served, unturned)


@pytest.mark.parametrize("orientation", ["1", "<tiff:Orientation>1</tiff:Orientation>"])
def test_xmp_without_a_turn_keeps_the_fast_path(orientation: str) -> None:
    data = jpeg(photo(224, 160), quality=95, xmp=xmp(orientation))
    assert isinstance(open_image(data, max_pixels=BIG, target=SPEC.size), PlainJpeg)
    np.testing.assert_array_equal(
        preprocess_bytes(data, SPEC, max_pixels=BIG), through_pillow(data)
    )


def test_cmyk_goes_through_pillow() -> None:
    data = jpeg(photo(64, 64).convert("CMYK"))
    assert open_plain(data, SPEC.size) is None
    served = preprocess_bytes(data, SPEC, max_pixels=BIG)
    np.testing.assert_array_equal(served, through_pillow(data))


def test_files_that_are_not_plain_jpegs_are_left_to_pillow() -> None:
    png = io.BytesIO()
    photo(32, 32).save(png, "PNG")
    good = jpeg(photo(64, 64))
    for data in (b"", png.getvalue(), good[:2], good[:40], b"\xff\xd8\xff" + b"\x00" * 64):
        assert open_plain(data, SPEC.size) is None


def test_a_truncated_jpeg_gets_pillows_error() -> None:
    data = jpeg(photo(224, 224))
    cut = data[: len(data) // 2]
    assert isinstance(open_image(cut, max_pixels=BIG, target=SPEC.size), PlainJpeg)
    with pytest.raises(InvalidImage, match="could not decode the image"):
        preprocess_bytes(cut, SPEC, max_pixels=BIG)


def test_a_recoverable_defect_is_decoded_as_pillow_decodes_it() -> None:
    # Bytes inserted before a marker: libjpeg-turbo warns ("extraneous bytes"), which
    # the fast path refuses; Pillow decodes the file anyway, and so must we.
    data = jpeg(photo(224, 224), restart_marker_blocks=4)
    rst = data.index(b"\xff\xd0")
    damaged = data[:rst] + b"\x12\x34" + data[rst:]
    np.testing.assert_array_equal(
        preprocess_bytes(damaged, SPEC, max_pixels=BIG), through_pillow(damaged)
    )


def test_the_pixel_limit_holds_on_the_fast_path() -> None:
    data = jpeg(photo(300, 200))
    with pytest.raises(ImageTooLarge, match="300x200 = 60000 pixels; the limit is 59999"):
        open_image(data, max_pixels=59_999, target=SPEC.size)


def test_threads_decoding_at_once_each_get_their_own_pixels() -> None:
    # The decode pool runs several at once with the GIL released: a handle or buffer
    # shared between calls would mix images up.
    from concurrent.futures import ThreadPoolExecutor

    files = [jpeg(photo(224, 224, seed=i)) for i in range(8)]
    alone = [preprocess_bytes(f, SPEC, max_pixels=BIG) for f in files]
    with ThreadPoolExecutor(4) as pool:
        for _ in range(5):
            together = list(pool.map(lambda f: preprocess_bytes(f, SPEC, max_pixels=BIG), files))
            for a, b in zip(alone, together, strict=True):
                np.testing.assert_array_equal(a, b)


def test_a_header_of_many_segments_is_left_to_pillow() -> None:
    # Hundreds of tiny segments before the scan: the fast path's header walk stops
    # early (it runs where the request arrived) and Pillow decodes the file.
    data = jpeg(photo(64, 64))
    comments = b"\xff\xfe\x00\x03x" * 400
    padded = data[:2] + comments + data[2:]
    assert open_plain(padded, SPEC.size) is None
    np.testing.assert_array_equal(
        preprocess_bytes(padded, SPEC, max_pixels=BIG), preprocess_bytes(data, SPEC, max_pixels=BIG)
    )
    few = data[:2] + b"\xff\xfe\x00\x03x" * 10 + data[2:]
    assert isinstance(open_plain(few, SPEC.size), PlainJpeg)


def test_thousands_of_segments_are_refused() -> None:
    # Each would be a Python step of Pillow's header walk, on the event loop.
    data = jpeg(photo(64, 64))
    padded = data[:2] + b"\xff\xfe\x00\x03x" * (MAX_LAYOUT_SEGMENTS + 1) + data[2:]
    with pytest.raises(InvalidImage, match=f"more than {MAX_LAYOUT_SEGMENTS} marker segments"):
        open_image(padded, max_pixels=BIG, target=SPEC.size)


def test_many_large_metadata_segments_are_not_refused() -> None:
    """Photoshop's extended XMP comes in 64 KB APP1s, hundreds in a file that gRPC
    takes (35 MB): counted, they refused a file that decodes as ever."""
    data = jpeg(photo(64, 64))
    xmp = b"\xff\xe1" + (2 + SMALL_SEGMENT).to_bytes(2, "big") + b"x" * SMALL_SEGMENT
    padded = data[:2] + xmp * (MAX_LAYOUT_SEGMENTS + 10) + data[2:]
    np.testing.assert_array_equal(
        preprocess_bytes(padded, SPEC, max_pixels=BIG), preprocess_bytes(data, SPEC, max_pixels=BIG)
    )


def scan_bomb(repeats: int, size: int = 1600) -> bytes:
    """A progressive grey JPEG whose last scan (and its Huffman table) is repeated: each
    copy is another pass over every coefficient (the reviewer's file: 5600², 300)."""
    data = jpeg(Image.new("L", (size, size), 128), progressive=True, quality=10)
    dht, eoi = data.rfind(b"\xff\xc4"), data.rfind(b"\xff\xd9")
    return data[:eoi] + data[dht:eoi] * repeats + b"\xff\xd9"


@pytest.mark.parametrize(
    ("options", "scans", "progressive"),
    [({}, 1, False), ({"progressive": True}, 10, True), ({"restart_marker_blocks": 1}, 1, False)],
    ids=["baseline", "progressive", "restarts"],
)
def test_the_layout_counts_an_encoders_scans(
    options: dict[str, object], scans: int, progressive: bool
) -> None:
    layout = read_layout(jpeg(photo(300, 200), **options))
    assert (layout.scans, layout.progressive) == (scans, progressive)


def test_markers_inside_segments_and_after_the_image_are_not_scans() -> None:
    # An Exif thumbnail is a whole JPEG inside APP1, and cameras append a second image
    # after EOI (MPF): neither is decoded, so neither counts.
    data = jpeg(photo(64, 64))
    thumbnail = jpeg(photo(32, 32), progressive=True) * 20
    app1 = b"\xff\xe1" + (len(thumbnail) + 8).to_bytes(2, "big") + b"Exif\x00\x00" + thumbnail
    wrapped = data[:2] + app1 + data[2:] + jpeg(photo(32, 32), progressive=True) * 20
    assert read_layout(wrapped).scans == 1
    served = preprocess_bytes(wrapped, SPEC, max_pixels=BIG)
    np.testing.assert_array_equal(served, preprocess_bytes(data, SPEC, max_pixels=BIG))


def test_a_scan_bomb_is_refused_before_decoding() -> None:
    started = time.monotonic()
    with pytest.raises(InvalidImage, match=f"more than {MAX_SCANS} scans.*re-save it"):
        open_image(scan_bomb(300), max_pixels=BIG, target=SPEC.size)
    assert time.monotonic() - started < 0.1  # refused from the markers, not decoded
    opened = open_image(scan_bomb(MAX_SCANS - 10), max_pixels=BIG, target=SPEC.size)
    assert isinstance(opened, PlainJpeg) and opened.layout.scans <= MAX_SCANS


def dqt(tables: int, precision: int = 0) -> bytes:
    """One DQT segment of ``tables`` tables (8- or 16-bit values), ids 0-3 in turn."""
    size = 64 * (precision + 1)
    body = b"".join(bytes([precision << 4 | k % 4]) + bytes([1] * size) for k in range(tables))
    return b"\xff\xdb" + (len(body) + 2).to_bytes(2, "big") + body


def test_thousands_of_quantization_tables_are_refused_before_pillow_reads_them() -> None:
    """The audit's file: an Exif segment (so Pillow opens it) and 160 DQT segments of
    1,008 tables (10 MB), which Pillow parses one by one: 0.5-0.7 s of the event loop."""
    exif = Image.Exif()
    exif[0x0112] = 1
    data = jpeg(photo(64, 64), exif=exif)
    bomb = data[:2] + dqt(1008) * 160 + data[2:]
    started = time.monotonic()
    with pytest.raises(InvalidImage, match=f"more than {MAX_QUANT_TABLES} quantization tables"):
        open_image(bomb, max_pixels=BIG, target=SPEC.size)
    assert time.monotonic() - started < 0.05
    # Small DQT segments, each under the small-segment limit, count too.
    many = data[:2] + dqt(15) * (MAX_QUANT_TABLES // 15 + 1) + data[2:]
    with pytest.raises(InvalidImage, match=r"quantization tables.*re-save it"):
        open_image(many, max_pixels=BIG, target=SPEC.size)


@pytest.mark.parametrize("precision", [0, 1], ids=["8-bit", "16-bit"])
def test_an_encoders_quantization_tables_are_not_refused(precision: int) -> None:
    # Four tables, each in its own segment and defined twice over (the file's own still
    # follow, and are the ones used): the layout counts them all, far under the limit.
    data = jpeg(photo(64, 64))
    redefined = data[:2] + b"".join(dqt(1, precision) for _ in range(8)) + data[2:]
    assert read_layout(redefined).tables == 10
    np.testing.assert_array_equal(
        preprocess_bytes(redefined, SPEC, max_pixels=BIG),
        preprocess_bytes(data, SPEC, max_pixels=BIG),
    )
    sixteen_bit = jpeg(photo(64, 64), qtables=[[300] * 64, [400] * 64])
    assert read_layout(sixteen_bit).tables == 2
    assert preprocess_bytes(sixteen_bit, SPEC, max_pixels=BIG).shape == (224, 224, 3)


def app13(blocks: int) -> bytes:
    """One APP13 "Photoshop 3.0" segment of ``blocks`` empty 12-byte resource blocks."""
    block = b"8BIM" + (0x0404).to_bytes(2, "big") + b"\0\0" + (0).to_bytes(4, "big")
    body = b"Photoshop 3.0\0" + block * blocks
    return b"\xff\xed" + (len(body) + 2).to_bytes(2, "big") + body


def test_thousands_of_photoshop_resource_blocks_are_refused_before_pillow_reads_them() -> None:
    """APP13 segments packed with 12-byte 8BIM blocks, which Pillow parses one by one as
    it opens the file: 10 MB of them took ~0.5 s of the event loop."""
    data = jpeg(photo(64, 64))
    bomb = data[:2] + app13(5000) * 2 + data[2:]
    started = time.monotonic()
    with pytest.raises(InvalidImage, match=f"more than {MAX_PHOTOSHOP_BLOCKS} Photoshop"):
        open_image(bomb, max_pixels=BIG, target=SPEC.size)
    assert time.monotonic() - started < 0.05
    ordinary = data[:2] + app13(30) + data[2:]  # what Photoshop writes: tens
    assert read_layout(ordinary).photoshop_blocks == 30
    np.testing.assert_array_equal(
        preprocess_bytes(ordinary, SPEC, max_pixels=BIG),
        preprocess_bytes(data, SPEC, max_pixels=BIG),
    )
