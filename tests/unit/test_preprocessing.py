from __future__ import annotations

import io
import struct
import time
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image

from service.errors import ImageTooLarge, InvalidImage
from service.preprocessing import (
    MAX_PNG_CHUNKS,
    MAX_PNG_HEADER_CHUNKS,
    PNG_SIGNATURE,
    SMALL_PNG_CHUNK,
    PreprocessSpec,
    decode_cost,
    open_image,
    preprocess_array,
    preprocess_bytes,
)
from tests.helpers.images import LONG, SHORT, encode, gradient, png_chunk, tiff

SPEC = PreprocessSpec()
BIG = 10**9


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF"])
def test_every_supported_format_becomes_rgb_224(fmt: str) -> None:
    out = preprocess_bytes(encode(gradient(), fmt), SPEC, max_pixels=BIG)
    assert out.shape == (224, 224, 3) and out.dtype == np.uint8
    # The gradient survives: red grows left to right, green top to bottom.
    assert out[112, 200, 0] > out[112, 20, 0] + 100
    assert out[200, 112, 1] > out[20, 112, 1] + 100


def test_lossless_input_equals_the_array_path() -> None:
    img = gradient()
    from_bytes = preprocess_bytes(encode(img, "PNG"), SPEC, max_pixels=BIG)
    from_array = preprocess_array(np.asarray(img), SPEC)
    np.testing.assert_array_equal(from_bytes, from_array)


def test_greyscale_shortcut_equals_resizing_rgb() -> None:
    grey = Image.fromarray(np.random.default_rng(1).integers(0, 256, (28, 28), np.uint8), "L")
    via_grey = preprocess_bytes(encode(grey, "PNG"), SPEC, max_pixels=BIG)
    via_rgb = preprocess_bytes(encode(grey.convert("RGB"), "PNG"), SPEC, max_pixels=BIG)
    np.testing.assert_array_equal(via_grey, via_rgb)


def test_sixteen_bit_png_keeps_its_range() -> None:
    arr = np.full((20, 20), 65535, np.uint16)
    arr[:, :10] = 0
    out = preprocess_bytes(encode(Image.fromarray(arr), "PNG"), SPEC, max_pixels=BIG)
    assert out[:, -20:].min() == 255 and out[:, :20].max() == 0


def grey_tiff(samples: np.ndarray, bits: int | None = None, photometric: int = 1) -> bytes:
    """An uncompressed little-endian greyscale TIFF of ``samples`` in their own type
    (Pillow writes only uint16 and int32 ones); ``bits`` and pre-packed uint8 rows for a
    depth numpy has no type for; ``photometric`` 0 for white-is-zero."""
    height = samples.shape[0]
    width = samples.shape[1] * 8 // bits if bits else samples.shape[1]
    data = samples.astype(samples.dtype.newbyteorder("<")).tobytes()
    return tiff(
        [
            (256, LONG, width),
            (257, LONG, height),
            (258, SHORT, bits or samples.dtype.itemsize * 8),  # BitsPerSample
            (259, SHORT, 1),  # no compression
            (262, SHORT, photometric),  # PhotometricInterpretation
            (273, LONG, 0),  # the strip: the data
            (277, SHORT, 1),
            (278, LONG, height),
            (279, LONG, len(data)),
            (339, SHORT, 2 if samples.dtype.kind == "i" else 1),  # SampleFormat: signed or not
        ],
        data,
    )


def grey_alpha_tiff(data: bytes, *, width: int, bits: int, associated: bool) -> bytes:
    """An uncompressed one-row TIFF of grey and alpha samples, the alpha premultiplied
    (``associated``) or not."""
    return tiff(
        [
            (256, LONG, width),
            (257, LONG, 1),
            (258, SHORT, bits),
            (259, SHORT, 1),
            (262, SHORT, 1),
            (273, LONG, 0),
            (277, SHORT, 2),  # grey and alpha
            (278, LONG, 1),
            (279, LONG, len(data)),
            (338, SHORT, 1 if associated else 2),  # ExtraSamples
        ],
        data,
    )


ONE_ROW = PreprocessSpec(height=1, width=6, resize_method="nearest")
TOP_BYTES = np.array([[0, 1, 127, 128, 200, 255]], np.int64)


@pytest.mark.parametrize(("dtype", "shift"), [(np.int16, 7), (np.int32, 23), (np.uint32, 24)])
def test_an_integer_tiff_keeps_the_top_8_bits_of_its_own_type(dtype: type, shift: int) -> None:
    """Shifted by 8 and cut to the low byte before, whatever the type: a 32-bit TIFF came
    out scrambled, a signed 16-bit one at half brightness. (A signed type's top bit is
    its sign: its top 8 bits of magnitude are under it.)"""
    low_bits = (1 << shift) - 1  # all set, so that only the top byte may count
    samples: np.ndarray = (TOP_BYTES << shift | low_bits).astype(dtype)
    out = preprocess_bytes(grey_tiff(samples), ONE_ROW, max_pixels=BIG)
    np.testing.assert_array_equal(out[:, :, 0], TOP_BYTES)


def test_a_16_bit_white_is_zero_tiff_is_not_decoded_as_its_negative() -> None:
    """Pillow inverts an 8-bit "white is zero" TIFF (a scanner's, a fax's), not a 16-bit
    one (wider ones it does not open): it reached the model as its negative."""
    samples = ((255 - TOP_BYTES) << 8 | 0xFF).astype(np.uint16)
    out = preprocess_bytes(grey_tiff(samples, photometric=0), ONE_ROW, max_pixels=BIG)
    np.testing.assert_array_equal(out[:, :, 0], TOP_BYTES)


def test_a_tiff_of_a_layout_pillow_lacks_is_said_to_be_one() -> None:
    """16-bit grey with alpha: Pillow cannot open it, and the client read "not a … TIFF
    file (or it is corrupt)" about a TIFF it had just saved."""
    la16 = grey_alpha_tiff(b"\x00\x10" * 4, width=2, bits=16, associated=False)
    with pytest.raises(InvalidImage, match=r"TIFF: it is corrupt, or its layout .* as PNG$"):
        preprocess_bytes(la16, SPEC, max_pixels=BIG)


@pytest.mark.parametrize("dtype", [np.int16, np.int32])
def test_a_signed_tiffs_negative_samples_are_black(dtype: type) -> None:
    info = np.iinfo(dtype)
    samples: np.ndarray = np.array([[info.min, -(1 << 8), -1, 0, info.max, info.max]], dtype)
    out = preprocess_bytes(grey_tiff(samples), ONE_ROW, max_pixels=BIG)
    np.testing.assert_array_equal(out[0, :, 0], [0, 0, 0, 0, 255, 255])


def test_an_int8_tiff_is_read_signed() -> None:
    """Pillow reads an int8 TIFF's bytes as unsigned: -5 came out as 251, near white, where
    an int16's -5 is black. Its 7 bits of magnitude are widened to 8."""
    samples = np.array([[-128, -5, -1, 0, 64, 127]], np.int8)
    out = preprocess_bytes(grey_tiff(samples), ONE_ROW, max_pixels=BIG)
    np.testing.assert_array_equal(out[0, :, 0], [0, 0, 0, 0, 128, 254])
    unsigned = preprocess_bytes(grey_tiff(samples.view(np.uint8)), ONE_ROW, max_pixels=BIG)
    np.testing.assert_array_equal(unsigned[0, :, 0], samples.view(np.uint8)[0])


def test_grey_with_associated_alpha_is_composited_like_any_alpha() -> None:
    """Pillow opens a TIFF of grey and associated (premultiplied) alpha as "La", which it
    converts to "LA" only: "could not convert the image to RGB" before."""
    grey, alpha = 100, 128  # premultiplied: 199 at half opacity
    la = grey_alpha_tiff(bytes([grey, alpha]) * 6, width=6, bits=8, associated=True)
    out = preprocess_bytes(la, ONE_ROW, max_pixels=BIG)
    on_white = Image.new("LA", (6, 1), (199, alpha))
    expected = preprocess_bytes(encode(on_white, "PNG"), ONE_ROW, max_pixels=BIG)
    np.testing.assert_allclose(out, expected, atol=1)


def test_a_32_bit_tiffs_brightness_depends_on_its_type_not_its_brightest_pixel() -> None:
    """A 32-bit image whose brightest sample is 255 was left unshifted, one whose
    brightest is 256 shifted by 8: a jump of 256 times in brightness."""
    dim, dimmer = (
        preprocess_bytes(grey_tiff(np.array([row], np.int32)), ONE_ROW, max_pixels=BIG)
        for row in ([0, 64, 128, 255, 255, 255], [0, 64, 128, 255, 255, 256])
    )
    np.testing.assert_array_equal(dim, dimmer)
    assert dim.max() == 0  # under 2**23: nothing in the top 8 bits of an int32


def test_a_12_bit_tiff_keeps_its_top_8_bits() -> None:
    twelve_bit = [0, 1 << 4, 127 << 4, 128 << 4 | 15, 200 << 4 | 15, 4095]
    packed = bytearray()  # two samples in three bytes, first sample in the high bits
    for first, second in zip(twelve_bit[::2], twelve_bit[1::2], strict=True):
        packed += bytes([first >> 4, (first & 15) << 4 | second >> 8, second & 255])
    data = grey_tiff(np.frombuffer(bytes(packed), np.uint8).reshape(1, -1), bits=12)
    out = preprocess_bytes(data, ONE_ROW, max_pixels=BIG)
    np.testing.assert_array_equal(out[0, :, 0], [0, 1, 127, 128, 200, 255])


@pytest.mark.parametrize("scale", [1.0, 255.0])
def test_a_float_tiff_keeps_its_range_whether_0_to_1_or_0_to_255(scale: float) -> None:
    """Mode F (32-bit float greyscale): 0..1 decoded black before (Pillow clips)."""
    arr = np.tile(np.linspace(0, 1, 224, dtype=np.float32), (224, 1)) * scale
    arr[0, 0] = np.nan  # black, not a crash
    out = preprocess_bytes(encode(Image.fromarray(arr, "F"), "TIFF"), SPEC, max_pixels=BIG)
    expected = np.round(np.nan_to_num(arr / scale) * 255).astype(np.uint8)
    np.testing.assert_allclose(out[:, :, 0], expected, atol=1)
    assert (out[:, :, 0] == out[:, :, 2]).all()


def test_a_float_tiffs_infinities_are_read_without_a_warning() -> None:
    """-inf overflowed the x255 scaling: a numpy RuntimeWarning on the server's stderr,
    for a client's file. -inf is black, as NaN is."""
    arr = np.full((4, 6), 0.5, np.float32)
    arr[0, :3] = -np.inf  # the rest 0..1: scaled x255
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = preprocess_bytes(encode(Image.fromarray(arr, "F"), "TIFF"), ONE_ROW, max_pixels=BIG)
    assert out.shape[-1] == 3


def test_a_tiff_of_garbage_compressed_data_gets_a_message_to_act_on() -> None:
    """Pillow's codec status alone ("decoder error -2") was the whole message."""
    out = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 200, 30)).save(out, "TIFF", compression="tiff_lzw")
    data = bytearray(out.getvalue())
    data[8:68] = bytes((i * 37) & 0xFF for i in range(8, 68))  # the strip's LZW codes
    with pytest.raises(InvalidImage) as refused:
        preprocess_bytes(bytes(data), SPEC, max_pixels=BIG)
    assert "corrupt or compressed in a way" in refused.value.message
    assert "re-save it as PNG or JPEG" in refused.value.message


def test_a_palette_png_without_its_palette_is_refused() -> None:
    """Pillow opens it, and its indices came out black: a confident answer about an
    image no viewer shows (libpng refuses it)."""
    header = struct.pack(">IIBBBBB", 4, 4, 8, 3, 0, 0, 0)  # 4x4, 8-bit palette indices
    rows = b"".join(b"\0" + bytes([1] * 4) for _ in range(4))
    data = (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", zlib.compress(rows))
        + png_chunk(b"IEND", b"")
    )
    with pytest.raises(InvalidImage, match=r"^the image is a palette image without its palette"):
        preprocess_bytes(data, SPEC, max_pixels=BIG)


def test_alpha_is_composited_on_white() -> None:
    transparent = Image.new("RGBA", (10, 10), (255, 0, 0, 0))
    out = preprocess_bytes(encode(transparent, "PNG"), SPEC, max_pixels=BIG)
    assert (out == 255).all()


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_a_big_image_with_alpha_is_composited_small_as_the_same_picture(
    mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Compositing at full size took four full-size copies: a 34-byte WebP of 6000x6000
    cost a worker ~1 GB (an outside audit). Shrunk first while at least three times the
    model's size, the copies are small, and the picture is the same: within 2 of 255
    of compositing the full image, then resizing it."""
    y, x = np.mgrid[0:2000, 0:3000]
    alpha = (np.sin(x / 37) + 1) * 127
    pixels = np.stack([x * 255 // 3000, y * 255 // 2000, (x + y) * 255 // 5000, alpha], -1)
    img = Image.fromarray(pixels.astype(np.uint8), "RGBA").convert(mode)
    on_white = Image.alpha_composite(Image.new("RGBA", img.size, (255,) * 4), img.convert("RGBA"))
    expected = np.asarray(on_white.convert("RGB").resize(SPEC.size, Image.Resampling.BILINEAR))
    sizes: list[tuple[int, int]] = []
    composite = Image.alpha_composite

    def recorded(background: Image.Image, image: Image.Image) -> Image.Image:
        sizes.append(image.size)
        return composite(background, image)

    monkeypatch.setattr(Image, "alpha_composite", recorded)
    out = preprocess_bytes(encode(img, "PNG"), SPEC, max_pixels=BIG)
    assert sizes and all(3 * 224 <= min(size) < 2 * 3 * 224 for size in sizes), sizes
    assert np.abs(out.astype(int) - expected.astype(int)).max() <= 2
    # A long strip is shrunk along its length too (one factor for both sides left it
    # whole), and nothing is averaged before a nearest-neighbour resize.
    sizes.clear()
    strip = Image.new(mode, (12_000, 700))
    preprocess_bytes(encode(strip, "PNG"), SPEC, max_pixels=BIG)
    assert sizes == [(-(-12_000 // (12_000 // 672)), 700)], sizes  # its last box partial
    sizes.clear()
    nearest = PreprocessSpec(resize_method="nearest")
    preprocess_bytes(encode(strip, "PNG"), nearest, max_pixels=BIG)
    assert sizes == [(12_000, 700)], sizes


def test_palette_with_transparency() -> None:
    img = Image.new("P", (8, 8), 0)
    img.putpalette([0, 0, 0] * 256)
    out = preprocess_bytes(encode(img, "GIF", transparency=0), SPEC, max_pixels=BIG)
    assert (out == 255).all()


def low_bit_grey_png(levels: np.ndarray, bits: int, key: int) -> bytes:
    """A 1/2/4-bit greyscale PNG (Pillow writes none) of ``levels``, ``key`` keyed
    transparent by its tRNS chunk."""
    height, width = levels.shape
    rows = b"".join(
        b"\0" + np.packbits(np.unpackbits(row[:, None], axis=1)[:, 8 - bits :]).tobytes()
        for row in levels.astype(np.uint8)
    )
    header = struct.pack(">IIBBBBB", width, height, bits, 0, 0, 0, 0)
    return (
        PNG_SIGNATURE
        + png_chunk(b"IHDR", header)
        + png_chunk(b"tRNS", struct.pack(">H", key))
        + png_chunk(b"IDAT", zlib.compress(rows))
        + png_chunk(b"IEND", b"")
    )


def keyed_and_alpha(form: str) -> tuple[bytes, bytes]:
    """The same picture twice: one colour keyed transparent by a PNG tRNS chunk, and
    as an alpha channel (LA)."""
    grey = np.random.default_rng(2).integers(0, 256, (28, 28), np.uint8)
    grey[5:20, 3:12] = 0  # the transparent colour
    alpha = np.where(grey == 0, 0, 255).astype(np.uint8)
    with_alpha = encode(Image.fromarray(np.dstack([grey, alpha]), "LA"), "PNG")
    if form == "L":
        return encode(Image.fromarray(grey, "L"), "PNG", transparency=0), with_alpha
    if form == "RGB":
        rgb = Image.fromarray(grey, "L").convert("RGB")
        return encode(rgb, "PNG", transparency=(0, 0, 0)), with_alpha
    if form == "16-bit":
        wide = Image.fromarray(grey.astype(np.uint16) * 257)
        return encode(wide, "PNG", transparency=0), with_alpha
    if form in ("2-bit", "4-bit"):
        # Level 1 keyed transparent: neither black nor white, where the key's depth shows.
        bits = int(form[0])
        levels = grey >> (8 - bits)
        levels[5:20, 3:12] = 1
        alpha = np.where(levels == 1, 0, 255).astype(np.uint8)
        scaled = (levels * (255 // ((1 << bits) - 1))).astype(np.uint8)
        return low_bit_grey_png(levels, bits, key=1), encode(
            Image.fromarray(np.dstack([scaled, alpha]), "LA"), "PNG"
        )
    # form == "1": two levels, 0 transparent and 255
    two = np.where(grey > 0, 255, 0).astype(np.uint8)
    bilevel = Image.fromarray(two, "L").convert("1")
    return (
        encode(bilevel, "PNG", transparency=0),
        encode(Image.fromarray(np.dstack([two, alpha]), "LA"), "PNG"),
    )


@pytest.mark.parametrize("form", ["L", "RGB", "16-bit", "1", "2-bit", "4-bit"])
def test_a_png_trns_colour_is_composited_on_white_like_an_alpha_channel(form: str) -> None:
    """Ignored before: the transparent colour reached the model as it is (black here),
    while the same picture with an alpha channel was white there. (A 2- or 4-bit file's
    key was compared with samples Pillow scales to 0..255: only black or white keys hit.)"""
    keyed, with_alpha = keyed_and_alpha(form)
    assert "transparency" in Image.open(io.BytesIO(keyed)).info  # a tRNS chunk, not alpha
    out = preprocess_bytes(keyed, SPEC, max_pixels=BIG)
    np.testing.assert_array_equal(out, preprocess_bytes(with_alpha, SPEC, max_pixels=BIG))
    assert (out[100:150, 50:80] == 255).all()  # where it is transparent


def test_cmyk_jpeg() -> None:
    out = preprocess_bytes(
        encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG"), SPEC, max_pixels=BIG
    )
    red = out.reshape(-1, 3).mean(axis=0)
    assert red[0] > 200 and red[1] < 60 and red[2] < 60


def test_exif_orientation_is_applied() -> None:
    img = gradient(64, 32)  # landscape; orientation 6 = rotate 90° clockwise on display
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated = preprocess_bytes(encode(img, "JPEG", exif=exif, quality=95), SPEC, max_pixels=BIG)
    plain = preprocess_bytes(encode(img, "JPEG", quality=95), SPEC, max_pixels=BIG)
    # After a clockwise turn the original left edge (low red) is at the top.
    assert rotated[10, 112, 0] < rotated[214, 112, 0] - 100
    assert abs(int(plain[10, 112, 0]) - int(plain[214, 112, 0])) < 30


def test_large_jpeg_decodes_at_reduced_scale_with_same_result_shape() -> None:
    big = gradient(1920, 1080)
    out = preprocess_bytes(encode(big, "JPEG"), SPEC, max_pixels=BIG)
    assert out.shape == (224, 224, 3)


def test_pixel_limit_is_checked_before_decoding() -> None:
    data = encode(Image.new("L", (3000, 3000)), "PNG")
    with pytest.raises(ImageTooLarge, match="9000000 pixels"):
        preprocess_bytes(data, SPEC, max_pixels=1_000_000)


@pytest.mark.parametrize("data", [b"", b"not an image at all", encode(gradient(), "PNG")[:60]])
def test_garbage_is_a_clear_invalid_image(data: bytes) -> None:
    with pytest.raises(InvalidImage) as info:
        preprocess_bytes(data, SPEC, max_pixels=BIG)
    assert info.value.http_status == 400
    assert "JPEG" in info.value.message or "decode" in info.value.message


def test_unsupported_format_is_refused() -> None:
    with pytest.raises(InvalidImage):
        preprocess_bytes(encode(gradient(), "PPM"), SPEC, max_pixels=BIG)


def test_resize_method_comes_from_the_spec() -> None:
    arr = np.random.default_rng(2).integers(0, 256, (28, 28), np.uint8)
    nearest = preprocess_array(arr, PreprocessSpec(resize_method="nearest"))
    bilinear = preprocess_array(arr, PreprocessSpec(resize_method="bilinear"))
    # Nearest replicates each source pixel into an 8x8 block exactly.
    np.testing.assert_array_equal(nearest[::8, ::8, 0], arr)
    assert not np.array_equal(nearest, bilinear)


def test_spec_round_trips_through_the_card() -> None:
    spec = PreprocessSpec(height=96, width=128, resize_method="bicubic")
    assert PreprocessSpec.from_card(spec.to_card()) == spec
    with pytest.raises(ValueError, match="resize_method"):
        PreprocessSpec.from_card({"resize_method": "magic"})


@pytest.mark.parametrize("shape", [(28, 28, 2), (2, 2, 2, 2)])
def test_bad_arrays_are_refused(shape: tuple[int, ...]) -> None:
    with pytest.raises(InvalidImage):
        preprocess_array(np.zeros(shape, np.uint8), SPEC)


def palette_png(palette_entries: int, alpha_entries: int) -> bytes:
    """A 4x4 palette PNG written by hand: Pillow's encoder would not write a tRNS chunk
    longer than the palette."""
    header = struct.pack(">IIBBBBB", 4, 4, 8, 3, 0, 0, 0)  # 8-bit palette
    return (
        PNG_SIGNATURE
        + png_chunk(b"IHDR", header)
        + png_chunk(b"PLTE", b"\x00\x80\xff" * palette_entries)
        + png_chunk(b"tRNS", b"\x00" * alpha_entries)
        + png_chunk(b"IDAT", zlib.compress(b"\x00" * 4 * 5))  # 4 rows: filter byte + 4
        + png_chunk(b"IEND", b"")
    )


def test_a_palette_png_is_composited_on_white() -> None:
    out = preprocess_bytes(palette_png(2, 2), SPEC, max_pixels=BIG)
    assert (out == 255).all()  # index 0, fully transparent


@pytest.mark.parametrize("alpha_entries", [257, 300])
def test_a_trns_chunk_longer_than_any_palette_is_invalid_not_a_crash(alpha_entries: int) -> None:
    # Pillow decodes the file, then its conversion to RGBA raises ValueError("palette
    # index out of range"): a 500 before.
    with pytest.raises(InvalidImage, match="could not convert the image to RGB"):
        preprocess_bytes(palette_png(2, alpha_entries), SPEC, max_pixels=BIG)


def with_chunks(png: bytes, before: int, after: int) -> bytes:
    """``png`` with empty ancillary chunks before its first IDAT and after its last."""
    idat, iend = png.index(b"IDAT") - 4, png.index(b"IEND") - 4
    empty = png_chunk(b"abCd", b"")
    return png[:idat] + empty * before + png[idat:iend] + empty * after + png[iend:]


def test_a_png_of_many_chunks_is_refused_before_pillow_reads_them() -> None:
    png = encode(gradient(4, 4), "PNG")
    # What an encoder might write passes: a few metadata chunks, a split image.
    ordinary = with_chunks(png, 20, 20)
    served = preprocess_bytes(ordinary, SPEC, max_pixels=BIG)
    np.testing.assert_array_equal(served, preprocess_bytes(png, SPEC, max_pixels=BIG))
    with pytest.raises(InvalidImage, match=f"more than {MAX_PNG_HEADER_CHUNKS} chunks before"):
        open_image(with_chunks(png, MAX_PNG_HEADER_CHUNKS, 0), max_pixels=BIG)
    with pytest.raises(InvalidImage, match=f"more than {MAX_PNG_CHUNKS} chunks of under"):
        open_image(with_chunks(png, 0, MAX_PNG_CHUNKS), max_pixels=BIG)
    # The reviewer's file: 874,000 empty chunks (10 MB) took 2.2 s to open.
    started = time.monotonic()
    with pytest.raises(InvalidImage):
        open_image(with_chunks(png, 874_000, 0), max_pixels=BIG)
    assert time.monotonic() - started < 0.1


def test_large_pngs_and_long_apngs_are_not_refused_for_their_chunk_count() -> None:
    """Counted in all, chunks refused a 35 MB libpng PNG (4,328 IDATs of 8 KiB) over
    gRPC and an APNG of 2,100 frames (two chunks each), which decode as before."""
    png = encode(gradient(4, 4), "PNG")
    idat, iend = png.index(b"IDAT") - 4, png.index(b"IEND") - 4
    big = png_chunk(b"abCd", b"x" * SMALL_PNG_CHUNK)  # as many as a large file's IDATs
    padded = png[:idat] + png[idat:iend] + big * (MAX_PNG_CHUNKS + 10) + png[iend:]
    np.testing.assert_array_equal(
        preprocess_bytes(padded, SPEC, max_pixels=BIG), preprocess_bytes(png, SPEC, max_pixels=BIG)
    )
    frames = [Image.new("RGB", (8, 8), (k % 256, 40, 90)) for k in range(2100)]
    out = io.BytesIO()
    frames[0].save(out, "PNG", save_all=True, append_images=frames[1:], duration=33)
    first = io.BytesIO()
    frames[0].save(first, "PNG")
    np.testing.assert_array_equal(
        preprocess_bytes(out.getvalue(), SPEC, max_pixels=BIG),
        preprocess_bytes(first.getvalue(), SPEC, max_pixels=BIG),
    )


def progressive(width: int, height: int) -> bytes:
    return encode(gradient(width, height), "JPEG", progressive=True)


def test_a_progressive_jpegs_cost_counts_every_scan_at_full_resolution() -> None:
    baseline = open_image(encode(gradient(2400, 2400), "JPEG"), max_pixels=BIG, target=SPEC.size)
    assert baseline.size == (300, 300) and decode_cost(baseline) == 300 * 300
    # Decoded to 300x300 as well, but each of its 10 scans passes over 2400x2400.
    opened = open_image(progressive(2400, 2400), max_pixels=BIG, target=SPEC.size)
    assert opened.size == (300, 300) and decode_cost(opened) == 2400 * 2400
    small = open_image(progressive(224, 224), max_pixels=BIG, target=SPEC.size)
    assert decode_cost(small) == 224 * 224
    # Through Pillow (an Exif segment), whose draft hides the full size: the most it
    # can be, so it is decoded on the decode threads.
    exif = Image.Exif()
    exif[0x0112] = 1
    data = encode(gradient(224, 224), "JPEG", progressive=True, exif=exif)
    with_exif = open_image(data, max_pixels=BIG, target=SPEC.size)
    assert isinstance(with_exif, Image.Image) and decode_cost(with_exif) > 100 * 224 * 224


def test_pillows_words_for_a_broken_file_come_with_what_to_do() -> None:
    """A PNG signature then junk said only "Truncated File Read" (Pillow's words)."""
    from service.errors import InvalidImage

    with pytest.raises(InvalidImage) as refused:
        open_image(PNG_SIGNATURE + b"junkjunkjunk", max_pixels=10**8)
    assert refused.value.message.endswith("cut off or corrupt: send it whole, or re-save it")


def test_a_bmp_declaring_no_width_is_malformed_not_too_large() -> None:
    """BMP's width is signed; Pillow read -5 as 4,294,967,291 columns: a 413."""
    import struct

    from service.errors import InvalidImage

    def bmp(width: int, height: int) -> bytes:
        info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 2835, 2835, 0, 0)
        pixels = b"\0" * 64
        return b"BM" + struct.pack("<IHHI", 54 + len(pixels), 0, 0, 54) + info + pixels

    for width in (-5, 0):
        with pytest.raises(InvalidImage, match=f"declares a width of {width}"):
            open_image(bmp(width, 5), max_pixels=10**8)
    assert open_image(bmp(5, -5), max_pixels=10**8).size == (5, 5)  # top-down: valid
